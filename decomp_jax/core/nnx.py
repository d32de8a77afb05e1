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
``nn.DenseGeneral``. ``nnx.Einsum`` (an arbitrary equation) is refused: use the dict API with
``mode="merged"``. Adapter dropout needs an RNG stream NNX layers do not carry: ``dropout`` must be 0.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jax
import numpy as np
from flax import nnx as fnnx

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import dense_general_equation, einsum_in_axes, general_layer, method_layer
from decomp_jax.core.inject import (
    adapted_layers, check_mergeable, find_targets, inject as inject_params, merge as merge_params,
)
from decomp_jax.core.methods import get
from decomp_jax.core.tree import by_layer, flat_params, kernel_in_axes, matrix_leaf, path_str
from decomp_jax.errors import ConfigError


class AdapterParam(fnnx.Param):
    """A trainable factor leaf of a method (``lora_a``, ``magnitude``, ``scale_in``, ...)."""


class AdapterBuffer(fnnx.Variable):
    """A constant a method derived from the base kernel at injection (SVD bases); not trained."""


_CFG_ATTR = "_decomp_jax_adapter"  # the layer's AdapterConfig as JSON (static, hashable graph data)
_PATH_ATTR = "_decomp_jax_path"  # its path in the model (a tuple)
SUPPORTED = (fnnx.Linear, fnnx.LinearGeneral, fnnx.Einsum)


@functools.lru_cache(maxsize=None)
def _config(text: str) -> AdapterConfig:
    return AdapterConfig.from_dict(json.loads(text))


def _factored_call(self, inputs, *args, **kwargs):
    """``__call__`` of an adapted ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``: the method's layer."""
    cfg = _config(getattr(self, _CFG_ATTR))
    method = get(cfg.method)
    factors = {n: getattr(self, n)[...] for n in method.factor_names}
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None

    def run(x, kernel, bias):
        return method_layer(x, kernel, bias, factors, method, cfg, dtype=self.dtype)

    if isinstance(self, fnnx.Linear):
        return run(inputs, kernel, bias)
    if isinstance(self, fnnx.LinearGeneral):
        equation = dense_general_equation(inputs.ndim, self.axis, kernel.ndim)
    else:  # nnx.Einsum
        equation = (args[0] if args else kwargs.get("einsum_str")) or self.einsum_str
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
    params = _params_dict(model)
    for path, _ in _targets(model, params, cfg):
        module = _module_at(model, path)
        if hasattr(module, _CFG_ATTR):
            raise ConfigError(f"Layer {path_str(path)!r} is already adapted; inject into the base model, or "
                              f"decomp_jax.nnx.merge first.")
    adapted = inject_params(params, cfg, rng)
    for path, layer in adapted_layers(adapted, cfg):
        text = json.dumps(cfg.for_layer(path_str(path)).to_dict(), sort_keys=True)  # its own rank and alpha
        module = _module_at(model, path)
        if method.residual is not None:
            module.kernel[...] = layer["kernel"]
        for name in method.factor_names:
            kind = AdapterBuffer if name in method.buffers else AdapterParam
            setattr(module, name, kind(layer[name]))
        setattr(module, _CFG_ATTR, text)
        setattr(module, _PATH_ATTR, tuple(path))
        module.__class__ = adapted_class(type(module))
    return model


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
            f"`kernel`); narrow `targets` to the layers it can adapt. Nothing was changed.")


def _targets(model, params: dict, cfg: AdapterConfig):
    """``(path, module)`` of the targeted layers, each an NNX layer factored execution can run; a matched
    module that is not such a layer is refused (``_unadaptable``), never skipped."""
    out = []
    _unadaptable(model, params, cfg)
    for path in find_targets(params, cfg):
        module = _module_at(model, path)
        where = path_str(path)
        if not isinstance(module, SUPPORTED):
            raise ConfigError(f"Layer {where!r} is a {type(module).__name__}; decomp_jax.nnx adapts nnx.Linear, "
                              f"nnx.LinearGeneral and nnx.Einsum. Narrow `targets`.")
        if isinstance(module, fnnx.Einsum) and module.einsum_str is not None:
            wanted = einsum_in_axes(module.einsum_str)
            if kernel_in_axes(path, cfg) != wanted:
                raise ConfigError(
                    f"Layer {where!r} is an nnx.Einsum {module.einsum_str!r} whose kernel {tuple(module.kernel.shape)} "
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
    params = fnnx.to_pure_dict(fnnx.state(merged_model, (fnnx.Param, AdapterBuffer)))
    paths = [p for p, _ in adapted_layers(params, cfg)]
    merged = merge_params(params, cfg)
    for path in paths:
        module = _module_at(merged_model, path)
        layer = _module_at_dict(merged, path)
        module.kernel[...] = layer["kernel"]
        if module.bias is not None and "bias" in layer:
            module.bias[...] = layer["bias"]
        for name in method.factor_names:
            delattr(module, name)
        for attr in (_CFG_ATTR, _PATH_ATTR):
            delattr(module, attr)
        module.__class__ = type(module).__mro__[1]
    return merged_model


def _module_at_dict(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


__all__ = ["AdapterBuffer", "AdapterParam", "SUPPORTED", "adapted_class", "inject", "merge"]
