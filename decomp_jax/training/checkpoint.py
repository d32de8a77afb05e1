"""Adapter-only Orbax checkpoints: small, atomic, resumable, and tied to their base model.

A checkpoint holds what is not in the base model: the train state (trainable leaves, optimizer
state, step, RNG, a stateful method's buffers and state), the constants a method derived from the
base at injection that might not be recomputed bit for bit elsewhere (SVD buffers, PiSSA/MiLoRA's
residual kernels), the ``AdapterConfig``, a fingerprint of the base model, and caller metadata
(e.g. the experiment config). The data position is the step itself: batches are a pure function
of the step (``data.glue.train_batch``).

``orbax.checkpoint.CheckpointManager`` writes each step to a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoints loadable. It keeps the
last ``keep_last`` checkpoints plus the ``keep_best`` best by an eval metric.

Guards: ``save`` refuses a state with NaN or inf leaves (``guards.NonFiniteError``) and records a
SHA-256 of every saved array; ``restore`` checks them, and when the latest checkpoint cannot be
read or its arrays do not match their checksums it says so by name and falls back to the
previous good one (``CheckpointFallbackWarning``). A failed write is one ``CheckpointError`` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.core import named
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import adapted_layers, attach, find_targets, own_leaves
from decomp_jax.core.methods import get
from decomp_jax.core.tree import combine, matrix_leaf, path_str, set_leaves
from decomp_jax.errors import ConfigError
from decomp_jax.guards import NonFiniteError, interrupts_deferred, nonfinite_leaves
from decomp_jax.parallel.distributed import to_host
from decomp_jax.quant import is_quantized
from decomp_jax.training.train import TrainState


def fingerprint(base_params, cfg: AdapterConfig, architecture: str = "") -> dict:
    """What identifies the base model an adapter belongs to: an architecture string, every
    leaf's shape and dtype, and a SHA-256 of the targeted kernels' bytes. Only the targeted kernels
    are read, one at a time; sharded arrays (also across processes: then every process calls this)
    give the same fingerprint as host arrays."""
    flat = flatten_dict(base_params, sep="/")
    digest = hashlib.sha256()
    targets = find_targets(base_params, cfg)
    for path in targets:
        leaf = "kernel" if path_str(path + ("kernel",)) in flat else "embedding"  # a dense layer or an embedding table
        digest.update(path_str(path).encode())
        for part in jax.tree_util.tree_leaves(flat[path_str(path + (leaf,))]):  # a quantized kernel: codes, scales
            digest.update(np.ascontiguousarray(to_host(part)).tobytes())
    return {
        "architecture": architecture,
        "shapes": {k: [list(np.shape(v)), _dtype_name(v)] for k, v in sorted(flat.items())},
        "targets": [path_str(p) for p in targets],
        "targets_sha256": digest.hexdigest(),
    }


def _dtype_name(value) -> str:
    if is_quantized(value):  # a quantized base is another base than its float original
        return f"{value.kind}/{value.block_size}:{value.dtype.name}"
    return str(np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype)


def check_fingerprint(saved: dict, current: dict, where: str = "the checkpoint") -> None:
    """Raise a ``ConfigError`` that says what differs between two fingerprints."""
    problems = []
    if saved.get("architecture") != current.get("architecture"):
        problems.append(f"architecture {saved.get('architecture')!r} in {where} vs {current.get('architecture')!r} now")
    old, new = saved.get("shapes", {}), current.get("shapes", {})
    missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if missing:
        problems.append(f"{len(missing)} leaves of the saved base model are absent now, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} leaves are new in this base model, e.g. {extra[:3]}")
    targeted = tuple(t + "/" for t in saved.get("targets", []))
    changed = sorted((k for k in set(old) & set(new) if old[k] != new[k]), key=lambda k: (not k.startswith(targeted), k))
    if changed:
        shown = "; ".join(f"{k}: {old[k][0]} {old[k][1]} saved vs {new[k][0]} {new[k][1]} now" for k in changed[:3])
        problems.append(f"{len(changed)} leaves changed shape or dtype ({shown})")
    if not problems and saved.get("targets_sha256") != current.get("targets_sha256"):
        problems.append("the targeted kernels hold different values (same shapes): another checkpoint of the same architecture")
    if problems:
        raise ConfigError(
            f"This adapter was trained on a different base model than the one given: {'; '.join(problems)}. "
            f"Load the base model the adapter was trained on (or start a new run in another output_dir)."
        )


def manager(directory, *, keep_last: int = 2, keep_best: int = 0, best_metric: Optional[str] = None,
            best_mode: str = "max") -> ocp.CheckpointManager:
    """A synchronous ``CheckpointManager`` keeping the last ``keep_last`` steps and the
    ``keep_best`` best by ``metrics[best_metric]`` (checkpoints saved with metrics)."""
    policies = ocp.checkpoint_managers
    keep = [policies.LatestN(max(keep_last, 1))]
    if keep_best and best_metric:
        keep.append(policies.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric], reverse=(best_mode == "min"), n=keep_best,
            keep_checkpoints_without_metrics=False,
        ))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, cleanup_tmp_directories=True,
        preservation_policy=policies.AnyPreservationPolicy(keep),
    )
    mngr = ocp.CheckpointManager(os.path.abspath(directory), options=options)
    # (Orbax removes the temporary folders a killed save left behind in the background, from here on; its
    # next save waits for that. wait_until_finished waits for saves only.)
    mngr.wait_until_finished()
    return mngr


def _constant_paths(params, cfg: AdapterConfig) -> list[tuple]:
    """Paths of leaves derived from the base at injection that do not train and are not in the
    train state: a method's buffers and, for PiSSA/MiLoRA, the residual kernels."""
    method = get(cfg.method)
    paths = []
    for path, layer in adapted_layers(params, cfg):
        paths += [path + (n,) for n in method.buffers]
        if method.residual is not None:
            paths.append(path + (matrix_leaf(layer),))
    return paths


def _constants(state: TrainState, frozen: dict, cfg: AdapterConfig, name: Optional[str] = None) -> dict:
    """The constants of ``frozen`` as a nested dict (empty for most methods); of adapter ``name`` of a tree
    of several (``decomp_jax.core.named``) under their names there."""
    params = combine(state.trainable, state.buffers or {}, frozen)
    flat, in_frozen = flatten_dict(params), flatten_dict(frozen)
    if name is None and not named.has_named(params):
        paths = _constant_paths(params, cfg)
    else:
        name = name or named.DEFAULT
        paths = [named.stored_path(p, name) for p in _constant_paths(named.select(params, name), cfg)]
    return unflatten_dict({p: flat[p] for p in paths if p in in_frozen})


def _state_tree(state: TrainState) -> dict:
    return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng,
            "buffers": state.buffers or {}, "method_state": state.method_state}


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message names the folder, the step and the cause."""


class CheckpointFallbackWarning(UserWarning):
    """The latest checkpoint was unreadable or corrupted; an earlier one was restored instead."""


def _checksum(value: np.ndarray) -> str:
    digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _state_leaves(tree: dict) -> dict[str, np.ndarray]:
    """Host arrays of a saved state tree, keyed by '/'-joined paths (optimizer states are
    NamedTuples: their fields are numbered by ``jax.tree_util`` paths)."""
    leaves = jax.tree_util.tree_flatten_with_path(to_host(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(value) for path, value in leaves}


def save(mngr: ocp.CheckpointManager, state: TrainState, frozen: dict, cfg: AdapterConfig, *,
         fingerprint: dict, metadata: Optional[dict] = None, metrics: Optional[dict] = None,
         name: Optional[str] = None) -> int:
    """Save ``state`` (at step ``int(state.step)``) with the constants in ``frozen``; returns the step.
    ``name``: the state trains adapter ``name`` of a tree of several (``trainable_mask(..., name=)``).

    Raises ``guards.NonFiniteError`` (nothing written) when a leaf holds NaN or inf, and
    ``CheckpointError`` (one line: folder, step, cause) when the write fails."""
    step = int(state.step)
    constants = _constants(state, frozen, cfg, name)
    tree = {**_state_tree(state), "constants": constants}
    leaves = _state_leaves(tree)
    bad = nonfinite_leaves(leaves)
    if bad:
        raise NonFiniteError(
            f"Refusing to save checkpoint step {step} in {mngr.directory}: NaN or inf in {len(bad)} leaves "
            f"({', '.join(bad[:3])}); the checkpoints already there are kept."
        )
    checksums = {k: _checksum(v) for k, v in leaves.items()}
    meta = {"adapter": cfg.to_dict(), "fingerprint": fingerprint, "metadata": metadata or {}, "metrics": metrics,
            "checksums": checksums}
    meta[META_CHECKSUM] = _meta_checksum(meta)
    try:
        with interrupts_deferred(), _quiet_orbax():  # a checkpoint is written whole, Ctrl-C or not
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                meta=ocp.args.JsonSave(meta),
            ), metrics=metrics, force=True)
            mngr.wait_until_finished()
    except Exception as err:  # orbax wraps OSError (disk full, permissions) in several types
        for partial in Path(mngr.directory).glob(f"{step}.orbax-checkpoint-tmp*"):  # (what it wrote: space back)
            shutil.rmtree(partial, ignore_errors=True)
        reason = _storage_problem(err)
        raise CheckpointError(f"Could not write checkpoint step {step} in {mngr.directory}: "
                              + (f"{reason} ({one_line(err)[:160]} ...)." if reason else f"{one_line(err)}.")) from err
    return step


_STORAGE_PROBLEMS = {"No space left": "the disk is full (no space left on device)",
                     "Disk quota exceeded": "the disk quota is exceeded",
                     "Read-only file system": "the file system is read-only", "Permission denied": "permission denied"}


def _storage_problem(err: BaseException) -> Optional[str]:
    """What a failed write ran into, in words, from anywhere in ``err``'s chain (Orbax and tensorstore wrap
    the operating system's error in their own, and cut its text); None when it is none of the usual ones."""
    texts = []
    while err is not None and len(texts) < 20:
        texts.append(" ".join(str(err).split()))
        err = err.__cause__ or err.__context__
    return next((words for needle, words in _STORAGE_PROBLEMS.items() if any(needle in t for t in texts)), None)


def _orbax_after_a_failure(text: str) -> bool:
    """Whether a message is the echo of a failed Orbax write or read from its worker threads: the
    asyncio loop they report to is closed once the call has failed, and their tasks' errors are
    logged again when the tasks are collected; the call's own error says it all."""
    return "Event loop is closed" in text or ("never retrieved" in text and "orbax" in text)


class _OrbaxEchoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[2] is not None:  # a Future's message names no module: its traceback does
            text += "".join(traceback.format_tb(record.exc_info[2]))
        return not _orbax_after_a_failure(text)


def _install_quiet_hooks() -> None:
    """Drop the echoes of a failed Orbax write (``_orbax_after_a_failure``): tensorstore's callbacks into
    the closed loop reach ``sys.unraisablehook``, asyncio's "Task exception was never retrieved" its
    logger; everything else passes on as before."""
    if getattr(sys.unraisablehook, "_decomp_jax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and _orbax_after_a_failure(str(unraisable.exc_value)):
            return
        previous(unraisable)

    hook._decomp_jax = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrbaxEchoFilter())


_install_quiet_hooks()


def _forget_unawaited_io() -> None:
    """After a failed Orbax write or read, its (de)serializing coroutines that never ran are collected (at
    exit at the latest) with a two-line "coroutine ... was never awaited" warning each: an echo of the
    failure the raised error already names. Silence just those, from the failure on."""
    warnings.filterwarnings("ignore", message=r"coroutine '[^']*serializ[^']*' was never awaited",
                            category=RuntimeWarning)


class _OrbaxThreadEchoFilter(logging.Filter):
    """On absl's logger once an Orbax write or read has failed: Orbax's worker threads log the error they
    end on with its traceback (``_SignalingThread.run() raised an exception``), and one that finishes
    after the call has raised does so once ``_quiet_orbax`` has let its logger speak again: thirty lines
    after the one-line message, an echo of the failure it names. Drop the records whose traceback runs
    through Orbax's code; everything else passes."""

    def filter(self, record):
        tb = record.exc_info[2] if record.exc_info else None
        return tb is None or not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in traceback.extract_tb(tb))


def _forget_orbax_thread_errors() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxThreadEchoFilter) for f in logger.filters):
        logger.addFilter(_OrbaxThreadEchoFilter())


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a failed write's traceback from each of its worker threads (over a hundred
    lines for one full disk) before raising, its unrun coroutines warn at exit
    (``_forget_unawaited_io``), and a worker thread may end on the error after the call has raised
    (``_forget_orbax_thread_errors``); the error raised says it all, in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    except BaseException:
        _forget_unawaited_io()
        _forget_orbax_thread_errors()
        raise
    finally:
        logger.setLevel(level)


def one_line(err: BaseException) -> str:
    """The innermost cause of ``err`` as ``Type: message`` on one line."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


META_CHECKSUM = "meta_sha256"  # the JSON part's own checksum, beside the arrays' ones


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_metadata(mngr: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
    """The JSON part of a checkpoint (adapter config, fingerprint, metadata, metrics). A part that does
    not match the checksum saved in it (a changed byte) raises a ``CheckpointError``."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
    with _quiet_orbax():
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if META_CHECKSUM in meta and meta[META_CHECKSUM] != _meta_checksum(meta):
        raise CheckpointError(f"Checkpoint {mngr.directory}/{step} is corrupted: its metadata does not match the "
                              f"checksum written with it.")
    return meta


def saved_experiment(mngr: ocp.CheckpointManager, steps: list[int]) -> dict:
    """The experiment config saved with the first of ``steps`` whose metadata reads (every checkpoint of a
    run holds its run's; ``restore`` reports the unreadable ones)."""
    errors = []
    for step in steps:
        try:
            meta = read_metadata(mngr, step)
        except Exception as err:  # a damaged checkpoint: try the previous one
            errors.append(f"step {step}: {one_line(err)}")
            continue
        experiment = meta.get("metadata", {}).get("experiment")
        if experiment is None:
            raise ConfigError(f"{mngr.directory}/{step} holds no experiment config; restore it with checkpoint.restore().")
        return experiment
    raise CheckpointError(f"No checkpoint in {mngr.directory} can be read: {'; '.join(errors)}")


def restore(mngr: ocp.CheckpointManager, like: TrainState, frozen: dict, cfg: AdapterConfig, *,
            fingerprint: dict, step: Optional[int] = None, name: Optional[str] = None) -> tuple[TrainState, dict, dict]:
    """``(state, frozen, metadata)`` from checkpoint ``step`` (default: the latest good one).

    ``like`` is a fresh state of the same run (its structure, shapes and dtypes are the target);
    ``frozen`` gets the saved constants. Raises a ``ConfigError`` naming the difference when
    the checkpoint belongs to another base model or another adapter config. A checkpoint that
    cannot be read or whose arrays do not match the checksums saved with them is corrupted: with
    ``step=None`` the next older one is tried (a ``CheckpointFallbackWarning`` names the skipped
    step and why); with an explicit ``step`` a ``CheckpointError`` says so. The restored state's
    ``step`` tells which checkpoint was used.
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
    problems = []
    for candidate in steps:
        try:
            return restore_step(mngr, like, frozen, cfg, fingerprint, candidate, name)
        except CheckpointError as err:
            problems.append(str(err))
            if step is not None:
                raise
            later = [s for s in steps if s < candidate]
            warnings.warn(f"{err} " + (f"Falling back to checkpoint step {later[0]}." if later else ""),
                          CheckpointFallbackWarning, stacklevel=2)
    raise CheckpointError(f"Every checkpoint in {mngr.directory} is unreadable: {' | '.join(problems)}")


def restore_step(mngr, like: TrainState, frozen: dict, cfg: AdapterConfig, fingerprint: dict, step: int,
                 name: Optional[str] = None):
    """The ``TrainState`` saved at ``step``, checked against the model's fingerprint and ``cfg``."""
    where = f"{mngr.directory}/{step}"
    try:
        meta = read_metadata(mngr, step)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"Checkpoint {where} is corrupted: its metadata cannot be read ({one_line(err)}).") from err
    check_fingerprint(meta["fingerprint"], fingerprint, where=where)
    saved_cfg = AdapterConfig.from_dict(meta["adapter"])
    if saved_cfg != cfg:
        diff = {k: (v, getattr(cfg, k)) for k, v in saved_cfg.to_dict().items() if getattr(cfg, k) != v}
        raise ConfigError(
            f"The checkpoint's adapter config differs from this run's: {diff} (saved, now). "
            f"Resume with the config the run started with, or use another output_dir."
        )
    constants = _constants(like, frozen, cfg, name)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**_state_tree(like), "constants": constants})
    try:
        with _quiet_orbax():
            tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except (ValueError, KeyError) as err:
        if "checksums" in meta:  # same adapter config, so the structure fits: the files are damaged
            raise CheckpointError(f"Checkpoint {where} is corrupted: its arrays cannot be read ({one_line(err)}).") from err
        raise ConfigError(f"Checkpoint {where} does not fit this run's state: {err}") from err
    except Exception as err:
        raise CheckpointError(f"Checkpoint {where} is corrupted: its arrays cannot be read ({one_line(err)}).") from err
    saved = meta.get("checksums")
    if saved is not None:
        leaves = _state_leaves(tree)
        wrong = sorted(k for k in set(saved) | set(leaves) if k not in leaves or saved.get(k) != _checksum(leaves[k]))
        if wrong:
            raise CheckpointError(f"Checkpoint {where} is corrupted: {len(wrong)} arrays do not match the checksums "
                                  f"saved with them ({', '.join(wrong[:3])}).")
    constants = flatten_dict(tree.pop("constants"))
    state = TrainState(**tree)
    return state, (set_leaves(frozen, constants) if constants else frozen), meta["metadata"]


# --- a set of named adapters (decomp_jax.core.named) ------------------------------------------------

def save_adapters(directory, params, cfgs: dict, *, architecture: str = "") -> None:
    """Save the adapters ``cfgs`` (``{name: AdapterConfig}``) of ``params`` in ``directory`` (an Orbax
    checkpoint, written atomically): each adapter's own leaves under its name (factors, buffers, its copies
    of base leaves such as a head), its config, and the fingerprint of the base model it adapts.
    ``load_adapters`` adds them to another tree of the same base by name."""
    base = named.select(params, None)
    tree, meta = {}, {}
    for name, cfg in cfgs.items():
        tree[name] = own_leaves(params, cfg, name)
        meta[name] = {"adapter": cfg.to_dict(), "fingerprint": fingerprint(base, cfg, architecture)}
    leaves = _state_leaves(tree)
    bad = nonfinite_leaves(leaves)
    if bad:
        raise NonFiniteError(f"Refusing to save the adapters to {directory}: NaN or inf in {', '.join(bad[:3])}.")
    path = os.path.abspath(os.fspath(directory))
    try:
        with _quiet_orbax(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(path, ocp.args.Composite(adapters=ocp.args.StandardSave(to_host(tree)),
                                                meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as err:
        raise CheckpointError(f"Could not write the adapters to {path}: {one_line(err)}") from err


def load_adapters(directory, params, *, names=None, architecture: str = "") -> tuple[dict, dict]:
    """``(params with the saved adapters added by name, {name: AdapterConfig})``: the adapters of
    ``save_adapters`` (``names``: only those), onto ``params`` (the base, or a tree already holding other
    adapters). A saved adapter of another base model is refused (``ConfigError`` naming the difference)."""
    path = os.path.abspath(os.fspath(directory))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        wanted = list(meta) if names is None else list(names)
        unknown = [n for n in wanted if n not in meta]
        if unknown:
            raise ConfigError(f"{path} holds the adapters {sorted(meta)}, not {unknown}.")
        base = named.select(params, None)
        cfgs = {n: AdapterConfig.from_dict(meta[n]["adapter"]) for n in wanted}
        for n, cfg in cfgs.items():
            check_fingerprint(meta[n]["fingerprint"], fingerprint(base, cfg, architecture), where=f"{path} ({n!r})")
        stored = ckptr.restore(path, ocp.args.Composite(adapters=ocp.args.StandardRestore()))["adapters"]
    for n, cfg in cfgs.items():
        flat = flatten_dict(base)
        flat.update(flatten_dict(stored[n]))
        params = attach(params, unflatten_dict(flat), cfg, n)
    return params, cfgs
