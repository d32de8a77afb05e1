"""Non-linear adapters: not mergeable, always run factored on the targeted layers.

``parallel_adapter`` (= MPC_n, a non-linearity between LoRA's factors) sits beside the layer;
``houlsby`` and ``pfeiffer`` are sequential bottleneck adapters on the layer's *output* ``h``:
``h' = h + up(act(down(h)))`` with biases. Their placement is a choice of ``targets``: Houlsby
after the attention output and FFN output projections, Pfeiffer after the FFN output only (see
``models.hf.TARGET_PRESETS``). ``rank`` is the bottleneck width ``m``.

``bottleneck`` and ``bottleneck_learned`` are the LLM-Adapters bottleneck adapters of the paper's
commonsense/math pipeline (bias-free ``adapter_down``/``adapter_up``, tanh by default), placed by
``options.placement`` relative to the targeted layer ``y = x @ K + b``:

- ``output`` (series, LLM-Adapters' ``output_adapter``): ``y' = y + s * up(act(down(y)))``;
- ``parallel`` (``parallel_adapter``): ``y' = y + s * up(act(down(x)))``;
- ``mh`` (``mh_adapter``, before the layer): ``y' = (x + s * up(act(down(x)))) @ K + b``.

``s`` is ``options.scaling`` (a constant, 1.0) for ``bottleneck`` and a learned scalar
``adapter_scaling`` (started at 1) for ``bottleneck_learned``. ``options.init_weights``:
``mam_adapter`` (our default: kaiming-uniform ``down``, zero ``up``, so injection is a no-op like every
other method's) or ``bert`` (the toolkit's default, set it to reproduce the toolkit: both matrices
normal(0.02), *not* a no-op at init). Dropout acts on the adapter's input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.base import Method, adapter_dropout, linear, register
from decomp_jax.core.methods.lowrank import init_lora_a, kaiming_uniform, lora_init, normal_002
from decomp_jax.errors import ConfigError


def _parallel_apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    h = jax.nn.relu(adapter_dropout(x, cfg.dropout, train, key) @ f["lora_a"])
    return linear(x, kernel, bias) + h @ f["lora_b"]


PARALLEL_ADAPTER = register(Method(
    name="parallel_adapter",
    family="extension",
    formula="y = x @ K + b + relu(x @ lora_a) @ lora_b  (MPC_n)",
    factor_names=("lora_a", "lora_b"),
    init=lora_init,
    apply=_parallel_apply,
    uses_rank=True,
))


def _bottleneck_init(key, kernel, bias, cfg):
    d_out, m, dt = kernel.shape[1], cfg.rank, kernel.dtype
    return {
        "down": init_lora_a(key, d_out, m, cfg.init, dt),
        "down_bias": jnp.zeros((m,), dt),
        "up": jnp.zeros((m, d_out), dt),
        "up_bias": jnp.zeros((d_out,), dt),
    }


def _bottleneck(name: str, activation, act_name: str, placement: str) -> Method:
    def apply(x, kernel, bias, f, cfg, *, train=False, key=None):
        h = linear(x, kernel, bias)
        z = activation(adapter_dropout(h, cfg.dropout, train, key) @ f["down"] + f["down_bias"])
        return h + z @ f["up"] + f["up_bias"]

    return register(Method(
        name=name,
        family="extension",
        formula=f"h' = h + {act_name}(h @ down + down_bias) @ up + up_bias on the output h ({placement})",
        factor_names=("down", "down_bias", "up", "up_bias"),
        init=_bottleneck_init,
        apply=apply,
        uses_rank=True,  # the bottleneck width m (a sweep over ranks must not merge its cells)
    ))


HOULSBY = _bottleneck("houlsby", jax.nn.swish, "swish", "paper: attention output and FFN output")
PFEIFFER = _bottleneck("pfeiffer", jax.nn.relu, "relu", "paper: FFN output only")


# --- LLM-Adapters bottleneck adapters -----------------------------------------------------------------

ACTIVATIONS = {
    "tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "swish": jax.nn.swish,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False), "identity": lambda z: z,
}
PLACEMENTS = ("output", "parallel", "mh")
INIT_WEIGHTS = ("bert", "mam_adapter")


def _bn_dims(kernel, cfg) -> tuple[int, int]:
    """``(d, d_up)``: the adapter reads a ``d``-vector and writes a ``d_up``-vector."""
    d_in, d_out = kernel.shape
    placement = cfg.option("placement")
    return (d_out, d_out) if placement == "output" else (d_in, d_out) if placement == "parallel" else (d_in, d_in)


def _bn_axes(cfg) -> dict:
    """The roles of the factors' axes (for sharding): the adapter reads the layer's input or output."""
    reads, writes = {"output": ("out", "out"), "parallel": ("in", "out"), "mh": ("in", "in")}[cfg.option("placement")]
    return {"adapter_down": (reads, None), "adapter_up": (None, writes), "adapter_scaling": (None,)}


def _bn_init(learned: bool):
    def init(key, kernel, bias, cfg):
        (d, d_up), m, dt = _bn_dims(kernel, cfg), cfg.rank, kernel.dtype
        kd, ku = jax.random.split(key)
        if cfg.option("init_weights") == "bert":
            down, up = normal_002(kd, (d, m), dt), normal_002(ku, (m, d_up), dt)
        else:  # mam_adapter: PyTorch's kaiming_uniform_(a=sqrt(5)) on down, zero up
            down, up = kaiming_uniform(kd, (d, m), d, dt), jnp.zeros((m, d_up), dt)
        out = {"adapter_down": down, "adapter_up": up}
        if learned:
            out["adapter_scaling"] = jnp.ones((1,), dt)
        return out

    return init


def _bn_apply(learned: bool):
    def apply(x, kernel, bias, f, cfg, *, train=False, key=None):
        act = ACTIVATIONS[cfg.option("activation")]
        s = f["adapter_scaling"][0] if learned else cfg.option("scaling")
        placement = cfg.option("placement")

        def adapter(v):
            return s * (act(adapter_dropout(v, cfg.dropout, train, key) @ f["adapter_down"]) @ f["adapter_up"])

        if placement == "mh":
            return linear(x + adapter(x), kernel, bias)
        y = linear(x, kernel, bias)
        return y + adapter(y if placement == "output" else x)

    return apply


def _bn_validate(learned: bool):
    def validate(cfg):
        for name, allowed in (("placement", PLACEMENTS), ("activation", tuple(ACTIVATIONS)),
                              ("init_weights", INIT_WEIGHTS)):
            if cfg.option(name) not in allowed:
                raise ConfigError(f"options.{name} of method {cfg.method!r} must be one of {', '.join(allowed)}; "
                                  f"got {cfg.option(name)!r}.")
        if not learned:
            s = cfg.option("scaling")
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                hint = " For a learned scalar use method bottleneck_learned." if s == "learned" else ""
                raise ConfigError(f"options.scaling of method 'bottleneck' is a number (default 1.0); got {s!r}.{hint}")

    return validate


def _bottleneck_adapter(name: str, learned: bool) -> Method:
    options = {"placement": "output", "activation": "tanh", "init_weights": "mam_adapter"}
    if not learned:
        options["scaling"] = 1.0
    s = "adapter_scaling" if learned else "scaling"
    return register(Method(
        name=name,
        family="extension",
        formula=(f"output: y' = y + {s} * up(act(down(y))); parallel: y + {s} * up(act(down(x))); "
                 f"mh: (x + {s} * up(act(down(x)))) @ K + b  (LLM-Adapters; options.placement)"),
        factor_names=("adapter_down", "adapter_up") + (("adapter_scaling",) if learned else ()),
        init=_bn_init(learned),
        apply=_bn_apply(learned),
        uses_rank=True,
        options=options,
        validate=_bn_validate(learned),
        factor_axes=_bn_axes,
    ))


BOTTLENECK = _bottleneck_adapter("bottleneck", learned=False)
BOTTLENECK_LEARNED = _bottleneck_adapter("bottleneck_learned", learned=True)
