"""Rotary position embeddings of our Llama decoder, as transformers computes them: the default, linear,
dynamic (NTK), llama3, yarn and longrope types, partial rotary and a local base for sliding-window layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.models.llama_config import LlamaConfig


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(base) ** exponent)).astype(np.float32)


def rope_parameters(config: LlamaConfig) -> tuple[np.ndarray, float]:
    """``(inv_freq (head_dim // 2,), attention_scaling)`` as HF's ``ROPE_INIT_FUNCTIONS`` compute
    them at init (dynamic scaling then equals the default; it changes per call, see ``_inv_freq``)."""
    dim = config.rotary_dim
    base = float(config.rope_theta)
    inv_freq = _default_inv_freq(base, dim)
    kind = config.rope_type
    scaling = config.rope_scaling or {}
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "longrope":
        return _longrope(config, "short_factor"), _longrope_attention(config)
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if (m and m_all) else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention)


def _longrope(config: LlamaConfig, which: str) -> np.ndarray:
    """LongRoPE's inverse frequencies: the default ones, each divided by its ``short_factor`` or
    ``long_factor``."""
    factors = np.asarray(config.rope_scaling[which], np.float32)
    return (_default_inv_freq(float(config.rope_theta), config.rotary_dim) / factors).astype(np.float32)


def _longrope_attention(config: LlamaConfig) -> float:
    """LongRoPE's scale of cos and sin: ``attention_factor`` when given, else
    ``sqrt(1 + ln f / ln n_0)`` for the extension ``f`` (``factor``, or ``max_position_embeddings / n_0``)
    over the pretraining length ``n_0``, and 1 when ``f <= 1``."""
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _inv_freq(config: LlamaConfig, position_ids: jax.Array) -> jax.Array:
    """The inverse frequencies for this call: static, except dynamic NTK scaling, which (as HF's
    ``dynamic_rope_update``) uses base ``theta * (f * n / n_max - (f - 1)) ** (d / (d - 2))`` with
    ``n = max(position_ids) + 1`` once ``n`` exceeds ``max_position_embeddings``, and longrope, whose
    long factors replace the short ones once ``n`` exceeds ``original_max_position_embeddings`` (the
    whole call's: a batch reaching past it takes the long ones for every row, as in HF)."""
    inv_freq, _ = rope_parameters(config)
    if config.rope_type == "longrope":
        past = jnp.max(position_ids) + 1 > config.rope_scaling["original_max_position_embeddings"]
        return jnp.where(past, jnp.asarray(_longrope(config, "long_factor")), jnp.asarray(inv_freq))
    if config.rope_type != "dynamic":
        return jnp.asarray(inv_freq)
    dim = config.rotary_dim
    n_max = config.max_position_embeddings
    factor = float(config.rope_scaling["factor"])
    seq_len = jnp.maximum(jnp.max(position_ids) + 1, n_max).astype(jnp.float32)
    base = config.rope_theta * ((factor * seq_len / n_max) - (factor - 1)) ** (dim / (dim - 2))
    exponent = jnp.arange(0, dim, 2).astype(jnp.float32) / dim
    dynamic = 1.0 / (base ** exponent)
    return jnp.where(jnp.max(position_ids) + 1 > n_max, dynamic, jnp.asarray(inv_freq))


def rotary_cos_sin(config: LlamaConfig, position_ids: jax.Array, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``(B, L, rotary_dim)`` (float32), the two halves repeated. ``local``: the
    sliding layers' embedding of a family with its own local base (``rope_local_theta``, default type)."""
    if local:
        inv_freq, scaling = jnp.asarray(_default_inv_freq(config.rope_local_theta, config.rotary_dim)), 1.0
    else:
        inv_freq, scaling = _inv_freq(config, position_ids), rope_parameters(config)[1]
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """``x`` (B, L, heads, head_dim); cos/sin (B, L, rotary_dim): the first ``rotary_dim`` features of
    each head rotate, the rest pass (partial rotary)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return jnp.concatenate([head * cos + _rotate_half(head) * sin, rest], axis=-1)
