"""Sequence packing (decomp_jax.data.packing, ``data.packing``): packed rows with segment ids give the loss
and gradients of the same examples padded one per row (plain, sliding-window and chunked attention; GPT-2), the
rows hold every example once and are a pure function of the seed, padding drops, and the settings that
cannot pack are refused by name. (The sliding-window case with ``-m slow``; the packed commonsense run in
tests/tasks uses chunked attention.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax.app.config import ExperimentConfig
from decomp_jax.data import packing
from decomp_jax.data.lm import TokenizedSet, loss_slots, response_slots
from decomp_jax.errors import ConfigError
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, segment_positions
from decomp_jax.training.losses import response_nll_loss

VOCAB, MAX = 50, 16


def _examples(n=9, seed=0):
    """Random examples of 5 to 16 tokens, the loss on their last 2 to 5 tokens; one scored from its first
    token on (as with ``train_on_prompt`` and no BOS), which packing must not let the row's previous example
    predict."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for i in range(n):
        length = int(rng.integers(5, MAX + 1))
        ids.append(rng.integers(3, VOCAB, length).astype(np.int32))
        mask = np.zeros(length, np.int32)
        mask[length - int(rng.integers(2, 6)):] = 1
        if i == 4:
            mask[:] = 1
        masks.append(mask)
    return TokenizedSet(ids, masks, 0, MAX, np.zeros(n, np.int32))


def _unpacked(data):
    """Every example in a row of its own, right-padded to ``MAX``."""
    b = len(data)
    ids, attn, lmask = np.zeros((b, MAX), np.int32), np.zeros((b, MAX), np.int32), np.zeros((b, MAX), np.int32)
    for r, (seq, m) in enumerate(zip(data.ids, data.loss_mask)):
        ids[r, :len(seq)], attn[r, :len(seq)], lmask[r, :len(seq)] = seq, 1, m
    slots = response_slots(max(int(m[1:].sum()) for m in data.loss_mask), MAX)
    index, targets, weights = loss_slots(ids, lmask, slots)
    return {"input_ids": ids, "attention_mask": attn, "loss_index": index, "loss_targets": targets,
            "loss_weights": weights}


CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _gpt2(**extra):
    import transformers as tf

    from decomp_jax.models.gpt2 import GPT2LMHeadModel

    return GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64), **extra)


@pytest.mark.parametrize("config", [
    dict(), pytest.param(dict(sliding_window=4, layer_types=("sliding_attention", "full_attention"), model_type="mistral"),
                         marks=pytest.mark.slow),
    dict(attention="chunked", attention_chunk=8), "gpt2"],
    ids=["full attention", "sliding window", "chunked attention", "gpt2 chunked"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(config):
    data = _examples()
    rows = packing.pack_rows(data, 32, seed=0)
    assert len(rows) < len(data)  # examples share rows
    packed = packing.packed_batch(data, rows, 0, len(rows), 32)
    model = _gpt2(attention="chunked", attention_chunk=8) if config == "gpt2" else LlamaForCausalLM(
        dataclasses.replace(CONFIG, **config))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]

    def loss(p, batch, **extra):
        nll = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"], logits_at=batch["loss_index"],
                          targets=batch["loss_targets"], **extra)
        return response_nll_loss(nll, batch)

    reference = _unpacked(data)
    want, want_grads = jax.jit(jax.value_and_grad(loss))(params, reference)
    got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, packed, segment_ids=packed["segment_ids"])))(params)
    print(f"{config or 'full attention'}: {len(data)} examples in {len(rows)} rows of 32; loss packed {float(got):.6f}, "
          f"one per row {float(want):.6f}")
    assert float(packed["loss_weights"].sum()) == float(reference["loss_weights"].sum())  # the same scored tokens
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5), want_grads, got_grads)


def test_rows_hold_every_example_once_and_depend_on_the_seed_only():
    data = _examples(40, seed=1)
    rows = packing.pack_rows(data, 32, seed=3)
    assert sorted(i for r in rows for i in r) == list(range(40))
    assert all(data.lengths[r].sum() <= 32 for r in rows)
    again = packing.pack_rows(data, 32, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again)) and len(rows) == len(again)
    padded = packing.padding_fraction(data, 4)
    packed = packing.padding_fraction(data, 4, packed_rows=rows, length=32)
    print(f"padding: {padded:.1%} in padded batches of 4, {packed:.1%} packed in rows of 32")
    assert packed < padded
    # an epoch of packed batches: every row once; the same batch on a resumed run (a pure function of step)
    per_epoch = len(rows) // 4
    seen = [tuple(packing.packed_batch(data, rows, s, 4, 32, seed=5)["input_ids"][:, 0]) for s in range(per_epoch)]
    assert len({x for s in seen for x in s}) >= per_epoch  # rows differ
    first = packing.packed_batch(data, rows, 2, 4, 32, seed=5)
    np.testing.assert_array_equal(first["input_ids"], packing.packed_batch(data, rows, 2, 4, 32, seed=5)["input_ids"])
    np.testing.assert_array_equal(first["position_ids"], np.asarray(segment_positions(first["segment_ids"])))
    with pytest.raises(ValueError, match="more than the packed row length 8"):
        packing.pack_rows(data, 8)


def test_settings_that_cannot_pack_are_refused():
    base = {"data": {"task": "commonsense", "packing": True, "max_length": 64}, "adapter": {"method": "lora"}}
    ExperimentConfig.from_dict(base)
    with pytest.raises(ConfigError, match="apply to the decoder tasks"):
        ExperimentConfig.from_dict({"data": {"task": "sst2", "packing": True}})
    with pytest.raises(ConfigError, match="virtual tokens go in front of each row"):
        ExperimentConfig.from_dict({**base, "adapter": {"method": "prompt_tuning"}})
    with pytest.raises(ConfigError, match="pack_length=32 is shorter"):
        ExperimentConfig.from_dict({"data": {**base["data"], "pack_length": 32}})
    with pytest.raises(ConfigError, match="pack_length is set but data.packing is false"):
        ExperimentConfig.from_dict({"data": {"task": "commonsense", "pack_length": 128}})
    with pytest.raises(ValueError, match="segment_ids .* not with a cache"):
        model = LlamaForCausalLM(CONFIG)
        params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
        from decomp_jax.models.llama import init_cache
        model.apply({"params": params}, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 8), jnp.int32),
                    cache=init_cache(CONFIG, 1, 8), cache_index=0, segment_ids=jnp.ones((1, 4), jnp.int32))
