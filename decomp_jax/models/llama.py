"""A Llama decoder in Flax Linen, with a KV cache and jit-friendly greedy generation.

Parameter tree (Flax layout, kernels ``(d_in, d_out)``), the names HF's PyTorch checkpoint uses
with ``layers.N`` written ``layers_N``::

    model/embed_tokens/embedding                          (vocab, hidden)
    model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel      (+ bias when attention_bias)
    model/layers_{i}/mlp/{gate,up,down}_proj/kernel       (+ bias when mlp_bias)
    model/layers_{i}/{input,post_attention}_layernorm/weight
    model/norm/weight
    lm_head/kernel                                        untied only; tied: logits = h @ embedding.T

Every projection is a plain ``nn.Dense``, so ``dj.inject`` / ``dj.adapt`` work unchanged (targets
such as ``self_attn/(q_proj|v_proj)$``).

Calling convention::

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

import dataclasses
import math
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.models.families import ROPE_TYPES, read_hf_config, write_hf_config
from decomp_jax.quant import is_quantized


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama architecture; ``from_hf_dict`` / ``to_hf_dict`` read and write HF's config.json.

    ``dtype`` is the compute dtype (activations, cache). ``param_dtype`` is the dtype ``init_params``
    creates parameters in (the Dense/Embed/RMSNorm ``param_dtype``); it does not cast given params:
    for a bfloat16 frozen base cast them yourself (``jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)``,
    ``cast_params``). Each Dense computes in ``dtype`` (its inputs, kernel and factors are cast to it).
    ``scan_layers``: the decoder layers run under one ``nn.scan`` (params ``model/layers/...`` with a
    leading layer axis ``L``, compiled once instead of ``L`` times); ``stack_layers`` / ``unstack_layers``
    convert between that tree and the unrolled ``model/layers_{i}/...`` one (HF/GGUF loaders give the
    unrolled tree). ``remat``: ``nn.remat`` (activation checkpointing) around each decoder layer.
    ``rope_scaling``: None or HF's dict with ``rope_type`` (or legacy ``type``) among
    linear / dynamic / llama3 / yarn.

    The switches below the Llama fields make the other families (``models.families`` reads each
    family's config.json into them): ``qkv_bias`` (biases on q, k, v only: Qwen2), ``qk_norm``
    (RMSNorm over ``head_dim`` on queries and keys before the rotary embedding: Qwen3, Gemma 3),
    ``norm_plus_one`` (RMSNorm weights applied as ``1 + w``, in float32: Gemma), ``embed_scale``
    (embeddings times ``sqrt(hidden_size)``: Gemma), ``sandwich_norms`` (norms after attention and
    after the MLP too: Gemma 2/3), ``fused_projections`` (one ``qkv_proj`` and one ``gate_up_proj``
    kernel: Phi-3), ``partial_rotary_factor`` (the rotary embedding on that fraction of each head),
    ``query_pre_attn_scalar`` (scores scaled by its ``-1/2`` power instead of ``head_dim``'s),
    ``attn_logit_softcapping`` / ``final_logit_softcapping`` (``c * tanh(x / c)`` on the scores /
    logits), ``sliding_window`` with ``layer_types`` (per layer ``full_attention`` or
    ``sliding_attention``: a query sees the ``sliding_window`` latest positions, itself included),
    ``rope_local_theta`` (the sliding layers' rotary base, default type: Gemma 3).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, tuple]] = 2
    pad_token_id: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    model_type: str = "llama"
    hidden_act: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    fused_projections: bool = False
    partial_rotary_factor: float = 1.0
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None
    rope_local_theta: Optional[float] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers.")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types name sliding_attention layers: set sliding_window.")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented; choose one of {sorted(ACTIVATIONS)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not supported; choose one of {ROPE_TYPES}.")
            scaling["rope_type"] = kind
            object.__setattr__(self, "rope_scaling", scaling)

    def __hash__(self):  # rope_scaling is a dict: hash a frozen copy (modules are static jit args)
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_kind(self, i: int) -> int:
        """0: full attention, 1: sliding window."""
        return int(self.layer_types is not None and self.layer_types[i] == "sliding_attention")

    @property
    def layer_kinds(self) -> tuple[int, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_hidden_layers))

    @classmethod
    def from_hf_dict(cls, data: dict, **overrides) -> "LlamaConfig":
        """From the dict of an HF ``config.json`` of any family in ``models.families.FAMILIES``; an unknown
        ``model_type`` or a key that would change the maths and is not implemented is refused
        (``UnsupportedConfigError``), never dropped."""
        kwargs = read_hf_config(data)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """HF's config.json of this family (``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ...; weights stored float32)."""
        return write_hf_config(self)


# --- rotary embeddings ------------------------------------------------------------------------------

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


def _inv_freq(config: LlamaConfig, position_ids: jax.Array) -> jax.Array:
    """The inverse frequencies for this call: static, except dynamic NTK scaling, which (as HF's
    ``dynamic_rope_update``) uses base ``theta * (f * n / n_max - (f - 1)) ** (d / (d - 2))`` with
    ``n = max(position_ids) + 1`` once ``n`` exceeds ``max_position_embeddings``."""
    inv_freq, _ = rope_parameters(config)
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


# --- modules ----------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}


def _dense(config: LlamaConfig, features: int, bias: bool, name: Optional[str] = None) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=config.compute_dtype, param_dtype=jnp.dtype(config.param_dtype),
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


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


def _pick(kind, full, sliding):
    """The full-attention or sliding-window variant of a layer input: ``kind`` a Python int (unrolled
    layers) or a traced scalar (scanned layers; both variants exist, one is selected)."""
    if sliding is None:
        return full
    if isinstance(kind, int):
        return sliding if kind else full
    return jax.tree_util.tree_map(lambda f, s: jnp.where(kind > 0, s, f), full, sliding)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed, cache=None, cache_index=None, prefix=None):
        """``allowed``: bool (B, L, S) over the keys attended (prefix slots excluded)."""
        c = self.config
        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, length, _ = x.shape
        x = x.reshape(b * length, -1)  # 2-D projections: no transposing copies in XLA:CPU's backward (see LlamaMLP)
        in_bias = c.attention_bias or c.qkv_bias
        if c.fused_projections:  # one kernel, split as q | k | v
            qkv = _dense(c, (heads + 2 * kv_heads) * d, in_bias, "qkv_proj")(x)
            q, k, v = jnp.split(qkv, [heads * d, (heads + kv_heads) * d], axis=-1)
        else:
            q = _dense(c, heads * d, in_bias, "q_proj")(x)
            k = _dense(c, kv_heads * d, in_bias, "k_proj")(x)
            v = _dense(c, kv_heads * d, in_bias, "v_proj")(x)
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
            allowed = jnp.concatenate([jnp.ones((b, length, pk.shape[1]), bool), allowed], axis=-1)
        scale = (c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else d) ** -0.5
        out = grouped_attention(q, k, v, allowed, kv_heads, scale=scale, softcap=c.attn_logit_softcapping)
        out = out.reshape(b * length, heads * d)
        return _dense(c, c.hidden_size, c.attention_bias, "o_proj")(out).reshape(b, length, -1), new_cache


def grouped_attention(q, k, v, allowed, kv_heads: int, scale: Optional[float] = None, softcap: Optional[float] = None):
    """Grouped-query attention, heads-major: ``q (B, L, H, d)``, ``k, v (B, S, K, d)`` with query head
    ``h = kv_head * groups + g`` (HF's ``repeat_kv`` order), ``allowed`` bool ``(B, L, S)``; returns
    ``(B, L, H * d)``. Each key/value head serves its ``groups`` query heads as one ``(groups * L, d)``
    block, so keys and values are never repeated and the two batched products have plain
    ``(batch, kv_head)`` batch axes (25% faster forward + backward on CPU than the grouped einsum with
    the heads in the middle). Scores and softmax in float32; ``scale`` (default ``d ** -0.5``) multiplies
    the scores, ``softcap`` (Gemma 2) then maps them to ``softcap * tanh(scores / softcap)``."""
    b, length, heads, d = q.shape
    groups = heads // kv_heads
    qh = q.reshape(b, length, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * length, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh).astype(jnp.float32) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = scores.reshape(b, kv_heads, groups, length, -1)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, groups * length, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv_heads, groups, length, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, heads * d)


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        """On ``x (..., hidden)`` flattened to 2-D: with 3-D ``(batch, length, hidden)`` operands XLA:CPU
        writes the backward's gradients through transposing copies (measured on SmolLM2's MLP, forward +
        backward: full fine-tuning 114 -> 85 ms, LoRA 119 -> 59 ms per layer). ``act(gate) * up``, gate
        and up from one ``gate_up_proj`` kernel (gate first) with ``fused_projections``."""
        c = self.config
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if c.fused_projections:
            gate, up = jnp.split(_dense(c, 2 * c.intermediate_size, c.mlp_bias, "gate_up_proj")(x), 2, axis=-1)
        else:
            gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
            up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        act = ACTIVATIONS[c.hidden_act]
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(act(gate) * up).reshape(lead + (-1,))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals; with ``sandwich_norms`` (Gemma 2/3) the attention
    output goes through ``post_attention_layernorm`` and the MLP's input and output through
    ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` (Llama's ``post_attention_layernorm``
    is the MLP's input norm). ``ropes`` / ``masks``: the (full, sliding-or-None) variants; ``kind``
    picks one (``_pick``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, ropes, masks, cache=None, cache_index=None, prefix=None, kind=0):
        c = self.config
        cos, sin = _pick(kind, *ropes)
        allowed = _pick(kind, *masks)
        h, new_cache = LlamaAttention(c, name="self_attn")(
            _norm(c, "input_layernorm")(x), cos, sin, allowed, cache, cache_index, prefix
        )
        if c.sandwich_norms:
            x = x + _norm(c, "post_attention_layernorm")(h)
            m = LlamaMLP(c, name="mlp")(_norm(c, "pre_feedforward_layernorm")(x))
            return x + _norm(c, "post_feedforward_layernorm")(m), new_cache
        x = x + h
        x = x + LlamaMLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x))
        return x, new_cache


def _layer_class(config: LlamaConfig):
    if not config.remat:
        return LlamaDecoderLayer
    # cache_index may be None or traced, kind an int or traced: nothing is static
    return nn.remat(LlamaDecoderLayer, prevent_cse=not config.scan_layers)


def mask_positions(attention_mask, length, cache_index, shift: int = 0):
    """``shift + cumsum(mask) - 1`` (1 on padding) at this call's ``length`` positions of the buffer
    (``shift``: slots before the real tokens, e.g. prompt tuning's virtual tokens)."""
    positions = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1 + shift
    positions = jnp.where(attention_mask == 0, 1, positions)
    if cache_index is None:
        return positions
    return jax.lax.dynamic_slice_in_dim(positions, cache_index, length, axis=1)


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
            self.layers = nn.scan(_layer_class(c), variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, 0),
                                  length=c.num_hidden_layers)(c)
        else:
            self.layers = [_layer_class(c)(c) for _ in range(c.num_hidden_layers)]  # named layers_{i}
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
                 cache=None, cache_index=None, prefix_kv=None):
        c = self.config
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids or inputs_embeds.")
            x = self.embed(input_ids)
        else:
            x = inputs_embeds.astype(c.compute_dtype)
        b, length = x.shape[:2]
        attention_mask, cache_index, key_len = resolve_mask(b, length, attention_mask, cache, cache_index)
        if position_ids is None:
            position_ids = mask_positions(attention_mask, length, cache_index)
        query_index = jnp.arange(length) + (0 if cache_index is None else cache_index)
        causal = jnp.arange(key_len)[None, :] <= query_index[:, None]  # (L, S)
        allowed = causal[None] & (attention_mask[:, None, :] > 0)  # (B, L, S)
        kinds = c.layer_kinds
        sliding = None
        if any(kinds):  # buffer positions, as transformers' sliding-window mask
            window = jnp.arange(key_len)[None, :] > query_index[:, None] - c.sliding_window
            sliding = allowed & window[None]
        ropes = (rotary_cos_sin(c, position_ids),
                 rotary_cos_sin(c, position_ids, local=True) if c.rope_local_theta is not None and any(kinds) else None)
        masks = (allowed, sliding)
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
    log-softmax ``chunk`` at a time, under ``nn.scan`` + ``nn.remat``, so no more than ``(chunk, vocab)``
    logits exist at once, forward or backward (the backward recomputes each chunk's logits: one more
    head matmul on the scored positions). Any head works, adapted or not (the chunks are rows)."""

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
        b, r, h = hidden.shape
        rows, chunk = b * r, int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk={chunk} must be a positive number of positions (or None: no chunking).")
        chunk = min(chunk, rows)
        n = -(-rows // chunk)
        pad = n * chunk - rows  # padded rows score target 0 and are cut off below
        hs = jnp.pad(hidden.reshape(rows, h), ((0, pad), (0, 0))).reshape(n, chunk, h)
        ts = jnp.pad(targets.reshape(rows), (0, pad)).reshape(n, chunk)

        def body(module, carry, xs):
            return carry, _nll(module._head(xs[0]), xs[1])

        scan = nn.scan(nn.remat(body), variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                       length=n)
        _, nll = scan(self, None, (hs, ts))
        return nll.reshape(n * chunk)[:rows].reshape(b, r)


class LlamaForCausalLM(ScoredHead, nn.Module):
    """``apply({"params": p}, input_ids, attention_mask)`` -> logits ``(B, L, vocab)`` (float32);
    with ``cache=`` -> ``(logits, new_cache)``. See the module docstring for the other arguments and
    :class:`ScoredHead` for ``logits_at``, ``targets`` and ``chunk``."""

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size, False)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                 cache=None, cache_index=None, prefix_kv=None, logits_at=None, targets=None, chunk=None):
        hidden, new_cache = self.model(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                                       cache=cache, cache_index=cache_index, prefix_kv=prefix_kv)
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
        self.score = _dense(self.config, self.num_labels, False)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        hidden, _ = self.model(input_ids, attention_mask, position_ids)
        pooled = last_token_hidden(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return self.score(pooled).astype(jnp.float32)


def init_params(config: LlamaConfig, rng: jax.Array):
    """Random params (normal(initializer_range) kernels and embeddings, unit norms)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return LlamaForCausalLM(config).init(rng, ids)["params"]


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


def stack_layers(params, num_layers: Optional[int] = None):
    """The unrolled tree (``model/layers_{i}/...``) as the ``scan_layers`` one (``model/layers/...``,
    each leaf stacked on a new leading axis). Any leaves under ``layers_{i}`` move, factor leaves of an
    adapted tree too. ``num_layers`` (default: all present) is checked when given."""
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(unfreeze(params))
    per_layer: dict[int, dict] = {}
    out = {}
    for path, value in flat.items():
        if len(path) > 1 and path[0] == "model" and str(path[1]).startswith("layers_"):
            per_layer.setdefault(int(str(path[1])[len("layers_"):]), {})[path[2:]] = value
        else:
            out[path] = value
    if not per_layer:
        raise ValueError("params hold no model/layers_{i} subtrees: are they already stacked (model/layers/...)?")
    n = len(per_layer)
    if sorted(per_layer) != list(range(n)) or (num_layers is not None and n != num_layers):
        raise ValueError(f"params hold layers {sorted(per_layer)}; expected layers_0 .. layers_{(num_layers or n) - 1}.")
    keys = set(per_layer[0])
    for i, layer in per_layer.items():
        if set(layer) != keys:
            raise ValueError(f"layers_{i} holds other leaves than layers_0: {sorted(set(layer) ^ keys)[:5]}.")
    for sub in per_layer[0]:
        # a quantized kernel stacks its codes and scales
        out[("model", "layers") + sub] = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[i][sub] for i in range(n)])
    return unflatten_dict(out)


def unstack_layers(params):
    """Inverse of ``stack_layers``: ``model/layers/...`` (leading layer axis) -> ``model/layers_{i}/...``."""
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(unfreeze(params))
    out = {}
    stacked = {p: v for p, v in flat.items() if p[:2] == ("model", "layers")}
    if not stacked:
        raise ValueError("params hold no model/layers subtree: are they unrolled (model/layers_{i}/...)?")
    for path, value in flat.items():
        if path in stacked:
            for i in range(value.shape[0]):
                out[("model", f"layers_{i}") + path[2:]] = jax.tree.map(lambda v, i=i: v[i], value)
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


# --- generation -------------------------------------------------------------------------------------

def _eos_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (list, tuple)):
        return tuple(int(e) for e in eos_token_id)
    return (int(eos_token_id),)


def prompt_buffer(input_ids, attention_mask, max_new_tokens: int):
    """``(input_ids int32, buffer_mask (B, P + max_new_tokens), last (B,))`` of a greedy decoder: the prompt
    mask (all ones when None) followed by zeros for the new tokens, and each row's last real prompt token."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, prompt_len = input_ids.shape
    mask = jnp.ones((b, prompt_len), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    buffer_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
    last = jnp.max(jnp.where(mask > 0, jnp.arange(prompt_len)[None], 0), axis=1)
    return input_ids, buffer_mask, last


def token_finisher(eos_token_id, pad_token_id: Optional[int]) -> Callable:
    """``finish(tok, done, out, i) -> (tok, done, out)``: a finished row emits the pad id (default: the
    first eos id, else 0), the token is written at column ``i``, and a row is done once it emits an eos id."""
    eos = _eos_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    def finish(tok, done, out, i):
        tok = jnp.where(done, pad, tok).astype(jnp.int32)
        out = out.at[:, i].set(tok)
        if eos:
            done = done | jnp.isin(tok, jnp.asarray(eos))
        return tok, done, out

    return finish


def greedy_generate(model: LlamaForCausalLM, params, input_ids, attention_mask=None, max_new_tokens: int = 20,
                    eos_token_id=None, pad_token_id: Optional[int] = None, *,
                    apply_fn: Optional[Callable] = None, use_cache: bool = True):
    """Greedy decoding: ``(B, P + max_new_tokens)`` int32, the prompt followed by the new tokens.

    Traceable (``jax.jit`` it with ``model, max_new_tokens, eos_token_id, pad_token_id, apply_fn,
    use_cache`` static, or use ``generate``, which does). Prompts may be left- or right-padded
    (``attention_mask``); the first new token follows each row's last real token. With the cache
    (default) it runs one prefill call and then ``max_new_tokens - 1`` one-token calls in a
    ``lax.fori_loop``; ``use_cache=False`` recomputes the whole buffer every step (a reference).
    After a row emits an ``eos_token_id`` (int or sequence) it emits ``pad_token_id`` (default: the
    first eos id, else 0), as HF ``generate`` does. ``apply_fn`` (default ``model.apply``) may be
    ``dj.adapt(model.apply, cfg)`` to generate with an adapter in factored execution.
    """
    apply_fn = apply_fn or model.apply
    input_ids, buffer_mask, last = prompt_buffer(input_ids, attention_mask, max_new_tokens)
    b, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    finish = token_finisher(eos_token_id, pad_token_id)
    variables = {"params": params}

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    done = jnp.zeros((b,), bool)
    rows = jnp.arange(b)
    if use_cache:
        cache = init_cache(model.config, b, total)
        logits, cache = apply_fn(variables, input_ids, buffer_mask, cache=cache, cache_index=0)
        tok = jnp.argmax(logits[rows, last], axis=-1)

        def body(i, carry):
            tok, done, out, cache, buffer_mask = carry
            tok, done, out = finish(tok, done, out, i)
            buffer_mask = buffer_mask.at[:, prompt_len + i].set(1)
            logits, cache = apply_fn(variables, tok[:, None], buffer_mask, cache=cache, cache_index=prompt_len + i)
            return jnp.argmax(logits[:, 0], axis=-1), done, out, cache, buffer_mask

        tok, done, out, _, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (tok, done, out, cache, buffer_mask))
    else:
        eos = _eos_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        ids = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
        logits = apply_fn(variables, ids, buffer_mask)
        tok = jnp.argmax(logits[rows, last], axis=-1)

        def body(i, carry):
            tok, done, out, ids, buffer_mask = carry
            tok, done, out = finish(tok, done, out, i)
            ids = ids.at[:, prompt_len + i].set(tok)
            buffer_mask = buffer_mask.at[:, prompt_len + i].set(1)
            logits = apply_fn(variables, ids, buffer_mask)
            return jnp.argmax(logits[:, prompt_len + i], axis=-1), done, out, ids, buffer_mask

        tok, done, out, _, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (tok, done, out, ids, buffer_mask))
    _, _, out = finish(tok, done, out, max_new_tokens - 1)
    return jnp.concatenate([input_ids, out], axis=1)


_generate_jit = jax.jit(
    greedy_generate, static_argnames=("model", "max_new_tokens", "eos_token_id", "pad_token_id", "apply_fn", "use_cache")
)


def generate(model: LlamaForCausalLM, params, input_ids, attention_mask=None, max_new_tokens: int = 20,
             eos_token_id=None, pad_token_id: Optional[int] = None, *, apply_fn: Optional[Callable] = None,
             use_cache: bool = True):
    """``greedy_generate`` under ``jax.jit`` (compiled once per model, length and settings)."""
    eos = _eos_ids(eos_token_id) or None
    return _generate_jit(model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad_token_id, apply_fn=apply_fn, use_cache=use_cache)
