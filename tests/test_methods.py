"""Each method's materialize/apply against an independent NumPy reference of the spec's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp_jax as dj
from decomp_jax import methods

D_IN, D_OUT, R = 12, 10, 4


def _np_colnorm(k):
    return np.sqrt((k ** 2).sum(axis=0))


def reference(name, K, f, cfg):
    """The spec's formulas, written with NumPy only (float64)."""
    s = cfg.alpha / (np.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
    if name == "lora":
        return K + s * f["lora_a"] @ f["lora_b"]
    if name == "dora":
        V = K + s * f["lora_a"] @ f["lora_b"]
        return V * (f["magnitude"] / _np_colnorm(V))[None, :]
    if name == "ia3":
        return K * f["scale_out"][None, :]
    if name == "ssl":
        return f["scale_in"][:, None] * K
    if name == "ssb":
        return f["scale_in"][:, None] * K * f["scale_out"][None, :]
    if name == "bitfit":
        return K
    raise AssertionError(f"no reference for {name}")


def random_factors(method, key, K, b, cfg):
    """The method's factors with the init's shapes but random, non-initial values."""
    init = method.init(key, jnp.asarray(K), jnp.asarray(b), cfg)
    rng = np.random.default_rng(1)
    out = {}
    for n, v in init.items():
        val = rng.normal(size=v.shape)
        if n in ("scale_in", "scale_out", "magnitude"):
            val = 1.0 + 0.3 * val
        out[n] = val
    return out


@pytest.fixture
def kernel_bias():
    rng = np.random.default_rng(0)
    return rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(D_OUT,))


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("rslora", [False, True])
def test_materialize_and_apply_match_reference(name, rslora, kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method=name, rank=R, alpha=6.0, rslora=rslora)
    method = methods.get(name)
    f = random_factors(method, jax.random.PRNGKey(0), K, b, cfg)
    f32 = {n: jnp.asarray(v, jnp.float32) for n, v in f.items()}
    expected = reference(name, K, f, cfg)
    got = method.materialize(jnp.asarray(K, jnp.float32), f32, cfg)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)

    x = np.random.default_rng(2).normal(size=(3, 5, D_IN))
    y = method.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), f32, cfg)
    np.testing.assert_allclose(np.asarray(y), x @ expected + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", methods.names())
def test_init_is_identity(name, kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method=name, rank=R)
    method = methods.get(name)
    f = method.init(jax.random.PRNGKey(3), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), cfg)
    np.testing.assert_allclose(np.asarray(method.materialize(jnp.asarray(K, jnp.float32), f, cfg)), K, rtol=1e-5, atol=1e-5)


def test_ia3_scale_bias_scales_whole_output(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="ia3", scale_bias=True)
    l = 1.0 + 0.5 * np.random.default_rng(4).normal(size=(D_OUT,))
    x = np.random.default_rng(5).normal(size=(7, D_IN))
    f = {"scale_out": jnp.asarray(l, jnp.float32)}
    ia3 = methods.get("ia3")
    y = ia3.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), f, cfg)
    np.testing.assert_allclose(np.asarray(y), (x @ K + b) * l, rtol=1e-5, atol=1e-5)
    # merging folds the scale into kernel *and* bias
    merged_b = ia3.materialize_bias(jnp.asarray(b, jnp.float32), f, cfg)
    np.testing.assert_allclose(np.asarray(merged_b), b * l, rtol=1e-6)
    # the paper's IA3 leaves the bias alone: outputs differ by b * (l - 1)
    y_paper = ia3.apply(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32), f, cfg.replace(scale_bias=False))
    np.testing.assert_allclose(np.asarray(y) - np.asarray(y_paper), np.broadcast_to(b * (l - 1), y.shape), atol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "normal", "gaussian"])
def test_lora_inits(init):
    d_in, d_out, r = 256, 64, 16
    cfg = dj.AdapterConfig(method="lora", rank=r, init=init)
    f = methods.get("lora").init(jax.random.PRNGKey(0), jnp.zeros((d_in, d_out)), None, cfg)
    a = np.asarray(f["lora_a"])
    assert a.shape == (d_in, r) and f["lora_b"].shape == (r, d_out)
    assert not np.any(np.asarray(f["lora_b"]))
    if init == "kaiming":  # uniform(-1/sqrt(d_in), 1/sqrt(d_in)): std = bound / sqrt(3)
        bound = 1 / np.sqrt(d_in)
        assert np.abs(a).max() <= bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound
    elif init == "normal":
        assert abs(a.std() - 0.02) < 0.002
    else:
        assert abs(a.std() - 1 / r) < 0.1 / r


def test_lora_dropout_only_on_adapter_path(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="lora", rank=R, dropout=0.5)
    lora = methods.get("lora")
    f = {n: jnp.asarray(v, jnp.float32) for n, v in random_factors(lora, jax.random.PRNGKey(0), K, b, cfg).items()}
    x = jnp.asarray(np.random.default_rng(6).normal(size=(64, D_IN)), jnp.float32)
    Kj, bj = jnp.asarray(K, jnp.float32), jnp.asarray(b, jnp.float32)
    key = jax.random.PRNGKey(9)
    y_train = lora.apply(x, Kj, bj, f, cfg, train=True, key=key)
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    x_drop = np.where(np.asarray(keep), np.asarray(x) / 0.5, 0.0)
    expected = np.asarray(x) @ K + b + cfg.scale * x_drop @ np.asarray(f["lora_a"]) @ np.asarray(f["lora_b"])
    np.testing.assert_allclose(np.asarray(y_train), expected, rtol=1e-4, atol=1e-4)
    # without training mode dropout is off
    y_eval = lora.apply(x, Kj, bj, f, cfg, train=False, key=key)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(x) @ np.asarray(lora.materialize(Kj, f, cfg)) + b, rtol=1e-4, atol=1e-4)


def test_dora_magnitude_gradient_treats_norm_as_constant(kernel_bias):
    K, b = kernel_bias
    cfg = dj.AdapterConfig(method="dora", rank=R)
    dora = methods.get("dora")
    f = {n: jnp.asarray(v, jnp.float32) for n, v in random_factors(dora, jax.random.PRNGKey(0), K, b, cfg).items()}
    Kj = jnp.asarray(K, jnp.float32)
    g = jax.grad(lambda m: jnp.sum(dora.materialize(Kj, {**f, "magnitude": m}, cfg)))(f["magnitude"])
    V = K + cfg.scale * np.asarray(f["lora_a"]) @ np.asarray(f["lora_b"])
    np.testing.assert_allclose(np.asarray(g), V.sum(axis=0) / _np_colnorm(V), rtol=1e-4)
