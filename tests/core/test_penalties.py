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


LORA_TYPE = ["lora", "trilora", "adalora", "flora", "moslora", "dora", "pissa", "milora", "lora_dash"]


@pytest.mark.parametrize("name", LORA_TYPE)
@pytest.mark.parametrize("kind", ["mpc_o", "mpc_d"])
def test_mpc_on_every_lora_type_method(name, kind, tiny_bert):
    """The same R on lora_a/lora_b whatever else the method holds, computed here with NumPy."""
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets="(query|value)$", rank=4, mpc=kind, mpc_lambda=0.2)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    from decomp_jax.core.inject import adapted_layers

    rng = np.random.default_rng(3)
    per_layer, changes = [], {}
    for path, layer in adapted_layers(params, cfg):
        a, b = rng.normal(size=layer["lora_a"].shape), rng.normal(size=layer["lora_b"].shape)
        changes[path + ("lora_a",)], changes[path + ("lora_b",)] = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        gram_b = b @ b.T
        target_b = np.eye(4) if kind == "mpc_o" else np.diag(np.diag(gram_b))
        per_layer.append(np.sum((a.T @ a - np.eye(4)) ** 2) + np.sum((gram_b - target_b) ** 2))
    assert len(per_layer) == 4
    got = float(dj.penalty(dj.set_leaves(params, changes), cfg))
    assert got == pytest.approx(0.2 * np.mean(per_layer), rel=1e-5)


def test_mpc_refused_without_lora_factors():
    with pytest.raises(dj.ConfigError, match=r"method 'ssb' does not have.*'lora'"):
        dj.AdapterConfig(method="ssb", mpc="mpc_o")


def test_plain_norm_has_finite_gradients_at_zero(tiny_bert):
    """mpc_d's B term is exactly 0 while lora_b is zero (LoRA's init): the plain norm's gradient
    must be 0 there, not NaN."""
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=4, mpc="mpc_d", mpc_norm="plain")
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    grads = jax.grad(lambda p: dj.penalty(p, cfg))(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
