"""decomp_jax.models.gpt2's causal LM (GPT2LMHeadModel, tied head, KV-cache greedy generation) against
transformers' PyTorch GPT2LMHeadModel with the same weights, and adapters on it."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import decomp_jax as dj  # noqa: E402
from decomp_jax.models.hf import TRANSPOSED  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A random 2-layer GPT-2 LM saved by PyTorch and read back with load_gpt2_lm (weights of std 0.2, so
    that greedy decoding does not settle on one token at once), and a left-padded batch."""
    import transformers as tf

    from decomp_jax.models.gpt2 import load_gpt2_lm

    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=60, n_positions=32, initializer_range=0.2)
    torch.manual_seed(0)
    torch_model = tf.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2_lm")
    torch_model.save_pretrained(folder)
    model, params = load_gpt2_lm(str(folder))
    ids = np.random.default_rng(0).integers(1, 60, size=(3, 9)).astype("int64")
    mask = np.ones_like(ids)
    mask[1, :3], mask[2, :5] = 0, 0
    ids[mask == 0] = 0
    return {"torch": torch_model, "model": model, "params": params, "ids": ids, "mask": mask, "folder": str(folder)}


def _positions(mask):
    return np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)  # transformers' generate: left padding shifts nothing


def test_param_tree_is_pytorch_without_lm_head(lm):
    """The params are the PyTorch model's parameters (names through interop.peft.ARCHS["gpt2"]) less the
    tied lm_head."""
    from decomp_jax.models.hf import torch_state_dict

    named = {k: tuple(v.shape) for k, v in lm["torch"].named_parameters()}  # (lm_head.weight is wte's: listed once)
    ours = {k: v.shape for k, v in torch_state_dict(lm["params"], "gpt2").items()}
    assert "lm_head" not in lm["params"] and ours == named
    assert lm["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (96, 32)  # (d_out, d_in)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_pytorch(lm, padded):
    model, params = lm["model"], lm["params"]
    ids = lm["ids"] if padded else np.where(lm["mask"] > 0, lm["ids"], 7)
    mask = lm["mask"] if padded else np.ones_like(ids)
    positions = _positions(mask)
    with torch.no_grad():
        theirs = lm["torch"](input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             position_ids=torch.as_tensor(positions)).logits.numpy()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, positions))
    assert ours.dtype == np.float32 and ours.shape == (3, 9, 60)
    diff = np.abs(ours - theirs)[mask > 0].max()
    assert diff <= TOL, diff
    if not padded:  # default positions 0..L-1, as transformers' forward
        assert np.abs(np.asarray(model.apply({"params": params}, ids)) - theirs).max() <= TOL


def test_kv_cache_matches_the_full_forward(lm):
    """A prefill and one-token calls through the cache give the logits of one call on the whole sequence."""
    from decomp_jax.models.gpt2 import init_cache

    model, params = lm["model"], lm["params"]
    ids, mask = lm["ids"], lm["mask"]
    positions = _positions(mask)
    full = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, positions))
    call = jax.jit(lambda ids, positions, cache, index: model.apply({"params": params}, ids, mask, positions,
                                                                   cache=cache, cache_index=index))
    logits, cache = call(ids[:, :6], positions[:, :6], init_cache(model.config, 3, 9), 0)
    steps = [np.asarray(logits)]
    for i in range(6, 9):  # (one compilation: the index is traced)
        logits, cache = call(ids[:, i:i + 1], positions[:, i:i + 1], cache, i)
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - full)[mask > 0].max() <= 1e-5


def test_greedy_generation_equals_pytorch(lm):
    """16 new tokens for left-padded prompts, token for token as transformers' generate(do_sample=False)."""
    from decomp_jax.models.gpt2 import greedy_generate

    model, params = lm["model"], lm["params"]
    ours = np.asarray(jax.jit(lambda p, i, m: greedy_generate(model, p, i, m, 16))(params, lm["ids"], lm["mask"]))
    with torch.no_grad():
        theirs = lm["torch"].generate(torch.as_tensor(lm["ids"]), attention_mask=torch.as_tensor(lm["mask"]),
                                      do_sample=False, max_new_tokens=16, pad_token_id=0).numpy()
    assert ours.shape == theirs.shape == (3, 25)
    np.testing.assert_array_equal(ours, theirs)
    assert len(set(ours[:, 9:].ravel())) > 3  # not one token repeated: the comparison sees the model


def test_lora_on_c_attn_trains_and_factored_equals_merged(lm):
    """LoRA (dj.inject on c_attn, transposed Conv1D kernels) lowers the next-token loss in a few steps;
    factored execution equals the merged kernels, in the forward and in generation."""
    import optax

    from decomp_jax.models.gpt2 import greedy_generate

    model, base = lm["model"], lm["params"]
    cfg = dj.AdapterConfig(method="lora", targets=r"attn/c_attn$", transposed=TRANSPOSED["gpt2"], rank=4, alpha=8)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    ids, mask = jnp.asarray(lm["ids"]), jnp.asarray(lm["mask"])
    apply = dj.adapt(model.apply, cfg)

    def loss(trainable, frozen):
        logits = apply({"params": dj.combine(trainable, {}, frozen)}, ids, mask)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        keep = mask[:, 1:] * mask[:, :-1]
        return (nll * keep).sum() / keep.sum()

    trainable, _, frozen = dj.partition(params, cfg)
    opt = optax.adam(0.05)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state):
        value, grads = jax.value_and_grad(loss)(trainable, frozen)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(trainable, updates), state, value

    losses = []
    for _ in range(5):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.1, losses
    params = dj.combine(trainable, {}, frozen)
    merged = dj.merge(params, cfg)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
    factored = np.asarray(apply({"params": params}, ids, mask))
    np.testing.assert_allclose(factored, np.asarray(model.apply({"params": merged}, ids, mask)), atol=2e-5)
    assert np.abs(factored - np.asarray(model.apply({"params": base}, ids, mask))).max() > 1e-2
    gen = jax.jit(lambda p, fn: greedy_generate(model, p, ids, mask, 6, apply_fn=fn), static_argnums=1)
    np.testing.assert_array_equal(np.asarray(gen(params, apply)), np.asarray(gen(merged, None)))


def test_load_refuses_a_classifier_folder(tmp_path):
    import transformers as tf

    from decomp_jax.models.gpt2 import load_gpt2_lm

    config = tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16, num_labels=2, pad_token_id=0)
    tf.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification checkpoint; load it with load_gpt2_classifier"):
        load_gpt2_lm(str(tmp_path))
