"""Execution of adapted models: factored (method interception) or merged (materialise ``K'``).

Factored execution intercepts the ``__call__`` of every Linen ``nn.Dense`` whose parameters hold
the method's factor leaves and runs the method's ``apply`` instead (``x@K + s*(x@A)@B``,
``((x*scale_in)@K)*scale_out``, ...). An adapted ``nn.Embed`` table is materialised before the call
(``materialize_tables``): its lookups, and a tied LM head, read ``phi(table)``. A method with no
factored form (LiERA) is materialised per layer inside the same interception, so the rest of the
model still runs unchanged. The model code is untouched; frozen kernels are read as constants, so
differentiating with respect to the trainable leaves only computes no weight gradient for them. Adapter dropout is active when the call is given a ``'dropout'`` RNG
(Flax's convention for training mode).

Merged execution folds ``phi(K)`` into the kernels and calls the function with plain params:
it works for any function of a params pytree (NNX state, Equinox, raw functions) but has no
adapter-only dropout. A factored forward pass that adapts no layer while its params hold factors
(an NNX module, an einsum projection) is an error, not a model that silently trains nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from decomp_jax.core.axes import is_box
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import check_mergeable, merge
from decomp_jax.core.methods import get
from decomp_jax.core.methods.base import adapter_dropout, linear
from decomp_jax.core.prompts import adapt_prompt
from decomp_jax.core.tree import (
    TOKEN_LEAF, is_transposed, kernel_in_axes, kernel_leaf, matrix_leaf, write_token_rows,
)
from decomp_jax.errors import ConfigError
from decomp_jax.quant import dequantize, is_quantized

MODES = ("factored", "merged")
# the Linen layers factored execution intercepts, and whether each stores its kernel (d_out, d_in)
LAYOUTS = {"Dense": False, "FlaxConv1D": True, "Conv1D": True, "DenseGeneral": False, "Einsum": False,
           "ExpertDense": False}


def own_params(module: nn.Module, cfg: Optional[AdapterConfig] = None) -> dict:
    """The module's own params (Flax boxes read through); with ``cfg``, a layer holding its matrix under
    ``cfg.kernel_leaf``'s name shows it as ``kernel``."""
    if module.scope is None:
        return {}
    leaf = "kernel"
    if cfg is not None and cfg.kernel_leaf and not module.has_variable("params", "kernel"):
        leaf = kernel_leaf(tuple(module.path), cfg) or "kernel"
    if not module.has_variable("params", leaf):
        return {}
    params = {k: v.value if is_box(v) else v for k, v in module.variables.get("params", {}).items()}
    return {("kernel" if k == leaf else k): v for k, v in params.items()}


def _foreign(module, cfg) -> bool:
    """Whether ``module`` holds its matrix under ``cfg.kernel_leaf``'s name (another library's einsum layer)."""
    return bool(cfg is not None and cfg.kernel_leaf and not module.has_variable("params", "kernel")
                and kernel_leaf(tuple(module.path), cfg))


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
        params = own_params(module, cfg)
        present = [n for n in method.factor_names if n in params]
        if not present:
            if is_quantized(params.get("kernel")):  # a frozen layer of a quantized base: run on its dequantized kernel
                return plain_output(module, args, kwargs, params)
            return next_fun(*args, **kwargs)
        where = "/".join(module.path)
        check_complete(params, method, cfg.method, where)
        check_layer(module, cfg, where)
        seen.append(where)
        return layer_output(module, args, kwargs, params, method, cfg.for_layer(where), where)

    return intercept


def check_complete(params, method, name: str, where: str) -> None:
    """A layer holding only some of a method's factor leaves would silently run the base layer: an error."""
    missing = [n for n in method.factor_names if n not in params]
    if missing:
        raise ConfigError(
            f"Layer {where!r} holds {name} factor leaves {[n for n in method.factor_names if n in params]} but lacks "
            f"{missing}: these params are only part of the adapted tree. Pass the whole adapted tree "
            f"(dj.combine(trainable, buffers, frozen))."
        )


def check_layer(module, cfg: AdapterConfig, where: str) -> None:
    """Raise unless factored execution handles ``module`` as ``cfg`` reads its kernel's layout."""
    kind = type(module).__name__
    if _foreign(module, cfg):
        return
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


def layer_output(module, args, kwargs, params, method, cfg: AdapterConfig, where: str):
    """The output of the intercepted layer ``module`` called with ``args``/``kwargs`` when its parameters
    are ``params`` (a dict of leaves: kernel, bias, the factors) and its method ``method`` (None: the plain
    layer over ``params``' kernel, e.g. an adapter's own copy of a head)."""
    kind = type(module).__name__
    if kind == "ExpertDense":
        return expert_output(module, args, kwargs, params, method, cfg, where)
    if _foreign(module, cfg):  # jnp.einsum(equation, x, <its kernel leaf>): the equation is an argument or its own
        kind = "Einsum"
        arrays = [a for a in args if not isinstance(a, str)]
        equation = next((a for a in args if isinstance(a, str)),
                        kwargs.get("einsum_str", getattr(module, "einsum_str", None)))
        if not isinstance(equation, str):
            leaf = kernel_leaf(tuple(module.path), cfg)
            raise ConfigError(f"Layer {where!r} is a {type(module).__name__} holding its matrix as {leaf!r} "
                              f"(adapter.kernel_leaf), but its call gives no einsum equation (a string argument or an "
                              f"`einsum_str` attribute); use adapt(apply_fn, cfg, mode='merged').")
        args = (arrays[0], equation)
    x = args[0]
    factors = {n: params[n] for n in method.factor_names} if method is not None else {}
    bias = params.get("bias") if getattr(module, "use_bias", True) else None
    if kind == "DenseGeneral" and module.batch_dims:
        raise ConfigError(f"Layer {where!r} is an nn.DenseGeneral with batch_dims={module.batch_dims}, which "
                          f"factored execution does not handle; use adapt(apply_fn, cfg, mode='merged').")
    if kind not in ("DenseGeneral", "Einsum") and params["kernel"].ndim != 2:
        # a stacked (L, ...) kernel outside the nn.scan that slices it
        raise ConfigError(
            f"Layer {where!r} is a {kind} called with a kernel of shape {tuple(params['kernel'].shape)}: factored "
            f"execution adapts 2-D kernels; a stacked (L, d_in, d_out) kernel must be sliced per layer by the "
            f"nn.scan (variable_axes={{'params': 0}}) that calls the layer."
        )
    equation = None
    if kind == "DenseGeneral":
        equation = dense_general_equation(x.ndim, module.axis, params["kernel"].ndim)
    elif kind == "Einsum":
        equation = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    train, key = _dropout(module, method, cfg)

    def compute(x, kernel, bias, factors, key):
        kernel = dequantize(kernel)
        run = lambda xf, matrix, b: _run(module, xf, matrix, b, factors, method, cfg, train, key)
        if equation is None:
            return run(x, kernel.T if LAYOUTS[kind] else kernel, bias)
        if method is not None:
            return general_layer(x, kernel, bias, equation, kernel_in_axes(tuple(module.path), cfg), where, run)
        dtype = getattr(module, "dtype", None) or jnp.result_type(x, kernel)  # the layer's own einsum
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
        y = jnp.einsum(equation, x, kernel)
        return y if bias is None else y + bias.reshape(bias.shape if kind == "Einsum" else y.shape[-bias.ndim:])

    return _remat_dequantization(compute, params["kernel"])(x, params["kernel"], bias, factors, key)


# methods whose factored layer on rows grouped by expert is three grouped matmuls (jax.lax.ragged_dot):
# x @ K_e + s * (dropout(x) @ A_e) @ B_e
GROUPED = ("lora",)


def expert_output(module, args, kwargs, params, method, cfg: Optional[AdapterConfig], where: str):
    """A mixture's ``models.mlp.ExpertDense`` (``kernel (E, d_in, d_out)``, factors with a leading ``E``):
    the method's layer run per expert (``jax.vmap``), on ``x (E, N, d_in)``, or on rows sorted by expert
    ``x (M, d_in)`` with ``group_sizes``: LoRA as grouped matmuls, any other method per expert on every
    row, each row keeping its own expert's output (exact; ``E`` times the work)."""
    x = args[0]
    sizes = args[1] if len(args) > 1 else kwargs.get("group_sizes")
    kernel = dequantize(params["kernel"])
    if kernel.ndim != 3:
        raise ConfigError(f"Layer {where!r} holds experts' kernels of shape {tuple(kernel.shape)}: factored execution "
                          f"runs (E, d_in, d_out); a stacked (L, E, d_in, d_out) kernel must be sliced by its nn.scan.")
    factors = {n: params[n] for n in method.factor_names} if method is not None else {}
    train, key = _dropout(module, method, cfg)
    dtype = getattr(module, "dtype", None) or jnp.result_type(x, kernel)
    n = kernel.shape[0]
    keys = None if key is None else jax.random.split(key, n)

    def one(xe, ke, fe, k):
        return method_layer(xe, ke, None, fe, method, cfg, dtype=dtype, train=train, key=k)

    if sizes is None:
        return jax.vmap(one, in_axes=(0, 0, 0, None if keys is None else 0))(x, kernel, factors, keys)
    if method is None or method.name in GROUPED:
        x, kernel, *values = promote_dtype(x, kernel, *factors.values(), dtype=dtype)
        y = jax.lax.ragged_dot(x, kernel, sizes)
        if method is None:
            return y
        a, b = values
        h = jax.lax.ragged_dot(adapter_dropout(x, cfg.dropout, train, key), a, sizes)
        return y + cfg.scale * jax.lax.ragged_dot(h, b, sizes)
    every = jax.vmap(one, in_axes=(None, 0, 0, None if keys is None else 0))(x, kernel, factors, keys)  # (E, M, d_out)
    owner = jnp.repeat(jnp.arange(n), sizes, total_repeat_length=x.shape[0])
    return every[owner, jnp.arange(x.shape[0])]


def plain_output(module, args, kwargs, params):
    """The un-adapted layer ``module`` on ``params`` (its kernel dequantized when quantized), as its own
    ``__call__`` computes it."""
    kind = type(module).__name__
    if kind not in LAYOUTS:
        raise ConfigError(f"Layer {'/'.join(module.path)!r} is a {kind} with a quantized kernel, which factored "
                          f"execution does not run; keep its kernel in float (quantize_params(..., skip=...)).")
    return layer_output(module, args, kwargs, params, None, None, "/".join(module.path))


def _remat_dequantization(compute, kernel):
    """``compute`` itself for a float kernel; for a quantized one, under ``jax.checkpoint`` saving only the
    results of its dots: the dequantized kernel is not kept for the backward pass but recomputed there from
    the codes, so a train step holds each layer's float kernel only while that layer runs."""
    if not is_quantized(kernel):
        return compute
    return jax.checkpoint(compute, policy=jax.checkpoint_policies.dots_saveable)


def dequantizing(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_fn`` with every Linen layer whose kernel is quantized (``decomp_jax.quant``) run on its
    dequantized kernel: a quantized base model without an adapter."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and not module.is_initializing():
            params = own_params(module)
            if is_quantized(params.get("kernel")):
                return plain_output(module, args, kwargs, params)
        return next_fun(*args, **kwargs)

    @functools.wraps(apply_fn)
    def run(*args, **kwargs):
        with nn.intercept_methods(intercept):
            return apply_fn(*args, **kwargs)

    return run


def _dropout(module, method, cfg) -> tuple:
    """``(train, key)``: training mode when the call has a ``'dropout'`` RNG, and a key drawn from it when
    the method applies adapter dropout."""
    train = module.has_rng("dropout")
    drops = train and method is not None and cfg is not None and cfg.dropout > 0 and method.apply is not None
    return train, module.make_rng("dropout") if drops else None


def _run(module, x, kernel, bias, factors, method, cfg, train, key):
    """The method's layer in a Linen module: ``method_layer`` in the layer's activation dtype."""
    # mixed precision: compute in the layer's activation dtype (float32 factors over a bfloat16 base are
    # cast to it; their gradients come back in float32); with dtype=None, in the dtype of x @ kernel
    dtype = getattr(module, "dtype", None) or jnp.result_type(x, kernel)
    return method_layer(x, kernel, bias, factors, method, cfg, dtype=dtype, train=train, key=key)


def method_layer(x, kernel, bias, factors, method, cfg, *, dtype, train: bool = False, key=None):
    """The method's layer on ``x (..., d_in)`` with the ``(d_in, d_out)`` kernel, everything promoted to
    ``dtype`` (None: their common type); a method with no factored form is materialised. The leading
    axes are flattened first: the method's matmuls (and their gradients) are then plain 2-D GEMMs,
    which XLA:CPU runs without the transposing copies it inserts for 3-D ``(batch, length, d)``
    operands (the LoRA MLP of a decoder layer: 2.0x faster forward + backward)."""
    x, kernel, bias, *values = promote_dtype(x, kernel, bias, *factors.values(), dtype=dtype)
    factors = dict(zip(factors, values))
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if method is None:  # the plain layer
        y = linear(x, kernel, bias)
    elif method.apply is None:  # per-layer merged execution
        if method.materialize_bias is not None and bias is not None:
            bias = method.materialize_bias(bias, factors, cfg)
        y = linear(x, method.materialize(kernel, factors, cfg), bias)
    else:
        y = method.apply(x, kernel, bias, factors, cfg, train=train, key=key)
    return y.reshape(lead + y.shape[-1:])


def materialize_tables(variables, cfg: AdapterConfig, seen: list):
    """``variables`` (a params tree, or Linen variables holding one under ``params``) with each adapted
    embedding table replaced by ``phi(table)`` in the table's dtype and its factor leaves dropped; each
    such layer's path is appended to ``seen``. The table is the kernel of a one-hot input, so its layer
    is the rows of ``phi(table)``; every reader of the table sees the adapted one: the lookup, a tied LM
    head (``attend``, or a head that reads the table from the params), as in merged execution and in
    PEFT with ``ensure_weight_tying``. No adapter dropout there, as PEFT's LoRA on embeddings. Trainable
    token rows (``cfg.trainable_tokens``) are written over their rows of the table the same way."""
    method = get(cfg.method)
    names = method.factor_names if method.mergeable else ()

    def walk(tree, path):
        if not hasattr(tree, "items"):
            return tree
        if matrix_leaf(tree) == "embedding" and TOKEN_LEAF in tree:  # trainable_tokens: rows written over the table
            where = "/".join(path)
            ids = cfg.token_ids(where)
            if ids is None:
                raise ConfigError(f"Embedding {where!r} holds {TOKEN_LEAF} but cfg.trainable_tokens selects no ids for "
                                  f"it; pass the AdapterConfig these params were injected with.")
            seen.append(where)
            tree = {**{k: v for k, v in tree.items() if k != TOKEN_LEAF},
                    "embedding": write_token_rows(tree["embedding"], tree[TOKEN_LEAF], ids)}
        if matrix_leaf(tree) == "embedding" and any(n in tree for n in names):
            where = "/".join(path)
            missing = [n for n in names if n not in tree]
            if missing:
                raise ConfigError(f"Embedding {where!r} holds {cfg.method} factor leaves but lacks {missing}: these "
                                  f"params are only part of the adapted tree. Pass the whole adapted tree "
                                  f"(dj.combine(trainable, buffers, frozen)).")
            seen.append(where)
            table = tree["embedding"]
            adapted = method.materialize(table, {n: tree[n] for n in names}, cfg.for_layer(where))
            return {**{k: v for k, v in tree.items() if k not in names}, "embedding": adapted.astype(table.dtype)}
        return {k: walk(v, path if (not path and k == "params" and _is_variables(tree)) else path + (str(k),))
                for k, v in tree.items()}

    return walk(variables, ())


def _is_variables(tree) -> bool:
    """Linen variables (``{"params": ..., "batch_stats": ...}``) rather than a params tree."""
    return all(k in ("params", "batch_stats", "cache", "intermediates", "constants") for k in tree)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def dense_general_equation(x_ndim: int, axis, kernel_ndim: int) -> str:
    """The einsum equation of a DenseGeneral contracting ``axis`` of ``x`` (its kernel stores the
    contracted axes first, then the features; the output puts the features last)."""
    axes = [a % x_ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,))]
    xs = _LETTERS[:x_ndim]
    feats = _LETTERS[x_ndim:x_ndim + kernel_ndim - len(axes)]
    kernel = "".join(xs[a] for a in axes) + feats
    return f"{xs},{kernel}->{''.join(c for i, c in enumerate(xs) if i not in axes)}{feats}"


def _operands(equation: str) -> tuple[str, str, str]:
    """``(lhs, rhs, out)`` of a two-operand einsum equation, as written."""
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    return lhs, rhs, out


def _parse_einsum(equation: str, x_ndim: int) -> tuple[str, str, str]:
    """``(lhs, rhs, out)`` letter strings of a two-operand equation, an ellipsis in ``lhs``/``out`` spelled out."""
    lhs, rhs, out = _operands(equation)
    if "..." in lhs:
        spare = [c for c in _LETTERS if c not in equation][:x_ndim - (len(lhs) - 3)]
        lhs, out = (s.replace("...", "".join(spare)) for s in (lhs, out))
    return lhs, rhs, out


def einsum_in_axes(equation: str) -> tuple[int, ...]:
    """The kernel axes an ``x, kernel -> y`` equation contracts with ``x`` (positions in the kernel)."""
    lhs, rhs, out = _operands(equation)
    return tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)


def general_layer(x, kernel, bias, equation: str, in_axes, where: str, run):
    """A ``DenseGeneral`` / ``Einsum`` projection ``x, kernel -> y`` run as the matrix the methods see:
    ``x``'s contracted axes moved last and flattened, the kernel ``(prod(inputs), prod(outputs))`` (its
    axes in the kernel's order), ``run(x_flat, matrix, bias_flat)``, the output laid out as ``equation`` says."""
    lhs, rhs, out = _parse_einsum(equation, x.ndim)
    contracted = [c for c in rhs if c in lhs and c not in out]
    outs = [c for c in rhs if c in out and c not in lhs]
    batch = [c for c in lhs if c not in contracted]
    if (len(contracted) + len(outs) != len(rhs) or not contracted or not outs or any(c not in out for c in batch)
            or len(out) != len(batch) + len(outs)):
        raise ConfigError(f"Layer {where!r} computes {equation!r}, which is not a projection that factored execution "
                          f"handles (each kernel axis contracted with x or an output axis, no batch axes in the kernel); "
                          f"use adapt(apply_fn, cfg, mode='merged').")
    wanted = tuple(rhs.index(c) for c in contracted)
    if in_axes is None or tuple(in_axes) != wanted:
        raise ConfigError(
            f"Layer {where!r} computes {equation!r}: its kernel {tuple(kernel.shape)} contracts axes {list(wanted)} with "
            f"the input, but adapter.kernel_in_axes gives {None if in_axes is None else list(in_axes)}. Set "
            f"kernel_in_axes to {{'{where.rsplit('/', 1)[-1]}$': {list(wanted)}}} (a regex matching this layer) and "
            f"inject again.")
    if bias is not None and [c for c in out if c in outs] != outs:
        raise ConfigError(f"Layer {where!r} computes {equation!r}, whose output axes come in another order than in "
                          f"its kernel; factored execution needs them in the same order: use mode='merged'.")
    moved = jnp.einsum(f"{lhs}->{''.join(batch + contracted)}", x)
    lead = moved.shape[:len(batch)]
    d_in = int(np.prod([kernel.shape[rhs.index(c)] for c in contracted]))
    matrix = jnp.einsum(f"{rhs}->{''.join(contracted + outs)}", kernel).reshape(d_in, -1)
    y = run(moved.reshape(lead + (-1,)), matrix, None if bias is None else bias.reshape(-1))
    y = y.reshape(lead + tuple(kernel.shape[rhs.index(c)] for c in outs))
    return jnp.einsum(f"{''.join(batch + outs)}->{out}", y)


def adapt(apply_fn: Callable[..., Any], cfg: AdapterConfig, mode: str = "factored") -> Callable[..., Any]:
    """Wrap ``apply_fn(variables_or_params, *args, **kwargs)`` so that it runs the adapted model.

    ``factored`` (default) needs a Flax Linen apply; methods with no factored form are
    materialised per layer. ``merged`` works for any function of a params pytree but not for the
    non-mergeable adapters.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; choose 'factored' or 'merged'.")
    method = get(cfg.method)
    if method.kind == "prompt":  # prompt_tuning / prefix_tuning: decomp_jax.core.prompts (our Llama only)
        if mode == "merged":
            check_mergeable(method)
        return adapt_prompt(apply_fn, cfg)
    if not method.factor_names and not cfg.trainable_tokens:  # nothing to intercept or fold (BitFit)
        return dequantizing(apply_fn) if mode == "factored" else apply_fn
    if mode == "merged":
        check_mergeable(method)

        @functools.wraps(apply_fn)
        def merged_apply(params, *args, **kwargs):
            return apply_fn(merge(params, cfg), *args, **kwargs)

        return merged_apply

    @functools.wraps(apply_fn)
    def factored_apply(variables, *args, **kwargs):
        seen: list = []
        if method.mergeable or cfg.trainable_tokens:  # adapted embedding tables: phi(table), trained token rows
            variables = materialize_tables(variables, cfg, seen)
        with nn.intercept_methods(_interceptor(cfg, seen)):
            out = apply_fn(variables, *args, **kwargs)
        if not seen and _holds_factors(variables, method.factor_names + (TOKEN_LEAF,)):  # (checked per trace, not per step)
            raise ConfigError(
                f"The params hold {cfg.method} factors but the forward pass ran no Linen layer holding them, so the "
                f"adapter would have no effect and train nothing. Factored execution adapts flax.linen nn.Dense (and "
                f"transformers' Conv1D) layers called through apply_fn; for other models (Flax NNX modules, custom "
                f"einsum projections, functions of a params pytree) use adapt(apply_fn, cfg, mode='merged').")
        return out

    return factored_apply
