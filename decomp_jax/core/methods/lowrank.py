"""Low-rank extension methods: ``K' = K + dK`` with ``dK = s * lora_a @ M @ lora_b``.

``M`` is the identity (LoRA), a diagonal ``diag(lora_e)`` (TriLoRA, AdaLoRA) or a full ``r x r``
``lora_g`` (FLoRA, MoSLoRA): the paper's "matrix pattern" of ``dK`` loosens in that order.
LiERA applies the low-rank product multiplicatively. The factored path
``s * ((x @ lora_a) @ M) @ lora_b`` never forms ``dK``.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.base import Method, adapter_dropout, additive, linear, register
from decomp_jax.errors import ConfigError


def kaiming_uniform(key, shape, fan_in: int, dtype) -> jax.Array:
    """Uniform in ``(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's ``nn.Linear`` default (HF PEFT's LoRA A)."""
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def normal_002(key, shape, dtype) -> jax.Array:
    return 0.02 * jax.random.normal(key, shape, dtype)


def init_lora_a(key, d_in: int, rank: int, init: str, dtype) -> jax.Array:
    """``lora_a (d_in, r)``: kaiming-uniform with bound 1/sqrt(d_in) (HF PEFT's default),
    normal(0.02), or gaussian with std 1/r."""
    if init == "kaiming":
        return kaiming_uniform(key, (d_in, rank), d_in, dtype)
    if init == "normal":
        return normal_002(key, (d_in, rank), dtype)
    if init == "gaussian":
        return jax.random.normal(key, (d_in, rank), dtype) / rank
    raise ValueError(f"unknown lora init {init!r}")


def lora_init(key, kernel, bias, cfg):
    d_in, d_out = kernel.shape
    return {
        "lora_a": init_lora_a(key, d_in, cfg.rank, cfg.init, kernel.dtype),
        "lora_b": jnp.zeros((cfg.rank, d_out), kernel.dtype),
    }


def _mix(h: jax.Array, middle: Optional[jax.Array]) -> jax.Array:
    """``h @ M`` for ``M`` = identity (None), ``diag(m)`` (``m`` 1-D) or a full matrix."""
    if middle is None:
        return h
    return h * middle if middle.ndim == 1 else h @ middle


def lowrank_delta(f, scale: float, middle: Optional[str] = None) -> jax.Array:
    """``dK = scale * lora_a @ M @ lora_b``."""
    return scale * (_mix(f["lora_a"], f.get(middle)) @ f["lora_b"])


def lowrank_path(x, f, cfg, train, key, scale: float, middle: Optional[str] = None) -> jax.Array:
    """The adapter path ``scale * ((dropout(x) @ lora_a) @ M) @ lora_b``: never forms ``dK``."""
    x = adapter_dropout(x, cfg.dropout, train, key)
    return scale * (_mix(x @ f["lora_a"], f.get(middle)) @ f["lora_b"])


def lora_delta(factors, cfg) -> jax.Array:
    """``dK = s * lora_a @ lora_b``."""
    return lowrank_delta(factors, cfg.scale)


def lora_path(x, factors, cfg, train, key) -> jax.Array:
    """The LoRA adapter path ``s * (dropout(x) @ lora_a) @ lora_b``."""
    return lowrank_path(x, factors, cfg, train, key, cfg.scale)


def lowrank_method(
    name: str, formula: str, init: Callable, *, middle: Optional[str] = None,
    scale: Callable = lambda cfg: cfg.scale, family: str = "extension", **extra,
) -> Method:
    """A registered ``K' = K + scale * lora_a @ M @ lora_b`` method with its factored path."""
    factor_names = ("lora_a",) + ((middle,) if middle else ()) + ("lora_b",)

    def apply(x, kernel, bias, f, cfg, *, train=False, key=None):
        return linear(x, kernel, bias) + lowrank_path(x, f, cfg, train, key, scale(cfg), middle)

    return register(Method(
        name=name, family=family, formula=formula, factor_names=factor_names, init=init,
        **additive(lambda f, cfg: lowrank_delta(f, scale(cfg), middle)), apply=apply, uses_rank=True, **extra,
    ))


LORA = lowrank_method("lora", "K' = K + s * lora_a @ lora_b", lora_init)


def _lora_bias_init(key, kernel, bias, cfg):
    return {**lora_init(key, kernel, bias, cfg), "lora_bias": jnp.zeros((kernel.shape[1],), kernel.dtype)}


def _lora_bias_apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    return linear(x, kernel, bias) + lora_path(x, f, cfg, train, key) + cfg.scale * f["lora_bias"]


# LoRA whose second factor carries a bias (HF PEFT's lora_bias=True): y = x @ K + b + s * (x @ a @ b_lora + c);
# merged, c goes into the layer's bias, so a layer without one can run it factored only
LORA_BIAS = register(Method(
    name="lora_bias", family="extension", formula="K' = K + s * lora_a @ lora_b;  b' = b + s * lora_bias",
    factor_names=("lora_a", "lora_b", "lora_bias"), init=_lora_bias_init,
    materialize=lambda kernel, f, cfg: kernel + lora_delta(f, cfg).astype(kernel.dtype),
    materialize_bias=lambda bias, f, cfg: bias + (cfg.scale * f["lora_bias"]).astype(bias.dtype),
    unmaterialize=lambda kernel, bias, f, cfg: (
        kernel - lora_delta(f, cfg).astype(kernel.dtype),
        None if bias is None else bias - (cfg.scale * f["lora_bias"]).astype(bias.dtype)),
    apply=_lora_bias_apply, uses_rank=True, adds_bias=True,
))


def _trilora_init(key, kernel, bias, cfg):
    d_in, d_out = kernel.shape
    ka, kb = jax.random.split(key)
    return {
        "lora_a": init_lora_a(ka, d_in, cfg.rank, cfg.init, kernel.dtype),
        "lora_e": jnp.zeros((cfg.rank,), kernel.dtype),
        "lora_b": kaiming_uniform(kb, (cfg.rank, d_out), cfg.rank, kernel.dtype),
    }


def _trilora_scale(cfg) -> float:
    return cfg.scale if cfg.option("scale_by_rank") else 1.0


def _check_bool_option(name: str):
    def validate(cfg):
        if not isinstance(cfg.option(name), bool):
            raise ConfigError(f"options.{name} of method {cfg.method!r} must be true or false, got {cfg.option(name)!r}.")
    return validate


TRILORA = lowrank_method(
    "trilora", "K' = K + s_t * lora_a @ diag(lora_e) @ lora_b  (s_t = 1, or alpha/r with scale_by_rank)",
    _trilora_init, middle="lora_e", scale=_trilora_scale,
    options={"scale_by_rank": False}, validate=_check_bool_option("scale_by_rank"),
)


def _mixer_init(g_init: str):
    """FLoRA (``lora_g`` zeros, ``lora_b`` normal) and MoSLoRA (``lora_g`` normal, ``lora_b`` zeros)."""

    def init(key, kernel, bias, cfg):
        d_in, d_out = kernel.shape
        ka, kg, kb = jax.random.split(key, 3)
        r, dt = cfg.rank, kernel.dtype
        zero_g = g_init == "zeros"
        return {
            "lora_a": normal_002(ka, (d_in, r), dt),
            "lora_g": jnp.zeros((r, r), dt) if zero_g else normal_002(kg, (r, r), dt),
            "lora_b": normal_002(kb, (r, d_out), dt) if zero_g else jnp.zeros((r, d_out), dt),
        }

    return init


FLORA = lowrank_method("flora", "K' = K + s * lora_a @ lora_g @ lora_b  (lora_g init 0)", _mixer_init("zeros"), middle="lora_g")
MOSLORA = lowrank_method("moslora", "K' = K + s * lora_a @ lora_g @ lora_b  (lora_b init 0)", _mixer_init("normal"), middle="lora_g")


def _liera_factor(kernel, f, cfg):
    return 1.0 + lora_delta(f, cfg).astype(kernel.dtype)


LIERA = register(Method(
    name="liera",
    family="extension",
    formula="K' = K * (1 + s * lora_a @ lora_b)  (elementwise; runs merged per layer)",
    factor_names=("lora_a", "lora_b"),
    init=lora_init,
    materialize=lambda kernel, f, cfg: kernel * _liera_factor(kernel, f, cfg),
    unmaterialize=lambda kernel, bias, f, cfg: (kernel / _liera_factor(kernel, f, cfg), bias),
    uses_rank=True,
))
