"""Restores a run's latest checkpoint onto a mesh of this process's devices and compares it with the
run's adapter.safetensors; prints one JSON line. Run by tests/parallel/test_multihost.py in-process (one
device, no mesh) and in a subprocess with 8 simulated CPU devices (XLA_FLAGS set before JAX loads).

usage: python tests/workers/multihost_worker.py RUN_DIR MESH_YAML   (MESH_YAML "null": one device)
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax.traverse_util import flatten_dict


def restore_and_compare(run_dir, mesh: str) -> dict:
    from decomp_jax.training import checkpoint
    from decomp_jax.app.experiment import checkpoint_managers, place_on_mesh, initial_state, load_adapter, load_config, make_task
    from decomp_jax.core.tree import combine

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", [f"train.mesh={mesh}"])
    task = make_task(cfg)
    on_mesh = place_on_mesh(cfg, task) if cfg.train.mesh else None
    _, _, like = initial_state(cfg, cfg.train.steps, task.trainable, task.buffers, task.frozen, mesh=on_mesh)
    mngr, fingerprint = checkpoint_managers(cfg, task)
    state, _, _ = checkpoint.restore(mngr, like, task.frozen, cfg.adapter, fingerprint=fingerprint)
    mngr.close()
    saved = flatten_dict(load_adapter(run_dir / "adapter.safetensors", combine(task.trainable, task.buffers)))
    restored = flatten_dict(jax.device_get(state.trainable))
    return {"step": int(state.step), "devices": len({d for x in jax.tree.leaves(state.trainable) for d in x.devices()}),
            "max_diff": max(float(np.abs(np.asarray(restored[k]) - np.asarray(v)).max()) for k, v in saved.items())}


if __name__ == "__main__":
    print(json.dumps(restore_and_compare(sys.argv[1], sys.argv[2])))
