"""Commonsense reasoning data for decoder LLMs: loading the real local files, the prompt,
tokenization with a response-only loss mask, bucketed batching, answer extraction and the loss.

The tokenizer is a small byte-level BPE trained here with the `tokenizers` library (no downloads).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from decomp_jax.data import commonsense as cs
from decomp_jax.training import losses

from conftest import DATA

ROOT = DATA / "commonsense"

COUNTS = {  # name: (train rows, test rows)
    "boolq": (9427, 3270),
    "arc_e": (2251, 2376),
    "arc_c": (1119, 1172),
    "obqa": (4957, 500),
}
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@pytest.fixture(scope="module")
def mixture():
    """The first 60 training rows of each dataset, shuffled together."""
    return cs.load_mixture(data_dir=ROOT, limit=60, seed=0)


@pytest.fixture(scope="module")
def bpe(mixture):
    """A byte-level BPE (vocab 1200) trained on the rendered mixture: a real tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([cs.render_prompt(e) + e.output for e in mixture], trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tok(bpe):
    """The same tokenizer as a transformers fast tokenizer, with a small chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe.__class__.from_str(bpe.to_str()),
                                  bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token + '\\n' }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    return tok


@pytest.fixture(scope="module")
def train_set(mixture, bpe):
    return cs.tokenize_train(mixture, bpe, 256, add_bos=True)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name,count", [("piqa", 1838), ("siqa", 1954)])
def test_evaluation_only_sets(name, count):
    examples = cs.load_commonsense(name, "test", data_dir=ROOT)
    assert len(examples) == count and {e.answer for e in examples} <= set(cs.get_dataset(name).answers)
    assert all(cs.extract_answer(name, e.output) == e.answer for e in examples)
    with pytest.raises(FileNotFoundError, match="train"):
        cs.load_commonsense(name, "train", data_dir=ROOT)


@pytest.mark.parametrize("name", list(COUNTS))
def test_row_counts_of_the_real_files(name):
    for split, expected in zip(("train", "test"), COUNTS[name]):
        examples = cs.load_commonsense(name, split, data_dir=ROOT)
        assert len(examples) == expected
        spec = cs.get_dataset(name)
        assert {e.answer for e in examples} <= set(spec.answers)
        assert all(e.dataset == name and e.output == f"the correct answer is {e.answer}" for e in examples)


def test_registry_aliases_and_answer_sets():
    assert cs.get_dataset("ARC-Easy").name == "arc_e"
    assert cs.get_dataset("arc-challenge").name == "arc_c"
    assert cs.get_dataset("openbookqa").name == "obqa"
    assert cs.get_dataset("BoolQ").folder == "boolq"
    assert cs.get_dataset("social_i_qa").name == "siqa" and cs.get_dataset("PIQA").folder == "piqa"
    with pytest.raises(ValueError, match="Unknown commonsense dataset"):
        cs.get_dataset("quail")
    # ARC questions have 3, 4 or 5 options: answer5 is a valid gold answer there.
    assert any(e.answer == "answer5" for e in cs.load_commonsense("arc_e", "train", data_dir=ROOT))
    assert cs.normalize_split("validation") == "test"


def test_limit_dataset_folder_and_default_root():
    first = cs.load_commonsense("obqa", "test", data_dir=ROOT, limit=3)
    assert len(first) == 3
    assert cs.load_commonsense("obqa", "test", data_dir=ROOT / "openbookqa", limit=3) == first
    assert cs.load_commonsense("OpenBookQA", "test", limit=3) == first  # default root beside the repo
    raw = json.loads((ROOT / "openbookqa" / "test.json").read_text())[:3]
    assert [e.instruction for e in first] == [r["instruction"] for r in raw]
    with pytest.raises(FileNotFoundError, match="data_dir"):
        cs.load_commonsense("boolq", "train", data_dir=ROOT / "nope")


def test_hub_path_loads_the_same_rows(tmp_path, monkeypatch):
    """The `datasets` path, pointed at the local root laid out like a hub dataset repo."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    via_hub = cs.load_commonsense("arc_c", "test", hub=str(ROOT), limit=5)
    assert via_hub == cs.load_commonsense("arc_c", "test", data_dir=ROOT, limit=5)


def test_mixture_concatenates_and_shuffles(mixture):
    assert len(mixture) == 4 * 60
    assert {e.dataset for e in mixture} == set(cs.COMMONSENSE_MIXTURE)
    assert [e.dataset for e in mixture[:60]] != ["boolq"] * 60
    assert cs.load_mixture(data_dir=ROOT, limit=60, seed=0) == mixture
    plain = cs.load_mixture(data_dir=ROOT, limit=60, seed=None)
    assert [e.dataset for e in plain[:60]] == ["boolq"] * 60
    assert sorted(map(repr, plain)) == sorted(map(repr, mixture))


# --------------------------------------------------------------------------- prompts


def test_prompt_renders_the_template_exactly():
    ex = cs.load_commonsense("boolq", "train", data_dir=ROOT, limit=1)[0]
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nPlease answer the following question with true or false, "
        "question: do iran and afghanistan speak the same language?\n\nAnswer format: true/false"
        "\n\n### Response:\n")
    assert cs.render_prompt(ex) == expected
    assert cs.render_example(ex) == (expected, "the correct answer is true")
    with_input = {"instruction": "Add.", "input": "1 and 2", "output": "3"}
    assert cs.render_prompt(with_input).endswith("### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    assert "paired with an input" in cs.render_prompt(with_input)


def test_chat_template_prompt_and_response(hf_tok, mixture, bpe):
    ex = mixture[0]
    prompt = cs.render_prompt(ex, "chat", hf_tok)
    assert prompt == f"{BOS}<|user|>\n{ex.instruction}\n<|assistant|>\n"
    assert cs.render_example(ex, "chat", hf_tok) == (prompt, f"{ex.output}{EOS}\n")
    data = cs.tokenize_train([ex], hf_tok, 512, template="chat", add_bos=True)
    ids, mask = data.ids[0], data.loss_mask[0].astype(bool)
    assert (ids == hf_tok.bos_token_id).sum() == 1  # the template's BOS is not doubled
    assert ids[-1] == hf_tok.eos_token_id  # the trailing newline after eos is cut
    assert hf_tok.decode(ids[mask]) == ex.output + EOS
    with pytest.raises(TypeError, match="transformers tokenizer"):
        cs.render_prompt(ex, "chat", bpe)


# --------------------------------------------------------------------------- tokenizing


def test_loss_mask_covers_exactly_the_response(train_set, mixture, bpe):
    assert train_set.truncated.sum() == 0
    for i in (0, 1, 57, 239):
        ids, mask = train_set.ids[i], train_set.loss_mask[i].astype(bool)
        assert bpe.decode(ids[mask].tolist(), skip_special_tokens=False) == mixture[i].output + EOS
        assert bpe.decode(ids[~mask].tolist(), skip_special_tokens=False) == BOS + cs.render_prompt(mixture[i])
        assert ids[0] == bpe.token_to_id(BOS) and ids[-1] == bpe.token_to_id(EOS)
        # the mask is one contiguous block at the end
        assert mask[np.argmax(mask):].all()


def test_raw_and_transformers_tokenizers_agree(mixture, bpe, hf_tok, train_set):
    raw, hf = cs.as_tokenizer(bpe), cs.as_tokenizer(hf_tok)
    assert (raw.bos_id, raw.eos_id, raw.pad_id) == (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 0)
    assert raw.default_add_bos is False and hf.default_add_bos is False
    other = cs.tokenize_train(mixture, hf_tok, 256, add_bos=True)
    assert all(np.array_equal(a, b) for a, b in zip(train_set.ids, other.ids))
    assert all(np.array_equal(a, b) for a, b in zip(train_set.loss_mask, other.loss_mask))
    no_bos = cs.tokenize_train(mixture[:3], bpe, 256)  # raw tokenizers: no BOS by default
    assert all(np.array_equal(a, b[1:]) for a, b in zip(no_bos.ids, train_set.ids))
    train_all = cs.tokenize_train(mixture[:3], bpe, 256, train_on_prompt=True, add_bos=True)
    assert [m.sum() for m in train_all.loss_mask] == [len(x) - 1 for x in train_all.ids]


def test_truncation_keeps_the_response(mixture, bpe, train_set):
    i = int(np.argmax(train_set.lengths))
    full, mask = train_set.ids[i], train_set.loss_mask[i].astype(bool)
    cut = cs.tokenize_train([mixture[i]], bpe, 40, add_bos=True)
    ids, lmask = cut.ids[0], cut.loss_mask[0].astype(bool)
    assert len(ids) == 40 and cut.truncated[0] == 1
    assert ids[0] == full[0]  # BOS stays
    assert np.array_equal(ids[lmask], full[mask])  # whole response + eos
    assert np.array_equal(ids[1:], full[len(full) - 39:])  # prompt cut from the left
    tiny = cs.tokenize_train([mixture[i]], bpe, 4, add_bos=True)  # response cannot fit
    assert tiny.truncated[0] == 2 and len(tiny.ids[0]) == 4
    assert np.array_equal(tiny.ids[0][2:], full[mask][:2])
    prompts = cs.tokenize_prompts([mixture[i]], bpe, 30, add_bos=True)
    assert prompts.truncated[0] == 1 and len(prompts.ids[0]) == 30
    assert np.array_equal(prompts.ids[0][1:], full[~mask][-29:])


# --------------------------------------------------------------------------- training batches

BUCKETS = (64, 128, 192, 256)


def test_train_batch_is_deterministic_and_varies_with_step(train_set):
    a = cs.train_batch(train_set, 3, 8, seed=1, buckets=BUCKETS)
    b = cs.train_batch(train_set, 3, 8, seed=1, buckets=BUCKETS)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(cs.train_batch(train_set, 4, 8, seed=1, buckets=BUCKETS)["index"], a["index"])
    assert not np.array_equal(cs.train_batch(train_set, 3, 8, seed=2, buckets=BUCKETS)["index"], a["index"])
    per_epoch = cs.steps_per_epoch(len(train_set), 8)
    nxt = cs.train_batch(train_set, 3 + per_epoch, 8, seed=1, buckets=BUCKETS)  # next epoch reshuffled
    assert not np.array_equal(nxt["index"], a["index"])


def test_train_batch_shapes_padding_and_labels(train_set):
    lengths = set()
    for step in range(cs.steps_per_epoch(len(train_set), 8)):
        batch = cs.train_batch(train_set, step, 8, seed=0, buckets=BUCKETS)
        L = batch["input_ids"].shape[1]
        lengths.add(L)
        assert L in BUCKETS
        assert L == cs.bucket_length(int(train_set.lengths[batch["index"]].max()), BUCKETS)
        for r, i in enumerate(batch["index"]):
            n = train_set.lengths[i]
            assert np.array_equal(batch["input_ids"][r, :n], train_set.ids[i])  # right padding
            assert (batch["input_ids"][r, n:] == train_set.pad_id).all()
            assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (L - n)
            assert np.array_equal(batch["loss_mask"][r, :n], train_set.loss_mask[i])
        assert np.array_equal(batch["labels"] != -100, batch["loss_mask"] == 1)
        assert np.array_equal(batch["labels"][batch["loss_mask"] == 1], batch["input_ids"][batch["loss_mask"] == 1])
        assert batch["input_ids"].dtype == np.int32 and batch["weights"].tolist() == [1.0] * 8
    assert len(lengths) > 1  # the mixture spans several buckets


def test_every_example_once_per_epoch_and_sorted_chunks(train_set):
    n, bs = len(train_set), 8  # 240 = 30 full batches
    plan = cs.epoch_batches(train_set, bs, seed=5, epoch=0, chunk_batches=5)
    seen = np.concatenate([cs.train_batch(train_set, s, bs, seed=5, buckets=BUCKETS, chunk_batches=5)["index"]
                           for s in range(n // bs)])
    assert np.array_equal(np.sort(seen), np.arange(n))
    assert np.array_equal(seen, plan.reshape(-1))
    # within a batch lengths come from one sorted chunk: less padding than a plain shuffle
    order = np.random.default_rng((5, 0)).permutation(n).reshape(-1, bs)
    spread = lambda rows: np.mean([np.ptp(train_set.lengths[r]) for r in rows])
    assert spread(plan) < spread(order)
    # not divisible: the tail is dropped, no example twice
    plan7 = cs.epoch_batches(train_set, 7, seed=5, epoch=1)
    assert plan7.shape == (n // 7, 7) and len(np.unique(plan7)) == plan7.size


def test_bucket_helpers():
    assert cs.default_buckets(256) == (64, 128, 192, 256)
    assert cs.default_buckets(200, 64) == (64, 128, 192, 200)
    assert cs.bucket_length(65, (64, 128)) == 128
    with pytest.raises(ValueError, match="largest bucket"):
        cs.bucket_length(129, (64, 128))


# --------------------------------------------------------------------------- eval batches


def test_eval_batches_left_pad_the_prompts(mixture, bpe, train_set):
    prompts = cs.tokenize_prompts(mixture[:21], bpe, 256, add_bos=True)
    for i in range(21):  # the prompts are exactly the unmasked part of the training sequences
        assert np.array_equal(prompts.ids[i], train_set.ids[i][train_set.loss_mask[i] == 0])
    seen = []
    for batch in cs.eval_batches(prompts, 8, BUCKETS):
        L = batch["input_ids"].shape[1]
        assert L in BUCKETS and batch["input_ids"].shape == (8, L)
        for r, i in enumerate(batch["index"]):
            if i < 0:
                assert batch["weights"][r] == 0
                continue
            n = prompts.lengths[i]
            assert np.array_equal(batch["input_ids"][r, L - n:], prompts.ids[i])  # prompt at the end
            assert (batch["input_ids"][r, :L - n] == prompts.pad_id).all()
            assert batch["attention_mask"][r].tolist() == [0] * (L - n) + [1] * n
            assert batch["position_ids"][r, L - n:].tolist() == list(range(n))
            seen.append(int(i))
    assert sorted(seen) == list(range(21))


def test_decode_generations_cuts_at_eos(bpe, mixture):
    tok = cs.as_tokenizer(bpe)
    ids = tok.encode("the correct answer is answer3")
    rows = np.asarray([ids + [tok.eos_id, 5, 6], ids + [tok.pad_id, tok.eos_id, tok.eos_id]])
    assert cs.decode_generations(bpe, rows) == ["the correct answer is answer3"] * 2
    assert cs.decode_generations(bpe, rows, index=np.array([3, -1])) == ["the correct answer is answer3"]


# --------------------------------------------------------------------------- scoring


def test_extract_answer():
    assert cs.extract_answer("arc_e", "the correct answer is answer3") == "answer3"
    assert cs.extract_answer("obqa", "Answer2, not answer1") == "answer2"
    assert cs.extract_answer("ARC-Challenge", "I think the answer is 3") is None
    assert cs.extract_answer("boolq", "True. It is not false.") == "true"
    assert cs.extract_answer("boolq", "the correct answer is FALSE") == "false"
    assert cs.extract_answer("boolq", "yes") is None
    assert cs.extract_answer("boolq", "") is None


def test_accuracy(mixture):
    boolq = [e for e in mixture if e.dataset == "boolq"][:4]
    gens = [f"the correct answer is {e.answer}" for e in boolq]
    gens[1] = "no idea"
    assert cs.accuracy("boolq", gens, boolq) == 0.75
    assert cs.accuracy("boolq", ["True", "false"], ["true", "true"]) == 0.5
    # dataset=None: each example scored with its own dataset's pattern (a mixture)
    assert cs.accuracy(None, [e.output for e in mixture], mixture) == 1.0
    with pytest.raises(ValueError, match="must match"):
        cs.accuracy("boolq", ["true"], boolq)


# --------------------------------------------------------------------------- loss


def _np_loss(logits, ids, mask):
    logits = logits.astype(np.float64)[:, :-1]
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    tgt = ids[:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    w = mask[:, 1:].astype(np.float64)
    return (nll * w).sum() / w.sum()


def test_causal_lm_loss_matches_numpy():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    B, L, V = 3, 7, 11
    logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    ids = rng.integers(0, V, size=(B, L)).astype(np.int32)
    mask = (rng.random((B, L)) < 0.5).astype(np.int32)
    mask[:, 1] = 1
    batch = {"input_ids": ids, "loss_mask": mask}
    got = jax.jit(losses.causal_lm_loss)(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), batch)
    np.testing.assert_allclose(float(losses.causal_lm_loss(logits, batch)), _np_loss(logits, ids, mask), rtol=1e-5)
    np.testing.assert_allclose(float(got), _np_loss(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)),
                                                    ids, mask), rtol=1e-5)
    # stable for huge logits and bfloat16 inputs
    big = losses.causal_lm_loss(jnp.asarray(logits * 1e4, jnp.bfloat16), batch)
    assert np.isfinite(float(big))
    # padding rows (weights 0) and unmasked positions do not count
    weighted = dict(batch, weights=np.array([1.0, 0.0, 1.0], np.float32))
    keep = mask.copy()
    keep[1] = 0
    np.testing.assert_allclose(float(losses.causal_lm_loss(logits, weighted)), _np_loss(logits, ids, keep), rtol=1e-5)
    assert float(losses.causal_lm_loss(logits, dict(batch, loss_mask=np.zeros_like(mask)))) == 0.0


def test_causal_lm_loss_on_a_real_batch(train_set):
    """Uniform logits give log(V) per scored token; the scored count is the response+eos count."""
    batch = cs.train_batch(train_set, 0, 8, seed=0, buckets=BUCKETS)
    V = 1200
    logits = np.zeros(batch["input_ids"].shape + (V,), np.float32)
    np.testing.assert_allclose(float(losses.causal_lm_loss(logits, batch)), np.log(V), rtol=1e-6)


def test_response_slots_hold_exactly_the_scored_positions(train_set):
    """loss_index/loss_targets/loss_weights list the positions causal_lm_loss scores, in order; R is a
    power of two (>= 8) shared by the batch; response_loss on the gathered logits equals causal_lm_loss."""
    rng = np.random.default_rng(0)
    V = 37
    for step in range(4):
        batch = cs.train_batch(train_set, step, 8, seed=0, buckets=BUCKETS)
        L, R = batch["input_ids"].shape[1], batch["loss_index"].shape[1]
        counts = batch["loss_mask"][:, 1:].sum(1)
        assert R == min(max(8, 1 << int(np.ceil(np.log2(counts.max())))), L)
        for r in range(8):
            t = np.nonzero(batch["loss_mask"][r, 1:])[0]
            assert batch["loss_weights"][r].tolist() == [1.0] * len(t) + [0.0] * (R - len(t))
            assert np.array_equal(batch["loss_index"][r, :len(t)], t)
            assert np.array_equal(batch["loss_targets"][r, :len(t)], batch["input_ids"][r, t + 1])
        logits = rng.normal(size=(8, L, V)).astype(np.float32)
        at = np.take_along_axis(logits, batch["loss_index"][..., None], axis=1)
        np.testing.assert_allclose(float(losses.response_loss(at, batch)), float(losses.causal_lm_loss(logits, batch)), rtol=1e-6)
        weighted = dict(batch, weights=np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32))
        np.testing.assert_allclose(float(losses.response_loss(at, weighted)), float(losses.causal_lm_loss(logits, weighted)),
                                   rtol=1e-6)
    rows = cs.train_batch(train_set, 2, 8, seed=0, buckets=BUCKETS, rows=slice(4, 8))  # one process's share
    whole = cs.train_batch(train_set, 2, 8, seed=0, buckets=BUCKETS)
    for key in ("input_ids", "loss_index", "loss_targets", "loss_weights"):
        assert np.array_equal(rows[key], whole[key][4:8])
