"""The architecture of our Llama decoder (``models.llama``): ``LlamaConfig``, which every Llama-like family's
``config.json`` reads into (``models.families``), and the MLP activations a config may name."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from decomp_jax.models.attention import check_implementation
from decomp_jax.models.families import ROPE_TYPES, read_hf_config, write_hf_config

ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}


MOE_DISPATCH = ("dense", "ragged")


SLIDING, NOPE = 1, 2  # LlamaConfig.layer_kind's bits


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
    linear / dynamic / llama3 / yarn / longrope (Phi-3's long-context and Phi-4-mini's: per-frequency
    ``short_factor`` / ``long_factor``, the long ones once a call's positions pass
    ``original_max_position_embeddings``).

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
    ``rope_local_theta`` (the sliding layers' rotary base, default type: Gemma 3), ``no_rope_layers``
    (HF's SmolLM3 list: per layer 1 where it applies the rotary embedding, 0 where it applies none, NoPE;
    None: every layer applies it).

    Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; ``models.mlp.SparseMoeBlock``): ``num_experts``
    experts (0: every layer has the dense MLP) of width ``moe_intermediate_size`` (default
    ``intermediate_size``), ``num_experts_per_tok`` picked per token by a softmax router, their weights
    renormalised with ``norm_topk_prob``; a layer ``i`` is sparse unless ``i`` is in ``mlp_only_layers``
    or ``(i + 1) % decoder_sparse_step``; ``shared_expert_intermediate_size`` adds Qwen2-MoE's shared
    expert and its sigmoid gate. ``router_aux_loss_coef`` with ``output_router_logits``: the
    load-balancing loss a training step adds by default (as transformers). ``moe_dispatch``: ``dense``
    (every expert runs on every token, weighted by the router: exact, for small models and CPUs) or
    ``ragged`` (tokens sorted by expert, grouped matmuls ``jax.lax.ragged_dot``: for accelerators).

    ``attention``: ``auto``, ``xla``, ``chunked``, ``cudnn`` or ``splash`` (``models.attention``: all scores
    at once, or blocks of ``attention_chunk`` queries and keys with an online softmax, memory linear in the
    length, or cuDNN's fused kernel on GPUs, or the Pallas splash kernel on TPUs); the same numbers from each.

    Long rows: ``mlp_chunk`` (positions) runs the dense MLPs that many positions of every row at a time (a
    mixture's shared expert: that many of its tokens), each tile rematerialised (``models.tiles``): the
    backward pass holds one tile's ``(tokens, intermediate_size)`` activations instead of the rows', at no
    extra arithmetic under ``remat``. ``remat_segments`` (with ``scan_layers`` and ``remat``; it divides
    ``num_hidden_layers``): the scanned layers run as that many rematerialised segments, so the backward
    pass keeps the segments' inputs and one segment's layer inputs instead of every layer's input (one more
    forward pass per step); the params keep their ``(L, ...)`` layout. Both give the same numbers as
    without them.
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
    no_rope_layers: Optional[tuple] = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: Optional[int] = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    shared_expert_intermediate_size: Optional[int] = None
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    moe_dispatch: str = "dense"
    attention: str = "auto"
    attention_chunk: int = 512
    mlp_chunk: Optional[int] = None
    remat_segments: Optional[int] = None

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
        if self.no_rope_layers is not None:
            object.__setattr__(self, "no_rope_layers", tuple(int(v) for v in self.no_rope_layers))
            if len(self.no_rope_layers) != self.num_hidden_layers or set(self.no_rope_layers) - {0, 1}:
                raise ValueError(f"no_rope_layers={list(self.no_rope_layers)}: one 1 (rotary embedding) or 0 (none) per "
                                 f"layer, {self.num_hidden_layers} layers.")
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))
        if self.moe_intermediate_size is None:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        self._check_experts()
        check_implementation(self.attention, self.attn_logit_softcapping)
        if not (isinstance(self.attention_chunk, int) and self.attention_chunk >= 1):
            raise ValueError(f"attention_chunk={self.attention_chunk!r}: a number of positions >= 1 (e.g. 512).")
        self._check_long_rows()
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
            if kind == "longrope":
                self._check_longrope(scaling)

    def _check_longrope(self, scaling: dict):
        half = self.rotary_dim // 2
        for key in ("short_factor", "long_factor"):
            factors = scaling.get(key)
            if not isinstance(factors, (list, tuple)) or len(factors) != half:
                raise ValueError(f"rope_scaling {key}: longrope needs one factor per rotary frequency, {half} here "
                                 f"(head_dim {self.head_dim} x partial_rotary_factor {self.partial_rotary_factor} / 2); "
                                 f"got {factors!r}.")
        if not scaling.get("original_max_position_embeddings"):
            raise ValueError("rope_scaling: longrope needs original_max_position_embeddings (the pretraining length, "
                             "past which the long factors apply).")

    def _check_long_rows(self):
        if self.mlp_chunk is not None and not (isinstance(self.mlp_chunk, int) and self.mlp_chunk >= 1):
            raise ValueError(f"mlp_chunk={self.mlp_chunk!r}: a number of positions >= 1 (e.g. 512), or None (the whole "
                             f"rows at once).")
        segments = self.remat_segments
        if segments is None:
            return
        if not (isinstance(segments, int) and segments >= 1):
            raise ValueError(f"remat_segments={segments!r}: a number of segments >= 1 that divides num_hidden_layers "
                             f"({self.num_hidden_layers}), or None.")
        if not (self.scan_layers and self.remat):
            raise ValueError(f"remat_segments={segments} splits the scanned, rematerialised layers: it needs "
                             f"scan_layers and remat (model.scan_layers: true, train.remat: true).")
        if self.num_hidden_layers % segments:
            fits = [n for n in range(2, self.num_hidden_layers) if self.num_hidden_layers % n == 0]
            raise ValueError(f"remat_segments={segments} does not divide num_hidden_layers={self.num_hidden_layers}; "
                             f"choose one of {fits or [self.num_hidden_layers]}.")

    def _check_experts(self):
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ValueError(f"moe_dispatch={self.moe_dispatch!r}: choose one of {MOE_DISPATCH}.")
        if not self.num_experts:
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts "
                             f"({self.num_experts}).")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1.")
        if self.scan_layers and len(set(self.sparse_layers)) > 1:
            raise ValueError(
                f"scan_layers needs every decoder layer alike, but layers {self.layer_indices(True)} have experts and "
                f"{self.layer_indices(False)} a dense MLP (decoder_sparse_step={self.decoder_sparse_step}, "
                f"mlp_only_layers={list(self.mlp_only_layers)}); set scan_layers: false.")

    def is_sparse(self, i: int) -> bool:
        """Whether decoder layer ``i`` has the mixture of experts (else the dense MLP)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        return tuple(self.is_sparse(i) for i in range(self.num_hidden_layers))

    def layer_indices(self, sparse: bool) -> list[int]:
        return [i for i, s in enumerate(self.sparse_layers) if s == sparse]

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
        """Layer ``i``'s kind: bit 0 (``SLIDING``) a sliding window, bit 1 (``NOPE``) no rotary embedding."""
        sliding = self.layer_types is not None and self.layer_types[i] == "sliding_attention"
        nope = self.no_rope_layers is not None and not self.no_rope_layers[i]
        return SLIDING * sliding + NOPE * nope

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
