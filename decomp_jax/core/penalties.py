"""Regularisers added to the task loss: MPC (matrix pattern constraints) on ``lora_a``/``lora_b``.

- ``mpc_o``: ``R = ||A^T A - I||^2 + ||B B^T - I||^2`` (both factors semi-orthogonal).
- ``mpc_d``: ``R = ||A^T A - I||^2 + ||B B^T - diag(diag(B B^T))||^2`` (rows of B orthogonal, free norms).

``penalty = lambda * mean over adapted layers of R``. With ``mpc_norm='plain'`` (the toolkit's
form) each term is the unsquared Frobenius norm and the mean runs over matrices (A's and B's),
i.e. ``R = (||.||_A + ||.||_B) / 2``.
"""

from __future__ import annotations

import jax.numpy as jnp

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import adapted_layers
from decomp_jax.core.methods import get
from decomp_jax.core.tree import lead_axes, matrix_leaf, per_layer


def _frobenius(m, squared: bool):
    sq = jnp.sum(jnp.square(m))
    if squared:
        return sq
    # sqrt with a zero gradient at 0 (as torch.norm): the mpc_d term of a zero lora_b is exactly 0
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def mpc_terms(lora_a, lora_b, kind: str, squared: bool = True):
    """``(term_A, term_B)`` of the MPC regulariser for one layer."""
    gram_a = lora_a.T @ lora_a
    gram_b = lora_b @ lora_b.T
    eye = jnp.eye(gram_a.shape[0], dtype=gram_a.dtype)
    term_a = _frobenius(gram_a - eye, squared)
    if kind == "mpc_o":
        term_b = _frobenius(gram_b - eye, squared)
    elif kind == "mpc_d":
        term_b = _frobenius(gram_b - jnp.diag(jnp.diag(gram_b)), squared)
    else:
        raise ValueError(f"unknown MPC kind {kind!r}; choose 'mpc_o' or 'mpc_d'")
    return term_a, term_b


def penalty(params, cfg: AdapterConfig):
    """``lambda * mean over adapted layers of R``; 0.0 when ``cfg.mpc`` is None and the method has
    no built-in regulariser (AdaLoRA's orthogonality term is MPC_o)."""
    kind = cfg.mpc or get(cfg.method).regularizer
    if kind is None or cfg.mpc_lambda == 0:
        return jnp.float32(0.0)
    squared = cfg.mpc_norm == "squared"

    def layer_term(lora_a, lora_b):
        term_a, term_b = mpc_terms(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), kind, squared)
        return term_a + term_b if squared else (term_a + term_b) / 2

    terms = []  # a stacked layer (L, ...) counts as its L layers, as if unrolled; each expert as a layer
    for path, layer in adapted_layers(params, cfg):
        lead = lead_axes(path, layer[matrix_leaf(layer)], cfg)
        terms.append(jnp.reshape(per_layer(layer_term, lead)(layer["lora_a"], layer["lora_b"]), (-1,)))
    if not terms:
        return jnp.float32(0.0)
    return cfg.mpc_lambda * jnp.mean(jnp.concatenate(terms))
