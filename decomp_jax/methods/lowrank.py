"""Low-rank extension methods: ``K' = K + dK`` with a factored ``dK``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.methods.base import Method, adapter_dropout, linear, register


def init_lora_a(key, d_in: int, rank: int, init: str, dtype) -> jax.Array:
    """``lora_a (d_in, r)``: kaiming-uniform with bound 1/sqrt(d_in) (HF PEFT's default),
    normal(0.02), or gaussian with std 1/r."""
    if init == "kaiming":
        bound = 1.0 / jnp.sqrt(d_in)
        return jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
    if init == "normal":
        return 0.02 * jax.random.normal(key, (d_in, rank), dtype)
    if init == "gaussian":
        return jax.random.normal(key, (d_in, rank), dtype) / rank
    raise ValueError(f"unknown lora init {init!r}")


def lora_init(key, kernel, bias, cfg):
    d_in, d_out = kernel.shape
    return {
        "lora_a": init_lora_a(key, d_in, cfg.rank, cfg.init, kernel.dtype),
        "lora_b": jnp.zeros((cfg.rank, d_out), kernel.dtype),
    }


def lora_delta(factors, cfg) -> jax.Array:
    """``dK = s * lora_a @ lora_b``."""
    return cfg.scale * (factors["lora_a"] @ factors["lora_b"])


def lora_path(x, factors, cfg, train, key) -> jax.Array:
    """The adapter path ``s * (dropout(x) @ lora_a) @ lora_b``: never forms ``dK``."""
    x = adapter_dropout(x, cfg.dropout, train, key)
    return cfg.scale * ((x @ factors["lora_a"]) @ factors["lora_b"])


LORA = register(Method(
    name="lora",
    family="extension",
    formula="K' = K + s * lora_a @ lora_b",
    factor_names=("lora_a", "lora_b"),
    init=lora_init,
    materialize=lambda kernel, f, cfg: kernel + lora_delta(f, cfg),
    apply=lambda x, kernel, bias, f, cfg, *, train=False, key=None: (
        linear(x, kernel, bias) + lora_path(x, f, cfg, train, key)
    ),
    uses_rank=True,
))
