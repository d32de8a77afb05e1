"""Scaling methods of the reconstruction family: they rescale the rows and/or columns of ``K``.

Scaling singular-vector subspaces is the same as scaling the input units (rows of ``K``) or the
output units (columns of ``K``), so none of these needs an SVD.
"""

from __future__ import annotations

import jax.numpy as jnp

from decomp_jax.core.methods.base import Method, linear, register
from decomp_jax.errors import ConfigError


def _ones_in(key, kernel, bias, cfg):
    return {"scale_in": jnp.ones((kernel.shape[0],), kernel.dtype)}


def _ones_out(key, kernel, bias, cfg):
    return {"scale_out": jnp.ones((kernel.shape[1],), kernel.dtype)}


def _ones_both(key, kernel, bias, cfg):
    return {**_ones_in(key, kernel, bias, cfg), **_ones_out(key, kernel, bias, cfg)}


def _ia3_apply(x, kernel, bias, factors, cfg, *, train=False, key=None):
    if cfg.scale_bias:
        return linear(x, kernel, bias) * factors["scale_out"]
    return linear(x, kernel) * factors["scale_out"] + (0 if bias is None else bias)


def _ia3_bias(bias, factors, cfg):
    return bias * factors["scale_out"] if (cfg.scale_bias and bias is not None) else bias


def _ia3_inverse(kernel, bias, f, cfg):
    unscaled_bias = bias / f["scale_out"] if (cfg.scale_bias and bias is not None) else bias
    return kernel / f["scale_out"][None, :], unscaled_bias


IA3 = register(Method(
    name="ia3",
    family="reconstruction",
    formula="K' = K * scale_out[None, :]  (scale_bias: y = (x@K + b) * scale_out)",
    factor_names=("scale_out",),
    init=_ones_out,
    materialize=lambda kernel, f, cfg: kernel * f["scale_out"][None, :],
    apply=_ia3_apply,
    materialize_bias=_ia3_bias,
    unmaterialize=_ia3_inverse,
))

SSL = register(Method(
    name="ssl",
    family="reconstruction",
    formula="K' = scale_in[:, None] * K",
    factor_names=("scale_in",),
    init=_ones_in,
    materialize=lambda kernel, f, cfg: f["scale_in"][:, None] * kernel,
    unmaterialize=lambda kernel, bias, f, cfg: (kernel / f["scale_in"][:, None], bias),
    apply=lambda x, kernel, bias, f, cfg, *, train=False, key=None: linear(x * f["scale_in"], kernel, bias),
))

SSB = register(Method(
    name="ssb",
    family="reconstruction",
    formula="K' = scale_in[:, None] * K * scale_out[None, :]",
    factor_names=("scale_in", "scale_out"),
    init=_ones_both,
    materialize=lambda kernel, f, cfg: f["scale_in"][:, None] * kernel * f["scale_out"][None, :],
    unmaterialize=lambda kernel, bias, f, cfg: (kernel / f["scale_in"][:, None] / f["scale_out"][None, :], bias),
    apply=lambda x, kernel, bias, f, cfg, *, train=False, key=None: (
        linear(x * f["scale_in"], kernel) * f["scale_out"] + (0 if bias is None else bias)
    ),
))

BITFIT = register(Method(
    name="bitfit",
    family="reconstruction",
    formula="K' = K; the targeted layers' biases train",
    factor_names=(),
    init=lambda key, kernel, bias, cfg: {},
    materialize=lambda kernel, f, cfg: kernel,
    unmaterialize=lambda kernel, bias, f, cfg: (kernel, bias),
    apply=lambda x, kernel, bias, f, cfg, *, train=False, key=None: linear(x, kernel, bias),
    trains_bias=True,
))


# --- PEFT's IA3: one vector per layer, on the output or (feedforward layers) the input ---------------------

def _input_side(cfg) -> bool:
    return bool(cfg.option("input_side"))


def _mixed_init(key, kernel, bias, cfg):
    return {"ia3_l": jnp.ones((kernel.shape[0] if _input_side(cfg) else kernel.shape[1],), kernel.dtype)}


def _mixed_kernel(kernel, f, cfg):
    return f["ia3_l"][:, None] * kernel if _input_side(cfg) else kernel * f["ia3_l"][None, :]


def _mixed_apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    if _input_side(cfg):
        return linear(x * f["ia3_l"], kernel, bias)
    return linear(x, kernel, bias) * f["ia3_l"]


def _mixed_bias(bias, f, cfg):
    return bias if (bias is None or _input_side(cfg)) else bias * f["ia3_l"]


def _mixed_inverse(kernel, bias, f, cfg):
    if _input_side(cfg):
        return kernel / f["ia3_l"][:, None], bias
    return kernel / f["ia3_l"][None, :], (None if bias is None else bias / f["ia3_l"])


def _mixed_layer_options(cfg, where: str) -> dict:
    """Per layer: whether it is one of ``options.feedforward`` (its input is scaled)."""
    import re

    pattern = cfg.option("feedforward")
    return {"input_side": bool(pattern and re.search(pattern, where))}


def _mixed_validate(cfg):
    pattern = cfg.option("feedforward")
    if pattern is not None:
        import re

        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ConfigError(f"options.feedforward of ia3_mixed must be a regex over layer paths (the layers whose "
                              f"input is scaled), e.g. 'intermediate/dense$'; {pattern!r}: {err}") from None
    if not isinstance(cfg.option("input_side"), bool):
        raise ConfigError("options.input_side of ia3_mixed is set per layer from options.feedforward; do not set it.")


IA3_MIXED = register(Method(
    name="ia3_mixed",
    family="reconstruction",
    formula="y = (x@K + b) * ia3_l; on options.feedforward layers y = (x * ia3_l) @ K + b  (HF PEFT's IA3)",
    factor_names=("ia3_l",),
    init=_mixed_init,
    materialize=_mixed_kernel,
    apply=_mixed_apply,
    materialize_bias=_mixed_bias,
    unmaterialize=_mixed_inverse,
    options={"feedforward": None, "input_side": False},
    validate=_mixed_validate,
    layer_options=_mixed_layer_options,
    factor_axes=lambda cfg: {"ia3_l": ("in",) if _input_side(cfg) else ("out",)},
))
