"""LoRA-Dash: LoRA, then after a warm-up of ``T`` optimizer steps a trainable scale on the ``k``
singular directions of ``K`` that the LoRA update ``dK`` amplifies most.

``K' = K + s * lora_a @ lora_b + dash_u @ diag(dash) @ dash_vt``. ``dash_u``/``dash_vt`` are
buffers, zero until step ``T``; ``dash`` is trainable but stays exactly zero until then (its
gradient is zero while the buffers are). The direction search runs once, inside the jitted step,
at optimizer step ``T`` (optimizer steps, not forward calls):
``U, S, Vt = svd(K)``, ``delta_i = |(U^T dK Vt^T)_ii| / S_i``; the ``k`` largest ``delta_i``
choose the columns of ``U`` and rows of ``Vt``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.base import Method, Schedule, additive, linear, register
from decomp_jax.core.methods.lowrank import lora_delta, lora_init, lora_path
from decomp_jax.core.methods.spectral import spectral_product, svd
from decomp_jax.core.tree import layers_with, matrix_leaf, oriented, set_leaves, unrolled_schedule
from decomp_jax.errors import ConfigError

OPTIONS = {"warmup_steps": 100, "dash_k": 8}


def _init(key, kernel, bias, cfg):
    d_in, d_out = kernel.shape
    k, dt = cfg.option("dash_k"), kernel.dtype
    if k > min(d_in, d_out):
        raise ConfigError(
            f"options.dash_k={k} is larger than min(d_in, d_out)={min(d_in, d_out)} of a kernel {tuple(kernel.shape)}; "
            f"use dash_k <= {min(d_in, d_out)}."
        )
    return {
        **lora_init(key, kernel, bias, cfg),
        "dash": jnp.zeros((k,), dt),
        "dash_u": jnp.zeros((d_in, k), dt),
        "dash_vt": jnp.zeros((k, d_out), dt),
    }


def _delta(f, cfg):
    return lora_delta(f, cfg) + (f["dash_u"] * f["dash"]) @ f["dash_vt"]


def _apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    if train and cfg.dropout > 0 and key is not None:  # the LoRA path reads dropout(x), the Dash path x
        return linear(x, kernel, bias) + lora_path(x, f, cfg, train, key) + spectral_product(x, f["dash_u"], f["dash"], f["dash_vt"])
    # both low-rank paths in one pass over x: x @ [lora_a | dash_u], scaled by [s | dash], @ [lora_b ; dash_vt]
    down = jnp.concatenate([f["lora_a"], f["dash_u"]], axis=1)
    scale = jnp.concatenate([jnp.full((f["lora_a"].shape[1],), cfg.scale, f["dash"].dtype), f["dash"]])
    up = jnp.concatenate([f["lora_b"], f["dash_vt"]], axis=0)
    return linear(x, kernel, bias) + spectral_product(x, down, scale, up)


def dash_directions(kernel: jax.Array, delta: jax.Array, k: int):
    """``(dash_u (d_in, k), dash_vt (k, d_out), index (k,))``: the singular directions of ``kernel``
    with the largest ``|(U^T delta Vt^T)_ii| / S_i``, largest first."""
    u, s, vt = svd(kernel)
    projected = jnp.abs(jnp.einsum("ij,ij->j", u, delta.astype(jnp.float32) @ vt.T))
    amplification = projected / jnp.maximum(s, jnp.finfo(jnp.float32).tiny)
    _, index = jax.lax.top_k(amplification, k)
    return u[:, index], vt[index], index


def _validate(cfg):
    for name in OPTIONS:
        value = cfg.option(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"options.{name} of lora_dash must be a positive integer, got {value!r}.")


def _schedule(cfg, total_steps: int) -> Schedule:

    warmup, k = cfg.option("warmup_steps"), cfg.option("dash_k")
    if warmup >= total_steps:
        raise ConfigError(
            f"lora_dash: options.warmup_steps={warmup} is not below the run's {total_steps} optimizer steps, so the "
            f"directions would never switch on. Lower warmup_steps or train longer."
        )

    def update(state, step, params, grads):
        layers = dict(layers_with(params, cfg, LORA_DASH.factor_names))

        def search():
            out = {}
            for p, layer in layers.items():
                u, vt, _ = dash_directions(oriented(layer[matrix_leaf(layer)], p, cfg), lora_delta(layer, cfg), k)
                out[p + ("dash_u",)] = u.astype(layer["dash_u"].dtype)
                out[p + ("dash_vt",)] = vt.astype(layer["dash_vt"].dtype)
            return out

        def unchanged():
            return {p + (n,): layer[n] for p, layer in layers.items() for n in ("dash_u", "dash_vt")}

        return state, set_leaves(params, jax.lax.cond(step == warmup, search, unchanged))

    # stacked (scanned) layers: the search runs on the unrolled view
    return unrolled_schedule(Schedule(init=lambda params: {}, update=update), cfg)


LORA_DASH = register(Method(
    name="lora_dash",
    family="combination",
    formula="K' = K + s * lora_a @ lora_b + dash_u @ diag(dash) @ dash_vt  (directions chosen at step T)",
    factor_names=("lora_a", "lora_b", "dash", "dash_u", "dash_vt"),
    init=_init,
    **additive(_delta),
    apply=_apply,
    buffers=("dash_u", "dash_vt"),
    uses_rank=True,
    options=OPTIONS,
    validate=_validate,
    schedule=_schedule,
))
