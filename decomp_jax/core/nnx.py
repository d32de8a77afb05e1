"""Flax NNX models: every method in factored execution on ``nnx.Linear`` and ``nnx.LinearGeneral``.

NNX modules are objects that own their parameters, so the adapter is added to the model itself:

    from decomp_jax import nnx as dnnx
    dnnx.inject(model, cfg, jax.random.PRNGKey(0))          # in place; returns the model
    graphdef, trainable, rest = nnx.split(model, dnnx.AdapterParam, ...)   # the factors alone
    merged = dnnx.merge(model, cfg)                          # a plain model (a copy) with K' folded in

``inject`` computes the factors with the pure-dict ``decomp_jax.core.inject`` on ``nnx.to_pure_dict`` of
the model's params (same per-layer keys: an NNX layer gets exactly the factors of the same layer in a
Linen/HF params tree) and adds them to each targeted layer as attributes: trainable factors as
``AdapterParam`` (an ``nnx.Param``), a method's constants (SVD bases) as ``AdapterBuffer``. The layer
keeps its ``kernel`` and ``bias`` where they were, so the model's state is the adapted params tree of
the dict API, path for path (``nnx.to_pure_dict(nnx.state(model))`` can go to ``dj.merge``,
checkpoints, PEFT export). The layer's class becomes a subclass of its own (``Adapted<Linear>``) whose
``__call__`` runs the method's factored form; ``nnx.split``/``nnx.merge``, ``nnx.jit`` and
``nnx.grad`` treat it as any module.

Layers with N-D kernels (``nnx.LinearGeneral``) need ``adapter.kernel_in_axes`` as for Linen's
``nn.DenseGeneral``; an einsum layer's input axes are read from its equation. Other people's layers
that hold their matrix under another name (tunix's and Gemma's ``Einsum``: ``w``, computing
``jnp.einsum(self.einsum_str, x, self.w)``) are adapted when ``adapter.kernel_leaf`` names it
(``{"attn/(q|k|v|o)_proj$": "w"}``): the methods see that leaf as the layer's kernel. A layer the
targets match that holds a matrix this cannot adapt is refused by name, never skipped. Factors of a
kernel with sharding metadata (``out_sharding``) get names derived from it (``core.axes``). Adapter
dropout needs an RNG stream NNX layers do not carry: ``dropout`` must be 0.

The dict API sees a model's state through ``kernel_view`` (the named leaves as ``kernel``) and the
config through ``resolved_config`` (the einsum layers' input axes filled in):
``dj.merge(kernel_view(nnx.to_pure_dict(nnx.state(model)), cfg)[0], resolved_config(model, cfg))``.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jax
import numpy as np
from flax import nnx as fnnx

from decomp_jax.core.axes import factor_entries
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import dense_general_equation, einsum_in_axes, general_layer, method_layer
from decomp_jax.core.inject import (
    adapted_layers, check_mergeable, find_targets, inject as inject_params, merge as merge_params,
)
from decomp_jax.core.methods import get
from decomp_jax.core.tree import by_layer, flat_params, kernel_in_axes, kernel_view, matrix_leaf, path_str
from decomp_jax.errors import ConfigError


class AdapterParam(fnnx.Param):
    """A trainable factor leaf of a method (``lora_a``, ``magnitude``, ``scale_in``, ...)."""


class AdapterBuffer(fnnx.Variable):
    """A constant a method derived from the base kernel at injection (SVD bases); not trained."""


_CFG_ATTR = "_decomp_jax_adapter"  # the layer's AdapterConfig as JSON (static, hashable graph data)
_PATH_ATTR = "_decomp_jax_path"  # its path in the model (a tuple)
_LEAF_ATTR = "_decomp_jax_leaf"  # the attribute holding its kernel ("kernel", or kernel_leaf's name)
SUPPORTED = (fnnx.Linear, fnnx.LinearGeneral, fnnx.Einsum)


@functools.lru_cache(maxsize=None)
def _config(text: str) -> AdapterConfig:
    return AdapterConfig.from_dict(json.loads(text))


def _factored_call(self, inputs, *args, **kwargs):
    """``__call__`` of an adapted ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``: the method's layer."""
    cfg = _config(getattr(self, _CFG_ATTR))
    method = get(cfg.method)
    factors = {n: getattr(self, n)[...] for n in method.factor_names}
    kernel = getattr(self, getattr(self, _LEAF_ATTR))[...]
    bias = getattr(self, "bias", None)
    bias = bias[...] if bias is not None else None

    def run(x, kernel, bias):
        return method_layer(x, kernel, bias, factors, method, cfg, dtype=getattr(self, "dtype", None))

    if isinstance(self, fnnx.Linear):
        return run(inputs, kernel, bias)
    if isinstance(self, fnnx.LinearGeneral):
        equation = dense_general_equation(inputs.ndim, self.axis, kernel.ndim)
    elif isinstance(self, fnnx.Einsum):
        equation = (args[0] if args else kwargs.get("einsum_str")) or self.einsum_str
    else:  # another library's einsum layer: jnp.einsum(self.einsum_str, x, <its kernel leaf>)
        equation = self.einsum_str
    path = getattr(self, _PATH_ATTR)
    return general_layer(inputs, kernel, bias, equation, kernel_in_axes(path, cfg), path_str(path), run)


@functools.lru_cache(maxsize=None)
def adapted_class(base: type) -> type:
    """The subclass of an NNX layer class whose instances run their method's factored form."""
    return type(f"Adapted{base.__name__}", (base,), {"__call__": _factored_call, "__module__": __name__})


def _module_at(model, path: tuple):
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _check(model, cfg: AdapterConfig) -> None:
    if not isinstance(model, fnnx.Module):
        raise TypeError(f"decomp_jax.nnx works on Flax NNX modules; got {type(model).__name__}. For a params "
                        f"pytree (Linen, HF Flax) use dj.inject / dj.adapt.")
    method = get(cfg.method)
    if method.kind == "prompt":
        raise ConfigError(f"method {cfg.method!r} adds prompt parameters to our Llama (Linen); it has no NNX form.")
    if cfg.dropout:
        raise ConfigError(f"adapter.dropout={cfg.dropout}: NNX layers carry no RNG stream for adapter dropout; "
                          f"set dropout to 0 for NNX models.")


def _params_dict(model) -> dict:
    return fnnx.to_pure_dict(fnnx.state(model, fnnx.Param))


def inject(model, cfg: AdapterConfig, rng: jax.Array):
    """Add the method's factors to every targeted ``nnx.Linear`` / ``nnx.LinearGeneral`` of ``model``
    (in place; returns ``model``). The factors equal ``decomp_jax.core.inject`` of the model's params as a
    pure dict; PiSSA/MiLoRA's residual replaces the layer's kernel. At init the model's outputs are
    unchanged (for every method whose spec says so)."""
    _check(model, cfg)
    if cfg.trainable_tokens:
        raise ConfigError("trainable_tokens is not supported on NNX models (decomp_jax.nnx adapts nnx.Linear-type "
                          "layers); remove it, or train the Linen params (dj.inject) with it.")
    method = get(cfg.method)
    cfg = resolved_config(model, cfg)
    params, renamed = kernel_view(_params_dict(model), cfg)
    for path, _ in _targets(model, params, cfg, renamed):
        module = _module_at(model, path)
        if hasattr(module, _CFG_ATTR):
            raise ConfigError(f"Layer {path_str(path)!r} is already adapted; inject into the base model, or "
                              f"decomp_jax.nnx.merge first.")
    adapted = inject_params(params, cfg, rng)
    for path, layer in adapted_layers(adapted, cfg):
        text = json.dumps(cfg.for_layer(path_str(path)).to_dict(), sort_keys=True)  # its own rank and alpha
        module = _module_at(model, path)
        leaf = renamed.get(path, "kernel")
        if method.residual is not None:
            getattr(module, leaf)[...] = layer["kernel"]
        names, placement = _sharding(getattr(module, leaf))
        entries = factor_entries(path, layer, names, method, cfg) if names is not None else {}
        for name in method.factor_names:
            kind = AdapterBuffer if name in method.buffers else AdapterParam
            metadata = {"out_sharding": entries[name], **placement} if name in entries else {}
            setattr(module, name, kind(layer[name], **metadata))
        setattr(module, _CFG_ATTR, text)
        setattr(module, _PATH_ATTR, tuple(path))
        setattr(module, _LEAF_ATTR, leaf)
        module.__class__ = adapted_class(type(module))
    return model


def _sharding(variable) -> tuple:
    """``(names, placement)``: the per-axis sharding names of an NNX variable's metadata (``out_sharding``;
    older Flax: ``sharding``) or None, and its ``mesh`` / ``eager_sharding`` settings (the factors get them too)."""
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = metadata.get("out_sharding", metadata.get("sharding"))
    placement = {k: metadata[k] for k in ("mesh", "eager_sharding") if k in metadata}
    return (tuple(names) if names is not None else None), placement


def resolved_config(model, cfg: AdapterConfig) -> AdapterConfig:
    """``cfg`` with ``kernel_in_axes`` given for every targeted einsum layer it leaves out (an
    ``nnx.Einsum``, or a layer with an ``einsum_str`` and a ``kernel_leaf``): the axes its equation
    contracts with the input, for that layer's exact path."""
    view, _ = kernel_view(_params_dict(model), cfg)
    pattern = re.compile(cfg.targets)
    extra = {}
    for path, leaves in by_layer(flat_params(view)).items():
        if "kernel" not in leaves or not pattern.search(path_str(path)) or kernel_in_axes(path, cfg) is not None:
            continue
        equation = getattr(_module_at(model, path), "einsum_str", None)
        if isinstance(equation, str):
            extra[f"^{re.escape(path_str(path))}$"] = list(einsum_in_axes(equation))
    return cfg.replace(kernel_in_axes={**cfg.kernel_in_axes, **extra}) if extra else cfg


def _unadaptable(model, params: dict, cfg: AdapterConfig) -> None:
    """Refuse a module ``cfg.targets`` matches that holds a matrix-like parameter (2-D or more) but no
    ``kernel``/``embedding`` (another library's attention holding ``w``, bare expert tensors): it cannot be
    adapted, and skipping it would adapt fewer layers than the pattern names."""
    pattern = re.compile(cfg.targets)
    skipped = []
    for path, leaves in by_layer(flat_params(params)).items():
        if matrix_leaf(leaves) is not None or not pattern.search(path_str(path)):
            continue
        held = {n: tuple(np.shape(v)) for n, v in leaves.items() if np.ndim(v) >= 2}
        if held:
            skipped.append(f"{path_str(path)!r} ({type(_module_at(model, path)).__name__} holding "
                           + ", ".join(f"{n} {shape}" for n, shape in held.items()) + ")")
    if skipped:
        raise ConfigError(
            f"targets={cfg.targets!r} matches {len(skipped)} module(s) decomp_jax.nnx cannot adapt: {', '.join(skipped[:5])}"
            f"{' ...' if len(skipped) > 5 else ''}. It adapts nnx.Linear, nnx.LinearGeneral and nnx.Einsum layers (a "
            f"`kernel`), and layers computing jnp.einsum(self.einsum_str, x, <leaf>) whose leaf adapter.kernel_leaf "
            f"names (e.g. {{'q_proj$': 'w'}}); narrow `targets` to the layers it can adapt. Nothing was changed.")


def _targets(model, params: dict, cfg: AdapterConfig, renamed: dict):
    """``(path, module)`` of the targeted layers, each an NNX layer factored execution can run; a matched
    module that is not such a layer is refused (``_unadaptable``), never skipped."""
    out = []
    _unadaptable(model, params, cfg)
    for path in find_targets(params, cfg):
        module = _module_at(model, path)
        where = path_str(path)
        if path in renamed and not isinstance(getattr(module, "einsum_str", None), str):
            raise ConfigError(f"Layer {where!r} is a {type(module).__name__} holding its matrix as "
                              f"{renamed[path]!r} (adapter.kernel_leaf), but it has no `einsum_str`: decomp_jax.nnx "
                              f"adapts named leaves of layers that compute jnp.einsum(self.einsum_str, x, leaf). "
                              f"Narrow `targets`.")
        if path not in renamed and not isinstance(module, SUPPORTED):
            raise ConfigError(f"Layer {where!r} is a {type(module).__name__}; decomp_jax.nnx adapts nnx.Linear, "
                              f"nnx.LinearGeneral and nnx.Einsum. Narrow `targets`.")
        if isinstance(getattr(module, "einsum_str", None), str):
            wanted = einsum_in_axes(module.einsum_str)
            if kernel_in_axes(path, cfg) != wanted:
                shape = tuple(np.shape(_module_at_dict(params, path)["kernel"]))
                raise ConfigError(
                    f"Layer {where!r} is an einsum {module.einsum_str!r} whose kernel {shape} "
                    f"contracts axes {list(wanted)} with the input; give them in adapter.kernel_in_axes (e.g. "
                    f"{{{where.rsplit('/', 1)[-1] + '$'!r}: {list(wanted)}}}).")
        if isinstance(module, fnnx.LinearGeneral):
            if module.batch_axis:
                raise ConfigError(f"Layer {where!r} is an nnx.LinearGeneral with batch_axis {dict(module.batch_axis)}, "
                                  f"which factored execution does not handle; narrow `targets`.")
            n_in = len(module.in_features)
            if kernel_in_axes(path, cfg) != tuple(range(n_in)):
                raise ConfigError(
                    f"Layer {where!r} is an nnx.LinearGeneral with {n_in} input axes (kernel {tuple(module.kernel.shape)}); "
                    f"give them in adapter.kernel_in_axes (e.g. {{{where.rsplit('/', 1)[-1] + '$'!r}: {n_in}}}).")
        out.append((path, module))
    return out


def merge(model, cfg: AdapterConfig):
    """A copy of ``model`` with each adapted layer's ``K'`` folded into its kernel (and bias), its
    factors removed and its class restored: a plain NNX model. ``model`` is unchanged."""
    _check(model, cfg)

    method = get(cfg.method)
    check_mergeable(method)
    merged_model = fnnx.clone(model)
    cfg = resolved_config(merged_model, cfg)
    params, renamed = kernel_view(fnnx.to_pure_dict(fnnx.state(merged_model, (fnnx.Param, AdapterBuffer))), cfg)
    paths = [p for p, _ in adapted_layers(params, cfg)]
    merged = merge_params(params, cfg)
    for path in paths:
        module = _module_at(merged_model, path)
        layer = _module_at_dict(merged, path)
        getattr(module, renamed.get(path, "kernel"))[...] = layer["kernel"]
        if getattr(module, "bias", None) is not None and "bias" in layer:
            module.bias[...] = layer["bias"]
        for name in method.factor_names:
            delattr(module, name)
        for attr in (_CFG_ATTR, _PATH_ATTR, _LEAF_ATTR):
            delattr(module, attr)
        module.__class__ = type(module).__mro__[1]
    return merged_model


def _module_at_dict(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


__all__ = ["AdapterBuffer", "AdapterParam", "SUPPORTED", "adapted_class", "inject", "kernel_view", "merge",
           "resolved_config"]
