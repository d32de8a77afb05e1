"""Long rows' memory in our decoder: the MLP in tiles of tokens (``mlp_chunk``) and the scanned layers as
rematerialised segments (``remat_segments``) give the numbers of the plain model (outputs, gradients, LoRA
training, decoding with a cache), keep the parameter layout, hold less memory, and refuse settings that
cannot work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import decomp_jax as dj
from decomp_jax.errors import ConfigError
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache, init_params, stack_layers
from decomp_jax.models.mlp import load_balancing_loss, router_logits

BASE = dict(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, scan_layers=True, remat=True)
FAMILIES = {
    "llama": {},
    "phi3-like": dict(fused_projections=True, model_type="phi3"),  # one gate_up_proj kernel
    "gemma2-like": dict(model_type="gemma2", sandwich_norms=True, norm_plus_one=True, hidden_act="gelu_pytorch_tanh",
                        sliding_window=4, layer_types=("sliding_attention", "full_attention") * 2,
                        attn_logit_softcapping=20.0),
    "smollm3-like": dict(model_type="smollm3", no_rope_layers=(1, 0, 1, 0), sliding_window=4, attention_bias=True,
                         mlp_bias=True, layer_types=("full_attention", "sliding_attention") * 2),  # NoPE layers slide
    "qwen2-moe-like": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                           shared_expert_intermediate_size=24),  # the shared expert is a tiled dense MLP
}
LONG = dict(mlp_chunk=5, remat_segments=2)  # 5 divides no row count here: the last tile is padded


def _perturb(params):
    return jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + 1.0), params)


def _setup(family):
    config = LlamaConfig(**BASE, **FAMILIES[family])
    unrolled = dataclasses.replace(config, scan_layers=False, remat=False)
    params = stack_layers(_perturb(init_params(unrolled, jax.random.PRNGKey(0))), config.num_hidden_layers)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, config.vocab_size)
    mask = jnp.ones((2, 11), jnp.int32).at[1, :3].set(0)
    return config, params, ids, mask


def _maxdiff(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("options", [dict(mlp_chunk=5), dict(remat_segments=2), LONG], ids=["tiles", "segments", "both"])
def test_the_model_gives_the_same_numbers(family, options):
    """Logits and full fine-tuning gradients against the plain scanned + remat model; with experts, the
    routers' logits and their load-balancing loss too."""
    config, params, ids, mask = _setup(family)

    def run(cfg):
        model = LlamaForCausalLM(cfg)

        def loss(p):
            logits, state = model.apply({"params": p}, ids, mask, mutable=["intermediates"])
            value = jnp.mean(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2)
            if cfg.num_experts:
                value = value + load_balancing_loss(router_logits(state["intermediates"]), 2, mask)
            return value

        return jax.jit(jax.value_and_grad(loss))(params)

    (ref, gref), (out, gout) = run(config), run(dataclasses.replace(config, **options))
    print(f"{family} {options}: loss {float(ref):.6f} vs {float(out):.6f}, gradients within {_maxdiff(gref, gout):.2e}")
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-6)
    assert _maxdiff(gref, gout) <= 1e-5
    # one row (its positions tiled as rows, without transposes)
    one = [LlamaForCausalLM(c).apply({"params": params}, ids[:1]) for c in (config, dataclasses.replace(config, **options))]
    assert _maxdiff(*one) <= 1e-5


def test_the_parameters_keep_their_layout():
    """The segmented, tiled model initialises the tree the plain scanned one does: ``(L, ...)`` leaves under
    model/layers, the MLP's kernels under their names (no extra scope for the tiles or the segments)."""
    config = LlamaConfig(**BASE)
    ids = jnp.zeros((1, 12), jnp.int32)
    shapes = [jax.tree.map(jnp.shape, jax.eval_shape(lambda k, c=c: LlamaForCausalLM(c).init(k, ids), jax.random.PRNGKey(0)))
              for c in (config, dataclasses.replace(config, **LONG))]
    assert shapes[0] == shapes[1]
    assert shapes[1]["params"]["model"]["layers"]["mlp"]["gate_proj"]["kernel"] == (4, 16, 48)
    values = [LlamaForCausalLM(c).init(jax.random.PRNGKey(0), ids) for c in (config, dataclasses.replace(config, **LONG))]
    jax.tree.map(np.testing.assert_array_equal, *values)  # the same initial values too


def test_lora_on_the_tiled_mlp_trains_as_the_plain_model():
    """LoRA on the MLP's three projections and q, factored execution inside the tiles and segments: three
    training steps give the plain model's losses and factors."""
    config, params, ids, _ = _setup("llama")
    cfg = dj.AdapterConfig(method="lora", targets=r"self_attn/q_proj$|mlp/(gate|up|down)_proj$", rank=4,
                           stacked="layers")
    injected = dj.inject(params, cfg, jax.random.PRNGKey(2))

    def train(model_config):
        apply = dj.adapt(LlamaForCausalLM(model_config).apply, cfg)

        def loss(p, batch, rng):
            logits = apply({"params": p}, batch["ids"][:, :-1])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["ids"][:, 1:, None], -1)
            return jnp.mean(nll), {}

        trainable, buffers, frozen = dj.partition(injected, cfg)
        opt = optax.adam(1e-2)
        state = dj.init_state(trainable, opt, jax.random.PRNGKey(3), buffers=buffers, frozen=frozen)
        step = dj.make_train_step(loss, opt, cfg)
        losses = []
        for _ in range(3):
            state, metrics = step(state, frozen, {"ids": ids})
            losses.append(float(metrics["loss"]))
        return np.array(losses), state.trainable

    (ref, pref), (out, pout) = train(config), train(dataclasses.replace(config, **LONG))
    print("LoRA losses", ref, "tiled + segmented", out, "factors within", _maxdiff(pref, pout))
    assert ref[-1] < ref[0]
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert _maxdiff(pref, pout) <= 1e-6


def test_decoding_with_a_cache_under_segments():
    """Prefill and two cached decoding steps of the segmented, tiled model give the plain model's logits
    (the cache's layer axis goes through the segments and back)."""
    config, params, ids, _ = _setup("llama")
    mask = jnp.ones((2, 11), jnp.int32)
    plain = LlamaForCausalLM(config).apply({"params": params}, ids, mask)
    model = LlamaForCausalLM(dataclasses.replace(config, **LONG))
    cache = init_cache(model.config, 2, 11)
    pre, cache = model.apply({"params": params}, ids[:, :9], mask, cache=cache, cache_index=0)
    assert _maxdiff(pre, plain[:, :9]) <= 1e-5
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, init_cache(config, 2, 11))
    for i in (9, 10):
        step, cache = model.apply({"params": params}, ids[:, i:i + 1], mask, cache=cache, cache_index=i)
        assert _maxdiff(step[:, 0], plain[:, i]) <= 1e-5


def test_long_rows_hold_less_memory():
    """XLA's estimate of the temporaries of a LoRA gradient at 2048 tokens (16 layers of width 64, MLP 4x wide,
    chunked attention): tiles of 256 tokens drop more than two row-wide MLP activations (2 MiB each); 4 segments
    keep 4 segment inputs + 4 layer inputs instead of 16 layer inputs (0.5 MiB each), at least half of that
    4 MiB saved at 0.9 of it (each layer slices its own kernels from the stack: no segment's copy of them); both
    together hold less than either."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, scan_layers=True,
                         remat=True, attention="chunked", attention_chunk=256)
    unrolled = dataclasses.replace(config, scan_layers=False, remat=False)
    params = jax.eval_shape(lambda k: stack_layers(init_params(unrolled, k), 16), jax.random.PRNGKey(0))
    cfg = dj.AdapterConfig(method="lora", targets=r"self_attn/q_proj$|mlp/down_proj$", rank=4, stacked="layers")
    injected = jax.eval_shape(lambda p: dj.inject(p, cfg, jax.random.PRNGKey(2)), params)
    trainable, _, frozen = dj.partition(injected, cfg)
    ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

    def temporaries(**options):
        apply = dj.adapt(LlamaForCausalLM(dataclasses.replace(config, **options)).apply, cfg)
        loss = lambda t, f, i: jnp.mean(apply({"params": dj.combine(t, f)}, i, logits_at=jnp.zeros((1, 8), jnp.int32)))  # noqa: E731
        compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    plain, tiles, segments, both = (temporaries(), temporaries(mlp_chunk=256), temporaries(remat_segments=4),
                                    temporaries(mlp_chunk=256, remat_segments=4))
    print(f"temporaries MiB: plain {plain:.1f}, tiles {tiles:.1f} ({tiles / plain:.2f}x), segments {segments:.1f} "
          f"({segments / plain:.2f}x), both {both:.1f} ({both / plain:.2f}x)")
    row = 2048 * 64 * 4 / 2**20
    assert plain - tiles > 2 * 4 * row and plain - segments > 0.9 * 8 * row and both < min(tiles, segments)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"mlp_chunk=0: a number of positions >= 1"):
        LlamaConfig(**BASE, mlp_chunk=0)
    with pytest.raises(ValueError, match=r"remat_segments=3 does not divide num_hidden_layers=4; choose one of \[2\]"):
        LlamaConfig(**BASE, remat_segments=3)
    with pytest.raises(ValueError, match=r"needs scan_layers and remat"):
        LlamaConfig(**dict(BASE, remat=False), remat_segments=2)


def test_the_runner_refuses_them_where_they_cannot_apply(tmp_path):
    from decomp_jax.app.experiment import load_config
    from decomp_jax.models.causal_lm import load_causal_lm
    from helpers import REPO

    with pytest.raises(ConfigError, match=r"model.mlp_chunk apply to our decoder LLM"):
        load_config(REPO / "configs" / "quickstart.yaml", ["model.mlp_chunk=256"])
    cpu = REPO / "configs" / "commonsense" / "smollm2_lora_cpu.yaml"
    with pytest.raises(ConfigError, match=r"train.remat_segments=5 splits the rematerialised layers.*train.remat: true"):
        load_config(cpu, ["train.remat_segments=5", "train.remat=false"])
    with pytest.raises(ConfigError, match=r"set model.scan_layers: true too"):
        load_config(cpu, ["train.remat_segments=5", "train.remat=true", "model.scan_layers=false"])
    with pytest.raises(ConfigError, match=r"model.mlp_chunk=0: a number of positions >= 1"):
        load_config(cpu, ["model.mlp_chunk=0"])
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match=r"our GPT-2 \(1024 positions at most\) has neither"):
        load_causal_lm(str(tmp_path), mlp_chunk=256)
