"""Writing a PEFT adapter folder: ``export_peft`` turns decomp_jax's adapted params into
``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21 writes them, without importing
torch or peft."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
from flax.core import unfreeze

from decomp_jax import quant
from decomp_jax.core import named
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import adapted_layers, token_tables
from decomp_jax.core.methods import get
from decomp_jax.core.methods.adalora import target_rank
from decomp_jax.core.methods.prompt import llama_dims, p_tuning_embeddings
from decomp_jax.core.prompts import fold_prefix
from decomp_jax.core.tree import TOKEN_LEAF, matrix_leaf, oriented, path_str, scan_roots, unstack_view
from decomp_jax.errors import ConfigError
from decomp_jax.guards import check_finite
from decomp_jax.interop.peft.experts import check_expert_export, expert_tensors, split_experts
from decomp_jax.interop.peft.format import (
    CONFIG_DEFAULTS, HEAD_TASK_TYPES, PREFIX, PROMPT_TYPES, TIE_NAMES, adalora_ranknum, as_numpy, flat_params,
    layer_factors, leaves_under, tied_embedding, tied_head_lora, transposed, write_adapter,
)
from decomp_jax.models.names import Arch, Path, get_arch

EXPORTABLE = ("adalora", "dora", "flexlora", "ia3", "ia3_mixed", "lora", "lora_bias", "milora", "pissa", "ssl",
              "prompt_tuning", "prefix_tuning", "p_tuning")
ADALORA_TOTAL_STEP = 1000  # nominal: PEFT needs total_step > 0 to build the config; inference ignores it
ENCODER_TASK_TYPES = HEAD_TASK_TYPES + ("FEATURE_EXTRACTION", "QUESTION_ANS")
_PRINCIPAL = ("pissa", "milora")  # their layers hold K_res; the export writes the update to the original K


# --- export -------------------------------------------------------------------------------------------


class _Saved(NamedTuple):
    """What an export saves whole beside the factors: ``modules`` (Flax module paths) are PEFT's
    ``modules_to_save`` ``names``; ``bias_leaves`` are the trained biases of PEFT's ``bias`` option ``bias_mode``."""
    modules: list
    names: list
    bias_mode: str
    bias_leaves: list


def export_peft(params, cfg: AdapterConfig, out_dir: str | os.PathLike, *,
                base_model_name_or_path: str | os.PathLike | None, arch: str, base_params=None,
                model_config=None, task_type: Optional[str] = None, name: Optional[str] = None,
                overwrite: bool = False) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT 0.21's format.

    - ``params``: adapted params (``dj.inject`` of the model's params, trained) of a Flax sequence or
      token classifier, a bare encoder (``models.bert.BertModel``: PEFT's FEATURE_EXTRACTION), GPT-2's LM
      or our Llama.
    - ``task_type``: PEFT's task type (default: CAUSAL_LM for the decoders, SEQ_CLS for an encoder with a
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
    params, out_dir = _selected_adapter(params, os.fspath(out_dir), name)
    params = quant.dequantize_params(params)  # over a quantized base: the adapter of the dequantized base
    base_params = None if base_params is None else quant.dequantize_params(base_params)
    if base_model_name_or_path is not None:
        base_model_name_or_path = os.fspath(base_model_name_or_path)  # a pathlib.Path is not JSON
    if cfg.method in PROMPT_TYPES:
        return _export_prompt(params, cfg, out_dir, spec, base_model_name_or_path, model_config, overwrite)
    _check_exportable(cfg, base_params)
    method = get(cfg.method)
    params, base_params = _unrolled(params, base_params, cfg)
    flat = flat_params(params)
    layers, experts = split_experts(_exported_layers(params, cfg, method), cfg)
    check_expert_export(experts, cfg)
    task_type = _task_type(spec, flat, task_type)
    tables = {p for p, layer in layers.items() if matrix_leaf(layer) == "embedding"}
    fan_in_fan_out = _fan_in_fan_out(spec, layers, tables)
    _check_ia3_bias(cfg, layers)
    factor_leaves = {p + (n,) for p in layers for n in method.factor_names}
    saved = _modules_to_save(flat, layers, factor_leaves, spec, cfg, task_type)
    tied, tie, tie_lora = _tying(flat, spec, cfg, saved.modules, tables)
    token_rows = [(p, ids) for p, ids in token_tables(flat, cfg) if p + (TOKEN_LEAF,) in flat]
    _check_finite_adapter(flat, layers, factor_leaves, saved.modules, token_rows, cfg, out_dir)
    tensors, rank_pattern = _factor_tensors(layers, tables, spec, cfg, base_params)
    tensors.update(_whole_tensors(flat, layers, spec, saved, token_rows, tied, tie, tie_lora))
    expert_values, target_parameters = expert_tensors(experts, spec)
    tensors.update(expert_values)
    common = {
        "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": (saved.names + [spec.lm_head] if tie else saved.names) or None,
        "target_modules": _target_suffixes([spec.torch_module(p) for p in layers], _module_names(flat, spec))
        if layers else [],
        "task_type": task_type,
    }
    if target_parameters:  # LoRA on experts' parameters (LORA configs only: IA3 has no such field)
        common["target_parameters"] = target_parameters
    config = _method_config(cfg, layers, spec, flat, common, rank_pattern)
    _add_options(config, cfg, spec, saved.bias_mode, tie or tie_lora, token_rows)
    write_adapter(out_dir, config, tensors, overwrite)


def _selected_adapter(params, out_dir: str, name: Optional[str]):
    """``(params, out_dir)`` of the adapter ``name`` of a tree of several, in PEFT's layout: the default one
    in ``out_dir``, any other in ``out_dir/<name>``; a tree of one adapter as it is."""
    if name is not None or named.has_named(params):  # one adapter of a tree of several: PEFT's layout
        name = name or named.DEFAULT
        params = named.select(params, name)
        out_dir = out_dir if name == named.DEFAULT else os.path.join(out_dir, name)
    return params, out_dir


def _check_exportable(cfg: AdapterConfig, base_params) -> None:
    """Refuse the adapters PEFT has no form for, and pissa / milora without ``base_params``."""
    if cfg.kernel_in_axes:
        raise ConfigError(f"adapter.kernel_in_axes={cfg.kernel_in_axes!r}: PEFT adapts torch nn.Linear layers and has no "
                          f"format for nn.DenseGeneral kernels. Merge the adapter instead (dj.merge / decomp-jax merge).")
    if cfg.method not in EXPORTABLE:
        raise ConfigError(
            f"Method {cfg.method!r} has no Hugging Face PEFT equivalent here; export_peft supports "
            f"{', '.join(EXPORTABLE)}."
        )
    principal = cfg.method in _PRINCIPAL
    if principal and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ConfigError(f"Exporting {cfg.method} with rank_pattern / alpha_pattern is not supported (its update is "
                          f"written as a rank-2r LoRA per layer); merge the adapter instead (dj.merge / decomp-jax merge).")
    if principal and base_params is None:
        raise ConfigError(
            f"Exporting {cfg.method} needs base_params (the pretrained params before inject): its layers hold "
            f"K_res = K - s*a0@b0, and PEFT applies the update to the original K, so the export writes "
            f"K_res + s*a@b - K as a rank-2r LoRA."
        )


def _unrolled(params, base_params, cfg: AdapterConfig):
    """``(params, base_params)`` with stacked (scanned) layers seen one by one, as the unrolled model's layers."""
    roots = scan_roots(params, cfg)
    if roots:  # stacked (scanned) layers: exported per layer, under the unrolled model's names (layers.{i})
        params = unstack_view(params, roots)
        if base_params is not None:
            base_params = unstack_view(base_params, scan_roots(base_params, cfg))
    return params, base_params


def _exported_layers(params, cfg: AdapterConfig, method) -> dict:
    """The adapted layers of ``params``, ``{module path: layer}``; an error when there are none."""
    layers = dict(adapted_layers(params, cfg))
    if not layers:
        raise ConfigError(
            f"params hold no {cfg.method} factor leaves {method.factor_names}; pass the params dj.inject returned."
        )
    return layers


def _fan_in_fan_out(spec: Arch, layers, tables) -> bool:
    """PEFT's ``fan_in_fan_out``: whether the adapted layers (embedding tables aside) are Conv1D layers."""
    conv = {spec.is_conv1d(p) for p in layers if p not in tables} or {False}
    if len(conv) > 1:
        raise ConfigError("The targeted layers mix nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one flag.")
    return conv.pop()


def _check_ia3_bias(cfg: AdapterConfig, layers) -> None:
    """Refuse an ia3 adapter that leaves biases unscaled: PEFT's IA3 scales the bias too."""
    if cfg.method == "ia3" and not cfg.scale_bias:
        biased = [path_str(p) for p, layer in layers.items() if "bias" in layer]
        if biased:
            raise ConfigError(
                f"PEFT's IA3 scales the whole layer output, bias included (y = (x@K + b) * l); this adapter "
                f"(scale_bias=False) leaves the bias of {biased[:3]}{'...' if len(biased) > 3 else ''} unscaled, "
                f"so the export would not reproduce it. Train with scale_bias: true, or target bias-free layers."
            )


def _modules_to_save(flat, layers, factor_leaves, spec: Arch, cfg: AdapterConfig, task_type: str) -> _Saved:
    """PEFT's ``modules_to_save`` (the task head, as PEFT always saves it, and the modules of ``train_extra``
    leaves) and ``bias`` option (the trained biases)."""
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
    return _Saved(saved, modules_to_save, bias_mode, bias_leaves)


def _tying(flat, spec: Arch, cfg: AdapterConfig, saved: list, tables) -> tuple:
    """``(tied embedding or None, tie, tie_lora)``: ``tie`` when the tied embedding is saved whole (PEFT must
    train ``lm_head`` as the same matrix: ``ensure_weight_tying``), ``tie_lora`` when LoRA adapts it (``lm_head``
    gets the same adapter); refuses a LoRA that PEFT would not tie to the head."""
    tied = tied_embedding(flat, spec)
    tie = tied is not None and any(tied[: len(s)] == s for s in saved)
    tie_lora = tied is not None and tied in tables  # LoRA on a tied embedding: lm_head gets the same adapter
    if tie_lora and tied[-1] not in TIE_NAMES:
        raise ConfigError(
            f"{cfg.method} adapts {path_str(tied)}, the table this model's LM head is tied to, and PEFT ties a LoRA to "
            f"the head only for modules named {' / '.join(TIE_NAMES)}: loaded in PEFT, the head would keep the base "
            f"matrix and the outputs would differ. Merge the adapter instead (dj.merge / decomp-jax merge), or train "
            f"the embedding whole (train_extra), which exports as modules_to_save with ensure_weight_tying.")
    return tied, tie, tie_lora


def _check_finite_adapter(flat, layers, factor_leaves, saved: list, token_rows, cfg: AdapterConfig,
                          out_dir: str) -> None:
    """Refuse, before anything is written, an adapter with a NaN/inf among the leaves the export reads."""
    exported = factor_leaves | set(leaves_under(flat, saved)) | {p + (TOKEN_LEAF,) for p, _ in token_rows}
    if cfg.method in _PRINCIPAL:
        exported |= {p + ("kernel",) for p in layers}
    check_finite({path_str(p): flat[p] for p in sorted(exported) if p in flat}, f"The {cfg.method} adapter to export",
                 f"nothing was written to {out_dir}; export a checkpoint whose adapter is finite (an earlier step, "
                 f"or retrain with a lower learning rate).")


def _factor_tensors(layers, tables, spec: Arch, cfg: AdapterConfig, base_params) -> tuple[dict, dict]:
    """``(tensors, rank_pattern)``: the adapted layers' factors as PEFT stores them (pissa / milora as a
    rank-2r LoRA relative to ``base_params``' kernels; flexlora's live triplets as a LoRA, with each
    module's live rank)."""
    principal = cfg.method in _PRINCIPAL
    tensors: dict[str, np.ndarray] = {}
    base_flat = flat_params(base_params) if principal else {}
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
            tensors[module + "lora_A.weight"] = transposed(a2)
            tensors[module + "lora_B.weight"] = transposed(b2)
            continue
        if cfg.method == "flexlora":  # the live triplets as a LoRA of rank r_l: A = diag(e) a^T, B = b^T
            live = as_numpy(layer["active"]) > 0
            rank_pattern[spec.torch_module(path)] = int(live.sum())
            tensors[module + "lora_A.weight"] = np.ascontiguousarray(
                transposed(as_numpy(layer["lora_a"])[:, live] * as_numpy(layer["lora_e"])[live]))
            tensors[module + "lora_B.weight"] = np.ascontiguousarray(transposed(as_numpy(layer["lora_b"])[live]))
            continue
        for suffix, leaf, to_torch, _ in layer_factors(cfg, path, path in tables):
            tensors[module + suffix] = np.ascontiguousarray(to_torch(as_numpy(layer[leaf])))
    return tensors, rank_pattern


def _whole_tensors(flat, layers, spec: Arch, saved: _Saved, token_rows, tied: Optional[Path], tie: bool,
                   tie_lora: bool) -> dict[str, np.ndarray]:
    """The tensors PEFT stores beside the factors: the ``modules_to_save`` modules, the trainable token rows,
    the trained biases and the tied LM head (``tie``: the embedding's matrix; ``tie_lora``: its LoRA)."""
    tensors = _saved_tensors(flat, spec, saved.modules)
    for path, _ in token_rows:  # PEFT's TrainableTokens wrapper: the rows as trainable_tokens_delta
        key = PREFIX + spec.torch_module(path) + ".token_adapter." + TOKEN_LEAF
        tensors[key] = as_numpy(flat[path + (TOKEN_LEAF,)])
    for path in saved.bias_leaves:  # PEFT's bias option: a wrapped (adapted) layer's bias sits under base_layer
        module = spec.torch_module(path[:-1]) + (".base_layer" if path[:-1] in layers else "")
        tensors[f"{PREFIX}{module}.bias"] = as_numpy(flat[path])
    if tie:
        tensors[PREFIX + spec.lm_head + ".weight"] = tensors[PREFIX + spec.torch_leaf(tied + ("embedding",))[0]]
    if tie_lora:  # PEFT's tied lm_head LoRA (ensure_weight_tying): the table's update s * lora_a @ lora_b as a Linear's
        tensors.update(tied_head_lora(layers[tied], spec))
    return tensors


def _method_config(cfg: AdapterConfig, layers, spec: Arch, flat, common: dict, rank_pattern: dict) -> dict:
    """adapter_config.json of the method: PEFT's IA3, ADALORA or LORA config with the ``common`` fields."""
    if cfg.method in ("ia3", "ssl", "ia3_mixed"):
        feedforward = common["target_modules"] if cfg.method == "ssl" else []
        if cfg.method == "ia3_mixed":  # the input-side layers, by module name
            inputs = [spec.torch_module(p) for p in layers if cfg.for_layer(path_str(p)).option("input_side")]
            feedforward = _target_suffixes(inputs, _module_names(flat, spec)) if inputs else []
        return {**CONFIG_DEFAULTS["IA3"], **common, "feedforward_modules": feedforward}
    if cfg.method == "adalora":
        r = cfg.rank
        return {
            **CONFIG_DEFAULTS["ADALORA"], **common, "lora_dropout": float(cfg.dropout),
            # PEFT: lora_alpha / (r + 1e-5); ours: alpha / r
            "lora_alpha": float(cfg.alpha) * adalora_ranknum(r) / r,
            "init_r": r, "target_r": target_rank(cfg), "total_step": ADALORA_TOTAL_STEP,
            "tinit": int(round(cfg.option("t_init") * ADALORA_TOTAL_STEP)),
            "tfinal": int(round(cfg.option("t_final") * ADALORA_TOTAL_STEP)),
            "deltaT": int(cfg.option("interval")), "beta1": float(cfg.option("beta1")),
            "beta2": float(cfg.option("beta2")), "orth_reg_weight": float(cfg.mpc_lambda),
        }
    return _lora_config(cfg, layers, spec, common, rank_pattern)


def _lora_config(cfg: AdapterConfig, layers, spec: Arch, common: dict, rank_pattern: dict) -> dict:
    """PEFT's LORA config of lora, lora_bias, dora, flexlora (``rank_pattern``: each module's live rank) and
    pissa / milora (a rank-2r LoRA)."""
    principal = cfg.method in _PRINCIPAL
    r = 2 * cfg.rank if principal else cfg.rank
    alpha = cfg.scale * (math.sqrt(r) if cfg.rslora else r) if principal else cfg.alpha
    config = {
        **CONFIG_DEFAULTS["LORA"], **common, "r": r, "lora_alpha": alpha, "lora_dropout": float(cfg.dropout),
        "use_rslora": bool(cfg.rslora), "use_dora": cfg.method == "dora", "lora_bias": cfg.method == "lora_bias",
    }
    if rank_pattern:  # flexlora: PEFT's scale lora_alpha / r_l per module is ours, alpha / (live rank)
        config["rank_pattern"] = {_pattern_key(m): r_l for m, r_l in sorted(rank_pattern.items())}
    elif not principal:  # per-layer ranks and alphas (cfg.rank_pattern / alpha_pattern)
        config["rank_pattern"], config["alpha_pattern"] = _module_patterns(layers, spec, cfg)
    return config


def _add_options(config: dict, cfg: AdapterConfig, spec: Arch, bias_mode: str, tying: bool, token_rows) -> None:
    """Set PEFT's ``bias``, ``ensure_weight_tying`` (``tying``) and ``trainable_token_indices`` in ``config``;
    refuses those its PEFT type has no field for."""
    if bias_mode != "none":
        if "bias" not in config:
            raise ConfigError(f"PEFT's {config['peft_type']} has no bias option: the trained biases selected by "
                              f"train_extra={cfg.train_extra!r} cannot be exported. Train without them.")
        config["bias"] = bias_mode
    if tying and "ensure_weight_tying" in config:  # IA3 has none: PEFT loads two equal copies there
        config["ensure_weight_tying"] = True
    if token_rows:
        if "trainable_token_indices" not in config:
            raise ConfigError(f"PEFT's {config['peft_type']} has no trainable_token_indices: the trainable token rows "
                              f"(trainable_tokens) cannot be exported with it. Merge the adapter instead.")
        config["trainable_token_indices"] = {spec.torch_module(p): ids for p, ids in token_rows}


# --- export helpers -----------------------------------------------------------------------------------

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


def _saved_tensors(flat: Mapping[Path, Any], arch: Arch, modules: list[Path]) -> dict[str, np.ndarray]:
    out = {}
    for path in leaves_under(flat, modules):
        name, transpose = arch.torch_leaf(path)
        value = as_numpy(flat[path])
        out[PREFIX + name] = np.ascontiguousarray(value.T if transpose else value)
    return out


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


def _export_prompt(params, cfg: AdapterConfig, out_dir: str, spec: Arch, base_model_name_or_path: str,
                   model_config, overwrite: bool = False) -> None:
    if spec.name != "llama":
        raise ConfigError(f"Method {cfg.method!r} runs on decomp_jax.models.llama only; export it with arch='llama'.")
    extra = re.compile(cfg.train_extra) if cfg.train_extra else None
    lost = [path_str(p) for p in flat_params(params) if extra and p[0] != cfg.method and extra.search(path_str(p))]
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
        embedding = as_numpy(leaves["embedding"])
        config = {**CONFIG_DEFAULTS["PROMPT_TUNING"], **common, "num_virtual_tokens": int(embedding.shape[0]),
                  "token_dim": dims["hidden"], "num_attention_heads": heads}
    elif cfg.method == "p_tuning":  # PEFT saves the encoder's output (and loads it without an encoder)
        embedding = as_numpy(p_tuning_embeddings(leaves))
        config = {**CONFIG_DEFAULTS["P_TUNING"], **common, "num_virtual_tokens": int(embedding.shape[0]),
                  "token_dim": dims["hidden"], "num_attention_heads": heads,
                  "encoder_reparameterization_type": cfg.option("encoder_reparameterization_type"),
                  "encoder_hidden_size": int(cfg.option("encoder_hidden_size") or dims["hidden"]),
                  "encoder_num_layers": int(cfg.option("encoder_num_layers"))}
    else:
        folded = fold_prefix(params, cfg)["prefix_tuning"]
        keys, values = as_numpy(folded["key"]), as_numpy(folded["value"])  # (layers, P, kv_dim)
        layers, p, kv_dim = keys.shape
        embedding = np.stack([keys, values], axis=1).transpose(2, 0, 1, 3).reshape(p, layers * 2 * kv_dim)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        config = {**CONFIG_DEFAULTS["PREFIX_TUNING"], **common, "num_virtual_tokens": int(p), "token_dim": int(kv_dim),
                  "num_attention_heads": kv_heads, "encoder_hidden_size": int(kv_dim)}
    write_adapter(out_dir, config, {"prompt_embeddings": embedding}, overwrite)
