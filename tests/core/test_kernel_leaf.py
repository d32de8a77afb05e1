"""Other people's Linen layers that hold their matrix under another name: a Gemma-style ``Einsum`` module
(param ``w``, called ``Einsum(shape)(equation, x)``). ``adapter.kernel_leaf`` names the leaf; inject,
factored execution, merge, unmerge and partition see it as the layer's kernel and give it back under its
own name."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decomp_jax as dj
from helpers import adam_losses  # noqa: E402

D, N, H = 16, 4, 8


class Einsum(nn.Module):
    """Gemma's Linen einsum layer, in outline: the equation is an argument of the call."""

    shape: tuple

    @nn.compact
    def __call__(self, equation, x):
        w = self.param("w", nn.initializers.normal(0.3), self.shape)
        return jnp.einsum(equation, x, w)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = Einsum((D, N, H), name="q_einsum")("btd,dnh->btnh", x)
        return Einsum((N, H, D), name="attn_vec_einsum")("btnh,nhd->btd", jnp.tanh(q))


CFG = dict(targets=r"(q_einsum|attn_vec_einsum)$", kernel_leaf={r"_einsum$": "w"},
           kernel_in_axes={r"q_einsum$": 1, r"attn_vec_einsum$": 2}, rank=2, alpha=4)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_named_leaf_layers_inject_run_merge_and_train(method):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, D))
    params = Attention().init(jax.random.PRNGKey(0), x)["params"]
    cfg = dj.AdapterConfig(method=method, **CFG)
    adapted = dj.inject(params, cfg, jax.random.PRNGKey(2))
    layer = adapted["q_einsum"]
    assert "w" in layer and "kernel" not in layer and len(layer) > 1  # the factors beside w
    apply = dj.adapt(Attention().apply, cfg)
    base = Attention().apply({"params": params}, x)
    np.testing.assert_allclose(apply({"params": adapted}, x), base, atol=1e-6)
    trainable, buffers, frozen = dj.partition(adapted, cfg)
    assert "w" in frozen["q_einsum"] and "w" not in trainable["q_einsum"]
    moved_factors = jax.tree.map(lambda v: v + 0.2, trainable)
    moved = dj.combine(moved_factors, buffers, frozen)
    factored = apply({"params": moved}, x)
    assert float(jnp.abs(factored - base).max()) > 1e-2
    merged = dj.merge(moved, cfg)
    assert set(merged["q_einsum"]) == {"w"}
    np.testing.assert_allclose(Attention().apply({"params": merged}, x), factored, atol=1e-5)
    np.testing.assert_allclose(dj.adapt(Attention().apply, cfg, mode="merged")({"params": moved}, x), factored, atol=1e-5)
    if method != "dora":
        back = dj.unmerge(merged, moved_factors, cfg)
        np.testing.assert_allclose(back["q_einsum"]["w"], moved["q_einsum"]["w"], atol=1e-5)

    def loss(p, batch, rng):
        return jnp.mean((apply({"params": p}, batch["x"]) - batch["y"]) ** 2), {}

    losses, _, _ = adam_losses(loss, cfg, (trainable, buffers, frozen), {"x": x, "y": jnp.sin(x)}, 4)
    assert losses[-1] < losses[0]


def test_without_kernel_leaf_the_layers_are_refused_by_name():
    x = jnp.ones((1, 2, D))
    params = Attention().init(jax.random.PRNGKey(0), x)["params"]
    with pytest.raises(dj.ConfigError, match=r"matches 1 layer\(s\) holding a matrix under another name than `kernel`: "
                                             r"'q_einsum' \(w \(16, 4, 8\)\).*adapter\.kernel_leaf \(e\.g\. \{'q_einsum\$': 'w'\}\)"):
        dj.inject(params, dj.AdapterConfig(targets=r"q_einsum$", rank=2), jax.random.PRNGKey(0))


def test_a_pattern_naming_layers_the_model_lacks_is_reported():
    params = {"attn": {n: {"kernel": jnp.ones((4, 4))} for n in ("q_proj", "o_proj")},
              "mlp": {"up_proj": {"kernel": jnp.ones((4, 4))}}}
    key = jax.random.PRNGKey(0)
    with pytest.warns(UserWarning, match=r"names \['down', 'gate', 'k', 'v'\], which no layer of these params has: "
                                         r"3 layers are adapted \(o_proj, q_proj, up_proj\)"):
        dj.inject(params, dj.AdapterConfig(targets=r"attn/(q|k|v|o)_proj$|mlp/(gate|up|down)_proj$", rank=2), key)
    with pytest.warns(UserWarning, match=r"names \['k_proj', 'v_proj'\]"):
        dj.inject(params, dj.AdapterConfig(targets=r"(q_proj|k_proj|v_proj)$", rank=2), key)
    with pytest.warns(UserWarning, match=r"names \['qkv_proj'\]"):  # the fused name alone, no part of it there
        dj.inject(params, dj.AdapterConfig(targets=r"(o_proj|qkv_proj)$", rank=2), key)
    with warnings.catch_warnings():  # every name it spells is there: nothing to report
        warnings.simplefilter("error")
        dj.inject(params, dj.AdapterConfig(targets=r"attn/(q|o)_proj$|up_proj$", rank=2), key)
        # a fused name beside its parts (Phi-3's qkv_proj, gate_up_proj) serves the other layout: not reported
        dj.inject(params, dj.AdapterConfig(targets=r"attn/(q_proj|qkv_proj)$|mlp/(up_proj|gate_up_proj)$", rank=2), key)
        fused = {"attn": {"qkv_proj": {"kernel": jnp.ones((4, 12))}}}
        dj.inject(fused, dj.AdapterConfig(targets=r"attn/(q_proj|k_proj|v_proj|qkv_proj)$", rank=2), key)
