"""Reading a PEFT adapter folder: ``import_peft`` reads ``adapter_config.json`` and
``adapter_model.safetensors`` (or PEFT's older ``adapter_model.bin``) into decomp_jax's adapted params and
the equivalent ``AdapterConfig``, without importing peft."""

from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Mapping, Optional

import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import unflatten_dict

from decomp_jax.core import named
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import adapted_layers, attach, find_targets, inject
from decomp_jax.core.methods.prompt import llama_dims
from decomp_jax.core.tree import TOKEN_LEAF, layer_paths, path_str, scan_roots, table_paths
from decomp_jax.errors import ConfigError
from decomp_jax.guards import check_finite
from decomp_jax.interop.peft.experts import expected_expert_tensors, expert_paths, stack_per_expert
from decomp_jax.interop.peft.format import (
    CONFIG_NAME, HEAD_TASK_TYPES, MERGE_FIX, PREFIX, PROMPT_TYPES, TIEABLE_TYPES, adalora_ranknum, adapter_folder,
    check_embedding_targets, check_saved_tables, check_tied_head_lora, flat_params, in_layers_to_transform,
    in_saved_module, layer_factors, leaves_under, peft_pattern_value, peft_targets, read_adapter, saved_modules,
    stored_shape, tied_embedding, tied_import, transposed, unchanged,
)
from decomp_jax.models.names import Arch, Path, PeftFormatError, get_arch

IMPORTABLE = {"LORA": "lora / dora (use_dora) / lora_bias (lora_bias)",
              "IA3": "ia3 / ssl / ia3_mixed (feedforward_modules)", "ADALORA": "adalora",
              "PROMPT_TUNING": "prompt_tuning (llama)", "PREFIX_TUNING": "prefix_tuning (llama)",
              "P_TUNING": "prompt_tuning (llama; the file holds the encoder's output only)"}
# what each PEFT prompt type imports as: P_TUNING files hold the virtual tokens, not the encoder
PROMPT_IMPORTS = {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "P_TUNING": "prompt_tuning"}

# adapter_config.json settings import_peft refuses: why, and what to do instead
UNSUPPORTED_SETTINGS = {
    "layer_replication": ("PEFT builds a deeper model from repeated base layers, which the base params here do "
                          "not have", MERGE_FIX),
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


# --- import -------------------------------------------------------------------------------------------

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
    config, stored, weights_path = _read_finite(in_dir)
    _warn_other_base(config, in_dir, base_model_name_or_path)
    peft_type = _importable_type(config)
    if peft_type in PROMPT_TYPES.values():
        if spec.name != "llama":
            raise PeftFormatError(f"{peft_type} adapters are read for arch='llama' (decomp_jax.models.llama) only.")
        return _import_prompt(in_dir, config, stored, base_params)
    base_flat = flat_params(base_params)
    if peft_type == "LORA":  # saved on transformers 4's per-expert modules: as PEFT writes it on stacked experts
        config, stored = stack_per_expert(config, stored, {
            spec.torch_module(p): int(np.shape(base_flat[p + ("kernel",)])[0])
            for p in expert_paths(layer_paths(base_params), base_flat)})
    _refuse_unsupported(config)
    modules_to_save = _modules_to_save(config, spec)
    tied = tied_embedding(base_flat, spec)
    paths = _target_paths(config, base_params, base_flat, spec, arch, tied, modules_to_save)
    tables = {p for p in paths if p + ("kernel",) not in base_flat}  # embeddings: lora_embedding_A/B
    _check_fan_in_fan_out(config, spec, arch, paths, tables)
    saved, tied_value, tied_read, tied_missing = _tied_matrix(
        config, stored, base_flat, spec, tied, modules_to_save, saved_modules(base_flat, spec, modules_to_save),
        weights_path)
    bias_leaves = _bias_leaves(config, base_flat, paths, saved)
    targets = _targets_regex(paths, config.get("target_modules"), base_params)
    cfg = _adapter_config(config, spec, paths, targets, _train_extra(saved, bias_leaves))
    token_paths = _token_tables(config, base_flat, spec, tied)
    if token_paths:
        cfg = cfg.replace(trainable_tokens={f"^{re.escape(path_str(p))}$": ids for p, ids in token_paths.items()})
    flat = _injected(base_params, cfg, paths, targets)
    expected = _expected_tensors(cfg, spec, paths, tables, token_paths, bias_leaves, base_flat, saved, tied)
    read = tied_read | check_saved_tables(stored, base_flat, spec, tables, tied, weights_path)
    values = _matched_tensors(stored, expected, read, tied_missing, config, arch, weights_path)
    _expand_adalora(values, config, paths, spec, cfg.rank)
    flat.update(_checked_values(flat, expected, values, weights_path))
    if tied is not None and tied in tables:  # PEFT's tied lm_head LoRA must be the embedding's (ensure_weight_tying)
        check_tied_head_lora(stored, flat, tied, spec, weights_path)
    if tied_value is not None:
        leaf = tied + ("embedding",)
        flat[leaf] = jax.numpy.asarray(tied_value, dtype=flat[leaf].dtype)
    return unflatten_dict(flat), cfg


def _read_finite(in_dir: str) -> tuple[dict, dict[str, np.ndarray], str]:
    """``read_adapter``'s ``(config, tensors, weights file)``; a NaN/inf tensor is an error naming the file
    and the keys."""
    config, stored, weights_path = read_adapter(in_dir)
    check_finite(stored, f"The PEFT adapter file {weights_path}",
                 "re-save the adapter from a model whose weights are finite; imported, it would give NaN/inf outputs.")
    return config, stored, weights_path


def _warn_other_base(config: dict, in_dir: str, base_model_name_or_path) -> None:
    """Warn (at ``import_peft``'s caller) when the adapter names another base model than the one given."""
    theirs = config.get("base_model_name_or_path")
    ours = None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
    if ours is not None and theirs and not _same_base(str(theirs), ours):
        warnings.warn(
            f"{os.path.join(in_dir, CONFIG_NAME)} names base model {theirs!r}, but it is imported onto {ours!r}; "
            f"an adapter reproduces its outputs on its own base model only.",
            stacklevel=3,
        )


def _importable_type(config: dict) -> str:
    """The adapter's ``peft_type``; an error listing the readable ones when it is not one of them."""
    peft_type = config.get("peft_type")
    if peft_type not in IMPORTABLE:
        raise PeftFormatError(
            f"PEFT type {peft_type!r} is not supported; import_peft reads "
            f"{', '.join(f'{k} ({v})' for k, v in IMPORTABLE.items())}."
        )
    return peft_type


def _modules_to_save(config: dict, spec: Arch) -> list:
    """The adapter's ``modules_to_save``, with the heads PEFT's classification wrappers add."""
    modules_to_save = list(config.get("modules_to_save") or [])
    if config.get("task_type") in HEAD_TASK_TYPES:  # PEFT's classification wrappers add their heads
        modules_to_save += [h for h in spec.head_modules if h not in modules_to_save]
    return modules_to_save


def _target_paths(config: dict, base_params, base_flat, spec: Arch, arch: str, tied: Optional[Path],
                  modules_to_save: list) -> list[Path]:
    """The layers of ``base_params`` PEFT adapts (``target_modules``, ``exclude_modules``,
    ``layers_to_transform``, never inside ``modules_to_save``); an error when there are none."""
    target_modules, parameters = config.get("target_modules"), config.get("target_parameters")
    if not target_modules and not parameters:
        raise PeftFormatError("adapter_config.json has no target_modules.")
    experts = expert_paths(layer_paths(base_params), base_flat)  # parameters (target_parameters), not modules
    paths = []
    if target_modules:
        check_embedding_targets(config, base_flat, spec, tied, target_modules, config.get("exclude_modules"))
        paths = [
            p for p in layer_paths(base_params)
            if p not in experts and peft_targets(spec.torch_module(p), target_modules, config.get("exclude_modules"))
            and in_layers_to_transform(spec.torch_module(p), config)
            and not in_saved_module(spec.torch_module(p), modules_to_save)
        ]
    if parameters:
        paths += [p for p in experts if peft_targets(spec.torch_module(p), parameters)]
    if not paths:
        raise PeftFormatError(
            f"target_modules={target_modules!r} matches no layer of base_params (arch {arch!r}); "
            f"layers are named like {[spec.torch_module(p) for p in layer_paths(base_params)[:3]]}."
        )
    return paths


def _check_fan_in_fan_out(config: dict, spec: Arch, arch: str, paths: list[Path], tables) -> None:
    """Refuse a ``fan_in_fan_out`` that does not match the target layers (Conv1D or nn.Linear)."""
    conv = {spec.is_conv1d(p) for p in paths if p not in tables} or {bool(config.get("fan_in_fan_out", False))}
    if conv != {bool(config.get("fan_in_fan_out", False))}:
        raise PeftFormatError(
            f"fan_in_fan_out={config.get('fan_in_fan_out')} does not match arch {arch!r}'s target layers "
            f"({'Conv1D' if conv == {True} else 'nn.Linear'})."
        )


def _tied_matrix(config: dict, stored, base_flat, spec: Arch, tied: Optional[Path], modules_to_save: list,
                 saved: list[Path], weights_path: str):
    """``(saved, matrix, keys read, keys missing)``: on a tied model, ``tied_import``'s one matrix, with the
    embedding added to the modules saved whole when the adapter changes it; else nothing read."""
    if tied is None:
        return saved, None, set(), []
    # PEFT's input embedding and LM head must be one matrix, as in our tied model
    value, read, missing = tied_import(config, stored, base_flat, spec, tied, modules_to_save, saved, weights_path)
    if value is not None and not any(tied[: len(s)] == s for s in saved):
        saved = saved + [tied]
    return saved, value, read, missing


def _bias_leaves(config: dict, base_flat, paths: list[Path], saved: list[Path]) -> list[Path]:
    """The biases PEFT's ``bias`` option trains: the adapted layers' (``lora_only``) or the whole model's
    (``all``), outside the modules saved whole."""
    bias_mode = config.get("bias", "none")
    in_saved = lambda p: any(p[: len(m)] == m for m in saved)  # noqa: E731
    return sorted(
        p for p in base_flat if p[-1] == "bias" and not in_saved(p) and (bias_mode == "all" or (
            bias_mode == "lora_only" and p[:-1] in set(paths))))


def _train_extra(saved: list[Path], bias_leaves: list[Path]) -> Optional[str]:
    """Our ``train_extra`` regex: the leaves of the modules saved whole and the trained biases."""
    train_extra = "^(" + "|".join(re.escape(path_str(m)) for m in saved) + ")/" if saved else None
    if bias_leaves:
        biases = "^(" + "|".join(re.escape(path_str(p)) for p in bias_leaves) + ")$"
        train_extra = biases if train_extra is None else f"{train_extra}|{biases}"
    return train_extra


def _adapter_config(config: dict, spec: Arch, paths: list[Path], targets: str, train_extra) -> AdapterConfig:
    """The ``AdapterConfig`` of a LORA, ADALORA or IA3 adapter on ``paths``."""
    if config["peft_type"] == "LORA":
        return _lora_config(config, spec, paths, targets, train_extra)
    if config["peft_type"] == "ADALORA":
        return _adalora_config(config, spec, targets, train_extra)
    return _ia3_config(config, spec, paths, targets, train_extra)


def _lora_config(config: dict, spec: Arch, paths: list[Path], targets: str, train_extra) -> AdapterConfig:
    """lora, dora (``use_dora``) or lora_bias (``lora_bias``), with per-layer ranks and alphas."""
    if config.get("use_dora") and config.get("lora_bias"):
        raise PeftFormatError(f"use_dora with lora_bias: DoRA with a bias on lora_B is not read here. Fix: {MERGE_FIX}.")
    method = "dora" if config.get("use_dora") else "lora_bias" if config.get("lora_bias") else "lora"
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return AdapterConfig(
        method=method, targets=targets, rank=rank, alpha=alpha,
        rslora=bool(config.get("use_rslora")), dropout=float(config.get("lora_dropout") or 0.0),
        train_extra=train_extra, transposed=spec.conv1d,
        rank_pattern=_layer_pattern(config.get("rank_pattern"), paths, spec, rank, int),
        alpha_pattern=_layer_pattern(config.get("alpha_pattern"), paths, spec, alpha, float),
    )


def _adalora_config(config: dict, spec: Arch, targets: str, train_extra) -> AdapterConfig:
    """adalora, its ``alpha`` compensating PEFT's ``ranknum + 1e-5`` and its schedule in fractions of training."""
    r = int(config["init_r"])
    total = int(config["total_step"])
    return AdapterConfig(
        method="adalora", targets=targets, rank=r,
        alpha=float(f"{float(config['lora_alpha']) * r / adalora_ranknum(r):.10g}"),
        dropout=float(config.get("lora_dropout") or 0.0), train_extra=train_extra,
        mpc_lambda=float(config.get("orth_reg_weight", 0.5)), transposed=spec.conv1d,
        options={
            "target_rank": max(1, min(int(config["target_r"]), r)), "t_init": config.get("tinit", 0) / total,
            "t_final": config.get("tfinal", 0) / total, "interval": int(config.get("deltaT", 1)),
            "beta1": float(config.get("beta1", 0.85)), "beta2": float(config.get("beta2", 0.85)),
        },
    )


def _ia3_config(config: dict, spec: Arch, paths: list[Path], targets: str, train_extra) -> AdapterConfig:
    """ia3, ssl (every target a feedforward module) or ia3_mixed (some of them)."""
    ff_modules = config.get("feedforward_modules") or []
    is_ff = [
        bool(re.fullmatch(ff_modules, spec.torch_module(p))) if isinstance(ff_modules, str)
        else any(spec.torch_module(p).endswith(m) for m in ff_modules)
        for p in paths
    ]
    if any(is_ff) and not all(is_ff):  # PEFT's default for most models: both sides in one adapter
        feedforward = "^(" + "|".join(re.escape(path_str(p)) for p, ff in zip(paths, is_ff) if ff) + ")$"
        return AdapterConfig(method="ia3_mixed", targets=targets, train_extra=train_extra, transposed=spec.conv1d,
                             options={"feedforward": feedforward})
    return AdapterConfig(method="ssl" if any(is_ff) else "ia3", targets=targets, train_extra=train_extra,
                         scale_bias=not any(is_ff), transposed=spec.conv1d)


def _injected(base_params, cfg: AdapterConfig, paths: list[Path], targets: str) -> dict:
    """The flat params of ``inject(base_params, cfg)``, whose adapted layers must be exactly ``paths``."""
    if scan_roots(base_params, cfg):
        raise ConfigError(
            "import_peft reads per-layer PEFT tensors into unrolled params (model/layers_{i}/...); these base_params "
            "hold stacked (scanned) layers. Import into the unrolled params and stack them after: "
            "decomp_jax.models.llama.stack_layers(import_peft(...)[0]) (stack_layers moves factor leaves too)."
        )
    params = inject(base_params, cfg, jax.random.PRNGKey(0))
    flat = flat_params(params)
    layers = dict(adapted_layers(params, cfg))
    if set(layers) != set(paths):
        raise PeftFormatError(
            f"The targets regex {targets!r} selects {sorted(map(path_str, layers))}, PEFT's target_modules "
            f"{sorted(map(path_str, paths))}."
        )
    return flat


def _expected_tensors(cfg: AdapterConfig, spec: Arch, paths: list[Path], tables, token_paths, bias_leaves,
                      base_flat, saved: list[Path], tied: Optional[Path]) -> dict[str, tuple[Path, Callable]]:
    """The tensors the file must hold, ``{key: (flax leaf path, stored -> flax converter)}`` (the tied
    embedding aside: ``tied_import`` reads it)."""
    experts = expert_paths(paths, base_flat)
    expected: dict[str, tuple[Path, Callable]] = expected_expert_tensors(experts, base_flat, spec)
    for path in (p for p in paths if p not in experts):
        module = PREFIX + spec.torch_module(path) + "."
        for suffix, leaf, _, to_flax in layer_factors(cfg, path, path in tables):
            expected[module + suffix] = (path + (leaf,), to_flax)
    for path in token_paths:
        expected[PREFIX + spec.torch_module(path) + ".token_adapter." + TOKEN_LEAF] = (path + (TOKEN_LEAF,), unchanged)
    adapted = set(paths)
    for path in bias_leaves:
        module = spec.torch_module(path[:-1]) + (".base_layer" if path[:-1] in adapted else "")
        expected[f"{PREFIX}{module}.bias"] = (path, unchanged)
    for path in leaves_under(base_flat, saved):
        if tied is not None and path[: len(tied)] == tied:
            continue  # read by tied_import
        name, transpose = spec.torch_leaf(path)
        expected[PREFIX + name] = (path, transposed if transpose else unchanged)
    return expected


def _matched_tensors(stored, expected: dict, read: set, tied_missing: list, config: dict, arch: str,
                     weights_path: str) -> dict[str, np.ndarray]:
    """The stored tensors other than those ``read`` already; a missing or unexpected key is an error
    naming them all, with what they mean."""
    peft_type = config.get("peft_type")
    rest = {k for k in stored if k not in read}
    if config.get("bias", "none") == "all":  # PEFT's bias="all" also saves the modules_to_save wrappers' bias copies
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
    return {k: v for k, v in stored.items() if k in rest}


def _expand_adalora(values: dict, config: dict, paths: list[Path], spec: Arch, rank: int) -> None:
    """Widen an AdaLoRA ``rank_pattern``'s stored factors to ``rank`` in ``values``: PEFT stores only the
    kept triplets; the others are zero rows of lora_A / lora_E, columns of lora_B."""
    if config.get("peft_type") != "ADALORA" or not config.get("rank_pattern"):
        return
    for path in paths:
        keep = _adalora_pattern(config, spec.torch_module(path))
        if keep is None:
            continue
        module = PREFIX + spec.torch_module(path) + "."
        for suffix, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            got = values[module + suffix]
            if keep.shape[0] != rank or got.shape[axis] != keep.sum():
                continue  # _checked_values reports the wrong shape
            full_shape = list(got.shape)
            full_shape[axis] = rank
            full = np.zeros(full_shape, got.dtype)
            if axis == 0:
                full[keep] = got
            else:
                full[:, keep] = got
            values[module + suffix] = full


def _checked_values(flat, expected: dict, values: dict, weights_path: str) -> dict:
    """The ``expected`` tensors as Flax leaves, ``{leaf path: array}``; a tensor of the wrong shape is an
    error naming them all."""
    changes, wrong = {}, []
    for key, (leaf, to_flax) in expected.items():
        want = stored_shape(np.shape(flat[leaf]), to_flax)
        if tuple(values[key].shape) != want:
            wrong.append(f"{key}: stored {tuple(values[key].shape)}, expected {want}")
            continue
        changes[leaf] = jax.numpy.asarray(to_flax(values[key]), dtype=flat[leaf].dtype)
    if wrong:
        raise PeftFormatError(f"Tensors of the wrong shape in {weights_path}: {wrong}.")
    return changes


# --- checks -------------------------------------------------------------------------------------------

def _refuse_unsupported(config: dict) -> None:
    bad: list[str] = []
    for key, (why, fix) in UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            bad.append(f"{key}={config[key]!r}: {why}. Fix: {fix}.")
    if config.get("target_parameters") and (config["peft_type"] != "LORA" or config.get("use_dora")):
        bad.append(f"target_parameters on a {'DoRA' if config.get('use_dora') else config['peft_type']} adapter: "
                   f"experts' parameters are read for plain LoRA only. Fix: {MERGE_FIX}.")
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


def _key_hints(missing, unexpected) -> list[str]:
    """What a missing / unexpected set of tensor names means, for the patterns ``KEY_HINTS`` knows."""
    out = []
    for regex, where, hint in KEY_HINTS:
        keys = missing if where == "missing" else unexpected
        hits = [k for k in keys if re.search(regex, k)]
        if hits:
            out.append(f"{hint} ({where}: {len(hits)} such key{'s' if len(hits) > 1 else ''}, e.g. {hits[0]!r})")
    return out


def _same_base(a: str, b: str) -> bool:
    """Whether two base_model_name_or_path values name the same model: the same string, the same
    last path component (a hub id and a local copy of it), or the same resolved path."""
    if a == b:
        return True
    name_a, name_b = (os.path.basename(x.rstrip("/\\")) for x in (a, b))
    if name_a and name_a == name_b:
        return True
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


# --- PEFT's module rules, as ours ---------------------------------------------------------------------

def _layer_pattern(pattern, paths: list[Path], spec: "Arch", default, kind) -> dict:
    """A PEFT ``rank_pattern`` / ``alpha_pattern`` as ours: an exact path regex for every layer whose
    value differs from the default."""
    out = {}
    for path in paths:
        value = peft_pattern_value(pattern or {}, spec.torch_module(path))
        if value is not None and kind(value) != default:
            out[f"^{re.escape(path_str(path))}$"] = kind(value)
    return out


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


# --- trainable tokens ---------------------------------------------------------------------------------

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


# --- prompt learning ----------------------------------------------------------------------------------

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
