"""Many adapters on one base: named adapters in one tree, switching between them, mixed batches.

Layout. The unnamed adapter (``"default"``, as in HF PEFT) keeps the plain leaf names every other
function reads (``lora_a`` beside ``kernel``). An adapter named ``name`` stores each of its leaves
``x`` as ``x@name`` in the same dict (a prompt method's subtree as ``prompt_tuning@name``), so any
number of adapters, of any methods and ranks, sit beside one copy of the frozen base. The base
leaves an adapter added to a tree trains (a head in ``train_extra``, BitFit's biases) are its own
copies (``classifier/kernel@name``, also ``@default``), as PEFT's ``modules_to_save`` keeps one copy per
adapter; only a lone unnamed adapter injected into plain base params trains them in place, as before.

- ``inject(params, cfg, key, name="task_b")`` adds an adapter (``attach`` adds one made elsewhere:
  trained, imported from PEFT, combined by ``add_weighted_adapter``);
- ``select(params, name)`` is that adapter alone in the plain layout: every single-adapter function
  (``adapt``, ``merge``, ``export_peft``, checkpoints, ``add_weighted_adapter``) takes it;
  ``select(params, None)`` is the base alone;
- ``trainable_mask(params, cfg, name=...)`` / ``partition(..., name=...)`` train one adapter of the tree;
- ``adapt_many(apply_fn, cfgs)`` runs several at once: ``apply(params, x, adapter_weights=w)`` with
  ``w`` of shape ``(N,)`` (one weight per adapter, in ``cfgs``' order: one-hot switches, several ones
  sum the adapters as PEFT's ``set_adapter([...])``) or ``(batch, N)`` (each example its own adapter, a
  zero row the base model). ``w`` is data: switching never recompiles. Per adapted layer the output
  is ``(1 - sum_i w_i) y_base + sum_i w_i y_i``; a one-hot row gives exactly that adapter's layer.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from decomp_jax.config import AdapterConfig, ConfigError
from decomp_jax.inject import TOKEN_LEAF, Path, _check_args, _flat, adapter_leaves, matrix_leaf, path_str

SEP = "@"
DEFAULT = "default"


# --- the layout ----------------------------------------------------------------------------------

def _owner(path: Path) -> Optional[str]:
    """The adapter a leaf's path names (``x@name`` in any component), None for a plain path."""
    for part in path:
        if SEP in str(part):
            return str(part).rsplit(SEP, 1)[1]
    return None


def _plain(path: Path) -> Path:
    return tuple(str(p).rsplit(SEP, 1)[0] if SEP in str(p) else p for p in path)


def _named(path: Path, name: str, prompt: bool) -> Path:
    """The path of a plain leaf of adapter ``name`` (a prompt method's subtree renamed at its root)."""
    if name == DEFAULT:
        return path
    if prompt:
        return (f"{path[0]}{SEP}{name}",) + path[1:]
    return path[:-1] + (f"{path[-1]}{SEP}{name}",)


@functools.lru_cache(maxsize=1)
def _factor_names() -> frozenset:
    from decomp_jax.methods import registry

    return frozenset(n for m in registry().values() for n in m.factor_names) | {TOKEN_LEAF}


@functools.lru_cache(maxsize=1)
def _prompt_names() -> frozenset:
    from decomp_jax.methods import names

    return frozenset(names("prompt"))


def _default_leaf(path: Path, layers: Mapping[Path, set]) -> bool:
    """Whether a plain leaf belongs to the unnamed adapter: a factor leaf beside a layer's matrix, the
    trainable token rows beside a table, or a prompt method's subtree."""
    if path and str(path[0]) in _prompt_names():
        return True
    siblings = layers.get(path[:-1], set())
    return path[-1] in _factor_names() and ("kernel" in siblings or "embedding" in siblings)


def _layers(flat) -> dict[Path, set]:
    out: dict[Path, set] = {}
    for path in flat:
        out.setdefault(path[:-1], set()).add(path[-1])
    return out


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or SEP in name or "/" in name:
        raise ConfigError(f"An adapter name is a non-empty string without {SEP!r} or '/' (e.g. 'task_a'); got {name!r}.")


def adapter_names(params) -> list[str]:
    """The adapters ``params`` hold: ``"default"`` (the unnamed one) first when present, then the named
    ones in sorted order."""
    flat = _flat(params)
    layers = _layers(flat)
    named = sorted({o for o in map(_owner, flat) if o is not None})
    default = DEFAULT in named or any(_owner(p) is None and _default_leaf(p, layers) for p in flat)
    return ([DEFAULT] if default else []) + [n for n in named if n != DEFAULT]


def has_named(params) -> bool:
    """Whether ``params`` hold a named adapter (a leaf ``x@name``)."""
    return any(_owner(p) is not None for p in _flat(params))


def select(params, name: Optional[str]) -> dict:
    """Adapter ``name`` alone over the base, in the plain layout (its ``x@name`` leaves named ``x``, its
    own copies of base leaves in their place, every other adapter dropped); ``None``: the base alone."""
    flat = _flat(params)
    if name is not None:
        _check_name(name)
        held = adapter_names(params)
        if name not in held:
            raise ConfigError(f"params hold no adapter named {name!r}; they hold {held}. Add one with "
                              f"dj.inject(params, cfg, key, name={name!r}).")
    layers = _layers(flat)
    out, own = {}, {}
    for path, value in flat.items():
        owner = _owner(path)
        if owner is None:
            if name != DEFAULT and _default_leaf(path, layers):
                continue
            out[path] = value
        elif owner == name:
            own[_plain(path)] = value
    out.update(own)
    return unflatten_dict(out)


def stored_path(path: Path, name: str) -> Path:
    """Where a plain layer leaf of adapter ``name`` sits in a tree of several."""
    return _named(path, name, prompt=False)


def _own_paths(adapted, cfg: AdapterConfig) -> set:
    """The leaves of a single-adapter tree that are its adapter's: factors, buffers, token rows, and the
    base leaves it trains (``train_extra``, BitFit's biases)."""
    from decomp_jax.inject import trainable_mask

    own = set(_flat(adapter_leaves(adapted, cfg)))
    return own | {p for p, t in _flat(trainable_mask(adapted, cfg)).items() if t}


def own_leaves(params, cfg: AdapterConfig, name: str) -> dict:
    """Adapter ``name``'s own leaves, in the plain layout (``select``)."""
    view = select(params, name)
    flat = _flat(view)
    return unflatten_dict({p: flat[p] for p in _own_paths(view, cfg)})


def attach(params, adapted, cfg: AdapterConfig, name: str) -> dict:
    """``params`` with the adapter of ``adapted`` (a single-adapter tree of the same base, injected with
    ``cfg``: trained, imported, combined) added under ``name``: its factor leaves, buffers and token
    rows, and its trained base leaves (``train_extra``, BitFit's biases) as the adapter's own copies."""
    from decomp_jax.methods import get

    _check_args(adapted, cfg, "adapted")
    _check_name(name)
    held = adapter_names(params)
    if name in held:
        raise ConfigError(f"params already hold an adapter named {name!r} (they hold {held}); pick another name, or "
                          f"start from dj.select(params, None) (the base alone).")
    method = get(cfg.method)
    if method.residual is not None:
        raise ConfigError(
            f"Method {cfg.method!r} rewrites the base kernels it adapts (K - s a0 b0, the residual of its "
            f"initial factors), which every adapter of the tree shares, so it cannot be a named adapter beside others. "
            f"Keep it in a tree of its own (dj.inject(base_params, cfg, key), no name), or use lora.")
    flat, new = _flat(params), _flat(adapted, "adapted")
    base = set(_flat(select(params, None)))
    own = _own_paths(adapted, cfg)
    stray = sorted(path_str(p) for p in set(new) - own - base)
    if stray:
        raise ConfigError(f"`adapted` holds leaves that are neither the base's nor its adapter's: {stray[:5]}. Pass a "
                          f"tree injected into this base (dj.select(params, None)) with the AdapterConfig given.")
    prompt = method.kind == "prompt"
    for path in own:  # a trained base leaf (a head) becomes the adapter's copy, also for "default"
        flat[path[:-1] + (f"{path[-1]}{SEP}{name}",) if path in base else _named(path, name, prompt)] = new[path]
    return unflatten_dict(flat)


def named_mask(params, cfg: AdapterConfig, name: str) -> dict:
    """``trainable_mask`` of adapter ``name`` over the whole tree: its trainable leaves True, every
    other adapter's and the base's False."""
    from decomp_jax.inject import trainable_mask

    view = _flat(trainable_mask(select(params, name), cfg))
    flat = _flat(params)
    out = {}
    for path in flat:
        owner = _owner(path)
        if owner is None and name == DEFAULT:  # trains unless the adapter has its own copy of it
            out[path] = view.get(path, False) and path[:-1] + (f"{path[-1]}{SEP}{DEFAULT}",) not in flat
        else:
            out[path] = owner == name and view.get(_plain(path), False)
    return unflatten_dict(out)


# --- several adapters in one forward pass --------------------------------------------------------

def adapter_weights(names: Sequence[str] | Mapping[str, Any], active=None, per_example=None):
    """The ``adapter_weights`` of ``adapt_many``: ``active`` (a name, or several, summed) gives ``(N,)``;
    ``per_example`` (one name or None per example) gives ``(batch, N)``, a None row the base model."""
    order = list(names)
    index = {n: i for i, n in enumerate(order)}

    def row(picked) -> np.ndarray:
        picked = [picked] if isinstance(picked, str) else list(picked)
        unknown = [p for p in picked if p not in index]
        if unknown:
            raise ConfigError(f"adapter_weights: no adapter named {unknown}; the adapters are {order}.")
        out = np.zeros(len(order), np.float32)
        for p in picked:
            out[index[p]] = 1.0
        return out

    if (active is None) == (per_example is None):
        raise ConfigError("adapter_weights takes one of active= (a name or names: one set for the whole batch) and "
                          "per_example= (a name or None per example).")
    if active is not None:
        return jnp.asarray(row(active))
    return jnp.asarray(np.stack([row(() if p is None else p) for p in per_example]))


def _layer_view(params: Mapping, name: str, default_names) -> dict:
    """One layer's leaves as adapter ``name`` sees them (plain names)."""
    out = {k: v for k, v in params.items() if SEP not in k and k not in default_names}
    if name == DEFAULT:
        out.update({k: v for k, v in params.items() if k in default_names})
    out.update({k.rsplit(SEP, 1)[0]: v for k, v in params.items() if k.endswith(SEP + name)})
    return out


def _owns(params: Mapping, name: str, default_names) -> bool:
    return any(k.endswith(SEP + name) or (name == DEFAULT and k in default_names) for k in params)


def _mix(y0, outputs: list, weights, where: str):
    """``(1 - sum_i w_i) y0 + sum_i w_i y_i`` over the adapters ``outputs`` (index, y_i), weights per
    call ``(N,)`` or per example ``(batch, N)``."""
    weights = weights.astype(y0.dtype)
    if weights.ndim == 2:
        if y0.shape[0] != weights.shape[0]:
            raise ConfigError(
                f"adapter_weights has {weights.shape[0]} rows (one per example) but layer {where!r} gets a leading axis "
                f"of {y0.shape[0]}: per-example adapters need the model to keep the batch as the leading axis of "
                f"every layer's input. Pass (N,) weights (one adapter set for the whole batch) for this model.")
        coef = lambda i: weights[:, i].reshape((-1,) + (1,) * (y0.ndim - 1))
    else:
        coef = lambda i: weights[i]
    total = sum(coef(i) for i, _ in outputs)
    return functools.reduce(lambda acc, iy: acc + coef(iy[0]) * iy[1], outputs, (1 - total) * y0)


def _factor_leaves(variables) -> dict[Path, Mapping]:
    """``{path of a factor leaf (plain or named): the dict holding it}`` of every layer in ``variables``."""
    out = {}

    def walk(tree, path):
        if not hasattr(tree, "items"):
            return
        for k, v in tree.items():
            if hasattr(v, "items"):
                walk(v, path + (k,))
            elif str(k).rsplit(SEP, 1)[0] in _factor_names() and matrix_leaf(tree) is not None:
                out[path + (k,)] = tree

    walk(variables, ())
    return out


def adapt_many(apply_fn: Callable[..., Any], cfgs: Mapping[str, AdapterConfig]) -> Callable[..., Any]:
    """Wrap a Linen ``apply_fn`` to run the named adapters ``cfgs`` (``{name: AdapterConfig}``; the
    unnamed one is ``"default"``) of one tree at once, factored: the wrapped function takes
    ``adapter_weights=`` (``adapter_weights(cfgs, ...)``), an array, so the choice of adapters is data
    and one compiled function serves every choice. Each adapted layer runs the base layer and every
    adapter that adapts it (N + 1 layer evaluations where N adapt it), then mixes them by the weights;
    gradients reach each adapter only through the examples (or the calls) that weight it."""
    from decomp_jax.execution import _own_params, check_complete, check_layer, layer_output
    from decomp_jax.methods import get

    if not cfgs:
        raise ConfigError("adapt_many needs at least one adapter: {name: AdapterConfig}.")
    for name, cfg in cfgs.items():
        _check_name(name)
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"cfgs[{name!r}] must be an AdapterConfig; got {type(cfg).__name__}.")
        method = get(cfg.method)
        if method.kind == "prompt" or cfg.trainable_tokens:
            raise ConfigError(
                f"Adapter {name!r} ({cfg.method}{', trainable_tokens' if cfg.trainable_tokens else ''}) changes the "
                f"model's input, which adapt_many does not mix; run it alone: dj.adapt(apply_fn, cfg) on "
                f"dj.select(params, {name!r}).")
    order = list(cfgs)
    plain_factors = _factor_names()

    @functools.wraps(apply_fn)
    def apply(variables, *args, adapter_weights=None, **kwargs):
        if adapter_weights is None:
            raise ConfigError(f"adapt_many's function needs adapter_weights=: e.g. dj.adapter_weights({order}, "
                              f"active={order[0]!r}) or per_example=[...] (one name or None per example).")
        weights = jnp.asarray(adapter_weights)
        if weights.ndim not in (1, 2) or weights.shape[-1] != len(order):
            raise ConfigError(f"adapter_weights has shape {tuple(weights.shape)}; it must be ({len(order)},) or "
                              f"(batch, {len(order)}): one weight per adapter of {order}.")
        seen: list = []

        def intercept(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name != "__call__" or module.is_initializing():
                return next_fun(*call_args, **call_kwargs)
            params = _own_params(module)
            where = "/".join(module.path)
            outputs = []
            for i, name in enumerate(order):
                if not _owns(params, name, plain_factors):
                    continue
                cfg = cfgs[name]
                method = get(cfg.method)
                view = _layer_view(params, name, plain_factors)
                if any(n in view for n in method.factor_names):
                    check_complete(view, method, f"{name!r} ({cfg.method})", where)
                else:
                    method = None  # the adapter's own copy of a base layer (a head)
                check_layer(module, cfg, where)
                outputs.append((i, layer_output(module, call_args, call_kwargs, view, method, cfg.for_layer(where),
                                                where)))
            if not outputs:
                return next_fun(*call_args, **call_kwargs)
            seen.append(where)
            return _mix(next_fun(*call_args, **call_kwargs), outputs, weights, where)

        factors = _factor_leaves(variables)
        tables = sorted({path_str(p[:-1]) for p in factors if matrix_leaf(factors[p]) == "embedding"})
        if tables:
            raise ConfigError(
                f"Adapters of the embedding tables {tables[:3]}: adapt_many does not mix adapted tables (a lookup, not a "
                f"Linen layer call); run such an adapter alone: dj.adapt(apply_fn, cfg) on dj.select(params, name).")
        with nn.intercept_methods(intercept):
            out = apply_fn(variables, *args, **kwargs)
        if not seen and factors:
            raise ConfigError("The params hold adapter factors but the forward pass ran no Linen layer holding them; "
                              "adapt_many runs flax.linen nn.Dense / DenseGeneral / Einsum (and transformers' Conv1D) "
                              "layers called through apply_fn.")
        return out

    return apply
