"""Injection, merging and execution on a real (small, random) BERT and GPT-2 (our Linen modules)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax.core import methods
from decomp_jax.core.inject import adapted_layers
from decomp_jax.core.tree import path_str
from decomp_jax.models.hf import TARGET_PRESETS, sequence_classifier_apply
import decomp_jax as dj

ALL = TARGET_PRESETS["bert"]["all_linear"]
MERGEABLE = [n for n in methods.names() if methods.get(n).mergeable]
ADAPTERS = [n for n in methods.names() if not methods.get(n).mergeable]


def perturb(params, cfg, seed=0, buffers=False):
    """Random, non-initial values for every trainable leaf of the adapter (and its buffers)."""
    mask = dj.trainable_mask(params, cfg)
    if buffers:  # LoRA-Dash's directions are zero until its warm-up ends
        names = methods.get(cfg.method).buffers
        mask = jax.tree_util.tree_map_with_path(lambda p, m: m or p[-1].key in names, mask)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask_leaves = jax.tree_util.tree_leaves(mask)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if m else x for x, m, k in zip(leaves, mask_leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("name", methods.names())
def test_inject_is_noop_at_init(name, tiny_bert, tiny_batch):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=ALL, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    apply = sequence_classifier_apply(model)
    expected = apply(base, tiny_batch)
    for mode in ("factored", "merged") if name in MERGEABLE else ("factored",):
        got = dj.adapt(apply, cfg, mode=mode)(params, tiny_batch)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_refuse_merging(name, tiny_bert):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=ALL, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    expected = r"not mergeable.*mode='factored'.*" + re.escape(str(ADAPTERS))
    with pytest.raises(dj.ConfigError, match=expected):
        dj.merge(params, cfg)
    with pytest.raises(dj.ConfigError, match=expected):
        dj.adapt(sequence_classifier_apply(model), cfg, mode="merged")


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_unmerge_round_trip(name, tiny_bert, tiny_batch):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=ALL, rank=4, scale_bias=(name == "ia3"))
    # svdiff's buffers define its K (u diag(sigma0) vt); lora_dash's are zero until its warm-up ends
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg, buffers=(name == "lora_dash"))
    merged = dj.merge(params, cfg)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
    adapter = dj.adapter_leaves(params, cfg)
    if methods.get(name).unmaterialize is None:  # dora, sam_parser: K is not recoverable
        with pytest.raises(dj.ConfigError, match="cannot be unmerged"):
            dj.unmerge(merged, adapter, cfg)
        return
    back = dj.unmerge(merged, adapter, cfg)
    chex.assert_trees_all_close(back, params, rtol=1e-4, atol=1e-5)


def assert_factored_equals_merged(apply, cfg, params, batch):
    """Factored and merged execution give the same output and the same gradient of every trainable leaf;
    returns the (factored) gradient."""
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))

    def loss(mode):
        fn = dj.adapt(apply, cfg, mode=mode)
        return lambda t: jnp.sum(jnp.sin(fn(dj.combine(t, frozen), batch)))

    out_f, grad_f = jax.value_and_grad(loss("factored"))(trainable)
    out_m, grad_m = jax.value_and_grad(loss("merged"))(trainable)
    np.testing.assert_allclose(float(out_f), float(out_m), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grad_f, grad_m, rtol=1e-4, atol=1e-5)
    return grad_f


@pytest.mark.parametrize("name", MERGEABLE)
def test_factored_equals_merged_outputs_and_grads(name, tiny_bert, tiny_batch):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=ALL, rank=4, train_extra="classifier", scale_bias=(name == "ia3"))
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg, buffers=True)
    apply = sequence_classifier_apply(model)
    assert_factored_equals_merged(apply, cfg, params, tiny_batch)
    # and the adapted model is no longer the base model
    base_out = apply(base, tiny_batch)
    assert np.abs(np.asarray(dj.adapt(apply, cfg)(params, tiny_batch)) - np.asarray(base_out)).max() > 1e-4


def test_factored_path_runs_the_method_apply(tiny_bert, tiny_batch, monkeypatch):
    """Factored execution intercepts every adapted Dense and never calls materialize."""
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets=ALL, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    lora = methods.get("lora")
    calls = {"apply": 0, "materialize": 0}

    def counted(fn, name):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    patched = lora._replace(apply=counted(lora.apply, "apply"), materialize=counted(lora.materialize, "materialize"))
    monkeypatch.setitem(methods.base._REGISTRY, "lora", patched)
    dj.adapt(sequence_classifier_apply(model), cfg)(params, tiny_batch)
    assert calls == {"apply": 2 * 6, "materialize": 0}


def test_liera_runs_merged_per_layer_inside_factored_execution(tiny_bert, tiny_batch, monkeypatch):
    """A method without a factored form materialises K' layer by layer; nothing else is merged."""
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method="liera", targets="query$", rank=4)
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    liera = methods.get("liera")
    calls = []
    patched = liera._replace(materialize=lambda k, f, c: calls.append(k.shape) or liera.materialize(k, f, c))
    monkeypatch.setitem(methods.base._REGISTRY, "liera", patched)
    monkeypatch.setattr("decomp_jax.core.execution.merge", lambda *a: pytest.fail("whole-tree merge in factored mode"))
    apply = sequence_classifier_apply(model)
    out = dj.adapt(apply, cfg)(params, tiny_batch)
    assert calls == [(32, 32)] * 2
    expected = apply(dj.merge(params, cfg), tiny_batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("name", [n for n in methods.names() if methods.get(n).buffers])
def test_buffers_never_train(name, tiny_bert):
    """SVD factors and frozen directions get no gradient and no optimizer state."""
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=ALL, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    trainable, buffers, frozen = dj.partition(params, cfg)
    from flax.traverse_util import flatten_dict

    buffer_names = set(methods.get(name).buffers)
    assert not buffer_names & {k[-1] for k in flatten_dict(trainable)}
    held = {k[-1] for k in flatten_dict(buffers)} | {k[-1] for k in flatten_dict(frozen)}
    assert buffer_names <= held
    opt_state = dj.make_optimizer(1e-3, 10).init(trainable)
    leaf_names = {getattr(path[-1], "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    assert not buffer_names & leaf_names
    assert set(methods.get(name).trainable_names) <= leaf_names


def test_merge_gives_base_shaped_params(tiny_bert, tiny_batch):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method="dora", targets=ALL, rank=4)
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    merged = dj.merge(params, cfg)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
    apply = sequence_classifier_apply(model)
    np.testing.assert_allclose(np.asarray(apply(merged, tiny_batch)), np.asarray(dj.adapt(apply, cfg)(params, tiny_batch)), atol=1e-5)


def test_inject_is_pure_and_targets_only_matches(tiny_bert):
    _, base = tiny_bert
    before = jax.tree.map(np.asarray, base)
    cfg = dj.AdapterConfig(method="ssb", targets=r"attention/self/(key|value)$|intermediate/dense$")
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))
    adapted = sorted(path_str(p) for p, _ in adapted_layers(params, cfg))
    assert adapted == sorted(
        f"bert/encoder/layer/{i}/{n}" for i in range(2) for n in ("attention/self/key", "attention/self/value", "intermediate/dense")
    )
    layer = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["key"]
    assert set(layer) == {"kernel", "bias", "scale_in", "scale_out"}


def test_same_key_same_factors_regardless_of_other_targets(tiny_bert):
    _, base = tiny_bert
    key = jax.random.PRNGKey(7)
    a = dj.inject(base, dj.AdapterConfig(method="lora", targets="query$", rank=2), key)
    b = dj.inject(base, dj.AdapterConfig(method="lora", targets="(query|value)$", rank=2), key)
    q = lambda p: p["bert"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["lora_a"]
    np.testing.assert_array_equal(np.asarray(q(a)), np.asarray(q(b)))


def test_trainable_mask(tiny_bert):
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="dora", targets="query$", rank=2, train_extra="^classifier/")
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(dj.trainable_mask(params, cfg), sep="/")
    on = sorted(k for k, v in flat.items() if v)
    assert on == sorted(
        [f"bert/encoder/layer/{i}/attention/self/query/{n}" for i in range(2) for n in ("lora_a", "lora_b", "magnitude")]
        + ["classifier/bias", "classifier/kernel"]
    )
    bitfit = dj.AdapterConfig(method="bitfit", targets="query$")
    flat = flatten_dict(dj.trainable_mask(base, bitfit), sep="/")
    assert sorted(k for k, v in flat.items() if v) == [f"bert/encoder/layer/{i}/attention/self/query/bias" for i in range(2)]


def test_bad_input_errors(tiny_bert):
    _, base = tiny_bert
    with pytest.raises(dj.ConfigError, match=r"matches no dense or embedding layer.*Nearest layer paths.*attention/self/query"):
        dj.inject(base, dj.AdapterConfig(targets="attention/self/qeury$"), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"rank=40 is larger than min\(d_in, d_out\)=32.*Use rank <= 32"):
        dj.inject(base, dj.AdapterConfig(rank=40), jax.random.PRNGKey(0))
    once = dj.inject(base, dj.AdapterConfig(), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match="already adapted"):
        dj.inject(once, dj.AdapterConfig(), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match="mode='nope' is unknown"):
        dj.adapt(lambda p: p, dj.AdapterConfig(), mode="nope")


def test_factored_execution_follows_the_layer_dtype(tiny_batch):
    """With a bfloat16 computation dtype the adapter path computes in bfloat16 too."""
    from transformers import BertConfig

    from decomp_jax.models.bert import NativeSequenceClassifier

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = NativeSequenceClassifier(config, seed=0, dtype=jnp.bfloat16)
    cfg = dj.AdapterConfig(method="lora", targets="(query|value)$", rank=4)
    params = perturb(dj.inject(model.params, cfg, jax.random.PRNGKey(0)), cfg)
    apply = sequence_classifier_apply(model)
    factored = dj.adapt(apply, cfg)(params, tiny_batch)
    merged = dj.adapt(apply, cfg, mode="merged")(params, tiny_batch)
    assert factored.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(factored, np.float32), np.asarray(merged, np.float32), atol=0.05)


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Our random GPT-2 LM (decomp_jax.models.gpt2: Conv1D layers, tied head), its params and ids."""
    from transformers import GPT2Config

    from decomp_jax.models.gpt2 import GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32))
    ids = np.random.default_rng(0).integers(0, 50, (2, 8)).astype("int32")
    return model, model.init(jax.random.PRNGKey(0), ids)["params"], ids


# one method per code path the layout touches: additive and residual (pissa) kernels, DoRA's norms,
# scaling, per-layer merged execution (liera), output adapters, SVD buffers, LoRA-Dash's search
# the other SVD-initialised methods read the transposed kernel through the same path as pissa (and the CORE
# methods run on GPT-2's scanned LM too, tests/models/test_gpt2_lm.py): slow
GPT2_METHODS = ["lora", "pissa", "dora", "ssb", "houlsby"] + [pytest.param(m, marks=pytest.mark.slow) for m in
                                                         ("liera", "sam_parser", "spectral", "lora_dash")]


@pytest.mark.parametrize("name", GPT2_METHODS)
def test_gpt2_conv1d_kernels_stored_out_in(name, tiny_gpt2):
    """GPT-2's Conv1D keeps (d_out, d_in) kernels: with `transposed`, every method is a no-op at
    init, factored equals merged, and the factors have the usual (d_in, r) / (r, d_out) shapes."""
    from decomp_jax.models.hf import TRANSPOSED

    model, base, ids = tiny_gpt2
    apply = lambda p, ids: model.apply({"params": p}, ids)  # noqa: E731
    cfg = dj.AdapterConfig(method=name, targets=TARGET_PRESETS["gpt2"]["all_linear"], transposed=TRANSPOSED["gpt2"], rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(dj.adapt(apply, cfg)(params, ids)), np.asarray(apply(base, ids)), atol=2e-5)
    c_attn = params["transformer"]["h"]["0"]["attn"]["c_attn"]
    if "lora_a" in c_attn:
        assert c_attn["lora_a"].shape == (32, 4) and c_attn["lora_b"].shape == (4, 96)
    params = perturb(params, cfg, buffers=(name == "lora_dash"))
    factored = dj.adapt(apply, cfg)(params, ids)
    if methods.get(name).mergeable:
        merged = dj.merge(params, cfg)
        assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
        np.testing.assert_allclose(np.asarray(factored), np.asarray(apply(merged, ids)), atol=2e-5)
        if methods.get(name).unmaterialize is not None and name != "svdiff":
            chex.assert_trees_all_close(dj.unmerge(merged, dj.adapter_leaves(params, cfg), cfg), params, rtol=1e-4, atol=1e-5)


def test_gpt2_without_transposed_is_refused(tiny_gpt2):
    model, base, ids = tiny_gpt2
    cfg = dj.AdapterConfig(method="lora", targets="attn/c_proj$", rank=4)  # square kernels: shapes would not catch it
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"Layer '.*mlp/c_proj': its bias of shape \(32,\) does not fit its kernel read "
                                             r"as the \(d_in, d_out\) matrix \(32, 128\).*set `transposed`"):
        dj.inject(base, cfg.replace(targets="mlp/c_proj$"), jax.random.PRNGKey(0))
    # factored execution knows the layer by its class: a Conv1D keeps (d_out, d_in) kernels
    with pytest.raises(dj.ConfigError, match=r"is a Conv1D, whose kernel is stored \(d_out, d_in\).*transposed"):
        dj.adapt(lambda p, ids: model.apply({"params": p}, ids), cfg)(params, ids)


def test_rank_and_alpha_patterns_give_each_layer_its_own(tiny_bert, tiny_batch):
    """rank_pattern / alpha_pattern: per-layer factor shapes and scales; factored == merged; each layer
    equals a one-layer adapter with that rank and alpha; the config round-trips through YAML."""
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets=ALL, rank=4, alpha=8.0,
                           rank_pattern={r"attention/self/value$": 2, r"intermediate/dense$": 6},
                           alpha_pattern={r"layer/1/attention/self/value$": 3.0})
    assert dj.AdapterConfig.from_yaml(cfg.to_yaml()) == cfg
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    layers = dict(adapted_layers(params, cfg))
    rank = {"/".join(p): layer["lora_a"].shape[1] for p, layer in layers.items()}
    assert rank["bert/encoder/layer/0/attention/self/value"] == 2 and rank["bert/encoder/layer/1/intermediate/dense"] == 6
    assert rank["bert/encoder/layer/0/attention/self/query"] == 4
    assert cfg.for_layer("bert/encoder/layer/1/attention/self/value").scale == 3.0 / 2
    assert cfg.for_layer("bert/encoder/layer/0/attention/self/value").scale == 8.0 / 2
    apply = sequence_classifier_apply(model)
    factored = np.asarray(dj.adapt(apply, cfg)(params, tiny_batch))
    merged_params = dj.merge(params, cfg)
    np.testing.assert_allclose(factored, np.asarray(apply(merged_params, tiny_batch)), atol=1e-5)
    # one layer's merged kernel is K + (alpha_l / r_l) a b
    path = ("bert", "encoder", "layer", "1", "attention", "self", "value")
    layer = layers[path]
    want = np.asarray(layer["kernel"]) + 1.5 * np.asarray(layer["lora_a"]) @ np.asarray(layer["lora_b"])
    got = np.asarray(flatten_dict(merged_params)[path + ("kernel",)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    back = dj.unmerge(merged_params, dj.adapter_leaves(params, cfg), cfg)
    np.testing.assert_allclose(np.asarray(flatten_dict(back)[path + ("kernel",)]), np.asarray(layer["kernel"]), atol=1e-5)
    with pytest.raises(dj.ConfigError, match="no rank"):
        dj.AdapterConfig(method="ia3", rank_pattern={"value$": 2})
    with pytest.raises(dj.ConfigError, match="schedule budgets ranks"):
        dj.AdapterConfig(method="adalora", rank_pattern={"value$": 2})
    with pytest.raises(dj.ConfigError, match=r"rank_pattern\['value\$'\] must be > 0"):
        dj.AdapterConfig(method="lora", rank_pattern={"value$": 0})
    with pytest.raises(dj.ConfigError, match="rank=64 is larger"):
        dj.inject(base, cfg.replace(rank_pattern={"value$": 64}), jax.random.PRNGKey(0))


def test_lora_bias_on_a_layer_without_bias_runs_factored_only():
    """lora_bias adds s * lora_bias to the layer's output: on a bias-free layer (Llama's projections) the
    factored path runs it, and merge says it cannot (as PEFT cannot merge lora_bias there)."""
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))
    ids = jnp.arange(10).reshape(2, 5)
    base = model.init(jax.random.PRNGKey(0), ids)["params"]
    cfg = dj.AdapterConfig(method="lora_bias", targets=r"q_proj$", rank=2, alpha=4)
    params = dj.set_leaves(dj.inject(base, cfg, jax.random.PRNGKey(1)),
                           {("model", "layers_0", "self_attn", "q_proj", "lora_bias"): jnp.ones(32)})
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    assert np.abs(np.asarray(dj.adapt(apply, cfg)(params, ids)) - np.asarray(apply(base, ids))).max() > 1e-3
    with pytest.raises(dj.ConfigError, match=r"'model/layers_0/self_attn/q_proj' has no bias, so merge cannot fold "
                                             r"lora_bias's bias term.*Run the adapter factored"):
        dj.merge(params, cfg)
