"""The decoder families we implement, as declared entries: Hugging Face ``model_type`` -> how its
``config.json`` reads into the fields of ``decomp_jax.models.llama.LlamaConfig`` (one Linen decoder
whose switches cover the families) and how it is written back.

Nothing is ignored. Each family lists the keys it implements; ``COMMON_KEYS`` are keys that never
change the maths (ids, dtype, ``architectures``, generation settings, ...); ``INERT`` keys are
accepted only at the value that leaves the maths unchanged (dropout 0, ``pretraining_tp`` 1, ...).
Any other key, or an unknown ``model_type``, raises ``UnsupportedConfigError`` in one line naming it
and what is supported.

Both config.json spellings of the rotary embedding are read: transformers 4's ``rope_theta`` +
``rope_scaling`` and transformers 5's ``rope_parameters`` (per layer type for Gemma 3).
Written configs use the 4.x spelling, which transformers 5 reads too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from decomp_jax.errors import ConfigError


class UnsupportedConfigError(ConfigError):
    """A config.json (or GGUF) describes maths decomp_jax's decoder does not implement."""


# keys any config.json may carry that do not change the model's maths
COMMON_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "unk_token_id", "id2label", "label2id", "num_labels", "problem_type", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "auto_map", "_attn_implementation_autoset",
    "attn_implementation", "_attn_implementation", "use_bfloat16", "tf_legacy_loss", "cache_implementation",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "generation_config",
    "keys_to_ignore_at_inference", "is_decoder", "max_window_layers", "_sliding_window_pattern", "use_sliding_window",
})


def _zero(value) -> bool:
    return value in (None, 0, 0.0)


# keys accepted only where they leave the maths unchanged: key -> (check, what it must be)
INERT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "attention_dropout": (_zero, "0"), "resid_pdrop": (_zero, "0"), "embd_pdrop": (_zero, "0"),
    "hidden_dropout": (_zero, "0"), "mlp_dropout": (_zero, "0"), "pretraining_tp": (lambda v: v in (None, 1), "1"),
    "is_encoder_decoder": (lambda v: not v, "false"),
    "add_cross_attention": (lambda v: not v, "false"), "tie_encoder_decoder": (lambda v: not v, "false"),
    "pruned_heads": (lambda v: not v, "empty"), "cross_attention_hidden_size": (lambda v: v is None, "null"),
    "use_bidirectional_attention": (lambda v: not v, "false or null"),
    "router_jitter_noise": (_zero, "0"), "quantization_config": (lambda v: v is None,
                                                                                                "absent"),
}

# the LlamaConfig fields every family reads from config.json under the same name
BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "initializer_range")
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclasses.dataclass(frozen=True)
class Family:
    """One ``model_type``: ``architecture`` (transformers' causal-LM class), ``fields`` it reads under
    their own names beyond ``BASE_FIELDS``, ``fixed`` switches of the family, ``defaults`` for keys a
    config.json may leave out (transformers' defaults for the family), ``sliding`` how its layers
    slide (``none``, ``all`` when ``sliding_window`` is set, ``qwen`` with ``use_sliding_window``,
    ``alternate`` (Gemma 2), ``pattern`` (Gemma 3), ``nope`` (SmolLM3: with ``use_sliding_window``, the
    layers without a rotary embedding))."""

    model_type: str
    architecture: str
    fields: tuple[str, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    sliding: str = "none"
    local_rope: bool = False
    extra_keys: tuple[str, ...] = ()  # read by the family's own rules (sliding windows, partial rotary)
    renames: tuple[tuple[str, str], ...] = ()  # (config.json key, LlamaConfig field) read under another name
    # Phi-3's rope rules (transformers' Phi3Config): only these types, older names of longrope, and longrope's
    # pretraining length read beside the rope settings (its default when absent), never inside them
    rope_types: Optional[tuple[str, ...]] = None
    rope_aliases: tuple[tuple[str, str], ...] = ()
    longrope_original: Optional[int] = None


_GEMMA = (("norm_plus_one", True), ("embed_scale", True))
_GEMMA_DEFAULTS = (("hidden_act", "gelu_pytorch_tanh"), ("tie_word_embeddings", True), ("head_dim", 256),
                   ("bos_token_id", 2), ("eos_token_id", 1), ("pad_token_id", 0))

# mixture of experts (models.mlp): the router and experts' keys every MoE family reads
_MOE = ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits")
_QWEN_MOE = _MOE + ("num_experts", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", ("attention_bias", "mlp_bias")),
    Family("mistral", "MistralForCausalLM", sliding="all", extra_keys=("sliding_window",)),
    Family("qwen2", "Qwen2ForCausalLM", fixed=(("qkv_bias", True),), sliding="qwen",
           extra_keys=("sliding_window", "layer_types")),
    Family("qwen3", "Qwen3ForCausalLM", ("attention_bias",), fixed=(("qk_norm", True),),
           defaults=(("head_dim", 128),), sliding="qwen", extra_keys=("sliding_window", "layer_types")),
    Family("gemma", "GemmaForCausalLM", ("attention_bias",), fixed=_GEMMA, defaults=_GEMMA_DEFAULTS,
           extra_keys=("hidden_activation",)),
    Family("gemma2", "Gemma2ForCausalLM", ("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                                           "final_logit_softcapping"),
           fixed=_GEMMA + (("sandwich_norms", True),),
           defaults=_GEMMA_DEFAULTS + (("query_pre_attn_scalar", 256), ("attn_logit_softcapping", 50.0),
                                       ("final_logit_softcapping", 30.0), ("sliding_window", 4096)),
           sliding="alternate", extra_keys=("hidden_activation", "sliding_window", "layer_types")),
    Family("gemma3_text", "Gemma3ForCausalLM", ("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                                                "final_logit_softcapping"),
           fixed=_GEMMA + (("sandwich_norms", True), ("qk_norm", True)),
           defaults=_GEMMA_DEFAULTS + (("query_pre_attn_scalar", 256), ("sliding_window", 4096),
                                       ("rope_theta", 1_000_000.0), ("rope_local_base_freq", 10_000.0),
                                       ("sliding_window_pattern", 6)),
           sliding="pattern", local_rope=True,
           extra_keys=("hidden_activation", "sliding_window", "layer_types", "rope_local_base_freq",
                       "sliding_window_pattern")),
    Family("mixtral", "MixtralForCausalLM", _MOE, fixed=(("norm_topk_prob", True),),
           defaults=(("rms_norm_eps", 1e-5), ("num_experts", 8)), sliding="all",
           extra_keys=("sliding_window",), renames=(("num_local_experts", "num_experts"),)),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", _QWEN_MOE + ("qkv_bias", "shared_expert_intermediate_size"),
           defaults=(("qkv_bias", True), ("num_experts", 60), ("num_experts_per_tok", 4)), sliding="qwen",
           extra_keys=("sliding_window", "layer_types")),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", _QWEN_MOE + ("attention_bias",), fixed=(("qk_norm", True),),
           defaults=(("head_dim", 128), ("num_experts", 128), ("num_experts_per_tok", 8)), sliding="qwen",
           extra_keys=("sliding_window", "layer_types"), renames=(("num_local_experts", "num_experts"),)),
    Family("smollm3", "SmolLM3ForCausalLM", ("attention_bias", "mlp_bias"),
           defaults=(("rope_theta", 2_000_000.0), ("tie_word_embeddings", True), ("rms_norm_eps", 1e-6),
                     ("num_hidden_layers", 36), ("num_key_value_heads", 4), ("max_position_embeddings", 32768)),
           sliding="nope", extra_keys=("sliding_window", "layer_types", "no_rope_layers", "no_rope_layer_interval")),
    Family("phi3", "Phi3ForCausalLM", fixed=(("fused_projections", True),),
           defaults=(("rms_norm_eps", 1e-5),), sliding="all",
           extra_keys=("sliding_window", "partial_rotary_factor", "original_max_position_embeddings"),
           rope_types=("default", "longrope"), rope_aliases=(("su", "longrope"), ("yarn", "longrope")),
           longrope_original=4096),
)}

SUPPORTED = ", ".join(sorted(FAMILIES))


def family_of(data: dict) -> Family:
    kind = data.get("model_type", "llama")
    if kind not in FAMILIES:
        raise UnsupportedConfigError(
            f"config.json: model_type {kind!r} is not supported by decomp_jax's decoder; supported: {SUPPORTED}.")
    return FAMILIES[kind]


def _check_rope_type(scaling: dict) -> str:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config.json: rope_scaling type {kind!r} is not implemented; supported: {', '.join(ROPE_TYPES)}.")
    return kind


def _rope(data: dict, family: Family, kwargs: dict) -> None:
    """rope_theta / rope_scaling / (Gemma 3) rope_local_theta, from either spelling."""
    params = data.get("rope_parameters")
    defaults = dict(family.defaults)
    theta, scaling, local = data.get("rope_theta"), data.get("rope_scaling"), data.get("rope_local_base_freq")
    if params:
        if family.local_rope and "full_attention" in params:
            local_params = params.get("sliding_attention") or {}
            if local_params.get("rope_type", "default") != "default":
                raise UnsupportedConfigError(
                    f"config.json: rope_parameters.sliding_attention.rope_type {local_params['rope_type']!r}: "
                    f"the local layers' rotary embedding is implemented with the default type only.")
            local = local_params.get("rope_theta", local)
            params = params["full_attention"]
        params = dict(params)
        theta = params.pop("rope_theta", theta)
        if "partial_rotary_factor" in params:
            kwargs["partial_rotary_factor"] = float(params.pop("partial_rotary_factor"))
        if params.get("rope_type", params.get("type", "default")) != "default":
            if scaling and {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type"))} != params:
                _check_rope_type(scaling)
                raise UnsupportedConfigError(f"config.json: rope_scaling {scaling} and rope_parameters {params} disagree; "
                                             f"keep one of them.")
            scaling = params
    if theta is None:
        theta = defaults.get("rope_theta", 10000.0)
    kwargs["rope_theta"] = float(theta)
    if scaling:
        scaling = _family_rope(dict(scaling), family)
        kind = _check_rope_type(scaling)
        if kind != "default":
            kwargs["rope_scaling"] = scaling
            if kind == "longrope":
                _longrope_original(data, family, scaling)
    if family.local_rope:
        kwargs["rope_local_theta"] = float(local if local is not None else defaults["rope_local_base_freq"])


def _family_rope(scaling: dict, family: Family) -> dict:
    """The rope settings under the family's own rules: older type names, and the types it allows."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = dict(family.rope_aliases).get(kind, kind)
    if family.rope_types is not None and kind not in family.rope_types:
        raise UnsupportedConfigError(f"config.json: rope_scaling type {kind!r} is not one of {family.model_type}'s "
                                     f"({', '.join(family.rope_types)}).")
    scaling.pop("type", None)
    return {**scaling, "rope_type": kind}


def _longrope_original(data: dict, family: Family, scaling: dict) -> None:
    """longrope's pretraining length in ``scaling``: a family that keeps it beside the rope settings reads
    it there (Phi-3: its default when absent, whatever the rope settings say, as transformers does);
    others read it inside them, and a config without one is refused."""
    if family.longrope_original is not None:
        given = data.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(given if given is not None else family.longrope_original)
    elif not scaling.get("original_max_position_embeddings"):
        raise UnsupportedConfigError("config.json: rope_scaling type 'longrope' needs original_max_position_embeddings "
                                     "(the pretraining length) and has none.")


def _layer_types(data: dict, family: Family, kwargs: dict) -> None:
    """``sliding_window`` and the per-layer ``layer_types`` the family's rules give."""
    n = int(kwargs.get("num_hidden_layers", 32))
    window = data.get("sliding_window", dict(family.defaults).get("sliding_window"))
    given = data.get("layer_types")
    if family.sliding == "none":
        return
    if family.sliding in ("qwen", "nope") and not data.get("use_sliding_window", False):
        window = None
    if window is None:
        if given and any(t != "full_attention" for t in given):
            raise UnsupportedConfigError("config.json: layer_types name sliding_attention layers but no sliding_window "
                                         "is set (set use_sliding_window and sliding_window, or make every layer "
                                         "full_attention).")
        return
    if given is not None:
        types = tuple(given)
    elif family.sliding == "all":
        types = ("sliding_attention",) * n
    elif family.sliding == "qwen":
        first = int(data.get("max_window_layers", n))
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
    elif family.sliding == "nope":
        types = tuple("sliding_attention" if not rope else "full_attention" for rope in kwargs["no_rope_layers"])
    elif family.sliding == "alternate":
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))
    else:
        pattern = int(data.get("sliding_window_pattern", data.get("_sliding_window_pattern",
                                                                   dict(family.defaults)["sliding_window_pattern"])))
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad or len(types) != n:
        raise UnsupportedConfigError(f"config.json: layer_types {bad or len(types)}: expected {n} entries among "
                                     f"{', '.join(LAYER_TYPES)}.")
    kwargs["sliding_window"] = int(window)
    kwargs["layer_types"] = types


def read_hf_config(data: dict) -> dict:
    """The ``LlamaConfig`` keyword arguments of an HF ``config.json`` dict; refuses (one line) an unknown
    ``model_type`` or any key that would change the maths and is not implemented."""
    family = family_of(data)
    renamed = dict(family.renames)
    known = (set(BASE_FIELDS) | set(family.fields) | set(family.extra_keys) | set(ROPE_KEYS) | COMMON_KEYS
             | set(renamed))
    for key, value in data.items():
        if key in known:
            continue
        if key in INERT:
            ok, must = INERT[key]
            if ok(value):
                continue
            raise UnsupportedConfigError(f"config.json: {key}={value!r} is not implemented by decomp_jax's "
                                         f"{family.model_type} decoder (it must be {must}).")
        raise UnsupportedConfigError(
            f"config.json: key {key!r} (= {value!r}) is not implemented by decomp_jax's {family.model_type} decoder "
            f"and would change the model; implemented keys: {', '.join(sorted(set(BASE_FIELDS) | set(family.fields) | set(family.extra_keys)))}.")
    kwargs: dict[str, Any] = {"model_type": family.model_type}
    for key, value in family.defaults:
        if key in BASE_FIELDS or key in family.fields:
            kwargs[key] = value
    for key in BASE_FIELDS + family.fields:
        if key in data and (data[key] is not None or key in ("pad_token_id", "bos_token_id", "eos_token_id")):
            kwargs[key] = data[key]
    for key, field in family.renames:
        if data.get(key) is not None:
            if data.get(field) is not None and data[field] != data[key]:
                raise UnsupportedConfigError(f"config.json: {key}={data[key]!r} and {field}={data[field]!r} disagree; "
                                             f"keep one of them.")
            kwargs[field] = data[key]
    if "hidden_activation" in family.extra_keys and data.get("hidden_activation") is not None:
        kwargs["hidden_act"] = data["hidden_activation"]
    act = kwargs.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedConfigError(f"config.json: hidden_act {act!r} is not implemented; supported: "
                                     f"{', '.join(ACTIVATIONS)}.")
    if "partial_rotary_factor" in data:
        kwargs["partial_rotary_factor"] = float(data["partial_rotary_factor"])
    kwargs.update(dict(family.fixed))
    _rope(data, family, kwargs)
    if "no_rope_layers" in family.extra_keys:
        _no_rope_layers(data, kwargs)
    _layer_types(data, family, kwargs)
    return kwargs


def _no_rope_layers(data: dict, kwargs: dict) -> None:
    """SmolLM3's NoPE layers: ``no_rope_layers`` as given (1: the layer applies the rotary embedding), or
    every ``no_rope_layer_interval``-th layer without it (transformers' default, interval 4)."""
    n = int(kwargs.get("num_hidden_layers", 32))
    given = data.get("no_rope_layers")
    if given is None:
        interval = int(data.get("no_rope_layer_interval") or 4)
        given = [int((i + 1) % interval != 0) for i in range(n)]
    kwargs["no_rope_layers"] = tuple(int(v) for v in given)


def write_hf_config(config) -> dict:
    """HF's config.json of a ``LlamaConfig`` for its family (weights stored float32)."""
    family = FAMILIES[config.model_type]
    out: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type,
                           "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32"}
    for key in BASE_FIELDS + family.fields:
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    for key, field in family.renames:
        if field not in family.fields:
            out[key] = getattr(config, field)
    if "hidden_activation" in family.extra_keys:
        out["hidden_activation"] = config.hidden_act
    out["rope_theta"] = config.rope_theta
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(config.rope_scaling)
        if family.longrope_original is not None and config.rope_type == "longrope":
            # Phi-3's spelling, which transformers 4 and 5 both read: the pretraining length beside the
            # rope settings, and in them only the type and the factors (and factor overrides if any)
            scaling = dict(config.rope_scaling)
            out["original_max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
            out["rope_scaling"] = {"type": scaling.pop("rope_type"), **scaling}
    if family.local_rope:
        out["rope_local_base_freq"] = config.rope_local_theta
    if config.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = config.partial_rotary_factor
    if "no_rope_layers" in family.extra_keys:
        out["no_rope_layers"] = list(config.no_rope_layers or (1,) * config.num_hidden_layers)
    if family.sliding != "none":
        out["sliding_window"] = config.sliding_window
        if family.sliding in ("qwen", "nope"):
            out["use_sliding_window"] = config.sliding_window is not None
        if "layer_types" in family.extra_keys:
            out["layer_types"] = list(config.layer_types or ("full_attention",) * config.num_hidden_layers)
    return out
