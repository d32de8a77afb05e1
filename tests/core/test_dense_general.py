"""nn.DenseGeneral projections (kernels (embed, heads, head_dim) and (heads, head_dim, embed)) and
nn.Einsum projections (Gemma's layout: "BTD,NDH->BTNH" with a (heads, embed, head_dim) kernel) under
every kind of method: each model equals an independent reference, the same model written with
nn.Dense and reshapes, at init (a no-op), after perturbing the factors, merged, and in gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax import sharding
import decomp_jax as dj

E, H, D = 16, 4, 4
# one per kind of update: low-rank, magnitude/direction, scaling, residual init, adapter, SVD buffers
METHODS = ("lora", "dora", "ssb", "pissa", "houlsby", "svdiff")
TARGETS = r"(query|value|out)$"
IN_AXES = {"(query|key|value)$": 1, "out$": 2}


def _attention(q, k, v):
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D))
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


class General(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.DenseGeneral((H, D), name=n)(x) for n in ("query", "key", "value"))
        o = nn.DenseGeneral(E, axis=(-2, -1), name="out")(_attention(q, k, v))
        return nn.Dense(E, name="mlp")(jax.nn.gelu(o))


class Einsums(nn.Module):
    """Gemma-style projections: the contracted axis of the q/k/v kernel (heads, embed, head_dim) is in the middle."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Einsum((H, E, D), "btd,ndh->btnh", name=n)(x) for n in ("query", "key", "value"))
        o = nn.Einsum((H, D, E), "btnh,nhd->btd", name="out")(_attention(q, k, v))
        return nn.Dense(E, name="mlp")(jax.nn.gelu(o))


EINSUM_IN_AXES = {"(query|key|value)$": [1], "out$": 2}
KINDS = {"dense_general": (General, IN_AXES), "einsum": (Einsums, EINSUM_IN_AXES)}


class Reference(nn.Module):
    """The same maths with 2-D nn.Dense kernels (d_in, d_out) and explicit reshapes."""

    @nn.compact
    def __call__(self, x):
        b, s, _ = x.shape
        q, k, v = (nn.Dense(H * D, name=n)(x).reshape(b, s, H, D) for n in ("query", "key", "value"))
        o = nn.Dense(E, name="out")(_attention(q, k, v).reshape(b, s, H * D))
        return nn.Dense(E, name="mlp")(jax.nn.gelu(o))


def _as_matrices(params, kind="dense_general"):
    """The general model's params as the reference's (kernels as (d_in, d_out) matrices, biases as vectors)."""
    out = {}
    for name, layer in params.items():
        kernel = layer["kernel"]
        if kind == "einsum" and name in ("query", "key", "value"):
            kernel = jnp.transpose(kernel, (1, 0, 2))  # (heads, embed, head_dim) -> (embed, heads, head_dim)
        n_in = 2 if name == "out" else 1
        out[name] = {"kernel": kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1), "bias": layer["bias"].reshape(-1)}
    return out


def _perturb(params, cfg, seed=1):
    """Every trainable leaf moved off its init by the same noise in both models (by path)."""
    mask = dj.trainable_mask(params, cfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    return jax.tree.map(lambda x, m: x + 0.05 * jax.random.normal(next(keys), x.shape) if m else x, params, mask)


def _models(kind):
    model, _ = KINDS[kind]
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, E))
    general = model().init(jax.random.PRNGKey(1), x)["params"]
    return x, general, _as_matrices(general, kind)


@pytest.fixture(scope="module")
def models():
    return _models("dense_general")


# DenseGeneral: every method of the list; Einsum: one per family (the matrix view is shared code)
CASES = [("dense_general", m) for m in METHODS] + [("einsum", m) for m in ("lora", "dora", "pissa")]


@pytest.mark.parametrize("kind, method", CASES)
def test_general_kernels_equal_the_dense_reference(kind, method):
    x, general, reference = _models(kind)
    General, in_axes = KINDS[kind]
    cfg = dj.AdapterConfig(method=method, targets=TARGETS, rank=2, kernel_in_axes=in_axes)
    ref_cfg = cfg.replace(kernel_in_axes={})
    key = jax.random.PRNGKey(3)
    pg, pr = dj.inject(general, cfg, key), dj.inject(reference, ref_cfg, key)
    for name in ("query", "out"):  # the same factors: made from the same matrices with the same per-layer keys
        for leaf in dj.methods.get(method).factor_names:
            np.testing.assert_allclose(pg[name][leaf], pr[name][leaf], rtol=1e-6, atol=1e-6)
    run_g = dj.adapt(lambda p, x: General().apply({"params": p}, x), cfg)
    run_r = dj.adapt(lambda p, x: Reference().apply({"params": p}, x), ref_cfg)
    base = General().apply({"params": general}, x)
    if method not in ("pissa",):  # PiSSA's residual kernel differs from K by its float rounding only
        np.testing.assert_allclose(run_g(pg, x), base, rtol=1e-5, atol=1e-5)  # injection is a no-op at init
    pg, pr = _perturb(pg, cfg), _perturb(pr, ref_cfg)
    out = run_g(pg, x)
    assert float(jnp.abs(out - base).max()) > 1e-3  # the perturbed adapter changes the output
    np.testing.assert_allclose(out, run_r(pr, x), rtol=1e-5, atol=1e-5)
    if dj.methods.get(method).mergeable:
        merged = dj.merge(pg, cfg)
        assert merged["query"]["kernel"].shape == general["query"]["kernel"].shape
        assert merged["out"]["kernel"].shape == (H, D, E)
        np.testing.assert_allclose(General().apply({"params": merged}, x), out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dj.merge(pr, ref_cfg)["out"]["kernel"], merged["out"]["kernel"].reshape(H * D, E),
                                   rtol=1e-5, atol=1e-5)
    mask = dj.trainable_mask(pg, cfg)
    tg, fg = dj.split(pg, mask)
    tr, fr = dj.split(pr, dj.trainable_mask(pr, ref_cfg))
    gg = jax.grad(lambda t: run_g(dj.combine(t, fg), x).sum())(tg)
    gr = jax.grad(lambda t: run_r(dj.combine(t, fr), x).sum())(tr)
    for name in ("query", "out"):
        for leaf, value in gg[name].items():
            assert float(jnp.abs(value).max()) > 0
            np.testing.assert_allclose(value, gr[name][leaf], rtol=1e-4, atol=1e-5)


def test_general_kernel_errors_name_the_fix(models):
    x, general, _ = models
    with pytest.raises(dj.ConfigError, match=r"kernel of shape \(16, 4, 4\).*adapter\.kernel_in_axes.*'query\$': 1"):
        dj.inject(general, dj.AdapterConfig(targets="query$"), jax.random.PRNGKey(0))
    wrong = dj.AdapterConfig(targets="out$", rank=2, kernel_in_axes={"out$": 1})  # out contracts 2 axes
    with pytest.raises(dj.ConfigError, match=r"bias of shape \(16,\) does not fit its kernel read as the \(d_in, d_out\) matrix \(4, 64\).*kernel_in_axes"):
        dj.inject(general, wrong, jax.random.PRNGKey(0))
    right = wrong.replace(kernel_in_axes={"out$": 2})
    params = dj.inject(general, right, jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"contracts axes \[0, 1\] with the input, but adapter\.kernel_in_axes gives "
                                             r"\[0\]\. Set kernel_in_axes to \{'out\$': \[0, 1\]\}"):
        dj.adapt(lambda p, x: General().apply({"params": p}, x), wrong)(params, x)
    x, einsums, _ = _models("einsum")
    dense_like = dj.AdapterConfig(targets="query$", rank=2, kernel_in_axes={"query$": 1})  # the axis is 1, not 0
    with pytest.raises(dj.ConfigError, match=r"'query': its bias of shape \(4, 4\) does not fit"):
        dj.inject(einsums, dense_like, jax.random.PRNGKey(0))
    params = dj.inject(einsums, dense_like.replace(kernel_in_axes={"query$": [1]}), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"'query' computes 'btd,ndh->btnh': its kernel \(4, 16, 4\) contracts "
                                             r"axes \[1\].*gives \[0\]\. Set kernel_in_axes to \{'query\$': \[1\]\}"):
        dj.adapt(lambda p, x: Einsums().apply({"params": p}, x), dense_like)(params, x)
    with pytest.raises(dj.ConfigError, match=r"kernel_in_axes\['out\$'\] must be a positive integer"):
        dj.AdapterConfig(kernel_in_axes={"out$": 0})


def test_general_factor_shardings_follow_their_kernel(models):
    """On a mesh: the (embed, heads, head_dim) kernel split over tensor on heads, lora_b (r, heads*head_dim)
    takes that split on its flattened axis; lora_a (embed, r) takes the embed axis's."""
    _, general, _ = models
    cfg = dj.AdapterConfig(targets=TARGETS, rank=2, kernel_in_axes=IN_AXES)
    params = dj.inject(general, cfg, jax.random.PRNGKey(0))
    mesh = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"))
    rules = [(r"(query|key|value)/kernel$", ("fsdp", "tensor", None)), (r"out/kernel$", ("tensor", None, "fsdp"))]
    specs = sharding.param_specs(params, mesh, rules, cfg=cfg, fsdp_min_size=1)
    P = jax.sharding.PartitionSpec
    assert specs["query"]["lora_a"] == P("fsdp", None) and specs["query"]["lora_b"] == P(None, "tensor")
    assert specs["out"]["lora_a"] == P("tensor", None) and specs["out"]["lora_b"] == P(None, "fsdp")
