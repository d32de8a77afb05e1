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
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import jax
import numpy as np
from flax.core import FrozenDict, unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax import quant
from decomp_jax.config import AdapterConfig, ConfigError
from decomp_jax.methods import get

Path = tuple[str, ...]


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _is_nnx(value) -> bool:
    return any(c.__module__.startswith("flax.nnx") for c in type(value).__mro__)


def _nnx_error(value, name: str) -> TypeError:
    return TypeError(
        f"{name} is a Flax NNX {type(value).__name__}: this function works on nested dicts of arrays (Linen-style "
        f"params) and does not support NNX modules or states. For an NNX model use decomp_jax.nnx: "
        f"decomp_jax.nnx.inject(model, cfg, key) adapts its nnx.Linear / nnx.LinearGeneral layers in place "
        f"(factored), and nnx.split(model, decomp_jax.nnx.AdapterParam, ...) gives the factors. Or convert: graphdef, "
        f"state, rest = nnx.split(model, nnx.Param, ...); params = nnx.to_pure_dict(state)."
    )


def _check_tree(tree, name: str = "params") -> None:
    """Raise a clear ``TypeError`` unless ``tree`` is a nested dict (or ``FrozenDict``)."""
    if isinstance(tree, (dict, FrozenDict)):
        return
    if _is_nnx(tree):
        raise _nnx_error(tree, name)
    if isinstance(tree, AdapterConfig):
        hint = " The arguments are (params, cfg, ...): params first."
    elif isinstance(getattr(tree, "params", None), (dict, FrozenDict)):
        hint = " Pass its .params."
    elif isinstance(tree, Mapping):
        hint = " Convert it to nested dicts."
    else:
        hint = ""
    raise TypeError(
        f"{name} must be a nested dict of arrays (a Linen model's variables['params'], an HF Flax model's .params); "
        f"got {type(tree).__name__}.{hint}"
    )


def _check_args(params, cfg, name: str = "params") -> None:
    """Raise a clear ``TypeError`` unless ``params`` is a nested dict and ``cfg`` an ``AdapterConfig``."""
    _check_tree(params, name)
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


def _flat(params, name: str = "params") -> dict[Path, Any]:
    _check_tree(params, name)
    flat = flatten_dict(unfreeze(params))
    for path, value in flat.items():
        if _is_nnx(value):  # e.g. dict(nnx_state): NNX Variables or States as leaves
            raise _nnx_error(value, f"{name} leaf {path_str(path)!r}")
    return flat


# The matrix a layer holds: a dense layer's ``kernel`` (d_in, d_out), or an ``nn.Embed``'s ``embedding``
# (vocab, features), which is the kernel of the layer's one-hot input: every mergeable method adapts it
# unchanged (factored execution gathers rows of the materialised table; decomp_jax.execution).
def matrix_leaf(layer: Mapping) -> Optional[str]:
    """``'kernel'`` for a dense layer dict, ``'embedding'`` for an embedding table (a 2-D ``embedding``
    leaf in a dict with no kernel), None for anything else."""
    if "kernel" in layer:
        return "kernel"
    if "embedding" in layer and np.ndim(layer["embedding"]) == 2:
        return "embedding"
    return None


def _matrix_paths(flat: dict[Path, Any]) -> list[Path]:
    """Paths of the layers (dicts holding a kernel or an embedding table) of a flat tree, in tree order."""
    tables = set(table_paths(flat))
    return [path[:-1] for path in flat if path[-1] == "kernel" or (path[-1] == "embedding" and path[:-1] in tables)]


def table_paths(flat: dict[Path, Any]) -> list[Path]:
    """Paths of the embedding tables (2-D ``embedding`` leaves in dicts with no kernel) of a flat tree."""
    return [path[:-1] for path, value in flat.items()
            if path[-1] == "embedding" and np.ndim(value) == 2 and path[:-1] + ("kernel",) not in flat]


def layer_paths(params) -> list[Path]:
    """Paths of every layer, in tree order: each dict that holds a ``kernel`` leaf (a dense layer) or a
    2-D ``embedding`` leaf (an ``nn.Embed``)."""
    return _matrix_paths(_flat(params))


def find_targets(params, cfg: AdapterConfig) -> list[Path]:
    """Layer paths whose '/'-joined form matches ``cfg.targets`` (``re.search``).

    Raises a ``ConfigError`` listing the nearest layer paths when nothing matches.
    """
    _check_args(params, cfg)
    pattern = re.compile(cfg.targets)
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


def is_transposed(path: Path, cfg: AdapterConfig) -> bool:
    """Whether the layer at ``path`` stores its kernel as ``(d_out, d_in)`` (``cfg.transposed``)."""
    return bool(cfg.transposed) and re.search(cfg.transposed, path_str(path)) is not None


def kernel_in_axes(path: Path, cfg: AdapterConfig) -> Optional[tuple[int, ...]]:
    """The input axes of the general (``nn.DenseGeneral`` / ``nn.Einsum``) kernel at ``path`` by
    ``cfg.kernel_in_axes`` (first matching regex; ``n`` means the first ``n``), or None for a matrix kernel."""
    where = path_str(path)
    for regex, n in cfg.kernel_in_axes.items():
        if re.search(regex, where):
            return tuple(range(n)) if isinstance(n, int) else tuple(n)
    return None


def _general_layout(path: Path, shape, in_axes: tuple, cfg: AdapterConfig) -> tuple[int, list[int]]:
    """``(lead, perm)`` of the general kernel at ``path``: ``lead`` 1 when it carries a stacked layer axis
    first, and the axis permutation that puts its input axes, then its output axes, after it."""
    lead = 1 if stack_component(path, cfg) is not None and len(shape) >= len(in_axes) + 2 else 0
    rank = len(shape) - lead
    if any(a >= rank for a in in_axes) or rank - len(in_axes) < 1:
        raise ConfigError(
            f"Layer {path_str(path)!r} has a kernel of shape {tuple(shape)} but adapter.kernel_in_axes gives it input "
            f"axes {list(in_axes)}, which {'do not exist' if any(a >= rank for a in in_axes) else 'leave no output axis'}. "
            f"Give the axes its nn.DenseGeneral / nn.Einsum contracts with the input (DenseGeneral: the first len(axis)).")
    outs = [a for a in range(rank) if a not in in_axes]
    return lead, list(range(lead)) + [lead + a for a in (*in_axes, *outs)]


def oriented(kernel, path: Path, cfg: AdapterConfig):
    """The kernel in the methods' ``(d_in, d_out)`` convention (``(L, d_in, d_out)`` when stacked): a
    transpose for GPT-2's Conv1D (of the last two axes when stacked); a general kernel (``kernel_in_axes``)
    flattened to ``(prod(input axes), prod(output axes))``. ``restore_layout`` is the inverse."""
    in_axes = kernel_in_axes(path, cfg)
    if in_axes is not None:
        shape = np.shape(kernel)
        lead, perm = _general_layout(path, shape, in_axes, cfg)
        n_in = len(in_axes)
        moved = kernel if perm == sorted(perm) else jax.numpy.transpose(kernel, perm)
        shape = np.shape(moved)
        return moved.reshape(shape[:lead] + (math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:])))
    if not is_transposed(path, cfg):
        return kernel
    return kernel.T if np.ndim(kernel) == 2 else jax.numpy.swapaxes(kernel, -1, -2)


def restore_layout(matrix, path: Path, cfg: AdapterConfig, shape):
    """Inverse of ``oriented``: a ``(d_in, d_out)`` matrix back in the layer's stored layout ``shape``."""
    in_axes = kernel_in_axes(path, cfg)
    if in_axes is not None:
        _, perm = _general_layout(path, shape, in_axes, cfg)
        moved = matrix.reshape(tuple(shape[p] for p in perm))
        return moved if perm == sorted(perm) else jax.numpy.transpose(moved, np.argsort(perm))
    return oriented(matrix, path, cfg)


def bias_vector(bias, matrix, where: str = "a layer"):
    """A layer's bias as the methods see it beside ``matrix`` (its ``oriented`` kernel): ``(d_out,)``, or
    ``(L, d_out)`` when stacked (a general kernel's bias has the shape of its output axes). None stays None.
    A bias that does not fit means the adapter config misreads the kernel's layout: a clear error."""
    if bias is None:
        return None
    shape = tuple(np.shape(matrix)[:-2]) + (np.shape(matrix)[-1],)
    if np.size(bias) != math.prod(shape):
        raise ConfigError(
            f"Layer {where}: its bias of shape {tuple(np.shape(bias))} does not fit its kernel read as the (d_in, d_out) "
            f"matrix {tuple(np.shape(matrix))}, so the adapter config misreads the kernel's layout. A transformers "
            f"Conv1D kernel is stored (d_out, d_in): set `transposed` (GPT-2: '(c_attn|c_proj|c_fc)$'); an "
            f"nn.DenseGeneral / nn.Einsum kernel needs adapter.kernel_in_axes = the axes it contracts with the input.")
    return bias.reshape(shape)


def stack_component(path: Path, cfg: AdapterConfig):
    """The index in ``path`` of the scanned module's component (``cfg.stacked``, e.g. ``layers``), or None."""
    if cfg.stacked is None:
        return None
    for i, part in enumerate(path):
        if str(part) == cfg.stacked:
            return i
    return None


def is_stacked(path: Path, kernel, cfg: AdapterConfig) -> bool:
    """Whether the layer at ``path`` holds a stacked kernel ``(L, d_in, d_out)`` of a scanned layer
    (``nn.scan`` with ``variable_axes={"params": 0}``): 3-D and under a ``cfg.stacked`` component.
    Raises a ``ConfigError`` for any other kernel that is not 2-D."""
    ndim = np.ndim(kernel)
    in_axes = kernel_in_axes(path, cfg)
    if in_axes is not None:
        return _general_layout(path, np.shape(kernel), in_axes, cfg)[0] == 1
    if ndim == 2:
        return False
    where = path_str(path)
    if ndim == 3 and stack_component(path, cfg) is not None:
        return True
    if ndim == 3:
        hint = (f"If it is the stacked kernel (L, d_in, d_out) of a layer scanned with nn.scan, set adapter.stacked to "
                f"the scanned module's name (a component of the path, e.g. stacked: 'layers'; now {cfg.stacked!r}). ")
    else:
        hint = ""
    raise ConfigError(
        f"Layer {where!r} has a kernel of shape {tuple(np.shape(kernel))}; methods adapt 2-D dense kernels (d_in, d_out) "
        f"(or (d_out, d_in) for layers matched by `transposed`) and stacked kernels (L, d_in, d_out) of scanned layers. "
        f"{hint}For an nn.DenseGeneral kernel such as (embed, heads, head_dim), give its number of input axes in "
        f"adapter.kernel_in_axes (e.g. {{{where.rsplit('/', 1)[-1] + '$'!r}: 1}}); or narrow `targets` to dense layers."
    )


def per_layer(fn, stacked: bool):
    """``fn`` itself, or ``jax.vmap(fn)`` over the leading layer axis of every argument (None stays None)."""
    return jax.vmap(fn) if stacked else fn


def unrolled_path(path: Path, index: int, cfg: AdapterConfig) -> Path:
    """The path layer ``index`` of the stacked layer at ``path`` has in the unrolled model: the scanned
    component ``X`` written ``X_{index}`` (Flax's name for the i-th of a list of submodules)."""
    at = stack_component(path, cfg)
    return path[:at] + (f"{path[at]}_{index}",) + path[at + 1:]


def scan_roots(params, cfg: AdapterConfig) -> set:
    """The subtrees (paths up to the ``cfg.stacked`` component) that hold a stacked kernel of a targeted layer."""
    roots = set()
    if cfg.stacked is None:
        return roots
    targets = re.compile(cfg.targets)
    for path, value in _flat(params).items():
        layer = path[:-1]
        if path[-1] == "kernel" and np.ndim(value) == 3 and targets.search(path_str(layer)):
            at = stack_component(layer, cfg)
            if at is not None:
                roots.add(layer[:at + 1])
    return roots


def _root_of(path: Path, roots) -> Any:
    for root in roots:
        if path[:len(root)] == root:
            return root
    return None


def unstack_view(tree, roots) -> dict:
    """``tree`` with every leaf under a scan root (``scan_roots``) split along its leading axis into the
    unrolled model's leaves (``.../layers_{i}/...``): what a per-layer algorithm sees as the unrolled model."""
    out = {}
    for path, value in _flat(tree).items():
        root = _root_of(path, roots)
        if root is None:
            out[path] = value
            continue
        n = len(root)
        for i in range(value.shape[0]):
            out[root[:-1] + (f"{root[-1]}_{i}",) + path[n:]] = value[i]
    return unflatten_dict(out)


def restack_view(view, roots, like) -> dict:
    """Inverse of ``unstack_view``: the leaves of ``like`` (the stacked tree) read back from ``view``."""
    flat_view = _flat(view)
    out = {}
    for path, value in _flat(like).items():
        root = _root_of(path, roots)
        if root is None:
            out[path] = flat_view[path]
            continue
        n = len(root)
        out[path] = jax.numpy.stack(
            [flat_view[root[:-1] + (f"{root[-1]}_{i}",) + path[n:]] for i in range(value.shape[0])])
    return unflatten_dict(out)


def unrolled_schedule(schedule, cfg: AdapterConfig):
    """A method's ``Schedule`` run on the unrolled view of stacked layers (``unstack_view``): its state
    and decisions equal those of the unrolled model; the params it returns are stacked again. Unchanged
    for trees without stacked layers."""

    def init(params):
        roots = scan_roots(params, cfg)
        return schedule.init(unstack_view(params, roots) if roots else params)

    def update(state, step, params, grads):
        roots = scan_roots(params, cfg)
        if not roots:
            return schedule.update(state, step, params, grads)
        state, new = schedule.update(state, step, unstack_view(params, roots), unstack_view(grads, roots))
        return state, restack_view(new, roots, params)

    return schedule._replace(init=init, update=update)


def _layer_key(rng: jax.Array, path: Path) -> jax.Array:
    """A per-layer key that depends on the layer's path, not on the order of traversal."""
    return jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


def inject(params, cfg: AdapterConfig, rng: jax.Array, name: Optional[str] = None):
    """Add the method's factor leaves beside the ``kernel`` of every targeted layer.

    Pure: returns a new tree; ``params`` is not modified. The adapted model equals the base
    model at init (for every method whose spec says so). ``name``: add the adapter beside those the
    tree already holds, under that name (``decomp_jax.named``; its factors are those injecting it into
    the base alone with the same ``rng`` gives).
    """
    _check_args(params, cfg)
    if rng is None or isinstance(rng, (int, np.integer)):
        raise TypeError(f"rng must be a JAX PRNG key, e.g. jax.random.PRNGKey(0); got {rng!r}.")
    from decomp_jax import named

    if name is not None or named.has_named(params):
        return named.attach(params, inject(named.select(params, None), cfg, rng), cfg, name or named.DEFAULT)
    method = get(cfg.method)
    if method.kind == "prompt":
        return _inject_prompt(params, cfg, rng)
    flat = _flat(params)
    factor_dtype = jax.numpy.dtype(cfg.factor_dtype)
    for path in find_targets(params, cfg):
        leaf = "kernel" if path + ("kernel",) in flat else "embedding"
        original = flat[path + (leaf,)]
        stored = quant.dequantize(original)  # a quantized base: factors start from the dequantized kernel
        kernel = oriented(stored, path, cfg)
        where = path_str(path)
        if leaf == "embedding":
            _check_embedding_target(method, where)
        stacked = is_stacked(path, stored, cfg)
        d_in, d_out = kernel.shape[-2:]
        lcfg = cfg.for_layer(where)  # rank_pattern / alpha_pattern
        if method.uses_rank and lcfg.rank > min(d_in, d_out):
            raise ConfigError(
                f"rank={lcfg.rank} is larger than min(d_in, d_out)={min(d_in, d_out)} for layer "
                f"{where!r} (kernel {tuple(kernel.shape)}). Use rank <= {min(d_in, d_out)}."
            )
        clash = [n for n in method.factor_names if path + (n,) in flat]
        if clash:
            raise ConfigError(
                f"Layer {where!r} already holds {clash}: these params are already adapted. "
                f"Inject into the base params, or merge() first."
            )
        base_dtype = kernel.dtype
        bias = bias_vector(flat.get(path + ("bias",)), kernel, repr(where))
        # factors are made from the kernel in the wider of its dtype and factor_dtype (the init of float32
        # factors over a bfloat16 kernel runs in float32; PiSSA's residual of a float32 kernel stays float32)
        work_dtype = jax.numpy.promote_types(base_dtype, factor_dtype)
        work = kernel.astype(work_dtype) if jax.numpy.issubdtype(base_dtype, jax.numpy.floating) else kernel
        work_bias = None if bias is None else bias.astype(work_dtype)
        if stacked:  # layer i's key is the unrolled layer's: factors equal those of the unrolled model
            keys = jax.numpy.stack([_layer_key(rng, unrolled_path(path, i, cfg)) for i in range(kernel.shape[0])])
        else:
            keys = _layer_key(rng, path)
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


# the trainable rows of an embedding table (AdapterConfig.trainable_tokens): (n, features), written over
# rows cfg.token_ids(path) of the table (PEFT's TrainableTokens: trainable_tokens_delta)
TOKEN_LEAF = "trainable_tokens_delta"


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


def write_token_rows(table, delta, ids):
    """``table`` with rows ``ids`` replaced by ``delta`` (in the table's dtype)."""
    return jax.numpy.asarray(table).at[np.asarray(ids)].set(jax.numpy.asarray(delta).astype(table.dtype))


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


def _by_layer(flat: dict[Path, Any]) -> dict[Path, dict]:
    """The leaves of ``flat`` grouped by the dict that holds them: ``{dict path: {leaf name: value}}``."""
    layers: dict[Path, dict] = {}
    for path, value in flat.items():
        layers.setdefault(path[:-1], {})[path[-1]] = value
    return layers


_WHOLE_TREE = ("Pass the whole adapted tree (e.g. dj.combine(trainable, buffers, frozen) of dj.partition(params, cfg), "
               "or dj.combine(trainable, frozen) of dj.split) and the AdapterConfig it was injected with.")


def adapted_layers(params, cfg: AdapterConfig) -> Iterator[tuple[Path, dict]]:
    """``(path, layer_dict)`` for every layer that holds a ``kernel`` and all of the method's factor leaves.

    A targeted layer (``cfg.targets`` matches its path) that holds only some of them, or factor leaves
    but no kernel, is part of an adapted tree (the trainable half of a split, say): that raises a
    ``ConfigError`` naming the layer, instead of skipping it. A layer with none is not adapted.
    """
    _check_args(params, cfg)
    method = get(cfg.method)
    names = method.factor_names
    if not names or method.kind == "prompt":  # prompt methods adapt no layer
        return iter(())
    flat = _flat(params)
    layers = _by_layer(flat)
    targets = re.compile(cfg.targets)
    for path, layer in layers.items():
        present = [n for n in names if n in layer]
        if not present or not targets.search(path_str(path)):
            continue
        missing = [n for n in names if n not in layer]
        if matrix_leaf(layer) is None:
            raise ConfigError(
                f"Layer {path_str(path)!r} holds {cfg.method} factor leaves {present} but no kernel: these params are "
                f"only part of the adapted tree. {_WHOLE_TREE}"
            )
        if missing:
            raise ConfigError(
                f"Layer {path_str(path)!r} holds {cfg.method} factor leaves {present} but lacks {missing}: these params "
                f"are only part of the adapted tree. {_WHOLE_TREE}"
            )
    return iter([(path, layers[path]) for path in _matrix_paths(flat) if all(n in layers[path] for n in names)])


def check_mergeable(method) -> None:
    if method.kind == "prompt":
        raise ConfigError(
            f"Method {method.name!r} is not mergeable: it adds trainable virtual tokens / key-value prefixes to "
            f"the model's input, not a new kernel. Keep the params as they are and run it with "
            f"adapt(model.apply, cfg) (factored)."
        )
    if not method.mergeable:
        from decomp_jax.methods import registry

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
    _check_single(params, "merge")
    method = get(cfg.method)
    check_mergeable(method)
    flat = _flat(params)
    _check_foreign(flat, cfg, "merge")
    for path, layer in adapted_layers(params, cfg):
        factors = {n: layer[n] for n in method.factor_names}
        leaf = matrix_leaf(layer)
        layer = {**layer, leaf: quant.dequantize(layer[leaf])}  # a quantized base merges into its dequantized kernels
        stacked = is_stacked(path, layer[leaf], cfg)
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
    from decomp_jax import named

    if named.has_named(params):
        held = named.adapter_names(params)
        raise ConfigError(f"params hold several adapters {held}; {what} acts on one: pass dj.select(params, name) "
                          f"(that adapter alone over the base) with its AdapterConfig.")


def _check_foreign(flat: dict[Path, Any], cfg: AdapterConfig, what: str) -> None:
    """Raise when a targeted layer holds factor leaves of another method than ``cfg.method``: ``what``
    would leave them behind as stray leaves."""
    from decomp_jax.methods import registry

    methods = registry().values()
    own = set(get(cfg.method).factor_names)
    every = {n for m in methods for n in m.factor_names}
    targets = re.compile(cfg.targets)
    for path, layer in _by_layer(flat).items():
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
    flat = _flat(params)
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
    _check_tree(adapter, "adapter")
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
    flat, flat_adapter = _flat(merged, "merged"), _flat(adapter, "adapter")
    layers = sorted({path[:-1] for path in flat_adapter if path[-1] in method.factor_names})
    by_layer = _by_layer(flat)
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
        leaf = matrix_leaf(by_layer.get(path, {}))
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
        stacked = is_stacked(path, stored, cfg)
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
    leaves = get(cfg.method).init(_layer_key(rng, (cfg.method,)), params, cfg)
    return {**unfreeze(params), cfg.method: leaves}


def set_leaves(params, changes: dict) -> dict:
    """A new tree with the leaves at the given paths (tuples) replaced."""
    flat = _flat(params)
    unknown = [path_str(p) for p in changes if p not in flat]
    if unknown:
        raise KeyError(f"set_leaves: no leaves at {unknown[:5]}; it replaces existing leaves only.")
    flat.update(changes)
    return unflatten_dict(flat)


def trainable_mask(params, cfg: AdapterConfig, name: Optional[str] = None):
    """A bool pytree with the structure of ``params``: True where a leaf trains.

    Trainable: the method's factor leaves (not its buffers), the biases of targeted layers for
    methods that train biases (BitFit), and base leaves whose path matches ``cfg.train_extra``.
    In a tree of several adapters (``decomp_jax.named``), those of adapter ``name`` (default: the
    unnamed one) only.
    """
    _check_args(params, cfg)
    from decomp_jax import named

    if name is not None or named.has_named(params):
        return named.named_mask(params, cfg, name or named.DEFAULT)
    method = get(cfg.method)
    flat = _flat(params)
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


def split(params, mask) -> tuple[dict, dict]:
    """Partition ``params`` by a bool ``mask`` into ``(trainable, frozen)`` nested dicts.

    Each half holds only its own leaves, so gradients and optimizer state exist only for the
    trainable half (the equinox ``partition`` idea, with leaves dropped instead of set to None).
    """
    flat, flat_mask = _flat(params), _flat(mask, "mask")
    unmasked = [path_str(p) for p in flat if p not in flat_mask]
    if unmasked:
        raise ValueError(
            f"mask has no entry for leaves {unmasked[:5]} of params: build the mask from the same params, "
            f"mask = dj.trainable_mask(params, cfg)."
        )
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return unflatten_dict(trainable), unflatten_dict(frozen)


def partition(params, cfg: AdapterConfig, name: Optional[str] = None) -> tuple[dict, dict, dict]:
    """``(trainable, buffers, frozen)``: ``buffers`` holds the buffers that a stateful method's
    schedule rewrites during training (LoRA-Dash's directions); it lives in the train state and is
    empty for every other method (their buffers are constants and stay in ``frozen``). ``name``: of
    that adapter of a tree of several (``trainable_mask``)."""
    _check_args(params, cfg)
    trainable, frozen = split(params, trainable_mask(params, cfg, name))
    method = get(cfg.method)
    if method.schedule is None or not method.buffers:
        return trainable, {}, frozen
    if name is not None:
        _check_single(params, f"partition of the stateful method {cfg.method!r}")
    flat = _flat(frozen)
    adapted = {path for path, _ in adapted_layers(params, cfg)}
    is_buffer = {p: (p[:-1] in adapted and p[-1] in method.buffers) for p in flat}
    buffers, frozen = split(frozen, unflatten_dict(is_buffer))
    return trainable, buffers, frozen


def combine(*trees) -> dict:
    """Inverse of ``split``: the union of disjoint nested dicts."""
    flat: dict[Path, Any] = {}
    for tree in trees:
        for path, value in _flat(tree, "each tree passed to combine").items():
            if path in flat:
                raise ValueError(
                    f"leaf {path_str(path)!r} appears in more than one tree; combine takes disjoint trees, such as "
                    f"the halves of dj.split(params, mask) or the three parts of dj.partition(params, cfg)."
                )
            flat[path] = value
    return unflatten_dict(flat)


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays or ``jax.ShapeDtypeStruct``s."""
    return int(sum(math.prod(getattr(x, "shape", np.shape(x)))
                   for x in jax.tree_util.tree_leaves(tree, is_leaf=quant.is_quantized)))


def trainable_count(base_params, cfg: AdapterConfig) -> int:
    """Trainable parameters of ``cfg`` on ``base_params``, from shapes only (``jax.eval_shape``:
    no SVD or init is computed)."""
    shapes = jax.eval_shape(lambda p: inject(p, cfg, jax.random.PRNGKey(0)), base_params)
    return count_params(split(shapes, trainable_mask(shapes, cfg))[0])
