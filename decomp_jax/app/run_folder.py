"""A run's output folder: its adapter file and metrics log, the checks before a run starts in it or
resumes it (finished runs and saved checkpoints, what ``--resume`` may change, the folder's lock, the
adapter rank against the model's width), and resuming from its latest good checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.app.config import ExperimentConfig, total_steps
from decomp_jax.core import methods
from decomp_jax.errors import ConfigError
from decomp_jax.guards import atomic_save_safetensors, atomic_write_text, check_finite, folder_lock, load_safetensors
from decomp_jax.models.convert import resolve_llm
from decomp_jax.models.hf import resolve_model_path
from decomp_jax.parallel.distributed import barrier, is_primary, to_host
from decomp_jax.tasks.base import LM_TASK_NAMES
from decomp_jax.training import checkpoint
from decomp_jax.training.train import make_schedule


def append_jsonl(path: Path, record: dict) -> None:
    """Append ``record`` to the JSON-lines file ``path`` as one line."""
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of the JSON-lines file ``path`` (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


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


def config_diff(saved: dict, now: dict, ignore=LAYOUT_KEYS) -> dict:
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
    diff = config_diff(saved, cfg.to_dict())
    refused = {k: v for k, v in diff.items() if tuple(k.split(".")) not in RESUMABLE_KEYS | LENGTH_KEYS}
    if refused:
        allowed = sorted(".".join(k) for k in RESUMABLE_KEYS | LENGTH_KEYS)
        raise ConfigError(
            "--resume cannot change " + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
            + ": that changes the function being trained. Resume with the run's config.yaml (or --set those back), "
            f"or start a new train.output_dir. --resume may change {', '.join(allowed)} and where the run lives "
            f"(train.output_dir, train.mesh, model.partition_rules).")
    return diff


def lock_output_dir(cfg: ExperimentConfig):
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
    """The hidden size in the model folder's config.json (None: no such folder, e.g. a .gguf file). A
    decoder task's model is found as its loader finds it (a folder, a .gguf file or a package shipping one)."""
    if cfg.data.task in LM_TASK_NAMES:
        try:
            folder = Path(resolve_llm(cfg.model.name))
        except FileNotFoundError:
            return None  # (the loader names what is wrong with the model)
    else:
        folder = Path(resolve_model_path(cfg.model.name))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # (the loader names what is wrong with the model)
    width = config.get("hidden_size", config.get("n_embd", config.get("d_model")))
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def resume_run(cfg: ExperimentConfig, task, mngr, state, base_fingerprint, log_path: Path, steps: int):
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
        kept = [r for r in read_jsonl(log_path) if r.get("step", 0) <= start // cfg.train.grad_accum and "final" not in r]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))
    return state, start
