"""Mixed precision: float32 factors (AdapterConfig.factor_dtype) over a bfloat16 frozen base."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest

from decomp_jax.errors import ConfigError
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, cast_params, init_params, stack_layers
import decomp_jax as dj

CFG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
TARGETS = r"self_attn/(q_proj|v_proj)$|mlp/down_proj$"


_BASE = []


def _base():
    """The float32 random params (made once)."""
    if not _BASE:
        _BASE.append(jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0)))
    return _BASE[0]


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


def test_param_dtype_creates_params_in_that_dtype():
    params = jax.eval_shape(lambda k: init_params(dataclasses.replace(CFG, param_dtype="bfloat16"), k), jax.random.PRNGKey(0))
    assert _dtypes(params) == {"bfloat16"}
    assert _dtypes(jax.eval_shape(lambda k: init_params(CFG, k), jax.random.PRNGKey(0))) == {"float32"}
    assert _dtypes(cast_params(_base())) == {"bfloat16"}


@pytest.mark.parametrize("name", ["lora", "pissa", "ssb"])
def test_factor_dtype_over_bf16_base(name):
    base = cast_params(_base())
    cfg = dj.AdapterConfig(method=name, targets=TARGETS, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]
    assert q["kernel"].dtype == jnp.bfloat16  # PiSSA's residual kernel keeps the base dtype
    assert all(q[n].dtype == jnp.float32 for n in dj.methods.get(name).factor_names)
    # the factors are those of the float32 kernel's float32 init (the kernel's values are bf16-exact)
    ref = dj.inject(jax.tree.map(lambda x: x.astype(jnp.float32), base), cfg, jax.random.PRNGKey(1))
    for n in dj.methods.get(name).factor_names:
        assert float(jnp.max(jnp.abs(q[n] - ref["model"]["layers_0"]["self_attn"]["q_proj"][n]))) <= 1e-6
    merged = dj.merge(params, cfg)
    assert merged["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    half = dj.inject(_base(), cfg.replace(factor_dtype="bfloat16"), jax.random.PRNGKey(1))
    assert half["model"]["layers_0"]["self_attn"]["q_proj"][dj.methods.get(name).factor_names[0]].dtype == jnp.bfloat16


def test_bf16_base_float32_compute_forward():
    """dtype float32 over a bf16 base: the Dense layers upcast the bf16 kernels; the factored output equals
    the float32 model's with the same (bf16-exact) base to float32 rounding."""
    base16 = cast_params(_base())
    cfg = dj.AdapterConfig(method="lora", targets=TARGETS, rank=4)
    params = jax.tree.map(lambda x: x + 0.01 if x.dtype == jnp.float32 else x, dj.inject(base16, cfg, jax.random.PRNGKey(1)))
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, CFG.vocab_size)
    apply = dj.adapt(LlamaForCausalLM(CFG).apply, cfg)
    out = apply({"params": params}, ids)
    ref = apply({"params": jax.tree.map(lambda x: x.astype(jnp.float32), params)}, ids)
    assert out.dtype == jnp.float32 and float(jnp.max(jnp.abs(out - ref))) <= 1e-5


@pytest.mark.parametrize("compute", ["bfloat16"])
def test_bf16_base_float32_factors_train(compute):
    """A bf16 frozen base with float32 LoRA factors trains (scanned); factors and Adam moments stay float32.
    The layers compute in the model's ``dtype``: float32 (the bf16 kernels are upcast) or bfloat16 (the
    float32 factors are cast down in the forward pass; their gradients come back float32)."""
    config = dataclasses.replace(CFG, dtype=compute, scan_layers=True)
    base = stack_layers(cast_params(_base()))
    cfg = dj.AdapterConfig(method="lora", targets=TARGETS, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    assert _dtypes(trainable) == {"float32"} and _dtypes(frozen) == {"bfloat16"}
    apply = dj.adapt(LlamaForCausalLM(config).apply, cfg)

    def loss(p, batch, rng):
        logits = apply({"params": p}, batch["ids"][:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["ids"][:, 1:, None], -1)
        return jnp.mean(nll), {}

    opt = optax.adam(3e-2)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(2))
    step = dj.make_train_step(loss, opt, cfg)
    batch = {"ids": jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, CFG.vocab_size)}
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    print(compute, "losses", losses)
    assert losses[-1] < losses[0] - 0.01
    assert _dtypes(state.trainable) == {"float32"}
    assert _dtypes([x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]) == {"float32"}


def test_factor_dtype_checked():
    with pytest.raises(ConfigError, match="factor_dtype"):
        dj.AdapterConfig(factor_dtype="float8")
