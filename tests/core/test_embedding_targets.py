"""Methods on embedding tables (``nn.Embed``): the table ``(vocab, features)`` is the kernel of the
layer's one-hot input, so every mergeable method adapts it unchanged. Checked: no-op at init,
factored == merged (outputs and gradients; a tied LM head reads the adapted table in both, as an
untied copy holding phi(table) twice does), PEFT's init for LoRA on embeddings, and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax.core.inject import adapted_layers
from decomp_jax.models.hf import sequence_classifier_apply
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM
import decomp_jax as dj
from test_execution import assert_factored_equals_merged, perturb

TARGETS = r"embeddings/word_embeddings$|attention/self/query$"
# one of each kind of maths: low-rank (and its PEFT embedding init), weight-decomposed (column norms over the
# vocabulary), SVD residual, scaling on both sides, LiERA (no factored form: materialised per layer)
METHODS = ["lora", pytest.param("dora", marks=pytest.mark.slow), pytest.param("pissa", marks=pytest.mark.slow), "ssb",
           "liera"]


@pytest.mark.parametrize("name", METHODS)
def test_methods_adapt_an_embedding_table(name, tiny_bert, tiny_batch):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method=name, targets=TARGETS, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    assert ("bert", "embeddings", "word_embeddings") in {p for p, _ in adapted_layers(params, cfg)}
    apply = sequence_classifier_apply(model)
    expected = np.asarray(apply(base, tiny_batch))
    for mode in ("factored", "merged"):  # no-op at init
        np.testing.assert_allclose(np.asarray(dj.adapt(apply, cfg, mode=mode)(params, tiny_batch)), expected,
                                   atol=1e-5)
    params = perturb(params, cfg)
    table = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    # factored == merged, outputs and gradients; and the embedding's adapter changes the model
    grad_f = assert_factored_equals_merged(apply, cfg, params, tiny_batch)
    grads = grad_f["bert"]["embeddings"]["word_embeddings"]
    assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())
    only_query = dj.AdapterConfig(method=name, targets=r"attention/self/query$", rank=4)
    without = {**params, "bert": {**params["bert"], "embeddings": {**params["bert"]["embeddings"],
                                                                     "word_embeddings": {"embedding": table}}}}
    effect = np.abs(np.asarray(dj.adapt(apply, cfg)(params, tiny_batch))
                    - np.asarray(dj.adapt(apply, only_query)(without, tiny_batch))).max()
    assert effect > 1e-3


def test_lora_on_an_embedding_starts_as_peft_does(tiny_bert):
    """PEFT's init for LoRA on embeddings: lora_embedding_A (our lora_a) zero, lora_embedding_B normal(0, 1);
    dense layers keep the kaiming lora_a and zero lora_b."""
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets=TARGETS, rank=8)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    emb = params["bert"]["embeddings"]["word_embeddings"]
    assert emb["lora_a"].shape == (100, 8) and emb["lora_b"].shape == (8, 32)
    assert float(jnp.abs(emb["lora_a"]).max()) == 0.0
    assert 0.7 < float(jnp.std(emb["lora_b"])) < 1.3 and abs(float(jnp.mean(emb["lora_b"]))) < 0.3
    query = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    assert float(jnp.abs(query["lora_b"]).max()) == 0.0 and float(jnp.abs(query["lora_a"]).max()) > 0.0


def test_tied_head_reads_the_adapted_table():
    """A tied LM head (Llama's attend) uses the one adapted matrix in factored and merged execution: the
    model equals an untied copy whose embedding and head are both phi(table)."""
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    ids = jnp.arange(14).reshape(2, 7) * 5 % 61
    base = model.init(jax.random.PRNGKey(0), ids)["params"]
    cfg = dj.AdapterConfig(method="lora", targets=r"embed_tokens$|q_proj$", rank=4, alpha=8)
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    factored = np.asarray(dj.adapt(apply, cfg)(params, ids))
    merged = np.asarray(dj.adapt(apply, cfg, mode="merged")(params, ids))
    np.testing.assert_allclose(factored, merged, atol=1e-5)
    untied = LlamaForCausalLM(LlamaConfig(**{**config.__dict__, "tie_word_embeddings": False}))
    plain = dj.merge(params, cfg)
    table = plain["model"]["embed_tokens"]["embedding"]
    reference = np.asarray(untied.apply({"params": {**plain, "lm_head": {"kernel": table.T}}}, ids))
    np.testing.assert_allclose(factored, reference, atol=1e-5)
    # Linen variables ({"params": ...}) work as well as a bare params tree
    variables = np.asarray(dj.adapt(model.apply, cfg)({"params": params}, ids))
    np.testing.assert_allclose(variables, factored, atol=1e-6)


def test_embedding_targets_refusals(tiny_bert):
    _, base = tiny_bert
    # an adapter with no merged form cannot take a token id as its input
    cfg = dj.AdapterConfig(method="parallel_adapter", targets=r"word_embeddings$|query$", rank=4)
    with pytest.raises(dj.ConfigError, match=r"embedding table 'bert/embeddings/word_embeddings'.*no merged form.*"
                                             r"Narrow `targets` to dense layers"):
        dj.inject(base, cfg, jax.random.PRNGKey(0))
    # a split half of an adapted embedding is not run as if it were whole
    cfg = dj.AdapterConfig(method="lora", targets=TARGETS, rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    flat = flatten_dict(params)
    del flat[("bert", "embeddings", "word_embeddings", "lora_b")]
    from flax.traverse_util import unflatten_dict

    with pytest.raises(dj.ConfigError, match=r"word_embeddings.*lacks \['lora_b'\]"):
        dj.adapt(lambda p: p, cfg)(unflatten_dict(flat))


def _tiny_llama(tie=True):
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    ids = jnp.arange(14).reshape(2, 7) * 5 % 61
    return model, model.init(jax.random.PRNGKey(0), ids)["params"], ids


def test_trainable_token_rows():
    """trainable_tokens: only the named rows of the table train (a leaf beside it, started at their values);
    every reader of the table, a tied head included, sees them; merge writes them in."""
    model, base, ids = _tiny_llama()
    rows = [5, 10, 60]
    cfg = dj.AdapterConfig(method="lora", targets=r"q_proj$", rank=4, trainable_tokens={"embed_tokens$": rows})
    params = dj.inject(base, cfg, jax.random.PRNGKey(1))
    table = base["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(params["model"]["embed_tokens"]["trainable_tokens_delta"], table[np.array(rows)])
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    np.testing.assert_allclose(dj.adapt(apply, cfg)(params, ids), apply(base, ids), atol=1e-6)  # no-op at init
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    assert set(trainable["model"]["embed_tokens"]) == {"trainable_tokens_delta"}  # the table stays frozen
    assert "embedding" in frozen["model"]["embed_tokens"]
    # a few optimizer steps: the rows move, nothing else of the table does
    loss = lambda p, batch, rng: (jnp.mean(dj.adapt(apply, cfg)(p, batch["ids"]) ** 2), {})  # noqa: E731
    opt = dj.make_optimizer(1e-2, 3, warmup_ratio=0.0)
    step = dj.make_train_step(loss, opt, cfg)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(0))
    for _ in range(3):
        state, _ = step(state, frozen, {"ids": ids})
    trained = dj.combine(state.trainable, frozen)
    merged = dj.merge(trained, cfg)
    new_table = np.asarray(merged["model"]["embed_tokens"]["embedding"])
    moved = np.abs(new_table - np.asarray(table)).max(axis=1)
    assert set(np.nonzero(moved)[0]) == set(rows) and "trainable_tokens_delta" not in merged["model"]["embed_tokens"]
    # factored == merged, and the tied head reads the trained rows (an untied copy with both = the merged table)
    factored = np.asarray(dj.adapt(apply, cfg)(trained, ids))
    np.testing.assert_allclose(factored, np.asarray(dj.adapt(apply, cfg, mode="merged")(trained, ids)), atol=1e-5)
    untied = LlamaForCausalLM(LlamaConfig(**{**model.config.__dict__, "tie_word_embeddings": False}))
    reference = untied.apply({"params": {**merged, "lm_head": {"kernel": merged["model"]["embed_tokens"]["embedding"].T}}},
                             ids)
    np.testing.assert_allclose(factored, np.asarray(reference), atol=1e-5)
    with pytest.raises(dj.ConfigError, match="unmerge with trainable_tokens.*not kept"):
        dj.unmerge(merged, dj.adapter_leaves(trained, cfg), cfg)
    # a config round trip keeps the rows
    assert dj.AdapterConfig.from_yaml(cfg.to_yaml()).trainable_tokens == {"embed_tokens$": rows}


def test_trainable_tokens_refusals():
    _, base, _ = _tiny_llama()
    cases = {
        "ids": ({"embed_tokens$": [3, 3]}, r"trainable_tokens\['embed_tokens\$'\] must be a non-empty list of distinct"),
        "no table": ({"q_proj$": [3]}, r"regexes \['q_proj\$'\] select no embedding table; the tables are "
                                       r"\['model/embed_tokens'\]"),
        "vocab": ({"embed_tokens$": [3, 61]}, r"token ids up to 61, but its table has 61 rows. Resize the embedding"),
    }
    for name, (tokens, message) in cases.items():
        with pytest.raises(dj.ConfigError, match=message):
            dj.inject(base, dj.AdapterConfig(method="lora", targets="q_proj$", trainable_tokens=tokens),
                      jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"both a lora target and in trainable_tokens; choose one"):
        dj.inject(base, dj.AdapterConfig(method="lora", targets="embed_tokens$|q_proj$",
                                         trainable_tokens={"embed_tokens$": [3]}), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"trainable_tokens with the prompt method 'prompt_tuning'"):
        dj.AdapterConfig(method="prompt_tuning", trainable_tokens={"embed_tokens$": [3]})
