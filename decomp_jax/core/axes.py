"""The axes of factor leaves relative to their kernel, and Flax's boxed parameters.

A factor's axes play roles relative to its layer's ``(d_in, d_out)`` matrix: ``"in"``, ``"out"`` or None
(a rank axis); leading stacked-layer and expert axes are the kernel's own. From the kernel's per-axis
entries (mesh axes of a ``PartitionSpec``, or logical axis names of a Flax box) ``factor_entries`` gives
each factor's, so factors are sharded (``parallel.sharding``) and named (``rebox``) as their kernel.

Boxed params: MaxText/T5X-style Linen models create parameters with ``nn.with_logical_partitioning``
(or ``nn.with_partitioning``), so ``model.init`` returns ``nn.LogicallyPartitioned`` / ``nn.Partitioned``
boxes holding the arrays and their axis names. The adapter functions read through them (``unbox``) and
give back boxed trees (``rebox``): base leaves keep their boxes, new factor leaves get a box of the
kernel's kind with names from ``factor_entries``, so ``nn.get_partition_spec``, logical axis rules and
``sharding.param_specs`` agree.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.core.tree import (
    Path, general_layout, is_transposed, kernel_in_axes, layers_with, lead_axes, matrix_leaf,
)

# per factor leaf, the role of each axis: "in" (the kernel's d_in), "out" (its d_out), None (rank or
# another small axis). Checked against the shapes; unknown names are derived from sizes.
FACTOR_AXES: dict[str, tuple] = {
    "lora_a": ("in", None), "lora_b": (None, "out"), "lora_e": (None,), "lora_g": (None, None),
    "scale_in": ("in",), "scale_out": ("out",), "magnitude": ("out",),
    "sigma": (None,), "u": ("in", None), "vt": (None, "out"), "sigma0": (None,), "delta": (None,),
    "adapter_u": ("in", None), "adapter_v": (None, "out"), "u_r": ("in", None), "s_r": (None,), "vt_r": (None, "out"),
    "dash": (None,), "dash_u": ("in", None), "dash_vt": (None, "out"),
    "down": ("out", None), "down_bias": (None,), "up": (None, "out"), "up_bias": ("out",), "lora_bias": ("out",),
}


def factor_roles(name: str, shape, d_in: int, d_out: int, declared: Optional[tuple] = None) -> tuple:
    """The role ("in", "out" or None) of each axis of factor leaf ``name`` of a ``(d_in, d_out)`` kernel
    (``declared``: the method's own roles for it, else the table above)."""
    declared = declared or FACTOR_AXES.get(name)
    size_of = {"in": d_in, "out": d_out, None: None}
    if declared is not None and len(declared) == len(shape) and all(
            r is None or size_of[r] == s for r, s in zip(declared, shape)):
        return declared
    # by size: unambiguous only when d_in != d_out
    return tuple("in" if s == d_in and s != d_out else "out" if s == d_out and s != d_in else None for s in shape)


def _major(entries):
    """The entry of a group of axes flattened into one: the first axis's when the others have none (its
    shards are then contiguous blocks of the flattened axis), else None."""
    return entries[0] if all(e is None for e in entries[1:]) else None


def factor_entries(path: Path, layer: dict, kernel_entries, method, cfg) -> dict[str, tuple]:
    """``{factor name: per-axis entries}`` of the adapted ``layer`` at ``path`` from its kernel's (or
    table's) per-axis ``kernel_entries`` in the stored layout: leading (stacked, expert) axes keep the
    kernel's entry; the others follow the axis of ``d_in`` / ``d_out`` they span (a general kernel's
    flattened groups: their first axis's), rank axes get None."""
    declared = method.factor_axes(cfg.for_layer("/".join(map(str, path)))) if method.factor_axes else {}
    leaf = matrix_leaf(layer)
    shape = tuple(np.shape(layer[leaf]))
    lead = lead_axes(path, layer[leaf], cfg)
    entries = list(kernel_entries) + [None] * (len(shape) - len(tuple(kernel_entries)))
    in_axes = kernel_in_axes(path, cfg)
    transposed = is_transposed(path, cfg)
    if in_axes is not None:
        _, perm = general_layout(path, shape, in_axes, cfg)
        ins, outs = perm[lead:lead + len(in_axes)], perm[lead + len(in_axes):]
        d_in, d_out = math.prod(shape[a] for a in ins), math.prod(shape[a] for a in outs)
        by_role = {"in": _major([entries[a] for a in ins]), "out": _major([entries[a] for a in outs])}
    else:
        d_in, d_out = shape[lead:][::-1] if transposed else shape[lead:]
        first, second = entries[lead:lead + 2]
        by_role = {"in": second, "out": first} if transposed else {"in": first, "out": second}
    by_role[None] = None
    out = {}
    for name in method.factor_names:
        roles = factor_roles(name, np.shape(layer[name])[lead:], d_in, d_out, declared.get(name))
        out[name] = tuple(entries[:lead]) + tuple(by_role[r] for r in roles)
    return out


# --- Flax boxes ------------------------------------------------------------------------------------------

def is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)  # nn.LogicallyPartitioned is a subclass


def has_boxes(tree) -> bool:
    return any(is_box(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_box))


def unbox(tree):
    """``tree`` with every Flax box replaced by the array it holds."""
    return jax.tree.map(lambda x: x.value if is_box(x) else x, unfreeze(tree), is_leaf=is_box)


def boxes(tree) -> dict[Path, nn.Partitioned]:
    """The boxes of ``tree`` by leaf path."""
    flat = flatten_dict(unfreeze(tree), is_leaf=lambda _, x: is_box(x))
    return {p: v for p, v in flat.items() if is_box(v)}


def rebox(tree, boxed_like, cfg=None, method=None) -> dict:
    """``tree`` (unboxed) with the boxes of ``boxed_like`` put back on the leaves of the same path, and,
    with ``cfg`` and ``method``, each new factor leaf of a layer whose kernel is boxed boxed alike, its
    names from ``factor_entries``. Unchanged when ``boxed_like`` holds no box."""
    old = boxes(boxed_like)
    if not old:
        return tree
    flat = flatten_dict(unfreeze(tree))
    for path, value in flat.items():
        if path in old:
            flat[path] = old[path].replace_boxed(value)
    if cfg is not None and method is not None:
        for path, layer in layers_with(tree, cfg, method.factor_names):
            box = old.get(path + (matrix_leaf(layer),))
            if box is None:
                continue
            for name, names in factor_entries(path, layer, box.names, method, cfg).items():
                if path + (name,) not in old:
                    flat[path + (name,)] = box.replace(value=flat[path + (name,)], names=names)
    return unflatten_dict(flat)
