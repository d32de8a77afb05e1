"""decomp_jax.models.gpt2: our Linen GPT-2 classifier vs transformers' PyTorch GPT2ForSequenceClassification."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, num_labels=3,
                           pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2ForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_classifier_matches_pytorch(gpt2_folder, side):
    from decomp_jax.models.gpt2 import load_gpt2_classifier

    torch_model, folder = gpt2_folder
    model, params = load_gpt2_classifier(str(folder))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(3, 9)).astype("int64")
    mask = np.ones_like(ids)
    if side == "right":
        ids[1, 5:], mask[1, 5:] = 0, 0
    else:
        ids[1, :4], mask[1, :4] = 0, 0
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()


def test_gpt2_param_tree_keeps_the_flax_names(gpt2_folder):
    from decomp_jax.models.gpt2 import load_gpt2_classifier

    _, params = load_gpt2_classifier(str(gpt2_folder[1]))
    block = params["transformer"]["h"]["0"]
    assert block["attn"]["c_attn"]["kernel"].shape == (96, 32)  # (d_out, d_in), as transformers' Flax Conv1D
    assert block["mlp"]["c_fc"]["kernel"].shape == (128, 32)
    assert set(params["transformer"]) == {"wte", "wpe", "h", "ln_f"}
    assert set(block) == {"ln_1", "attn", "ln_2", "mlp"} and set(block["ln_1"]) == {"scale", "bias"}
    assert params["score"]["kernel"].shape == (32, 3)
