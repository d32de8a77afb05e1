"""Real model, real data: all-MiniLM-L6-v2 on SST-2, a few steps end to end."""

import json

import jax
import numpy as np
import pytest

from decomp_jax.app import cli
from decomp_jax.app.experiment import Task, evaluate_run, load_config, run
from decomp_jax.data import glue
from decomp_jax.training.losses import classification_loss
import decomp_jax as dj

from conftest import DATA, REPO

SST2 = str(DATA / "glue" / "SST-2")


def small_config(tmp_path, *extra):
    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"data.path={SST2}", "data.max_train_samples=256", "data.max_eval_samples=96",
        "data.max_length=32", "train.steps=12", "train.log_every=4", "train.learning_rate=0.003",
        "train.warmup_ratio=0.0", f"train.output_dir={tmp_path}", *extra,
    ])


@pytest.mark.slow  # 40 s; the quick start's accuracy test (slow too) covers the same path at full length
def test_minilm_lora_lowers_the_loss_on_sst2(tmp_path):
    cfg = small_config(tmp_path)
    task = Task(cfg)
    batches = [glue.train_batch(task.train_arrays, 32, i, 0) for i in range(4)]

    def eval_loss(trainable):
        params = dj.combine(trainable, task.frozen)
        return np.mean([float(classification_loss(task.apply(params, b, train=False), b["labels"])) for b in batches])

    opt = dj.make_optimizer(5e-3, 20, warmup_ratio=0.0)
    step = dj.make_train_step(task.loss, opt, cfg.adapter)
    state = dj.init_state(task.trainable, opt, jax.random.PRNGKey(0))
    before = eval_loss(state.trainable)
    for i in range(20):
        state, _ = step(state, task.frozen, batches[i % 4])
    after = eval_loss(state.trainable)
    assert after < before - 0.05, (before, after)


def test_run_writes_metrics_and_eval_reproduces_them(tiny_model_dir, tmp_path):
    """On the tiny BERT (the real MiniLM trains in test_minilm_methods and, with -m slow, the quick start)."""
    cfg = small_config(tmp_path, f"model.name={tiny_model_dir}", "adapter.method=ssb",
                       "adapter.targets=attention/self/(key|value)$|intermediate/dense$")
    record = run(cfg, progress=False)
    assert set(record) >= {"task", "method", "eval", "train_seconds", "trainable_params"}
    assert record["task"] == "sst2" and record["method"] == "ssb" and 0.0 <= record["eval"]["accuracy"] <= 1.0
    # SSB on key, value and intermediate: (32 + 32) * 2 * 2 + (32 + 64) * 2 (2 layers), plus the 2-way head
    assert record["trainable_params"] == (32 + 32) * 2 * 2 + (32 + 64) * 2 + 32 * 2 + 2
    assert json.loads((tmp_path / "metrics.json").read_text()) == record
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [4, 8, 12]
    assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)
    assert lines[-1]["eval"] == record["eval"]
    again = evaluate_run(tmp_path)
    assert again["eval"] == record["eval"]


def test_stateful_method_run_and_eval_from_its_folder(tiny_model_dir, tmp_path):
    """LoRA-Dash through the runner (on the tiny BERT): its directions (state buffers) are saved with
    the adapter."""
    cfg = small_config(tmp_path, f"model.name={tiny_model_dir}", "adapter.method=lora_dash",
                       "adapter.options={warmup_steps: 6, dash_k: 4}")
    record = run(cfg, progress=False)
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "adapter.safetensors"))
    dash_u = [v for k, v in stored.items() if k.endswith("dash_u")]
    assert len(dash_u) == 4 and all(np.abs(v).sum() > 0 for v in dash_u)  # 2 layers x query, value
    assert evaluate_run(tmp_path)["eval"] == record["eval"]


def test_cli_methods_and_errors(tmp_path, capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in dj.methods.names():
        assert name in out
    assert "K' = scale_in[:, None] * K * scale_out[None, :]" in out

    # with a config: each method's trainable count on its model (MiniLM: 6 layers, hidden 384)
    assert cli.main(["methods", str(REPO / "configs" / "quickstart.yaml")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    head = 384 * 2 + 2  # train_extra: the new classifier
    assert rows["lora"][2] == f"{6 * 2 * (384 * 8 + 8 * 384) + head:,}"  # = the quick start's count
    assert rows["ssb"][2] == f"{6 * 2 * (384 + 384) + head:,}"
    assert rows["adalora"][2] == f"{6 * 2 * (384 * 8 + 8 + 8 * 384) + head:,}"
    assert rows["lora_dash"][2] == f"{6 * 2 * (384 * 8 + 8 * 384 + 8) + head:,}"  # dash_u/dash_vt are buffers
    assert rows["svdiff"][2] == f"{6 * 2 * 384 + head:,}"
    assert rows["houlsby"][3] == f"{1000 * (6 * 2 * (384 * 8 + 8 + 8 * 384 + 384) + head) / 22_713_986:.3f}‰"

    # (its own output folder: a quick start run in this checkout leaves checkpoints in runs/quickstart)
    code = cli.main(["train", str(REPO / "configs" / "quickstart.yaml"), "--set", f"data.path={tmp_path}/nowhere",
                     "--set", "data.hub=null", "--set", f"train.output_dir={tmp_path}/run"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "data.path" in err

    code = cli.main(["train", str(REPO / "configs" / "quickstart.yaml"), "--set", "adapter.rnak=3",
                     "--set", f"train.output_dir={tmp_path}/run"])
    assert code == 2
    assert "Did you mean 'rank'" in capsys.readouterr().err

    code = cli.main(["eval", str(tmp_path)])
    assert code == 2
    assert "adapter.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_reaches_target(tmp_path):
    """The README's quick start: >= 0.85 dev accuracy (run with `pytest -m slow`)."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"data.path={SST2}", f"train.output_dir={tmp_path}"])
    record = run(cfg, progress=False)
    assert record["eval"]["accuracy"] >= 0.85, record


def test_every_shipped_config_loads():
    """configs/ (the quick start, the commonsense settings, the FSDP one) parse and validate (the study
    files of configs/study are checked in tests/app/test_study.py)."""
    loaded = {p.name: load_config(p) for p in sorted((REPO / "configs").rglob("*.yaml")) if p.parent.name != "study"}
    assert {"quickstart.yaml", "smollm2_lora.yaml", "smollm2_lora_cpu.yaml", "smollm2_lora_fsdp.yaml"} <= set(loaded)
    fsdp = loaded["smollm2_lora_fsdp.yaml"]
    assert fsdp.train.mesh == {"data": 1, "fsdp": -1, "tensor": 1}
    assert (fsdp.model.param_dtype, fsdp.model.scan_layers, fsdp.train.remat) == ("bfloat16", True, True)


def test_regression_head_bias_starts_at_the_label_mean(tiny_model_dir, tmp_path):
    """model.head_bias: label_mean (STS-B): the new head's bias is the mean of the training labels, in
    training and when a finished run is evaluated from its folder; refused for classification tasks."""
    from decomp_jax.data import glue
    from decomp_jax.app.experiment import ExperimentConfig, Task

    import shutil

    from transformers import BertConfig

    from decomp_jax.models.bert import NativeSequenceClassifier

    folder = tmp_path / "tiny_regressor"  # the tiny BERT with a one-output head
    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=1)
    NativeSequenceClassifier(config, seed=0).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    sts = REPO.parent / "shared" / "data" / "glue" / "STS-B"
    data = {"model": {"name": str(folder), "head_bias": "label_mean"},
            "data": {"task": "stsb", "path": str(sts), "max_train_samples": 64, "max_length": 32},
            "adapter": {"method": "lora", "targets": "attention/self/(query|value)$", "rank": 2, "train_extra": "^classifier/"},
            "train": {"steps": 2, "batch_size": 8, "output_dir": str(tmp_path / "run")}}
    cfg = ExperimentConfig.from_dict(data)
    mean = float(np.mean(glue.load_examples("stsb", "train", sts, max_samples=64, seed=0).labels))
    assert 1.0 < mean < 4.0
    for need_train in (True, False):
        task = Task(cfg, need_train=need_train)
        np.testing.assert_allclose(np.asarray(task.base_params["classifier"]["bias"]), [mean], rtol=1e-6)
    with pytest.raises(dj.ConfigError, match="applies to regression tasks"):
        ExperimentConfig.from_dict({**data, "data": {"task": "rte", "path": str(sts.parent / "RTE")}})
