"""Tree surgery on parameter pytrees: target selection, inject, merge, trainable masks.

Everything here is a pure function of nested dicts: flatten to '/'-joinable paths, transform,
unflatten. A *layer* is a dict that holds a 2-D ``kernel`` (Flax ``Dense`` layout ``(d_in, d_out)``);
an *adapted layer* also holds the method's factor leaves.
"""

from __future__ import annotations

import difflib
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


def _layer_key(rng: jax.Array, path: Path) -> jax.Array:
    """A per-layer key that depends on the layer's path, not on the order of traversal."""
    return jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


def inject(params, cfg: AdapterConfig, rng: jax.Array):
    """Add the method's factor leaves beside the ``kernel`` of every targeted layer.

    Pure: returns a new tree; ``params`` is not modified. The adapted model equals the base
    model at init (for every method whose spec says so).
    """
    method = get(cfg.method)
    flat = _flat(params)
    for path in find_targets(params, cfg):
        kernel = flat[path + ("kernel",)]
        where = path_str(path)
        if np.ndim(kernel) != 2:
            raise ConfigError(
                f"Layer {where!r} has a kernel of shape {np.shape(kernel)}; methods adapt 2-D dense "
                f"kernels (d_in, d_out). Narrow `targets` so it selects dense layers only."
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
    return unflatten_dict(flat)


def adapted_layers(params, cfg: AdapterConfig) -> Iterator[tuple[Path, dict]]:
    """``(path, layer_dict)`` for every layer that holds all of the method's factor leaves."""
    names = get(cfg.method).factor_names
    if not names:
        return
    flat = _flat(params)
    for path in layer_paths(params):
        if all(path + (n,) in flat for n in names):
            prefix = len(path)
            yield path, {k[prefix]: v for k, v in flat.items() if k[:prefix] == path and len(k) == prefix + 1}


def merge(params, cfg: AdapterConfig):
    """Fold ``phi(K)`` into each adapted kernel and drop the factor leaves.

    Returns plain params with the base model's structure and shapes.
    """
    method = get(cfg.method)
    if not method.mergeable:
        raise ConfigError(
            f"Method {cfg.method!r} is not mergeable (its update is not a function of the kernel "
            f"alone); run it with adapt(..., mode='factored') instead."
        )
    flat = _flat(params)
    for path, layer in adapted_layers(params, cfg):
        factors = {n: layer[n] for n in method.factor_names}
        flat[path + ("kernel",)] = method.materialize(layer["kernel"], factors, cfg)
        if method.materialize_bias is not None and "bias" in layer:
            flat[path + ("bias",)] = method.materialize_bias(layer["bias"], factors, cfg)
        for name in method.factor_names:
            del flat[path + (name,)]
    return unflatten_dict(flat)


def trainable_mask(params, cfg: AdapterConfig):
    """A bool pytree with the structure of ``params``: True where a leaf trains.

    Trainable: the method's factor leaves (not its buffers), the biases of targeted layers for
    methods that train biases (BitFit), and base leaves whose path matches ``cfg.train_extra``.
    """
    method = get(cfg.method)
    flat = _flat(params)
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
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
