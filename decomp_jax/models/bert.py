"""A native Flax Linen BERT / RoBERTa encoder with sequence- and token-classification heads, tuned for XLA:CPU.

Its parameter tree is transformers' PyTorch names in Flax layout (``bert/embeddings/word_embeddings/embedding``,
``bert/encoder/layer/0/attention/self/query/kernel`` (``(d_in, d_out)``), ``bert/pooler/dense``,
``classifier/...``; RoBERTa: ``roberta/...`` without a pooler and ``classifier/dense``, ``classifier/out_proj``;
the tree transformers' former Flax classes had), so params read from PyTorch checkpoints
(``models.hf.native_params`` / ``load_encoder``), adapter targets, factored execution (every projection
is an ``nn.Dense`` named ``query``/``key``/``value``/``dense``/... called with the hidden states) and
PEFT export (``models.names.ARCHS``) work unchanged. ``BertForSequenceClassification``,
``BertForTokenClassification`` and the bare ``BertModel`` are the Linen modules;
``NativeSequenceClassifier(hf_config)`` wraps the first with the call interface of a transformers
model object (``model(input_ids=..., attention_mask=..., params=..., dropout_rng=..., train=...)``
returning ``.logits``); ``native_like(model)`` builds one from any object with ``config`` and ``params``.

What differs from transformers' former Flax code (same maths, cheaper on XLA:CPU):

- the padding mask is a ``(b, 1, 1, s)`` additive bias, broadcast inside the softmax fusion;
- attention scores and context are batched matmuls on heads-major ``(b, h, s, d)`` operands;
- dropout draws its keep decisions from a counter-based integer hash of the element index and the
  layer's dropout key (``dropout_impl="hash"``, the default): two rounds of a 32-bit
  avalanche hash (xor-shift-multiply), fused into the elementwise kernel that applies the mask,
  instead of Threefry bits materialised per element. The keep-probability is
  ``round(keep * 2**32) / 2**32`` (exact to 2.3e-10); ``dropout_impl="threefry"`` uses
  ``jax.random.bernoulli`` as Flax does;
- attention-probability dropout uses, like HF Flax (``flax.linen.dot_product_attention_weights``
  with ``broadcast_dropout=True``), one ``(q, k)`` mask shared by the batch and the heads
  (``attention_dropout="shared"``); ``"full"`` draws one decision per element (PyTorch's BERT).

The activation is the config's ``hidden_act`` (``gelu`` is the exact erf GELU, as in HF).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from decomp_jax.models.names import ROBERTA_TYPES, encoder_arch, save_classifier_config, torch_state_dict

DROPOUT_IMPLS = ("hash", "threefry")
ATTENTION_DROPOUT = ("shared", "full")


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU ``x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))`` (PyTorch's formula).
    ``jax.nn.gelu(approximate=False)`` evaluates ``x/2 * erfc(-x / sqrt 2)``, whose XLA expansion
    has two branches and an ``exp`` that XLA:CPU materialises; ``erf`` is one fused polynomial.
    The two agree to ~1e-7 absolute in float32."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class NativeBertConfig:
    """The architecture (read from a transformers ``BertConfig`` / ``RobertaConfig`` by
    ``from_hf_config``) and the implementation choices."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: Optional[float] = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    num_labels: int = 2
    model_type: str = "bert"
    pad_token_id: int = 0
    # implementation
    dropout_impl: str = "hash"
    attention_dropout: str = "shared"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose from {sorted(ACTIVATIONS)}")
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise ValueError(f"dropout_impl={self.dropout_impl!r}; choose from {DROPOUT_IMPLS}")
        if self.attention_dropout not in ATTENTION_DROPOUT:
            raise ValueError(f"attention_dropout={self.attention_dropout!r}; choose from {ATTENTION_DROPOUT}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ROBERTA_TYPES

    @property
    def head_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout


def native_support(config: Any) -> Optional[str]:
    """``None`` when this module can run a model of the transformers ``config``, else the reason."""
    model_type = getattr(config, "model_type", "bert")
    if model_type not in ("bert",) + ROBERTA_TYPES:
        return f"model_type {model_type!r} is not a BERT or RoBERTa encoder"
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_decoder", False):
        return "decoder / cross-attention BERT configs are not supported"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return "only absolute position embeddings are supported"
    if getattr(config, "hidden_act", "gelu") not in ACTIVATIONS:
        return f"hidden_act={config.hidden_act!r} is not supported"
    return None


def from_hf_config(config: Any, **options) -> NativeBertConfig:
    """A ``NativeBertConfig`` from a transformers BERT/RoBERTa config; ``options`` set the
    implementation fields (``dropout_impl``, ``attention_dropout``)."""
    problem = native_support(config)
    if problem is not None:
        raise ValueError(problem)
    model_type = getattr(config, "model_type", "bert")
    implementation = {"dropout_impl", "attention_dropout", "model_type"}
    fields = {f.name for f in dataclasses.fields(NativeBertConfig)} - implementation
    values = {name: getattr(config, name) for name in fields if getattr(config, name, None) is not None}
    if getattr(config, "classifier_dropout", None) is None:
        values["classifier_dropout"] = None
    values["pad_token_id"] = getattr(config, "pad_token_id", 0) or 0
    return NativeBertConfig(model_type=model_type, **values, **options)


# ---------------------------------------------------------------------------------------------
# dropout


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit avalanche hash (xor-shift-multiply; the "lowbias32" constants of C. Wellons'
    hash-prospector): a bijection of uint32 whose output bits each flip with probability ~1/2
    when any input bit flips."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Pseudo-random uint32 of ``shape`` from a PRNG key: a counter-based hash of the element's
    flat index and the two key words, computed where it is used (XLA fuses it into the consumer)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = jnp.ravel(data).astype(jnp.uint32)
    k0, k1 = words[0], words[-1]
    size = int(np.prod(shape))
    if size >= 2**32:
        raise ValueError("hash_bits counts elements in uint32")
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):  # the row-major flat index, built from per-axis iotas
        if shape[axis] > 1:
            index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    x = _mix32(index ^ k0)
    return _mix32((x + k1) ^ jnp.uint32(0x9E3779B9))


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...], impl: str = "hash") -> jax.Array:
    """Boolean keep decisions with probability ``1 - rate``."""
    keep = 1.0 - rate
    if impl == "threefry":
        return jax.random.bernoulli(key, keep, shape)
    threshold = min(int(round(keep * 2.0**32)), 2**32 - 1)
    return hash_bits(key, shape) < jnp.uint32(threshold)


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array], impl: str = "hash",
            mask_shape: Optional[tuple[int, ...]] = None) -> jax.Array:
    """Inverted dropout: kept elements scaled by ``1 / (1 - rate)``; ``key=None`` or ``rate=0``:
    identity. ``mask_shape`` (broadcastable to ``x``) shares decisions along its size-1 axes."""
    if key is None or rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    mask = keep_mask(key, rate, tuple(mask_shape or x.shape), impl)
    return jnp.where(mask, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """``nn.Dropout`` with a choice of random-bit source; the key comes from the ``dropout`` RNG
    stream (so the call needs ``rngs={'dropout': key}`` when not deterministic)."""

    rate: float
    impl: str = "hash"

    @nn.compact
    def __call__(self, x, deterministic: bool = True, mask_shape=None):
        if deterministic or self.rate <= 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"), self.impl, mask_shape)


# ---------------------------------------------------------------------------------------------
# modules (names follow transformers' Flax BERT / RoBERTa so the param trees are the same)


def _dense(cfg: NativeBertConfig, features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


class Embeddings(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        cfg, init = self.cfg, nn.initializers.normal(self.cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype, name="word_embeddings")
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                             name="position_embeddings")
        types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                         name="token_type_embeddings")
        # (created in PyTorch's order: word, position, token type; summed in transformers' order)
        word, position = words(input_ids), positions(position_ids)
        h = word + types(token_type_ids) + position
        h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(h)
        return Dropout(cfg.hidden_dropout_prob, cfg.dropout_impl, name="dropout")(h, deterministic)


class SelfAttention(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, bias, head_mask=None, deterministic: bool = True):
        cfg = self.cfg
        heads, width = cfg.num_attention_heads, cfg.hidden_size
        depth = width // heads
        b, s = hidden.shape[:2]
        q = _dense(cfg, width, "query", self.dtype)(hidden).reshape(b, s, heads, depth)
        k = _dense(cfg, width, "key", self.dtype)(hidden).reshape(b, s, heads, depth)
        v = _dense(cfg, width, "value", self.dtype)(hidden).reshape(b, s, heads, depth)
        # heads-major (b, h, s, d) operands and plain batched matmuls: ~2% faster per train step on
        # XLA:CPU than einsum("bqhd,bkhd->bhqk") on the (b, s, h, d) projections (measured)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * jnp.asarray(1.0 / np.sqrt(depth), q.dtype), k, v))
        scores = jnp.matmul(q, k.swapaxes(-1, -2))
        if bias is not None:
            scores = scores + bias.astype(scores.dtype)  # (b, 1, 1, k)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        rate = cfg.attention_probs_dropout_prob
        if not deterministic and rate > 0.0:
            # "shared": one (q, k) mask for the batch and the heads, as HF Flax; with the hash it is
            # recomputed inside the fused multiply, which is cheaper than materialising its broadcast
            shape = (1, 1, s, s) if cfg.attention_dropout == "shared" else probs.shape
            probs = dropout(probs, rate, self.make_rng("dropout"), cfg.dropout_impl, shape)
        if head_mask is not None:
            probs = probs * head_mask.astype(probs.dtype)[None, :, None, None]
        context = jnp.matmul(probs, v).transpose(0, 2, 1, 3)
        return context.reshape(b, s, width)


class SelfOutput(nn.Module):
    """The attention output projection (``attention/output``) and the FFN output (``output``):
    ``LayerNorm(dropout(dense(h)) + residual)``."""

    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, residual, deterministic: bool = True):
        cfg = self.cfg
        h = _dense(cfg, cfg.hidden_size, "dense", self.dtype)(hidden)
        h = Dropout(cfg.hidden_dropout_prob, cfg.dropout_impl, name="dropout")(h, deterministic)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(h + residual)


class Attention(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, bias, head_mask=None, deterministic: bool = True):
        context = SelfAttention(self.cfg, self.dtype, name="self")(hidden, bias, head_mask, deterministic)
        return SelfOutput(self.cfg, self.dtype, name="output")(context, hidden, deterministic)


class Intermediate(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        h = _dense(self.cfg, self.cfg.intermediate_size, "dense", self.dtype)(hidden)
        return ACTIVATIONS[self.cfg.hidden_act](h)


class Layer(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, bias, head_mask=None, deterministic: bool = True):
        attended = Attention(self.cfg, self.dtype, name="attention")(hidden, bias, head_mask, deterministic)
        inner = Intermediate(self.cfg, self.dtype, name="intermediate")(attended)
        return SelfOutput(self.cfg, self.dtype, name="output")(inner, attended, deterministic)


class LayerStack(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, bias, head_mask=None, deterministic: bool = True):
        for i in range(self.cfg.num_hidden_layers):
            layer_mask = None if head_mask is None else head_mask[i]
            hidden = Layer(self.cfg, self.dtype, name=str(i))(hidden, bias, layer_mask, deterministic)
        return hidden


class Encoder(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, bias, head_mask=None, deterministic: bool = True):
        return LayerStack(self.cfg, self.dtype, name="layer")(hidden, bias, head_mask, deterministic)


class Pooler(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(_dense(self.cfg, self.cfg.hidden_size, "dense", self.dtype)(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings, encoder and (BERT) pooler; returns ``(sequence_output, pooled_or_None)``. Alone it is
    transformers' bare ``BertModel`` / ``RobertaModel`` (params ``embeddings``, ``encoder``, ``pooler``: the
    sentence-embedding case, PEFT's FEATURE_EXTRACTION): ``module.apply({'params': p}, input_ids,
    attention_mask, token_type_ids)``, token types and positions defaulting as in the classifiers."""

    cfg: NativeBertConfig
    dtype: Any = jnp.float32
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                 deterministic: bool = True):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, self.cfg)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        embeddings = Embeddings(self.cfg, self.dtype, name="embeddings")
        hidden = embeddings(input_ids, token_type_ids, position_ids, deterministic)
        bias = None
        if attention_mask is not None:  # (b, 1, 1, s) additive bias, broadcast in the softmax
            bias = jnp.where(attention_mask[:, None, None, :] > 0, jnp.zeros((), self.dtype),
                             jnp.asarray(jnp.finfo(self.dtype).min, self.dtype))
        hidden = Encoder(self.cfg, self.dtype, name="encoder")(hidden, bias, head_mask, deterministic)
        pooled = Pooler(self.cfg, self.dtype, name="pooler")(hidden) if self.add_pooling_layer else None
        return hidden, pooled


class RobertaClassificationHead(nn.Module):
    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic: bool = True):
        cfg = self.cfg
        drop = Dropout(cfg.head_dropout, cfg.dropout_impl, name="dropout")
        h = drop(hidden[:, 0], deterministic)
        h = jnp.tanh(_dense(cfg, cfg.hidden_size, "dense", self.dtype)(h))
        h = drop(h, deterministic)
        return _dense(cfg, cfg.num_labels, "out_proj", self.dtype)(h)


class BertForSequenceClassification(nn.Module):
    """``logits = module.apply({'params': p}, input_ids, attention_mask, token_type_ids,
    position_ids, head_mask, deterministic=...)``; params as transformers' Flax classifier."""

    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                 deterministic: bool = True):
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, cfg)
        if cfg.is_roberta:
            hidden, _ = BertModel(cfg, self.dtype, add_pooling_layer=False, name="roberta")(
                input_ids, attention_mask, token_type_ids, position_ids, head_mask, deterministic)
            return RobertaClassificationHead(cfg, self.dtype, name="classifier")(hidden, deterministic)
        _, pooled = BertModel(cfg, self.dtype, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, deterministic)
        pooled = Dropout(cfg.head_dropout, cfg.dropout_impl, name="dropout")(pooled, deterministic)
        # a new head: Flax's default Dense init (LeCun normal kernel, zero bias), as transformers' former Flax
        # BERT classifier drew it (runs reproduce theirs); RoBERTa's head is normal(initializer_range), as theirs
        return nn.Dense(cfg.num_labels, dtype=self.dtype, name="classifier")(pooled)


class BertForTokenClassification(nn.Module):
    """transformers' ``BertForTokenClassification`` / ``RobertaForTokenClassification``: the encoder
    (``bert``/``roberta``, no pooler), dropout, and a ``classifier`` Dense on every token.
    ``module.apply({'params': p}, input_ids, attention_mask, token_type_ids, ...)`` -> ``(B, L, num_labels)``."""

    cfg: NativeBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                 deterministic: bool = True):
        cfg = self.cfg
        hidden, _ = BertModel(cfg, self.dtype, add_pooling_layer=False, name="roberta" if cfg.is_roberta else "bert")(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, deterministic)
        hidden = Dropout(cfg.head_dropout, cfg.dropout_impl, name="dropout")(hidden, deterministic)
        return nn.Dense(cfg.num_labels, dtype=self.dtype, name="classifier")(hidden)  # (init as the sequence head's)


def seeded_key(seed: int) -> jax.Array:
    """The params key of a model's seeded init: ``split(PRNGKey(seed))[0]``, as transformers' Flax
    classes split their seed into params and dropout keys (the same seed gives the same new head)."""
    return jax.random.split(jax.random.PRNGKey(seed))[0]


def init_encoder(module, rng: jax.Array, seq_len: int = 8) -> dict:
    """The params of one of our encoder modules initialised with ``rng`` on a ``(1, seq_len)`` batch, as one
    compiled program (not op by op: 3x faster on a tiny BERT), traced and compiled once per module and length
    in a process: loading the same model again (the seeds of a sweep, a study's cells) reuses it."""
    return _compiled_init(module, rng, seq_len)


@functools.partial(jax.jit, static_argnums=(0, 2))  # (Linen modules hash and compare by their fields)
def _compiled_init(module, rng, seq_len):
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return module.init(rng, ids, jnp.ones_like(ids), jnp.zeros_like(ids))["params"]


def default_position_ids(input_ids: jax.Array, cfg: NativeBertConfig) -> jax.Array:
    """BERT: ``0..s-1``; RoBERTa: ``padding_idx + 1 + (rank among non-padding tokens)``, and
    ``padding_idx`` at padding tokens (as fairseq / transformers)."""
    if cfg.is_roberta:
        real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=-1) * real + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)


# ---------------------------------------------------------------------------------------------
# the HF-like model object


@flax.struct.dataclass
class ClassifierOutput:
    logits: jax.Array

    def __getitem__(self, i):
        return (self.logits,)[i]


class NativeSequenceClassifier:
    """Drop-in for a transformers Flax ``...ForSequenceClassification`` object:
    ``model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
    head_mask=None, params=None, dropout_rng=None, train=False).logits``; ``.config`` (the HF
    config), ``.module`` (the Linen module), ``.params``; ``save_pretrained`` writes config.json
    and a PyTorch-format model.safetensors."""

    def __init__(self, config: Any, params: Optional[dict] = None, dtype: Any = jnp.float32, seed: Optional[int] = None,
                 hf_model: Any = None, **options):
        self.config = config
        self.hf_model = hf_model
        self.native_config = config if isinstance(config, NativeBertConfig) else from_hf_config(config, **options)
        self.dtype = dtype
        self.module = BertForSequenceClassification(self.native_config, dtype=dtype)
        if params is None and seed is not None:
            params = self.init_params(seeded_key(seed))
        self.params = params

    @property
    def architecture_name(self) -> str:
        """The transformers class this model stands in for (checkpoint fingerprints use it, so
        adapters trained with either backbone restore into the other)."""
        return "FlaxRobertaForSequenceClassification" if self.native_config.is_roberta else "FlaxBertForSequenceClassification"

    def save_pretrained(self, folder, params: Optional[dict] = None, **unused):
        """The HF folder of ``params`` (default ``self.params``): ``config.json`` and PyTorch-format
        ``model.safetensors`` (names from ``models.names.ARCHS``), which transformers' PyTorch
        ``AutoModelForSequenceClassification`` and ``models.hf.load_sequence_classifier`` read."""
        import os

        from safetensors.numpy import save_file


        if isinstance(self.config, NativeBertConfig):
            raise ValueError("save_pretrained needs a transformers config (config.json); build the model from one")
        os.makedirs(folder, exist_ok=True)
        save_classifier_config(self.config, folder)
        state = torch_state_dict(self.params if params is None else params, encoder_arch(self.config))
        save_file(state, os.path.join(str(folder), "model.safetensors"), metadata={"format": "pt"})

    def init_params(self, rng: jax.Array, seq_len: int = 8) -> dict:
        return init_encoder(self.module, rng, seq_len)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                 params: Optional[dict] = None, dropout_rng: Optional[jax.Array] = None, train: bool = False,
                 **unused) -> ClassifierOutput:
        for name in ("output_attentions", "output_hidden_states"):
            if unused.pop(name, None):
                raise NotImplementedError(f"{name} is not supported by the native model")
        unused.pop("return_dict", None)
        if unused:
            raise TypeError(f"unexpected arguments {sorted(unused)}")
        params = self.params if params is None else params
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        logits = self.module.apply({"params": params}, input_ids, jnp.asarray(attention_mask), token_type_ids,
                                   position_ids, head_mask, deterministic=not train, rngs=rngs)
        return ClassifierOutput(logits=logits)


def native_like(hf_model: Any, params: Optional[dict] = None, **options) -> NativeSequenceClassifier:
    """A ``NativeSequenceClassifier`` with ``hf_model``'s config, dtype and (unless given) params."""
    dtype = getattr(hf_model, "dtype", jnp.float32)
    return NativeSequenceClassifier(hf_model.config, params=hf_model.params if params is None else params,
                                    dtype=dtype, hf_model=hf_model, **options)
