"""Finished runs: restore from a checkpoint alone, merged export in Flax and PyTorch formats."""


import numpy as np
import pytest

from decomp_jax.app import cli
from decomp_jax.app.experiment import Task, load_config, run
from decomp_jax.app.runs import adapted_apply, restore_run

from conftest import DATA, REPO

SST2 = str(DATA / "glue" / "SST-2")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={tiny_model_dir}", f"data.path={SST2}", "data.max_train_samples=128", "data.max_eval_samples=32",
        "data.max_length=24", "adapter.method=dora", "adapter.rank=4", "train.steps=6", "train.save_every=3",
        "train.learning_rate=0.02", "train.batch_size=16", f"train.output_dir={out}",
    ])
    record = run(cfg, progress=False)
    task = Task(cfg, need_train=False)
    batch = {k: v[:8] for k, v in task.eval_arrays.items()}
    return out, record, batch


def test_restore_run_reproduces_the_final_metrics(finished_run):
    out, record, batch = finished_run
    restored = restore_run(out)
    assert restored.step == 6 and restored.cfg.adapter.method == "dora"
    assert restore_run(out / "checkpoints" / "3").step == 3
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        restore_run(out / "config.yaml")
    # the restored adapter is the trained one: eval on the same rows as the run gives its metrics
    task = Task(restored.cfg, need_train=False)
    from decomp_jax.core.inject import partition

    trainable, buffers, frozen = partition(restored.params, restored.cfg.adapter)
    task.frozen = frozen
    assert task.evaluate(trainable, buffers) == record["eval"]


def test_merge_cli_writes_pytorch_weights_with_the_same_outputs(finished_run, tmp_path):
    out, _, batch = finished_run
    merged_dir = tmp_path / "merged"
    assert cli.main(["merge", "--checkpoint", str(out), "--out", str(merged_dir)]) == 0
    assert not (merged_dir / "flax_model.msgpack").exists()
    expected = np.asarray(adapted_apply(restore_run(out))(batch))
    # config.json + model.safetensors, read back by our native loader (no transformers Flax class)
    from decomp_jax.models.hf import load_sequence_classifier

    model, params, _ = load_sequence_classifier(str(merged_dir), 2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    np.testing.assert_allclose(np.asarray(model(**inputs, params=params).logits), expected, atol=1e-5)


def test_merged_safetensors_load_in_pytorch(finished_run, tmp_path):
    torch = pytest.importorskip("torch")
    out, _, batch = finished_run
    from decomp_jax.app.runs import export_merged
    from transformers import BertForSequenceClassification

    export_merged(restore_run(out), tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = model(**{k: torch.as_tensor(np.asarray(batch[k])).long() for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    np.testing.assert_allclose(logits.numpy(), np.asarray(adapted_apply(restore_run(out))(batch)), atol=1e-5)


def test_merge_refuses_a_non_mergeable_adapter(tiny_model_dir, tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={tiny_model_dir}", f"data.path={SST2}", "data.max_train_samples=32", "data.max_eval_samples=16",
        "data.max_length=16", "adapter.method=houlsby", "adapter.rank=4", "train.steps=1", "train.batch_size=8",
        f"train.output_dir={tmp_path / 'run'}",
    ])
    run(cfg, progress=False)
    assert cli.main(["merge", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
    assert "not mergeable" in capsys.readouterr().err
