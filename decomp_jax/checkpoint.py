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
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.config import AdapterConfig, ConfigError
from decomp_jax.inject import adapted_layers, combine, find_targets, path_str, set_leaves
from decomp_jax.methods import get
from decomp_jax.train import TrainState


def fingerprint(base_params, cfg: AdapterConfig, architecture: str = "") -> dict:
    """What identifies the base model an adapter belongs to: an architecture string, every
    leaf's shape and dtype, and a SHA-256 of the targeted kernels' bytes."""
    flat = flatten_dict(jax.device_get(base_params), sep="/")
    digest = hashlib.sha256()
    targets = find_targets(base_params, cfg)
    for path in targets:
        kernel = np.ascontiguousarray(flat[path_str(path + ("kernel",))])
        digest.update(path_str(path).encode())
        digest.update(kernel.tobytes())
    return {
        "architecture": architecture,
        "shapes": {k: [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in sorted(flat.items())},
        "targets": [path_str(p) for p in targets],
        "targets_sha256": digest.hexdigest(),
    }


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
    mngr.wait_until_finished()  # the clean-up of temporary folders left by a killed save
    return mngr


def _constant_paths(params, cfg: AdapterConfig) -> list[tuple]:
    """Paths of leaves derived from the base at injection that do not train and are not in the
    train state: a method's buffers and, for PiSSA/MiLoRA, the residual kernels."""
    method = get(cfg.method)
    paths = []
    for path, _ in adapted_layers(params, cfg):
        paths += [path + (n,) for n in method.buffers]
        if method.residual is not None:
            paths.append(path + ("kernel",))
    return paths


def _constants(state: TrainState, frozen: dict, cfg: AdapterConfig) -> dict:
    """The constants of ``frozen`` as a nested dict (empty for most methods)."""
    params = combine(state.trainable, state.buffers or {}, frozen)
    flat, in_frozen = flatten_dict(params), flatten_dict(frozen)
    return unflatten_dict({p: flat[p] for p in _constant_paths(params, cfg) if p in in_frozen})


def _state_tree(state: TrainState) -> dict:
    return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng,
            "buffers": state.buffers or {}, "method_state": state.method_state}


def save(mngr: ocp.CheckpointManager, state: TrainState, frozen: dict, cfg: AdapterConfig, *,
         fingerprint: dict, metadata: Optional[dict] = None, metrics: Optional[dict] = None) -> int:
    """Save ``state`` (at step ``int(state.step)``) with the constants in ``frozen``; returns the step."""
    step = int(state.step)
    constants = _constants(state, frozen, cfg)
    meta = {"adapter": cfg.to_dict(), "fingerprint": fingerprint, "metadata": metadata or {}, "metrics": metrics}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({**_state_tree(state), "constants": constants}),
        meta=ocp.args.JsonSave(meta),
    ), metrics=metrics, force=True)
    mngr.wait_until_finished()
    return step


def read_metadata(mngr: ocp.CheckpointManager, step: Optional[int] = None) -> dict:
    """The JSON part of a checkpoint (adapter config, fingerprint, metadata, metrics)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr: ocp.CheckpointManager, like: TrainState, frozen: dict, cfg: AdapterConfig, *,
            fingerprint: dict, step: Optional[int] = None) -> tuple[TrainState, dict, dict]:
    """``(state, frozen, metadata)`` from checkpoint ``step`` (default: the latest).

    ``like`` is a fresh state of the same run (its structure, shapes and dtypes are the target);
    ``frozen`` gets the saved constants. Raises a ``ConfigError`` naming the difference when
    the checkpoint belongs to another base model or another adapter config.
    """
    meta = read_metadata(mngr, step)
    step = mngr.latest_step() if step is None else step
    check_fingerprint(meta["fingerprint"], fingerprint, where=f"{mngr.directory}/{step}")
    saved_cfg = AdapterConfig.from_dict(meta["adapter"])
    if saved_cfg != cfg:
        diff = {k: (v, getattr(cfg, k)) for k, v in saved_cfg.to_dict().items() if getattr(cfg, k) != v}
        raise ConfigError(
            f"The checkpoint's adapter config differs from this run's: {diff} (saved, now). "
            f"Resume with the config the run started with, or use another output_dir."
        )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**_state_tree(like), "constants": _constants(like, frozen, cfg)})
    try:
        tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except (ValueError, KeyError) as err:
        raise ConfigError(f"Checkpoint {mngr.directory}/{step} does not fit this run's state: {err}") from err
    constants = flatten_dict(tree.pop("constants"))
    state = TrainState(**tree)
    return state, (set_leaves(frozen, constants) if constants else frozen), meta["metadata"]
