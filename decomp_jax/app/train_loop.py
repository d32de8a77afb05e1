"""The training loop of one run, or of several seeds trained together in one batched step: each run's part
of the loop, the guard of the step's finite flags, and the loop's steps (start the run's files, announce,
fit with logging, evaluation and checkpoints at their intervals, finish with the adapter, metrics and the
final checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.app.config import ExperimentConfig
from decomp_jax.app.run_folder import append_jsonl, resume_run, save_adapter
from decomp_jax.core.methods.flexlora import live_ranks
from decomp_jax.core.tree import combine, count_params, split
from decomp_jax.guards import NonFiniteError, atomic_write_text
from decomp_jax.training import checkpoint


class FiniteGuard:
    """Checks the train step's ``finite`` flags on the host in batches (one transfer at each log,
    eval and save step and at the end, none in between) and stops at the first bad step. In a
    batched run (several seeds together) the flags hold one value per run, and the first run that
    diverged is named."""

    def __init__(self, runs: Sequence["Run"], batched: bool):
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
class Run:
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
        return state.replace(buffers=without(state.buffers, self.own)) if self.own else state


def without(tree: dict, other: dict) -> dict:
    """``tree`` less the leaves at ``other``'s paths (``tree`` itself when ``other`` is empty)."""
    if not other:
        return tree
    theirs = set(flatten_dict(other))
    return split(tree, unflatten_dict({p: p not in theirs for p in flatten_dict(tree)}))[0]


@dataclasses.dataclass
class Loop:
    """What the loop's steps share: the runs (one, or several in one batched step), their length in optimizer
    steps, the jitted train step with the frozen tree it reads and its batch feed, and the guard of its
    finite flags. ``primary``: this process prints and writes the runs' files (process 0)."""

    runs: Sequence[Run]
    steps: int
    frozen: Any
    train_step: Callable
    feed: Callable[[int], dict]
    guard: FiniteGuard
    primary: bool

    @property
    def lead(self) -> Run:
        return self.runs[0]

    @property
    def batched(self) -> bool:
        return len(self.runs) > 1

    def log(self, i: int, record: dict) -> None:
        """Append ``record`` to run ``i``'s metrics.jsonl (process 0's)."""
        if self.primary:
            append_jsonl(self.runs[i].log_path, record)

    def log_metrics(self, step: int, host: dict, rate: float) -> dict:
        """Log each run's train metrics of ``step`` (``host``: on the host); returns the last run's."""
        values = {}
        for i in range(len(self.runs)):
            values = {k: float(v) for k, v in _member(host, i, self.batched).items() if k != "finite"}
            self.log(i, {"step": step, **values, "examples_per_s": rate})
        return values

    def save(self, state, metrics: Optional[list] = None) -> None:
        """Check the pending finite flags, then save each run's checkpoint (``metrics``: its evaluation)."""
        self.guard.check()
        for i, r in enumerate(self.runs):
            checkpoint.save(r.mngr, r.state(state, i, self.batched), r.task.frozen, r.cfg.adapter,
                            fingerprint=r.fingerprint, metadata={"experiment": r.cfg.to_dict()},
                            metrics=None if metrics is None else metrics[i])

    def evaluate(self, state) -> list[dict]:
        """Each run's evaluation of its part of ``state``."""
        out = []
        for i, r in enumerate(self.runs):
            mine = r.state(state, i, self.batched)
            out.append(r.task.evaluate(mine.trainable, mine.buffers))
        return out


def open_run_files(loop: Loop, state, resume: bool):
    """Resume from the lead run's latest good checkpoint, or start each run's metrics.jsonl empty; then write
    each run's config.yaml. Returns the state and the micro-step to start at."""
    lead = loop.lead
    start = 0
    if resume:
        state, start = resume_run(lead.cfg, lead.task, lead.mngr, state, lead.fingerprint, lead.log_path, loop.steps)
    elif loop.primary:
        for r in loop.runs:
            atomic_write_text(r.log_path, "")
    if loop.primary:
        for r in loop.runs:
            atomic_write_text(r.out_dir / "config.yaml", r.cfg.to_yaml())
    return state, start


def announce(loop: Loop, start: int) -> tuple[int, int]:
    """Print the trainable share of the backbone, and where the run resumes, which seeds train together and
    on how many processes; returns ``(trainable, backbone)`` parameter counts."""
    runs, cfg, task = loop.runs, loop.lead.cfg, loop.lead.task
    n_trainable = count_params(task.trainable)
    n_backbone = task.backbone_params
    summary = (f"{cfg.adapter.method}: {n_trainable:,} trainable parameters = "
               f"{100 * n_trainable / n_backbone:.3f}% of the {n_backbone:,}-parameter backbone")
    if loop.primary:
        print(summary + (f"; resuming at step {start // cfg.train.grad_accum}" if start else "")
              + (f"; {len(runs)} seeds ({', '.join(str(r.cfg.train.seed) for r in runs)}) in one batched step"
                 if loop.batched else "")
              + (f"; {jax.process_count()} processes, {jax.device_count()} devices" if jax.process_count() > 1 else ""),
              flush=True)
    return n_trainable, n_backbone


def fit(loop: Loop, state, start: int, *, progress: bool, on_step):
    """The micro-steps from ``start`` to the end: log at ``train.log_every`` steps and the last, evaluate and
    save at their intervals, call ``on_step`` after each optimizer step; returns the trained state and the
    seconds the steps took."""
    from tqdm.auto import tqdm

    cfg = loop.lead.cfg
    tc = cfg.train
    micro_steps = loop.steps * tc.grad_accum
    bar = tqdm(total=loop.steps, initial=start // tc.grad_accum, desc=f"{cfg.data.task}/{cfg.adapter.method}",
               disable=not (progress and loop.primary), unit="step")
    t0 = last_time = time.perf_counter()
    last_step = start // tc.grad_accum
    for micro in range(start, micro_steps):
        batch = loop.feed(micro)
        state, metrics = loop.train_step(state, loop.frozen, batch)
        step = (micro + 1) // tc.grad_accum
        loop.guard.add(step, metrics)
        if (micro + 1) % tc.grad_accum:
            continue
        values = {}
        if step % tc.log_every == 0 or step == loop.steps:
            loop.guard.check()
            host = jax.device_get(metrics)
            now = time.perf_counter()
            rate = (step - last_step) * tc.batch_size * tc.grad_accum / (now - last_time)  # per run
            last_time, last_step = now, step
            values = loop.log_metrics(step, host, rate)
            bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{rate * len(loop.runs):.0f}")
        bar.update(1)
        _evaluate_and_save(loop, state, step)
        if on_step is not None:
            on_step(step, values)
    loop.guard.check()
    jax.block_until_ready(state.trainable)
    bar.close()
    return state, time.perf_counter() - t0


def _evaluate_and_save(loop: Loop, state, step: int) -> None:
    """Before the last step: evaluate and log at ``train.eval_every`` steps, save a checkpoint (with that
    evaluation) at ``train.save_every`` steps; a failed save says how to continue."""
    tc = loop.lead.cfg.train
    eval_metrics = None
    if tc.eval_every and step % tc.eval_every == 0 and step < loop.steps:
        loop.guard.check()
        eval_metrics = loop.evaluate(state)
        for i, m in enumerate(eval_metrics):
            loop.log(i, {"step": step, "eval": m})
    if tc.save_every and step % tc.save_every == 0 and step < loop.steps:
        try:
            loop.save(state, eval_metrics)
        except checkpoint.CheckpointError as err:
            kept = loop.lead.mngr.all_steps()
            config = loop.lead.out_dir / "config.yaml"
            raise checkpoint.CheckpointError(
                f"{err} Training stopped at step {step}; " + (
                    f"the last checkpoint is step {max(kept)}: once the cause is fixed, continue with "
                    f"`decomp-jax train {config} --resume`." if kept else
                    "no checkpoint was written yet: once the cause is fixed, run the same command again.")
            ) from err


def finish(loop: Loop, state, train_seconds: float, sizes: tuple[int, int]) -> list[dict[str, Any]]:
    """Evaluate; write each run's final log line, adapter and metrics.json; then the final checkpoint,
    which metrics.json names once it is written. Returns each run's final record."""
    eval_metrics = loop.evaluate(state)
    records = []
    for i in range(len(loop.runs)):
        loop.log(i, {"step": loop.steps, "eval": eval_metrics[i], "final": True})
        records.append(_final_record(loop, state, i, eval_metrics[i], train_seconds, sizes))
    final = int(_member(state.step, 0, loop.batched))
    if final not in loop.lead.mngr.all_steps():  # (resuming a finished run only re-evaluates)
        try:
            loop.save(state, eval_metrics)
        except checkpoint.CheckpointError as err:
            kept = ", ".join(str(r.out_dir) for r in loop.runs)
            raise checkpoint.CheckpointError(
                f"{err} The results are kept: adapter.safetensors and metrics.json in {kept} (`decomp-jax eval`, "
                f"`export` and `merge` read them).") from err
    for r, record in zip(loop.runs, records):  # the checkpoint exists now: metrics.json names it
        record["checkpoint"] = str(Path(r.mngr.directory) / str(final))
        if loop.primary:
            atomic_write_text(r.out_dir / "metrics.json", json.dumps(record, indent=2))
    return records


def _final_record(loop: Loop, state, i: int, evaluation: dict, train_seconds: float,
                  sizes: tuple[int, int]) -> dict[str, Any]:
    """Write run ``i``'s adapter.safetensors and its metrics.json (no checkpoint named yet); returns that
    record, with the live ranks of the methods that move them."""
    r = loop.runs[i]
    n_trainable, n_backbone = sizes
    mine = r.state(state, i, loop.batched)
    # the results first: a failing final checkpoint (a full disk, say) keeps them
    save_adapter(combine(mine.trainable, mine.buffers), r.out_dir / "adapter.safetensors")
    record = {
        "task": r.task.name,
        "method": r.cfg.adapter.method,
        "eval": evaluation,
        "train_seconds": train_seconds,
        "steps": loop.steps,
        "trainable_params": n_trainable,
        "backbone_params": n_backbone,
        "trainable_fraction": n_trainable / n_backbone,
        "checkpoint": None,  # named once the final checkpoint is written (finish)
    }
    if loop.batched:
        record["batched"] = len(loop.runs)  # seeds trained together: train_seconds is theirs together
    ranks = live_ranks(combine(mine.trainable, mine.buffers, r.task.frozen), r.cfg.adapter)
    if ranks is not None:  # FlexLoRA, AdaLoRA: where the ranks went
        record["live_ranks"] = ranks
        values = sorted(ranks.values())
        if loop.primary:
            print(f"live ranks over {len(values)} layers: min {values[0]}, median {values[len(values) // 2]}, "
                  f"max {values[-1]}, total {sum(values)}", flush=True)
    if loop.primary:
        atomic_write_text(r.out_dir / "metrics.json", json.dumps(record, indent=2))
    return record
