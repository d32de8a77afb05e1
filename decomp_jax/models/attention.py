"""Attention of the decoders, behind one function: ``attention(q, k, v, allowed, ...)``.

Implementations (``LlamaConfig.attention``, the runner's ``model.attention``):

- ``xla``: the scores of every query against every key at once, ``(B, K, G * L, S)`` in float32, one
  softmax (``grouped_attention``). Fastest for short rows; memory grows with ``L * S``.
- ``chunked``: the same attention a block of ``chunk`` queries against a block of ``chunk`` keys at a
  time with an online softmax (running maximum and sum per query, rescaled as blocks arrive), in plain
  JAX, and a backward pass of its own (``jax.custom_vjp``, as FlashAttention's) that recomputes each
  block's probabilities from the log-sum-exp saved per query: forward and backward hold one
  ``(B, H, chunk, chunk)`` block of scores at a time, never a row of them; blocks no
  query may see (past the causal diagonal) are skipped. Every mask
  our decoders build (causal, padding on either side, sliding windows, prefix slots, packed segments),
  Gemma 2's soft-capping and grouped key/value heads (never repeated) work as in ``xla``.
- ``cudnn``: ``jax.nn.dot_product_attention`` with cuDNN's fused kernel (GPUs; half precision), without
  soft-capping. A ``plain`` mask (causal, and a sliding window, over rows with no padding mask, packed
  segments, cache or prefix slots) goes to cuDNN as its own causal mask; any other as an additive bias
  of ``(B, L, S)``, which JAX's wrapper may also differentiate (a bias gradient nothing reads).
- ``splash``: the Pallas TPU splash-attention kernel (``splash_attention``) for self-attention calls
  (training, scoring): the mask as segment ids (padding and packed examples, ``segment_ids``) under a
  causal or sliding-window mask, soft-capping, grouped heads; a cached decoding step or prefix slots run
  as ``auto`` would off a TPU. Off a TPU it runs in Pallas's interpreter (exact, slow: for tests). XLA
  does not partition a Pallas kernel: on a mesh of several devices use ``chunked`` (no ``shard_map`` here).
- ``auto`` (default): ``splash`` on a single TPU for self-attention calls, ``cudnn`` on a GPU where it applies,
  else ``chunked`` once a row's query-key product reaches ``CHUNKED_FROM`` entries, else ``xla``.

All take ``q (B, L, H, d)``, ``k, v (B, S, K, d)`` with query head ``h = kv_head * groups + g`` (HF's
``repeat_kv`` order) and ``allowed``, and return ``(B, L, H * d)``. ``allowed`` is a bool ``(B, L, S)`` array or
a ``Mask``: the pieces our decoders build the mask from (positions, padding, packed segments, a window,
prefix slots), from which ``chunked`` computes each block's mask as the block runs (a ``(B, L, S)`` array
is never made; the others take ``Mask.dense()``). A query row with no
allowed key (a padding position, whose output nothing reads) gets a finite output of no meaning: ``xla``
attends uniformly to all keys, as transformers' eager attention does; ``chunked`` gives zeros.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
# auto: chunked once L * S reaches this (2048 x 2048). On this CPU (SmolLM2's LoRA step, scanned + remat) chunked
# holds less memory at every length and runs as fast as xla from 1024 tokens on (bench --long)
CHUNKED_FROM = 2048 * 2048
_MIN = jnp.finfo(jnp.float32).min


NO_WINDOW = 2 ** 30  # Mask.window of full attention: wider than any row


@struct.dataclass
class Mask:
    """Which keys each query may see, kept as the pieces a decoder builds it from: query ``i`` of row ``b``
    sees key ``j`` when ``keys[b, j]`` and either ``j < prefix`` (prefix slots, seen by every query) or
    all of: ``key_pos[j] <= query_pos[i]`` (causal, over buffer positions),
    ``key_pos[j] > query_pos[i] - window`` (a sliding window; ``NO_WINDOW`` for none) and
    ``query_seg[b, i] == key_seg[b, j]`` (packed examples; None: one example per row).

    ``query_pos (L,)``, ``key_pos (S,)`` int; ``keys (B, S)`` bool (padding: False); ``window`` an int
    scalar (an array, so a scanned layer's kind can pick it); ``query_seg (B, L)``, ``key_seg (B, S)``.
    ``dense()`` is the ``(B, L, S)`` array.

    ``plain`` (static) says that the mask is nothing but causal (and windowed) over a self-attention
    call's rows: queries and keys at positions ``0..L-1``, every key real, one example per row, no
    prefix slots. A fused kernel's own causal mask then stands for it (``cudnn``: no mask array, cuDNN
    skips the blocks past the diagonal); the decoders set it when they are called without a padding
    mask, a cache, packed segments or prefix slots."""

    query_pos: jax.Array
    key_pos: jax.Array
    keys: jax.Array
    window: jax.Array
    query_seg: Optional[jax.Array] = None
    key_seg: Optional[jax.Array] = None
    prefix: int = struct.field(pytree_node=False, default=0)
    plain: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def causal(cls, query_pos, attention_mask, segment_ids=None, *, plain: bool = False):
        """The decoders' self-attention mask: queries at buffer positions ``query_pos (L,)`` against the
        keys of the buffer ``attention_mask (B, S)`` spans (positions ``0..S-1``; its zeros are padding),
        within ``segment_ids (B, L)`` (packed rows, ``L == S``); no window (``with_window``). ``plain``:
        the caller's word that this is a plain causal mask (see the class)."""
        segments = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        return cls(jnp.asarray(query_pos, jnp.int32), jnp.arange(attention_mask.shape[-1], dtype=jnp.int32),
                   attention_mask > 0, jnp.asarray(NO_WINDOW, jnp.int32), segments, segments,
                   plain=plain and segments is None)

    def with_window(self, window: int) -> "Mask":
        """The same mask within a sliding window of ``window`` keys (a sliding-window layer's)."""
        return self.replace(window=jnp.asarray(window, jnp.int32))

    def with_prefix(self, slots: int) -> "Mask":
        """``slots`` keys ahead of the others (prefix tuning's), seen by every query."""
        if self.prefix:
            raise ValueError("Mask.with_prefix: this mask already has prefix slots.")

        def ahead(a, value):
            return jnp.concatenate([jnp.full(a.shape[:-1] + (slots,), value, a.dtype), a], -1)

        return self.replace(key_pos=ahead(self.key_pos, 0), keys=ahead(self.keys, True), prefix=slots,
                            key_seg=None if self.key_seg is None else ahead(self.key_seg, 0), plain=False)

    def dense(self):
        """``(B, L, S)`` bool."""
        return _keep(self.query_pos, self.query_seg, self.key_pos, self.keys, self.key_seg,
                     jnp.arange(self.key_pos.shape[0]), self.window, self.prefix)


def _keep(query_pos, query_seg, key_pos, keys, key_seg, key_index, window, prefix: int):
    """``Mask``'s rule on a block of it: ``(B, queries, keys)`` bool."""
    seen = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
    seen = jnp.broadcast_to(seen[None], (keys.shape[0],) + seen.shape)
    if query_seg is not None:
        seen = seen & (query_seg[:, :, None] == key_seg[:, None, :])
    if prefix:
        seen = seen | (key_index < prefix)[None, None, :]
    return seen & keys[:, None, :]


def check_implementation(name: str, softcap: Optional[float] = None) -> None:
    """A clear error for an implementation name we do not have, or one that cannot run the model."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}.")
    if name == "cudnn" and softcap is not None:
        raise ValueError(f"attention='cudnn' has no logit soft-capping (this model caps at {softcap}); use "
                         f"'chunked' or 'auto'.")


def choose(name: str, length: int, key_len: int, dtype, softcap: Optional[float] = None,
           segments: bool = False) -> str:
    """The implementation ``auto`` stands for here (the platform, the shapes, the dtype, soft-capping);
    ``segments``: the call passes the segment ids ``splash`` needs (a self-attention call: no cache, no
    prefix slots). ``splash`` without them (a cached decoding step) runs as ``auto`` would off a TPU."""
    check_implementation(name, softcap)
    if name == "splash" and segments:
        return name
    if name not in ("auto", "splash"):
        return name
    if jax.default_backend() == "tpu" and jax.device_count() == 1 and segments:
        return "splash"  # (a Pallas kernel is not partitioned by XLA: across devices it needs a shard_map, not here)
    if jax.default_backend() == "gpu" and softcap is None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "chunked" if length * key_len >= CHUNKED_FROM else "xla"


def attention(q, k, v, allowed, kv_heads: int, scale: Optional[float] = None, softcap: Optional[float] = None,
              implementation: str = "auto", chunk: int = 512, segments=None, window: Optional[int] = None):
    """Grouped-query attention by ``implementation`` (see the module's docstring); ``scale`` (default
    ``d ** -0.5``) multiplies the scores, ``softcap`` then maps them to ``softcap * tanh(s / softcap)``.
    ``segments`` ``(B, L)`` int and ``window``: the same mask as ``allowed`` in the form ``splash`` takes
    (see ``splash_attention``), for self-attention calls; ``cudnn`` on a ``plain`` mask reads ``window``
    too (``own_mask``); the other implementations read ``allowed``."""
    name = choose(implementation, q.shape[1], k.shape[1], q.dtype, softcap, segments is not None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if name == "chunked":
        return chunked_attention(q, k, v, allowed, kv_heads, scale, softcap, chunk)
    if name == "cudnn" and own_mask(name, allowed):
        return sdpa_attention(q, k, v, None, scale, "cudnn", window=window)
    if isinstance(allowed, Mask) and name != "splash":
        allowed = allowed.dense()
    if name == "cudnn":
        return sdpa_attention(q, k, v, allowed, scale, "cudnn")
    if name == "splash":
        return splash_attention(q, k, v, segments, kv_heads, scale, softcap, window, chunk)
    return grouped_attention(q, k, v, allowed, kv_heads, scale, softcap)


def own_mask(name: str, allowed) -> bool:
    """Whether implementation ``name`` (as ``choose`` resolved it) builds the mask itself from the call's
    static ``window`` rather than reading ``allowed``: ``splash``, and ``cudnn`` on a ``plain`` ``Mask``.
    A scanned layer whose kind (full or sliding) is traced then picks its window with ``lax.cond``."""
    return name == "splash" or (name == "cudnn" and isinstance(allowed, Mask) and allowed.plain)


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
    """``chunked``: blocks of ``chunk`` queries against blocks of ``chunk`` keys, with an online softmax
    (each query's running maximum, sum and output, rescaled as key blocks arrive) forward, and a backward
    pass of its own (``jax.custom_vjp``) that recomputes each block's probabilities from the saved
    log-sum-exp per query: forward and backward hold one ``(chunk, chunk)`` block of scores per head at a
    time. A block no query of its block may see (under the causal mask, every block past the diagonal)
    is skipped both ways (``lax.cond``). Masked scores are ``-inf``; rows are padded to whole blocks
    (padded keys masked, padded queries dropped). With a ``Mask``, each block's mask is computed from its
    pieces as the block runs; with a ``(B, L, S)`` array, its blocks are taken from it."""
    b, length, heads, d = q.shape
    key_len, groups = k.shape[1], heads // kv_heads
    cq, ck = min(chunk, length), min(chunk, key_len)
    qg = _padded(_grouped_queries(q, kv_heads), 3, cq)  # (B, K, G, Lp, d)
    nq, nk = qg.shape[3] // cq, -(-key_len // ck)
    qblocks = qg.reshape(b, kv_heads, groups, nq, cq, d).transpose(3, 0, 1, 2, 4, 5)  # (nq, B, K, G, cq, d)
    kblocks = _padded(k, 1, ck).reshape(b, nk, ck, kv_heads, d).transpose(1, 0, 3, 2, 4)  # (nk, B, K, ck, d)
    vblocks = _padded(v, 1, ck).reshape(b, nk, ck, kv_heads, d).transpose(1, 0, 3, 2, 4)
    rows, cols, keep = _mask_blocks(allowed, b, cq, ck, nq, nk)
    out = _blocked(qblocks, kblocks, vblocks, rows, cols, float(scale), softcap, keep)  # (nq, B, K, G, cq, d)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * cq, heads * d)
    return out[:, :length]


def _mask_blocks(allowed, b: int, cq: int, ck: int, nq: int, nk: int):
    """``(rows, cols, keep)``: what each block of queries and each block of keys carries of the mask (leading
    axes ``nq`` and ``nk``) and ``keep(row, col)``, the ``(B, cq, ck)`` mask of one block (padded keys masked)."""
    if not isinstance(allowed, Mask):  # blocks of the array: (nq, nk, B, cq, ck), a key block picked by its index
        mask = _padded(_padded(allowed, 1, cq, False), 2, ck, False)
        mask = mask & (jnp.arange(nk * ck) < allowed.shape[-1])
        return mask.reshape(b, nq, cq, nk, ck).transpose(1, 3, 0, 2, 4), jnp.arange(nk), _block_of_array
    m = allowed

    def by_block(a, size, count, value=0):  # (..., n) -> (count, ..., size)
        a = _padded(a, a.ndim - 1, size, value)
        return jnp.moveaxis(a.reshape(a.shape[:-1] + (count, size)), -2, 0)

    window = jnp.broadcast_to(m.window, (nq,))
    rows = (by_block(m.query_pos, cq, nq), None if m.query_seg is None else by_block(m.query_seg, cq, nq), window)
    cols = (by_block(m.key_pos, ck, nk), by_block(m.keys, ck, nk, False),
            None if m.key_seg is None else by_block(m.key_seg, ck, nk), by_block(jnp.arange(m.keys.shape[-1]), ck, nk))
    return rows, cols, functools.partial(_block_of_mask, prefix=m.prefix)


def _block_of_array(row, col):
    return jax.lax.dynamic_index_in_dim(row, col, keepdims=False)


def _block_of_mask(row, col, prefix: int):
    query_pos, query_seg, window = row
    key_pos, keys, key_seg, key_index = col
    return _keep(query_pos, query_seg, key_pos, keys, key_seg, key_index, window, prefix)


def _block_scores(qb, kb, keep, scale, softcap):
    """One block's scores, scaled and capped, ``-inf`` where masked, and the scores before both (float32)."""
    raw = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
    return jnp.where(keep[:, None, None], _capped(raw, scale, softcap), -jnp.inf), raw


def _forward_row(qb, kblocks, vblocks, row, cols, scale, softcap, keep_of):
    """One block of queries against every key block: ``(out, lse)``; ``lse`` (per query, float32) is
    ``+inf`` for a query with no allowed key (its probabilities are then 0 in the backward pass)."""
    def update(carry, block):
        m, l, acc = carry
        kb, vb, keep = block
        s, _ = _block_scores(qb, kb, keep, scale, softcap)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        fade = jnp.exp(m - m_new)
        acc = acc * fade[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb,
                                                 preferred_element_type=jnp.float32)
        return m_new, l * fade + p.sum(-1), acc

    def key_block(carry, block):
        kb, vb, col = block
        keep = keep_of(row, col)
        return jax.lax.cond(keep.any(), update, lambda c, _: c, carry, (kb, vb, keep)), None

    shape = qb.shape[:-1]  # the running maximum starts at the lowest finite value: masked scores (-inf) add 0
    init = (jnp.full(shape, _MIN, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(qb.shape, jnp.float32))
    (m, l, acc), _ = jax.lax.scan(key_block, init, (kblocks, vblocks, cols))
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(qb.dtype)
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _backward_row(qb, dob, lse, delta, kblocks, vblocks, row, cols, scale, softcap, keep_of):
    """One block of queries' share of the gradients: ``dq`` of the block, ``dk, dv`` of every key block
    (float32). ``p = exp(s - lse)``, ``dp = do v^T``, ``ds = p (dp - delta)`` with ``delta = rowsum(do * o)``,
    through the soft-cap's ``tanh`` when there is one."""
    def update(dq, block):
        kb, vb, keep = block
        s, raw = _block_scores(qb, kb, keep, scale, softcap)
        p = jnp.exp(s - lse[..., None])
        dv = jnp.einsum("bkgqs,bkgqd->bksd", p, dob)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", dob, vb.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        if softcap is not None:
            ds = ds * (1 - jnp.square(jnp.tanh(raw * scale / softcap)))
        dq = dq + jnp.einsum("bkgqs,bksd->bkgqd", ds, kb.astype(jnp.float32))
        return dq, (jnp.einsum("bkgqs,bkgqd->bksd", ds, qb.astype(jnp.float32)), dv)

    def key_block(dq, block):
        kb, vb, col = block
        keep = keep_of(row, col)
        zeros = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        return jax.lax.cond(keep.any(), update, lambda c, _: (c, zeros), dq, (kb, vb, keep))

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), (kblocks, vblocks, cols))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked(qblocks, kblocks, vblocks, rows, cols, scale, softcap, keep_of):
    return _blocked_forward(qblocks, kblocks, vblocks, rows, cols, scale, softcap, keep_of)[0]


def _blocked_forward(qblocks, kblocks, vblocks, rows, cols, scale, softcap, keep_of):
    # (jax.checkpoint costs nothing here, the forward is never differentiated; it keeps the block loops whole
    # when a scan over layers splits its body into what the mask alone determines and the rest: without it,
    # the masks and fills of every block would be computed ahead and stored, a full score matrix per layer)
    run = jax.checkpoint(lambda x: _forward_row(x[0], kblocks, vblocks, x[1], cols, scale, softcap, keep_of))
    out, lse = jax.lax.map(run, (qblocks, rows))
    return out, (qblocks, kblocks, vblocks, rows, cols, out, lse)


def _blocked_backward(scale, softcap, keep_of, saved, dout):
    qblocks, kblocks, vblocks, rows, cols, out, lse = saved
    dout = dout.astype(jnp.float32)
    delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)

    def row(dkv, x):
        qb, dob, lse_b, delta_b, mask_row = x
        dq, dk, dv = _backward_row(qb, dob, lse_b, delta_b, kblocks, vblocks, mask_row, cols, scale, softcap, keep_of)
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = (jnp.zeros(kblocks.shape, jnp.float32), jnp.zeros(vblocks.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(row, zeros, (qblocks, dout, lse, delta, rows))
    return dq.astype(qblocks.dtype), dk.astype(kblocks.dtype), dv.astype(vblocks.dtype), None, None


_blocked.defvjp(_blocked_forward, _blocked_backward)


def sdpa_attention(q, k, v, allowed, scale: float, implementation: Optional[str], window: Optional[int] = None):
    """``jax.nn.dot_product_attention`` (``implementation`` ``cudnn``, ``xla`` or None: JAX's choice)
    with our mask ``allowed`` (a ``(B, L, S)`` array, which cuDNN receives as an additive bias) or, with
    ``allowed`` None, its own causal mask over a self-attention call's rows (and ``window``: a sliding
    window of that many keys), no mask array at all. Grouped heads are passed as they are (it groups
    query heads as we do)."""
    b, length, heads, d = q.shape
    if allowed is None:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation,
                                           local_window_size=None if window is None else (window - 1, 0))
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale, implementation=implementation)
    return out.reshape(b, length, heads * d)


def segment_ids(attention_mask, packed=None):
    """The ids ``splash`` masks by (``(B, L)`` int32): a position attends to the earlier positions with its
    id. Real tokens carry their example's id (``packed``, or 0), padding ``-1``: no real token sees
    padding, and a padding position sees the padding up to itself (a row of no meaning, never empty)."""
    ids = jnp.zeros(attention_mask.shape, jnp.int32) if packed is None else jnp.asarray(packed, jnp.int32)
    return jnp.where(attention_mask > 0, ids, -1)


def splash_segments(implementation: str, attention_mask, packed=None, self_attention: bool = True):
    """What a decoder passes as ``attention``'s ``segments``: ``segment_ids`` for a self-attention call
    (no cache, no prefix slots) whose ``implementation`` may run ``splash`` (``auto`` or ``splash``), else
    None (the other implementations read ``allowed`` only)."""
    if implementation in ("auto", "splash") and self_attention:
        return segment_ids(attention_mask, packed)
    return None


def _splash_kernel(length: int, groups: int, block: int, window: Optional[int], softcap: Optional[float],
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    mask = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), 0)
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # built in the trace that calls it (its mask tables become that trace's constants; a kernel kept across
    # traces would carry one trace's values into another)
    return kernel.make_splash_mqa(masks.MultiHeadMask([mask] * groups), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attention(q, k, v, segments, kv_heads: int, scale: float, softcap: Optional[float] = None,
                     window: Optional[int] = None, chunk: int = 512):
    """``splash``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas``), its own backward
    pass, blocks of ``chunk`` rounded up to a multiple of 128 (rows padded to whole blocks), blocks no query
    may see skipped. The mask is causal (``window``: and a sliding window of that many keys) within
    ``segments`` (``segment_ids``: packed examples, padding), for self-attention (``L == S``). Each
    key/value head serves its query heads through the kernel's multi-query form: K/V never repeated. Off
    a TPU it runs in Pallas's interpreter: exact, slow; for tests."""
    b, length, heads, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"attention='splash' is for self-attention: {length} queries against {k.shape[1]} keys "
                         f"(a cache or prefix slots); those calls take 'xla' or 'chunked'.")
    lanes = 128  # the kernel's blocks are whole multiples of the TPU's 128 lanes
    block = min(-(-chunk // lanes), -(-length // lanes)) * lanes
    padded = -(-length // block) * block
    qg = _padded(_grouped_queries(q * jnp.asarray(scale, q.dtype), kv_heads), 3, padded)  # (B, K, G, Lp, d)
    kh, vh = (_padded(t, 1, padded).transpose(0, 2, 1, 3) for t in (k, v))  # (B, K, Lp, d)
    ids = _padded(jnp.asarray(segments, jnp.int32), 1, padded, -2)  # padded rows: an id of their own
    run = _splash_kernel(padded, heads // kv_heads, block, window, softcap, jax.default_backend() != "tpu")
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    def one(qg, kh, vh, ids):  # one example, one key/value head: (G, Lp, d), (Lp, d), (Lp, d)
        return run(qg, kh, vh, segment_ids=SegmentIds(ids, ids))

    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, kh, vh, ids)  # (B, K, G, Lp, d)
    return out[:, :, :, :length].transpose(0, 3, 1, 2, 4).reshape(b, length, heads * d)
