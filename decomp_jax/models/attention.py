"""Attention of the decoders, behind one function: ``attention(q, k, v, allowed, ...)``.

Implementations (``LlamaConfig.attention``, the runner's ``model.attention``):

- ``xla``: the scores of every query against every key at once, ``(B, K, G * L, S)`` in float32, one
  softmax (``grouped_attention``). Fastest for short rows; memory grows with ``L * S``.
- ``chunked``: the same attention a block of ``chunk`` queries against a block of ``chunk`` keys at a
  time with an online softmax (running maximum and sum per query, rescaled as blocks arrive), in plain
  JAX. Each block of queries is checkpointed: the backward pass recomputes its scores instead of
  keeping them, so no more than one block row of scores, ``(B, H, chunk, S)``, exists at once; blocks no
  query may see (past the causal diagonal) are skipped. Every mask
  our decoders build (causal, padding on either side, sliding windows, prefix slots, packed segments),
  Gemma 2's soft-capping and grouped key/value heads (never repeated) work as in ``xla``.
- ``cudnn``: ``jax.nn.dot_product_attention`` with cuDNN's fused kernel (GPUs; half precision), for
  masks it takes and without soft-capping.
- ``auto`` (default): ``cudnn`` on a GPU where it applies, else ``chunked`` once a row's query-key
  product reaches ``CHUNKED_FROM`` entries, else ``xla``.

All take ``q (B, L, H, d)``, ``k, v (B, S, K, d)`` with query head ``h = kv_head * groups + g`` (HF's
``repeat_kv`` order) and ``allowed`` bool ``(B, L, S)``, and return ``(B, L, H * d)``. A query row with no
allowed key (a padding position, whose output nothing reads) gets a finite output of no meaning: ``xla``
attends uniformly to all keys, as transformers' eager attention does; ``chunked`` gives zeros.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
# auto: chunked once L * S reaches this (4096 x 4096). On this CPU chunked is slower than xla at 1024 and 2048
# tokens (the backward pass recomputes each block's scores) and saves less than half the memory there
CHUNKED_FROM = 4096 * 4096
_MIN = jnp.finfo(jnp.float32).min


def check_implementation(name: str, softcap: Optional[float] = None) -> None:
    """A clear error for an implementation name we do not have, or one that cannot run the model."""
    if name == "splash":
        raise ValueError("attention='splash' (the Pallas TPU kernel) is not implemented; use 'chunked' (any "
                         "platform, memory linear in the length) or 'auto'.")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}.")
    if name == "cudnn" and softcap is not None:
        raise ValueError(f"attention='cudnn' has no logit soft-capping (this model caps at {softcap}); use "
                         f"'chunked' or 'auto'.")


def choose(name: str, length: int, key_len: int, dtype, softcap: Optional[float] = None) -> str:
    """The implementation ``auto`` stands for here (the platform, the shapes, the dtype, soft-capping)."""
    check_implementation(name, softcap)
    if name != "auto":
        return name
    if jax.default_backend() == "gpu" and softcap is None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "chunked" if length * key_len >= CHUNKED_FROM else "xla"


def attention(q, k, v, allowed, kv_heads: int, scale: Optional[float] = None, softcap: Optional[float] = None,
              implementation: str = "auto", chunk: int = 512):
    """Grouped-query attention by ``implementation`` (see the module's docstring); ``scale`` (default
    ``d ** -0.5``) multiplies the scores, ``softcap`` then maps them to ``softcap * tanh(s / softcap)``."""
    name = choose(implementation, q.shape[1], k.shape[1], q.dtype, softcap)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if name == "chunked":
        return chunked_attention(q, k, v, allowed, kv_heads, scale, softcap, chunk)
    if name == "cudnn":
        return sdpa_attention(q, k, v, allowed, scale, "cudnn")
    return grouped_attention(q, k, v, allowed, kv_heads, scale, softcap)


def _grouped_queries(q, kv_heads: int):
    """``(B, L, H, d)`` -> ``(B, K, G, L, d)``: each key/value head's query heads together."""
    b, length, heads, d = q.shape
    return q.reshape(b, length, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _capped(scores, scale: float, softcap: Optional[float]):
    scores = scores.astype(jnp.float32) * scale
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def grouped_attention(q, k, v, allowed, kv_heads: int, scale: Optional[float] = None, softcap: Optional[float] = None):
    """``xla``: all scores at once. Each key/value head serves its ``groups`` query heads as one
    ``(groups * L, d)`` block, so keys and values are never repeated and the two batched products have
    plain ``(batch, kv_head)`` batch axes (25% faster forward + backward on CPU than the grouped einsum
    with the heads in the middle). Scores and softmax in float32."""
    b, length, heads, d = q.shape
    groups = heads // kv_heads
    qh = _grouped_queries(q, kv_heads).reshape(b, kv_heads, groups * length, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, d)
    scores = _capped(jnp.einsum("bkqd,bksd->bkqs", qh, kh), d ** -0.5 if scale is None else scale, softcap)
    scores = scores.reshape(b, kv_heads, groups, length, -1)
    scores = jnp.where(allowed[:, None, None], scores, _MIN)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, groups * length, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv_heads, groups, length, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, heads * d)


def _padded(x, axis: int, size: int, value=0):
    extra = -x.shape[axis] % size
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q, k, v, allowed, kv_heads: int, scale: float, softcap: Optional[float] = None,
                      chunk: int = 512):
    """``chunked``: blocks of ``chunk`` queries (``jax.checkpoint`` each) against blocks of ``chunk`` keys
    (a ``lax.scan`` carrying each query's running maximum ``m``, sum ``l`` and output ``acc``); a key block
    that no query of the block may see (under the causal mask, every block past the diagonal) is skipped
    (``lax.cond``). Masked scores are ``-inf``; rows are padded to whole blocks (padded keys masked,
    padded queries dropped)."""
    b, length, heads, d = q.shape
    key_len, groups = k.shape[1], heads // kv_heads
    cq, ck = min(chunk, length), min(chunk, key_len)
    qg = _padded(_grouped_queries(q, kv_heads), 3, cq)  # (B, K, G, Lp, d)
    nq, nk = qg.shape[3] // cq, -(-key_len // ck)
    qblocks = qg.reshape(b, kv_heads, groups, nq, cq, d).transpose(3, 0, 1, 2, 4, 5)  # (nq, B, K, G, cq, d)
    mask = _padded(_padded(allowed, 1, cq, False), 2, ck, False)
    mblocks = mask.reshape(b, nq, cq, nk, ck).transpose(1, 0, 2, 3, 4)  # (nq, B, cq, nk, ck)
    kblocks = _padded(k, 1, ck).reshape(b, nk, ck, kv_heads, d).transpose(1, 0, 3, 2, 4)  # (nk, B, K, ck, d)
    vblocks = _padded(v, 1, ck).reshape(b, nk, ck, kv_heads, d).transpose(1, 0, 3, 2, 4)
    real = (jnp.arange(nk * ck) < key_len).reshape(nk, ck)  # padded keys

    @jax.checkpoint
    def query_block(qb, mb):  # (B, K, G, cq, d), (B, cq, nk, ck)
        def update(carry, block):
            m, l, acc = carry
            kb, vb, keep, is_real = block
            s = _capped(jnp.einsum("bkgqd,bksd->bkgqs", qb, kb), scale, softcap)
            s = jnp.where(keep[:, None, None] & is_real, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            fade = jnp.exp(m - m_new)
            acc = acc * fade[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb).astype(jnp.float32)
            return m_new, l * fade + p.sum(-1), acc

        def key_block(carry, block):  # a block no query of this block may see is skipped (causal: half of them)
            return jax.lax.cond(block[2].any(), update, lambda c, _: c, carry, block), None

        shape = qb.shape[:-1]  # the running maximum starts at the lowest finite value: masked scores (-inf) add 0
        init = (jnp.full(shape, _MIN, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(qb.shape, jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_block, init, (kblocks, vblocks, mb.transpose(2, 0, 1, 3), real))
        return jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0).astype(v.dtype)

    out = jax.lax.map(lambda x: query_block(*x), (qblocks, mblocks))  # (nq, B, K, G, cq, d)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * cq, heads * d)
    return out[:, :length]


def sdpa_attention(q, k, v, allowed, scale: float, implementation: Optional[str]):
    """``jax.nn.dot_product_attention`` (``implementation`` ``cudnn``, ``xla`` or None: JAX's choice)
    with our mask; grouped heads are passed as they are (it groups query heads as we do)."""
    b, length, heads, d = q.shape
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale, implementation=implementation)
    return out.reshape(b, length, heads * d)
