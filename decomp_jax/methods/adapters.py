"""Non-linear adapters: not mergeable, always run factored on the targeted layers.

``parallel_adapter`` (= MPC_n, a non-linearity between LoRA's factors) sits beside the layer;
``houlsby`` and ``pfeiffer`` are sequential bottleneck adapters on the layer's *output* ``h``:
``h' = h + up(act(down(h)))`` with biases. Their placement is a choice of ``targets``: Houlsby
after the attention output and FFN output projections, Pfeiffer after the FFN output only (see
``models.hf.TARGET_PRESETS``). ``rank`` is the bottleneck width ``m``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.methods.base import Method, adapter_dropout, linear, register
from decomp_jax.methods.lowrank import init_lora_a, lora_init


def _parallel_apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    h = jax.nn.relu(adapter_dropout(x, cfg.dropout, train, key) @ f["lora_a"])
    return linear(x, kernel, bias) + h @ f["lora_b"]


PARALLEL_ADAPTER = register(Method(
    name="parallel_adapter",
    family="extension",
    formula="y = x @ K + b + relu(x @ lora_a) @ lora_b  (MPC_n)",
    factor_names=("lora_a", "lora_b"),
    init=lora_init,
    apply=_parallel_apply,
    uses_rank=True,
))


def _bottleneck_init(key, kernel, bias, cfg):
    d_out, m, dt = kernel.shape[1], cfg.rank, kernel.dtype
    return {
        "down": init_lora_a(key, d_out, m, cfg.init, dt),
        "down_bias": jnp.zeros((m,), dt),
        "up": jnp.zeros((m, d_out), dt),
        "up_bias": jnp.zeros((d_out,), dt),
    }


def _bottleneck(name: str, activation, act_name: str, placement: str) -> Method:
    def apply(x, kernel, bias, f, cfg, *, train=False, key=None):
        h = linear(x, kernel, bias)
        z = activation(adapter_dropout(h, cfg.dropout, train, key) @ f["down"] + f["down_bias"])
        return h + z @ f["up"] + f["up_bias"]

    return register(Method(
        name=name,
        family="extension",
        formula=f"h' = h + {act_name}(h @ down + down_bias) @ up + up_bias on the output h ({placement})",
        factor_names=("down", "down_bias", "up", "up_bias"),
        init=_bottleneck_init,
        apply=apply,
    ))


HOULSBY = _bottleneck("houlsby", jax.nn.swish, "swish", "paper: attention output and FFN output")
PFEIFFER = _bottleneck("pfeiffer", jax.nn.relu, "relu", "paper: FFN output only")
