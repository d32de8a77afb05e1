"""Meshes and shardings (``dj.sharding``): the public face of ``parallel.sharding`` (meshes, partition
rules, parameter and batch specs) and the train-state shardings of ``training.train`` (``state_shapes``,
``init_state_sharded``, ``train_shardings``). See ``parallel.sharding`` for the model."""

from decomp_jax.parallel.sharding import (
    AXES, BATCH_AXES, FACTOR_AXES, FSDP_MIN_SIZE, RULES, base_specs, batch_sharding, batch_spec, detect_architecture,
    device_bytes, factor_spec, fit_spec, follow, make_mesh, named, param_shardings, param_specs, place, resolve_rules,
    unbox,
)
from decomp_jax.training.train import init_state_sharded, state_shapes, train_shardings

__all__ = [
    "AXES", "BATCH_AXES", "FACTOR_AXES", "FSDP_MIN_SIZE", "RULES", "base_specs", "batch_sharding", "batch_spec",
    "detect_architecture", "device_bytes", "factor_spec", "fit_spec", "follow", "init_state_sharded", "make_mesh",
    "named", "param_shardings", "param_specs", "place", "resolve_rules", "state_shapes", "train_shardings", "unbox",
]
