"""Studies: a grid of ordinary experiment runs (``decomp-jax sweep``) and its aggregation (``decomp-jax report``).

A study file (YAML) holds a base experiment config and a grid::

    base: ../quickstart.yaml          # an experiment config (relative to this file), or a mapping
    output_dir: studies/my_study      # default: studies/<file name>
    set: {train.log_every: 50}        # overrides of every cell
    grid:                             # the cross product, in this order
      task: [rte, mrpc]               # names in `tasks` below (or bare GLUE task names)
      method: [lora, lora+mpc_o, ssb] # names in `methods` below, built-in presets, or method names
      adapter.rank: [2, 8]            # any section.key of the experiment config
      train.seed: [0, 1, 2]
    tasks:                            # per-task overrides (the paper's Table VI learning rates, ...)
      rte: {data.task: rte, data.path: ../shared/data/glue/RTE, train.learning_rate: 1.2e-3}
    methods:                          # named method presets: overrides
      ssb_tuned: {adapter.method: ssb, lr_scale: 10}   # lr_scale: times the task's learning rate
    exclude: [{task: rte, adapter.rank: 2}]   # cells to leave out (every given key matches)
    pairs: [[lora+mpc_o, lora]]       # paired comparisons for the report: (A, B) -> A - B
    metrics: {stsb: spearman}         # the score of a task (default: its first metric)

Built-in method presets: ``full`` (full fine-tuning: every leaf trains, no factors), ``X+mpc_o`` /
``X+mpc_d`` (method ``X`` with that matrix pattern constraint) and ``X-mpc_o`` (without it: for AdaLoRA,
whose orthogonality term is MPC_o and on by default, ``mpc_lambda: 0``). Any other name is a method name. A
cell's config is: base, then ``set``, then its task's overrides, then its method preset's, then its
other grid values; keys that do not apply to the cell's method (the rank of a method without one)
are dropped, and cells that end up with the same config are run once.

``sweep`` writes ``STUDY_DIR/study.json`` (the cells and their axes), ``configs/<cell>.yaml``,
``runs/<cell>/`` (each an ordinary run folder), ``logs/<cell>.log`` and ``failed/<cell>.json``. A cell
whose run folder holds ``metrics.json`` is done and skipped; one with checkpoints resumes; a failed one
is recorded and retried on the next sweep. Each cell runs in its own process (``--workers`` at once).
``--shard i/n`` runs the cells whose index is ``i`` modulo ``n``: every shard expands the same grid, so
a cluster array job splits it with no coordinator. ``--batch-seeds`` runs the pending seeds of each
setting (cells equal but for ``train.seed``) as one process that trains them in one batched step over
one copy of the frozen base (``experiment.run_seeds``; each seed still gets its own run folder, equal to
its separate run); its shards then split whole settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from decomp_jax.errors import ConfigError
from decomp_jax.guards import atomic_write_text, lock_holder
from decomp_jax.app.experiment import (
    saved_steps, ExperimentConfig, is_dotted_key, read_yaml_mapping, SECTIONS, seed_group_key, with_overrides,
)
from decomp_jax.core import methods
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import trainable_count
from decomp_jax.core.tree import count_params
from decomp_jax.models.bert import NativeSequenceClassifier
from decomp_jax.models.hf import TARGET_PRESETS
from decomp_jax.tasks.metrics import TASK_METRICS

AXIS_TASK, AXIS_METHOD = "task", "method"
FULL = {"adapter.method": "bitfit", "adapter.train_extra": "."}  # every base leaf trains, no factors
LR_SCALE = "lr_scale"  # in a method preset: multiply the cell's learning rate (after the task's) by this
MPC_PRESET = re.compile(r"^(?P<method>[a-z_]+)(?P<sign>[+-])(?P<mpc>mpc_[od])$")


@dataclasses.dataclass
class Cell:
    """One run of the grid: ``id`` (its folder name), ``axes`` (grid key -> value), ``config`` (the
    experiment config dict, output_dir included) and ``index`` (its place in the grid)."""

    id: str
    index: int
    axes: dict
    config: dict


@dataclasses.dataclass
class Study:
    path: Optional[Path]
    base: dict
    grid: dict
    output_dir: Path
    overrides: dict = dataclasses.field(default_factory=dict)
    tasks: dict = dataclasses.field(default_factory=dict)
    methods: dict = dataclasses.field(default_factory=dict)
    exclude: list = dataclasses.field(default_factory=list)
    pairs: list = dataclasses.field(default_factory=list)
    metrics: dict = dataclasses.field(default_factory=dict)


KEYS = {"base", "output_dir", "set", "grid", "tasks", "methods", "exclude", "pairs", "metrics"}


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}.")
    return dict(value)


def _check_key(key: str, where: str, lr_scale: bool = False) -> None:
    """``key`` must be a config ``section.key`` (or, in a method preset, ``lr_scale``)."""
    if not (is_dotted_key(key) or (lr_scale and key == LR_SCALE)):
        raise ConfigError(f"{where}: {key!r} is not section.key with a section in {list(SECTIONS)} "
                          f"(e.g. adapter.rank, train.learning_rate).")


def load_study(path, output_dir: Optional[str] = None) -> Study:
    """Read and check a study file (see the module docstring)."""
    path = Path(path)
    data = read_yaml_mapping(path, f"study file {str(path)!r} does not exist (try configs/study/minilm_glue_cpu.yaml).",
                             f"keys {sorted(KEYS)}")
    unknown = set(data) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; a study file has {sorted(KEYS)}.")
    base = data.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        base = read_yaml_mapping(base_path, f"{path}: base {base!r} (read as {base_path}) does not exist.",
                                 f"sections {list(SECTIONS)}")
    base = _mapping(base, f"{path}: base")
    grid = _mapping(data.get("grid"), f"{path}: grid")
    if not grid:
        raise ConfigError(f"{path}: the grid is empty; give e.g. grid: {{method: [lora, ssb], train.seed: [0, 1, 2]}}.")
    for key, values in grid.items():
        if key not in (AXIS_TASK, AXIS_METHOD):
            _check_key(key, f"{path}: grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list, got {values!r}.")
    overrides = _mapping(data.get("set"), f"{path}: set")
    for key in overrides:
        _check_key(key, f"{path}: set")
    tasks = {str(k): _mapping(v, f"{path}: tasks.{k}") for k, v in _mapping(data.get("tasks"), f"{path}: tasks").items()}
    methods = {str(k): _mapping(v, f"{path}: methods.{k}") for k, v in _mapping(data.get("methods"), f"{path}: methods").items()}
    for where, table in (("tasks", tasks), ("methods", methods)):
        for name, sets in table.items():
            for key in sets:
                _check_key(key, f"{path}: {where}.{name}", lr_scale=where == "methods")
    pairs = data.get("pairs") or []
    if not isinstance(pairs, list) or any(not isinstance(p, list) or len(p) != 2 for p in pairs):
        raise ConfigError(f"{path}: pairs must be a list of [A, B] method names, e.g. [[lora+mpc_o, lora]].")
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or any(not isinstance(e, Mapping) for e in exclude):
        raise ConfigError(f"{path}: exclude must be a list of mappings of grid keys to values.")
    out = output_dir or data.get("output_dir") or f"studies/{path.stem}"
    return Study(path=path, base=base, grid=grid, output_dir=Path(out), overrides=overrides, tasks=tasks,
                 methods=methods, exclude=[dict(e) for e in exclude], pairs=[tuple(p) for p in pairs],
                 metrics=_mapping(data.get("metrics"), f"{path}: metrics"))


def method_preset(name: str, presets: Mapping[str, Mapping]) -> dict:
    """The overrides of a method axis value: the study's ``methods`` entry, ``full``, ``X+mpc_o`` /
    ``X-mpc_o`` / ``X+mpc_d``, or a bare method name."""

    if name in presets:
        return dict(presets[name])
    if name == "full":
        return dict(FULL)
    match = MPC_PRESET.match(name)
    method = match.group("method") if match else name
    methods.get(method)  # raises for an unknown method, with the closest name
    if match and match.group("sign") == "-":  # without it: AdaLoRA's built-in MPC_o term off (mpc_lambda 0)
        return {"adapter.method": method, "adapter.mpc_lambda": 0.0}
    return {"adapter.method": method, **({"adapter.mpc": match.group("mpc")} if match else {})}


def task_preset(name: str, presets: Mapping[str, Mapping]) -> dict:
    return dict(presets[name]) if name in presets else {"data.task": name}


def _short(key: str) -> str:
    return key.split(".")[-1]


def _cell_id(axes: Mapping[str, Any]) -> str:
    text = ",".join(f"{_short(k)}={v}" for k, v in axes.items())
    return re.sub(r"[^A-Za-z0-9_.,=+@-]", "_", text)


def _unused_keys(config: dict) -> set[str]:
    """section.key values that do not apply to the config's method (its rank, alpha, mpc settings)."""
    adapter = config.get("adapter", {})
    method = methods.get(adapter.get("method", "lora"))
    unused = set()
    if not method.uses_rank:
        unused |= {"adapter.rank", "adapter.alpha", "adapter.rslora", "adapter.init"}
    if not adapter.get("mpc") and method.regularizer is None:
        unused |= {"adapter.mpc_lambda", "adapter.mpc_norm"}
    return unused


def expand(study: Study) -> list[Cell]:
    """The grid's cells, in grid order (the first key varies slowest), excluded ones left out and
    duplicates (the same config once the keys a method does not use are dropped) run once."""

    keys = list(study.grid)
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for values in itertools.product(*(study.grid[k] for k in keys)):
        axes = dict(zip(keys, values))
        if any(all(axes.get(k) == v for k, v in rule.items()) for rule in study.exclude):
            continue
        flat = dict(study.overrides)
        if AXIS_TASK in axes:
            flat.update(task_preset(str(axes[AXIS_TASK]), study.tasks))
        if AXIS_METHOD in axes:
            flat.update(method_preset(str(axes[AXIS_METHOD]), study.methods))
        flat.update({k: v for k, v in axes.items() if k not in (AXIS_TASK, AXIS_METHOD)})
        scale = flat.pop(LR_SCALE, None)
        config = with_overrides(study.base, flat)
        if scale is not None:  # a method preset's multiplier of the task's learning rate
            train = config.setdefault("train", {})
            train["learning_rate"] = float(train.get("learning_rate", 1e-3)) * float(scale)
        unused = _unused_keys(config)
        for key in unused & set(k for k in axes if k not in (AXIS_TASK, AXIS_METHOD)):
            section, field = key.split(".")
            config[section].pop(field, None)
            if field in (study.base.get(section) or {}):
                config[section][field] = study.base[section][field]
        kept = {k: v for k, v in axes.items() if k not in unused}
        cid = _cell_id(kept)
        try:
            ExperimentConfig.from_dict({**config, "train": {**config.get("train", {}), "output_dir": "x"}})
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"study cell {cid}: {err}") from err
        canonical = json.dumps(config, sort_keys=True, default=str)
        if canonical in seen:
            continue
        seen[canonical] = cid
        cells.append(Cell(id=cid, index=len(cells), axes=kept, config=config))
    return cells


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r}: give i/n with 0 <= i < n (e.g. --shard 0/4 ... --shard 3/4; "
                          f"in a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------------------------------------
# the sweep


def cell_status(study_dir: Path, cell: Cell) -> str:
    """``done`` (metrics.json), ``partial`` (checkpoints to resume from), ``failed`` (a failure record)
    or ``pending``."""

    run = study_dir / "runs" / cell.id
    if (run / "metrics.json").is_file():
        return "done"
    if saved_steps(run / "checkpoints"):
        return "partial"
    if (study_dir / "failed" / f"{cell.id}.json").is_file():
        return "failed"
    return "pending"


def write_plan(study: Study, cells: Sequence[Cell]) -> Path:
    """``STUDY_DIR/study.json`` (the study and its cells) and ``configs/<cell>.yaml``."""
    out = study.output_dir
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for cell in cells:
        config = {**cell.config, "train": {**cell.config.get("train", {}), "output_dir": str(out / "runs" / cell.id)}}
        path = out / "configs" / f"{cell.id}.yaml"
        text = yaml.safe_dump(config, sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    plan = {"study": str(study.path) if study.path else None, "grid": study.grid, "pairs": [list(p) for p in study.pairs],
            "metrics": study.metrics, "cells": [{"id": c.id, "index": c.index, "axes": c.axes} for c in cells]}
    atomic_write_text(out / "study.json", json.dumps(plan, indent=2, default=str) + "\n")
    return out / "study.json"


def _command(study_dir: Path, cell: Cell, resume: bool) -> list[str]:
    return _group_command(study_dir, [cell]) + (["--resume"] if resume else [])


def _group_command(study_dir: Path, cells: Sequence[Cell]) -> list[str]:
    """``decomp-jax train CONFIG_1 ... CONFIG_N --no-progress``: one cell, or the seeds of a setting together."""
    return ([sys.executable, "-m", "decomp_jax.app.cli", "train"]
            + [str(study_dir / "configs" / f"{c.id}.yaml") for c in cells] + ["--no-progress"])


def seed_groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The cells grouped by setting: the same config but for ``train.seed``, in grid order."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(seed_group_key(cell.config), []).append(cell)
    return list(groups.values())


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int], batch_seeds: bool = False) -> list[Cell]:
    """The cells of ``shard`` ``(i, n)``: index ``i`` modulo ``n``; with ``batch_seeds``, whole settings
    (a setting's seeds stay in one shard, to train together)."""
    i, n = shard
    if not batch_seeds:
        return [c for c in cells if c.index % n == i]
    return [c for g, group in enumerate(seed_groups(cells)) if g % n == i for c in group]


def sweep_units(cells: Sequence[Cell], status: Mapping[str, str], batch_seeds: bool) -> list[list[Cell]]:
    """What the sweep starts, in order: single cells, and with ``batch_seeds`` the pending cells of a
    setting together (cells that resume or failed before run alone). ``status``: ``cell_status`` by id."""
    if not batch_seeds:
        return [[c] for c in cells]
    units = []
    for group in seed_groups(cells):
        pending = [c for c in group if status[c.id] == "pending"]
        if len(pending) > 1:
            units.append(pending)
        units += [[c] for c in group if c not in pending or len(pending) == 1]
    return units


def _set_aside(study_dir: Path, cell: Cell) -> None:
    """A failed run's folder with no checkpoint cannot resume: move it under failed/ (nothing is deleted)."""
    run = study_dir / "runs" / cell.id
    if run.exists():
        aside = study_dir / "failed" / f"{cell.id}.run-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run), str(aside))


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def sweep(study: Study, *, workers: int = 1, shard: tuple[int, int] = (0, 1), log: Callable[[str], None] = print,
          poll_s: float = 0.5, command: Optional[Callable[[Path, Cell, bool], list[str]]] = None,
          batch_seeds: bool = False, group_command: Optional[Callable[[Path, Sequence[Cell]], list[str]]] = None) -> dict:
    """Run the study's cells of ``shard`` (see the module docstring), ``workers`` at a time. Returns
    ``{"done": [...], "failed": [...], "skipped": [...], "busy": [...]}`` (cell ids; busy: cells another
    process was training, left to it). ``command(study_dir, cell,
    resume)`` gives a cell's argv (default: ``decomp-jax train CONFIG --no-progress [--resume]``).

    ``batch_seeds``: the pending seeds of a setting (cells equal but for ``train.seed``) run as one
    process that trains them in one batched step (``experiment.run_seeds``; ``group_command(study_dir,
    cells)``, default ``decomp-jax train CONFIG_1 ... CONFIG_N``); each still gets its own run folder.
    Cells that resume, or failed before, run alone; shards split whole settings, so every shard of a
    study must be given the same ``batch_seeds``."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}.")
    command, group_command = command or _command, group_command or _group_command
    out = study.output_dir
    cells = expand(study)
    write_plan(study, cells)
    i, n = shard
    mine = shard_cells(cells, shard, batch_seeds)
    status = {c.id: cell_status(out, c) for c in mine}
    skipped = [c.id for c in mine if status[c.id] == "done"]
    queue = sweep_units([c for c in mine if status[c.id] != "done"], status, batch_seeds)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    together = sum(len(u) for u in queue if len(u) > 1)
    log(f"[sweep] {out}: {len(cells)} cells in the grid, {len(mine)} in shard {i}/{n}: {len(skipped)} done, "
        f"{sum(s == 'partial' for s in status.values())} to resume, {sum(s == 'failed' for s in status.values())} "
        f"failed before (retried), {sum(s == 'pending' for s in status.values())} to start"
        + (f" ({together} of them as {sum(len(u) > 1 for u in queue)} groups of seeds trained together)"
           if together else "") + f"; {workers} worker(s)")
    running: dict[str, tuple[list, subprocess.Popen, float, Any]] = {}
    done, failed, durations = list(skipped), [], []
    started = time.perf_counter()

    def on_term(signum, frame):  # a scheduler's SIGTERM (a job's time limit): stop the cells as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None

    def progress():
        left = sum(len(u) for u in queue) + sum(len(u) for u, *_ in running.values())
        eta = ""
        if durations and left:  # durations: per cell (a group's time shared by its seeds)
            eta = f", ETA {_fmt_s(sum(durations) / len(durations) * left / min(workers, len(queue) + len(running)))}"
        log(f"[sweep] {len(done)}/{len(mine)} done, {len(running)} running, {len(failed)} failed, {len(queue)} waiting; "
            f"{_fmt_s(time.perf_counter() - started)} elapsed{eta}")

    def start(unit: list) -> None:
        first = unit[0]
        resume = len(unit) == 1 and cell_status(out, first) == "partial"
        for cell in unit:
            if not resume:
                _set_aside(out, cell)
            (out / "failed" / f"{cell.id}.json").unlink(missing_ok=True)
        stamp = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
        for cell in unit[1:]:  # a group writes one log, its first cell's
            with open(out / "logs" / f"{cell.id}.log", "a") as fh:
                fh.write(f"{stamp}trained together with {', '.join(c.id for c in unit if c is not cell)}: "
                         f"see logs/{first.id}.log\n")
        handle = open(out / "logs" / f"{first.id}.log", "a")
        handle.write(stamp + ("resume" if resume else "start" if len(unit) == 1 else
                              f"start {len(unit)} seeds together: {', '.join(c.id for c in unit)}") + "\n")
        handle.flush()
        argv = command(out, first, resume) if len(unit) == 1 else group_command(out, unit)
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
        running[first.id] = (unit, proc, time.perf_counter(), handle)
        log(f"[sweep] {'resume' if resume else 'start '} {first.id}"
            + (f" with {len(unit) - 1} more seed(s): {', '.join(c.id for c in unit[1:])}" if len(unit) > 1 else ""))

    def finished(unit: list, code: int, seconds: float) -> None:
        log_file = out / "logs" / f"{unit[0].id}.log"
        for cell in unit:
            cid = cell.id
            if code == 0 and cell_status(out, cell) == "done":
                done.append(cid)
                durations.append(seconds / len(unit))
                log(f"[sweep] done   {cid} ({_fmt_s(seconds)}" + (f", {len(unit)} seeds together)" if len(unit) > 1 else ")"))
                continue
            failed.append(cid)
            tail = log_file.read_text(errors="replace").splitlines()[-15:]
            (out / "failed").mkdir(exist_ok=True)
            atomic_write_text(out / "failed" / f"{cid}.json", json.dumps(
                {"cell": cid, "returncode": code, "seconds": seconds, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "log_tail": tail, **({"trained_with": [c.id for c in unit if c is not cell]} if len(unit) > 1 else {})},
                indent=2) + "\n")
            log(f"[sweep] FAILED {cid} (exit {code}); see {log_file}" + (" (the next sweep runs it alone)" if len(unit) > 1 else ""))

    busy = []

    def held(unit: list) -> bool:
        """Whether another process (another sweep, a hand-started train) is training one of ``unit``'s
        run folders now: then the unit is left to it (its folder is neither set aside nor written)."""
        holders = {c.id: lock_holder(out / "runs" / c.id) for c in unit}
        holders = {cid: h for cid, h in holders.items() if h is not None}
        for cid, h in holders.items():
            log(f"[sweep] busy   {cid}: its run folder is in use by pid {h.get('pid', '?')} on {h.get('host', '?')}; "
                f"left to it (run the sweep again once it has finished)")
        busy.extend(c.id for c in unit if holders)
        return bool(holders)

    try:
        while queue or running:
            while queue and len(running) < workers:
                unit = queue.pop(0)
                if not held(unit):
                    start(unit)
            time.sleep(poll_s)
            for key, (unit, proc, t0, handle) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                handle.close()
                del running[key]
                finished(unit, code, time.perf_counter() - t0)
                progress()
    except KeyboardInterrupt:
        for unit, proc, _, handle in running.values():
            proc.terminate()
        for unit, proc, _, handle in running.values():
            proc.wait()
            handle.close()
        log(f"[sweep] interrupted: {sum(len(u) for u, *_ in running.values())} running cell(s) stopped; run the same "
            f"command again to resume them")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log(f"[sweep] finished shard {i}/{n}: {len(done)} done ({len(skipped)} before), {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "") + (f"; {len(busy)} busy elsewhere: {', '.join(busy)}" if busy else ""))
    return {"done": done, "failed": failed, "skipped": skipped, "busy": busy}


# ---------------------------------------------------------------------------------------------
# the report


def load_plan(study_dir) -> dict:
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the output_dir of a `decomp-jax sweep` (it writes study.json).")
    return json.loads(path.read_text())


def collect(study_dir) -> list[dict]:
    """One record per finished cell: ``{id, axes, task, method, metrics, trainable_params,
    backbone_params}`` (from ``runs/<cell>/metrics.json``)."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    records = []
    for cell in plan["cells"]:
        path = study_dir / "runs" / cell["id"] / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        records.append({"id": cell["id"], "axes": cell["axes"], "task": m["task"], "adapter_method": m["method"],
                        "method": str(cell["axes"].get(AXIS_METHOD, m["method"])), "metrics": m["eval"],
                        "trainable_params": m["trainable_params"], "backbone_params": m["backbone_params"],
                        "train_seconds": m.get("train_seconds"), "steps": m.get("steps")})
    return records


def cells_csv(records: list[dict]) -> str:
    """One row per finished cell: its id, grid axes, every eval metric, trainable parameters, steps and
    training seconds (the per-cell numbers behind the table)."""
    import csv
    import io

    axes = list(dict.fromkeys(k for r in records for k in r["axes"]))
    metric_names = sorted({k for r in records for k in r["metrics"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", *axes, *metric_names, "trainable_params", "steps", "train_seconds"])
    for r in records:
        writer.writerow([r["id"], *(r["axes"].get(a, "") for a in axes), *(r["metrics"].get(m, "") for m in metric_names),
                         r["trainable_params"], r.get("steps", ""),
                         "" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"])
    return buf.getvalue()


def mean_std_sem(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (n - 1) and standard error of the mean; std and sem are nan
    for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, std / math.sqrt(n)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        d = 1.0 / d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0)


def paired_t_test(diffs: Sequence[float]) -> tuple[float, float]:
    """``(t, two-sided p)`` of a paired t-test on the differences (Student's t with n - 1 degrees of
    freedom); ``(nan, nan)`` for fewer than two differences, ``(inf or 0, 0 or 1)`` when they are all equal."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    mean, std, sem = mean_std_sem(diffs)
    if std <= 1e-12 * max(1.0, abs(mean)):  # all equal (up to rounding)
        return (math.copysign(math.inf, mean), 0.0) if abs(mean) > 1e-12 else (0.0, 1.0)
    t = mean / sem
    dof = n - 1
    return t, _betainc(dof / 2, 0.5, dof / (dof + t * t))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties left out): P(a split at least as uneven | p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def score_of(record: dict, metrics: Mapping[str, str]) -> tuple[str, float]:
    """``(metric name, value x 100)`` of a record: the study's metric for its task, else the task's first."""
    name = metrics.get(record["task"]) or TASK_METRICS.get(record["task"], tuple(record["metrics"]))[0]
    if name not in record["metrics"]:
        raise ConfigError(f"metrics.{record['task']}: {name!r} is not among the run's metrics {sorted(record['metrics'])}.")
    return name, 100.0 * float(record["metrics"][name])


SEED_KEY = "train.seed"


def _row_key(axes: Mapping[str, Any]) -> tuple:
    """What a table row is: the method and every other grid value except the task and the seed."""
    return tuple((k, v) for k, v in axes.items() if k not in (AXIS_TASK, SEED_KEY))


def _label(row: tuple) -> str:
    parts = dict(row)
    method = str(parts.pop(AXIS_METHOD, "?"))
    return method + "".join(f" {_short(k)}={v}" for k, v in parts.items())


def aggregate(records: Sequence[dict], metrics: Mapping[str, str] = {}) -> dict:
    """``{"tasks": [...], "rows": [{label, key, budget_per_mille, cells: {task: {mean, std, sem, n,
    metric, values}}, avg}]}``: scores (x 100) over seeds per row and task; ``avg`` is the mean of the
    task means where the row has every task (else None)."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows: dict[tuple, dict] = {}
    for r in records:
        key = _row_key(r["axes"])
        row = rows.setdefault(key, {"key": key, "label": _label(key), "cells": {}, "budgets": [],
                                    "family": family(r), "rank": dict(key).get("adapter.rank")})
        metric, value = score_of(r, metrics)
        cell = row["cells"].setdefault(r["task"], {"metric": metric, "values": [], "seeds": []})
        cell["values"].append(value)
        cell["seeds"].append(r["axes"].get(SEED_KEY))
        row["budgets"].append(1000.0 * r["trainable_params"] / r["backbone_params"])
    out = []
    for row in rows.values():
        for cell in row["cells"].values():
            cell["mean"], cell["std"], cell["sem"] = mean_std_sem(cell["values"])
            cell["n"] = len(cell["values"])
        means = [row["cells"][t]["mean"] for t in tasks if t in row["cells"]]
        row["avg"] = sum(means) / len(means) if len(means) == len(tasks) else None
        budgets = row.pop("budgets")
        row["budget_per_mille"] = sum(budgets) / len(budgets)
        out.append(row)
    return {"tasks": tasks, "rows": out}


def paired(records: Sequence[dict], pairs: Sequence[Sequence[str]], metrics: Mapping[str, str] = {}) -> list[dict]:
    """For each ``(A, B)``: the settings (task and every grid value but the method and the seed) where
    both ran; per setting the mean of the seed-paired differences A - B (seeds both have); over the
    settings: the mean difference, wins / settings, a paired t-test and a sign test on the settings'
    differences."""
    out = []
    for a, b in pairs:
        by: dict[tuple, dict[str, dict]] = {}
        for r in records:
            if r["method"] not in (a, b):
                continue
            setting = tuple((k, v) for k, v in r["axes"].items() if k not in (AXIS_METHOD, SEED_KEY))
            setting = ((AXIS_TASK, r["task"]),) + tuple(x for x in setting if x[0] != AXIS_TASK)
            by.setdefault(setting, {}).setdefault(r["method"], {})[r["axes"].get(SEED_KEY)] = score_of(r, metrics)[1]
        settings = []
        for setting, sides in by.items():
            if a in sides and b in sides:
                seeds = sorted(set(sides[a]) & set(sides[b]), key=str)
                if seeds:
                    diffs = [sides[a][s] - sides[b][s] for s in seeds]
                    settings.append({"setting": dict(setting), "diff": sum(diffs) / len(diffs), "seeds": len(seeds)})
        diffs = [s["diff"] for s in settings]
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        t, p = paired_t_test(diffs)
        out.append({"a": a, "b": b, "settings": settings, "n": len(diffs),
                    "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan,
                    "sem": mean_std_sem(diffs)[2] if diffs else math.nan,
                    "wins": wins, "losses": losses, "t": t, "p_t": p, "p_sign": sign_test(wins, losses)})
    return out


def _pm(mean: float, sem: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(sem) else f" ± {sem:.{digits}f}")


def tables(agg: dict) -> dict[str, str]:
    """The paper's layout (rows = methods with their budget in per mille, columns = tasks, Avg) as
    ``{"md", "csv", "tex"}``; cells are mean ± standard error over seeds (x 100)."""
    tasks = agg["tasks"]
    metric_of = {t: next((r["cells"][t]["metric"] for r in agg["rows"] if t in r["cells"]), "") for t in tasks}
    head = [f"{t} ({metric_of[t]})" for t in tasks]
    md = ["| method | budget ‰ | " + " | ".join(head) + " | Avg |", "|---|---|" + "---|" * len(tasks) + "---|"]
    csv = ["method,budget_per_mille," + ",".join(f"{t}_mean,{t}_std,{t}_sem,{t}_n" for t in tasks) + ",avg"]
    tex = ["\\begin{tabular}{l r " + "r " * len(tasks) + "r}", "\\hline",
           "Method & Budget (\\textperthousand) & " + " & ".join(t.upper() for t in tasks) + " & Avg \\\\", "\\hline"]
    for row in agg["rows"]:
        cells = [row["cells"].get(t) for t in tasks]
        avg = "" if row["avg"] is None else f"{row['avg']:.2f}"
        md.append(f"| {row['label']} | {row['budget_per_mille']:.3f} | "
                  + " | ".join(_pm(c["mean"], c["sem"]) if c else "" for c in cells) + f" | {avg} |")
        csv.append(",".join([f'"{row["label"]}"', f"{row['budget_per_mille']:.4f}"] + [
            ",".join("" if c is None or math.isnan(c[k]) else f"{c[k]:.4f}" for k in ("mean", "std", "sem")) + f",{c['n'] if c else ''}"
            for c in cells] + [avg]))
        tex.append(f"{row['label'].replace('_', chr(92) + '_')} & {row['budget_per_mille']:.2f} & "
                   + " & ".join(f"{c['mean']:.2f}$_{{\\pm {c['sem']:.2f}}}$" if c and not math.isnan(c["sem"])
                                else (f"{c['mean']:.2f}" if c else "--") for c in cells) + f" & {avg or '--'} \\\\")
    tex += ["\\hline", "\\end{tabular}"]
    return {"md": "\n".join(md) + "\n", "csv": "\n".join(csv) + "\n", "tex": "\n".join(tex) + "\n"}


def pairs_markdown(comparisons: Sequence[dict]) -> str:
    lines = ["| A - B | settings | mean diff ± s.e. | wins / settings | paired t (p) | sign test p |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['a']} - {c['b']} | {c['n']} | {_pm(c['mean_diff'], c['sem'])} | {c['wins']} / {c['n']} "
                     f"| {c['t']:.2f} ({c['p_t']:.3f}) | {c['p_sign']:.3f} |")
    return "\n".join(lines) + "\n"


def family(record: dict) -> str:
    """The paper's family of a record's method (``full`` for full fine-tuning)."""
    if record["method"] == "full" or record["trainable_params"] == record["backbone_params"]:
        return "full"
    return methods.get(record["adapter_method"]).family


def _avg_sem(row: dict) -> float:
    """The standard error of a row's Avg: sqrt(sum of the tasks' squared standard errors) / tasks."""
    sems = [c["sem"] for c in row["cells"].values()]
    return math.sqrt(sum(x * x for x in sems)) / len(sems) if sems else math.nan


def plots(agg: dict, out_dir: Path) -> list[Path]:
    """``budget.png`` (Avg against the budget in per mille, log scale, one colour per family) and, when
    rows differ in ``adapter.rank``, ``ranks.png`` (Avg per rank, one bar per method, standard-error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in agg["rows"] if r["avg"] is not None]
    paths = []
    if not rows:
        return paths
    colours = {"full": "black", "reconstruction": "tab:blue", "extension": "tab:orange", "combination": "tab:green"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for fam, colour in colours.items():
        pts = [r for r in rows if r["family"] == fam]
        if pts:
            ax.errorbar([r["budget_per_mille"] for r in pts], [r["avg"] for r in pts],
                        yerr=[0 if math.isnan(_avg_sem(r)) else _avg_sem(r) for r in pts],
                        fmt="o", color=colour, label=fam, capsize=2)
            for r in pts:
                ax.annotate(r["label"], (r["budget_per_mille"], r["avg"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
            by_method: dict = {}
            for r in pts:  # one method over several ranks: a line through its budgets (the paper's Fig. 2)
                by_method.setdefault(dict(r["key"]).get(AXIS_METHOD), []).append(r)
            for line in by_method.values():
                if len(line) > 1:
                    line = sorted(line, key=lambda r: r["budget_per_mille"])
                    ax.plot([r["budget_per_mille"] for r in line], [r["avg"] for r in line], color=colour, lw=0.8,
                            alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (per mille of the backbone, log scale)")
    ax.set_ylabel(f"Avg score over {', '.join(agg['tasks'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    if len(ranks) > 1:
        methods = list(dict.fromkeys(dict(r["key"]).get(AXIS_METHOD) for r in rows if r["rank"] is not None))
        width = 0.8 / max(len(methods), 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(ranks) * max(len(methods), 1) * 0.4), 4.5))
        for j, m in enumerate(methods):
            xs, ys, es = [], [], []
            for i, rank in enumerate(ranks):
                match = [r for r in rows if dict(r["key"]).get(AXIS_METHOD) == m and r["rank"] == rank]
                if match:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(match[0]["avg"])
                    es.append(0 if math.isnan(_avg_sem(match[0])) else _avg_sem(match[0]))
            ax.bar(xs, ys, width=width, yerr=es, capsize=2, label=str(m))
        ax.set_xticks(range(len(ranks)), [f"r={r}" for r in ranks])
        low = min(r["avg"] for r in rows if r["rank"] is not None)
        ax.set_ylim(bottom=max(0.0, low - 5))
        ax.set_ylabel("Avg score")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / "ranks.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def report(study_dir, out_dir=None, pairs: Optional[Sequence[Sequence[str]]] = None) -> dict[str, Path]:
    """Aggregate a study folder: ``report.md`` (status, the table, paired comparisons), ``table.csv``,
    ``table.tex``, ``report.json``, ``cells.csv`` (per-cell metrics), ``budget.png`` and ``ranks.png``, in ``out_dir`` (default
    ``STUDY_DIR/report``). ``pairs`` defaults to the study file's."""
    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    out = Path(out_dir) if out_dir else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = collect(study_dir)
    if not records:
        raise FileNotFoundError(f"{study_dir}: no cell has finished yet (no runs/*/metrics.json); run `decomp-jax sweep` first.")
    metrics = plan.get("metrics") or {}
    agg = aggregate(records, metrics)
    comparisons = paired(records, pairs if pairs is not None else plan.get("pairs") or [], metrics)
    failed = sorted(p.stem for p in (study_dir / "failed").glob("*.json")) if (study_dir / "failed").is_dir() else []
    done = {r["id"] for r in records}
    failed = [f for f in failed if f not in done]
    t = tables(agg)
    paths = {"md": out / "report.md", "csv": out / "table.csv", "tex": out / "table.tex", "json": out / "report.json",
             "cells": out / "cells.csv"}
    status = (f"{len(records)} of {len(plan['cells'])} cells finished, {len(failed)} failed"
              + (f" ({', '.join(failed)})" if failed else "") + ".")
    text = ["# Study report", "", f"`{study_dir}`: {status} Scores x 100, mean ± standard error over seeds "
            f"(n per cell in table.csv); budget: trainable parameters (the task head included) per mille of the "
            f"backbone's.", "", t["md"]]
    if comparisons:
        text += ["## Paired comparisons", "", "Per setting (task and grid values but the method and the seed) the mean "
                 "of the seed-paired differences; over settings the mean ± standard error, the settings A wins, a "
                 "paired t-test and an exact sign test.", "", pairs_markdown(comparisons)]
    figures = plots(agg, out)
    text += [f"![{p.stem}]({p.name})" for p in figures]
    paths["md"].write_text("\n".join(text) + "\n")
    paths["csv"].write_text(t["csv"])
    paths["tex"].write_text(t["tex"])
    paths["cells"].write_text(cells_csv(records))
    serial = {"tasks": agg["tasks"], "rows": [{**r, "key": [list(k) for k in r["key"]]} for r in agg["rows"]],
              "pairs": comparisons, "finished": len(records), "cells": len(plan["cells"]), "failed": failed}
    paths["json"].write_text(json.dumps(serial, indent=2, default=str) + "\n")
    for p in figures:
        paths[p.stem] = p
    return paths


# ---------------------------------------------------------------------------------------------
# budgets as the paper counts them

PAPER_BACKBONE = 125e6  # "RoBERTa-base (125M)": the paper's denominator
PAPER_PER_MILLE = {"ssl": 0.22, "ia3": 0.44, "ssb": 0.66, "bitfit": 0.82, "lora": 2.65, "dora": 3.32}  # LoRA/DoRA at r=2
# where the paper puts the methods: SSL, IA3, SSB (and SAM-PARSER) on key, value and the FFN intermediate
# matrix, as their counts imply; BitFit on every bias (LayerNorm's too); the bottleneck adapters at their
# placements; every other method on the six linear layers of each block
PAPER_PLACEMENT = {"ssl": "key_value_ffn", "ia3": "key_value_ffn", "ssb": "key_value_ffn", "sam_parser": "key_value_ffn",
                   "houlsby": "houlsby", "pfeiffer": "pfeiffer"}


def paper_adapter(method: str, rank: int = 2):
    """The AdapterConfig of ``method`` at the paper's placement on RoBERTa-base (see PAPER_PLACEMENT)."""
    presets = TARGET_PRESETS["roberta"]
    targets = presets[PAPER_PLACEMENT.get(method, "all_linear")]
    extra = r"LayerNorm/bias$" if method == "bitfit" else None
    return AdapterConfig(method=method, targets=targets, rank=rank, alpha=2.0 * rank, train_extra=extra)


def paper_budgets(rank: int = 2) -> list[dict]:
    """Every per-layer method's trainable parameters on RoBERTa-base (transformers' ``RobertaConfig()``,
    shapes only: nothing is initialised) at the paper's placements, in per mille of 125M, with the
    paper's value where its tables give one (LoRA and DoRA: at r=2)."""
    import jax
    from transformers import RobertaConfig


    model = NativeSequenceClassifier(RobertaConfig())
    encoder = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0)))["roberta"]
    # the bare RobertaModel's tree (transformers' RobertaConfig() defaults): the encoder and its pooler
    d = RobertaConfig().hidden_size
    pooler = {"dense": {"kernel": jax.ShapeDtypeStruct((d, d), jax.numpy.float32),
                        "bias": jax.ShapeDtypeStruct((d,), jax.numpy.float32)}}
    shapes = {**encoder, "pooler": pooler}
    rows = []
    for name in methods.names():
        cfg = paper_adapter(name, rank)
        count = trainable_count(shapes, cfg)
        paper = PAPER_PER_MILLE.get(name) if (rank == 2 or not methods.get(name).uses_rank) else None
        rows.append({"method": name, "placement": PAPER_PLACEMENT.get(name, "all_linear") + (" + LayerNorm" if name == "bitfit" else ""),
                     "trainable": count, "per_mille": 1000.0 * count / PAPER_BACKBONE, "paper_per_mille": paper,
                     "backbone": count_params(shapes)})
    return rows
