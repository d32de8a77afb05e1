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
adapter-only dropout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from decomp_jax.config import AdapterConfig, ConfigError
from decomp_jax.inject import check_mergeable, is_transposed, merge
from decomp_jax.methods import get
from decomp_jax.methods.base import linear

MODES = ("factored", "merged")
# the Linen layers factored execution intercepts, and whether each stores its kernel (d_out, d_in)
LAYOUTS = {"Dense": False, "FlaxConv1D": True}


def _own_params(module: nn.Module) -> dict:
    if module.scope is None or not module.has_variable("params", "kernel"):
        return {}
    return module.variables.get("params", {})


def _interceptor(cfg: AdapterConfig):
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
        (x,) = args
        factors = {n: params[n] for n in method.factor_names}
        if params["kernel"].ndim != 2:  # a stacked (L, ...) kernel outside the nn.scan that slices it
            raise ConfigError(
                f"Layer {where!r} is a {kind} called with a kernel of shape {tuple(params['kernel'].shape)}: factored "
                f"execution adapts 2-D kernels; a stacked (L, d_in, d_out) kernel must be sliced per layer by the "
                f"nn.scan (variable_axes={{'params': 0}}) that calls the layer."
            )
        # mixed precision: compute in the layer's activation dtype (float32 factors over a bfloat16 base are
        # cast to it; their gradients come back in float32); with dtype=None, in the dtype of x @ kernel
        dtype = module.dtype if module.dtype is not None else jnp.result_type(x, params["kernel"])
        x, kernel, bias, *values = promote_dtype(
            x, params["kernel"], params.get("bias"), *factors.values(), dtype=dtype
        )
        kernel = kernel.T if LAYOUTS[kind] else kernel
        factors = dict(zip(factors, values))
        bias = bias if module.use_bias else None
        if method.apply is None:  # per-layer merged execution
            if method.materialize_bias is not None and bias is not None:
                bias = method.materialize_bias(bias, factors, cfg)
            return linear(x, method.materialize(kernel, factors, cfg), bias)
        train = module.has_rng("dropout")
        key = module.make_rng("dropout") if (train and cfg.dropout > 0) else None
        return method.apply(x, kernel, bias, factors, cfg, train=train, key=key)

    return intercept


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

    intercept = _interceptor(cfg)

    @functools.wraps(apply_fn)
    def factored_apply(variables, *args, **kwargs):
        with nn.intercept_methods(intercept):
            return apply_fn(variables, *args, **kwargs)

    return factored_apply
