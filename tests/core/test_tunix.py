"""A model we did not write: tunix's Qwen3 (Flax NNX; its attention projections are tunix ``Einsum`` modules
holding ``w``, its MLP ``nnx.Linear``). LoRA on all seven projections through ``decomp_jax.nnx`` with
``kernel_leaf``: every projection adapted, a no-op at init, tunix's own forward over our factors equals
the same LoRA written as dense kernels ``w + s A B`` in ``w``'s layout, only the factors train; the MoE
variant's bare expert tensors are refused by name.

tunix is an optional dependency (``requirements/tunix.txt``, installed without its dependencies: it pins
``safetensors<0.8``, which transformers 5 does not allow); ``.ci/run`` installs it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import decomp_jax as dj
from decomp_jax import nnx as dnnx

qwen3 = pytest.importorskip("tunix.models.qwen3.model",
                            reason="tunix is not installed (pip install --no-deps -r requirements/tunix.txt)")

SEVEN = r"attn/(q|k|v|o)_proj$|mlp/(gate|up|down)_proj$"
ATTENTION = r"attn/(q|k|v|o)_proj$"


def _config(**extra):
    return qwen3.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                             num_kv_heads=2, rope_theta=10000, norm_eps=1e-6, **extra)


def _model(seed=0):
    model = qwen3.Qwen3(_config(), rngs=nnx.Rngs(seed))
    # tunix starts the MLP kernels at zero: random weights, so every projection matters
    for i, (path, value) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        value[...] = 0.2 * jax.random.normal(jax.random.PRNGKey(100 + i), value.shape)
    return model


def _inputs():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))
    return tokens, positions, mask


def _logits(model, tokens, positions, mask):
    return model(tokens, positions, None, mask)[0]


def test_lora_on_all_seven_projections_through_tunix_forward():
    tokens, positions, mask = _inputs()
    model = _model()
    base = _logits(model, tokens, positions, mask)
    cfg = dj.AdapterConfig(method="lora", targets=SEVEN, rank=4, alpha=8, kernel_leaf={ATTENTION: "w"})
    with pytest.raises(dj.ConfigError, match=r"attn/q_proj' \(Einsum holding w \(32, 4, 8\)\).*kernel_leaf"):
        dnnx.inject(_model(), cfg.replace(kernel_leaf={}), jax.random.PRNGKey(0))  # without it: refused, not skipped
    dnnx.inject(model, cfg, jax.random.PRNGKey(0))
    adapted = [p for p, _ in nnx.to_flat_state(nnx.state(model, dnnx.AdapterParam)) if p[-1] == "lora_a"]
    assert len(adapted) == 14, adapted  # 2 layers x 7 projections
    np.testing.assert_allclose(_logits(model, tokens, positions, mask), base, atol=1e-5)  # a no-op at init
    trainable = nnx.state(model, dnnx.AdapterParam)
    nnx.update(model, jax.tree.map(lambda v: v + 0.1 * jnp.cos(jnp.arange(v.size).reshape(v.shape)), trainable))
    ours = _logits(model, tokens, positions, mask)
    assert float(jnp.abs(ours - base).max()) > 1e-2
    dense = _model()  # the same LoRA as dense kernels, written independently of decomp_jax
    for layer, plain in zip(model.layers, dense.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mine, theirs = getattr(layer.attn, name), getattr(plain.attn, name)
            w = np.asarray(theirs.w[...])
            n_in = 2 if name == "o_proj" else 1  # o_proj: "BTNH,NHD->BTD"; the others "BTD,DNH->BTNH"
            delta = 2.0 * np.asarray(mine.lora_a[...]) @ np.asarray(mine.lora_b[...])  # alpha / r = 2
            assert delta.shape == (int(np.prod(w.shape[:n_in])), int(np.prod(w.shape[n_in:])))
            theirs.w[...] = w + delta.reshape(w.shape)
        for name in ("gate_proj", "up_proj", "down_proj"):
            mine, theirs = getattr(layer.mlp, name), getattr(plain.mlp, name)
            theirs.kernel[...] = theirs.kernel[...] + 2.0 * mine.lora_a[...] @ mine.lora_b[...]
    reference = _logits(dense, tokens, positions, mask)
    diff = float(jnp.abs(ours - reference).max())
    print(f"tunix Qwen3, LoRA on 14 projections: our factors vs dense w + s A B: {diff:.2e}")
    assert diff <= 1e-5
    np.testing.assert_allclose(_logits(dnnx.merge(model, cfg), tokens, positions, mask), ours, atol=1e-5)


def test_only_the_factors_train():
    tokens, positions, mask = _inputs()
    model = dnnx.inject(_model(), dj.AdapterConfig(method="lora", targets=SEVEN, rank=4, alpha=8,
                                                   kernel_leaf={ATTENTION: "w"}), jax.random.PRNGKey(0))
    graphdef, trainable, rest = nnx.split(model, dnnx.AdapterParam, ...)

    def loss(trainable):
        logits = _logits(nnx.merge(graphdef, trainable, rest), tokens, positions, mask)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))

    opt = optax.adam(1e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state):
        value, grads = jax.value_and_grad(loss)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return value, optax.apply_updates(trainable, updates), state

    losses = []
    for _ in range(4):
        value, trainable, state = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 1e-3, losses
    frozen = nnx.to_pure_dict(nnx.split(model, dnnx.AdapterParam, ...)[2])
    jax.tree.map(np.testing.assert_array_equal, frozen, nnx.to_pure_dict(rest))


def test_moe_experts_held_as_bare_tensors_are_refused_by_name():
    model = qwen3.Qwen3(_config(num_experts=4, num_experts_per_tok=2), rngs=nnx.Rngs(0))
    with pytest.raises(dj.ConfigError, match=r"mlp' \(MoELayer holding .*gate_proj \(4, 32, 48\)"):
        dnnx.inject(model, dj.AdapterConfig(targets=r"mlp$|mlp/(gate|up|down)_proj$", rank=2), jax.random.PRNGKey(0))
