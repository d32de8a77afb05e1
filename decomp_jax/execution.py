"""Execution of adapted models: factored (method interception) or merged (materialise ``K'``).

Factored execution intercepts the ``__call__`` of every Linen ``nn.Dense`` whose parameters hold
the method's factor leaves and runs the method's ``apply`` instead (``x@K + s*(x@A)@B``,
``((x*scale_in)@K)*scale_out``, ...). A method with no factored form (LiERA) is materialised per
layer inside the same interception, so the rest of the model still runs unchanged. The model code is untouched; frozen kernels are
read as constants, so differentiating with respect to the trainable leaves only computes no
weight gradient for them. Adapter dropout is active when the call is given a ``'dropout'`` RNG
(Flax's convention for training mode).

Merged execution folds ``phi(K)`` into the kernels and calls the function with plain params:
it works for any function of a params pytree (NNX state, Equinox, raw functions) but has no
adapter-only dropout. A factored forward pass that adapts no layer while its params hold factors
(an NNX module, an einsum projection) is an error, not a model that silently trains nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from decomp_jax.config import AdapterConfig, ConfigError
from decomp_jax.inject import check_mergeable, is_transposed, kernel_in_axes, merge
from decomp_jax.methods import get
from decomp_jax.methods.base import linear

MODES = ("factored", "merged")
# the Linen layers factored execution intercepts, and whether each stores its kernel (d_out, d_in)
LAYOUTS = {"Dense": False, "FlaxConv1D": True, "DenseGeneral": False}


def _own_params(module: nn.Module) -> dict:
    if module.scope is None or not module.has_variable("params", "kernel"):
        return {}
    return module.variables.get("params", {})


def _holds_factors(tree, names) -> bool:
    """Whether a nested dict (variables or params; Flax FrozenDicts included) has a leaf named in ``names``."""
    if not hasattr(tree, "items"):
        return False
    return any(k in names or _holds_factors(v, names) for k, v in tree.items())


def _interceptor(cfg: AdapterConfig, seen: list):
    method = get(cfg.method)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.is_initializing():
            return next_fun(*args, **kwargs)
        params = _own_params(module)
        present = [n for n in method.factor_names if n in params]
        if not present:
            return next_fun(*args, **kwargs)
        kind, where = type(module).__name__, "/".join(module.path)
        if len(present) < len(method.factor_names):  # it would silently run the base layer
            missing = [n for n in method.factor_names if n not in params]
            raise ConfigError(
                f"Layer {where!r} holds {cfg.method} factor leaves {present} but lacks {missing}: these params are only "
                f"part of the adapted tree. Pass the whole adapted tree (dj.combine(trainable, buffers, frozen))."
            )
        if kind not in LAYOUTS:
            raise ConfigError(
                f"Layer {where!r} is a {kind}, which factored execution does not handle; "
                f"use adapt(apply_fn, cfg, mode='merged')."
            )
        if LAYOUTS[kind] != is_transposed(tuple(module.path), cfg):
            raise ConfigError(
                f"Layer {where!r} is a {kind}, whose kernel is stored {'(d_out, d_in)' if LAYOUTS[kind] else '(d_in, d_out)'}, "
                f"but adapter.transposed={cfg.transposed!r} says otherwise. Set `transposed` to match exactly the "
                f"Conv1D layers (GPT-2: '(c_attn|c_proj|c_fc)$'; see models.hf.TARGET_PRESETS) and inject again."
            )
        seen.append(where)
        (x,) = args
        factors = {n: params[n] for n in method.factor_names}
        if kind == "DenseGeneral":
            return _dense_general(module, x, params, factors, method, cfg, where)
        if params["kernel"].ndim != 2:  # a stacked (L, ...) kernel outside the nn.scan that slices it
            raise ConfigError(
                f"Layer {where!r} is a {kind} called with a kernel of shape {tuple(params['kernel'].shape)}: factored "
                f"execution adapts 2-D kernels; a stacked (L, d_in, d_out) kernel must be sliced per layer by the "
                f"nn.scan (variable_axes={{'params': 0}}) that calls the layer."
            )
        kernel = params["kernel"].T if LAYOUTS[kind] else params["kernel"]
        return _run(module, x, kernel, params.get("bias") if module.use_bias else None, factors, method, cfg)

    return intercept


def _run(module, x, kernel, bias, factors, method, cfg):
    """The method's layer on ``x (..., d_in)`` with the ``(d_in, d_out)`` kernel."""
    # mixed precision: compute in the layer's activation dtype (float32 factors over a bfloat16 base are
    # cast to it; their gradients come back in float32); with dtype=None, in the dtype of x @ kernel
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x, kernel)
    x, kernel, bias, *values = promote_dtype(x, kernel, bias, *factors.values(), dtype=dtype)
    factors = dict(zip(factors, values))
    if method.apply is None:  # per-layer merged execution
        if method.materialize_bias is not None and bias is not None:
            bias = method.materialize_bias(bias, factors, cfg)
        return linear(x, method.materialize(kernel, factors, cfg), bias)
    train = module.has_rng("dropout")
    key = module.make_rng("dropout") if (train and cfg.dropout > 0) else None
    return method.apply(x, kernel, bias, factors, cfg, train=train, key=key)


def _dense_general(module, x, params, factors, method, cfg, where):
    """An ``nn.DenseGeneral`` layer as the matrix the methods see: its contracted axes of ``x`` moved
    last and flattened, the kernel ``(prod(inputs), prod(features))``, the output unflattened."""
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = tuple(a % x.ndim for a in axes)
    n_in = kernel_in_axes(tuple(module.path), cfg)
    if module.batch_dims:
        raise ConfigError(f"Layer {where!r} is an nn.DenseGeneral with batch_dims={module.batch_dims}, which factored "
                          f"execution does not handle; use adapt(apply_fn, cfg, mode='merged').")
    if n_in != len(axes) or params["kernel"].ndim < len(axes) + 1:
        raise ConfigError(
            f"Layer {where!r} is an nn.DenseGeneral contracting {len(axes)} input axes (kernel "
            f"{tuple(params['kernel'].shape)}), but adapter.kernel_in_axes gives it {n_in}. Set kernel_in_axes to "
            f"{{'{where.rsplit('/', 1)[-1]}$': {len(axes)}}} (a regex matching this layer) and inject again.")
    kernel = params["kernel"]
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - n_in, x.ndim)))
    batch = x.shape[:x.ndim - n_in]
    flat_in = x.reshape(batch + (-1,))
    matrix = kernel.reshape(flat_in.shape[-1], -1)
    bias = params["bias"].reshape(-1) if module.use_bias and "bias" in params else None
    out = _run(module, flat_in, matrix, bias, factors, method, cfg)
    return out.reshape(batch + tuple(kernel.shape[n_in:]))


def adapt(apply_fn: Callable[..., Any], cfg: AdapterConfig, mode: str = "factored") -> Callable[..., Any]:
    """Wrap ``apply_fn(variables_or_params, *args, **kwargs)`` so that it runs the adapted model.

    ``factored`` (default) needs a Flax Linen apply; methods with no factored form are
    materialised per layer. ``merged`` works for any function of a params pytree but not for the
    non-mergeable adapters.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; choose 'factored' or 'merged'.")
    method = get(cfg.method)
    if method.kind == "prompt":  # prompt_tuning / prefix_tuning: decomp_jax.prompts (our Llama only)
        if mode == "merged":
            check_mergeable(method)
        from decomp_jax.prompts import adapt_prompt

        return adapt_prompt(apply_fn, cfg)
    if not method.factor_names:  # nothing to intercept or fold (BitFit)
        return apply_fn
    if mode == "merged":
        check_mergeable(method)

        @functools.wraps(apply_fn)
        def merged_apply(params, *args, **kwargs):
            return apply_fn(merge(params, cfg), *args, **kwargs)

        return merged_apply

    @functools.wraps(apply_fn)
    def factored_apply(variables, *args, **kwargs):
        seen: list = []
        with nn.intercept_methods(_interceptor(cfg, seen)):
            out = apply_fn(variables, *args, **kwargs)
        if not seen and _holds_factors(variables, method.factor_names):  # (checked per trace, not per step)
            raise ConfigError(
                f"The params hold {cfg.method} factors but the forward pass ran no Linen layer holding them, so the "
                f"adapter would have no effect and train nothing. Factored execution adapts flax.linen nn.Dense (and "
                f"transformers' Conv1D) layers called through apply_fn; for other models (Flax NNX modules, custom "
                f"einsum projections, functions of a params pytree) use adapt(apply_fn, cfg, mode='merged').")
        return out

    return factored_apply
