"""A Llama decoder in Flax Linen, with a KV cache (greedy generation: ``models.generation``; the config:
``models.llama_config``; rotary embeddings: ``models.rope``).

Parameter tree (Flax layout, kernels ``(d_in, d_out)``), the names HF's PyTorch checkpoint uses
with ``layers.N`` written ``layers_N``:

    model/embed_tokens/embedding                          (vocab, hidden)
    model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel      (+ bias when attention_bias)
    model/layers_{i}/mlp/{gate,up,down}_proj/kernel       (+ bias when mlp_bias)
    model/layers_{i}/{input,post_attention}_layernorm/weight
    model/norm/weight
    lm_head/kernel                                        untied only; tied: logits = h @ embedding.T

Every projection is a plain ``nn.Dense``, so ``dj.inject`` / ``dj.adapt`` work unchanged (targets
such as ``self_attn/(q_proj|v_proj)$``).

Calling convention:

    logits = model.apply({"params": params}, input_ids, attention_mask)          # (B, L, vocab)
    logits, cache = model.apply({"params": params}, ids, buffer_mask, cache=cache, cache_index=i)

KV cache: an explicit pytree (no Linen "cache" collection, so no ``mutable=``), made by
``init_cache(config, batch, length)``: a tuple with one ``{"key", "value"}`` dict per layer, each
``(batch, length, num_key_value_heads, head_dim)`` in the compute dtype. Keys are stored after the
rotary embedding. With ``cache=`` the call writes its ``L`` new keys/values at buffer positions
``cache_index .. cache_index + L - 1`` (``cache_index`` may be traced) and attends to the whole
buffer; ``attention_mask`` then covers the whole buffer ``(B, length)`` (1 for every real token
written so far or now), which is also what the positions are computed from.

Positions: ``position_ids`` default to ``cumsum(attention_mask) - 1`` (1 on padding, as HF's
``generate``), so left-padded prompts get the positions of their unpadded selves; with no mask,
``arange``. Padding is allowed on either side; the causal mask is combined with the key padding mask.

Packed rows (training): ``segment_ids (B, L)`` int, one id per example of a row (padding its own id,
with ``attention_mask`` 0): a token attends to the earlier tokens of its own example only, and the
positions restart at 0 at each example (``segment_positions``), so each example gives the outputs it
gives alone in a row.

Hooks for prompt / prefix tuning (kept minimal):

- ``inputs_embeds`` (B, L, hidden) replaces the token embedding lookup, so virtual-token embeddings
  can be prepended by the caller (extend ``attention_mask`` with ones for them).
- ``prefix_kv``: a ``(keys, values)`` pair of arrays ``(num_layers, B or 1, P, num_key_value_heads,
  head_dim)`` prepended to every layer's keys/values (already "rotated": used as given, as HF/PEFT
  prefix tuning does with its past_key_values). Every query may attend to all prefix slots. The
  positions of the real tokens are not shifted; PEFT's prefix tuning on HF Llama shifts them by
  ``P`` (its past length), so pass ``position_ids`` explicitly to reproduce that.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from decomp_jax.models.attention import Mask, attention, choose, own_mask, splash_segments
from decomp_jax.models.llama_config import NOPE, SLIDING, LlamaConfig
from decomp_jax.models.mlp import dense, feed_forward
from decomp_jax.models.rope import apply_rotary, rotary_cos_sin
from decomp_jax.models.tiles import in_position_tiles
from decomp_jax.quant import is_quantized



class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``, the normalisation computed in float32. ``plus_one``
    (Gemma): the weight is stored as ``w`` (zeros at init) and applied as ``1 + w`` in float32."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32
    plus_one: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + weight.astype(jnp.float32))).astype(dtype)
        return weight.astype(dtype) * x32.astype(dtype)


def _norm(config: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, jnp.dtype(config.param_dtype), config.norm_plus_one, name=name)


def _has(kind, bit: int):
    """Whether a layer's ``kind`` (``LlamaConfig.layer_kind``) has ``bit``: a bool for a Python int
    (unrolled layers), a traced bool for a traced one (scanned layers)."""
    return bool(kind & bit) if isinstance(kind, int) else (kind & bit) > 0


def _pick(kind, full, sliding):
    """The full-attention or sliding-window variant of a layer input: ``kind`` a Python int (unrolled
    layers) or a traced scalar (scanned layers; both variants exist, one is selected)."""
    if sliding is None:
        return full
    if isinstance(kind, int):
        return sliding if _has(kind, SLIDING) else full
    return jax.tree_util.tree_map(lambda f, s: jnp.where(_has(kind, SLIDING), s, f), full, sliding)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed, cache=None, cache_index=None, prefix=None, segments=None, kind=0):
        """``allowed``: the ``Mask`` of the keys attended (prefix slots excluded);
        ``segments``: the same mask as ``splash`` takes it (``models.attention.splash_segments``: None for a
        call with a cache or prefix slots), ``kind`` the layer's (``LlamaConfig.layer_kind``: bit ``SLIDING`` for a sliding window; an int, or traced under
        scanned layers)."""
        c = self.config
        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, length, _ = x.shape
        x = x.reshape(b * length, -1)  # 2-D projections: no transposing copies in XLA:CPU's backward (see models.mlp.LlamaMLP)
        in_bias = c.attention_bias or c.qkv_bias
        if c.fused_projections:  # one kernel, split as q | k | v
            qkv = dense(c, (heads + 2 * kv_heads) * d, in_bias, "qkv_proj")(x)
            q, k, v = jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=-1)
        else:
            q = dense(c, heads * d, in_bias, "q_proj")(x)
            k = dense(c, kv_heads * d, in_bias, "k_proj")(x)
            v = dense(c, kv_heads * d, in_bias, "v_proj")(x)
        q, k, v = q.reshape(b, length, heads, d), k.reshape(b, length, kv_heads, d), v.reshape(b, length, kv_heads, d)
        if c.qk_norm:
            q, k = _norm(c, "q_norm")(q), _norm(c, "k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_cache = None
        if cache is not None:
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
            values = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
            new_cache = {"key": keys, "value": values}
            k, v = keys.astype(q.dtype), values.astype(q.dtype)
        if prefix is not None:
            pk, pv = prefix
            pk = jnp.broadcast_to(pk, (b,) + pk.shape[1:]).astype(q.dtype)
            pv = jnp.broadcast_to(pv, (b,) + pv.shape[1:]).astype(q.dtype)
            k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
            allowed = allowed.with_prefix(pk.shape[1])
        scale = (c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else d) ** -0.5
        softcap = c.attn_logit_softcapping
        attend = functools.partial(attention, q, k, v, allowed, kv_heads, scale=scale, softcap=softcap,
                                   implementation=c.attention, chunk=c.attention_chunk, segments=segments)
        own = own_mask(choose(c.attention, length, k.shape[1], q.dtype, softcap, segments is not None), allowed)
        if own and c.sliding_window and not isinstance(kind, int):
            # a scanned layer's kind is known when it runs, and the kernel's mask is static: one kernel per kind
            out = jax.lax.cond(_has(kind, SLIDING), lambda: attend(window=c.sliding_window), lambda: attend(window=None))
        else:  # (the other implementations read allowed, already picked for the kind)
            out = attend(window=c.sliding_window if isinstance(kind, int) and _has(kind, SLIDING) else None)
        out = out.reshape(b * length, heads * d)
        return dense(c, c.hidden_size, c.attention_bias, "o_proj")(out).reshape(b, length, -1), new_cache


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals; with ``sandwich_norms`` (Gemma 2/3) the attention
    output goes through ``post_attention_layernorm`` and the MLP's input and output through
    ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` (Llama's ``post_attention_layernorm``
    is the MLP's input norm). ``ropes``: the (full, sliding-or-None) variants, ``masks`` those of ``allowed`` and
    the ``splash`` segment ids (or None); ``kind``
    picks one (``_pick``)."""

    config: LlamaConfig
    sparse: bool = False  # the mixture of experts as its MLP (models.mlp)

    @nn.compact
    def __call__(self, x, ropes, masks, cache=None, cache_index=None, prefix=None, kind=0):
        c = self.config
        cos, sin = _pick(kind, *ropes)
        if c.no_rope_layers is not None:  # a NoPE layer: cos 1 and sin 0 leave q and k as they are
            nope = _has(kind, NOPE)
            cos, sin = jnp.where(nope, 1.0, cos), jnp.where(nope, 0.0, sin)
        allowed = _pick(kind, *masks[:2])
        h, new_cache = LlamaAttention(c, name="self_attn")(
            _norm(c, "input_layernorm")(x), cos, sin, allowed, cache, cache_index, prefix, masks[2], kind
        )
        if c.sandwich_norms:
            x = x + _norm(c, "post_attention_layernorm")(h)
            m = feed_forward(c, self.sparse)(_norm(c, "pre_feedforward_layernorm")(x))
            return x + _norm(c, "post_feedforward_layernorm")(m), new_cache
        x = x + h
        x = x + feed_forward(c, self.sparse)(_norm(c, "post_attention_layernorm")(x))
        return x, new_cache


def _layer_class(config: LlamaConfig):
    if not config.remat:
        return LlamaDecoderLayer
    # cache_index may be None or traced, kind an int or traced: nothing is static
    return nn.remat(LlamaDecoderLayer, prevent_cse=not config.scan_layers)


def _scan(target, length: int, indexed: bool = False, **over):
    """``nn.scan`` of the layers: carry the hidden states; ropes, masks and ``cache_index`` broadcast; cache,
    prefix and kind scanned over (after a scanned layer index with ``indexed``); ``over``: other variable
    axes than the params' and intermediates' leading one."""
    axes = (nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, 0)
    return nn.scan(target, **(over or {"variable_axes": {"params": 0, "intermediates": 0}}),
                   split_rngs={"params": True, "dropout": True}, in_axes=((0,) + axes) if indexed else axes,
                   length=length)


def _scanned_layers(config: LlamaConfig):
    """The decoder layers under one ``nn.scan`` (params with a leading axis of ``num_hidden_layers``); with
    ``remat_segments``, ``_SegmentedLayers`` (the same params)."""
    if not _segmented(config):
        return _scan(_layer_class(config), config.num_hidden_layers)
    return _SegmentedLayers


def _layer_at(module, x, index, ropes, masks, cache, cache_index, prefix, kind):
    """Layer ``index`` of ``module``'s stacked params (``(L, ...)``): its slice is taken as the layer runs."""
    def take(tree):
        return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)

    return nn.map_variables(LlamaDecoderLayer.__call__, "params", trans_in_fn=take)(
        module, x, ropes, masks, cache, cache_index, prefix, kind)


class _SegmentedLayers(LlamaDecoderLayer):
    """``remat_segments`` = G: a scan over G segments, each rematerialised and scanning its L / G layers,
    so the backward pass keeps the G segment inputs and one segment's layer inputs, not all L layer
    inputs (one more forward pass). The params are a decoder layer's with a leading axis of L, as
    ``_scan``'s (built by a plain scan at init); both scans see the whole stack and each layer takes its
    own slice (``_layer_at``), so no segment's kernels are copied out of it. Called as ``_scan``'s layers
    are: the scanned inputs (cache, prefix, kinds) and the cache out with a leading axis of L."""

    def __call__(self, x, ropes, masks, cache, cache_index, prefix, kinds):
        c = self.config
        layers, segments = c.num_hidden_layers, c.remat_segments
        if self.is_initializing():
            return _scan(LlamaDecoderLayer.__call__, layers)(self, x, ropes, masks, cache, cache_index, prefix, kinds)
        shared = dict(variable_broadcast="params", variable_axes={"intermediates": 0})
        segment = _scan(nn.remat(_layer_at, prevent_cse=False), layers // segments, True, **shared)
        run = _scan(nn.remat(segment, prevent_cse=False), segments, True, **shared)
        split = _segments(c, True)
        index = jnp.arange(layers)
        x, new_cache = run(self, x, split(index), ropes, masks, split(cache), cache_index, split(prefix), split(kinds))
        return x, _segments(c, False)(new_cache)


def _segmented(config: LlamaConfig) -> bool:
    return bool(config.remat_segments) and config.remat_segments != config.num_hidden_layers


def _segments(config: LlamaConfig, split: bool):
    """A tree's leading layer axis ``L`` as ``(remat_segments, L / remat_segments)`` (``split``), or back."""
    layers, segments = config.num_hidden_layers, config.remat_segments

    def one(a):
        return a.reshape((segments, layers // segments) + a.shape[1:]) if split else a.reshape((layers,) + a.shape[2:])

    return lambda tree: jax.tree_util.tree_map(one, tree)


def mask_positions(attention_mask, length, cache_index, shift: int = 0):
    """``shift + cumsum(mask) - 1`` (1 on padding) at this call's ``length`` positions of the buffer
    (``shift``: slots before the real tokens, e.g. prompt tuning's virtual tokens)."""
    positions = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1 + shift
    positions = jnp.where(attention_mask == 0, 1, positions)
    if cache_index is None:
        return positions
    return jax.lax.dynamic_slice_in_dim(positions, cache_index, length, axis=1)


def segment_positions(segment_ids):
    """Positions restarting at 0 where each packed example starts (``segment_ids (B, L)``: one id per
    example of a row, a new id where the next one begins)."""
    segment_ids = jnp.asarray(segment_ids)
    index = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], -1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def resolve_mask(batch: int, length: int, attention_mask=None, cache=None, cache_index=None):
    """``(attention_mask, cache_index, key_len)`` with the model's defaults: ``cache_index`` 0 when a
    cache is given; keys span the cache buffer (else the ``length`` inputs); no mask = all ones.
    ValueError when the mask does not span the keys."""
    if cache is not None and cache_index is None:
        cache_index = 0
    key_len = cache[0]["key"].shape[1] if cache is not None else length
    if attention_mask is None:
        attention_mask = jnp.ones((batch, key_len), jnp.int32)
    if attention_mask.shape[-1] != key_len:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns; expected {key_len} "
            f"({'the cache buffer length' if cache is not None else 'the input length'})."
        )
    return attention_mask, cache_index, key_len


class LlamaModel(nn.Module):
    """The decoder stack: returns the final normed hidden states (and the new cache)."""
    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                                     param_dtype=jnp.dtype(c.param_dtype),
                                     embedding_init=nn.initializers.normal(c.initializer_range))
        if c.scan_layers:  # params model/layers/... with a leading axis of num_hidden_layers
            # carry x; scanned over (cache, prefix, kind) slices; ropes, masks, cache_index broadcast
            self.layers = _scanned_layers(c)(c, c.is_sparse(0))
        else:  # named layers_{i}
            self.layers = [_layer_class(c)(c, c.is_sparse(i)) for i in range(c.num_hidden_layers)]
        self.norm = _norm(c, "norm")

    def attend(self, hidden):
        """Tied head: ``hidden @ embedding.T``."""
        return self.embed_tokens.attend(hidden)

    def embed(self, input_ids):
        """The token embeddings, times ``sqrt(hidden_size)`` with ``embed_scale`` (in the parameter dtype,
        as transformers' scaled embedding)."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, jnp.dtype(self.config.param_dtype)).astype(x.dtype)
        return x

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                 cache=None, cache_index=None, prefix_kv=None, segment_ids=None):
        c = self.config
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids or inputs_embeds.")
            x = self.embed(input_ids)
        else:
            x = inputs_embeds.astype(c.compute_dtype)
        b, length = x.shape[:2]
        # (and no segment_ids: Mask.causal drops it)
        plain = attention_mask is None and cache is None and cache_index is None and prefix_kv is None
        attention_mask, cache_index, _ = resolve_mask(b, length, attention_mask, cache, cache_index)
        if segment_ids is not None and (cache is not None or prefix_kv is not None):
            raise ValueError("segment_ids (packed rows) are for training calls: not with a cache or prefix_kv.")
        if position_ids is None:
            position_ids = (mask_positions(attention_mask, length, cache_index) if segment_ids is None
                            else segment_positions(segment_ids))
        query_index = jnp.arange(length) + (0 if cache_index is None else cache_index)
        # causal over buffer positions, padding, packed rows (a token sees the earlier tokens of its own
        # example only); sliding layers: the window over buffer positions, as transformers' mask
        allowed = Mask.causal(query_index, attention_mask, segment_ids, plain=plain)
        kinds = c.layer_kinds
        slides = any(_has(k, SLIDING) for k in kinds)
        sliding = allowed.with_window(c.sliding_window) if slides else None
        ropes = (rotary_cos_sin(c, position_ids),
                 rotary_cos_sin(c, position_ids, local=True) if c.rope_local_theta is not None and slides else None)
        masks = (allowed, sliding,
                 splash_segments(c.attention, attention_mask, segment_ids, cache is None and prefix_kv is None))
        if c.scan_layers:
            stacked_cache = None if cache is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *cache)
            x, new_stacked = self.layers(x, ropes, masks, stacked_cache, cache_index, prefix_kv,
                                         jnp.asarray(kinds, jnp.int32))
            x = self.norm(x)
            if cache is None:
                return x, None
            return x, tuple(jax.tree_util.tree_map(lambda a: a[i], new_stacked) for i in range(c.num_hidden_layers))
        new_cache = []
        for i, layer in enumerate(self.layers):
            prefix = None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i])
            x, layer_cache = layer(x, ropes, masks, None if cache is None else cache[i], cache_index, prefix, kinds[i])
            new_cache.append(layer_cache)
        x = self.norm(x)
        return x, (tuple(new_cache) if cache is not None else None)


def _nll(logits, targets):
    """``logsumexp(logits) - logits[targets]`` over the last axis (float32 logits)."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


class ScoredHead:
    """The outputs of a causal LM (a mixin for Linen modules with a ``_head(hidden)`` -> float32 logits):
    ``logits_at`` ``(B, R)`` int: logits at those positions only, ``(B, R, vocab)`` (a causal-LM loss needs
    them at the response tokens; the head then runs on R positions, not all L).

    ``targets`` ``(B, R)`` int (with ``logits_at``): instead of logits, the negative log-likelihood
    ``logsumexp(logits) - logits[target]`` of each target token, ``(B, R)`` float32. ``chunk``
    (positions, with ``targets``): the ``B * R`` scored positions go through the head and the
    log-softmax ``chunk`` at a time (``chunk // B`` positions of every row, at least one: a batch split over
    devices stays split), under ``nn.scan`` + ``nn.remat``, so no more than ``(chunk, vocab)`` logits exist
    at once, forward or backward (the backward recomputes each chunk's logits: one more head matmul on the
    scored positions). Any head works, adapted or not (the chunks are position-wise)."""

    def _outputs(self, hidden, new_cache, cache, logits_at, targets, chunk):
        if logits_at is not None:
            hidden = jnp.take_along_axis(hidden, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
        if targets is not None:
            if logits_at is None or cache is not None:
                raise ValueError("targets= (the per-token loss) needs logits_at= (the scored positions) and no cache.")
            return self._target_nll(hidden, jnp.asarray(targets, jnp.int32), chunk)
        if chunk is not None:
            raise ValueError("chunk= applies to the per-token loss only: pass targets= (and logits_at=) with it.")
        logits = self._head(hidden)
        return logits if cache is None else (logits, new_cache)

    def _target_nll(self, hidden, targets, chunk):
        if targets.shape != hidden.shape[:2]:
            raise ValueError(f"targets {targets.shape} must have logits_at's shape {hidden.shape[:2]}.")
        if chunk is None:
            return _nll(self._head(hidden), targets)
        if int(chunk) < 1:
            raise ValueError(f"chunk={chunk} must be a positive number of positions (or None: no chunking).")
        per_row = max(1, int(chunk) // hidden.shape[0])  # chunk positions in all: chunk // B of every row
        return in_position_tiles(self, lambda module, hs, ts: _nll(module._head(hs), ts), (hidden, targets), per_row)


class LlamaForCausalLM(ScoredHead, nn.Module):
    """``apply({"params": p}, input_ids, attention_mask)`` -> logits ``(B, L, vocab)`` (float32);
    with ``cache=`` -> ``(logits, new_cache)``. See the module docstring for the other arguments and
    ``ScoredHead`` for ``logits_at``, ``targets`` and ``chunk``."""

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config, self.config.vocab_size, False)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                 cache=None, cache_index=None, prefix_kv=None, logits_at=None, targets=None, chunk=None,
                 segment_ids=None):
        hidden, new_cache = self.model(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                                       cache=cache, cache_index=cache_index, prefix_kv=prefix_kv,
                                       segment_ids=segment_ids)
        return self._outputs(hidden, new_cache, cache, logits_at, targets, chunk)

    def _head(self, hidden):
        logits = self.model.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def embed(self, input_ids):
        """The token embeddings (for building ``inputs_embeds``, e.g. with virtual tokens prepended)."""
        return self.model.embed(input_ids)


def last_token_index(input_ids, attention_mask=None, pad_token_id=None):
    """``(B,)`` position of each row's last real token, as transformers' Llama classifiers pool: the rightmost
    token that is not ``pad_token_id`` (the last position when a row holds none); without a pad id, the
    rightmost position the attention mask keeps (without a mask, the last position)."""
    input_ids = jnp.asarray(input_ids)
    positions = jnp.arange(input_ids.shape[-1])
    if pad_token_id is not None:
        keep = input_ids != pad_token_id
    elif attention_mask is not None:
        keep = jnp.asarray(attention_mask) > 0
    else:
        return jnp.full(input_ids.shape[:1], input_ids.shape[-1] - 1)
    return jnp.argmax(positions * keep, axis=-1)


def last_token_hidden(hidden, input_ids, attention_mask=None, pad_token_id=None):
    """``(B, hidden)``: each row's hidden state at ``last_token_index`` (what a sequence classifier scores)."""
    last = last_token_index(input_ids, attention_mask, pad_token_id)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class LlamaForSequenceClassification(nn.Module):
    """transformers' ``LlamaForSequenceClassification``: ``score`` (hidden -> ``num_labels``, no bias) on the
    last real token of each row (``last_token_index``: the rightmost non-``pad_token_id`` token, as
    transformers pools). ``apply({"params": p}, input_ids, attention_mask)`` -> ``(B, num_labels)`` float32.
    Params ``model/...`` as ``LlamaForCausalLM``'s and ``score/kernel`` (hidden, num_labels); no LM head.
    ``convert.load_hf`` reads a transformers checkpoint of it (``score.weight``)."""

    config: LlamaConfig
    num_labels: int = 2

    def setup(self):
        self.model = LlamaModel(self.config)
        self.score = dense(self.config, self.num_labels, False)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        hidden, _ = self.model(input_ids, attention_mask, position_ids)
        pooled = last_token_hidden(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return self.score(pooled).astype(jnp.float32)


def init_params(config: LlamaConfig, rng: jax.Array):
    """Random params (normal(initializer_range) kernels and embeddings, unit norms): one compiled init (not op by
    op), traced and compiled once per config in a process."""
    return _compiled_init(config, rng)


@functools.partial(jax.jit, static_argnums=0)  # (LlamaConfig hashes: a static argument)
def _compiled_init(config: LlamaConfig, rng: jax.Array):
    return LlamaForCausalLM(config).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def random_params(config: LlamaConfig, seed: int = 0):
    """Random params with ``init_params``' tree and distributions (normal(initializer_range) kernels and
    embedding, unit norm weights, zero biases), drawn leaf by leaf: nothing compiles the model's init
    (jitting the Flax init of a 1B model compiles its forward pass: ~115 s on an H200)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = flatten_dict(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (path, sd) in enumerate(sorted(shapes.items())):
        if path[-1] == "weight":
            out[path] = (jnp.zeros if config.norm_plus_one else jnp.ones)(sd.shape, sd.dtype)
        elif path[-1] == "bias":
            out[path] = jnp.zeros(sd.shape, sd.dtype)
        else:
            out[path] = config.initializer_range * jax.random.normal(jax.random.fold_in(key, i), sd.shape, sd.dtype)
    return unflatten_dict(out)


def stack_layers(params, num_layers: Optional[int] = None, *, root: tuple = ("model",), unrolled: str = "layers_{}"):
    """The unrolled tree (``model/layers_{i}/...``) as the ``scan_layers`` one (``model/layers/...``,
    each leaf stacked on a new leading axis). Any leaves under ``layers_{i}`` move, factor leaves of an
    adapted tree too. ``num_layers`` (default: all present) is checked when given. ``root`` and
    ``unrolled`` (layer ``i``'s path under it, '/'-joined) name another model's layers: GPT-2's are
    ``root=("transformer",), unrolled="h/{}"``."""
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    depth = len(root) + unrolled.count("/") + 1
    before, after = unrolled.split("{}")
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    per_layer: dict[int, dict] = {}
    out = {}
    for path, value in flatten_dict(unfreeze(params)).items():
        found = len(path) > depth and path[:len(root)] == root and pattern.fullmatch(
            "/".join(map(str, path[len(root):depth])))
        if found:
            per_layer.setdefault(int(found.group(1)), {})[path[depth:]] = value
        else:
            out[path] = value
    where = "/".join(root)
    if not per_layer:
        raise ValueError(f"params hold no {where}/{unrolled.format('{i}')} subtrees: are they already stacked "
                         f"({where}/layers/...)?")
    n = len(per_layer)
    if sorted(per_layer) != list(range(n)) or (num_layers is not None and n != num_layers):
        raise ValueError(f"params hold layers {sorted(per_layer)}; expected {unrolled.format(0)} .. "
                         f"{unrolled.format((num_layers or n) - 1)}.")
    keys = set(per_layer[0])
    for i, layer in per_layer.items():
        if set(layer) != keys:
            raise ValueError(f"{unrolled.format(i)} holds other leaves than {unrolled.format(0)}: "
                             f"{sorted(set(layer) ^ keys)[:5]}.")
    for sub in per_layer[0]:
        # a quantized kernel stacks its codes and scales
        out[root + ("layers",) + sub] = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[i][sub] for i in range(n)])
    return unflatten_dict(out)


def unstack_layers(params, *, root: tuple = ("model",), unrolled: str = "layers_{}"):
    """Inverse of ``stack_layers``: ``model/layers/...`` (leading layer axis) -> ``model/layers_{i}/...``
    (``root``, ``unrolled``: as ``stack_layers``')."""
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(unfreeze(params))
    stacked_at = root + ("layers",)
    stacked = {p: v for p, v in flat.items() if p[:len(stacked_at)] == stacked_at}
    where = "/".join(root)
    if not stacked:
        raise ValueError(f"params hold no {where}/layers subtree: are they unrolled ({where}/{unrolled.format('{i}')}/...)?")
    out = {}
    for path, value in flat.items():
        if path in stacked:
            for i in range(value.shape[0]):
                layer = tuple(unrolled.format(i).split("/"))
                out[root + layer + path[len(stacked_at):]] = jax.tree.map(lambda v, i=i: v[i], value)
        else:
            out[path] = value
    return unflatten_dict(out)


def cast_params(params, dtype="bfloat16"):
    """Every floating leaf cast to ``dtype`` (a bfloat16 frozen base, say); a quantized kernel keeps its
    codes and scales and dequantizes to ``dtype``."""

    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params,
                                  is_leaf=is_quantized)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=None):
    """An empty KV cache: one ``{"key", "value"}`` dict per layer, ``(batch, length, kv_heads, head_dim)``."""
    dtype = dtype or config.compute_dtype
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                 for _ in range(config.num_hidden_layers))
