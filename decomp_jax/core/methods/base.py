"""The ``Method`` type and the registry.

A method is an immutable bundle of pure functions over *one* dense kernel ``K`` of shape
``(d_in, d_out)`` (the layer computes ``y = x @ K + b``):

- ``init(key, kernel, bias, cfg) -> factors``: the leaves added beside ``kernel``.
- ``materialize(kernel, factors, cfg) -> kernel'``: the adapted kernel ``phi(K)``.
- ``apply(x, kernel, bias, factors, cfg, *, train, key) -> y``: the factored path, which never
  forms ``K'`` (``None`` when the maths needs ``K'``; execution then materialises per layer).
- ``materialize_bias(bias, factors, cfg) -> bias'``: for methods that also change the bias.
- ``unmaterialize(kernel', bias', factors, cfg) -> (kernel, bias)``: the inverse of the two above,
  for ``unmerge`` (``None`` where ``K`` cannot be recovered from ``K'`` and the factors).
- ``residual(kernel, factors, cfg) -> kernel``: the base kernel the layer keeps after injection
  (PiSSA/MiLoRA keep ``K - s * lora_a @ lora_b``); ``None`` keeps ``K``.

A method without ``materialize`` is not mergeable (the adapters: their update is not a function of
the kernel alone). A method with a ``schedule`` is stateful: ``schedule(cfg, total_steps)`` returns
a ``Schedule`` of pure functions that the train step runs after each optimizer update.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from decomp_jax.errors import ConfigError


class Schedule(NamedTuple):
    """The state of a stateful method, as pure functions (in the style of an optax transformation).

    ``init(params) -> state``; ``update(state, step, params, grads) -> (state, params)``, where
    ``step`` counts optimizer updates done (1 after the first), ``params`` is the whole adapted
    tree after the update and ``grads`` the gradient of the trainable leaves. The returned params
    may change trainable leaves and the method's buffers; both live in the train state. With
    ``reset_moments``, the train step zeroes the optimizer's moments of every trainable value the
    update rewrote (FlexLoRA's new triplets start as fresh parameters).
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, jax.Array, Any, Any], tuple[Any, Any]]
    reset_moments: bool = False


class Method(NamedTuple):
    """One registered method: its ``name``, ``family`` and one-line ``formula``, the names of the factor
    leaves it adds beside a kernel, and the pure functions over one kernel described above (``init``,
    ``materialize``, ``apply``, ...). The fields after them declare its properties: ``buffers`` (factor
    leaves that never train), ``trains_bias``, ``uses_rank``, ``options`` (method options and their
    defaults) and ``validate``, the built-in ``regularizer``, a stateful method's ``schedule``, and
    ``kind`` ("layer", or "prompt" for prompt and prefix tuning). Made once per method and passed to
    ``register``."""

    name: str
    family: str  # "reconstruction" | "extension" | "combination"
    formula: str  # one line, shown by `decomp-jax methods`
    factor_names: tuple[str, ...]
    init: Callable[..., dict]
    materialize: Optional[Callable[..., jax.Array]] = None  # None: not mergeable
    apply: Optional[Callable[..., jax.Array]] = None
    materialize_bias: Optional[Callable[..., Optional[jax.Array]]] = None
    unmaterialize: Optional[Callable[..., tuple]] = None
    residual: Optional[Callable[..., jax.Array]] = None
    buffers: tuple[str, ...] = ()  # factor leaves that never train
    trains_bias: bool = False  # BitFit: the targeted layers' biases train
    adds_bias: bool = False  # materialize_bias adds a term a layer without a bias cannot hold (lora_bias)
    uses_rank: bool = False  # the factors have a rank r (checked against min(d_in, d_out))
    options: Mapping[str, Any] = {}  # method-specific options and their defaults
    validate: Optional[Callable[[Any], None]] = None  # checks cfg.options; raises ConfigError
    regularizer: Optional[str] = None  # built-in MPC kind used when cfg.mpc is None (AdaLoRA: mpc_o)
    schedule: Optional[Callable[[Any, int], Schedule]] = None  # (cfg, total_steps) -> Schedule
    # (cfg) -> {factor name: the role of each axis, "in" | "out" | None} where a factor's layout depends
    # on the options (sharding.FACTOR_AXES holds the fixed ones)
    factor_axes: Optional[Callable[[Any], Mapping[str, tuple]]] = None
    # (cfg, layer path) -> options that depend on the layer (ia3_mixed: which side it scales); the
    # layer's config (AdapterConfig.for_layer) carries them
    layer_options: Optional[Callable[[Any, str], Mapping[str, Any]]] = None
    # "layer": the per-layer methods above. "prompt": prompt/prefix tuning (decomp_jax.core.prompts): the
    # leaves live at params[name], ``init(key, params, cfg) -> that subtree``, and the layer hooks
    # (materialize, apply, ...) are unused; ``names()``/``registry()`` list them only when asked.
    kind: str = "layer"

    @property
    def mergeable(self) -> bool:
        return self.materialize is not None

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.factor_names if n not in self.buffers)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name`` and return it; a name already registered
    raises ``ValueError``."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def registry(kind: Optional[str] = "layer") -> dict[str, Method]:
    """The registered methods of ``kind`` ("layer": the per-layer methods; "prompt"; None: all)."""
    return {n: m for n, m in _REGISTRY.items() if kind is None or m.kind == kind}


def names(kind: Optional[str] = "layer") -> list[str]:
    """Sorted names of the methods of ``kind`` ("layer" by default, "prompt", or None for all)."""
    return sorted(registry(kind))


def get(name: str) -> Method:
    """The registered ``Method`` called ``name`` (of any kind); an unknown name raises ``ConfigError``
    with the closest known name ("Did you mean") and the list of known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        near = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""

        raise ConfigError(f"Unknown method {name!r}.{hint} Known methods: {', '.join(names(None))}.") from None


def additive(delta: Callable[[dict, Any], jax.Array]) -> dict[str, Callable]:
    """``materialize`` and ``unmaterialize`` of ``K' = K + delta(factors, cfg)``, as keyword
    arguments for a ``Method``."""
    return {
        "materialize": lambda kernel, f, cfg: kernel + delta(f, cfg).astype(kernel.dtype),
        "unmaterialize": lambda kernel, bias, f, cfg: (kernel - delta(f, cfg).astype(kernel.dtype), bias),
    }


def linear(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """``x @ K (+ b)`` over the last axis of ``x``."""
    y = jnp.matmul(x, kernel)
    return y if bias is None else y + bias


def adapter_dropout(x: jax.Array, rate: float, train: bool, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout on the adapter path's input; identity outside training."""
    if not train or rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
