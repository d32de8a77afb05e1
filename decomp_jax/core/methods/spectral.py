"""Methods built on the SVD of the *loaded* pretrained kernel, ``K = U diag(S) Vt``.

Reconstruction: SAM-PARSER tunes the singular values; PiSSA/MiLoRA start LoRA factors on the top
or bottom singular triplets and keep the residual as the base kernel. Combination: SVDiff shifts
the singular values, the Spectral Adapter rotates the top-r singular vectors. The SVD runs once,
at injection, in float32; its factors are buffers (no gradients, no optimizer state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.base import Method, additive, linear, register
from decomp_jax.core.methods.lowrank import lora_delta, lora_path


def svd(kernel: jax.Array):
    """``U (d_in, k), S (k,), Vt (k, d_out)``, ``k = min(d_in, d_out)``, S descending, in float32."""
    return jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)


def _svd_buffers(kernel):
    u, s, vt = svd(kernel)
    dt = kernel.dtype
    return u.astype(dt), s.astype(dt), vt.astype(dt)


def spectral_product(x, u, values, vt):
    """``x @ (u diag(values) vt)`` without forming the matrix."""
    return ((x @ u) * values) @ vt


# SAM-PARSER and SVDiff rebuild the whole kernel from full-size factors (u and vt are as large as
# K). Their factored path ``((x @ u) * sigma) @ vt`` costs two full products forward and two
# backward, where materialising ``K'`` per layer costs one forward, two backward and a ``d^3``
# rebuild that does not grow with the batch; measured on MiniLM it was 4% slower. They leave
# ``apply`` unset, so factored execution materialises ``K'`` inside each intercepted layer (as for
# LiERA): still no whole-tree merge, and the same gradients.


# --- SAM-PARSER: K' = u diag(sigma) vt ----------------------------------------------------------

def _sam_init(key, kernel, bias, cfg):
    u, s, vt = _svd_buffers(kernel)
    return {"sigma": s, "u": u, "vt": vt}


SAM_PARSER = register(Method(
    name="sam_parser",
    family="reconstruction",
    formula="K' = u @ diag(sigma) @ vt  (sigma init S; u, vt buffers from svd(K))",
    factor_names=("sigma", "u", "vt"),
    init=_sam_init,
    materialize=lambda kernel, f, cfg: ((f["u"] * f["sigma"]) @ f["vt"]).astype(kernel.dtype),
    # no factored path: x @ u then @ vt is two full products where K' is one (see above)
    buffers=("u", "vt"),
))


# --- PiSSA / MiLoRA: LoRA factors on the top / bottom r singular triplets ----------------------

def _principal_init(bottom: bool):
    def init(key, kernel, bias, cfg):
        u, s, vt = svd(kernel)
        pick = slice(s.shape[0] - cfg.rank, None) if bottom else slice(0, cfg.rank)
        root = jnp.sqrt(s[pick] / cfg.scale)
        return {
            "lora_a": (u[:, pick] * root).astype(kernel.dtype),
            "lora_b": (root[:, None] * vt[pick]).astype(kernel.dtype),
        }

    return init


def _lora_apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    return linear(x, kernel, bias) + lora_path(x, f, cfg, train, key)


def _principal_method(name: str, bottom: bool) -> Method:
    which = "bottom" if bottom else "top"
    return register(Method(
        name=name,
        family="reconstruction",
        formula=f"K' = K_res + s * lora_a @ lora_b  (factors from the {which}-r SVD triplets; K_res = K - s*a0@b0)",
        factor_names=("lora_a", "lora_b"),
        init=_principal_init(bottom),
        **additive(lora_delta),
        apply=_lora_apply,
        residual=lambda kernel, f, cfg: kernel - lora_delta(f, cfg).astype(kernel.dtype),
        uses_rank=True,
    ))


PISSA = _principal_method("pissa", bottom=False)
MILORA = _principal_method("milora", bottom=True)


# --- SVDiff: K' = u diag(relu(sigma0 + delta)) vt ------------------------------------------------

def _svdiff_init(key, kernel, bias, cfg):
    u, s, vt = _svd_buffers(kernel)
    return {"delta": jnp.zeros_like(s), "u": u, "sigma0": s, "vt": vt}


def _shifted(f):
    return jax.nn.relu(f["sigma0"] + f["delta"])


SVDIFF = register(Method(
    name="svdiff",
    family="combination",
    formula="K' = u @ diag(relu(sigma0 + delta)) @ vt  (u, sigma0, vt buffers from svd(K))",
    factor_names=("delta", "u", "sigma0", "vt"),
    init=_svdiff_init,
    materialize=lambda kernel, f, cfg: ((f["u"] * _shifted(f)) @ f["vt"]).astype(kernel.dtype),
    # no factored path, as for SAM-PARSER
    unmaterialize=lambda kernel, bias, f, cfg: (((f["u"] * f["sigma0"]) @ f["vt"]).astype(kernel.dtype), bias),
    buffers=("u", "sigma0", "vt"),
))


# --- Spectral adapter: rotate the top-r singular vectors -----------------------------------------

def _spectral_init(key, kernel, bias, cfg):
    u, s, vt = _svd_buffers(kernel)
    r, dt = cfg.rank, kernel.dtype
    return {
        "adapter_u": jnp.zeros((kernel.shape[0], r), dt),
        "adapter_v": jnp.zeros((r, kernel.shape[1]), dt),
        "u_r": u[:, :r], "s_r": s[:r], "vt_r": vt[:r],
    }


def _spectral_delta(f, cfg):
    """``s * ((u_r + adapter_u) diag(s_r) (vt_r + adapter_v) - u_r diag(s_r) vt_r)``, expanded so
    that nothing cancels: ``s * (adapter_u diag(s_r) vt_r + (u_r + adapter_u) diag(s_r) adapter_v)``."""
    rotated_u = f["u_r"] + f["adapter_u"]
    return cfg.scale * ((f["adapter_u"] * f["s_r"]) @ f["vt_r"] + (rotated_u * f["s_r"]) @ f["adapter_v"])


def _spectral_apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    # one pass over x for both down-projections and one up-projection:
    # [x au, x u_r] -> [x au * s_r, (x u_r + x au) * s_r] @ [vt_r ; adapter_v]
    r = f["adapter_u"].shape[1]
    down = x @ jnp.concatenate([f["adapter_u"], f["u_r"]], axis=1)
    xu = down[..., :r]
    h = jnp.concatenate([xu, down[..., r:] + xu], axis=-1) * jnp.concatenate([f["s_r"], f["s_r"]])
    return linear(x, kernel, bias) + cfg.scale * (h @ jnp.concatenate([f["vt_r"], f["adapter_v"]], axis=0))


SPECTRAL = register(Method(
    name="spectral",
    family="combination",
    formula="K' = K + s * ((u_r + adapter_u) diag(s_r) (vt_r + adapter_v) - u_r diag(s_r) vt_r)",
    factor_names=("adapter_u", "adapter_v", "u_r", "s_r", "vt_r"),
    init=_spectral_init,
    **additive(_spectral_delta),
    apply=_spectral_apply,
    buffers=("u_r", "s_r", "vt_r"),
    uses_rank=True,
))
