"""What both directions of the PEFT adapter format share: file names, constants and adapter_config.json
defaults, the per-method tensor tables and their converters, PEFT's module rules, the tied-embedding rules,
and reading and writing the adapter folder.

What the format holds (checked against files that PEFT 0.21 itself writes):

- tensor keys are ``base_model.model.<module>.<leaf>`` with no adapter name in them, e.g.
  ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``;
- LoRA: ``lora_A.weight (r, d_in)``, ``lora_B.weight (d_out, r)``, update ``s * B @ A`` with
  ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); DoRA adds ``lora_magnitude_vector
  (d_out,)`` and sets ``use_dora``;
- IA3: ``ia3_l`` of shape ``(d_out, 1)`` scales the layer's output, bias included
  (``y = (x W^T + b) * l``); on ``feedforward_modules`` it is ``(1, d_in)`` and scales the input;
- AdaLoRA: ``lora_A (r, d_in)``, ``lora_E (r, 1)``, ``lora_B (d_out, r)`` (no ``.weight``), update
  ``lora_alpha * B @ (A * E) / (ranknum + 1e-5)`` with ``ranknum = init_r`` (not saved);
  ``rank_pattern`` (when set) names the kept triplets and the stored factors hold only those;
- prompt learning (causal LMs, our Llama): one tensor ``prompt_embeddings``; PROMPT_TUNING:
  ``(num_virtual_tokens, hidden)``, the virtual-token embeddings; PREFIX_TUNING:
  ``(P, num_layers * 2 * kv_dim)``, row p = ``[layer 0 key, layer 0 value, layer 1 key, ...]``
  (``kv_dim = kv_heads * head_dim``); PEFT saves the projected prefix (never the MLP);
- ``modules_to_save`` modules (for ``task_type: SEQ_CLS`` PEFT always adds ``classifier`` and
  ``score``) are stored whole under their plain names, e.g. ``base_model.model.classifier.weight``;
- tied input/output embeddings (GPT-2's ``wte``, a Llama with ``tie_word_embeddings``): PEFT's
  ``modules_to_save`` wraps a *copy* of the named module, so saving only the embedding unties the
  model (input: the trained copy; ``lm_head``: the original matrix). With ``ensure_weight_tying``
  (LoRA / AdaLoRA configs) and a ``modules_to_save`` entry whose last name is ``embed_tokens`` or
  ``lm_head`` (PEFT checks exactly those two names), PEFT adds the input embedding to
  ``modules_to_save`` and makes ``lm_head``'s copy share the embedding copy's weight; it then saves
  the matrix under both ``<embedding>.weight`` and ``lm_head.weight``. At load, a stored
  ``lm_head.weight`` whose module is not wrapped is written into the base model's (shared) weight.

Our kernels are Flax ``(d_in, d_out)``; an ``nn.Linear.weight`` is ``K.T``. Name maps between Flax
paths and PyTorch module names live in one ``Arch`` entry per architecture (``models.names.ARCHS``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Mapping, Optional

import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.tree import path_str, table_paths
from decomp_jax.errors import ConfigError
from decomp_jax.guards import (
    FileFormatError, atomic_folder, atomic_save_safetensors, atomic_write_text, check_finite, load_safetensors,
    read_json,
)
from decomp_jax.models.convert import safetensors_header
from decomp_jax.models.names import Arch, Path, PeftFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's default before safetensors; read with torch
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.0"  # the format written here is the one PEFT 0.21 writes
ADALORA_EPS = 1e-5  # PEFT's AdaLoRA divides by (ranknum + 1e-5)
PROMPT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING"}
TIEABLE_TYPES = ("LORA", "ADALORA")  # the PEFT configs with ensure_weight_tying
TIE_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES: the only names ensure_weight_tying reacts to
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")  # PEFT's wrappers that add classifier/score to modules_to_save
MERGE_FIX = ("load it in PEFT, merge it (model.merge_and_unload()), save the merged model and convert or load that "
             "as the base instead")


# --- adapter_config.json: the fields PEFT 0.21 writes, with its defaults -----------------------------

_LORA_CONFIG = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
_ADALORA_CONFIG = {
    **_LORA_CONFIG, "peft_type": "ADALORA", "rank_pattern": None, "beta1": 0.85, "beta2": 0.85, "deltaT": 1,
    "init_r": 12, "orth_reg_weight": 0.5, "target_r": 8, "tfinal": 0, "tinit": 0, "total_step": None,
}
_PROMPT_CONFIG = {
    "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
    "num_attention_heads": None, "num_layers": None, "num_transformer_submodules": 1, "num_virtual_tokens": None,
    "peft_version": PEFT_VERSION, "revision": None, "task_type": "CAUSAL_LM", "token_dim": None,
}
_PROMPT_TUNING_CONFIG = {
    **_PROMPT_CONFIG, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
    "tokenizer_kwargs": None, "tokenizer_name_or_path": None,
}
_PREFIX_TUNING_CONFIG = {
    **_PROMPT_CONFIG, "peft_type": "PREFIX_TUNING", "encoder_hidden_size": None, "init_weights": None,
    "prefix_projection": False,
}
_P_TUNING_CONFIG = {
    **_PROMPT_CONFIG, "peft_type": "P_TUNING", "encoder_reparameterization_type": "MLP", "encoder_hidden_size": None,
    "encoder_num_layers": 2, "encoder_dropout": 0.0,
}
_IA3_CONFIG = {
    "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
    "feedforward_modules": None, "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "peft_version": PEFT_VERSION, "revision": None, "target_modules": None, "task_type": None,
}
CONFIG_DEFAULTS = {  # by peft_type
    "LORA": _LORA_CONFIG, "ADALORA": _ADALORA_CONFIG, "IA3": _IA3_CONFIG, "PROMPT_TUNING": _PROMPT_TUNING_CONFIG,
    "PREFIX_TUNING": _PREFIX_TUNING_CONFIG, "P_TUNING": _P_TUNING_CONFIG,
}


# --- per-method tensors: (PEFT leaf suffix, our factor leaf, to_torch, to_flax) --------------------

def transposed(x):
    """``x.T`` as a contiguous array: a Flax kernel as an ``nn.Linear.weight`` and back."""
    return np.ascontiguousarray(np.asarray(x).T)


def _col(x):
    return np.asarray(x)[:, None]


def _uncol(x):
    return np.asarray(x)[:, 0]


def _row(x):
    return np.asarray(x)[None, :]


def _unrow(x):
    return np.asarray(x)[0, :]


def unchanged(x):
    """``x`` as an array, as it is."""
    return np.asarray(x)


_LORA = (("lora_A.weight", "lora_a", transposed, transposed), ("lora_B.weight", "lora_b", transposed, transposed))
FACTORS: dict[str, tuple[tuple[str, str, Callable, Callable], ...]] = {
    "lora": _LORA,
    "lora_bias": _LORA + (("lora_B.bias", "lora_bias", unchanged, unchanged),),  # PEFT's lora_bias=True
    "dora": _LORA + (("lora_magnitude_vector", "magnitude", unchanged, unchanged),),
    "adalora": (("lora_A", "lora_a", transposed, transposed), ("lora_E", "lora_e", _col, _uncol),
                ("lora_B", "lora_b", transposed, transposed)),
    "ia3": (("ia3_l", "scale_out", _col, _uncol),),  # (d_out, 1): scales the output, bias included
    "ssl": (("ia3_l", "scale_in", _row, _unrow),),  # (1, d_in): PEFT's IA3 on feedforward_modules
}


# LoRA on an nn.Embedding: lora_embedding_A (r, vocab) = our lora_a^T, lora_embedding_B (features, r) =
# our lora_b^T (PEFT adds s * A^T B^T to the table: our s * lora_a @ lora_b); no ".weight", no dropout
_LORA_EMBEDDING = (("lora_embedding_A", "lora_a", transposed, transposed),
                   ("lora_embedding_B", "lora_b", transposed, transposed))


def layer_factors(cfg: AdapterConfig, path: Path, table: bool = False) -> tuple:
    """``FACTORS`` of one layer (``table``: an embedding table): ia3_mixed stores ``ia3_l`` as a column
    (output side) or a row (its feedforward layers, input side), as PEFT does."""
    if table:
        if cfg.method != "lora":
            raise ConfigError(
                f"Layer {path_str(path)!r} is an embedding adapted by {cfg.method!r}; PEFT adapts embeddings with plain "
                f"LoRA only (lora_embedding_A/B; rsLoRA and per-layer ranks too). Merge the adapter instead "
                f"(dj.merge / decomp-jax merge), or train LoRA on the embedding.")
        return _LORA_EMBEDDING
    if cfg.method == "ia3_mixed":
        side = cfg.for_layer(path_str(path)).option("input_side")
        return (("ia3_l", "ia3_l", _row, _unrow),) if side else (("ia3_l", "ia3_l", _col, _uncol),)
    return FACTORS[cfg.method]


def stored_shape(flax_shape: tuple, to_flax: Callable) -> tuple:
    """The stored (PyTorch-side) shape whose conversion gives ``flax_shape`` (a converter may say it itself,
    as its ``stored_shape`` attribute: a function of the Flax shape)."""
    if hasattr(to_flax, "stored_shape"):
        return tuple(to_flax.stored_shape(tuple(flax_shape)))
    inverse = {transposed: transposed, unchanged: unchanged, _uncol: _col, _unrow: _row}[to_flax]
    return tuple(inverse(np.zeros(flax_shape)).shape)


# --- params -------------------------------------------------------------------------------------------

def flat_params(params) -> dict[Path, Any]:
    """``params`` as one flat ``{path: leaf}`` dict."""
    return flatten_dict(unfreeze(params))


def as_numpy(x) -> np.ndarray:
    """``x`` as a NumPy array: float16/32/64 as they are, any other dtype (bfloat16, ...) as float32."""
    a = np.asarray(x)
    return a if a.dtype in (np.float16, np.float32, np.float64) else a.astype(np.float32)


def leaves_under(flat: Mapping[Path, Any], modules: list[Path]) -> list[Path]:
    """The leaf paths of ``flat`` inside any of the module paths ``modules``."""
    return [p for p in flat if any(p[: len(m)] == m and len(p) > len(m) for m in modules)]


# --- PEFT's module rules -------------------------------------------------------------------------------

def peft_targets(key: str, target_modules, exclude_modules=None) -> bool:
    """PEFT's target rule: ``re.fullmatch`` for a string, else ``key == t or key.endswith('.' + t)``;
    ``exclude_modules`` (same forms) wins."""
    if exclude_modules and (
        re.fullmatch(exclude_modules, key) if isinstance(exclude_modules, str)
        else key in exclude_modules or any(key.endswith("." + e) for e in exclude_modules)
    ):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith("." + t) for t in target_modules)


def in_layers_to_transform(key: str, config: Mapping[str, Any]) -> bool:
    """PEFT's ``layers_to_transform`` / ``layers_pattern`` rule (for a list of ``target_modules`` matched by
    suffix): the module's layer index, the first number after ``<layers_pattern>.`` (any component when
    no pattern is given), must be one of the listed layers."""
    indexes, patterns, targets = config.get("layers_to_transform"), config.get("layers_pattern"), config.get("target_modules")
    if indexes is None or indexes == [] or isinstance(targets, str) or key in (targets or []):
        return True
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def in_saved_module(key: str, modules_to_save) -> bool:
    """PEFT never puts an adapter on (or inside) a modules_to_save module."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save or ())


def saved_modules(flat: Mapping[Path, Any], arch: Arch, modules_to_save) -> list[Path]:
    """The Flax module paths PEFT wraps for ``modules_to_save`` (``name.endswith(m)``), outermost only."""
    names = sorted({path[:i] for path in flat for i in range(1, len(path))}, key=len)
    chosen: list[Path] = []
    for path in names:
        if any(path[: len(c)] == c for c in chosen):
            continue
        if any(arch.torch_module(path).endswith(m) for m in modules_to_save or ()):
            chosen.append(path)
    return chosen


def peft_pattern_value(pattern: Mapping[str, Any], module: str):
    """PEFT's lookup of a ``rank_pattern`` / ``alpha_pattern`` key: the first key ``k`` (in order) with
    ``re.match(rf"(.*[.])?({k})$", module)``; None when none matches."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


# --- tied input and output embeddings --------------------------------------------------------------------

def tied_embedding(flat: Mapping[Path, Any], spec: Arch) -> Optional[Path]:
    """The input embedding's Flax module path when the model's LM head is tied to it (a causal LM
    whose params hold the embedding and no ``lm_head``: one matrix for both), else None."""
    emb = spec.embedding
    if spec.task_type != "CAUSAL_LM" or emb is None or not any(p[: len(emb)] == emb for p in flat):
        return None
    if any(p[0] in spec.head_modules for p in flat):  # a classifier (score head): no LM head at all
        return None
    return None if any(p[0] == spec.lm_head for p in flat) else emb


def tied_head_lora(layer, spec: Arch) -> dict[str, np.ndarray]:
    """The tensors PEFT saves for the LoRA it ties to ``lm_head`` when LoRA adapts a tied embedding with
    ``ensure_weight_tying``: the head's weight is the table (vocab, features), so its ``lora_B`` (vocab, r)
    is our ``lora_a`` and its ``lora_A`` (r, features) our ``lora_b``."""
    head = PREFIX + spec.lm_head
    return {head + ".lora_A.weight": np.ascontiguousarray(as_numpy(layer["lora_b"])),
            head + ".lora_B.weight": np.ascontiguousarray(as_numpy(layer["lora_a"]))}


def check_embedding_targets(config: dict, base_flat, spec: Arch, tied: Optional[Path], target_modules,
                            exclude) -> None:
    """Refuse the LoRA-on-embedding adapters decomp_jax cannot run as PEFT does: DoRA on an embedding, and
    on a tied model (one matrix for the lookup and the LM head) any adapter PEFT runs on one of the two only:
    LoRA on the embedding without ``ensure_weight_tying`` (PEFT's head keeps the base matrix) or on
    ``lm_head`` alone. LoRA on a tied embedding with ``ensure_weight_tying`` is read: PEFT then runs the
    head with the same adapted matrix, as decomp_jax's factored and merged execution do."""
    names = sorted({spec.torch_module(p) for p in table_paths(base_flat)})
    hit = [n for n in names if peft_targets(n, target_modules, exclude)]
    head = tied is not None and peft_targets(spec.lm_head, target_modules, exclude)
    if hit and config.get("use_dora"):
        raise PeftFormatError(f"use_dora with the embedding layers {hit} in target_modules: PEFT's DoRA on embeddings "
                              f"is not read here (plain LoRA on embeddings is). Fix: {MERGE_FIX}.")
    if tied is None:
        return
    emb = spec.torch_module(tied)
    tieable = emb.split(".")[-1] in TIE_NAMES  # the only names PEFT's ensure_weight_tying reacts to
    if emb in hit and not (config.get("ensure_weight_tying") and tieable):
        raise PeftFormatError(
            f"target_modules={target_modules!r} puts LoRA on {emb}, which this model ties to {spec.lm_head}, "
            + ("without ensure_weight_tying" if tieable else
               f"and PEFT ties adapters only for modules named {' / '.join(TIE_NAMES)}")
            + f": PEFT then adapts the input lookups only and runs {spec.lm_head} with the base matrix; decomp_jax's "
            f"{spec.name} model holds one matrix for both and adapts it for both. Fix: "
            + (f"train with ensure_weight_tying=True (PEFT then gives {spec.lm_head} the same adapter), or "
               if tieable else "")
            + "import into an untied copy of the base model (tie_word_embeddings=False, lm_head = the embedding).")
    if head and emb not in hit:
        raise PeftFormatError(
            f"target_modules={target_modules!r} puts an adapter on {spec.lm_head}, which this model ties to {emb}, "
            f"and not on {emb}: PEFT adapts the head only, and decomp_jax's {spec.name} model holds one matrix for "
            f"both. Fix: target {emb} with ensure_weight_tying=True (one adapter for both), or import into an "
            f"untied copy of the base model (tie_word_embeddings=False, lm_head = the embedding).")


def tied_import(config: dict, stored: Mapping[str, np.ndarray], base_flat, spec: Arch, tied: Path,
                modules_to_save: list, saved: list[Path], weights_path: str):
    """The one matrix that PEFT 0.21's model uses as both input embedding and LM head after loading
    this adapter on the tied base, as ``(matrix or None when the adapter leaves it alone, keys read,
    keys missing)``; refuses an adapter with which PEFT's two matrices differ.

    As PEFT loads it: a ``modules_to_save`` wrapper holds a copy of its module and gets the stored
    tensor; ``ensure_weight_tying`` (LoRA/AdaLoRA, with ``embed_tokens`` or ``lm_head`` named in
    ``modules_to_save``) wraps the embedding and makes ``lm_head``'s copy share its weight; a stored
    ``lm_head.weight`` whose module is not wrapped is written into the base's shared tied weight.
    """
    emb_module = spec.torch_module(tied)
    emb_key, head_key = PREFIX + spec.torch_leaf(tied + ("embedding",))[0], PREFIX + spec.lm_head + ".weight"
    tying = (config.get("peft_type") in TIEABLE_TYPES and bool(config.get("ensure_weight_tying"))
             and any(str(m).split(".")[-1] in TIE_NAMES for m in modules_to_save))
    emb_wrapped = tying or any(tied[: len(s)] == s for s in saved)
    head_wrapped = tying or any(spec.lm_head.endswith(m) for m in modules_to_save)
    missing = [k for k, wrapped in ((emb_key, emb_wrapped), (head_key, head_wrapped)) if wrapped and k not in stored]
    read = {k for k in (emb_key, head_key) if k in stored and (k == head_key or emb_wrapped)}
    if missing:
        return None, read, missing
    base = np.asarray(base_flat[tied + ("embedding",)])
    wrong = [f"{k}: stored {tuple(stored[k].shape)}, expected {base.shape}" for k in sorted(read)
             if tuple(stored[k].shape) != base.shape]
    if wrong:
        raise PeftFormatError(f"Tensors of the wrong shape in {weights_path}: {wrong}.")
    a = stored[emb_key] if emb_wrapped else None
    b = stored.get(head_key)
    base_src = "the base model's embedding"
    shared, shared_src = (b, f"the stored {head_key}") if b is not None and not head_wrapped else (base, base_src)
    e_in, in_src = (a, f"the stored {emb_key}") if emb_wrapped else (shared, shared_src)
    if tying:
        if not np.array_equal(a, b):
            raise PeftFormatError(
                f"{weights_path} stores different {emb_key} and {head_key} (max abs difference "
                f"{np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max():.3g}) although "
                f"ensure_weight_tying makes them one matrix in PEFT (which one wins depends on PEFT's load order). "
                f"Fix: save the adapter again with PEFT (it writes the tied matrix under both names)."
            )
        e_out, out_src = a, in_src
    elif head_wrapped:
        e_out, out_src = b, f"the stored {head_key}"
    else:
        e_out, out_src = shared, shared_src
    if not np.array_equal(e_in, e_out):
        diff = np.abs(np.asarray(e_in, np.float64) - np.asarray(e_out, np.float64)).max()
        raise PeftFormatError(
            f"{weights_path}: PEFT would run this adapter with untied embeddings: input embedding = {in_src}, "
            f"LM head = {out_src} (max abs difference {diff:.3g}), since modules_to_save={modules_to_save} with "
            f"ensure_weight_tying={bool(config.get('ensure_weight_tying'))} leaves PEFT two separate matrices. "
            f"decomp_jax's {spec.name} model here ties them (one matrix), so it cannot represent that. Fix: train "
            f"and save the adapter with modules_to_save=[{emb_module!r}, {spec.lm_head!r}] and "
            f"ensure_weight_tying=True (PEFT then ties lm_head to the trained embedding), or import it into an "
            f"untied copy of the base model (tie_word_embeddings=False, lm_head = the embedding)."
        )
    changed = emb_wrapped or not np.array_equal(e_in, base)
    return (np.asarray(e_in) if changed else None), read, []


def check_tied_head_lora(stored, flat, tied: Path, spec: Arch, weights_path: str) -> None:
    """PEFT's LoRA on a tied ``lm_head`` (saved with ``ensure_weight_tying``) must be the embedding's."""
    want = tied_head_lora(_layer_at(flat, tied), spec)
    for key, value in want.items():
        if key in stored and not np.allclose(stored[key], value, rtol=0, atol=1e-6):
            raise PeftFormatError(
                f"{weights_path}: {key} is not the tied embedding's LoRA (ensure_weight_tying makes {spec.lm_head}'s "
                f"adapter the same matrices as {spec.torch_module(tied)}'s). Fix: save the adapter again with PEFT.")


def check_saved_tables(stored, base_flat, spec: Arch, tables, tied, weights_path: str) -> set:
    """The base tensors PEFT saves beside LoRA on embeddings (``save_embedding_layers``: the table as
    ``<module>.base_layer.weight``; on a tied model also ``lm_head.base_layer.weight``): they must be the
    base model's table (PEFT would load them over it). Returns the keys read, with the tied head's LoRA
    (``ensure_weight_tying``; ``check_tied_head_lora`` compares it once the factors are read)."""
    read = set()
    for path in tables:
        keys = [PREFIX + spec.torch_module(path) + ".base_layer.weight"]
        if path == tied:
            keys.append(PREFIX + spec.lm_head + ".base_layer.weight")
            read |= {PREFIX + spec.lm_head + s for s in (".lora_A.weight", ".lora_B.weight")} & set(stored)
        base = np.asarray(base_flat[path + ("embedding",)])
        for key in keys:
            if key not in stored:
                continue
            read.add(key)
            got = stored[key]
            if got.shape != base.shape or not np.allclose(got, base, rtol=0, atol=1e-6):
                detail = (f"shape {got.shape} vs {base.shape}" if got.shape != base.shape else
                          f"max abs difference {np.abs(np.asarray(got, np.float64) - base).max():.3g}")
                raise PeftFormatError(
                    f"{weights_path} stores {key}, the base embedding PEFT saved with the adapter (save_embedding_layers), "
                    f"and it is not the embedding of base_params ({detail}): the adapter was trained on another base "
                    f"(a resized vocabulary, say). Fix: import onto the base model it was saved with.")
    return read


def _layer_at(flat, path: Path) -> dict:
    return {p[-1]: v for p, v in flat.items() if p[:-1] == path}


# --- AdaLoRA ------------------------------------------------------------------------------------------

def adalora_ranknum(r: int) -> float:
    """PEFT's denominator ``ranknum + 1e-5``, computed as it is: in float32."""
    return float(np.float32(r) + np.float32(ADALORA_EPS))


# --- the adapter folder -------------------------------------------------------------------------------

def adapter_folder(in_dir: str, subfolder: Optional[str] = None) -> str:
    """The folder holding ``adapter_config.json``: ``in_dir`` or ``in_dir/subfolder`` (PEFT saves an
    adapter not named ``default`` under its name). A folder whose adapters all sit in subfolders
    gets an error that lists them."""
    folder = os.path.join(in_dir, subfolder) if subfolder else in_dir
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return folder
    named = sorted(d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))
    if named:
        raise FileNotFoundError(
            f"{folder} holds no {CONFIG_NAME}; it holds named adapters in subfolders {named}: pick one with "
            f"subfolder={named[0]!r} (decomp-jax import --subfolder {named[0]}).")
    raise FileNotFoundError(f"Not a PEFT adapter folder: {os.path.join(folder, CONFIG_NAME)} missing "
                            f"(save it with save_pretrained).")


def _read_bin(path: str) -> dict[str, np.ndarray]:
    """``adapter_model.bin`` (PEFT's older default: a PyTorch pickle), read with torch's safe loader."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle (adapter_model.bin, PEFT's older format): reading it needs torch "
            f"(pip install -e '.[torch]'), or re-save the adapter with save_pretrained(..., safe_serialization=True) "
            f"to get adapter_model.safetensors.") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


READ_FIX = "export the adapter again (PEFT's save_pretrained), or copy or download it again"


def read_adapter(in_dir: str) -> tuple[dict, dict[str, np.ndarray], str]:
    """``(config, tensors, weights file)`` of the adapter folder ``in_dir``; a file that cannot be read
    raises a ``FileFormatError`` naming it."""
    config_path = os.path.join(in_dir, CONFIG_NAME)
    config = read_json(config_path, READ_FIX)
    if not isinstance(config, dict):
        raise FileFormatError(f"{config_path} holds a JSON {type(config).__name__}, not the object of settings PEFT "
                              f"writes; {READ_FIX}.")
    weights = os.path.join(in_dir, WEIGHTS_NAME)
    if os.path.isfile(weights):
        safetensors_header(weights, READ_FIX)  # a truncated file: says so, with its size
        return config, load_safetensors(weights, READ_FIX), weights
    legacy = os.path.join(in_dir, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return config, _read_bin(legacy), legacy
    raise FileNotFoundError(f"Not a PEFT adapter folder: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} in {in_dir}.")


def _named_subfolders(out_dir: str) -> list[str]:
    """The named adapters PEFT-style saved in subfolders of ``out_dir`` (each with its own config)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(d for d in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, d, CONFIG_NAME)))


def export_entries(out_dir: str | os.PathLike) -> set[str]:
    """The entries of an existing folder that an export wrote: the PEFT files and named adapters' subfolders."""
    return {CONFIG_NAME, WEIGHTS_NAME, *_named_subfolders(os.fspath(out_dir))}


# written even at their default values: what every PEFT release since 0.14 reads and a reader expects
CORE_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "target_modules", "modules_to_save", "inference_mode",
    "fan_in_fan_out", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "init_r", "target_r",
    "feedforward_modules", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
    "num_transformer_submodules",
})


def _compact(config: dict) -> dict:
    """``config`` without the fields that hold PEFT 0.21's default (and without ``peft_version``): PEFT
    fills them in, and older releases (checked: 0.14, 0.17) then load the file without warning about
    fields they do not know."""
    defaults = CONFIG_DEFAULTS[config["peft_type"]]
    return {k: v for k, v in config.items()
            if k in CORE_FIELDS or (k != "peft_version" and (k not in defaults or v != defaults[k]))}


def write_adapter(out_dir: str, config: dict, tensors: dict[str, np.ndarray], overwrite: bool = False) -> None:
    """Write the adapter folder atomically: into a temporary sibling that replaces ``out_dir`` only
    once both files are complete, so a failure leaves an existing export byte-identical. Named
    adapters' subfolders already in ``out_dir`` stay; a folder holding anything else is refused
    unless ``overwrite`` (then the two files are written into it and the rest is kept)."""
    config = _compact(config)
    check_finite(tensors, f"The adapter to export to {out_dir}",
                 "export a checkpoint whose adapter is finite (PEFT would load NaN/inf without a word).")
    text = json.dumps(config, indent=2, sort_keys=True)
    with atomic_folder(out_dir, ours=export_entries, overwrite=overwrite, writer="export") as tmp:
        for sub in _named_subfolders(out_dir):  # the other adapters of a multi-adapter folder stay
            shutil.copytree(os.path.join(out_dir, sub), os.path.join(tmp, sub))
        atomic_write_text(os.path.join(tmp, CONFIG_NAME), text)
        atomic_save_safetensors(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
