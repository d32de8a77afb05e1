"""decomp_jax: parameter-efficient fine-tuning in JAX/Flax, read as subspace tuning.

    cfg = AdapterConfig(method="ssb", targets=r"attention/self/(key|value)$|intermediate/dense$")
    params = inject(base_params, cfg, rng)   # factor leaves beside each targeted kernel
    mask = trainable_mask(params, cfg)       # bool pytree
    apply = adapt(model.module.apply, cfg)   # factored execution (mode="merged" for any function)
    loss = penalty(params, cfg)              # MPC term, 0.0 when off
    plain = merge(params, cfg)               # phi(K) folded into base-shaped params
    back = unmerge(plain, adapter_leaves(params, cfg), cfg)   # the adapted params again

Meshes: ``sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})`` and ``make_train_step(..., mesh=mesh)``
derive every sharding (partition rules per architecture, factors following their kernels).

Stateful methods (adalora, flexlora, lora_dash) add ``partition`` (trainable, buffers, frozen) and
``make_schedule(cfg, total_steps)``, passed to ``init_state`` and ``make_train_step``.
"""

import sys

from decomp_jax import named, sharding
from decomp_jax.core import methods
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import (
    adapter_leaves, find_targets, inject, inject_quantized, merge, partition, trainable_mask, unmerge,
)
from decomp_jax.core.methods import Schedule
from decomp_jax.core.penalties import penalty
from decomp_jax.core.tree import combine, count_params, set_leaves, split
from decomp_jax.core.weighted import add_weighted_adapter
from decomp_jax.errors import ConfigError, ConfigTypeError
from decomp_jax.interop import export_peft, import_peft
from decomp_jax.moved import keep_public_names
from decomp_jax.named import adapt_many, adapter_names, adapter_weights, attach, select
from decomp_jax.training.train import (
    TrainState, init_state, make_eval_step, make_optimizer, make_schedule, make_train_step, set_lr_factor,
    stack_states, unstack_state, with_lr_factor,
)
from decomp_jax.version import VERSION

__version__ = VERSION

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "ConfigTypeError",
    "Schedule",
    "TrainState",
    "adapt",
    "adapt_many",
    "add_weighted_adapter",
    "adapter_leaves",
    "adapter_names",
    "adapter_weights",
    "attach",
    "combine",
    "count_params",
    "export_peft",
    "find_targets",
    "import_peft",
    "init_state",
    "inject",
    "inject_quantized",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge",
    "methods",
    "named",
    "partition",
    "penalty",
    "select",
    "set_lr_factor",
    "set_leaves",
    "sharding",
    "split",
    "stack_states",
    "trainable_mask",
    "unmerge",
    "unstack_state",
    "with_lr_factor",
]

keep_public_names(sys.modules[__name__])  # `import decomp_jax.inject` (an old path) leaves dj.inject the function
