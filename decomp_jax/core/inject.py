"""Tree surgery on parameter pytrees: target selection, inject, merge, trainable masks.

Everything here is a pure function of nested dicts: flatten to '/'-joinable paths, transform,
unflatten. A *layer* is a dict that holds a 2-D ``kernel`` (Flax ``Dense`` layout ``(d_in, d_out)``)
or an ``nn.Embed``'s 2-D ``embedding`` table ``(vocab, features)``, the kernel of a one-hot input;
an *adapted layer* also holds all of the method's factor leaves. A targeted layer that holds only
some of them (a half of ``split``, say) raises a ``ConfigError``; one that holds none is not adapted.
Bad input (an NNX state, a list, a dict for ``cfg``) raises a ``TypeError`` that says what to pass.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax import quant
from decomp_jax.core import named
from decomp_jax.core.axes import has_boxes, rebox, unbox
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.methods import get, registry
from decomp_jax.core.named import DEFAULT, SEP, adapter_names, check_name, named_path, owner_of, plain_path, select
from decomp_jax.core.tree import (
    TOKEN_LEAF, Path, absent_names, bias_vector, by_layer, check_tree, count_params, factor_keys, flat_params, has_experts,
    kernel_view, layer_key, layer_paths, layers_with, lead_axes, matrix_leaf, named_back, oriented, path_str, per_layer,
    restore_layout, split, table_paths, write_token_rows,
)
from decomp_jax.errors import ConfigError
from decomp_jax.quant import dequantize_params, quantize_params


def _check_args(params, cfg, name: str = "params") -> None:
    """Raise a clear ``TypeError`` unless ``params`` is a nested dict and ``cfg`` an ``AdapterConfig``."""
    check_tree(params, name)
    if isinstance(cfg, AdapterConfig):
        return
    if isinstance(getattr(cfg, "adapter", None), AdapterConfig):
        hint = " Pass its .adapter."
    elif isinstance(cfg, Mapping) and set(cfg) <= {f for f in AdapterConfig.__dataclass_fields__}:
        hint = " Build it from a dict with dj.AdapterConfig.from_dict(d)."
    else:
        hint = ""
    raise TypeError(
        f"cfg must be an AdapterConfig, e.g. dj.AdapterConfig(method='lora', targets=r'attention/self/(query|value)$'); "
        f"got {type(cfg).__name__}.{hint}"
    )


def find_targets(params, cfg: AdapterConfig) -> list[Path]:
    """Layer paths whose '/'-joined form matches ``cfg.targets`` (``re.search``).

    Raises a ``ConfigError`` listing the nearest layer paths when nothing matches.
    """
    _check_args(params, cfg)
    pattern = re.compile(cfg.targets)
    _refuse_other_matrices(params, pattern, cfg)
    candidates = layer_paths(params)
    if not candidates:
        raise ConfigError(
            f"params hold no layer (no dict with a 'kernel' or 'embedding' leaf); top-level keys: {list(params)[:8]}. "
            f"Pass the model's parameter tree, e.g. variables['params'] of a Linen model or an HF Flax model's .params."
        )
    matched = [p for p in candidates if pattern.search(path_str(p))]
    if not matched:
        shown = [path_str(p) for p in candidates]
        near = difflib.get_close_matches(cfg.targets, shown, n=5, cutoff=0.0)
        raise ConfigError(
            f"targets={cfg.targets!r} matches no dense or embedding layer. Nearest layer paths: {near}. "
            f"The pattern is searched (re.search) in '/'-joined paths such as {shown[:3]}; "
            f"e.g. targets: 'attention/self/(query|value)$'."
        )
    return matched


def report_absent_names(params, cfg: AdapterConfig, targets: list) -> None:
    """Warn when ``cfg.targets`` names layers the model does not have (see ``absent_names``)."""
    absent = absent_names(params, cfg.targets)
    if absent:
        warnings.warn(
            f"targets={cfg.targets!r} names {absent}, which no layer of these params has: {len(targets)} layers are "
            f"adapted ({', '.join(sorted({path_str(p).rsplit('/', 1)[-1] for p in targets})[:8])}). Check the names "
            f"against the model's layer paths (decomp_jax.core.tree.layer_paths), or narrow the pattern to the layers it has.",
            stacklevel=3)


def _refuse_other_matrices(params, pattern, cfg: AdapterConfig) -> None:
    """A dict the targets match that holds a 2-D or larger leaf but no kernel or embedding table (another
    library's ``w``) would be skipped: refuse it by name instead, with the fix."""
    method_leaves = set(get(cfg.method).factor_names) | {TOKEN_LEAF}
    held = []
    for path, leaves in by_layer(flat_params(params)).items():
        if matrix_leaf(leaves) is not None or not pattern.search(path_str(path)):
            continue
        big = {n: tuple(np.shape(v)) for n, v in leaves.items() if np.ndim(v) >= 2 and n not in method_leaves}
        if big:
            held.append((path_str(path), big))
    if held:
        shown = ", ".join(f"{p!r} ({', '.join(f'{n} {s}' for n, s in big.items())})" for p, big in held[:5])
        first, leaf = held[0][0].rsplit("/", 1)[-1], next(iter(held[0][1]))
        raise ConfigError(
            f"targets={cfg.targets!r} matches {len(held)} layer(s) holding a matrix under another name than `kernel`: "
            f"{shown}{' ...' if len(held) > 5 else ''}. If such a layer computes an einsum with it, name the leaf in "
            f"adapter.kernel_leaf (e.g. {{{first + '$'!r}: {leaf!r}}}) and its input axes in adapter.kernel_in_axes; "
            f"else narrow `targets`.")


def _check_target(method, cfg: AdapterConfig, lcfg: AdapterConfig, flat, path, leaf: str, kernel, stored) -> None:
    """Refuse, by layer name, a target ``method`` cannot adapt as ``cfg`` asks."""
    where = path_str(path)
    if leaf == "embedding":
        _check_embedding_target(method, where)
    if method.schedule is not None and has_experts(path, stored, cfg):
        raise ConfigError(
            f"Layer {where!r} holds {kernel.shape[-3]} experts' kernels, and {cfg.method} reallocates ranks across "
            f"layers with a schedule that works on single matrices; choose a method without a schedule for the "
            f"experts (lora, dora, pissa, ...), or narrow `targets` to leave '{cfg.experts}/' out.")
    d_in, d_out = kernel.shape[-2:]
    if method.uses_rank and lcfg.rank > min(d_in, d_out):
        raise ConfigError(
            f"rank={lcfg.rank} is larger than min(d_in, d_out)={min(d_in, d_out)} for layer "
            f"{where!r} (kernel {tuple(kernel.shape)}). Use rank <= {min(d_in, d_out)}.")
    clash = [n for n in method.factor_names if path + (n,) in flat]
    if clash:
        raise ConfigError(
            f"Layer {where!r} already holds {clash}: these params are already adapted. "
            f"Inject into the base params, or merge() first.")


def inject(params, cfg: AdapterConfig, rng: jax.Array, name: Optional[str] = None):
    """Add the method's factor leaves beside the ``kernel`` of every targeted layer.

    Pure: returns a new tree; ``params`` is not modified. The adapted model equals the base
    model at init (for every method whose spec says so). ``name``: add the adapter beside those the
    tree already holds, under that name (``decomp_jax.core.named``; its factors are those injecting it into
    the base alone with the same ``rng`` gives).
    """
    _check_args(params, cfg)
    if has_boxes(params):  # Flax boxes (nn.LogicallyPartitioned, ...): read through; factors boxed alike
        return rebox(inject(unbox(params), cfg, rng, name), params, cfg, get(cfg.method))
    view, renamed = kernel_view(params, cfg)
    if renamed:  # other libraries' layers holding their matrix under another name (cfg.kernel_leaf)
        return named_back(inject(view, cfg, rng, name), renamed)
    if rng is None or isinstance(rng, (int, np.integer)):
        raise TypeError(f"rng must be a JAX PRNG key, e.g. jax.random.PRNGKey(0); got {rng!r}.")
    if name is not None or named.has_named(params):
        return attach(params, inject(named.select(params, None), cfg, rng), cfg, name or named.DEFAULT)
    method = get(cfg.method)
    if method.kind == "prompt":
        return _inject_prompt(params, cfg, rng)
    flat = flat_params(params)
    factor_dtype = jax.numpy.dtype(cfg.factor_dtype)
    targets = find_targets(params, cfg)
    report_absent_names(params, cfg, targets)
    for path in targets:
        leaf = "kernel" if path + ("kernel",) in flat else "embedding"
        original = flat[path + (leaf,)]
        stored = quant.dequantize(original)  # a quantized base: factors start from the dequantized kernel
        kernel = oriented(stored, path, cfg)
        where = path_str(path)
        lcfg = cfg.for_layer(where)  # rank_pattern / alpha_pattern
        stacked = lead_axes(path, stored, cfg)  # refuses a kernel with axes nothing explains
        _check_target(method, cfg, lcfg, flat, path, leaf, kernel, stored)
        base_dtype = kernel.dtype
        bias = bias_vector(flat.get(path + ("bias",)), kernel, repr(where))
        # factors are made from the kernel in the wider of its dtype and factor_dtype (the init of float32
        # factors over a bfloat16 kernel runs in float32; PiSSA's residual of a float32 kernel stays float32)
        work_dtype = jax.numpy.promote_types(base_dtype, factor_dtype)
        work = kernel.astype(work_dtype) if jax.numpy.issubdtype(base_dtype, jax.numpy.floating) else kernel
        work_bias = None if bias is None else bias.astype(work_dtype)
        keys = factor_keys(rng, path, stored, cfg)  # stacked layer i's: the unrolled layer's; expert e's: its own
        init = per_layer(lambda k, w, b: method.init(k, w, b, lcfg), stacked)
        factors = {n: v.astype(factor_dtype) for n, v in init(keys, work, work_bias).items()}
        if leaf == "embedding" and method.name in EMBEDDING_INIT:
            factors.update({n: v.astype(factor_dtype) for n, v in _embedding_lora_init(keys, factors).items()})
        for name, value in factors.items():
            flat[path + (name,)] = value
        if method.residual is not None:  # PiSSA/MiLoRA: the layer keeps K - s * a0 @ b0
            if quant.is_quantized(original):
                raise ConfigError(
                    f"Layer {where!r}: {cfg.method} writes the residual K - s a0 b0 of the float kernel, and this one is "
                    f"quantized (its SVD would be of the dequantized kernel, and K_res quantized a second time). Inject "
                    f"into the float base, then quantize: quant.quantize_params(dj.inject(base, cfg, key), ...) stores "
                    f"K_res quantized (QLoRA-style PiSSA).")
            residual = per_layer(lambda w, f: method.residual(w, f, lcfg), stacked)(work, factors)
            flat[path + (leaf,)] = restore_layout(residual.astype(base_dtype), path, cfg, np.shape(stored))
    for path, ids in token_tables(flat, cfg):
        if path + (TOKEN_LEAF,) in flat:
            raise ConfigError(f"Embedding {path_str(path)!r} already holds {TOKEN_LEAF}: these params are already "
                              f"adapted. Inject into the base params, or merge() first.")
        if any(path + (n,) in flat for n in method.factor_names):
            raise ConfigError(
                f"Embedding {path_str(path)!r} is both a {cfg.method} target and in trainable_tokens; choose one: "
                f"narrow `targets`, or drop it from trainable_tokens.")
        table = flat[path + ("embedding",)]
        flat[path + (TOKEN_LEAF,)] = jax.numpy.asarray(table)[np.asarray(ids)].astype(factor_dtype)
    return unflatten_dict(flat)


def token_tables(flat: dict[Path, Any], cfg: AdapterConfig) -> list[tuple[Path, list]]:
    """``(embedding path, token ids)`` of each table ``cfg.trainable_tokens`` selects; a regex that selects
    no embedding table, or ids outside the vocabulary, raise a ``ConfigError``."""
    if not cfg.trainable_tokens:
        return []
    tables = table_paths(flat)
    out = []
    for path in tables:
        ids = cfg.token_ids(path_str(path))
        if ids is None:
            continue
        vocab = np.shape(flat[path + ("embedding",)])[0]
        if max(ids) >= vocab:
            raise ConfigError(f"trainable_tokens gives {path_str(path)!r} token ids up to {max(ids)}, but its table has "
                              f"{vocab} rows. Resize the embedding first (new tokens need rows), or fix the ids.")
        out.append((path, ids))
    unused = [r for r in cfg.trainable_tokens if not any(re.search(r, path_str(p)) for p in tables)]
    if unused:
        raise ConfigError(f"trainable_tokens regexes {unused} select no embedding table; the tables are "
                          f"{[path_str(p) for p in tables][:6]} (e.g. 'embed_tokens$').")
    return out


# methods whose factors on an embedding start as HF PEFT starts lora_embedding_A / B: the input-side
# factor (lora_a, (vocab, r)) zero and lora_b standard normal (on a one-hot input a kaiming lora_a over
# the vocabulary would be tiny and, with lora_b zero, learn slowly); the update is zero either way
EMBEDDING_INIT = ("lora", "dora")


def _embedding_lora_init(key, factors: dict) -> dict:
    a, b = factors["lora_a"], factors["lora_b"]
    return {"lora_a": jax.numpy.zeros_like(a),
            "lora_b": jax.random.normal(jax.random.fold_in(key, 1), b.shape, b.dtype)}


def _check_embedding_target(method, where: str) -> None:
    """Only a method with a merged form adapts an ``nn.Embed``: its layer runs as the rows of ``phi(table)``."""
    if not method.mergeable:
        raise ConfigError(
            f"targets selects the embedding table {where!r}, and method {method.name!r} has no merged form (its update "
            f"is a function of the layer's input or output), so it cannot adapt an embedding, whose input is a token "
            f"id. Narrow `targets` to dense layers, or use a mergeable method there (lora, dora, ia3, ...).")


def adapted_layers(params, cfg: AdapterConfig) -> Iterator[tuple[Path, dict]]:
    """``(path, layer_dict)`` for every layer that holds a ``kernel`` and all of the method's factor leaves
    (``tree.layers_with`` with the method's ``factor_names``; none for a prompt method)."""
    _check_args(params, cfg)
    method = get(cfg.method)
    if not method.factor_names or method.kind == "prompt":  # prompt methods adapt no layer
        return iter(())
    return layers_with(params, cfg, method.factor_names)


def check_mergeable(method) -> None:
    if method.kind == "prompt":
        raise ConfigError(
            f"Method {method.name!r} is not mergeable: it adds trainable virtual tokens / key-value prefixes to "
            f"the model's input, not a new kernel. Keep the params as they are and run it with "
            f"adapt(model.apply, cfg) (factored)."
        )
    if not method.mergeable:
        raise ConfigError(
            f"Method {method.name!r} is not mergeable: its update is a non-linear function of the layer's "
            f"input or output, not a new kernel. Run it with adapt(..., mode='factored'). Non-mergeable methods: "
            f"{sorted(n for n, m in registry().items() if not m.mergeable)}."
        )


def merge(params, cfg: AdapterConfig):
    """Fold ``phi(K)`` into each adapted kernel and drop the factor leaves.

    Returns plain params with the base model's structure and shapes.
    """
    _check_args(params, cfg)
    if has_boxes(params):
        return rebox(merge(unbox(params), cfg), params)
    view, renamed = kernel_view(params, cfg)
    if renamed:
        return named_back(merge(view, cfg), renamed)
    _check_single(params, "merge")
    method = get(cfg.method)
    check_mergeable(method)
    flat = flat_params(params)
    _check_foreign(flat, cfg, "merge")
    for path, layer in adapted_layers(params, cfg):
        factors = {n: layer[n] for n in method.factor_names}
        leaf = matrix_leaf(layer)
        layer = {**layer, leaf: quant.dequantize(layer[leaf])}  # a quantized base merges into its dequantized kernels
        stacked = lead_axes(path, layer[leaf], cfg)
        base = oriented(layer[leaf], path, cfg)
        lcfg = cfg.for_layer(path_str(path))
        kernel = per_layer(lambda k, f: method.materialize(k, f, lcfg), stacked)(base, factors)
        flat[path + (leaf,)] = restore_layout(kernel.astype(base.dtype), path, cfg, np.shape(layer[leaf]))
        if method.adds_bias and "bias" not in layer:
            raise ConfigError(
                f"Layer {path_str(path)!r} has no bias, so merge cannot fold {cfg.method}'s bias term into it (as PEFT "
                f"cannot merge lora_bias there either). Run the adapter factored (dj.adapt(apply, cfg)), or target "
                f"layers with a bias.")
        if method.materialize_bias is not None and "bias" in layer:
            old = layer["bias"]
            bias = per_layer(lambda b, f: method.materialize_bias(b, f, lcfg), stacked)(bias_vector(old, base), factors)
            flat[path + ("bias",)] = bias.reshape(np.shape(old)).astype(old.dtype)
        for name in method.factor_names:
            del flat[path + (name,)]
    for path, ids in token_tables(flat, cfg):
        if path + (TOKEN_LEAF,) in flat:
            flat[path + ("embedding",)] = write_token_rows(flat[path + ("embedding",)], flat.pop(path + (TOKEN_LEAF,)), ids)
    return unflatten_dict({p: quant.dequantize(v) for p, v in flat.items()})  # a float model


def _check_single(params, what: str) -> None:
    """Refuse a tree holding named adapters where one adapter is meant (``what`` would act on one and
    carry the others along)."""
    if named.has_named(params):
        held = named.adapter_names(params)
        raise ConfigError(f"params hold several adapters {held}; {what} acts on one: pass dj.select(params, name) "
                          f"(that adapter alone over the base) with its AdapterConfig.")


def _check_foreign(flat: dict[Path, Any], cfg: AdapterConfig, what: str) -> None:
    """Raise when a targeted layer holds factor leaves of another method than ``cfg.method``: ``what``
    would leave them behind as stray leaves."""
    methods = registry().values()
    own = set(get(cfg.method).factor_names)
    every = {n for m in methods for n in m.factor_names}
    targets = re.compile(cfg.targets)
    for path, layer in by_layer(flat).items():
        foreign = [n for n in layer if n in every and n not in own]
        if foreign and matrix_leaf(layer) is not None and targets.search(path_str(path)):
            held = {n for n in layer if n in every}
            exact = sorted(m.name for m in methods if set(m.factor_names) == held)
            raise ConfigError(
                f"Layer {path_str(path)!r} holds {foreign}, factor leaves of "
                f"{'method ' + ' / '.join(exact) if exact else 'another method'}, not of {cfg.method!r} "
                f"{list(get(cfg.method).factor_names)}: {what} would leave them behind. Pass the AdapterConfig these "
                f"params were injected with."
            )


def adapter_leaves(params, cfg: AdapterConfig) -> dict:
    """The method's factor leaves (trainable and buffers) of every adapted layer, and the trainable token
    rows (``trainable_tokens``), as a nested dict."""
    _check_args(params, cfg)
    names = get(cfg.method).factor_names
    if get(cfg.method).kind == "prompt":
        return {cfg.method: unfreeze(params)[cfg.method]} if cfg.method in params else {}
    flat = flat_params(params)
    rows = {path + (TOKEN_LEAF,): flat[path + (TOKEN_LEAF,)] for path, _ in token_tables(flat, cfg)
            if path + (TOKEN_LEAF,) in flat}
    return unflatten_dict({**{path + (n,): layer[n] for path, layer in adapted_layers(params, cfg) for n in names},
                           **rows})


def unmerge(merged, adapter, cfg: AdapterConfig):
    """Inverse of ``merge``: recover each adapted layer's base kernel from ``K'`` and re-attach the
    factor leaves held by ``adapter`` (e.g. ``adapter_leaves(params, cfg)``).

    ``unmerge(merge(p, cfg), adapter_leaves(p, cfg), cfg) == p`` to float tolerance, for every
    method whose ``K`` is recoverable: not DoRA (the column norms of ``K + dK`` are lost) nor
    SAM-PARSER (the original singular values are lost); the scaling methods need non-zero scales.
    """
    _check_args(merged, cfg, "merged")
    check_tree(adapter, "adapter")
    if has_boxes(merged) or has_boxes(adapter):
        return rebox(rebox(unmerge(unbox(merged), unbox(adapter), cfg), merged), adapter)
    view, renamed = kernel_view(merged, cfg)
    if renamed:
        return named_back(unmerge(view, adapter, cfg), renamed)
    method = get(cfg.method)
    check_mergeable(method)
    if method.unmaterialize is None:
        raise ConfigError(
            f"Method {cfg.method!r} cannot be unmerged: K is not recoverable from the merged kernel and the "
            f"factors. Keep the unmerged params (or the base model) to go back."
        )
    if cfg.trainable_tokens:
        raise ConfigError("unmerge with trainable_tokens: merge wrote the trained rows over the table's original rows, "
                          "which are not kept. Keep the unmerged params (or the base model) to go back.")
    if not method.factor_names:  # BitFit: merging changed nothing
        return merged
    flat, flat_adapter = flat_params(merged, "merged"), flat_params(adapter, "adapter")
    layers = sorted({path[:-1] for path in flat_adapter if path[-1] in method.factor_names})
    grouped = by_layer(flat)
    if not layers:
        raise ConfigError(f"`adapter` holds no {cfg.method} factor leaves {method.factor_names}; pass adapter_leaves(params, cfg).")
    for path in layers:
        where = path_str(path)
        missing = [n for n in method.factor_names if path + (n,) not in flat_adapter]
        if missing:
            raise ConfigError(
                f"Layer {where!r}: the adapter holds {cfg.method} factor leaves "
                f"{[n for n in method.factor_names if n not in missing]} but lacks {missing}. Pass "
                f"adapter_leaves(params, cfg) of the whole adapted tree (e.g. dj.combine(trainable, buffers, frozen))."
            )
        leaf = matrix_leaf(grouped.get(path, {}))
        if leaf is None:
            raise ConfigError(
                f"Layer {where!r} is in the adapter but the merged params have no kernel there; pass the merged params "
                f"and the adapter of the same model."
            )
        again = [n for n in method.factor_names if path + (n,) in flat]
        if again:
            raise ConfigError(
                f"Layer {where!r} of the merged params already holds factor leaves {again}: these params are not "
                f"merged. unmerge takes the output of dj.merge(params, cfg)."
            )
        factors = {n: flat_adapter[path + (n,)] for n in method.factor_names}
        stored = flat[path + (leaf,)]
        merged_kernel = oriented(stored, path, cfg)
        stacked = lead_axes(path, stored, cfg)
        old_bias = flat.get(path + ("bias",))
        lcfg = cfg.for_layer(path_str(path))
        kernel, bias = per_layer(lambda k, b, f: method.unmaterialize(k, b, f, lcfg), stacked)(
            merged_kernel, bias_vector(old_bias, merged_kernel), factors)
        flat[path + (leaf,)] = restore_layout(kernel.astype(merged_kernel.dtype), path, cfg, np.shape(stored))
        if bias is not None:
            flat[path + ("bias",)] = bias if old_bias is None else bias.reshape(np.shape(old_bias)).astype(old_bias.dtype)
        flat.update({path + (n,): v for n, v in factors.items()})
    return unflatten_dict(flat)


# --- prompt methods (kind="prompt": prompt_tuning, prefix_tuning) -----------------------------------

def _inject_prompt(params, cfg: AdapterConfig, rng: jax.Array):
    """``params`` plus the method's subtree at ``params[cfg.method]`` (``targets`` is not used)."""
    if cfg.method in params:
        raise ConfigError(
            f"These params already hold a {cfg.method!r} subtree: they are already adapted. Inject into the base params."
        )
    leaves = get(cfg.method).init(layer_key(rng, (cfg.method,)), params, cfg)
    return {**unfreeze(params), cfg.method: leaves}


def trainable_mask(params, cfg: AdapterConfig, name: Optional[str] = None):
    """A bool pytree with the structure of ``params``: True where a leaf trains.

    Trainable: the method's factor leaves (not its buffers), the biases of targeted layers for
    methods that train biases (BitFit), and base leaves whose path matches ``cfg.train_extra``.
    In a tree of several adapters (``decomp_jax.core.named``), those of adapter ``name`` (default: the
    unnamed one) only.
    """
    _check_args(params, cfg)
    params = unbox(params)
    view, renamed = kernel_view(params, cfg)
    if renamed:
        return named_back(trainable_mask(view, cfg, name), renamed)
    if name is not None or named.has_named(params):
        return named_mask(params, cfg, name or named.DEFAULT)
    method = get(cfg.method)
    flat = flat_params(params)
    if method.kind == "prompt":  # the subtree params[method] trains (and train_extra)
        extra = re.compile(cfg.train_extra) if cfg.train_extra else None
        return unflatten_dict({path: path[0] == cfg.method or bool(extra and extra.search(path_str(path)))
                               for path in flat})
    adapted = {path for path, _ in adapted_layers(params, cfg)}
    targets = re.compile(cfg.targets)
    extra = re.compile(cfg.train_extra) if cfg.train_extra else None

    def trains(path: Path) -> bool:
        layer, leaf = path[:-1], path[-1]
        if layer in adapted and leaf in method.trainable_names:
            return True
        if leaf == TOKEN_LEAF and cfg.token_ids(path_str(layer)) is not None:
            return True
        if method.trains_bias and leaf == "bias" and path_str(layer) and targets.search(path_str(layer)):
            return (layer + ("kernel",)) in flat
        return bool(extra and extra.search(path_str(path)))

    return unflatten_dict({path: trains(path) for path in flat})


def partition(params, cfg: AdapterConfig, name: Optional[str] = None) -> tuple[dict, dict, dict]:
    """``(trainable, buffers, frozen)``: ``buffers`` holds the buffers that a stateful method's
    schedule rewrites during training (LoRA-Dash's directions); it lives in the train state and is
    empty for every other method (their buffers are constants and stay in ``frozen``). ``name``: of
    that adapter of a tree of several (``trainable_mask``)."""
    _check_args(params, cfg)
    if has_boxes(params):
        return tuple(rebox(part, params) for part in partition(unbox(params), cfg, name))
    view, renamed = kernel_view(params, cfg)
    if renamed:
        return tuple(named_back(part, renamed) for part in partition(view, cfg, name))
    trainable, frozen = split(params, trainable_mask(params, cfg, name))
    method = get(cfg.method)
    if method.schedule is None or not method.buffers:
        return trainable, {}, frozen
    if name is not None:
        _check_single(params, f"partition of the stateful method {cfg.method!r}")
    flat = flat_params(frozen)
    adapted = {path for path, _ in adapted_layers(params, cfg)}
    is_buffer = {p: (p[:-1] in adapted and p[-1] in method.buffers) for p in flat}
    buffers, frozen = split(frozen, unflatten_dict(is_buffer))
    return trainable, buffers, frozen


def trainable_count(base_params, cfg: AdapterConfig) -> int:
    """Trainable parameters of ``cfg`` on ``base_params``, from shapes only (``jax.eval_shape``:
    no SVD or init is computed)."""
    shapes = jax.eval_shape(lambda p: inject(p, cfg, jax.random.PRNGKey(0)), base_params)
    return count_params(split(shapes, trainable_mask(shapes, cfg))[0])


def inject_quantized(base, cfg, key, kind: str, *, block_size: int = 64, double_quant: bool = True):
    """``(quantized base, adapted params)``: the adapter ``cfg`` over ``base`` with its frozen kernels
    quantized (the trained head of ``cfg.train_extra`` kept in float). Factors start from the quantized
    kernels (the adapted model equals the quantized base at init); PiSSA/MiLoRA take the SVD of the float
    kernel and store its residual quantized (QLoRA-style)."""
    settings = dict(block_size=block_size, double_quant=double_quant, skip=cfg.train_extra)
    qbase = quantize_params(base, kind, **settings)
    if get(cfg.method).residual is None:
        return qbase, inject(qbase, cfg, key)
    # the residual of the float (or dequantized) kernel, quantized; the other kernels keep qbase's codes
    adapted = flatten_dict(quantize_params(inject(dequantize_params(base), cfg, key), kind, **settings))
    kept = flatten_dict(qbase)
    targeted = {p[:-1] for p in set(adapted) - set(kept)}  # the layers that gained factor leaves
    return qbase, unflatten_dict({p: v if p[:-1] in targeted or p not in kept else kept[p] for p, v in adapted.items()})


def _own_paths(adapted, cfg: AdapterConfig) -> set:
    """The leaves of a single-adapter tree that are its adapter's: factors, buffers, token rows, and the
    base leaves it trains (``train_extra``, BitFit's biases)."""
    own = set(flat_params(adapter_leaves(adapted, cfg)))
    return own | {p for p, t in flat_params(trainable_mask(adapted, cfg)).items() if t}


def own_leaves(params, cfg: AdapterConfig, name: str) -> dict:
    """Adapter ``name``'s own leaves, in the plain layout (``select``)."""
    view = select(params, name)
    flat = flat_params(view)
    return unflatten_dict({p: flat[p] for p in _own_paths(view, cfg)})


def attach(params, adapted, cfg: AdapterConfig, name: str) -> dict:
    """``params`` with the adapter of ``adapted`` (a single-adapter tree of the same base, injected with
    ``cfg``: trained, imported, combined) added under ``name``: its factor leaves, buffers and token
    rows, and its trained base leaves (``train_extra``, BitFit's biases) as the adapter's own copies."""
    _check_args(adapted, cfg, "adapted")
    check_name(name)
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
    flat, new = flat_params(params), flat_params(adapted, "adapted")
    base = set(flat_params(select(params, None)))
    own = _own_paths(adapted, cfg)
    stray = sorted(path_str(p) for p in set(new) - own - base)
    if stray:
        raise ConfigError(f"`adapted` holds leaves that are neither the base's nor its adapter's: {stray[:5]}. Pass a "
                          f"tree injected into this base (dj.select(params, None)) with the AdapterConfig given.")
    prompt = method.kind == "prompt"
    for path in own:  # a trained base leaf (a head) becomes the adapter's copy, also for "default"
        flat[path[:-1] + (f"{path[-1]}{SEP}{name}",) if path in base else named_path(path, name, prompt)] = new[path]
    return unflatten_dict(flat)


def named_mask(params, cfg: AdapterConfig, name: str) -> dict:
    """``trainable_mask`` of adapter ``name`` over the whole tree: its trainable leaves True, every
    other adapter's and the base's False."""
    view = flat_params(trainable_mask(select(params, name), cfg))
    flat = flat_params(params)
    out = {}
    for path in flat:
        owner = owner_of(path)
        if owner is None and name == DEFAULT:  # trains unless the adapter has its own copy of it
            out[path] = view.get(path, False) and path[:-1] + (f"{path[-1]}{SEP}{DEFAULT}",) not in flat
        else:
            out[path] = owner == name and view.get(plain_path(path), False)
    return unflatten_dict(out)
