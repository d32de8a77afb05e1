"""The Hugging Face PEFT adapter format (PEFT 0.21), both ways.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``; PyTorch
loads it with ``peft.PeftModel.from_pretrained(base_model, folder)``. This module writes and reads
that format from decomp_jax's adapted params without importing torch or peft.

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
paths and PyTorch module names live in one ``Arch`` entry per architecture (``ARCHS``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax import quant
from decomp_jax.core import named
from decomp_jax.errors import ConfigError
from decomp_jax.core.config import AdapterConfig
from decomp_jax.guards import (FileFormatError, atomic_folder, atomic_save_safetensors, atomic_write_text, check_finite,
                               load_safetensors, read_json)
from decomp_jax.core.inject import adapted_layers, find_targets, inject, token_tables
from decomp_jax.core.tree import (
    TOKEN_LEAF, layer_paths, matrix_leaf, oriented, path_str, scan_roots, table_paths, unstack_view,
)
from decomp_jax.core.methods import get
from decomp_jax.core.inject import attach
from decomp_jax.models.names import Arch, Path, PeftFormatError, get_arch
from decomp_jax.core.methods.adalora import target_rank
from decomp_jax.core.methods.prompt import llama_dims, p_tuning_embeddings
from decomp_jax.core.prompts import fold_prefix
from decomp_jax.models.convert import safetensors_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's default before safetensors; read with torch
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.0"  # the format written here is the one PEFT 0.21 writes
ADALORA_EPS = 1e-5  # PEFT's AdaLoRA divides by (ranknum + 1e-5)
ADALORA_TOTAL_STEP = 1000  # nominal: PEFT needs total_step > 0 to build the config; inference ignores it

EXPORTABLE = ("adalora", "dora", "flexlora", "ia3", "ia3_mixed", "lora", "lora_bias", "milora", "pissa", "ssl",
              "prompt_tuning", "prefix_tuning", "p_tuning")
IMPORTABLE = {"LORA": "lora / dora (use_dora) / lora_bias (lora_bias)",
              "IA3": "ia3 / ssl / ia3_mixed (feedforward_modules)", "ADALORA": "adalora",
              "PROMPT_TUNING": "prompt_tuning (llama)", "PREFIX_TUNING": "prefix_tuning (llama)",
              "P_TUNING": "prompt_tuning (llama; the file holds the encoder's output only)"}
PROMPT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING"}
# what each PEFT prompt type imports as: P_TUNING files hold the virtual tokens, not the encoder
PROMPT_IMPORTS = {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "P_TUNING": "prompt_tuning"}
TIEABLE_TYPES = ("LORA", "ADALORA")  # the PEFT configs with ensure_weight_tying
TIE_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES: the only names ensure_weight_tying reacts to


# --- architectures: Flax path <-> PyTorch module name ------------------------------------------------


# --- per-method tensors: (PEFT leaf suffix, our factor leaf, to_torch, to_flax) --------------------

def _t(x):
    return np.ascontiguousarray(np.asarray(x).T)


def _col(x):
    return np.asarray(x)[:, None]


def _uncol(x):
    return np.asarray(x)[:, 0]


def _row(x):
    return np.asarray(x)[None, :]


def _unrow(x):
    return np.asarray(x)[0, :]


def _same(x):
    return np.asarray(x)


_LORA = (("lora_A.weight", "lora_a", _t, _t), ("lora_B.weight", "lora_b", _t, _t))
FACTORS: dict[str, tuple[tuple[str, str, Callable, Callable], ...]] = {
    "lora": _LORA,
    "lora_bias": _LORA + (("lora_B.bias", "lora_bias", _same, _same),),  # PEFT's lora_bias=True
    "dora": _LORA + (("lora_magnitude_vector", "magnitude", _same, _same),),
    "adalora": (("lora_A", "lora_a", _t, _t), ("lora_E", "lora_e", _col, _uncol), ("lora_B", "lora_b", _t, _t)),
    "ia3": (("ia3_l", "scale_out", _col, _uncol),),  # (d_out, 1): scales the output, bias included
    "ssl": (("ia3_l", "scale_in", _row, _unrow),),  # (1, d_in): PEFT's IA3 on feedforward_modules
}


# LoRA on an nn.Embedding: lora_embedding_A (r, vocab) = our lora_a^T, lora_embedding_B (features, r) =
# our lora_b^T (PEFT adds s * A^T B^T to the table: our s * lora_a @ lora_b); no ".weight", no dropout
_LORA_EMBEDDING = (("lora_embedding_A", "lora_a", _t, _t), ("lora_embedding_B", "lora_b", _t, _t))


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


# --- helpers ------------------------------------------------------------------------------------------

def _flat(params) -> dict[Path, Any]:
    return flatten_dict(unfreeze(params))


def _np(x) -> np.ndarray:
    a = np.asarray(x)
    return a if a.dtype in (np.float16, np.float32, np.float64) else a.astype(np.float32)


def _module_names(flat: Mapping[Path, Any], arch: Arch) -> set[str]:
    """Every PyTorch module name of the model: all proper prefixes of all leaf paths."""
    return {arch.torch_module(path[:i]) for path in flat for i in range(1, len(path))}


def _target_suffixes(targets: list[str], modules: set[str]):
    """PEFT's ``target_modules`` for exactly ``targets``: per target its shortest dotted suffix that
    selects no other module (PEFT matches ``key == t or key.endswith('.' + t)``); a fullmatch regex
    when some target cannot be singled out that way."""
    others = modules - set(targets)
    chosen = set()
    for name in targets:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(m == suffix or m.endswith("." + suffix) for m in others):
                chosen.add(suffix)
                break
        else:
            return "^(" + "|".join(re.escape(t) for t in sorted(targets)) + ")$"
    return sorted(chosen)


def _peft_targets(key: str, target_modules, exclude_modules=None) -> bool:
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


def _in_layers_to_transform(key: str, config: Mapping[str, Any]) -> bool:
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


def _in_saved_module(key: str, modules_to_save) -> bool:
    """PEFT never puts an adapter on (or inside) a modules_to_save module."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save or ())


def _saved_modules(flat: Mapping[Path, Any], arch: Arch, modules_to_save) -> list[Path]:
    """The Flax module paths PEFT wraps for ``modules_to_save`` (``name.endswith(m)``), outermost only."""
    names = sorted({path[:i] for path in flat for i in range(1, len(path))}, key=len)
    chosen: list[Path] = []
    for path in names:
        if any(path[: len(c)] == c for c in chosen):
            continue
        if any(arch.torch_module(path).endswith(m) for m in modules_to_save or ()):
            chosen.append(path)
    return chosen


def _leaves_under(flat: Mapping[Path, Any], modules: list[Path]) -> list[Path]:
    return [p for p in flat if any(p[: len(m)] == m and len(p) > len(m) for m in modules)]


def _saved_tensors(flat: Mapping[Path, Any], arch: Arch, modules: list[Path]) -> dict[str, np.ndarray]:
    out = {}
    for path in _leaves_under(flat, modules):
        name, transpose = arch.torch_leaf(path)
        value = _np(flat[path])
        out[PREFIX + name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def _tied_embedding(flat: Mapping[Path, Any], spec: Arch) -> Optional[Path]:
    """The input embedding's Flax module path when the model's LM head is tied to it (a causal LM
    whose params hold the embedding and no ``lm_head``: one matrix for both), else None."""
    emb = spec.embedding
    if spec.task_type != "CAUSAL_LM" or emb is None or not any(p[: len(emb)] == emb for p in flat):
        return None
    if any(p[0] in spec.head_modules for p in flat):  # a classifier (score head): no LM head at all
        return None
    return None if any(p[0] == spec.lm_head for p in flat) else emb


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
    defaults = {"LORA": _LORA_CONFIG, "ADALORA": _ADALORA_CONFIG, "IA3": _IA3_CONFIG, "PROMPT_TUNING": _PROMPT_TUNING_CONFIG,
                "PREFIX_TUNING": _PREFIX_TUNING_CONFIG, "P_TUNING": _P_TUNING_CONFIG}[config["peft_type"]]
    return {k: v for k, v in config.items()
            if k in CORE_FIELDS or (k != "peft_version" and (k not in defaults or v != defaults[k]))}


def _write(out_dir: str, config: dict, tensors: dict[str, np.ndarray], overwrite: bool = False) -> None:
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


def _adalora_ranknum(r: int) -> float:
    """PEFT's denominator ``ranknum + 1e-5``, computed as it is: in float32."""
    return float(np.float32(r) + np.float32(ADALORA_EPS))


def _principal_as_lora(kernel, base_kernel, layer, cfg, rank2: int, where: str):
    """PiSSA/MiLoRA's update relative to the original kernel, ``K_res + s a b - K_orig`` (rank <= 2r),
    as LoRA factors ``(a2 (d_in, 2r), b2 (2r, d_out))`` with the same scale ``s``."""
    k_res = np.asarray(kernel, np.float64)
    k_orig = np.asarray(base_kernel, np.float64)
    if k_orig.shape != k_res.shape:
        raise ConfigError(f"base_params kernel of {where!r} has shape {k_orig.shape}, the adapted one {k_res.shape}.")
    a, b = np.asarray(layer["lora_a"], np.float64), np.asarray(layer["lora_b"], np.float64)
    delta = k_res - k_orig + cfg.scale * (a @ b)
    u, sv, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(rank2, sv.shape[0])
    noise = max(1e-5, 50 * float(np.finfo(np.asarray(kernel).dtype).eps)) * np.linalg.norm(k_orig)
    if sv.shape[0] > k and sv[k] > noise:
        raise ConfigError(
            f"Layer {where!r}: K_res + s*a@b - K_orig has rank > 2r (singular value {k + 1} is {sv[k]:.3g}); "
            f"base_params are not the pretrained params this adapter was injected into."
        )
    root = np.sqrt(sv[:k] / cfg.scale)
    a2 = np.zeros((delta.shape[0], rank2))
    b2 = np.zeros((rank2, delta.shape[1]))
    a2[:, :k] = u[:, :k] * root
    b2[:k] = root[:, None] * vt[:k]
    dtype = np.asarray(kernel).dtype
    return a2.astype(dtype), b2.astype(dtype)


# --- export -------------------------------------------------------------------------------------------

HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")  # PEFT's wrappers that add classifier/score to modules_to_save
ENCODER_TASK_TYPES = HEAD_TASK_TYPES + ("FEATURE_EXTRACTION", "QUESTION_ANS")


def _bias_mode(flat, layers, extra_leaves, heads, cfg) -> tuple[str, list]:
    """PEFT's ``bias`` option of an export whose ``train_extra`` trains biases, and those bias leaves:
    ``lora_only`` when they are exactly the adapted layers' biases, ``all`` when they are every bias of
    the model outside the heads (``modules_to_save``); ``none`` when it trains no bias of an adapted
    layer. Anything in between has no PEFT form: a ConfigError says what would."""
    in_head = lambda p: any(p[: len(h)] == h for h in heads)  # noqa: E731
    chosen = {p for p in extra_leaves if p[-1] == "bias" and not in_head(p)}
    if not any(p[:-1] in layers for p in chosen):
        return "none", []
    lora_only = {p + ("bias",) for p in layers if p + ("bias",) in flat}
    every = {p for p in flat if p[-1] == "bias" and not in_head(p)}
    if chosen == every:
        return "all", sorted(every)
    if chosen == lora_only:
        return "lora_only", sorted(lora_only)
    raise ConfigError(
        f"train_extra={cfg.train_extra!r} trains {len(chosen)} biases, including adapted layers' ones; PEFT saves "
        f"trained biases only as bias='lora_only' (exactly the {len(lora_only)} biases of the adapted layers) or "
        f"bias='all' (all {len(every)} biases of the model). Train one of those sets, e.g. train_extra matching "
        f"'/bias$' for all.")


def _task_type(spec: "Arch", flat: Mapping[Path, Any], task_type: Optional[str]) -> str:
    """PEFT's ``task_type`` of an export: the given one, else the architecture's (causal LMs), else
    ``SEQ_CLS`` for an encoder with a ``classifier``/``score`` head and ``FEATURE_EXTRACTION`` for a
    bare encoder (``models.bert.BertModel``: the sentence-embedding case)."""
    has_head = any(p[0] in spec.head_modules for p in flat)
    if task_type is None:
        if spec.task_type != "SEQ_CLS":  # a causal LM, or (with a score head) a decoder classifier
            return "SEQ_CLS" if has_head else spec.task_type
        return "SEQ_CLS" if has_head else "FEATURE_EXTRACTION"
    allowed = ((spec.task_type, "SEQ_CLS") if spec.head_modules else (spec.task_type,)) \
        if spec.task_type != "SEQ_CLS" else ENCODER_TASK_TYPES
    if task_type not in allowed:
        raise ConfigError(f"task_type={task_type!r} does not fit arch {spec.name!r}; choose one of {allowed}.")
    if task_type in HEAD_TASK_TYPES and not has_head:
        raise ConfigError(
            f"task_type={task_type!r} means a model with a top-level {' or '.join(spec.head_modules)!r} head, which "
            f"these params lack (top-level keys {sorted({p[0] for p in flat})}); for a bare encoder use "
            f"FEATURE_EXTRACTION (the default for one).")
    return task_type


def export_peft(params, cfg: AdapterConfig, out_dir: str | os.PathLike, *,
                base_model_name_or_path: str | os.PathLike | None, arch: str, base_params=None,
                model_config=None, task_type: Optional[str] = None, name: Optional[str] = None,
                overwrite: bool = False) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT 0.21's format.

    ``params``: adapted params (``dj.inject`` of the model's params, trained) of a Flax sequence or token
    classifier, a bare encoder (``models.bert.BertModel``: PEFT's FEATURE_EXTRACTION), GPT-2's LM or our Llama.
    ``task_type``: PEFT's task type (default: CAUSAL_LM for the decoders, SEQ_CLS for an encoder with a
    ``classifier`` head, FEATURE_EXTRACTION for a bare one; TOKEN_CLS for a token classifier).
    Methods: lora (rslora too; on embedding tables as lora_embedding_A/B, with ``ensure_weight_tying`` on a
    tied model; ``trainable_tokens`` as trainable_token_indices), lora_bias (PEFT's lora_bias), dora, ia3
    (``scale_bias=True`` or bias-free targets: PEFT's IA3 scales the bias), ssl (PEFT IA3 on feedforward
    modules), flexlora (its live triplets as a LoRA with a per-module ``rank_pattern``: exact), adalora
    (``lora_alpha`` compensates PEFT's ``ranknum + 1e-5``), pissa / milora as a rank-2r LoRA relative to the original kernels, which
    ``base_params`` (the un-injected pretrained params) must provide. The classifier head, and every
    module with a leaf in ``cfg.train_extra``, goes to ``modules_to_save``.

    Tied embeddings (GPT-2, a Llama with ``tie_word_embeddings``: the params hold no ``lm_head``): a
    trained embedding is written as PEFT writes it with ``ensure_weight_tying``: ``modules_to_save``
    names the embedding and ``lm_head``, and the matrix is stored under both names, so PEFT's input
    embedding and LM head are the one trained matrix (without this PEFT would keep the original head).

    The folder is written atomically (an existing export is replaced only by a complete new one);
    non-finite adapter tensors are refused (``NonFiniteError`` naming them). A folder holding files
    an export did not write is refused (``OutputExistsError``) unless ``overwrite``: then the export's
    two files are written into it and its other files are kept.

    prompt_tuning / prefix_tuning / p_tuning (``arch="llama"``): PEFT's PROMPT_TUNING / PREFIX_TUNING /
    P_TUNING for a causal LM; prefix projection is folded (PEFT saves the projected prefix too) and
    p-tuning's encoder is run (PEFT saves its output, the virtual tokens). ``model_config``
    (the ``LlamaConfig``) fills ``num_attention_heads``; without it PEFT takes it from the base model.

    ``name``: adapter ``name`` of a tree of several (``decomp_jax.core.named``), written as PEFT's
    ``save_pretrained`` writes it: ``"default"`` in ``out_dir``, any other in ``out_dir/<name>`` (the
    adapters already there stay when the default is written).
    """
    spec = get_arch(arch)
    out_dir = os.fspath(out_dir)
    if name is not None or named.has_named(params):  # one adapter of a tree of several: PEFT's layout
        name = name or named.DEFAULT
        params = named.select(params, name)
        out_dir = out_dir if name == named.DEFAULT else os.path.join(out_dir, name)
    params = quant.dequantize_params(params)  # over a quantized base: the adapter of the dequantized base
    base_params = None if base_params is None else quant.dequantize_params(base_params)
    if base_model_name_or_path is not None:
        base_model_name_or_path = os.fspath(base_model_name_or_path)  # a pathlib.Path is not JSON
    if cfg.method in PROMPT_TYPES:
        return _export_prompt(params, cfg, out_dir, spec, base_model_name_or_path, model_config, overwrite)
    if cfg.kernel_in_axes:
        raise ConfigError(f"adapter.kernel_in_axes={cfg.kernel_in_axes!r}: PEFT adapts torch nn.Linear layers and has no "
                          f"format for nn.DenseGeneral kernels. Merge the adapter instead (dj.merge / decomp-jax merge).")
    if cfg.method not in EXPORTABLE:
        raise ConfigError(
            f"Method {cfg.method!r} has no Hugging Face PEFT equivalent here; export_peft supports "
            f"{', '.join(EXPORTABLE)}."
        )
    principal = cfg.method in ("pissa", "milora")
    if principal and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ConfigError(f"Exporting {cfg.method} with rank_pattern / alpha_pattern is not supported (its update is "
                          f"written as a rank-2r LoRA per layer); merge the adapter instead (dj.merge / decomp-jax merge).")
    if principal and base_params is None:
        raise ConfigError(
            f"Exporting {cfg.method} needs base_params (the pretrained params before inject): its layers hold "
            f"K_res = K - s*a0@b0, and PEFT applies the update to the original K, so the export writes "
            f"K_res + s*a@b - K as a rank-2r LoRA."
        )
    method = get(cfg.method)
    roots = scan_roots(params, cfg)
    if roots:  # stacked (scanned) layers: exported per layer, under the unrolled model's names (layers.{i})
        params = unstack_view(params, roots)
        if base_params is not None:
            base_params = unstack_view(base_params, scan_roots(base_params, cfg))
    flat = _flat(params)
    layers = dict(adapted_layers(params, cfg))
    if not layers:
        raise ConfigError(
            f"params hold no {cfg.method} factor leaves {method.factor_names}; pass the params dj.inject returned."
        )
    task_type = _task_type(spec, flat, task_type)
    tables = {p for p, layer in layers.items() if matrix_leaf(layer) == "embedding"}
    conv = {spec.is_conv1d(p) for p in layers if p not in tables} or {False}
    if len(conv) > 1:
        raise ConfigError("The targeted layers mix nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one flag.")
    fan_in_fan_out = conv.pop()
    if cfg.method == "ia3" and not cfg.scale_bias:
        biased = [path_str(p) for p, layer in layers.items() if "bias" in layer]
        if biased:
            raise ConfigError(
                f"PEFT's IA3 scales the whole layer output, bias included (y = (x@K + b) * l); this adapter "
                f"(scale_bias=False) leaves the bias of {biased[:3]}{'...' if len(biased) > 3 else ''} unscaled, "
                f"so the export would not reproduce it. Train with scale_bias: true, or target bias-free layers."
            )

    # modules_to_save: the task head (as PEFT always saves it) and the modules of train_extra leaves
    factor_leaves = {p + (n,) for p in layers for n in method.factor_names}
    extra = re.compile(cfg.train_extra) if cfg.train_extra else None
    extra_leaves = [p for p in flat if extra and p not in factor_leaves and extra.search(path_str(p))]
    heads = [(h,) for h in spec.head_modules if any(p[0] == h for p in flat)] if task_type in HEAD_TASK_TYPES else []
    bias_mode, bias_leaves = _bias_mode(flat, layers, extra_leaves, heads, cfg)
    extra_leaves = [p for p in extra_leaves if p not in bias_leaves]
    in_layers = [path_str(p) for p in extra_leaves if p[:-1] in layers]
    if in_layers:
        raise ConfigError(
            f"train_extra={cfg.train_extra!r} selects leaves of adapted layers {in_layers[:3]}; PEFT cannot save a "
            f"targeted module in modules_to_save. Narrow train_extra (trained biases export as PEFT's bias option: "
            f"all the adapted layers' biases, or every bias of the model)."
        )
    saved = list(heads)
    for path in sorted({p[:-1] for p in extra_leaves}):
        if not any(path[: len(s)] == s for s in saved):
            saved.append(path)
    clash = [path_str(p) for p in layers if any(p[: len(s)] == s for s in saved)]
    if clash:
        raise ConfigError(f"Targeted layers {clash[:3]} lie inside modules_to_save modules, which PEFT never adapts.")
    modules_to_save = list(spec.head_modules) if task_type in HEAD_TASK_TYPES else []
    modules_to_save += [spec.torch_module(p) for p in saved if p not in heads]
    # a trained embedding of a tied model: PEFT must train lm_head as the same matrix (ensure_weight_tying)
    tied = _tied_embedding(flat, spec)
    tie = tied is not None and any(tied[: len(s)] == s for s in saved)
    if tie:
        modules_to_save.append(spec.lm_head)
    tie_lora = tied is not None and tied in tables  # LoRA on a tied embedding: lm_head gets the same adapter
    if tie_lora and tied[-1] not in TIE_NAMES:
        raise ConfigError(
            f"{cfg.method} adapts {path_str(tied)}, the table this model's LM head is tied to, and PEFT ties a LoRA to "
            f"the head only for modules named {' / '.join(TIE_NAMES)}: loaded in PEFT, the head would keep the base "
            f"matrix and the outputs would differ. Merge the adapter instead (dj.merge / decomp-jax merge), or train "
            f"the embedding whole (train_extra), which exports as modules_to_save with ensure_weight_tying.")
    token_rows = [(p, ids) for p, ids in token_tables(flat, cfg) if p + (TOKEN_LEAF,) in flat]
    exported = factor_leaves | set(_leaves_under(flat, saved)) | {p + (TOKEN_LEAF,) for p, _ in token_rows}
    if principal:
        exported |= {p + ("kernel",) for p in layers}
    check_finite({path_str(p): flat[p] for p in sorted(exported) if p in flat}, f"The {cfg.method} adapter to export",
                 f"nothing was written to {out_dir}; export a checkpoint whose adapter is finite (an earlier step, "
                 f"or retrain with a lower learning rate).")

    # adapter tensors
    tensors: dict[str, np.ndarray] = {}
    base_flat = _flat(base_params) if principal else {}
    rank2 = 2 * cfg.rank
    rank_pattern: dict[str, int] = {}  # flexlora: each layer's live rank
    for path, layer in layers.items():
        module = PREFIX + spec.torch_module(path) + "."
        if principal:
            where = path_str(path)
            if path + ("kernel",) not in base_flat:
                raise ConfigError(f"base_params has no kernel at {where!r}; pass the un-injected pretrained params.")
            a2, b2 = _principal_as_lora(oriented(layer["kernel"], path, cfg),
                                        oriented(base_flat[path + ("kernel",)], path, cfg), layer, cfg, rank2, where)
            tensors[module + "lora_A.weight"] = _t(a2)
            tensors[module + "lora_B.weight"] = _t(b2)
            continue
        if cfg.method == "flexlora":  # the live triplets as a LoRA of rank r_l: A = diag(e) a^T, B = b^T
            live = _np(layer["active"]) > 0
            rank_pattern[spec.torch_module(path)] = int(live.sum())
            tensors[module + "lora_A.weight"] = np.ascontiguousarray(_t(_np(layer["lora_a"])[:, live] * _np(layer["lora_e"])[live]))
            tensors[module + "lora_B.weight"] = np.ascontiguousarray(_t(_np(layer["lora_b"])[live]))
            continue
        for suffix, leaf, to_torch, _ in layer_factors(cfg, path, path in tables):
            tensors[module + suffix] = np.ascontiguousarray(to_torch(_np(layer[leaf])))
    tensors.update(_saved_tensors(flat, spec, saved))
    for path, _ in token_rows:  # PEFT's TrainableTokens wrapper: the rows as trainable_tokens_delta
        tensors[PREFIX + spec.torch_module(path) + ".token_adapter." + TOKEN_LEAF] = _np(flat[path + (TOKEN_LEAF,)])
    for path in bias_leaves:  # PEFT's bias option: a wrapped (adapted) layer's bias sits under base_layer
        module = spec.torch_module(path[:-1]) + (".base_layer" if path[:-1] in layers else "")
        tensors[f"{PREFIX}{module}.bias"] = _np(flat[path])
    if tie:
        tensors[PREFIX + spec.lm_head + ".weight"] = tensors[PREFIX + spec.torch_leaf(tied + ("embedding",))[0]]
    if tie_lora:  # PEFT's tied lm_head LoRA (ensure_weight_tying): the table's update s * lora_a @ lora_b as a Linear's
        tensors.update(_tied_head_lora(layers[tied], spec))

    # adapter_config.json
    target_modules = _target_suffixes([spec.torch_module(p) for p in layers], _module_names(flat, spec))
    common = {
        "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": modules_to_save or None, "target_modules": target_modules, "task_type": task_type,
    }
    if cfg.method in ("ia3", "ssl", "ia3_mixed"):
        feedforward = target_modules if cfg.method == "ssl" else []
        if cfg.method == "ia3_mixed":  # the input-side layers, by module name
            inputs = [spec.torch_module(p) for p in layers if cfg.for_layer(path_str(p)).option("input_side")]
            feedforward = _target_suffixes(inputs, _module_names(flat, spec)) if inputs else []
        config = {**_IA3_CONFIG, **common, "feedforward_modules": feedforward}
    elif cfg.method == "adalora":

        r = cfg.rank
        config = {
            **_ADALORA_CONFIG, **common, "lora_dropout": float(cfg.dropout),
            # PEFT: lora_alpha / (r + 1e-5); ours: alpha / r
            "lora_alpha": float(cfg.alpha) * _adalora_ranknum(r) / r,
            "init_r": r, "target_r": target_rank(cfg), "total_step": ADALORA_TOTAL_STEP,
            "tinit": int(round(cfg.option("t_init") * ADALORA_TOTAL_STEP)),
            "tfinal": int(round(cfg.option("t_final") * ADALORA_TOTAL_STEP)),
            "deltaT": int(cfg.option("interval")), "beta1": float(cfg.option("beta1")),
            "beta2": float(cfg.option("beta2")), "orth_reg_weight": float(cfg.mpc_lambda),
        }
    else:
        r = rank2 if principal else cfg.rank
        alpha = cfg.scale * (math.sqrt(r) if cfg.rslora else r) if principal else cfg.alpha
        config = {
            **_LORA_CONFIG, **common, "r": r, "lora_alpha": alpha, "lora_dropout": float(cfg.dropout),
            "use_rslora": bool(cfg.rslora), "use_dora": cfg.method == "dora", "lora_bias": cfg.method == "lora_bias",
        }
        if rank_pattern:  # flexlora: PEFT's scale lora_alpha / r_l per module is ours, alpha / (live rank)
            config["rank_pattern"] = {_pattern_key(m): r_l for m, r_l in sorted(rank_pattern.items())}
        elif not principal:  # per-layer ranks and alphas (cfg.rank_pattern / alpha_pattern)
            config["rank_pattern"], config["alpha_pattern"] = _module_patterns(layers, spec, cfg)
    if bias_mode != "none":
        if "bias" not in config:
            raise ConfigError(f"PEFT's {config['peft_type']} has no bias option: the trained biases selected by "
                              f"train_extra={cfg.train_extra!r} cannot be exported. Train without them.")
        config["bias"] = bias_mode
    if (tie or tie_lora) and "ensure_weight_tying" in config:  # IA3 has none: PEFT loads two equal copies there
        config["ensure_weight_tying"] = True
    if token_rows:
        if "trainable_token_indices" not in config:
            raise ConfigError(f"PEFT's {config['peft_type']} has no trainable_token_indices: the trainable token rows "
                              f"(trainable_tokens) cannot be exported with it. Merge the adapter instead.")
        config["trainable_token_indices"] = {spec.torch_module(p): ids for p, ids in token_rows}
    _write(out_dir, config, tensors, overwrite)


def _tied_head_lora(layer, spec: Arch) -> dict[str, np.ndarray]:
    """The tensors PEFT saves for the LoRA it ties to ``lm_head`` when LoRA adapts a tied embedding with
    ``ensure_weight_tying``: the head's weight is the table (vocab, features), so its ``lora_B`` (vocab, r)
    is our ``lora_a`` and its ``lora_A`` (r, features) our ``lora_b``."""
    head = PREFIX + spec.lm_head
    return {head + ".lora_A.weight": np.ascontiguousarray(_np(layer["lora_b"])),
            head + ".lora_B.weight": np.ascontiguousarray(_np(layer["lora_a"]))}


def _export_prompt(params, cfg: AdapterConfig, out_dir: str, spec: Arch, base_model_name_or_path: str,
                   model_config, overwrite: bool = False) -> None:

    if spec.name != "llama":
        raise ConfigError(f"Method {cfg.method!r} runs on decomp_jax.models.llama only; export it with arch='llama'.")
    extra = re.compile(cfg.train_extra) if cfg.train_extra else None
    lost = [path_str(p) for p in _flat(params) if extra and p[0] != cfg.method and extra.search(path_str(p))]
    if lost:
        raise ConfigError(
            f"train_extra={cfg.train_extra!r} trains {lost[:3]}{' ...' if len(lost) > 3 else ''}, but the "
            f"{PROMPT_TYPES[cfg.method]} export writes prompt_embeddings only, so they would be lost. Export an "
            f"adapter trained without train_extra."
        )
    dims = llama_dims(params, cfg.method)
    leaves = unfreeze(params).get(cfg.method)
    if leaves is None:
        raise ConfigError(f"params hold no {cfg.method!r} subtree; pass the params dj.inject returned.")
    heads = getattr(model_config, "num_attention_heads", None)
    common = {"base_model_name_or_path": base_model_name_or_path, "num_layers": dims["num_layers"]}
    if cfg.method == "prompt_tuning":
        embedding = _np(leaves["embedding"])
        config = {**_PROMPT_TUNING_CONFIG, **common, "num_virtual_tokens": int(embedding.shape[0]),
                  "token_dim": dims["hidden"], "num_attention_heads": heads}
    elif cfg.method == "p_tuning":  # PEFT saves the encoder's output (and loads it without an encoder)

        embedding = _np(p_tuning_embeddings(leaves))
        config = {**_P_TUNING_CONFIG, **common, "num_virtual_tokens": int(embedding.shape[0]),
                  "token_dim": dims["hidden"], "num_attention_heads": heads,
                  "encoder_reparameterization_type": cfg.option("encoder_reparameterization_type"),
                  "encoder_hidden_size": int(cfg.option("encoder_hidden_size") or dims["hidden"]),
                  "encoder_num_layers": int(cfg.option("encoder_num_layers"))}
    else:
        folded = fold_prefix(params, cfg)["prefix_tuning"]
        keys, values = _np(folded["key"]), _np(folded["value"])  # (layers, P, kv_dim)
        layers, p, kv_dim = keys.shape
        embedding = np.stack([keys, values], axis=1).transpose(2, 0, 1, 3).reshape(p, layers * 2 * kv_dim)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        config = {**_PREFIX_TUNING_CONFIG, **common, "num_virtual_tokens": int(p), "token_dim": int(kv_dim),
                  "num_attention_heads": kv_heads, "encoder_hidden_size": int(kv_dim)}
    _write(out_dir, config, {"prompt_embeddings": embedding}, overwrite)


def _import_prompt(in_dir: str, config: dict, stored: dict, base_params):
    method = PROMPT_IMPORTS[config["peft_type"]]
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise PeftFormatError(f"num_transformer_submodules={config['num_transformer_submodules']}: only decoder-only "
                              f"models (1) are supported.")
    if set(stored) != {"prompt_embeddings"}:
        raise PeftFormatError(f"{in_dir}: the adapter weights should hold one tensor 'prompt_embeddings'; "
                              f"it holds {sorted(stored)}.")
    dims = llama_dims(base_params, method)
    n = int(config["num_virtual_tokens"])
    got = stored["prompt_embeddings"]
    if method == "prompt_tuning":
        want = (n, dims["hidden"])
        cfg = AdapterConfig(method=method, options={"num_virtual_tokens": n, "init": "random"})
    else:
        want = (n, dims["num_layers"] * 2 * dims["kv_dim"])
        cfg = AdapterConfig(method=method, options={"num_virtual_tokens": n})
    if tuple(got.shape) != want:
        raise PeftFormatError(f"prompt_embeddings has shape {tuple(got.shape)}; this {config['peft_type']} adapter on "
                              f"the given model needs {want}.")
    params = unfreeze(inject(base_params, cfg, jax.random.PRNGKey(0)))
    if method == "prompt_tuning":
        table = params["model"]["embed_tokens"]["embedding"]
        params[method] = {"embedding": jax.numpy.asarray(got, dtype=table.dtype)}
    else:
        kv = got.reshape(n, dims["num_layers"], 2, dims["kv_dim"]).transpose(2, 1, 0, 3)  # (2, layers, P, kv_dim)
        params[method] = {"key": jax.numpy.asarray(kv[0], jax.numpy.float32),
                          "value": jax.numpy.asarray(kv[1], jax.numpy.float32)}
    return params, cfg


# --- import -------------------------------------------------------------------------------------------

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


def _read(in_dir: str) -> tuple[dict, dict[str, np.ndarray], str]:
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


MERGE_FIX = ("load it in PEFT, merge it (model.merge_and_unload()), save the merged model and convert or load that "
             "as the base instead")
# adapter_config.json settings import_peft refuses: why, and what to do instead
UNSUPPORTED_SETTINGS = {
    "layer_replication": ("PEFT builds a deeper model from repeated base layers, which the base params here do "
                          "not have", MERGE_FIX),
    "target_parameters": ("LoRA on bare nn.Parameters (e.g. MoE expert tensors), not on Linear modules",
                          "target the Linear modules (target_modules) when training the adapter"),
    "alora_invocation_tokens": ("activated LoRA acts only after its invocation tokens; decomp_jax's adapters act "
                                "at every position", "train a plain LoRA (no alora_invocation_tokens)"),
    "loftq_config": ("LoftQ's adapter is relative to the quantized base PEFT rewrote at init, not to the "
                     "original weights", MERGE_FIX),
    "use_qalora": ("QALoRA pools the input groupwise for a quantized base", MERGE_FIX),
    "use_bdlora": ("block-diagonal LoRA factors", "train a plain LoRA"),
    "arrow_config": ("Arrow routes among several LoRA experts per token", MERGE_FIX),
    "kasa_config": ("KaSA changes the base layer's singular values", MERGE_FIX),
    "monteclora_config": ("MonteCLoRA samples its factors", "train a plain LoRA"),
}


def _refuse_unsupported(config: dict) -> None:
    bad: list[str] = []
    for key, (why, fix) in UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            bad.append(f"{key}={config[key]!r}: {why}. Fix: {fix}.")
    if config["peft_type"] != "LORA" and config.get("alpha_pattern"):
        bad.append(f"alpha_pattern on a {config['peft_type']} adapter: only LORA adapters scale per module here. "
                   f"Fix: leave alpha_pattern out.")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        bad.append(f"bias={config['bias']!r}: PEFT's values are 'none', 'all' and 'lora_only'.")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        bad.append(f"init_lora_weights={init!r}: the adapter is relative to the base model PEFT modified at init "
                   f"(PiSSA/OLoRA/...), not to the original weights. Fix: save it with "
                   f"save_pretrained(..., path_initial_model_for_weight_conversion=...), which writes a plain LoRA "
                   f"relative to the original base.")
    if bad:
        raise PeftFormatError("import_peft cannot read this adapter:\n- " + "\n- ".join(bad))


# patterns of stored tensor names that explain a key mismatch: (regex, where the key is, what it means)
KEY_HINTS = (
    (r"lora_embedding_[AB]$", "unexpected", "LoRA on embedding layers (lora_embedding_A/B) that target_modules does "
     "not select here or base_params lack. Fix: import onto the base model the adapter was trained on, with the "
     "matching arch"),
    (r"lora_magnitude_vector", "unexpected", "DoRA magnitudes while adapter_config.json has use_dora false. Fix: "
     "set use_dora true in the config if the adapter was trained as DoRA"),
    (r"lora_magnitude_vector", "missing", "use_dora is true but the file holds no DoRA magnitudes. Fix: set "
     "use_dora false if the adapter was trained as plain LoRA"),
    (r"lora_B\.bias$", "unexpected", "lora_B biases while adapter_config.json has lora_bias false. Fix: set lora_bias "
     "true in the config if the adapter was trained with it"),
    (r"lora_B\.bias$", "missing", "lora_bias is true but the file holds no lora_B biases. Fix: set lora_bias false if "
     "the adapter was trained without it"),
    (r"trainable_tokens_", "unexpected", "trainable token rows of embeddings that trainable_token_indices does not "
     "name here (or base_params lack). Fix: check trainable_token_indices against the saved file"),
    (r"^(?!.*(lora_|ia3_l|trainable_tokens_)).*\.(weight|bias)$", "unexpected", "whole-module tensors "
     "(modules_to_save, a bias option) of modules base_params lack or does not train here: the adapter was saved "
     "on another model class or head (a classifier named 'score' vs 'classifier', an LM head). Fix: import onto "
     "params of the model class it was trained on, or drop those modules from modules_to_save"),
    (r"^(?!.*(lora_|ia3_l|trainable_tokens_)).*\.(weight|bias)$", "missing", "modules_to_save / task_type / bias "
     "in adapter_config.json imply these whole-module tensors, but the file lacks them. Fix: check those settings "
     "against the saved file (or re-save the adapter with PEFT)"),
    (r"lora_[AB]\.weight$", "unexpected", "LoRA factors of modules target_modules does not select here (another "
     "architecture's module names, or layers_to_transform / exclude_modules). Fix: import onto the base model the "
     "adapter was trained on, with the matching arch"),
)


def _key_hints(missing, unexpected) -> list[str]:
    """What a missing / unexpected set of tensor names means, for the patterns ``KEY_HINTS`` knows."""
    out = []
    for regex, where, hint in KEY_HINTS:
        keys = missing if where == "missing" else unexpected
        hits = [k for k in keys if re.search(regex, k)]
        if hits:
            out.append(f"{hint} ({where}: {len(hits)} such key{'s' if len(hits) > 1 else ''}, e.g. {hits[0]!r})")
    return out


def _peft_pattern_value(pattern: Mapping[str, Any], module: str):
    """PEFT's lookup of a ``rank_pattern`` / ``alpha_pattern`` key: the first key ``k`` (in order) with
    ``re.match(rf"(.*[.])?({k})$", module)``; None when none matches."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _layer_pattern(pattern, paths: list[Path], spec: "Arch", default, kind) -> dict:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` as ours: an exact path regex for every layer whose
    value differs from the default."""
    out = {}
    for path in paths:
        value = _peft_pattern_value(pattern or {}, spec.torch_module(path))
        if value is not None and kind(value) != default:
            out[f"^{re.escape(path_str(path))}$"] = kind(value)
    return out


def _pattern_key(module: str) -> str:
    """A ``rank_pattern`` key that selects exactly ``module`` in every PEFT release: the escaped name
    after its first component (PEFT 0.21 matches ``(.*[.])?(key)$``, 0.14 ``.*[.]key$``, which needs a
    component before the key)."""
    tail = module.split(".", 1)[1] if "." in module else module
    return re.escape(tail)


def _module_patterns(layers, spec: "Arch", cfg: AdapterConfig) -> tuple[dict, dict]:
    """PEFT's ``rank_pattern`` and ``alpha_pattern`` of an adapter with per-layer ranks / alphas: the
    escaped module name (exact under PEFT's ``(.*[.])?(key)$`` match) of every layer that differs."""
    ranks, alphas = {}, {}
    for path in layers:
        lcfg = cfg.for_layer(path_str(path))
        module = _pattern_key(spec.torch_module(path))
        if lcfg.rank != cfg.rank:
            ranks[module] = lcfg.rank
        if lcfg.alpha != cfg.alpha:
            alphas[module] = lcfg.alpha
    return ranks, alphas


def _targets_regex(paths: list[Path], target_modules, base_params) -> str:
    """Our ``targets`` regex selecting exactly ``paths``: from PEFT's suffixes when that is exact."""
    wanted = set(paths)
    if isinstance(target_modules, (list, tuple)):
        regex = "|".join(rf"(^|/){re.escape(t.replace('.', '/'))}$" for t in sorted(target_modules))
        try:
            if set(find_targets(base_params, AdapterConfig(targets=regex))) == wanted:
                return regex
        except ConfigError:
            pass
    return "^(" + "|".join(re.escape(path_str(p)) for p in sorted(wanted)) + ")$"


def _same_base(a: str, b: str) -> bool:
    """Whether two base_model_name_or_path values name the same model: the same string, the same
    last path component (a hub id and a local copy of it), or the same resolved path."""
    if a == b:
        return True
    name_a, name_b = (os.path.basename(x.rstrip("/\\")) for x in (a, b))
    if name_a and name_a == name_b:
        return True
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _embedding_targets(config: dict, base_flat, spec: Arch, tied: Optional[Path], target_modules, exclude) -> None:
    """Refuse the LoRA-on-embedding adapters decomp_jax cannot run as PEFT does: DoRA on an embedding, and
    on a tied model (one matrix for the lookup and the LM head) any adapter PEFT runs on one of the two only:
    LoRA on the embedding without ``ensure_weight_tying`` (PEFT's head keeps the base matrix) or on
    ``lm_head`` alone. LoRA on a tied embedding with ``ensure_weight_tying`` is read: PEFT then runs the
    head with the same adapted matrix, as decomp_jax's factored and merged execution do."""
    names = sorted({spec.torch_module(p) for p in table_paths(base_flat)})
    hit = [n for n in names if _peft_targets(n, target_modules, exclude)]
    head = tied is not None and _peft_targets(spec.lm_head, target_modules, exclude)
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


def _tied_import(config: dict, stored: Mapping[str, np.ndarray], base_flat, spec: Arch, tied: Path,
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


def _adalora_pattern(config: dict, module: str) -> Optional[np.ndarray]:
    pattern = config.get("rank_pattern")
    if not pattern:
        return None
    for key, keep in pattern.items():
        name = re.sub(r"\.default$", "", key)
        name = re.sub(r"\.lora_E$", "", name)
        if name == module:
            return np.asarray(keep, bool).reshape(-1)
    return None


def import_peft(in_dir: str | os.PathLike, base_params, *, arch: str,
                base_model_name_or_path: str | os.PathLike | None = None, subfolder: Optional[str] = None,
                name: Optional[str] = None):
    """Read a PEFT adapter folder into ``(params, cfg)``: ``cfg`` is the equivalent ``AdapterConfig``
    and ``params`` is ``dj.inject(base_params, cfg, ...)`` with the stored factors (and the stored
    modules_to_save leaves, e.g. the classifier head) written in.

    PEFT types: LORA (lora, dora with use_dora, rslora, lora_bias; LoRA on embeddings as lora_embedding_A/B;
    trainable_token_indices as ``AdapterConfig.trainable_tokens``), IA3 (ia3 with ``scale_bias=True``; ssl when
    every target is a feedforward module), ADALORA (rank_pattern included), PROMPT_TUNING and
    PREFIX_TUNING (``arch="llama"``; the prefix comes back as plain ``key``/``value``). Strict: a missing,
    unexpected or mis-shaped tensor raises ``PeftFormatError`` naming every such key; a NaN/inf tensor
    raises ``NonFiniteError`` naming the file and the keys.

    Tied embeddings (``base_params`` with no ``lm_head``: GPT-2, a tied Llama): the adapter is read as
    PEFT loads it on the tied PyTorch model. When PEFT's input embedding and LM head end up the same
    matrix (``ensure_weight_tying``, or both names saved equal) it becomes the embedding, trained through
    ``train_extra``; when they differ (an embedding or head saved alone, untied) the import is refused,
    as is LoRA that PEFT runs on one of the two only (on a tied embedding without ``ensure_weight_tying``,
    or on a tied ``lm_head`` alone; LoRA on a tied ``embed_tokens`` with it is read).

    ``base_model_name_or_path``: the base model ``base_params`` come from; when given and the adapter's
    config names another one, a warning says so. ``subfolder``: a named adapter that PEFT saved under
    ``in_dir/<name>``. The weights are ``adapter_model.safetensors`` or, from older PEFT releases,
    ``adapter_model.bin`` (read with torch when it is installed; otherwise an error says so).

    ``name``: add the adapter under that name to ``base_params`` (which may hold other adapters:
    ``decomp_jax.core.named``); it is read from ``in_dir/<name>`` when that is an adapter folder (PEFT's
    layout for a name other than ``default``), else from ``in_dir`` (or ``subfolder``).
    """
    if name is not None:
        in_dir = os.fspath(in_dir)
        if subfolder is None and name != named.DEFAULT and os.path.isfile(os.path.join(in_dir, name, CONFIG_NAME)):
            subfolder = name
        params, cfg = import_peft(in_dir, named.select(base_params, None), arch=arch,
                                  base_model_name_or_path=base_model_name_or_path, subfolder=subfolder)
        return attach(base_params, params, cfg, name), cfg
    spec = get_arch(arch)
    in_dir = adapter_folder(os.fspath(in_dir), subfolder)
    config, stored, weights_path = _read(in_dir)
    check_finite(stored, f"The PEFT adapter file {weights_path}",
                 "re-save the adapter from a model whose weights are finite; imported, it would give NaN/inf outputs.")
    theirs = config.get("base_model_name_or_path")
    ours = None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
    if ours is not None and theirs and not _same_base(str(theirs), ours):
        warnings.warn(
            f"{os.path.join(in_dir, CONFIG_NAME)} names base model {theirs!r}, but it is imported onto {ours!r}; "
            f"an adapter reproduces its outputs on its own base model only.",
            stacklevel=2,
        )
    peft_type = config.get("peft_type")
    if peft_type not in IMPORTABLE:
        raise PeftFormatError(
            f"PEFT type {peft_type!r} is not supported; import_peft reads "
            f"{', '.join(f'{k} ({v})' for k, v in IMPORTABLE.items())}."
        )
    if peft_type in PROMPT_TYPES.values():
        if spec.name != "llama":
            raise PeftFormatError(f"{peft_type} adapters are read for arch='llama' (decomp_jax.models.llama) only.")
        return _import_prompt(in_dir, config, stored, base_params)
    _refuse_unsupported(config)
    base_flat = _flat(base_params)
    modules_to_save = list(config.get("modules_to_save") or [])
    if config.get("task_type") in HEAD_TASK_TYPES:  # PEFT's classification wrappers add their heads
        modules_to_save += [h for h in spec.head_modules if h not in modules_to_save]
    target_modules = config.get("target_modules")
    if not target_modules:
        raise PeftFormatError("adapter_config.json has no target_modules.")
    tied = _tied_embedding(base_flat, spec)
    _embedding_targets(config, base_flat, spec, tied, target_modules, config.get("exclude_modules"))
    paths = [
        p for p in layer_paths(base_params)
        if _peft_targets(spec.torch_module(p), target_modules, config.get("exclude_modules"))
        and _in_layers_to_transform(spec.torch_module(p), config)
        and not _in_saved_module(spec.torch_module(p), modules_to_save)
    ]
    if not paths:
        raise PeftFormatError(
            f"target_modules={target_modules!r} matches no layer of base_params (arch {arch!r}); "
            f"layers are named like {[spec.torch_module(p) for p in layer_paths(base_params)[:3]]}."
        )
    tables = {p for p in paths if p + ("kernel",) not in base_flat}  # embeddings: lora_embedding_A/B
    conv = {spec.is_conv1d(p) for p in paths if p not in tables} or {bool(config.get("fan_in_fan_out", False))}
    if conv != {bool(config.get("fan_in_fan_out", False))}:
        raise PeftFormatError(
            f"fan_in_fan_out={config.get('fan_in_fan_out')} does not match arch {arch!r}'s target layers "
            f"({'Conv1D' if conv == {True} else 'nn.Linear'})."
        )
    saved = _saved_modules(base_flat, spec, modules_to_save)
    tied_value, tied_read, tied_missing = None, set(), []
    if tied is not None:  # PEFT's input embedding and LM head must be one matrix, as in our tied model
        tied_value, tied_read, tied_missing = _tied_import(config, stored, base_flat, spec, tied, modules_to_save,
                                                           saved, weights_path)
        if tied_value is not None and not any(tied[: len(s)] == s for s in saved):
            saved = saved + [tied]
    train_extra = "^(" + "|".join(re.escape(path_str(m)) for m in saved) + ")/" if saved else None
    targets = _targets_regex(paths, target_modules, base_params)
    # PEFT's bias option: the trained biases of the adapted layers ("lora_only") or of the whole model ("all")
    bias_mode = config.get("bias", "none")
    in_saved = lambda p: any(p[: len(m)] == m for m in saved)  # noqa: E731
    bias_leaves = sorted(
        p for p in base_flat if p[-1] == "bias" and not in_saved(p) and (bias_mode == "all" or (
            bias_mode == "lora_only" and p[:-1] in set(paths))))
    if bias_leaves:
        biases = "^(" + "|".join(re.escape(path_str(p)) for p in bias_leaves) + ")$"
        train_extra = biases if train_extra is None else f"{train_extra}|{biases}"

    if peft_type == "LORA":
        if config.get("use_dora") and config.get("lora_bias"):
            raise PeftFormatError(f"use_dora with lora_bias: DoRA with a bias on lora_B is not read here. Fix: {MERGE_FIX}.")
        method = "dora" if config.get("use_dora") else "lora_bias" if config.get("lora_bias") else "lora"
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        cfg = AdapterConfig(
            method=method, targets=targets, rank=rank, alpha=alpha,
            rslora=bool(config.get("use_rslora")), dropout=float(config.get("lora_dropout") or 0.0),
            train_extra=train_extra, transposed=spec.conv1d,
            rank_pattern=_layer_pattern(config.get("rank_pattern"), paths, spec, rank, int),
            alpha_pattern=_layer_pattern(config.get("alpha_pattern"), paths, spec, alpha, float),
        )
    elif peft_type == "ADALORA":
        r = int(config["init_r"])
        total = int(config["total_step"])
        cfg = AdapterConfig(
            method="adalora", targets=targets, rank=r,
            alpha=float(f"{float(config['lora_alpha']) * r / _adalora_ranknum(r):.10g}"),
            dropout=float(config.get("lora_dropout") or 0.0), train_extra=train_extra,
            mpc_lambda=float(config.get("orth_reg_weight", 0.5)), transposed=spec.conv1d,
            options={
                "target_rank": max(1, min(int(config["target_r"]), r)), "t_init": config.get("tinit", 0) / total,
                "t_final": config.get("tfinal", 0) / total, "interval": int(config.get("deltaT", 1)),
                "beta1": float(config.get("beta1", 0.85)), "beta2": float(config.get("beta2", 0.85)),
            },
        )
    else:  # IA3
        ff_modules = config.get("feedforward_modules") or []
        is_ff = [
            bool(re.fullmatch(ff_modules, spec.torch_module(p))) if isinstance(ff_modules, str)
            else any(spec.torch_module(p).endswith(m) for m in ff_modules)
            for p in paths
        ]
        if any(is_ff) and not all(is_ff):  # PEFT's default for most models: both sides in one adapter
            feedforward = "^(" + "|".join(re.escape(path_str(p)) for p, ff in zip(paths, is_ff) if ff) + ")$"
            cfg = AdapterConfig(method="ia3_mixed", targets=targets, train_extra=train_extra, transposed=spec.conv1d,
                                options={"feedforward": feedforward})
        else:
            cfg = AdapterConfig(method="ssl" if any(is_ff) else "ia3", targets=targets, train_extra=train_extra,
                                scale_bias=not any(is_ff), transposed=spec.conv1d)

    token_paths = _token_tables(config, base_flat, spec, tied)
    if token_paths:
        cfg = cfg.replace(trainable_tokens={f"^{re.escape(path_str(p))}$": ids for p, ids in token_paths.items()})
    if scan_roots(base_params, cfg):
        raise ConfigError(
            "import_peft reads per-layer PEFT tensors into unrolled params (model/layers_{i}/...); these base_params "
            "hold stacked (scanned) layers. Import into the unrolled params and stack them after: "
            "decomp_jax.models.llama.stack_layers(import_peft(...)[0]) (stack_layers moves factor leaves too)."
        )
    params = inject(base_params, cfg, jax.random.PRNGKey(0))
    flat = _flat(params)
    layers = dict(adapted_layers(params, cfg))
    if set(layers) != set(paths):
        raise PeftFormatError(
            f"The targets regex {targets!r} selects {sorted(map(path_str, layers))}, PEFT's target_modules "
            f"{sorted(map(path_str, paths))}."
        )

    # expected tensors: key -> (flax leaf path, stored -> flax converter)
    expected: dict[str, tuple[Path, Callable]] = {}
    for path in paths:
        module = PREFIX + spec.torch_module(path) + "."
        for suffix, leaf, _, to_flax in layer_factors(cfg, path, path in tables):
            expected[module + suffix] = (path + (leaf,), to_flax)
    for path in token_paths:
        expected[PREFIX + spec.torch_module(path) + ".token_adapter." + TOKEN_LEAF] = (path + (TOKEN_LEAF,), _same)
    adapted = set(paths)
    for path in bias_leaves:
        module = spec.torch_module(path[:-1]) + (".base_layer" if path[:-1] in adapted else "")
        expected[f"{PREFIX}{module}.bias"] = (path, _same)
    for path in _leaves_under(base_flat, saved):
        if tied is not None and path[: len(tied)] == tied:
            continue  # read by _tied_import
        name, transpose = spec.torch_leaf(path)
        expected[PREFIX + name] = (path, _t if transpose else _same)
    rest = {k for k in stored if k not in tied_read}
    rest -= _check_saved_tables(stored, base_flat, spec, tables, tied, weights_path)
    if bias_mode == "all":  # PEFT's bias="all" also saves the modules_to_save wrappers' own bias copies
        rest -= {k for k in rest if re.search(r"\.(modules_to_save|original_module)\.bias$", k)}
    missing = sorted(set(expected) - rest) + tied_missing
    unexpected = sorted(rest - set(expected))
    if missing or unexpected:
        hints = _key_hints(missing, unexpected)
        raise PeftFormatError(
            f"{weights_path} does not match this {peft_type} adapter on arch {arch!r}"
            + ("".join(f"\n- {h}" for h in hints) if hints else "") +
            f"\nmissing keys {missing}; unexpected keys {unexpected}."
        )

    values = {k: v for k, v in stored.items() if k in rest}
    if peft_type == "ADALORA" and config.get("rank_pattern"):
        # PEFT stores only the kept triplets; the others are zero rows of lora_A / lora_E, columns of lora_B
        for path in paths:
            keep = _adalora_pattern(config, spec.torch_module(path))
            if keep is None:
                continue
            module = PREFIX + spec.torch_module(path) + "."
            for suffix, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                got = values[module + suffix]
                if keep.shape[0] != cfg.rank or got.shape[axis] != keep.sum():
                    continue  # the shape check below reports it
                full_shape = list(got.shape)
                full_shape[axis] = cfg.rank
                full = np.zeros(full_shape, got.dtype)
                if axis == 0:
                    full[keep] = got
                else:
                    full[:, keep] = got
                values[module + suffix] = full

    changes, wrong = {}, []
    for key, (leaf, to_flax) in expected.items():
        want = _stored_shape(np.shape(flat[leaf]), to_flax)
        if tuple(values[key].shape) != want:
            wrong.append(f"{key}: stored {tuple(values[key].shape)}, expected {want}")
            continue
        changes[leaf] = jax.numpy.asarray(to_flax(values[key]), dtype=flat[leaf].dtype)
    if wrong:
        raise PeftFormatError(f"Tensors of the wrong shape in {weights_path}: {wrong}.")
    flat.update(changes)
    if tied is not None and tied in tables:  # PEFT's tied lm_head LoRA must be the embedding's (ensure_weight_tying)
        _check_tied_head_lora(stored, flat, tied, spec, weights_path)
    if tied_value is not None:
        leaf = tied + ("embedding",)
        flat[leaf] = jax.numpy.asarray(tied_value, dtype=flat[leaf].dtype)
    return unflatten_dict(flat), cfg


def _input_embedding(flat, spec: Arch) -> Optional[Path]:
    """The token embedding table's module path (PEFT's ``get_input_embeddings()``)."""
    tables = table_paths(flat)
    if spec.embedding is not None and spec.embedding in tables:
        return spec.embedding
    return next((p for p in tables if p[-1] in ("word_embeddings", "embed_tokens", "wte")), None)


def _token_tables(config: dict, base_flat, spec: Arch, tied: Optional[Path]) -> dict[Path, list]:
    """PEFT's ``trainable_token_indices`` as ``{embedding path: ids}``: a list names the input embedding's
    rows, a dict ``{module name suffix: ids}`` any embedding's. On a tied model PEFT ties the LM head's rows
    to the embedding's (the one matrix here): a key naming the head must give the same ids."""
    given = config.get("trainable_token_indices")
    if not given:
        return {}
    if config.get("peft_type") not in TIEABLE_TYPES:
        raise PeftFormatError(f"trainable_token_indices on a {config.get('peft_type')} adapter is not read here.")
    emb = _input_embedding(base_flat, spec)
    if not isinstance(given, Mapping):
        given = {spec.torch_module(emb) if emb is not None else "<input embedding>": given}
    tables = table_paths(base_flat)
    out: dict[Path, list] = {}
    for key, ids in given.items():
        hits = [p for p in tables if spec.torch_module(p).endswith(key)]
        if not hits and tied is not None and spec.lm_head.endswith(key):
            if list(ids) != list(given.get(spec.torch_module(tied), given.get(tied[-1], ids))):
                raise PeftFormatError(f"trainable_token_indices gives {key} other rows than {spec.torch_module(tied)}, "
                                      f"which this model ties to it (one matrix). Fix: give both the same ids.")
            continue  # PEFT ties the head's rows to the embedding's
        if not hits:
            raise PeftFormatError(f"trainable_token_indices names {key!r}, which is no embedding of base_params; its "
                                  f"embeddings are {[spec.torch_module(p) for p in tables]}.")
        for path in hits:
            out[path] = [int(i) for i in ids]
    return out


def _check_saved_tables(stored, base_flat, spec: Arch, tables, tied, weights_path: str) -> set:
    """The base tensors PEFT saves beside LoRA on embeddings (``save_embedding_layers``: the table as
    ``<module>.base_layer.weight``; on a tied model also ``lm_head.base_layer.weight``): they must be the
    base model's table (PEFT would load them over it). Returns the keys read, with the tied head's LoRA
    (``ensure_weight_tying``; ``_check_tied_head_lora`` compares it once the factors are read)."""
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


def _check_tied_head_lora(stored, flat, tied: Path, spec: Arch, weights_path: str) -> None:
    """PEFT's LoRA on a tied ``lm_head`` (saved with ``ensure_weight_tying``) must be the embedding's."""
    want = _tied_head_lora(_layer_at(flat, tied), spec)
    for key, value in want.items():
        if key in stored and not np.allclose(stored[key], value, rtol=0, atol=1e-6):
            raise PeftFormatError(
                f"{weights_path}: {key} is not the tied embedding's LoRA (ensure_weight_tying makes {spec.lm_head}'s "
                f"adapter the same matrices as {spec.torch_module(tied)}'s). Fix: save the adapter again with PEFT.")


def _layer_at(flat, path: Path) -> dict:
    return {p[-1]: v for p, v in flat.items() if p[:-1] == path}


def _stored_shape(flax_shape: tuple, to_flax: Callable) -> tuple:
    """The stored (PyTorch-side) shape whose conversion gives ``flax_shape``."""
    inverse = {_t: _t, _same: _same, _uncol: _col, _unrow: _row}[to_flax]
    return tuple(inverse(np.zeros(flax_shape)).shape)
