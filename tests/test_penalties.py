"""MPC penalties against values worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp_jax as dj

# layer 1: A^T A - I = diag(0, 3) -> 9;  B B^T - I = diag(1, 0) -> 1;  B B^T off-diagonal = 0
A1 = [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
B1 = [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
# layer 2: A^T A - I = [[0,1],[1,0]] -> 2;  B B^T - I -> 2;  off-diagonal -> 2
A2 = [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
B2 = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def two_layers():
    layer = lambda a, b: {"kernel": jnp.zeros((3, 3)), "lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
    return {"l1": layer(A1, B1), "l2": layer(A2, B2), "other": {"kernel": jnp.ones((3, 3))}}


@pytest.mark.parametrize("mpc, norm, expected", [
    ("mpc_o", "squared", 0.1 * (10 + 4) / 2),
    ("mpc_d", "squared", 0.1 * (9 + 4) / 2),
    ("mpc_o", "plain", 0.1 * ((3 + 1) / 2 + (math.sqrt(2) + math.sqrt(2)) / 2) / 2),
    ("mpc_d", "plain", 0.1 * ((3 + 0) / 2 + (math.sqrt(2) + math.sqrt(2)) / 2) / 2),
])
def test_penalty_hand_values(mpc, norm, expected):
    cfg = dj.AdapterConfig(method="lora", rank=2, mpc=mpc, mpc_norm=norm)
    assert float(dj.penalty(two_layers(), cfg)) == pytest.approx(expected, rel=1e-6)


def test_penalty_off_and_lambda():
    params = two_layers()
    assert float(dj.penalty(params, dj.AdapterConfig(method="lora", rank=2))) == 0.0
    cfg = dj.AdapterConfig(method="dora", rank=2, mpc="mpc_o", mpc_lambda=0.3)
    params = {k: {**v, "magnitude": jnp.ones(3)} for k, v in params.items() if k != "other"}
    assert float(dj.penalty(params, cfg)) == pytest.approx(0.3 * 7, rel=1e-6)


def test_penalty_zero_for_semi_orthogonal_factors():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 3)))
    params = {"l": {"kernel": jnp.zeros((8, 8)), "lora_a": jnp.asarray(q), "lora_b": jnp.asarray(q.T * np.array([1.0, 2.0, 3.0])[:, None])}}
    assert float(dj.penalty(params, dj.AdapterConfig(method="lora", rank=3, mpc="mpc_d"))) == pytest.approx(0.0, abs=1e-6)
    assert float(dj.penalty(params, dj.AdapterConfig(method="lora", rank=3, mpc="mpc_o"))) > 0.1


def test_penalty_gradient():
    """d/dA ||A^T A - I||^2 = 4 A (A^T A - I)."""
    a = jnp.asarray(np.random.default_rng(1).normal(size=(5, 2)), jnp.float32)
    params = {"l": {"kernel": jnp.zeros((5, 4)), "lora_a": a, "lora_b": jnp.zeros((2, 4))}}
    cfg = dj.AdapterConfig(method="lora", rank=2, mpc="mpc_o", mpc_lambda=1.0)
    g = jax.grad(lambda p: dj.penalty(p, cfg))(params)["l"]["lora_a"]
    A = np.asarray(a, np.float64)
    np.testing.assert_allclose(np.asarray(g), 4 * A @ (A.T @ A - np.eye(2)), rtol=1e-4)
