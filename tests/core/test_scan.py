"""Scanned layers: our Llama with ``scan_layers`` (params with a leading layer axis) against the unrolled
model, for inject / factored and merged execution / merge-unmerge / penalty / training / remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decomp_jax.core.tree import scan_roots, unstack_view
from decomp_jax.errors import ConfigError
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache, init_params, stack_layers, unstack_layers
import decomp_jax as dj

CFG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
SCFG = dataclasses.replace(CFG, scan_layers=True)
TARGETS = r"self_attn/(q_proj|v_proj)$|mlp/down_proj$"
# dora, ssb and pissa also run scanned == unrolled == merged on GPT-2's LM (tests/models/test_gpt2_lm.py, CORE
# methods) and pissa over a quantized scanned Llama (tests/test_quant.py): slow here
METHODS = ["lora", "adalora", "houlsby"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("dora", "ssb", "pissa")]


@pytest.fixture(scope="module")
def base():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, CFG.vocab_size)


def _maxdiff(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _perturb(params):
    """Non-initial values (every float leaf moved), so factored/merged comparisons are not trivial."""
    return jax.tree.map(lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + 1.0)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def test_scanned_llama_equals_unrolled(base, ids):
    stacked = stack_layers(base, CFG.num_hidden_layers)
    q = stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 16, 16)
    fresh = jax.eval_shape(lambda k: init_params(SCFG, k), jax.random.PRNGKey(0))  # the scanned model's own init: same tree
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)
    assert _maxdiff(unstack_layers(stacked), base) == 0.0
    mask = jnp.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    unrolled = LlamaForCausalLM(CFG).apply({"params": base}, ids, mask)
    scanned = LlamaForCausalLM(SCFG).apply({"params": stacked}, ids, mask)
    print("scanned vs unrolled logits:", _maxdiff(scanned, unrolled))
    assert _maxdiff(scanned, unrolled) <= 1e-5
    # the KV cache works scanned: prefill 5 tokens then decode the 6th and 7th, against the no-cache logits
    cache = init_cache(SCFG, 2, 7)
    model = LlamaForCausalLM(SCFG)
    pre, cache = model.apply({"params": stacked}, ids[:, :5], mask, cache=cache, cache_index=0)
    real = mask[:, :5, None] > 0  # the padding queries' logits are not meaningful (with or without a cache)
    assert _maxdiff(jnp.where(real, pre, 0), jnp.where(real, unrolled[:, :5], 0)) <= 1e-5
    for i in (5, 6):
        step, cache = model.apply({"params": stacked}, ids[:, i:i + 1], mask, cache=cache, cache_index=i)
        assert _maxdiff(step[:, 0], unrolled[:, i]) <= 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_methods_on_stacked_layers(name, base, ids):
    cfg = dj.AdapterConfig(method=name, targets=TARGETS, rank=4)
    stacked = stack_layers(base)
    key = jax.random.PRNGKey(2)
    injected = dj.inject(stacked, cfg, key)
    assert injected["model"]["layers"]["self_attn"]["q_proj"][dj.methods.get(name).factor_names[0]].shape[0] == 2
    # layer i's factors are the unrolled layer i's (keys of the unrolled paths); PiSSA's residual kernels too
    assert _maxdiff(injected, stack_layers(dj.inject(base, cfg, key))) == 0.0
    unrolled = _perturb(dj.inject(base, cfg, key))
    params = stack_layers(unrolled)
    mask = dj.trainable_mask(params, cfg)
    assert jax.tree.leaves(mask) and _maxdiff(mask, stack_layers(dj.trainable_mask(unrolled, cfg))) == 0
    assert dj.count_params(dj.split(params, mask)[0]) == dj.count_params(dj.split(unrolled, dj.trainable_mask(unrolled, cfg))[0])
    # factored execution inside nn.scan (the interceptor sees each layer's slice)
    ref = dj.adapt(LlamaForCausalLM(CFG).apply, cfg)({"params": unrolled}, ids)
    factored = dj.adapt(LlamaForCausalLM(SCFG).apply, cfg)({"params": params}, ids)
    assert _maxdiff(factored, ref) <= 1e-5
    if dj.methods.get(name).mergeable:
        merged = dj.merge(params, cfg)
        assert _maxdiff(merged, stack_layers(dj.merge(unrolled, cfg))) <= 1e-6
        assert _maxdiff(LlamaForCausalLM(SCFG).apply({"params": merged}, ids), factored) <= 1e-5
        if dj.methods.get(name).unmaterialize is not None:
            back = dj.unmerge(merged, dj.adapter_leaves(params, cfg), cfg)
            assert _maxdiff(back, params) <= 1e-5
    else:
        with pytest.raises(ConfigError, match="not mergeable"):
            dj.merge(params, cfg)
    if {"lora_a", "lora_b"} <= set(dj.methods.get(name).factor_names):
        mpc = cfg if name == "adalora" else cfg.replace(mpc="mpc_o")
        p_s, p_u = float(dj.penalty(params, mpc)), float(dj.penalty(unrolled, mpc))
        assert p_u > 0 and abs(p_s - p_u) <= 1e-6 * p_u


def _lm_loss(model, cfg):
    apply = dj.adapt(model.apply, cfg)

    def loss(params, batch, rng):
        logits = apply({"params": params}, batch["ids"][:, :-1])
        labels = batch["ids"][:, 1:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)
        return jnp.mean(nll), {}

    return loss


def _train(params, model, cfg, ids, steps=4):
    schedule = dj.make_schedule(cfg, steps)
    trainable, buffers, frozen = dj.partition(params, cfg)
    opt = optax.adam(1e-2)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(3), buffers=buffers, schedule=schedule, frozen=frozen)
    step = dj.make_train_step(_lm_loss(model, cfg), opt, cfg, schedule=schedule)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, {"ids": ids})
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.mark.parametrize("name", ["adalora"])
def test_train_steps_scanned_equal_unrolled(name, base, ids):
    """AdaLoRA (LoRA factors with lora_e, its MPC_o term and a stateful schedule) covers LoRA's path: its
    schedule (budget masking from step 1, every step) runs on the unrolled view."""
    options = {"t_init": 0.0, "t_final": 0.25, "interval": 1, "target_rank": 2} if name == "adalora" else {}
    cfg = dj.AdapterConfig(method=name, targets=TARGETS, rank=4, options=options,
                           **({"mpc": "mpc_o"} if name == "lora" else {}))
    unrolled = dj.inject(base, cfg, jax.random.PRNGKey(2))
    losses_u, state_u = _train(unrolled, LlamaForCausalLM(CFG), cfg, ids)
    losses_s, state_s = _train(stack_layers(unrolled), LlamaForCausalLM(SCFG), cfg, ids)
    print(name, "losses", losses_u, "max diff", np.abs(losses_s - losses_u).max())
    assert losses_u[-1] < losses_u[0]
    np.testing.assert_allclose(losses_s, losses_u, atol=1e-5, rtol=0)
    assert _maxdiff(state_s.trainable, stack_layers(state_u.trainable)) <= 1e-5
    if name == "adalora":  # the schedule's state is the unrolled run's; the masked lora_e agree
        assert _maxdiff(state_s.method_state, state_u.method_state) <= 1e-5
        e = state_s.trainable["model"]["layers"]["self_attn"]["q_proj"]["lora_e"]
        assert int(jnp.sum(e == 0)) > 0


def test_remat_scanned_and_unrolled(base, ids):
    cfg = dj.AdapterConfig(method="lora", targets=TARGETS, rank=4)
    unrolled = _perturb(dj.inject(base, cfg, jax.random.PRNGKey(2)))
    trainable, frozen = dj.split(unrolled, dj.trainable_mask(unrolled, cfg))
    batch = {"ids": ids}

    def grads(config, stack):
        loss = _lm_loss(LlamaForCausalLM(config), cfg)
        t, f = (stack_layers(trainable), stack_layers(frozen)) if stack else (trainable, frozen)
        value, g = jax.jit(jax.value_and_grad(lambda t: loss(dj.combine(t, f), batch, None)[0]))(t)
        return value, (unstack_layers(g) if stack else g)

    ref_loss, ref_grads = grads(CFG, False)
    for config in (dataclasses.replace(SCFG, remat=True),):  # nn.scan over nn.remat(LlamaDecoderLayer)
        value, g = grads(config, config.scan_layers)
        assert abs(float(value) - float(ref_loss)) <= 1e-5
        assert _maxdiff(g, ref_grads) <= 1e-5


def test_stacked_refusals(base):
    stacked = stack_layers(base)
    with pytest.raises(ConfigError, match="stacked"):
        dj.inject(stacked, dj.AdapterConfig(method="lora", targets=TARGETS, stacked=None), jax.random.PRNGKey(0))
    general = {"attn": {"query": {"kernel": jnp.zeros((16, 4, 4))}}}  # a DenseGeneral (embed, heads, head_dim)
    with pytest.raises(ConfigError, match="DenseGeneral"):
        dj.inject(general, dj.AdapterConfig(method="lora", targets="query", rank=2), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="stacked"):
        dj.AdapterConfig(stacked="model/layers")


def test_peft_export_of_stacked_layers(base, tmp_path):
    from safetensors.numpy import load_file

    from decomp_jax.interop.peft import export_peft

    cfg = dj.AdapterConfig(method="lora", targets=TARGETS, rank=4)
    unrolled = _perturb(dj.inject(base, cfg, jax.random.PRNGKey(2)))
    stacked = stack_layers(unrolled)
    assert scan_roots(stacked, cfg) == {("model", "layers")}
    assert _maxdiff(unstack_view(stacked, scan_roots(stacked, cfg)), unrolled) == 0.0
    export_peft(unrolled, cfg, tmp_path / "u", base_model_name_or_path=None, arch="llama")
    export_peft(stacked, cfg, tmp_path / "s", base_model_name_or_path=None, arch="llama")
    u, s = load_file(str(tmp_path / "u" / "adapter_model.safetensors")), load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
    assert sorted(u) == sorted(s) and any(".layers.1." in k for k in s)
    for k in u:
        np.testing.assert_array_equal(s[k], u[k])


@pytest.mark.parametrize("name", ["prefix_tuning"])
def test_prompt_methods_on_scanned_llama(name, base, ids):
    """The prefix keys/values (num_layers, ...) are scanned over with the layers."""
    cfg = dj.AdapterConfig(method=name, options={"num_virtual_tokens": 3})
    unrolled = dj.inject(base, cfg, jax.random.PRNGKey(4))
    stacked = dj.inject(stack_layers(base), cfg, jax.random.PRNGKey(4))
    assert _maxdiff(stacked[name], unrolled[name]) == 0.0
    ref = dj.adapt(LlamaForCausalLM(CFG).apply, cfg)({"params": unrolled}, ids)
    out = dj.adapt(LlamaForCausalLM(SCFG).apply, cfg)({"params": stacked}, ids)
    assert _maxdiff(out, ref) <= 1e-5


def test_lora_dash_search_on_stacked_layers(base):
    """LoRA-Dash's direction search (its schedule at step T) runs on the unrolled view: same directions."""
    cfg = dj.AdapterConfig(method="lora_dash", targets=r"q_proj$", rank=4, options={"warmup_steps": 1, "dash_k": 2})
    unrolled = _perturb(dj.inject(base, cfg, jax.random.PRNGKey(2)))
    stacked = stack_layers(unrolled)
    schedule = dj.make_schedule(cfg, 3)
    grads = jax.tree.map(jnp.zeros_like, dj.partition(unrolled, cfg)[0])
    update = jax.jit(schedule.update)
    _, new_u = update(schedule.init(unrolled), jnp.int32(1), unrolled, grads)
    _, new_s = update(schedule.init(stacked), jnp.int32(1), stacked, stack_layers(grads))
    assert _maxdiff(new_s, stack_layers(new_u)) <= 1e-5
    assert _maxdiff(new_u, unrolled) > 0  # the search wrote new directions
