"""Experiments from one YAML file: model + data + adapter + training, run end to end.

The YAML has four sections (``model``, ``data``, ``adapter``, ``train``); see
``configs/quickstart.yaml``. ``run(cfg)`` fine-tunes, evaluates, and writes to ``train.output_dir``:
``config.yaml``, ``metrics.jsonl`` (one line per log interval and eval), ``metrics.json`` (final)
and ``adapter.safetensors`` (the trainable leaves and the state's buffers, '/'-joined names).

The config's schema is ``app.config``, the run folder's files and checks ``app.run_folder``, the training
loop ``app.train_loop``; the public names of the first two can be imported from here as well.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.app.config import (
    SECTIONS, SEED_KEYS, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, is_dotted_key, load_config,
    metric_names, parse_override, read_yaml_mapping, seed_group_key, total_steps, with_overrides,
)
from decomp_jax.app.run_folder import (
    FINISHED, LAYOUT_KEYS, LENGTH_KEYS, RESUMABLE_KEYS, check_model_shapes, check_output_dir, config_diff,
    load_adapter, lock_output_dir, read_jsonl, resume_changes, save_adapter, saved_steps,
)
from decomp_jax.app.train_loop import FiniteGuard, Loop, Run, announce, finish, fit, open_run_files, without
from decomp_jax.core import methods
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import trainable_count
from decomp_jax.core.tree import combine, count_params
from decomp_jax.data import glue
from decomp_jax.errors import ConfigError
from decomp_jax.models.hf import load_sequence_classifier
from decomp_jax.models.llama import LlamaConfig
from decomp_jax.parallel import sharding
from decomp_jax.parallel.distributed import global_batch, is_primary, process_rows
from decomp_jax.tasks import TASKS as LM_TASKS, GlueTask
from decomp_jax.tasks.base import load_for
from decomp_jax.training import checkpoint
from decomp_jax.training.train import (
    init_state, init_state_sharded, make_optimizer, make_schedule, make_train_step, stack_states,
)

__all__ = [  # this module's names, and the config's and the run folder's it re-exports
    "DataConfig", "ExperimentConfig", "ModelConfig", "TrainConfig", "SECTIONS", "SEED_KEYS", "is_dotted_key",
    "load_config", "metric_names", "parse_override", "read_yaml_mapping", "seed_group_key", "total_steps",
    "with_overrides",
    "FINISHED", "LAYOUT_KEYS", "LENGTH_KEYS", "RESUMABLE_KEYS", "check_model_shapes", "check_output_dir",
    "load_adapter", "resume_changes", "save_adapter", "saved_steps",
    "Task", "architecture", "evaluate_run", "initial_state", "load_base_model", "make_task", "method_param_counts",
    "peft_arch", "run", "run_seeds",
]


def load_base_model(cfg: ExperimentConfig, seed: Optional[int] = None):
    """``(model, base params, tokenizer)`` of the experiment's model, without its data: our Llama
    for the LM tasks, else a sequence classifier with the task's label count (head seeded)."""
    if cfg.data.task in LM_TASKS:
        return load_for(cfg)
    return load_sequence_classifier(cfg.model.name, glue.get_task(cfg.data.task).num_labels, cfg.model.dtype,
                                    seed=cfg.train.seed if seed is None else seed, backbone=cfg.model.backbone)


def peft_arch(model) -> str:
    """The ``models.names.ARCHS`` key of a loaded model: every decoder family of ``models.families``
    (our ``LlamaForCausalLM``) has the ``llama`` names."""
    if isinstance(model.config, LlamaConfig):
        return "llama"
    return getattr(model.config, "model_type", None) or "llama"


def make_task(cfg: ExperimentConfig, need_train: bool = True):
    """The experiment's task object: GLUE (``tasks.GlueTask``) or a decoder-LLM task (``tasks.TASKS``)."""
    return LM_TASKS.get(cfg.data.task, GlueTask)(cfg, need_train=need_train)


Task = GlueTask  # (the name before decomp_jax.tasks)


def place_on_mesh(cfg: ExperimentConfig, task):
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


def checkpoint_managers(cfg: ExperimentConfig, task: "Task"):
    """The run's checkpoint manager and the base model's fingerprint."""
    tc = cfg.train
    best = tc.best_metric or task.primary_metric
    mngr = checkpoint.manager(Path(tc.output_dir) / "checkpoints", keep_last=tc.keep_last, keep_best=tc.keep_best,
                              best_metric=best, best_mode="max")
    return mngr, checkpoint.fingerprint(task.base_params, cfg.adapter, architecture(task.model))


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
    return _run_folders([cfg], lambda: [Run(cfg, make_task(cfg))], progress=progress, resume=resume,
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
                locks.enter_context(lock_output_dir(cfg))
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
                if new and cfg in locked and not saved_steps(out_dir / "checkpoints") and not read_jsonl(out_dir / "metrics.jsonl"):
                    shutil.rmtree(out_dir, ignore_errors=True)
            raise


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
        diff = config_diff(first, cfg.to_dict(), ignore=SEED_KEYS)
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
    return _run_folders(cfgs, lambda: seed_runs(cfgs), progress=progress, resume=False, on_step=None)


def seed_runs(cfgs: Sequence[ExperimentConfig]) -> list[Run]:
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

    runs = [Run(cfgs[0], make_task(cfgs[0]))]
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
        runs.append(Run(cfg, task))
        paths |= differ
    for r in runs:
        r.own = unflatten_dict({p: v for p, v in flatten_dict(r.task.frozen).items() if p in paths})
    return runs


def _train(runs: Sequence[Run], *, progress: bool, resume: bool, on_step) -> list[dict[str, Any]]:
    """The training loop of ``run`` (one run) and ``run_seeds`` (several, batched: one step trains them
    all); returns each run's final record."""
    loop, state = _build_loop(runs)
    try:
        state, start = open_run_files(loop, state, resume)
        sizes = announce(loop, start)
        state, train_seconds = fit(loop, state, start, progress=progress, on_step=on_step)
        return finish(loop, state, train_seconds, sizes)
    finally:
        for r in runs:
            if r.mngr is not None:
                r.mngr.close()


def _build_loop(runs: Sequence[Run]) -> tuple[Loop, Any]:
    """Place the runs on the mesh (``train.mesh``, or several processes), build their step-0 state (stacked
    when batched), the jitted train step and the batch feed, and open each run's checkpoint manager."""
    lead = runs[0]
    cfg, task, tc = lead.cfg, lead.task, lead.cfg.train
    batched = len(runs) > 1
    steps = total_steps(cfg, task.num_train)
    primary = is_primary()  # with several processes, process 0 prints and writes the run's files
    mesh = None
    if tc.mesh or jax.process_count() > 1:
        for r in runs:
            mesh = place_on_mesh(r.cfg, r.task)
    # a batched step holds one copy of the frozen leaves the runs share; each run's own ones join its buffers
    frozen = without(task.frozen, lead.own)
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
        r.mngr, r.fingerprint = checkpoint_managers(r.cfg, r.task)
    return Loop(runs, steps, frozen, train_step, feed, FiniteGuard(runs, batched), primary), state


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
