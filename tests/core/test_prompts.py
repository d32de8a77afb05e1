"""Prompt tuning and prefix tuning on our Flax Llama (decomp_jax.core.prompts, methods/prompt.py).

References: the manual concatenation through ``inputs_embeds`` (prompt tuning), prompt tuning's
own virtual-token keys/values used as a prefix (prefix tuning), and PyTorch PEFT on transformers'
``LlamaForCausalLM`` with the same weights (both methods, prefix projection included).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax.core import methods
from decomp_jax.core.inject import trainable_count
from decomp_jax.core.prompts import fold_prefix
from decomp_jax.models.generation import generate
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache, init_params
import decomp_jax as dj

CONFIG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.1,
                     eos_token_id=2, pad_token_id=0)
KV_DIM = CONFIG.num_key_value_heads * CONFIG.head_dim  # 16
N = 5
PROMPT = dj.AdapterConfig(method="prompt_tuning", options={"num_virtual_tokens": N, "init": "random"})
PREFIX = dj.AdapterConfig(method="prefix_tuning", options={"num_virtual_tokens": N})
PROJECTED = dj.AdapterConfig(method="prefix_tuning",
                             options={"num_virtual_tokens": N, "prefix_projection": True, "encoder_hidden_size": 24})
P_MLP = dj.AdapterConfig(method="p_tuning", options={"num_virtual_tokens": N, "encoder_hidden_size": 24})
P_LSTM = dj.AdapterConfig(method="p_tuning", options={"num_virtual_tokens": N, "encoder_hidden_size": 12,
                                                      "encoder_reparameterization_type": "LSTM"})
ALL = {"prompt": PROMPT, "prefix": PREFIX, "projected": PROJECTED, "p_mlp": P_MLP, "p_lstm": P_LSTM}
# training and generation run p-tuning with -m slow only (its encoders against PEFT and export, always:
# past the encoder, p-tuning runs prompt tuning's path)
MOST = [pytest.param(w, marks=pytest.mark.slow) if w.startswith("p_") else w for w in ALL]
TOL = 2e-5


@pytest.fixture(scope="module")
def llama():
    return LlamaForCausalLM(CONFIG), init_params(CONFIG, jax.random.PRNGKey(0))


def batch(length=9, seed=0):
    """Row 0 full, row 1 left-padded by 3, row 2 right-padded by 2."""
    ids = np.random.default_rng(seed).integers(3, CONFIG.vocab_size, size=(3, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    ids[mask == 0] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def randomized(params, cfg, seed=7):
    """The method's leaves replaced by random ones of a larger scale (not the init)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    sub = jax.tree.map(lambda x: 0.5 * jax.random.normal(next(keys), x.shape, x.dtype), params[cfg.method])
    return {**params, cfg.method: sub}


def valid_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) > 0].max())


# --- registry, injection, counts ----------------------------------------------------------------------

def test_registry_kind():
    assert {"prompt_tuning", "prefix_tuning", "p_tuning"} == set(methods.names("prompt"))
    assert not {"prompt_tuning", "prefix_tuning", "p_tuning"} & set(methods.names())  # per-layer methods only by default
    assert {"prompt_tuning", "prefix_tuning", "lora"} <= set(methods.names(None))
    for name in ("prompt_tuning", "prefix_tuning"):
        m = methods.get(name)
        assert m.kind == "prompt" and m.family == "reconstruction" and not m.mergeable and m.formula
    assert methods.get("lora").kind == "layer"


@pytest.mark.parametrize("which", ALL)
def test_inject_adds_exactly_the_subtree(which, llama):
    _, base = llama
    cfg = ALL[which].replace(targets="nothing matches this")  # targets is not used by prompt methods
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    shapes = {k: v.shape for k, v in flatten_dict(params[cfg.method]).items()}
    expected = {
        "prompt": {("embedding",): (N, 32)},
        "prefix": {("key",): (2, N, KV_DIM), ("value",): (2, N, KV_DIM)},
        "projected": {("embedding",): (N, KV_DIM), ("dense_in", "kernel"): (KV_DIM, 24), ("dense_in", "bias"): (24,),
                      ("dense_out", "kernel"): (24, 2 * 2 * KV_DIM), ("dense_out", "bias"): (2 * 2 * KV_DIM,)},
        "p_mlp": {("embedding",): (N, 32), ("mlp_0", "kernel"): (32, 24), ("mlp_0", "bias"): (24,),
                  ("mlp_1", "kernel"): (24, 24), ("mlp_1", "bias"): (24,), ("mlp_2", "kernel"): (24, 32),
                  ("mlp_2", "bias"): (32,)},
        "p_lstm": {("embedding",): (N, 32), **{(f"lstm_{l}_{d}", w): s for l in (0, 1) for d in ("forward", "backward")
                                               for w, s in (("w_ih", (32 if l == 0 else 24, 48)), ("w_hh", (12, 48)),
                                                            ("b_ih", (48,)), ("b_hh", (48,)))},
                   ("mlp_0", "kernel"): (24, 24), ("mlp_0", "bias"): (24,), ("mlp_1", "kernel"): (24, 32),
                   ("mlp_1", "bias"): (32,)},
    }[which]
    assert shapes == expected
    rest = {k: v for k, v in params.items() if k != cfg.method}
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, rest, dict(base)))  # base leaves untouched
    count = {"prompt": N * 32, "prefix": 2 * 2 * N * KV_DIM,
             "projected": N * KV_DIM + KV_DIM * 24 + 24 + 24 * 4 * KV_DIM + 4 * KV_DIM,
             "p_mlp": N * 32 + (32 * 24 + 24) + (24 * 24 + 24) + (24 * 32 + 32),
             "p_lstm": N * 32 + 2 * (32 * 48 + 12 * 48 + 96) + 2 * (24 * 48 + 12 * 48 + 96) + (24 * 24 + 24) + (24 * 32 + 32),
             }[which]
    trainable, buffers, frozen = dj.partition(params, cfg)
    assert list(trainable) == [cfg.method] and buffers == {}
    assert dj.count_params(trainable) == count == trainable_count(base, cfg)
    assert dj.count_params(frozen) == dj.count_params(base)
    mask = flatten_dict(dj.trainable_mask(params, cfg))
    assert all(v == (k[0] == cfg.method) for k, v in mask.items())
    # train_extra adds base leaves; adapter_leaves is the subtree
    extra = cfg.replace(train_extra=r"^model/norm/")
    assert dj.count_params(dj.split(params, dj.trainable_mask(params, extra))[0]) == count + 32
    assert dj.adapter_leaves(params, cfg).keys() == {cfg.method}
    with pytest.raises(dj.ConfigError, match="already"):
        dj.inject(params, cfg, jax.random.PRNGKey(1))


def test_prompt_inits_and_option_errors(llama):
    _, base = llama
    table = np.asarray(base["model"]["embed_tokens"]["embedding"])
    rnd = dj.inject(base, PROMPT, jax.random.PRNGKey(1))["prompt_tuning"]["embedding"]
    assert 0.5 * table.std() < float(np.std(rnd)) < 2 * table.std()  # the embedding table's scale
    vocab = np.asarray(dj.inject(base, PROMPT.replace(options={"num_virtual_tokens": N, "init": "vocab"}),
                                 jax.random.PRNGKey(1))["prompt_tuning"]["embedding"])
    assert all(np.any(np.all(np.isclose(row, table), axis=1)) for row in vocab)  # rows of the table
    text = dj.AdapterConfig(method="prompt_tuning", options={"num_virtual_tokens": N, "init": "text",
                                                              "init_token_ids": [7, 11]})
    got = dj.inject(base, text, jax.random.PRNGKey(1))["prompt_tuning"]["embedding"]
    np.testing.assert_array_equal(np.asarray(got), table[[7, 11, 7, 11, 7]])  # repeated, cut to n (PEFT)
    with pytest.raises(dj.ConfigError, match="init_token_ids"):
        dj.AdapterConfig(method="prompt_tuning", options={"init": "text"})
    with pytest.raises(dj.ConfigError, match="random"):
        dj.AdapterConfig(method="prompt_tuning", options={"init": "zeros"})
    with pytest.raises(dj.ConfigError, match="positive integer"):
        dj.AdapterConfig(method="prefix_tuning", options={"num_virtual_tokens": 0})
    with pytest.raises(dj.ConfigError, match="dropout"):
        dj.AdapterConfig(method="prefix_tuning", dropout=0.1)
    with pytest.raises(dj.ConfigError, match="Unknown option"):
        dj.AdapterConfig(method="prefix_tuning", options={"init": "vocab"})
    with pytest.raises(dj.ConfigError, match="LlamaForCausalLM"):
        dj.inject({"dense": {"kernel": jnp.ones((3, 3))}}, PROMPT, jax.random.PRNGKey(0))


@pytest.mark.parametrize("which", MOST)
def test_merge_refuses_and_adapt_needs_our_llama(which, llama):
    model, base = llama
    cfg = ALL[which]
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    for call in (lambda: dj.merge(params, cfg), lambda: dj.unmerge(base, dj.adapter_leaves(params, cfg), cfg),
                 lambda: dj.adapt(model.apply, cfg, mode="merged")):
        with pytest.raises(dj.ConfigError, match=f"{cfg.method}' is not mergeable"):
            call()
    with pytest.raises(dj.ConfigError, match="LlamaForCausalLM only"):
        dj.adapt(lambda variables, ids: ids, cfg)
    with pytest.raises(dj.ConfigError, match="no '.*' subtree"):
        dj.adapt(model.apply, cfg)({"params": base}, *batch())


# --- outputs against references -----------------------------------------------------------------------

def test_prompt_tuning_equals_manual_concatenation(llama):
    model, base = llama
    params = randomized(dj.inject(base, PROMPT, jax.random.PRNGKey(1)), PROMPT)
    ids, mask = batch()
    got = dj.adapt(model.apply, PROMPT)({"params": params}, ids, mask)
    assert got.shape == (3, 9, CONFIG.vocab_size)
    virtual = params["prompt_tuning"]["embedding"]
    embeds = model.apply({"params": base}, ids, method=LlamaForCausalLM.embed)
    x = jnp.concatenate([jnp.broadcast_to(virtual, (3, N, 32)), embeds], axis=1)
    full_mask = jnp.concatenate([jnp.ones((3, N), jnp.int32), mask], axis=1)
    expected = model.apply({"params": base}, inputs_embeds=x, attention_mask=full_mask)[:, N:]  # default positions
    assert valid_diff(got, expected, mask) <= TOL
    # the left-padded row equals its unpadded self (positions continue after the virtual tokens)
    alone = dj.adapt(model.apply, PROMPT)({"params": params}, ids[1:2, 3:])
    assert valid_diff(alone[0], got[1, 3:], mask[1, 3:]) <= TOL
    assert np.abs(np.asarray(got - model.apply({"params": base}, ids, mask)))[np.asarray(mask) > 0].max() > 1e-3


@pytest.mark.parametrize("which", ["prefix", "projected"])
def test_prefix_tuning_equals_prompt_tuning_kv_as_prefix(which, llama):
    """Independent reference: prompt tuning's virtual tokens, run through the model, leave per-layer
    (rotated) keys/values; prefix tuning with exactly those prefixes gives prompt tuning's logits."""
    model, base = llama
    cfg = ALL[which]
    prompt = randomized(dj.inject(base, PROMPT, jax.random.PRNGKey(1)), PROMPT)
    _, cache = model.apply({"params": base}, inputs_embeds=prompt["prompt_tuning"]["embedding"][None],
                           cache=init_cache(CONFIG, 1, N), cache_index=0)
    keys = jnp.stack([c["key"][0] for c in cache]).reshape(2, N, KV_DIM)
    values = jnp.stack([c["value"][0] for c in cache]).reshape(2, N, KV_DIM)
    params = {**base, "prefix_tuning": {"key": keys, "value": values}}
    if which == "projected":  # an MLP whose output is those prefixes: zero first layer, bias = the target
        target = jnp.stack([keys, values], axis=1).transpose(2, 0, 1, 3).reshape(N, -1)  # PEFT's (P, layers*2*kv)
        leaves = dj.inject(base, cfg, jax.random.PRNGKey(2))["prefix_tuning"]
        h = jnp.tanh(leaves["embedding"] @ leaves["dense_in"]["kernel"] + leaves["dense_in"]["bias"])
        w2 = jnp.linalg.lstsq(jnp.concatenate([h, jnp.ones((N, 1))], axis=1), target)[0]  # exact: N <= 25 unknowns
        leaves = {**leaves, "dense_out": {"kernel": w2[:-1], "bias": w2[-1]}}
        params = {**base, "prefix_tuning": leaves}
    ids, mask = batch()
    got = dj.adapt(model.apply, cfg)({"params": params}, ids, mask)
    expected = dj.adapt(model.apply, PROMPT)({"params": prompt}, ids, mask)
    assert valid_diff(got, expected, mask) <= 1e-4
    if which == "projected":
        folded = fold_prefix(params, cfg)
        assert set(folded["prefix_tuning"]) == {"key", "value"}
        np.testing.assert_allclose(dj.adapt(model.apply, cfg)({"params": folded}, ids, mask), got, atol=1e-5)


def _np_lstm(x, p):
    """PyTorch's LSTM recurrence in NumPy (gates i, f, g, o)."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h = c = np.zeros(p["w_hh"].shape[0])
    out = []
    for x_t in x:
        i, f, g, o = np.split(x_t @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"] + p["b_hh"], 4)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("which", ["p_mlp", "p_lstm"])
def test_p_tuning_encoder_matches_numpy(which, llama):
    from decomp_jax.core.methods.prompt import p_tuning_embeddings

    _, base = llama
    cfg = ALL[which]
    leaves = jax.tree.map(lambda x: np.asarray(x, np.float64), randomized(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)[cfg.method])
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    dense = lambda z, q: z @ q["kernel"] + q["bias"]  # noqa: E731
    x = leaves["embedding"]
    if which == "p_mlp":
        want = dense(relu(dense(relu(dense(x, leaves["mlp_0"])), leaves["mlp_1"])), leaves["mlp_2"])
    else:
        for layer in (0, 1):
            fwd = _np_lstm(x, leaves[f"lstm_{layer}_forward"])
            bwd = _np_lstm(x[::-1], leaves[f"lstm_{layer}_backward"])[::-1]
            x = np.concatenate([fwd, bwd], axis=-1)
        want = dense(relu(dense(x, leaves["mlp_0"])), leaves["mlp_1"])
    got = p_tuning_embeddings(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), leaves))
    assert got.shape == (N, 32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _torch_pair(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from decomp_jax.models import convert

    hf = CONFIG.to_hf_dict()
    hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**hf, attn_implementation="eager")).eval()
    model.save_pretrained(tmp_path)
    config, params, _ = convert.load_hf(str(tmp_path))
    return torch, model, LlamaForCausalLM(config), params


@pytest.mark.parametrize("which", ALL)
def test_matches_pytorch_peft(which, llama, tmp_path):
    torch, hf_model, model, base = _torch_pair(tmp_path)
    import peft

    cfg = ALL[which]
    params = randomized(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    leaves = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), params[cfg.method])
    if which == "prompt":
        pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    elif which.startswith("p_"):
        pcfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                        encoder_hidden_size=cfg.option("encoder_hidden_size"),
                                        encoder_reparameterization_type=cfg.option("encoder_reparameterization_type"))
    else:
        pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                       prefix_projection=which == "projected", encoder_hidden_size=24)
    pm = peft.get_peft_model(hf_model, pcfg).eval()
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        if which == "prompt":
            encoder.embedding.weight.copy_(leaves["embedding"])
        elif which.startswith("p_"):  # PEFT's PromptEncoder: mlp_head (Linear, ReLU, ...), lstm_head
            encoder.embedding.weight.copy_(leaves["embedding"])
            linears = [m for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)]
            for i, linear in enumerate(linears):
                linear.weight.copy_(leaves[f"mlp_{i}"]["kernel"].T)
                linear.bias.copy_(leaves[f"mlp_{i}"]["bias"])
            if which == "p_lstm":
                for layer in (0, 1):
                    for direction, suffix in (("forward", ""), ("backward", "_reverse")):
                        for ours, theirs in (("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"),
                                             ("b_hh", "bias_hh")):
                            value = leaves[f"lstm_{layer}_{direction}"][ours]
                            getattr(encoder.lstm_head, f"{theirs}_l{layer}{suffix}").copy_(value.T if value.ndim == 2 else value)
        elif which == "prefix":  # PEFT's row p: [layer0 key, layer0 value, layer1 key, ...]
            encoder.embedding.weight.copy_(torch.stack([leaves["key"], leaves["value"]], 1).permute(2, 0, 1, 3).reshape(N, -1))
        else:
            encoder.embedding.weight.copy_(leaves["embedding"])
            encoder.transform[0].weight.copy_(leaves["dense_in"]["kernel"].T)
            encoder.transform[0].bias.copy_(leaves["dense_in"]["bias"])
            encoder.transform[2].weight.copy_(leaves["dense_out"]["kernel"].T)
            encoder.transform[2].bias.copy_(leaves["dense_out"]["bias"])
    ids, mask = batch()
    rows = np.array([0, 2])  # HF numbers positions with arange in a forward: full and right-padded rows agree
    ids, mask = ids[rows], mask[rows]
    with torch.no_grad():
        out = pm(input_ids=torch.as_tensor(np.asarray(ids, np.int64)), attention_mask=torch.as_tensor(np.asarray(mask))).logits
    out = out.numpy()[:, -ids.shape[1]:]  # prompt tuning returns the virtual positions too
    got = dj.adapt(model.apply, cfg)({"params": params}, ids, mask)
    assert valid_diff(got, out, mask) <= 1e-4


@pytest.mark.peft_setting("PROMPT_TUNING, PREFIX_TUNING, P_TUNING (our Llama)", "import + export", "loads in PEFT; imports back (P_TUNING as prompt_tuning)")
@pytest.mark.parametrize("which", ALL)
def test_peft_format_export_loads_in_pytorch_and_imports_back(which, llama, tmp_path):
    """export_peft writes what PeftModel.from_pretrained loads (same logits as ours), and
    import_peft reads it back into params that give the same logits."""
    torch, hf_model, model, base = _torch_pair(tmp_path / "base")
    import peft

    from decomp_jax.interop.peft import export_peft, import_peft

    cfg = ALL[which]
    params = randomized(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    export_peft(params, cfg, str(tmp_path / "adapter"), base_model_name_or_path="tiny", arch="llama",
                model_config=model.config)
    pm = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    ids, mask = batch()
    rows = np.array([0, 2])
    ids, mask = ids[rows], mask[rows]
    with torch.no_grad():
        out = pm(input_ids=torch.as_tensor(np.asarray(ids, np.int64)), attention_mask=torch.as_tensor(np.asarray(mask))).logits
    got = dj.adapt(model.apply, cfg)({"params": params}, ids, mask)
    assert valid_diff(got, out.numpy()[:, -ids.shape[1]:], mask) <= 1e-4

    back, back_cfg = import_peft(str(tmp_path / "adapter"), base, arch="llama")
    # P_TUNING files hold the virtual tokens (the encoder's output): they import as prompt tuning
    assert back_cfg.method == ("prompt_tuning" if which.startswith("p_") else cfg.method)
    assert back_cfg.option("num_virtual_tokens") == N
    again = dj.adapt(model.apply, back_cfg)({"params": back}, ids, mask)
    assert valid_diff(again, got, mask) <= 1e-5
    assert set(back) == set(base) | {back_cfg.method}


def test_peft_prompt_import_refuses_wrong_shapes(llama, tmp_path):
    from safetensors.numpy import save_file

    from decomp_jax.interop.peft import export_peft, import_peft
    from decomp_jax.errors import PeftFormatError

    model, base = llama
    params = dj.inject(base, PROMPT, jax.random.PRNGKey(1))
    export_peft(params, PROMPT, str(tmp_path), base_model_name_or_path="tiny", arch="llama")
    save_file({"prompt_embeddings": np.zeros((N, CONFIG.hidden_size + 1), np.float32)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match=r"shape \(5, 33\).*needs \(5, 32\)"):
        import_peft(str(tmp_path), base, arch="llama")
    with pytest.raises(dj.ConfigError, match="arch='llama'"):
        export_peft(params, PROMPT, str(tmp_path / "x"), base_model_name_or_path="tiny", arch="bert")


# --- training ------------------------------------------------------------------------------------------

def _lm_loss(logits, ids, mask):
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.sum(weights)


@pytest.mark.parametrize("which", MOST)
def test_gradients_reach_only_the_new_leaves_and_steps_lower_the_loss(which, llama):
    model, base = llama
    cfg = ALL[which]
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    trainable, buffers, frozen = dj.partition(params, cfg)
    apply = dj.adapt(model.apply, cfg)
    ids, mask = batch()

    def loss_fn(p, b, rng):
        return _lm_loss(apply({"params": p}, b["ids"], b["mask"], rngs={"dropout": rng}), b["ids"], b["mask"]), {}

    grads = jax.grad(lambda t: loss_fn(dj.combine(t, frozen), {"ids": ids, "mask": mask}, jax.random.PRNGKey(3))[0])(trainable)
    assert list(grads) == [cfg.method]
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    opt = optax.adam(3e-2)
    step = dj.make_train_step(loss_fn, opt, cfg)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(0))
    frozen_before = jax.tree.map(np.asarray, frozen)
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, {"ids": ids, "mask": mask})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, frozen))


# --- generation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", MOST)
def test_generation_with_cache_equals_recomputation(which, llama):
    model, base = llama
    cfg = ALL[which]
    params = randomized(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    apply = dj.adapt(model.apply, cfg)
    ids, mask = batch(length=7)
    cached = generate(model, params, ids, mask, 6, apply_fn=apply)
    recomputed = generate(model, params, ids, mask, 6, apply_fn=apply, use_cache=False)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))
    assert not np.array_equal(np.asarray(cached), np.asarray(generate(model, base, ids, mask, 6)))
    # the cached logits themselves: prefill 4 tokens, then one at a time == one full forward
    full = apply({"params": params}, ids, mask)
    cache = init_cache(CONFIG, 3, 7)
    step = jax.jit(lambda p, x, c, i: apply({"params": p}, x, mask, cache=c, cache_index=i))  # (2 shapes: 2 compiles)
    logits, cache = step(params, ids[:, :4], cache, 0)
    steps = [logits]
    for i in range(4, 7):
        logits, cache = step(params, ids[:, i:i + 1], cache, i)
        steps.append(logits)
    assert valid_diff(jnp.concatenate(steps, axis=1), full, mask) <= 1e-5
