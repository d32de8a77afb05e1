"""DoRA (combination family): LoRA on the direction, a trainable magnitude per output unit."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.base import Method, linear, register
from decomp_jax.core.methods.lowrank import lora_delta, lora_init, lora_path


def column_norm(kernel: jax.Array) -> jax.Array:
    """L2 norm of each column of ``K`` (one per output unit)."""
    return jnp.linalg.norm(kernel, axis=0)


def _init(key, kernel, bias, cfg):
    return {**lora_init(key, kernel, bias, cfg), "magnitude": column_norm(kernel)}


def _magnitude_scale(kernel, f, cfg):
    """``magnitude / stop_gradient(||K + dK||_col)``: the norm is a constant for the gradient."""
    return f["magnitude"] / jax.lax.stop_gradient(column_norm(kernel + lora_delta(f, cfg)))


def _materialize(kernel, f, cfg):
    return (kernel + lora_delta(f, cfg)) * _magnitude_scale(kernel, f, cfg)[None, :]


def _apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    y = (linear(x, kernel) + lora_path(x, f, cfg, train, key)) * _magnitude_scale(kernel, f, cfg)
    return y if bias is None else y + bias


DORA = register(Method(
    name="dora",
    family="combination",
    formula="V = K + s * lora_a @ lora_b; K' = V * magnitude / stop_grad(||V||_col)",
    factor_names=("lora_a", "lora_b", "magnitude"),
    init=_init,
    materialize=_materialize,
    apply=_apply,
    uses_rank=True,
))
