"""Flax NNX models in factored execution (decomp_jax.nnx): nnx.Linear and nnx.LinearGeneral layers
adapted in place. The model's state is the dict API's adapted params tree path for path; outputs
equal the dict API's merged model (an independent path: merge on the pure dict) at init and after
perturbing the factors; nnx.split gives the factors alone, gradients reach them only, a step lowers
the loss; merge gives a plain model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax.linen as nn

from decomp_jax import nnx as dnnx
import decomp_jax as dj

E, H, D = 16, 4, 4
METHODS = ("lora", "dora", "ssb", "pissa", "houlsby", "svdiff")
IN_AXES = {"(query|key|value)$": 1, "out$": 2, "gate$": [1]}
TARGETS = r"(query|value|out|mlp/1|gate)$"


class Model(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.LinearGeneral(E, (H, D), rngs=rngs)
        self.key = nnx.LinearGeneral(E, (H, D), rngs=rngs)
        self.value = nnx.LinearGeneral(E, (H, D), rngs=rngs)
        self.out = nnx.LinearGeneral((H, D), E, axis=(-2, -1), rngs=rngs)
        self.mlp = nnx.List([nnx.Linear(E, 2 * E, rngs=rngs), nnx.Linear(2 * E, E, rngs=rngs)])
        self.gate = nnx.Einsum("btd,ndh->btnh", (2, E, E // 2), rngs=rngs)  # Gemma's layout: contracted axis 1

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D))
        o = self.out(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        h = self.mlp[1](jax.nn.gelu(self.mlp[0](o)))
        return h * jax.nn.sigmoid(self.gate(h).reshape(h.shape))


class LinenTwin(nn.Module):
    """The same model in Linen (DenseGeneral / Dense), run by the dict API's factored execution."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.DenseGeneral((H, D), name=n)(x) for n in ("query", "key", "value"))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D))
        o = nn.DenseGeneral(E, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        h = _Mlp(name="mlp")(o)
        return h * jax.nn.sigmoid(nn.Einsum((2, E, E // 2), "btd,ndh->btnh", name="gate")(h).reshape(h.shape))


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(E, name="1")(jax.nn.gelu(nn.Dense(2 * E, name="0")(x)))


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _cfg(method):
    return dj.AdapterConfig(method=method, targets=TARGETS, rank=2, kernel_in_axes=IN_AXES)


def _perturb(model, seed=1):
    graphdef, factors, rest = nnx.split(model, dnnx.AdapterParam, ...)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    factors = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), factors)
    return nnx.merge(graphdef, factors, rest)


def _reference(base, adapted, cfg, x):
    """The dict API's merged model on the adapted state: ``dj.merge`` of the pure dict, loaded into the base."""
    merged = dj.merge(nnx.to_pure_dict(nnx.state(adapted)), cfg)
    ref = nnx.clone(base)
    state = nnx.state(ref, nnx.Param)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(ref, state)
    return ref(x)


@pytest.mark.parametrize("method", METHODS)
def test_nnx_layers_run_every_kind_of_method(method):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, E))
    base = Model(nnx.Rngs(0))
    cfg = _cfg(method)
    expected_tree = dj.inject(nnx.to_pure_dict(nnx.state(base, nnx.Param)), cfg, jax.random.PRNGKey(3))
    model = dnnx.inject(nnx.clone(base), cfg, jax.random.PRNGKey(3))
    assert type(model.query).__name__ == "AdaptedLinearGeneral" and type(model.mlp[1]).__name__ == "AdaptedLinear"
    # state-compatible: the model's state is the dict API's adapted tree, path for path and value for value
    state = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, state, expected_tree)
    if method != "pissa":  # (PiSSA's residual kernel equals K up to rounding)
        np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-5)  # a no-op at init
    model = _perturb(model)
    out = model(x)
    assert float(jnp.abs(out - base(x)).max()) > 1e-3
    # the Linen twin through dj.adapt (the interceptor, another code path) on the same adapted tree
    linen = dj.adapt(lambda p, x: LinenTwin().apply({"params": p}, x), cfg)
    np.testing.assert_allclose(out, linen(_str_keys(nnx.to_pure_dict(nnx.state(model))), x), rtol=1e-5, atol=1e-5)
    if dj.methods.get(method).mergeable:
        np.testing.assert_allclose(out, _reference(base, model, cfg, x), rtol=1e-5, atol=1e-5)
        merged = dnnx.merge(model, cfg)
        assert type(merged.query) is nnx.LinearGeneral and not hasattr(merged.query, "lora_a")
        np.testing.assert_allclose(merged(x), out, rtol=1e-5, atol=1e-5)
        assert type(model.query).__name__ == "AdaptedLinearGeneral"  # merge copied; the adapted model is kept


def test_nnx_training_updates_only_the_factors():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, E))
    y = jax.random.normal(jax.random.PRNGKey(1), (4, 5, E))
    model = dnnx.inject(Model(nnx.Rngs(0)), _cfg("lora"), jax.random.PRNGKey(3))
    graphdef, trainable, rest = nnx.split(model, dnnx.AdapterParam, ...)
    assert {p[-1] for p, _ in nnx.to_flat_state(trainable)} == {"lora_a", "lora_b"}
    opt = optax.adam(1e-2)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        def loss(t):
            return jnp.mean((nnx.merge(graphdef, t, rest)(x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(trainable, updates), opt_state, value, grads

    losses = []
    for _ in range(5):
        trainable, opt_state, value, grads = step(trainable, opt_state)
        losses.append(float(value))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert losses[-1] < losses[0] - 1e-3, losses
    frozen_before = nnx.to_pure_dict(rest)
    nnx.update(model, trainable)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.split(model, dnnx.AdapterParam, ...)[2]),
                 frozen_before)


def test_nnx_refusals_name_the_fix():
    with pytest.raises(dj.ConfigError, match=r"'gate' is an einsum 'btd,ndh->btnh' whose kernel \(2, 16, 8\) "
                                             r"contracts axes \[1\].*\{'gate\$': \[1\]\}"):
        dnnx.inject(Model(nnx.Rngs(0)), dj.AdapterConfig(targets="gate$", rank=2, kernel_in_axes={"gate$": 1}),
                    jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"nnx\.LinearGeneral with 2 input axes.*kernel_in_axes.*'out\$': 2"):
        dnnx.inject(Model(nnx.Rngs(0)), dj.AdapterConfig(targets="out$", rank=2, kernel_in_axes={"out$": 1}),
                    jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"dropout=0\.1: NNX layers carry no RNG stream"):
        dnnx.inject(Model(nnx.Rngs(0)), dj.AdapterConfig(targets="mlp/1$", dropout=0.1), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"trainable_tokens is not supported on NNX models"):
        dnnx.inject(Model(nnx.Rngs(0)), dj.AdapterConfig(targets="mlp/1$", trainable_tokens={"emb$": [1]}),
                    jax.random.PRNGKey(0))
    model = dnnx.inject(Model(nnx.Rngs(0)), dj.AdapterConfig(targets="mlp/1$"), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"'mlp/1' is already adapted"):
        dnnx.inject(model, dj.AdapterConfig(targets="mlp/1$"), jax.random.PRNGKey(0))


class _Projection(nnx.Module):
    """Another library's projection: its weight is a parameter ``w``, not a ``kernel``."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (E, H, D)))

    def __call__(self, x):
        return jnp.einsum("btd,dhk->bthk", x, self.w[...])


class _Foreign(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = _Projection(rngs)
        self.up_proj = nnx.Linear(E, E, rngs=rngs)
        self.norm = nnx.RMSNorm(E, rngs=rngs)


def test_a_matched_module_that_cannot_be_adapted_is_refused_not_skipped():
    """targets matching an nnx.Linear and a module holding a 3-D ``w`` raises, naming the module, its class and
    its parameter, and leaves the model as it was; a pattern matching only what can be adapted works (a
    1-D norm scale it also matches is not a layer)."""
    model = _Foreign(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    with pytest.raises(dj.ConfigError, match=r"targets='\(q_proj\|up_proj\)\$' matches 1 module\(s\) decomp_jax\.nnx "
                                             r"cannot adapt: 'q_proj' \(_Projection holding w \(16, 4, 4\)\).*narrow "
                                             r"`targets`.*Nothing was changed"):
        dnnx.inject(model, dj.AdapterConfig(targets=r"(q_proj|up_proj)$", rank=2), jax.random.PRNGKey(0))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after)) and not hasattr(model.up_proj, "lora_a")
    with pytest.raises(dj.ConfigError, match=r"'q_proj' \(_Projection holding w"):  # it alone: refused, not "no layer"
        dnnx.inject(model, dj.AdapterConfig(targets=r"q_proj$", rank=2), jax.random.PRNGKey(0))
    dnnx.inject(model, dj.AdapterConfig(targets=r"(up_proj|norm)$", rank=2), jax.random.PRNGKey(0))
    assert model.up_proj.lora_a[...].shape == (E, 2)


class _EinsumProjection(nnx.Module):
    """Another library's einsum layer (tunix, Gemma): ``jnp.einsum(self.einsum_str, x, self.w)``."""

    def __init__(self, equation, shape, rngs):
        self.einsum_str = equation
        self.dtype = jnp.float32
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / 4, out_sharding=("embed", "heads", None),
                           eager_sharding=False)

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class _Attention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = _EinsumProjection("btd,dhk->bthk", (E, H, D), rngs)
        self.o_proj = _EinsumProjection("bthk,hkd->btd", (H, D, E), rngs)

    def __call__(self, x):
        return self.o_proj(jnp.tanh(self.q_proj(x)))


@pytest.mark.parametrize("method", ["lora", "dora", "ssb"])
def test_other_libraries_einsum_layers_are_adapted_through_kernel_leaf(method):
    """``kernel_leaf`` names ``w``: both einsum layers adapted (input axes read from their equations), a no-op at
    init, factored == merged == the dense kernels ``w + s A B`` written in ``w``'s layout (LoRA); the factors
    carry sharding names derived from ``w``'s; a leaf of a layer with no equation is refused by name."""
    model = _Attention(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, E))
    base = model(x)
    cfg = dj.AdapterConfig(method=method, targets=r"(q|o)_proj$", rank=2, alpha=4, kernel_leaf={r"_proj$": "w"})
    dnnx.inject(model, cfg, jax.random.PRNGKey(0))
    np.testing.assert_allclose(model(x), base, atol=1e-6)
    trainable = nnx.state(model, dnnx.AdapterParam)
    nnx.update(model, jax.tree.map(lambda v: v + 0.1 * jnp.cos(jnp.arange(v.size).reshape(v.shape)), trainable))
    adapted = model(x)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    np.testing.assert_allclose(dnnx.merge(model, cfg)(x), adapted, atol=1e-5)
    if method == "lora":
        assert model.q_proj.lora_a.get_metadata()["out_sharding"] == ("embed", None)
        assert model.q_proj.lora_b.get_metadata()["out_sharding"] == (None, "heads")
        dense = _Attention(nnx.Rngs(0))
        for name in ("q_proj", "o_proj"):
            layer, plain = getattr(model, name), getattr(dense, name)
            w = np.asarray(plain.w[...])
            n_in = 1 if name == "q_proj" else 2
            d_in = int(np.prod(w.shape[:n_in]))
            delta = 2.0 * np.asarray(layer.lora_a[...]) @ np.asarray(layer.lora_b[...])  # alpha / r = 2
            assert delta.shape == (d_in, w.size // d_in)
            plain.w[...] = w + delta.reshape(w.shape)
        np.testing.assert_allclose(dense(x), adapted, atol=1e-5)
    with pytest.raises(dj.ConfigError, match=r"'q_proj' is a _Projection holding its matrix as 'w'.*no `einsum_str`"):
        dnnx.inject(_Foreign(nnx.Rngs(0)), dj.AdapterConfig(targets=r"q_proj$", kernel_leaf={"q_proj$": "w"}, rank=2),
                    jax.random.PRNGKey(0))
