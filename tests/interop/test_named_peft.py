"""Named adapters against HF PEFT: a PEFT sequence classifier with two LoRA adapters ("default" and
"other", each with its own copy of the classifier head) saved PEFT's way (root + subfolder), imported by name
into one tree; per-adapter logits equal PEFT's set_adapter, a mixed batch equals PEFT's adapter_names=
(with "__base__" rows), two active adapters equal PEFT's set_adapter([...]); exported by name, PEFT loads
both back with the same outputs."""

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import decomp_jax as dj  # noqa: E402
from decomp_jax.models.hf import sequence_classifier_apply  # noqa: E402
from helpers import TOL, small_classifier, torch_classifier_logits  # noqa: E402

NAMES = ["other", "__base__", "default"]  # PEFT's per-example adapter names for the 3 examples


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return small_classifier("bert", str(tmp_path_factory.mktemp("bert")))


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def peft_pair(bert, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("named"))
    model = peft.get_peft_model(copy.deepcopy(bert["torch"]), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    model.add_adapter("other", peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                               target_modules=["value", "intermediate.dense"]))
    _perturb(model, 0)
    model.eval()
    model.save_pretrained(folder)
    params = bert["params"]
    cfgs = {}
    for name in ("default", "other"):
        params, cfgs[name] = dj.import_peft(folder, params, arch="bert", name=name)
    return {"model": model, "folder": folder, "params": params, "cfgs": cfgs}


def _ours(bert, pair, **weights):
    run = dj.adapt_many(sequence_classifier_apply(bert["flax"]), pair["cfgs"])
    return np.asarray(run(pair["params"], bert["batch"], adapter_weights=dj.adapter_weights(pair["cfgs"], **weights)))


def test_named_import_matches_peft_per_adapter_mixed_and_summed(bert, peft_pair):
    model = peft_pair["model"]
    assert os.path.isdir(os.path.join(peft_pair["folder"], "other"))
    assert dj.adapter_names(peft_pair["params"]) == ["default", "other"]
    outs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outs[name] = torch_classifier_logits(model, bert["batch"])
        np.testing.assert_allclose(_ours(bert, peft_pair, active=name), outs[name], atol=TOL, rtol=0)
    base = torch_classifier_logits(bert["torch"], bert["batch"])
    assert np.abs(outs["default"] - outs["other"]).max() > 0.1 and np.abs(outs["other"] - base).max() > 0.1
    # a mixed batch: PEFT's adapter_names (its LoRA layers and its modules_to_save heads route per example)
    model.set_adapter("default")
    batch = {k: torch.as_tensor(np.asarray(v)) for k, v in bert["batch"].items()}
    with torch.no_grad():
        theirs = model(**batch, adapter_names=NAMES).logits.numpy()
    picks = [None if n == "__base__" else n for n in NAMES]
    np.testing.assert_allclose(_ours(bert, peft_pair, per_example=picks), theirs, atol=TOL, rtol=0)
    np.testing.assert_allclose(theirs[1], base[1], atol=TOL, rtol=0)


def test_two_active_adapters_match_peft(bert, tmp_path):
    """PEFT's set_adapter([a, b]) sums the LoRA updates (no task type: PEFT keeps one head active only)."""
    model = peft.get_peft_model(copy.deepcopy(bert["torch"]), peft.LoraConfig(r=4, lora_alpha=8,
                                                                             target_modules=["query", "value"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["value", "output.dense"]))
    _perturb(model, 1)
    model.eval()
    model.save_pretrained(tmp_path)
    params, cfgs = bert["params"], {}
    for name in ("default", "other"):
        params, cfgs[name] = dj.import_peft(tmp_path, params, arch="bert", name=name)
    model.base_model.set_adapter(["default", "other"])
    theirs = torch_classifier_logits(model, bert["batch"])
    ours = _ours(bert, {"params": params, "cfgs": cfgs}, active=["default", "other"])
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    model.base_model.set_adapter("default")
    assert np.abs(theirs - torch_classifier_logits(model, bert["batch"])).max() > 0.1


def test_named_export_loads_in_peft(bert, peft_pair, tmp_path):
    from transformers import BertForSequenceClassification

    out = tmp_path / "export"
    for name in ("other", "default"):  # the default written last keeps other/ in place
        dj.export_peft(peft_pair["params"], peft_pair["cfgs"][name], out, base_model_name_or_path=bert["folder"],
                       arch="bert", name=name)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    torch_base = BertForSequenceClassification.from_pretrained(bert["folder"]).eval()
    loaded = peft.PeftModel.from_pretrained(torch_base, out)
    loaded.load_adapter(out / "other", adapter_name="other")
    loaded.eval()
    batch = {k: torch.as_tensor(np.asarray(v)) for k, v in bert["batch"].items()}
    with torch.no_grad():
        theirs = loaded(**batch, adapter_names=NAMES).logits.numpy()
    picks = [None if n == "__base__" else n for n in NAMES]
    np.testing.assert_allclose(_ours(bert, peft_pair, per_example=picks), theirs, atol=TOL, rtol=0)
    # a single adapter of the tree exports as before: select it, or name it
    with pytest.raises(dj.ConfigError, match="already hold an adapter named 'other'"):
        dj.import_peft(peft_pair["folder"], peft_pair["params"], arch="bert", name="other")
