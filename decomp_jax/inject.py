"""Tree surgery on parameter pytrees: target selection, inject, merge, trainable masks.

Everything here is a pure function of nested dicts: flatten to '/'-joinable paths, transform,
unflatten. A *layer* is a dict that holds a 2-D ``kernel`` (Flax ``Dense`` layout ``(d_in, d_out)``);
an *adapted layer* also holds the method's factor leaves.
"""

from __future__ import annotations

import difflib
import math
import re
import zlib
from typing import Any, Iterator

import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.config import AdapterConfig, ConfigError
from decomp_jax.methods import get

Path = tuple[str, ...]


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _flat(params) -> dict[Path, Any]:
    return flatten_dict(unfreeze(params))


def layer_paths(params) -> list[Path]:
    """Paths of every dict that holds a ``kernel`` leaf, in tree order."""
    return [path[:-1] for path in _flat(params) if path[-1] == "kernel"]


def find_targets(params, cfg: AdapterConfig) -> list[Path]:
    """Layer paths whose '/'-joined form matches ``cfg.targets`` (``re.search``).

    Raises a ``ConfigError`` listing the nearest layer paths when nothing matches.
    """
    pattern = re.compile(cfg.targets)
    candidates = layer_paths(params)
    matched = [p for p in candidates if pattern.search(path_str(p))]
    if not matched:
        shown = [path_str(p) for p in candidates]
        near = difflib.get_close_matches(cfg.targets, shown, n=5, cutoff=0.0)
        raise ConfigError(
            f"targets={cfg.targets!r} matches no dense layer. Nearest layer paths: {near}. "
            f"The pattern is searched (re.search) in '/'-joined paths such as {shown[:3]}; "
            f"e.g. targets: 'attention/self/(query|value)$'."
        )
    return matched


def is_transposed(path: Path, cfg: AdapterConfig) -> bool:
    """Whether the layer at ``path`` stores its kernel as ``(d_out, d_in)`` (``cfg.transposed``)."""
    return bool(cfg.transposed) and re.search(cfg.transposed, path_str(path)) is not None


def oriented(kernel, path: Path, cfg: AdapterConfig):
    """The kernel in the methods' ``(d_in, d_out)`` convention (a transpose for GPT-2's Conv1D);
    the function is its own inverse."""
    return kernel.T if is_transposed(path, cfg) else kernel


def _layer_key(rng: jax.Array, path: Path) -> jax.Array:
    """A per-layer key that depends on the layer's path, not on the order of traversal."""
    return jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


def inject(params, cfg: AdapterConfig, rng: jax.Array):
    """Add the method's factor leaves beside the ``kernel`` of every targeted layer.

    Pure: returns a new tree; ``params`` is not modified. The adapted model equals the base
    model at init (for every method whose spec says so).
    """
    method = get(cfg.method)
    if method.kind == "prompt":
        return _inject_prompt(params, cfg, rng)
    flat = _flat(params)
    for path in find_targets(params, cfg):
        kernel = oriented(flat[path + ("kernel",)], path, cfg)
        where = path_str(path)
        if np.ndim(kernel) != 2:
            raise ConfigError(
                f"Layer {where!r} has a kernel of shape {np.shape(kernel)}; methods adapt 2-D dense "
                f"kernels (d_in, d_out) (or (d_out, d_in) for layers matched by `transposed`). Narrow `targets` "
                f"so it selects dense layers only."
            )
        if method.uses_rank and cfg.rank > min(kernel.shape):
            raise ConfigError(
                f"rank={cfg.rank} is larger than min(d_in, d_out)={min(kernel.shape)} for layer "
                f"{where!r} (kernel {tuple(kernel.shape)}). Use rank <= {min(kernel.shape)}."
            )
        clash = [n for n in method.factor_names if path + (n,) in flat]
        if clash:
            raise ConfigError(
                f"Layer {where!r} already holds {clash}: these params are already adapted. "
                f"Inject into the base params, or merge() first."
            )
        factors = method.init(_layer_key(rng, path), kernel, flat.get(path + ("bias",)), cfg)
        for name, value in factors.items():
            flat[path + (name,)] = value
        if method.residual is not None:  # PiSSA/MiLoRA: the layer keeps K - s * a0 @ b0
            flat[path + ("kernel",)] = oriented(method.residual(kernel, factors, cfg), path, cfg)
    return unflatten_dict(flat)


def adapted_layers(params, cfg: AdapterConfig) -> Iterator[tuple[Path, dict]]:
    """``(path, layer_dict)`` for every layer that holds all of the method's factor leaves."""
    names = get(cfg.method).factor_names
    if not names or get(cfg.method).kind == "prompt":  # prompt methods adapt no layer
        return
    flat = _flat(params)
    for path in layer_paths(params):
        if all(path + (n,) in flat for n in names):
            prefix = len(path)
            yield path, {k[prefix]: v for k, v in flat.items() if k[:prefix] == path and len(k) == prefix + 1}


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
    method = get(cfg.method)
    check_mergeable(method)
    flat = _flat(params)
    for path, layer in adapted_layers(params, cfg):
        factors = {n: layer[n] for n in method.factor_names}
        kernel = method.materialize(oriented(layer["kernel"], path, cfg), factors, cfg)
        flat[path + ("kernel",)] = oriented(kernel, path, cfg)
        if method.materialize_bias is not None and "bias" in layer:
            flat[path + ("bias",)] = method.materialize_bias(layer["bias"], factors, cfg)
        for name in method.factor_names:
            del flat[path + (name,)]
    return unflatten_dict(flat)


def adapter_leaves(params, cfg: AdapterConfig) -> dict:
    """The method's factor leaves (trainable and buffers) of every adapted layer, as a nested dict."""
    names = get(cfg.method).factor_names
    if get(cfg.method).kind == "prompt":
        return {cfg.method: unfreeze(params)[cfg.method]} if cfg.method in params else {}
    return unflatten_dict({path + (n,): layer[n] for path, layer in adapted_layers(params, cfg) for n in names})


def unmerge(merged, adapter, cfg: AdapterConfig):
    """Inverse of ``merge``: recover each adapted layer's base kernel from ``K'`` and re-attach the
    factor leaves held by ``adapter`` (e.g. ``adapter_leaves(params, cfg)``).

    ``unmerge(merge(p, cfg), adapter_leaves(p, cfg), cfg) == p`` to float tolerance, for every
    method whose ``K`` is recoverable: not DoRA (the column norms of ``K + dK`` are lost) nor
    SAM-PARSER (the original singular values are lost); the scaling methods need non-zero scales.
    """
    method = get(cfg.method)
    check_mergeable(method)
    if method.unmaterialize is None:
        raise ConfigError(
            f"Method {cfg.method!r} cannot be unmerged: K is not recoverable from the merged kernel and the "
            f"factors. Keep the unmerged params (or the base model) to go back."
        )
    if not method.factor_names:  # BitFit: merging changed nothing
        return merged
    flat, flat_adapter = _flat(merged), _flat(adapter)
    layers = sorted({path[:-1] for path in flat_adapter if path[-1] in method.factor_names})
    if not layers:
        raise ConfigError(f"`adapter` holds no {cfg.method} factor leaves {method.factor_names}; pass adapter_leaves(params, cfg).")
    for path in layers:
        where = path_str(path)
        missing = [n for n in method.factor_names if path + (n,) not in flat_adapter]
        if missing or path + ("kernel",) not in flat:
            raise ConfigError(
                f"Layer {where!r}: the adapter lacks {missing} or the merged params lack its kernel; "
                f"pass the merged params and the adapter of the same model."
            )
        factors = {n: flat_adapter[path + (n,)] for n in method.factor_names}
        merged_kernel = oriented(flat[path + ("kernel",)], path, cfg)
        kernel, bias = method.unmaterialize(merged_kernel, flat.get(path + ("bias",)), factors, cfg)
        flat[path + ("kernel",)] = oriented(kernel, path, cfg)
        if bias is not None:
            flat[path + ("bias",)] = bias
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
        raise KeyError(f"no leaves at {unknown[:5]}")
    flat.update(changes)
    return unflatten_dict(flat)


def trainable_mask(params, cfg: AdapterConfig):
    """A bool pytree with the structure of ``params``: True where a leaf trains.

    Trainable: the method's factor leaves (not its buffers), the biases of targeted layers for
    methods that train biases (BitFit), and base leaves whose path matches ``cfg.train_extra``.
    """
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
        if method.trains_bias and leaf == "bias" and path_str(layer) and targets.search(path_str(layer)):
            return (layer + ("kernel",)) in flat
        return bool(extra and extra.search(path_str(path)))

    return unflatten_dict({path: trains(path) for path in flat})


def split(params, mask) -> tuple[dict, dict]:
    """Partition ``params`` by a bool ``mask`` into ``(trainable, frozen)`` nested dicts.

    Each half holds only its own leaves, so gradients and optimizer state exist only for the
    trainable half (the equinox ``partition`` idea, with leaves dropped instead of set to None).
    """
    flat, flat_mask = _flat(params), _flat(mask)
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    return unflatten_dict(trainable), unflatten_dict(frozen)


def partition(params, cfg: AdapterConfig) -> tuple[dict, dict, dict]:
    """``(trainable, buffers, frozen)``: ``buffers`` holds the buffers that a stateful method's
    schedule rewrites during training (LoRA-Dash's directions); it lives in the train state and is
    empty for every other method (their buffers are constants and stay in ``frozen``)."""
    trainable, frozen = split(params, trainable_mask(params, cfg))
    method = get(cfg.method)
    if method.schedule is None or not method.buffers:
        return trainable, {}, frozen
    flat = _flat(frozen)
    adapted = {path for path, _ in adapted_layers(params, cfg)}
    is_buffer = {p: (p[:-1] in adapted and p[-1] in method.buffers) for p in flat}
    buffers, frozen = split(frozen, unflatten_dict(is_buffer))
    return trainable, buffers, frozen


def combine(*trees) -> dict:
    """Inverse of ``split``: the union of disjoint nested dicts."""
    flat: dict[Path, Any] = {}
    for tree in trees:
        for path, value in _flat(tree).items():
            if path in flat:
                raise ValueError(f"leaf {path_str(path)!r} appears in more than one tree")
            flat[path] = value
    return unflatten_dict(flat)


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays or ``jax.ShapeDtypeStruct``s."""
    return int(sum(math.prod(getattr(x, "shape", np.shape(x))) for x in jax.tree_util.tree_leaves(tree)))


def trainable_count(base_params, cfg: AdapterConfig) -> int:
    """Trainable parameters of ``cfg`` on ``base_params``, from shapes only (``jax.eval_shape``:
    no SVD or init is computed)."""
    shapes = jax.eval_shape(lambda p: inject(p, cfg, jax.random.PRNGKey(0)), base_params)
    return count_params(split(shapes, trainable_mask(shapes, cfg))[0])
