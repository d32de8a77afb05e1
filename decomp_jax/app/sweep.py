"""Studies: a grid of ordinary experiment runs (``decomp-jax sweep``); ``decomp_jax.app.report`` aggregates them.

A study file (YAML) holds a base experiment config and a grid:

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

from decomp_jax.app.experiment import (
    SECTIONS, ExperimentConfig, is_dotted_key, read_yaml_mapping, saved_steps, seed_group_key, with_overrides,
)
from decomp_jax.app.report import (
    AXIS_METHOD, AXIS_TASK, PAPER_BACKBONE, PAPER_PER_MILLE, PAPER_PLACEMENT, SEED_KEY, aggregate, cells_csv, collect,
    family, load_plan, mean_std_sem, paired, paired_t_test, pairs_markdown, paper_adapter, paper_budgets, plots,
    report, score_of, short_key, sign_test, tables,
)
from decomp_jax.core import methods
from decomp_jax.errors import ConfigError
from decomp_jax.guards import atomic_write_text, lock_holder

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


def _cell_id(axes: Mapping[str, Any]) -> str:
    text = ",".join(f"{short_key(k)}={v}" for k, v in axes.items())
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
    out = study.output_dir
    cells = expand(study)
    write_plan(study, cells)
    i, n = shard
    mine = shard_cells(cells, shard, batch_seeds)
    status = {c.id: cell_status(out, c) for c in mine}
    skipped = [c.id for c in mine if status[c.id] == "done"]
    queue = sweep_units([c for c in mine if status[c.id] != "done"], status, batch_seeds)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log(_plan_line(out, len(cells), len(mine), shard, status, len(skipped), queue, workers))
    runner = _Runner(out, workers, len(mine), queue, log, command or _command, group_command or _group_command,
                     done=list(skipped))
    runner.run(poll_s)
    done, failed, busy = runner.done, runner.failed, runner.busy
    log(f"[sweep] finished shard {i}/{n}: {len(done)} done ({len(skipped)} before), {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "") + (f"; {len(busy)} busy elsewhere: {', '.join(busy)}" if busy else ""))
    return {"done": done, "failed": failed, "skipped": skipped, "busy": busy}


def _plan_line(out: Path, grid: int, mine: int, shard: tuple[int, int], status: Mapping[str, str], done: int,
               queue: Sequence[list], workers: int) -> str:
    """The sweep's opening log line: the shard's cells by status and how they will run."""
    i, n = shard
    together = sum(len(u) for u in queue if len(u) > 1)
    return (f"[sweep] {out}: {grid} cells in the grid, {mine} in shard {i}/{n}: {done} done, "
            f"{sum(s == 'partial' for s in status.values())} to resume, {sum(s == 'failed' for s in status.values())} "
            f"failed before (retried), {sum(s == 'pending' for s in status.values())} to start"
            + (f" ({together} of them as {sum(len(u) > 1 for u in queue)} groups of seeds trained together)"
               if together else "") + f"; {workers} worker(s)")


def _on_term(signum, frame):
    """A scheduler's SIGTERM (a job's time limit) stops the cells as Ctrl-C does."""
    raise KeyboardInterrupt


@dataclasses.dataclass
class _Runner:
    """The processes of one sweep: ``queue`` (units waiting, each a list of cells), ``running`` (by
    its first cell's id: unit, process, start time, log file) and the ids done, failed and busy."""

    out: Path
    workers: int
    total: int  # the shard's cells
    queue: list
    log: Callable[[str], None]
    command: Callable[[Path, Cell, bool], list[str]]
    group_command: Callable[[Path, Sequence[Cell]], list[str]]
    done: list
    failed: list = dataclasses.field(default_factory=list)
    busy: list = dataclasses.field(default_factory=list)
    durations: list = dataclasses.field(default_factory=list)  # per cell (a group's time shared by its seeds)
    running: dict[str, tuple[list, subprocess.Popen, float, Any]] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def run(self, poll_s: float) -> None:
        """Start units while workers are free, until none waits or runs; on an interrupt stop them."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_term) if main else None
        try:
            while self.queue or self.running:
                while self.queue and len(self.running) < self.workers:
                    unit = self.queue.pop(0)
                    if not self.held(unit):
                        self.start(unit)
                time.sleep(poll_s)
                self.reap()
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def reap(self) -> None:
        """Record the units whose process has ended."""
        for key, (unit, proc, t0, handle) in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            handle.close()
            del self.running[key]
            self.finished(unit, code, time.perf_counter() - t0)
            self.progress()

    def stop(self) -> None:
        """Terminate the running processes and wait for them."""
        for unit, proc, _, handle in self.running.values():
            proc.terminate()
        for unit, proc, _, handle in self.running.values():
            proc.wait()
            handle.close()
        self.log(f"[sweep] interrupted: {sum(len(u) for u, *_ in self.running.values())} running cell(s) stopped; "
                 f"run the same command again to resume them")

    def progress(self) -> None:
        left = sum(len(u) for u in self.queue) + sum(len(u) for u, *_ in self.running.values())
        eta = ""
        if self.durations and left:
            per_cell = sum(self.durations) / len(self.durations)
            eta = f", ETA {_fmt_s(per_cell * left / min(self.workers, len(self.queue) + len(self.running)))}"
        self.log(f"[sweep] {len(self.done)}/{self.total} done, {len(self.running)} running, {len(self.failed)} failed, "
                 f"{len(self.queue)} waiting; {_fmt_s(time.perf_counter() - self.started)} elapsed{eta}")

    def held(self, unit: list) -> bool:
        """Whether another process (another sweep, a hand-started train) is training one of ``unit``'s
        run folders now: then the unit is left to it (its folder is neither set aside nor written)."""
        holders = {c.id: lock_holder(self.out / "runs" / c.id) for c in unit}
        holders = {cid: h for cid, h in holders.items() if h is not None}
        for cid, h in holders.items():
            self.log(f"[sweep] busy   {cid}: its run folder is in use by pid {h.get('pid', '?')} on "
                     f"{h.get('host', '?')}; left to it (run the sweep again once it has finished)")
        self.busy.extend(c.id for c in unit if holders)
        return bool(holders)

    def start(self, unit: list) -> None:
        """Start a unit's process: one cell (resumed when it has checkpoints) or seeds trained together."""
        out, first = self.out, unit[0]
        resume = len(unit) == 1 and cell_status(out, first) == "partial"
        for cell in unit:
            if not resume:
                _set_aside(out, cell)
            (out / "failed" / f"{cell.id}.json").unlink(missing_ok=True)
        handle = _open_log(out, unit, resume)
        argv = self.command(out, first, resume) if len(unit) == 1 else self.group_command(out, unit)
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
        self.running[first.id] = (unit, proc, time.perf_counter(), handle)
        self.log(f"[sweep] {'resume' if resume else 'start '} {first.id}"
                 + (f" with {len(unit) - 1} more seed(s): {', '.join(c.id for c in unit[1:])}" if len(unit) > 1 else ""))

    def finished(self, unit: list, code: int, seconds: float) -> None:
        """Sort a unit's cells into done and failed (with a failure record) once its process exits."""
        log_file = self.out / "logs" / f"{unit[0].id}.log"
        for cell in unit:
            cid = cell.id
            if code == 0 and cell_status(self.out, cell) == "done":
                self.done.append(cid)
                self.durations.append(seconds / len(unit))
                self.log(f"[sweep] done   {cid} ({_fmt_s(seconds)}"
                         + (f", {len(unit)} seeds together)" if len(unit) > 1 else ")"))
                continue
            self.failed.append(cid)
            _record_failure(self.out, cell, unit, code, seconds, log_file)
            self.log(f"[sweep] FAILED {cid} (exit {code}); see {log_file}"
                     + (" (the next sweep runs it alone)" if len(unit) > 1 else ""))


def _open_log(out: Path, unit: list, resume: bool):
    """The unit's log file (its first cell's), opened for appending after a header line; the other
    cells' logs point to it."""
    first = unit[0]
    stamp = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
    for cell in unit[1:]:
        with open(out / "logs" / f"{cell.id}.log", "a") as fh:
            fh.write(f"{stamp}trained together with {', '.join(c.id for c in unit if c is not cell)}: "
                     f"see logs/{first.id}.log\n")
    handle = open(out / "logs" / f"{first.id}.log", "a")
    handle.write(stamp + ("resume" if resume else "start" if len(unit) == 1 else
                          f"start {len(unit)} seeds together: {', '.join(c.id for c in unit)}") + "\n")
    handle.flush()
    return handle


def _record_failure(out: Path, cell: Cell, unit: list, code: int, seconds: float, log_file: Path) -> None:
    """``failed/<cell>.json``: the exit code, the time and the log's last lines."""
    tail = log_file.read_text(errors="replace").splitlines()[-15:]
    (out / "failed").mkdir(exist_ok=True)
    atomic_write_text(out / "failed" / f"{cell.id}.json", json.dumps(
        {"cell": cell.id, "returncode": code, "seconds": seconds, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
         "log_tail": tail, **({"trained_with": [c.id for c in unit if c is not cell]} if len(unit) > 1 else {})},
        indent=2) + "\n")


__all__ = [
    "AXIS_METHOD", "AXIS_TASK", "Cell", "FULL", "KEYS", "LR_SCALE", "MPC_PRESET", "PAPER_BACKBONE", "PAPER_PER_MILLE",
    "PAPER_PLACEMENT", "SEED_KEY", "Study", "aggregate", "cell_status", "cells_csv", "collect", "expand", "family",
    "load_plan", "load_study", "mean_std_sem", "method_preset", "paired", "paired_t_test", "pairs_markdown",
    "paper_adapter", "paper_budgets", "parse_shard", "plots", "report", "score_of", "seed_groups", "shard_cells",
    "sign_test", "sweep", "sweep_units", "tables", "task_preset", "write_plan",
]
