"""Several named adapters of one tree run at once, factored (``dj.adapt_many``): each adapted layer runs
the base layer and every adapter that adapts it and mixes their outputs by ``adapter_weights`` (one
weight per adapter for the whole call, or one row per example: mixed batches), an array, so one compiled
function serves every choice of adapters. ``adapter_weights`` builds those weights from adapter names.
How the named adapters are stored is ``core.named``."""

from __future__ import annotations
import functools
from typing import Any, Callable, Mapping, Sequence
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import check_complete, check_layer, layer_output, own_params
from decomp_jax.core.methods import get
from decomp_jax.core.named import DEFAULT, SEP, all_factor_names, check_name
from decomp_jax.core.tree import Path, matrix_leaf, path_str
from decomp_jax.errors import ConfigError


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
            elif str(k).rsplit(SEP, 1)[0] in all_factor_names() and matrix_leaf(tree) is not None:
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

    if not cfgs:
        raise ConfigError("adapt_many needs at least one adapter: {name: AdapterConfig}.")
    for name, cfg in cfgs.items():
        check_name(name)
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"cfgs[{name!r}] must be an AdapterConfig; got {type(cfg).__name__}.")
        method = get(cfg.method)
        if method.kind == "prompt" or cfg.trainable_tokens:
            raise ConfigError(
                f"Adapter {name!r} ({cfg.method}{', trainable_tokens' if cfg.trainable_tokens else ''}) changes the "
                f"model's input, which adapt_many does not mix; run it alone: dj.adapt(apply_fn, cfg) on "
                f"dj.select(params, {name!r}).")
    order = list(cfgs)
    plain_factors = all_factor_names()

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
            params = own_params(module)
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
