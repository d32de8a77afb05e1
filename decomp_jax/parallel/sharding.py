"""Device meshes and sharding rules: every leaf of an adapted model, its train state and the batch
gets a ``NamedSharding`` on a ``jax.sharding.Mesh`` (JAX's own machinery; GSPMD does the rest).

- ``make_mesh({"data": -1, "fsdp": 1, "tensor": 1})``: -1 takes the remaining devices.
- Partition rules: an ordered list of ``(path regex, spec)``; ``re.search`` against the '/'-joined
  param path, first match wins. A spec is a ``PartitionSpec`` or a tuple with one entry per array
  axis: a mesh axis name, a tuple of them, a logical axis name (mapped by ``logical_rules``), or
  None. ``RULES[arch]`` holds presets (bert, roberta, gpt2, llama): Megatron-style tensor
  parallelism (q/k/v/gate/up split on the output axis, o/down on the input axis, embeddings on
  the vocabulary axis) combined with FSDP on the other axis. Leaves no rule matches are FSDP
  sharded on their largest divisible axis when they hold ``>= fsdp_min_size`` elements. An axis is
  only sharded when its size is divisible by the mesh axes' product; otherwise it falls back to
  replicated on that axis (a tiny model never errors). Flax boxed params (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``) give their own names.
- Factor leaves derive their spec from their kernel's: an axis of size ``d_in`` follows the
  kernel's input axis, ``d_out`` its output axis (``FACTOR_AXES`` declares which is which for the
  registered methods, so ``d_in == d_out`` is unambiguous), rank-sized axes are replicated; prompt
  methods' leaves are replicated.
- A quantized kernel (``decomp_jax.quant.QuantizedArray``) gets a ``QuantizedArray`` of specs: its
  codes and (single-level) block scales take the kernel's spec, axis by axis, where the axis sizes
  divide (q4_1's, stored ``(d_out, d_in)``, the transposed spec); double-quantized scales are replicated
  (one byte per block).
- ``train_shardings`` gives the ``TrainState`` and frozen shardings (the state's structure from
  ``jax.eval_shape`` of ``init_state``; optimizer moments and method state follow the trainable
  leaf of the same path and shape); ``batch_sharding`` splits the leading axis over
  ``("data", "fsdp")``; ``place`` puts host arrays (NumPy, memmaps) onto the devices reading only
  each device's slice.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from decomp_jax.core.axes import FACTOR_AXES, factor_entries, factor_roles, is_box, unbox
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import adapted_layers
from decomp_jax.core.methods import get
from decomp_jax.core.tree import TOKEN_LEAF, matrix_leaf
from decomp_jax.errors import ConfigError
from decomp_jax.quant import TRANSPOSED, is_quantized

AXES = ("data", "fsdp", "tensor", "expert")  # the conventional mesh axes ("expert": a mixture's experts)
BATCH_AXES = ("data", "fsdp")  # the batch's leading axis is split over these
FSDP_MIN_SIZE = 2 ** 14  # leaves with fewer elements stay replicated over "fsdp"

Spec = Union[P, Sequence[Any]]
Rules = Sequence[tuple[str, Spec]]

# --- meshes -----------------------------------------------------------------------------------------


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` with the named axes of ``shape`` (e.g. ``{"data": -1, "fsdp": 1, "tensor": 1}``);
    one axis may be -1: the devices left over by the others. ``devices`` defaults to ``jax.devices()``."""
    if not isinstance(shape, Mapping) or not shape:
        raise ConfigError(f"A mesh shape is a mapping of axis names to sizes, e.g. {{data: -1, fsdp: 1, tensor: 1}}; "
                          f"got {shape!r}.")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    names, sizes = [str(k) for k in shape], []
    for name, size in shape.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ConfigError(f"Mesh axis {name!r} has size {size!r}; sizes are positive integers, or -1 for the "
                              f"remaining devices.")
        sizes.append(int(size))
    free = [nm for nm, s in zip(names, sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"Mesh shape {dict(shape)} has -1 on axes {free}; at most one axis may take the remaining "
                          f"devices. Give the others explicit sizes.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if n % fixed:
            raise ConfigError(
                f"Mesh shape {dict(shape)}: the fixed axes hold {fixed} devices, which does not divide the {n} "
                f"devices available, so {free[0]!r}=-1 has no whole size. Choose sizes whose product divides {n}.")
        sizes = [n // fixed if s == -1 else s for s in sizes]
    elif fixed != n:
        raise ConfigError(
            f"Mesh shape {dict(shape)} needs {fixed} devices but {n} are available. Make the product of the sizes "
            f"{n} (e.g. set one axis to -1 to take the remaining devices).")
    # Auto axes: GSPMD propagates the shardings through the model code (jax.make_mesh's default,
    # Explicit axes, would make every ambiguous gather in a model an error)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=auto, devices=devices)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


# --- partition rules --------------------------------------------------------------------------------

_IN_OUT = ("fsdp", "tensor")  # a kernel split on its output axis (column parallel)
_OUT_IN = ("tensor", "fsdp")  # a kernel split on its input axis (row parallel); an embedding (vocab, hidden)

_BERT = (
    (r"embeddings/word_embeddings/embedding$", _OUT_IN),
    (r"attention/self/(query|key|value)/kernel$", _IN_OUT),
    (r"attention/self/(query|key|value)/bias$", ("tensor",)),
    (r"attention/output/dense/kernel$", _OUT_IN),
    (r"intermediate/dense/kernel$", _IN_OUT),
    (r"intermediate/dense/bias$", ("tensor",)),
    (r"layer/\d+/output/dense/kernel$", _OUT_IN),
)
# GPT-2's Conv1D kernels are stored (d_out, d_in) (models.hf.TRANSPOSED)
_GPT2 = (
    (r"wte/embedding$", _OUT_IN),
    (r"attn/c_attn/kernel$", _OUT_IN),
    (r"attn/c_attn/bias$", ("tensor",)),
    (r"attn/c_proj/kernel$", _IN_OUT),
    (r"mlp/c_fc/kernel$", _OUT_IN),
    (r"mlp/c_fc/bias$", ("tensor",)),
    (r"mlp/c_proj/kernel$", _IN_OUT),
)
_LLAMA = (
    (r"embed_tokens/embedding$", _OUT_IN),
    (r"self_attn/(q_proj|k_proj|v_proj|qkv_proj)/kernel$", _IN_OUT),  # qkv_proj, gate_up_proj: Phi-3's fused kernels
    (r"self_attn/(q_proj|k_proj|v_proj|qkv_proj)/bias$", ("tensor",)),
    (r"self_attn/o_proj/kernel$", _OUT_IN),
    (r"mlp/(gate_proj|up_proj|gate_up_proj)/kernel$", _IN_OUT),
    (r"mlp/down_proj/kernel$", _OUT_IN),
    (r"lm_head/kernel$", _IN_OUT),
    # a mixture of experts (models.mlp): experts split over "expert", each expert's kernel as a dense one's;
    # the router (hidden, E) split on its input axis only
    (r"mlp/experts/gate_up_proj/kernel$", ("expert",) + _IN_OUT),
    (r"mlp/experts/down_proj/kernel$", ("expert",) + _OUT_IN),
    (r"mlp/shared_expert/(gate_proj|up_proj)/kernel$", _IN_OUT),
    (r"mlp/shared_expert/down_proj/kernel$", _OUT_IN),
    (r"mlp/gate/kernel$", ("fsdp", None)),
)


def _with_scanned(rules, scanned: str):
    """``rules`` preceded by their scanned-layer versions: under ``scanned`` (a regex for the path of the
    ``nn.scan``-ned layers, e.g. ``^model/layers/``) a kernel carries a leading layer axis, left unsplit."""
    return tuple((scanned + ".*" + rx, (None,) + tuple(spec)) for rx, spec in rules) + rules


RULES: dict[str, tuple[tuple[str, Spec], ...]] = {
    "bert": _BERT, "roberta": _BERT, "gpt2": _with_scanned(_GPT2, r"^transformer/layers/"),
    "llama": _with_scanned(_LLAMA, r"^model/layers/")}


def detect_architecture(params) -> Optional[str]:
    """The ``RULES`` preset for a param tree, from its paths (None when none fits)."""
    top = set(map(str, unfreeze(params)))
    if "bert" in top:
        return "bert"
    if "roberta" in top:
        return "roberta"
    if "transformer" in top and {"h", "layers"} & set(unfreeze(params)["transformer"]):  # unrolled, scanned
        return "gpt2"
    model = unfreeze(params).get("model")
    if isinstance(model, dict) and "embed_tokens" in model:
        return "llama"
    return None


def resolve_rules(rules, params=None) -> tuple[tuple[str, Spec], ...]:
    """``rules`` as a tuple of (compiled-able regex, spec): a preset name, a list of pairs, or None
    (the preset of the params' architecture; no rules when unknown)."""
    if rules is None:
        arch = detect_architecture(params) if params is not None else None
        return RULES[arch] if arch else ()
    if isinstance(rules, str):
        if rules not in RULES:
            raise ConfigError(f"Unknown partition rules preset {rules!r}; presets: {', '.join(sorted(RULES))} "
                              f"(or pass a list of (path regex, PartitionSpec) pairs).")
        return RULES[rules]
    out = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"A partition rule is a (path regex, PartitionSpec or tuple of axis names) pair; "
                              f"got {item!r}.")
        try:
            re.compile(item[0])
        except re.error as err:
            raise ConfigError(f"Partition rule regex {item[0]!r} is invalid: {err}") from None
        out.append((item[0], item[1]))
    return tuple(out)


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _map_entry(entry, sizes: Mapping[str, int], logical: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """One spec entry as the mesh axes it uses (logical names mapped; conventional axes absent
    from this mesh dropped)."""
    out: list[str] = []
    for name in _names(entry):
        if name in sizes:
            out.append(name)
        elif name in logical:
            out.extend(n for n in _names(logical[name]) if n in sizes)
        elif name in AXES:
            continue  # e.g. "tensor" on a mesh without a tensor axis: replicated there
        else:
            raise ConfigError(
                f"{where}: axis name {name!r} is neither an axis of the mesh {dict(sizes)} nor a logical axis of the "
                f"logical rules {sorted(logical)}. Use mesh axis names, or pass logical_rules=[(logical, mesh_axis), ...].")
    return tuple(out)


def fit_spec(shape, entries: Sequence[tuple[str, ...]], sizes: Mapping[str, int], *, fsdp: bool = True) -> P:
    """A ``PartitionSpec`` valid for ``shape``: per axis, the mesh axes of ``entries`` kept (in order)
    while their product divides the axis size; size-1 mesh axes and, without ``fsdp``, "fsdp" dropped."""
    out = []
    used: set[str] = set()
    for dim, names in zip(shape, list(entries) + [()] * (len(shape) - len(entries))):
        kept, prod = [], 1
        for name in names:
            size = sizes.get(name, 1)
            if size == 1 or name in used or (name == "fsdp" and not fsdp):
                continue
            if dim % (prod * size) == 0:
                kept.append(name)
                prod *= size
                used.add(name)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _add_fsdp(shape, spec: P, sizes: Mapping[str, int]) -> P:
    """FSDP for a large leaf whose spec does not use "fsdp": its largest divisible free axis, else
    combined with the axis already sharded (e.g. by "tensor") where that divides."""
    f = sizes.get("fsdp", 1)
    entries = [_names(e) for e in spec] + [()] * (len(shape) - len(spec))
    if f == 1 or any("fsdp" in e for e in entries):
        return spec
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if not entries[i] and shape[i] % f == 0:
            entries[i] = ("fsdp",)
            return P(*[None if not e else e[0] if len(e) == 1 else e for e in entries])
    for i in order:
        prod = math.prod(sizes[n] for n in entries[i])
        if entries[i] and shape[i] % (prod * f) == 0:
            entries[i] = ("fsdp",) + entries[i]
            return P(*[None if not e else e[0] if len(e) == 1 else e for e in entries])
    return spec


def _box_entries(box, logical_rules) -> tuple:
    import flax.linen as nn

    names = tuple(box.names)
    if isinstance(box, nn.LogicallyPartitioned):
        rules = box.rules or logical_rules or nn.get_logical_axis_rules()
        if rules:
            mapped = nn.logical_to_mesh_axes(names, rules)
            return tuple(mapped) + (None,) * (len(names) - len(tuple(mapped)))
    return names


def base_specs(params, mesh, rules=None, *, fsdp_min_size: int = FSDP_MIN_SIZE, logical_rules=None) -> dict:
    """A ``PartitionSpec`` per leaf of ``params`` (a nested dict of arrays, ``ShapeDtypeStruct``s or
    Flax boxes; the result has the unboxed structure; a quantized kernel: a ``QuantizedArray`` of specs)."""
    specs = _logical_specs(params, mesh, rules, fsdp_min_size=fsdp_min_size, logical_rules=logical_rules)
    return _quantized_specs(specs, unbox(params), mesh)


def _quantized_specs(specs: dict, values, mesh) -> dict:
    """``specs`` (one per leaf, a quantized kernel's for its logical shape) with each quantized kernel's
    spec turned into a ``QuantizedArray`` of the specs of its codes and scales."""

    sizes = _axis_sizes(mesh)
    flat_values = flatten_dict(values)
    flat = flatten_dict(specs, is_leaf=lambda _, x: isinstance(x, P))
    for path, spec in flat.items():
        value = flat_values.get(path)
        if not is_quantized(value):
            continue
        entries = [_names(e) for e in spec] + [()] * (value.ndim - len(spec))
        if value.kind in TRANSPOSED:
            entries[-2:] = entries[-2:][::-1]
        children, aux = value.tree_flatten()
        codes, scales, offset, step, mins = children

        def own(child):
            return None if child is None else fit_spec(np.shape(child), entries, sizes)

        blocked = step is None  # double-quantized scales are regrouped: replicated
        flat[path] = type(value).tree_unflatten(aux, (
            own(codes), own(scales) if blocked else P(), None if offset is None else P(),
            None if step is None else P(), own(mins)))
    return unflatten_dict(flat)


def _logical_specs(params, mesh, rules=None, *, fsdp_min_size: int = FSDP_MIN_SIZE, logical_rules=None) -> dict:
    """``base_specs`` with a quantized kernel's spec for its logical (dequantized) shape."""
    sizes = _axis_sizes(mesh)
    logical = dict(logical_rules or ())
    compiled = [(re.compile(rx), spec) for rx, spec in resolve_rules(rules, unbox(params))]
    flat = flatten_dict(unfreeze(params), is_leaf=lambda _, x: is_box(x))
    out = {}
    for path, leaf in flat.items():
        where = "/".join(map(str, path))
        value = leaf.value if is_box(leaf) else leaf
        shape = tuple(np.shape(value))
        big = math.prod(shape) >= fsdp_min_size
        spec = next((s for rx, s in compiled if rx.search(where)), None)
        if spec is None and is_box(leaf):
            spec = _box_entries(leaf, logical_rules)
        if spec is None:
            fitted = P(*([None] * len(shape)))
        else:
            if len(tuple(spec)) > len(shape):
                raise ConfigError(f"Partition spec {spec!r} for {where!r} has {len(tuple(spec))} entries but the leaf "
                                  f"has shape {shape}; give one entry per axis.")
            entries = [_map_entry(e, sizes, logical, f"Partition spec for {where!r}") for e in spec]
            fitted = fit_spec(shape, entries, sizes, fsdp=big)
        out[path] = _add_fsdp(shape, fitted, sizes) if big else fitted
    return unflatten_dict(out)


# --- factor leaves ----------------------------------------------------------------------------------

def factor_spec(name: str, shape, kernel_spec: P, d_in: int, d_out: int, *, transposed: bool = False,
                declared: Optional[tuple] = None) -> P:
    """The spec of factor leaf ``name`` from its layer's kernel spec (stored layout: ``(d_out, d_in)``
    when ``transposed``); ``declared``: the roles of its axes where the method states them."""
    entries = list(kernel_spec) + [None] * (2 - len(kernel_spec))
    by_role = {"out": entries[0], "in": entries[1]} if transposed else {"in": entries[0], "out": entries[1]}
    by_role[None] = None
    return P(*[by_role[r] for r in factor_roles(name, shape, d_in, d_out, declared)])


def param_specs(params, mesh, rules=None, *, cfg: Optional[AdapterConfig] = None,
                fsdp_min_size: int = FSDP_MIN_SIZE, logical_rules=None) -> dict:
    """A ``PartitionSpec`` per leaf of ``params``: base leaves by ``rules`` (see ``base_specs``); with
    ``cfg``, the method's factor leaves derived from their kernel's spec and a prompt method's
    subtree replicated."""

    logical = _logical_specs(params, mesh, rules, fsdp_min_size=fsdp_min_size, logical_rules=logical_rules)
    if cfg is None:
        return _quantized_specs(logical, unbox(params), mesh)
    specs = flatten_dict(logical, is_leaf=lambda _, x: isinstance(x, P))
    method = get(cfg.method)
    if method.kind == "prompt":
        for path in specs:
            if path[0] == cfg.method:
                specs[path] = P()
        return _quantized_specs(unflatten_dict(specs), unbox(params), mesh)
    values = unbox(params)
    for path, layer in adapted_layers(values, cfg):
        kernel = tuple(specs[path + (matrix_leaf(layer),)])  # a kernel, or an embedding table (vocab, features)
        for name, entries in factor_entries(path, layer, kernel, method, cfg).items():
            specs[path + (name,)] = P(*entries)
    for path in specs:  # trainable token rows (n, features): the table's features axis, rows replicated
        if path[-1] == TOKEN_LEAF:
            table = list(specs[path[:-1] + ("embedding",)]) + [None, None]
            specs[path] = P(None, table[1])
    return _quantized_specs(unflatten_dict(specs), values, mesh)


def named(specs, mesh):
    """``NamedSharding``s of a pytree of ``PartitionSpec``s."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params, mesh, rules=None, **kwargs) -> dict:
    """``NamedSharding``s of ``param_specs`` (same arguments)."""
    return named(param_specs(params, mesh, rules, **kwargs), mesh)


# --- train state, frozen params, batch --------------------------------------------------------------

def _dict_suffix(keypath) -> tuple:
    """The trailing dict keys of a pytree key path."""
    out = []
    for k in reversed(keypath):
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        else:
            break
    return tuple(reversed(out))


def follow(tree, specs, mesh):
    """Shardings for ``tree`` (e.g. a ``TrainState`` or its ``jax.eval_shape``): each leaf takes the spec
    in ``specs`` (a nested dict of ``PartitionSpec``s) of the longest path suffix of its key path whose
    leaf has the same shape there; anything else (step counts, RNG keys, masks) is replicated."""

    flat_specs = flatten_dict(specs, is_leaf=lambda _, x: isinstance(x, P) or is_quantized(x))

    def one(spec, leaf):
        return NamedSharding(mesh, spec if spec is not None and _valid(spec, tuple(np.shape(leaf)), mesh) else P())

    def pick(keypath, leaf):
        shape = tuple(np.shape(leaf))
        suffix = _dict_suffix(keypath)
        for i in range(len(suffix)):
            spec = flat_specs.get(suffix[i:])
            if is_quantized(leaf) and is_quantized(spec) and spec.kind == leaf.kind:  # codes and scales: their own specs
                return jax.tree.map(one, spec, leaf, is_leaf=lambda x: isinstance(x, P))
            if isinstance(spec, P) and _valid(spec, shape, mesh):
                return NamedSharding(mesh, spec)
        if is_quantized(leaf):
            return jax.tree.map(lambda _: NamedSharding(mesh, P()), leaf)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, tree, is_leaf=is_quantized)


def _valid(spec: P, shape, mesh) -> bool:
    sizes = _axis_sizes(mesh)
    if len(spec) > len(shape):
        return False
    return all(dim % math.prod(sizes[n] for n in _names(e)) == 0 for dim, e in zip(shape, spec))


def batch_spec(shape, mesh, axes: Sequence[str] = BATCH_AXES) -> P:
    """The leading axis over the mesh's ``axes`` (those of size > 1); replicated when they do not divide it."""
    sizes = _axis_sizes(mesh)
    used = tuple(a for a in axes if sizes.get(a, 1) > 1)
    if not shape or not used or shape[0] % math.prod(sizes[a] for a in used):
        return P()
    return P(used[0] if len(used) == 1 else used)


def batch_sharding(batch, mesh, axes: Sequence[str] = BATCH_AXES, *, strict: bool = False):
    """``NamedSharding``s for a batch (a pytree of arrays): the leading axis split over ``axes``. With
    ``strict``, a leading axis the mesh does not divide is an error (training batches)."""
    sizes = _axis_sizes(mesh)
    n = math.prod(sizes.get(a, 1) for a in axes)

    def one(x):
        shape = tuple(np.shape(x))
        if strict and shape and shape[0] % n:
            raise ConfigError(f"A batch leaf of shape {shape} has a leading axis of {shape[0]}, which the mesh's "
                              f"{' x '.join(f'{a}={sizes.get(a, 1)}' for a in axes)} = {n} devices do not divide. Use a "
                              f"batch size that is a multiple of {n}.")
        return NamedSharding(mesh, batch_spec(shape, mesh, axes))

    return jax.tree.map(one, batch)


def place(tree, shardings):
    """``tree``'s leaves on the devices of ``shardings`` (a matching pytree, or one sharding for all).
    Host arrays (NumPy arrays and memmaps, e.g. from ``convert.read_safetensors``) are read one
    device slice at a time with ``jax.make_array_from_callback``: no device nor host holds a full copy
    beyond its own slices. JAX arrays are moved with ``jax.device_put`` (a process-local array onto a
    mesh spanning several processes is read slice by slice like a host array). Flax boxes are unboxed."""
    tree = unbox(tree) if isinstance(tree, dict) else tree
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if x.is_fully_addressable and not sharding.is_fully_addressable:
                x = np.asarray(x)  # a process-local copy onto a mesh spanning processes: read our slices
            else:
                return jax.device_put(x, sharding)
        if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
            dtype = getattr(x, "dtype", None)
            return jax.make_array_from_callback(tuple(np.shape(x)), sharding,
                                                lambda index: np.asarray(x[index]), dtype=dtype)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree, shardings)


def device_bytes(tree) -> dict:
    """Bytes each device holds for the arrays of ``tree`` (``{device: bytes}``)."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


__all__ = [
    "AXES", "BATCH_AXES", "FACTOR_AXES", "FSDP_MIN_SIZE", "RULES", "base_specs", "batch_sharding", "batch_spec",
    "detect_architecture", "device_bytes", "factor_roles", "factor_spec", "fit_spec", "follow", "make_mesh", "named",
    "param_shardings", "param_specs", "place", "resolve_rules", "unbox",
]
