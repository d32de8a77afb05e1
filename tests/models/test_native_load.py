"""Native loading of encoder classifiers from folders that transformers' PyTorch classes wrote, and
merged folders that transformers' PyTorch classes read (no transformers Flax class involved)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)


def _pt_folder(tmp_path, kind):
    import transformers

    config_cls, model_cls, extra = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification, {}),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification,
                    {"pad_token_id": 1, "type_vocab_size": 1}),
        "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaForSequenceClassification,
                        {"pad_token_id": 1, "type_vocab_size": 1}),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=100, max_position_embeddings=40, **TINY, **extra)).eval()
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _batch(pad_id):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(3, 10)).astype("int64")
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = pad_id
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_native_load_matches_pytorch(tmp_path, kind):
    import transformers

    from decomp_jax.models.bert import NativeSequenceClassifier
    from decomp_jax.models.hf import native_params

    pt, folder = _pt_folder(tmp_path, kind)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = NativeSequenceClassifier(config)
    params = native_params(model, str(folder), seed=0)  # the head is in the folder: copied
    ids, mask = _batch(config.pad_token_id)
    ours = np.asarray(model(ids, attention_mask=mask, params=params).logits)
    diff = np.abs(ours - _torch_logits(pt, ids, mask)).max()
    assert diff <= 1e-5, diff

    # merged-export format: config.json + model.safetensors, read back by PyTorch and by us
    out = tmp_path / "saved"
    model.save_pretrained(out, params=params)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert np.abs(_torch_logits(again, ids, mask) - ours).max() <= 1e-5
    reread = native_params(NativeSequenceClassifier(transformers.AutoConfig.from_pretrained(out)), str(out))
    assert np.abs(np.asarray(model(ids, attention_mask=mask, params=reread).logits) - ours).max() == 0


def test_new_head_is_seeded_and_backbone_checked(tmp_path):
    import transformers
    from transformers import BertConfig, BertModel

    from decomp_jax.models.bert import NativeSequenceClassifier
    from decomp_jax.models.hf import native_params

    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=100, max_position_embeddings=40, **TINY))
    base.save_pretrained(tmp_path / "base")  # a base model: no "bert." prefix, no head
    config = transformers.AutoConfig.from_pretrained(tmp_path / "base", num_labels=2)
    model = NativeSequenceClassifier(config)
    a, b, c = (native_params(model, str(tmp_path / "base"), seed=s) for s in (0, 0, 1))
    assert np.array_equal(a["classifier"]["kernel"], b["classifier"]["kernel"])
    assert not np.array_equal(a["classifier"]["kernel"], c["classifier"]["kernel"])
    emb = base.embeddings.word_embeddings.weight.detach().numpy()
    assert np.array_equal(np.asarray(a["bert"]["embeddings"]["word_embeddings"]["embedding"]), emb)
    wrong = NativeSequenceClassifier(BertConfig(vocab_size=100, max_position_embeddings=40, **{**TINY, "hidden_size": 16}))
    with pytest.raises(ValueError, match="model.safetensors: the tensor for bert/embeddings"):
        native_params(wrong, str(tmp_path / "base"))


def test_unsupported_position_embedding_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from decomp_jax.models.hf import load_sequence_classifier

    BertForSequenceClassification(BertConfig(vocab_size=100, max_position_embeddings=40, **TINY,
                                             position_embedding_type="relative_key")).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="only absolute position embeddings"):
        load_sequence_classifier(str(tmp_path / "m"), 2)


def test_flax_msgpack_folder_loads(tmp_path):
    # folders written before (transformers Flax save_pretrained: config.json + flax_model.msgpack of the same tree)
    import jax
    from flax.serialization import msgpack_serialize
    from transformers import BertConfig

    from decomp_jax.models.bert import NativeSequenceClassifier
    from decomp_jax.models.hf import load_sequence_classifier

    config = BertConfig(vocab_size=100, max_position_embeddings=40, **TINY)
    model = NativeSequenceClassifier(config, seed=3)
    config.save_pretrained(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(
        jax.tree_util.tree_map(np.asarray, model.params)))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    loaded, params, _ = load_sequence_classifier(str(tmp_path), 3, seed=0)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, model.params)
    assert all(jax.tree_util.tree_leaves(same))


def test_sharded_safetensors_folder_loads(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from decomp_jax.models.bert import NativeSequenceClassifier
    from decomp_jax.models.hf import native_params

    torch.manual_seed(0)
    pt = BertForSequenceClassification(BertConfig(vocab_size=100, max_position_embeddings=40, **TINY)).eval()
    pt.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    model = NativeSequenceClassifier(pt.config)
    params = native_params(model, str(tmp_path))
    ids, mask = _batch(0)
    ours = np.asarray(model(ids, attention_mask=mask, params=params).logits)
    assert np.abs(ours - _torch_logits(pt, ids, mask)).max() <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("head", [None, "token"])
def test_bare_encoder_and_token_classifier_match_pytorch(tmp_path, kind, head):
    """``load_encoder``: the bare ``BertModel`` (sequence output and pooled) and ``BertForTokenClassification``
    (per-token logits) read from a PyTorch token classifier's folder give PyTorch's outputs; a bare model's
    tree has no ``bert.``/``roberta.`` level (the PyTorch ``BertModel``'s names)."""
    import transformers

    from decomp_jax.models.hf import load_encoder
    from decomp_jax.models.names import torch_state_dict

    config_cls, token_cls, bare_cls, extra = {
        "bert": (transformers.BertConfig, transformers.BertForTokenClassification, transformers.BertModel, {}),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForTokenClassification, transformers.RobertaModel,
                    {"pad_token_id": 1, "type_vocab_size": 1}),
    }[kind]
    torch.manual_seed(0)
    token = token_cls(config_cls(vocab_size=100, max_position_embeddings=40, **TINY, **extra)).eval()
    token.save_pretrained(tmp_path / "token")
    module, params, config = load_encoder(str(tmp_path / "token"), head=head)
    ids, mask = _batch(config.pad_token_id)
    valid = mask > 0
    if head == "token":
        ours = np.asarray(module.apply({"params": params}, ids, mask))
        assert ours.shape == (3, 10, 3) and sorted(params) == sorted(["classifier", kind])
        with torch.no_grad():
            theirs = token(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        assert np.abs(ours - theirs)[valid].max() <= 1e-5
        return
    # the bare model: the encoder from the file, the pooler new (seeded) on our side: PyTorch gets ours
    bare = bare_cls(token.config).eval()
    state = {k: torch.tensor(v) for k, v in torch_state_dict(params, kind).items()}
    assert sorted(state) == sorted(k for k, _ in bare.named_parameters())
    assert np.array_equal(state["embeddings.word_embeddings.weight"],
                          getattr(token, kind).embeddings.word_embeddings.weight.detach().numpy())
    bare.load_state_dict(state, strict=False)
    hidden, pooled = (np.asarray(x) for x in module.apply({"params": params}, ids, mask))
    with torch.no_grad():
        out = bare(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert np.abs(hidden - out.last_hidden_state.numpy())[valid].max() <= 1e-5
    assert np.abs(pooled - out.pooler_output.numpy()).max() <= 1e-5
