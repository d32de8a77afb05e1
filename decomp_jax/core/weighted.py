"""Combining LoRA adapters into a new one, as HF PEFT's ``add_weighted_adapter`` does.

``add_weighted_adapter([(params_a, cfg_a), (params_b, cfg_b)], weights, combination_type)`` takes
adapted trees of one base model (each ``dj.inject`` + training, or ``dj.import_peft``) and returns
``(params, cfg)``: the first tree's base leaves with a new LoRA on every layer any of them adapts
(``cfg``: method ``lora``, ``alpha = rank``, so its scale is 1). Per layer, with ``s_i`` each adapter's
scale and ``w_i`` its weight (negative weights subtract):

- ``cat``: ``lora_a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]``, ``lora_b`` the ``b_i`` stacked: exact, rank
  = the sum of the ranks;
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks): the factors
  combined separately, ``a`` with weights ``sign(w_i s_i) sqrt|w_i s_i|``, ``b`` with ``sqrt|w_i s_i|``;
- ``svd`` and the ``*_svd`` variants: the updates ``s_i a_i b_i`` combined, then truncated to
  ``svd_rank`` (default the largest rank) by an SVD, the singular values on the output side (on the
  input side for transposed Conv1D layers and embeddings, as PEFT), optionally clipped to +-(the
  ``svd_clamp`` quantile of the factors' signed values), as PEFT does (which makes the clamp depend on
  the SVD's sign choices: NumPy's here, the LAPACK build's in PyTorch).

``ties`` keeps each tensor's ``density`` largest magnitudes, then per element the adapters that agree
with the majority sign (``majority_sign_method``: ``total`` or ``frequency``) and averages them;
``dare_*`` drops elements at random (kept with probability ``density``, rescaled by ``1/density``);
``magnitude_prune`` keeps the largest magnitudes and sums. The random DARE masks come from ``key`` or from
``mask_fn(tensor, density) -> 0/1 array`` (tests pass the same masks to PEFT).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import adapted_layers
from decomp_jax.core.tree import is_transposed, matrix_leaf, path_str, scan_roots
from decomp_jax.errors import ConfigError

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _magnitude_prune(t: np.ndarray, density: float) -> np.ndarray:
    k = int(density * t.size)
    keep = np.zeros(t.size, bool)
    keep[np.argsort(-np.abs(t).reshape(-1), kind="stable")[:k]] = True
    return t * keep.reshape(t.shape)


def _prune(t, density, how, mask_fn):
    if density >= 1:
        return t
    if how == "magnitude":
        return _magnitude_prune(t, density)
    return t * mask_fn(t, density) / density  # DARE: random, rescaled


def _sign_mask(stack: np.ndarray, method: str) -> np.ndarray:
    sign = np.sign(stack)
    magnitude = stack.sum(0) if method == "total" else sign.sum(0)
    return sign == np.where(magnitude >= 0, 1.0, -1.0)


def _combine(tensors: list, weights: np.ndarray, kind: str, density, sign_method: str, mask_fn) -> np.ndarray:
    """PEFT's merge_utils on one list of task tensors (``kind`` without ``_svd``)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude", mask_fn) for t in tensors]
    elif kind.startswith("dare"):
        tensors = [_prune(t, density, "random", mask_fn) for t in tensors]
    stack = np.stack(tensors)
    weighted = stack * weights.reshape((-1,) + (1,) * (stack.ndim - 1))
    if kind in ("ties", "dare_ties"):
        mask = _sign_mask(stack, sign_method)
        return (weighted * mask).sum(0) / np.maximum(mask.sum(0), 1.0)
    return weighted.sum(0)


def _bernoulli(key):
    counter = iter(range(1 << 30))

    def mask_fn(t, density):
        return np.asarray(jax.random.bernoulli(jax.random.fold_in(key, next(counter)), density, t.shape), t.dtype)

    return mask_fn


def _check_arguments(adapters, weights, combination_type: str, density, majority_sign_method: str) -> str:
    """The combination to run (``linear`` for one adapter); ConfigError on an argument that cannot be run."""
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type={combination_type!r} is unknown; choose one of {COMBINATIONS}.")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"Give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights.")
    for i, (params, cfg) in enumerate(adapters):
        if not isinstance(cfg, AdapterConfig) or cfg.method != "lora":
            raise ConfigError(f"Adapter {i} is a {getattr(cfg, 'method', type(cfg).__name__)!r} adapter; "
                              f"add_weighted_adapter combines LoRA adapters (method 'lora'), as PEFT's does.")
        if scan_roots(params, cfg):
            raise ConfigError(f"Adapter {i} holds stacked (scanned) layers; combine the unrolled params "
                              f"(decomp_jax.models.llama.unstack_layers) and stack the result.")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    if combination_type not in ("cat", "svd", "linear") and density is None:
        raise ConfigError(f"combination_type={combination_type!r} prunes: give density (the fraction kept, 0..1).")
    if density is not None and density < 0:
        raise ConfigError(f"density must be >= 0 (the fraction kept); got {density}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method={majority_sign_method!r}; choose 'total' or 'frequency'.")
    return combination_type


def _base_and_layers(adapters) -> tuple[dict, list]:
    """The first tree's flat leaves without LoRA factors, and each adapter's adapted layers by path;
    ConfigError when the adapters' base leaves differ."""
    flats = [flatten_dict(params) for params, _ in adapters]
    layers = [dict(adapted_layers(params, cfg)) for params, cfg in adapters]
    base = {p: v for p, v in flats[0].items() if not (p[:-1] in layers[0] and p[-1] in ("lora_a", "lora_b"))}
    shapes = [{p: np.shape(v) for p, v in f.items() if not (p[:-1] in ls and p[-1] in ("lora_a", "lora_b"))}
              for f, ls in zip(flats, layers)]
    other = [i for i in range(1, len(adapters)) if set(shapes[i]) != set(shapes[0])]
    if other:
        raise ConfigError(f"Adapters {other} are not on the same base model as adapter 0 (their non-adapter leaves "
                          f"differ); combine adapters of one base.")
    return base, layers


def _new_rank(adapters, layers: list, combination_type: str, svd_rank: Optional[int]) -> int:
    """The combined adapter's rank."""
    ranks = [{p: np.shape(ls[p]["lora_a"])[-1] for p in ls} for ls in layers]
    if combination_type in SAME_RANK and len({r for rk in ranks for r in rk.values()}) != 1:
        raise ConfigError(f"combination_type={combination_type!r} needs one rank in every adapter and layer (found "
                          f"{sorted({r for rk in ranks for r in rk.values()})}); use 'cat' or 'svd'.")
    if combination_type == "cat":
        return sum(cfg.rank if not cfg.rank_pattern else max(cfg.rank, *cfg.rank_pattern.values())
                   for _, cfg in adapters)
    if combination_type.endswith("svd"):
        return svd_rank or max(r for rk in ranks for r in rk.values())
    return next(iter(ranks[0].values()))


def _svd_factors(delta: np.ndarray, new_rank: int, input_side: bool, svd_clamp: Optional[float]):
    """``(a, b)`` of rank ``new_rank`` from the SVD of ``delta``, the singular values on ``a`` with
    ``input_side``, else on ``b``; clipped at the ``svd_clamp`` quantile; zero-padded to ``new_rank``."""
    if input_side:
        u, s, vt = np.linalg.svd(delta, full_matrices=True)
        a, b = u[:, :new_rank] * s[:new_rank], vt[:new_rank]
    else:
        u, s, vt = np.linalg.svd(delta.T, full_matrices=True)  # PEFT's (out, in): B = u s, A = vt
        a, b = vt[:new_rank].T, (u[:, :new_rank] * s[:new_rank]).T
    if svd_clamp is not None:
        hi = np.quantile(np.concatenate([a.reshape(-1), b.reshape(-1)]), svd_clamp)
        a, b = np.clip(a, -hi, hi), np.clip(b, -hi, hi)
    if a.shape[1] < new_rank:  # a rank above min(d_in, d_out): zero columns
        a = np.pad(a, ((0, 0), (0, new_rank - a.shape[1])))
        b = np.pad(b, ((0, new_rank - b.shape[0]), (0, 0)))
    return a, b


def add_weighted_adapter(adapters: Sequence[tuple], weights: Sequence[float], combination_type: str = "svd", *,
                         svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
                         density: Optional[float] = None, majority_sign_method: str = "total",
                         key: Optional[jax.Array] = None,
                         mask_fn: Optional[Callable[[np.ndarray, float], np.ndarray]] = None):
    """A new LoRA adapter combining ``adapters`` (``[(params, cfg), ...]``, LoRA adapters of one base model)
    with ``weights``; see the module docstring. Returns ``(params, cfg)``."""
    combination_type = _check_arguments(adapters, weights, combination_type, density, majority_sign_method)
    if mask_fn is None:
        mask_fn = _bernoulli(key if key is not None else jax.random.PRNGKey(0))

    base, layers = _base_and_layers(adapters)
    paths = list(dict.fromkeys(q for ls in layers for q in ls))  # the union, in first-seen order
    new_rank = _new_rank(adapters, layers, combination_type, svd_rank)
    cfg0 = adapters[0][1]
    out = dict(base)
    for path in paths:
        where = path_str(path)
        held = [(i, layers[i][path], adapters[i][1].for_layer(where).scale) for i in range(len(adapters))
                if path in layers[i]]
        w = np.array([weights[i] for i, _, _ in held], np.float64)
        scales = np.array([s for _, _, s in held], np.float64)
        a_s = [np.asarray(layer["lora_a"], np.float32) for _, layer, _ in held]
        b_s = [np.asarray(layer["lora_b"], np.float32) for _, layer, _ in held]
        d_in, d_out = a_s[0].shape[0], b_s[0].shape[1]
        if combination_type == "cat":
            a = np.concatenate([wi * si * ai for wi, si, ai in zip(w, scales, a_s)], axis=1)
            b = np.concatenate(b_s, axis=0)
            a = np.pad(a, ((0, 0), (0, new_rank - a.shape[1])))
            b = np.pad(b, ((0, new_rank - b.shape[0]), (0, 0)))
        elif combination_type.endswith("svd"):
            deltas = [si * ai @ bi for si, ai, bi in zip(scales, a_s, b_s)]
            kind = {"svd": "linear"}.get(combination_type, combination_type[:-4])
            delta = _combine(deltas, w, kind, density, majority_sign_method, mask_fn).astype(np.float32)
            # PEFT takes the SVD of its (out, in) delta, singular values on its lora_B side (the output); it
            # transposes Conv1D (fan_in_fan_out) and embedding deltas first, which moves them to the input side
            input_side = is_transposed(path, adapters[held[0][0]][1]) or matrix_leaf(held[0][1]) == "embedding"
            a, b = _svd_factors(delta, new_rank, input_side, svd_clamp)
        else:
            ws = w * scales
            w_a, w_b = np.sign(ws) * np.sqrt(np.abs(ws)), np.sqrt(np.abs(ws))
            a = _combine(a_s, w_a, combination_type, density, majority_sign_method, mask_fn)
            b = _combine(b_s, w_b, combination_type, density, majority_sign_method, mask_fn)
        assert a.shape == (d_in, new_rank) and b.shape == (new_rank, d_out)
        out[path + ("lora_a",)] = jax.numpy.asarray(a, cfg0.factor_dtype)
        out[path + ("lora_b",)] = jax.numpy.asarray(b, cfg0.factor_dtype)
    cfg = AdapterConfig(method="lora", targets="^(" + "|".join(re.escape(path_str(p)) for p in paths) + ")$",
                        rank=new_rank, alpha=float(new_rank), transposed=cfg0.transposed, train_extra=cfg0.train_extra,
                        kernel_in_axes=cfg0.kernel_in_axes, stacked=cfg0.stacked, factor_dtype=cfg0.factor_dtype)
    return unflatten_dict(out), cfg
