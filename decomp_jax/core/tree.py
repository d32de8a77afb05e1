"""Parameter trees as paths: flatten, group by layer, read a kernel in the methods' ``(d_in, d_out)``
layout, stacked (scanned) layers and their unrolled view, split and combine. No method registry and no
config class here: a ``cfg`` is read for its fields (``transposed``, ``kernel_in_axes``, ``stacked``).

A *layer* is a dict that holds a 2-D ``kernel`` (Flax ``Dense`` layout ``(d_in, d_out)``) or an
``nn.Embed``'s 2-D ``embedding`` table ``(vocab, features)``, the kernel of a one-hot input.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import jax
import numpy as np
from flax.core import FrozenDict, unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax import quant
from decomp_jax.errors import ConfigError

if TYPE_CHECKING:  # annotations only
    from decomp_jax.core.config import AdapterConfig


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


def check_tree(tree, name: str = "params") -> None:
    """Raise a clear ``TypeError`` unless ``tree`` is a nested dict (or ``FrozenDict``)."""
    if isinstance(tree, (dict, FrozenDict)):
        return
    if _is_nnx(tree):
        raise _nnx_error(tree, name)
    if type(tree).__name__ == "AdapterConfig":
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


def flat_params(params, name: str = "params") -> dict[Path, Any]:
    check_tree(params, name)
    flat = flatten_dict(unfreeze(params))
    for path, value in flat.items():
        if _is_nnx(value):  # e.g. dict(nnx_state): NNX Variables or States as leaves
            raise _nnx_error(value, f"{name} leaf {path_str(path)!r}")
    return flat


# The matrix a layer holds: a dense layer's ``kernel`` (d_in, d_out), or an ``nn.Embed``'s ``embedding``
# (vocab, features), which is the kernel of the layer's one-hot input: every mergeable method adapts it
# unchanged (factored execution gathers rows of the materialised table; decomp_jax.core.execution).
def matrix_leaf(layer: Mapping) -> Optional[str]:
    """``'kernel'`` for a dense layer dict, ``'embedding'`` for an embedding table (a 2-D ``embedding``
    leaf in a dict with no kernel), None for anything else."""
    if "kernel" in layer:
        return "kernel"
    if "embedding" in layer and np.ndim(layer["embedding"]) == 2:
        return "embedding"
    return None


def matrix_paths(flat: dict[Path, Any]) -> list[Path]:
    """Paths of the layers (dicts holding a kernel or an embedding table) of a flat tree, in tree order."""
    tables = set(table_paths(flat))
    return [path[:-1] for path in flat if path[-1] == "kernel" or (path[-1] == "embedding" and path[:-1] in tables)]


def table_paths(flat: dict[Path, Any]) -> list[Path]:
    """Paths of the embedding tables (2-D ``embedding`` leaves in dicts with no kernel) of a flat tree."""
    return [path[:-1] for path, value in flat.items()
            if path[-1] == "embedding" and np.ndim(value) == 2 and path[:-1] + ("kernel",) not in flat]


def kernel_leaf(path: Path, cfg: AdapterConfig) -> Optional[str]:
    """The parameter ``cfg.kernel_leaf`` names as the matrix of the layer at ``path`` (first matching regex), or None."""
    where = path_str(path)
    return next((leaf for regex, leaf in cfg.kernel_leaf.items() if re.search(regex, where)), None)


def kernel_view(params, cfg: AdapterConfig) -> tuple[dict, dict]:
    """``(view, renamed)``: ``params`` with each layer's ``cfg.kernel_leaf`` leaf (a 2-D or larger parameter
    of a layer without a ``kernel``: another library's ``w``) under the name ``kernel``, and
    ``{layer path: its leaf name}``. ``named_back`` undoes it."""
    flat = flat_params(params)
    renamed = {}
    if cfg.kernel_leaf:
        for path, leaves in by_layer(flat).items():
            leaf = kernel_leaf(path, cfg)
            if leaf is not None and "kernel" not in leaves and leaf in leaves and np.ndim(leaves[leaf]) >= 2:
                renamed[path] = leaf
    if not renamed:
        return params, renamed
    return unflatten_dict({(p[:-1] + ("kernel",) if renamed.get(p[:-1]) == p[-1] else p): v
                           for p, v in flat.items()}), renamed


def named_back(tree, renamed: dict):
    """Inverse of ``kernel_view``: each renamed layer's ``kernel`` (of ``tree``, any tree with those paths:
    params, a mask, a partition) under its own name again."""
    if not renamed:
        return tree
    flat = flat_params(tree)
    return unflatten_dict({(p[:-1] + (renamed[p[:-1]],) if p[-1] == "kernel" and p[:-1] in renamed else p): v
                           for p, v in flat.items()})


def layer_paths(params) -> list[Path]:
    """Paths of every layer, in tree order: each dict that holds a ``kernel`` leaf (a dense layer) or a
    2-D ``embedding`` leaf (an ``nn.Embed``)."""
    return matrix_paths(flat_params(params))


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


def general_layout(path: Path, shape, in_axes: tuple, cfg: AdapterConfig) -> tuple[int, list[int]]:
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
        lead, perm = general_layout(path, shape, in_axes, cfg)
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
        _, perm = general_layout(path, shape, in_axes, cfg)
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


def _component(path: Path, name: Optional[str]):
    if name is None:
        return None
    for i, part in enumerate(path):
        if str(part) == name:
            return i
    return None


def stack_component(path: Path, cfg: AdapterConfig):
    """The index in ``path`` of the scanned module's component (``cfg.stacked``, e.g. ``layers``), or None.
    A component followed by an index (``layers/0/...``: a list of layers, as NNX models hold them) is not
    a scan."""
    at = _component(path, cfg.stacked)
    if at is not None and at + 1 < len(path) and str(path[at + 1]).isdigit():
        return None
    return at


def expert_component(path: Path, cfg: AdapterConfig):
    """The index in ``path`` of the experts' module component (``cfg.experts``, e.g. ``experts``), or None."""
    return _component(path, cfg.experts)


def lead_axes(path: Path, kernel, cfg: AdapterConfig) -> int:
    """How many leading axes the kernel at ``path`` has before its matrix: a stacked layer axis ``L``
    (``nn.scan`` with ``variable_axes={"params": 0}``, under a ``cfg.stacked`` component) and an expert
    axis ``E`` (under a ``cfg.experts`` component), in that order: 0, 1 or 2. Raises a ``ConfigError``
    for a kernel whose extra axes no such component explains."""
    ndim = np.ndim(kernel)
    in_axes = kernel_in_axes(path, cfg)
    if in_axes is not None:
        return general_layout(path, np.shape(kernel), in_axes, cfg)[0]
    if ndim == 2:
        return 0
    extra = (stack_component(path, cfg) is not None) + (expert_component(path, cfg) is not None)
    if ndim - 2 <= extra:
        return ndim - 2
    where = path_str(path)
    if ndim == 3:
        hint = (f"If it is the stacked kernel (L, d_in, d_out) of a layer scanned with nn.scan, set adapter.stacked to "
                f"the scanned module's name (a component of the path, e.g. stacked: 'layers'; now {cfg.stacked!r}); if it "
                f"holds a mixture's experts (E, d_in, d_out), set adapter.experts to their module's name (now "
                f"{getattr(cfg, 'experts', None)!r}). ")
    else:
        hint = ""
    raise ConfigError(
        f"Layer {where!r} has a kernel of shape {tuple(np.shape(kernel))}; methods adapt 2-D dense kernels (d_in, d_out) "
        f"(or (d_out, d_in) for layers matched by `transposed`), stacked kernels (L, d_in, d_out) of scanned layers and "
        f"experts' kernels (E, d_in, d_out). {hint}For an nn.DenseGeneral kernel such as (embed, heads, head_dim), give "
        f"its number of input axes in adapter.kernel_in_axes (e.g. {{{where.rsplit('/', 1)[-1] + '$'!r}: 1}}); or "
        f"narrow `targets` to dense layers."
    )


def is_stacked(path: Path, kernel, cfg: AdapterConfig) -> bool:
    """Whether the kernel at ``path`` has leading axes (stacked layers, experts) before its matrix."""
    return lead_axes(path, kernel, cfg) > 0


def has_experts(path: Path, kernel, cfg: AdapterConfig) -> bool:
    """Whether the kernel at ``path`` holds a mixture's experts: an expert axis (the innermost leading axis)
    before its matrix. A 3-D kernel under both components is a scanned layer's experts sliced by its scan."""
    return expert_component(path, cfg) is not None and lead_axes(path, kernel, cfg) > 0


def per_layer(fn, lead):
    """``fn`` itself, or ``fn`` under one ``jax.vmap`` per leading axis (``lead``: 0, 1, 2 or a bool) of
    every argument (None stays None)."""
    for _ in range(int(lead)):
        fn = jax.vmap(fn)
    return fn


def factor_keys(rng: jax.Array, path: Path, kernel, cfg: AdapterConfig) -> jax.Array:
    """The keys a layer's factors are drawn with, one per leading axis entry: a layer's key depends on its
    path (``layer_key``); stacked layer ``i``'s is that of the unrolled layer (``unrolled_path``), so the
    factors equal the unrolled model's; expert ``e``'s is its layer's key folded with ``e``."""
    lead = lead_axes(path, kernel, cfg)
    shape = np.shape(kernel)
    experts = has_experts(path, kernel, cfg)
    stacked = lead - int(experts)

    def expert_keys(key):
        return jax.numpy.stack([jax.random.fold_in(key, e) for e in range(shape[stacked])]) if experts else key

    if stacked:
        return jax.numpy.stack([expert_keys(layer_key(rng, unrolled_path(path, i, cfg))) for i in range(shape[0])])
    return expert_keys(layer_key(rng, path))


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
    for path, value in flat_params(params).items():
        layer = path[:-1]
        if path[-1] == "kernel" and np.ndim(value) == 3 and targets.search(path_str(layer)):
            at = stack_component(layer, cfg)
            if at is not None:
                roots.add(layer[:at + 1])
    return roots


def root_of(path: Path, roots) -> Any:
    for root in roots:
        if path[:len(root)] == root:
            return root
    return None


def unstack_view(tree, roots) -> dict:
    """``tree`` with every leaf under a scan root (``scan_roots``) split along its leading axis into the
    unrolled model's leaves (``.../layers_{i}/...``): what a per-layer algorithm sees as the unrolled model."""
    out = {}
    for path, value in flat_params(tree).items():
        root = root_of(path, roots)
        if root is None:
            out[path] = value
            continue
        n = len(root)
        for i in range(value.shape[0]):
            out[root[:-1] + (f"{root[-1]}_{i}",) + path[n:]] = value[i]
    return unflatten_dict(out)


def restack_view(view, roots, like) -> dict:
    """Inverse of ``unstack_view``: the leaves of ``like`` (the stacked tree) read back from ``view``."""
    flat_view = flat_params(view)
    out = {}
    for path, value in flat_params(like).items():
        root = root_of(path, roots)
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


def layer_key(rng: jax.Array, path: Path) -> jax.Array:
    """A per-layer key that depends on the layer's path, not on the order of traversal."""
    return jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


# the trainable rows of an embedding table (AdapterConfig.trainable_tokens): (n, features), written over
# rows cfg.token_ids(path) of the table (PEFT's TrainableTokens: trainable_tokens_delta)
TOKEN_LEAF = "trainable_tokens_delta"


def write_token_rows(table, delta, ids):
    """``table`` with rows ``ids`` replaced by ``delta`` (in the table's dtype)."""
    return jax.numpy.asarray(table).at[np.asarray(ids)].set(jax.numpy.asarray(delta).astype(table.dtype))


def by_layer(flat: dict[Path, Any]) -> dict[Path, dict]:
    """The leaves of ``flat`` grouped by the dict that holds them: ``{dict path: {leaf name: value}}``."""
    layers: dict[Path, dict] = {}
    for path, value in flat.items():
        layers.setdefault(path[:-1], {})[path[-1]] = value
    return layers


def set_leaves(params, changes: dict) -> dict:
    """A new tree with the leaves at the given paths (tuples) replaced."""
    flat = flat_params(params)
    unknown = [path_str(p) for p in changes if p not in flat]
    if unknown:
        raise KeyError(f"set_leaves: no leaves at {unknown[:5]}; it replaces existing leaves only.")
    flat.update(changes)
    return unflatten_dict(flat)


def split(params, mask) -> tuple[dict, dict]:
    """Partition ``params`` by a bool ``mask`` into ``(trainable, frozen)`` nested dicts.

    Each half holds only its own leaves, so gradients and optimizer state exist only for the
    trainable half (the equinox ``partition`` idea, with leaves dropped instead of set to None).
    """
    flat, flat_mask = flat_params(params), flat_params(mask, "mask")
    unmasked = [path_str(p) for p in flat if p not in flat_mask]
    if unmasked:
        raise ValueError(
            f"mask has no entry for leaves {unmasked[:5]} of params: build the mask from the same params, "
            f"mask = dj.trainable_mask(params, cfg)."
        )
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return unflatten_dict(trainable), unflatten_dict(frozen)


def combine(*trees) -> dict:
    """Inverse of ``split``: the union of disjoint nested dicts."""
    flat: dict[Path, Any] = {}
    for tree in trees:
        for path, value in flat_params(tree, "each tree passed to combine").items():
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


def layers_with(params, cfg: AdapterConfig, names: Sequence[str]) -> Iterator[tuple[Path, dict]]:
    """``(path, layer_dict)`` for every layer that holds a kernel and all the factor leaves ``names`` (a
    method's ``factor_names``). A layer ``cfg.targets`` matches that holds only some of them, or factor
    leaves but no kernel, is part of an adapted tree (the trainable half of a split, say): that raises a
    ``ConfigError`` naming the layer, instead of skipping it. A layer with none is not adapted."""
    flat = flat_params(params)
    layers = by_layer(flat)
    targets = re.compile(cfg.targets)
    for path, layer in layers.items():
        present = [n for n in names if n in layer]
        if not present or not targets.search(path_str(path)):
            continue
        missing = [n for n in names if n not in layer]
        if matrix_leaf(layer) is None:
            raise ConfigError(
                f"Layer {path_str(path)!r} holds {cfg.method} factor leaves {present} but no kernel: these params are "
                f"only part of the adapted tree. {WHOLE_TREE}"
            )
        if missing:
            raise ConfigError(
                f"Layer {path_str(path)!r} holds {cfg.method} factor leaves {present} but lacks {missing}: these params "
                f"are only part of the adapted tree. {WHOLE_TREE}"
            )
    return iter([(path, layers[path]) for path in matrix_paths(flat) if all(n in layers[path] for n in names)])


WHOLE_TREE = ("Pass the whole adapted tree (e.g. dj.combine(trainable, buffers, frozen) of dj.partition(params, cfg), "
              "or dj.combine(trainable, frozen) of dj.split) and the AdapterConfig it was injected with.")


# fused projections and their parts: a pattern naming both serves both layouts (Phi-3 beside Llama)
FUSED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def absent_names(params, targets: str) -> list[str]:
    """The layer names ``targets`` spells out as alternatives (``(q_proj|v_proj)``) that no layer path of
    ``params`` contains: a pattern that adapts fewer kinds of layer than it names. A fused name whose
    parts the model has (``qkv_proj`` beside ``q_proj``), or a part whose fused layer it has, is not
    counted: one pattern then serves both layouts."""
    literal = re.sub(r"\(\?<?[!=].*?\)|\\.", " ", targets)  # lookarounds and escapes say nothing of names
    named = {w.strip("_") for group in re.findall(r"\(([\w|]+)\)", literal) for w in group.split("|")}
    named |= {w.strip("_") for w in re.split(r"[^\w]+", literal) if len(w) > 1} if "|" in literal else set()
    paths = [path_str(p) for p in layer_paths(params)]

    def present(w: str) -> bool:  # a short name (q, k, v) must be a whole part of a name; a longer one anywhere
        return any((w in p) if len(w) > 2 else re.search(rf"(^|/|_){re.escape(w)}($|/|_)", p) for p in paths)
    absent = {w for w in named if w and not present(w)}
    for fused, parts in FUSED_NAMES.items():
        if fused in absent and any(p in named and p not in absent for p in parts):
            absent.discard(fused)
        if fused in named and fused not in absent:
            absent.difference_update(parts)
    return sorted(absent)
