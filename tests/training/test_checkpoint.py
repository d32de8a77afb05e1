"""Adapter-only Orbax checkpoints: exact resume, fingerprints, atomic saves, size."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax.app.experiment import load_config, run
from decomp_jax.training import checkpoint
import decomp_jax as dj

from conftest import DATA, REPO
from helpers import records_kept

SST2 = str(DATA / "glue" / "SST-2")
METHOD_SETTINGS = {
    "lora": [],
    "dora": [],
    "ssb": ["adapter.targets=attention/self/(key|value)$|intermediate/dense$"],
    "adalora": ["adapter.options={target_rank: 2, interval: 2, t_init: 0.1, t_final: 0.2}"],
    "lora_dash": ["adapter.options={warmup_steps: 3, dash_k: 4}"],
    "flexlora": ["adapter.rank=2", "adapter.options={max_rank: 4, interval: 2, b: 2}"],
    "pissa": [],
}


def tiny_config(model_dir, out_dir, *extra):
    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={model_dir}", f"data.path={SST2}", "data.max_train_samples=256", "data.max_eval_samples=64",
        "data.max_length=32", "adapter.rank=4", "train.steps=12", "train.log_every=1", "train.save_every=4",
        "train.learning_rate=0.01", "train.batch_size=16", f"train.output_dir={out_dir}", *extra,
    ])


class Killed(Exception):
    pass


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


# AdaLoRA (a stateful method: its schedule's state resumes too) by default; lora_dash, flexlora, lora, dora, ssb,
# pissa with -m slow (test_multihost.py resumes a killed lora run through the CLI in the default suite)
@pytest.mark.parametrize("method", [m if m == "adalora" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHOD_SETTINGS])
def test_killed_and_resumed_run_equals_the_uninterrupted_run(method, tiny_model_dir, tmp_path):
    extra = [f"adapter.method={method}", *METHOD_SETTINGS[method]]
    full = run(tiny_config(tiny_model_dir, tmp_path / "full", *extra), progress=False)

    def kill_at_7(step, metrics):
        if step == 7:
            raise Killed

    cfg = tiny_config(tiny_model_dir, tmp_path / "resumed", *extra)
    with pytest.raises(Killed):
        run(cfg, progress=False, on_step=kill_at_7)
    assert sorted(_losses(tmp_path / "resumed")) == list(range(1, 8))
    resumed = run(cfg, progress=False, resume=True)  # from the checkpoint at step 4
    full_losses, resumed_losses = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed_losses) == list(range(1, 13))
    np.testing.assert_allclose([resumed_losses[s] for s in range(1, 13)], [full_losses[s] for s in range(1, 13)],
                               rtol=1e-6, atol=1e-6)
    assert resumed["eval"] == pytest.approx(full["eval"], abs=1e-6)


def test_resume_refuses_another_base_model_or_config(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "train.steps=4")
    run(cfg, progress=False)
    with pytest.raises(dj.ConfigError, match="already holds checkpoints.*--resume"):
        run(cfg, progress=False)
    with pytest.raises(dj.ConfigError, match=r"--resume cannot change train.learning_rate \(0.01 -> 0.5\)"):
        run(cfg.__class__(**{**cfg.__dict__, "train": cfg.train.replace(learning_rate=0.5)}), progress=False, resume=True)


def _tiny_state(tiny_bert, cfg):
    _, base = tiny_bert
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, buffers, frozen = dj.partition(params, cfg)
    opt = dj.make_optimizer(1e-3, 10)
    return dj.init_state(trainable, opt, jax.random.PRNGKey(1), buffers=buffers), frozen, base


def test_restore_onto_another_base_model_says_what_differs(tiny_bert, tmp_path):
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=2)
    state, frozen, base = _tiny_state(tiny_bert, cfg)
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(base, cfg, "bert"))
    # same shapes, other values
    other = jax.tree.map(lambda x: x + 1.0, base)
    with pytest.raises(dj.ConfigError, match="targeted kernels hold different values"):
        checkpoint.restore(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(other, cfg, "bert"))
    # another architecture and shapes
    from transformers import BertConfig

    from decomp_jax.models.bert import NativeSequenceClassifier

    wider = NativeSequenceClassifier(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64), seed=0).params
    with pytest.raises(dj.ConfigError, match=r"changed shape.*query/kernel: \[32, 32\] float32 saved vs \[48, 48\]"):
        checkpoint.restore(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(wider, cfg, "bert"))
    with pytest.raises(dj.ConfigError, match="architecture 'bert' in .* vs 'roberta' now"):
        checkpoint.restore(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(base, cfg, "roberta"))
    with pytest.raises(dj.ConfigError, match=r"adapter config differs.*'rank': \(2, 3\)"):
        checkpoint.restore(mngr, state, frozen, cfg.replace(rank=3), fingerprint=checkpoint.fingerprint(base, cfg, "bert"))
    restored, _, _ = checkpoint.restore(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(base, cfg, "bert"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))


def test_keeps_the_last_k_and_the_best(tiny_bert, tmp_path):
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=2)
    state, frozen, base = _tiny_state(tiny_bert, cfg)
    fp = checkpoint.fingerprint(base, cfg)
    mngr = checkpoint.manager(tmp_path, keep_last=2, keep_best=1, best_metric="accuracy")
    for step, acc in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, None)]:
        checkpoint.save(mngr, state.replace(step=jnp.int32(step)), frozen, cfg, fingerprint=fp,
                        metrics=None if acc is None else {"accuracy": acc})
    assert mngr.all_steps() == [2, 4, 5]
    mngr.close()


KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    import decomp_jax as dj
    from decomp_jax.training import checkpoint
    cfg = dj.AdapterConfig(method="lora", targets="dense$", rank=2)
    kernel = lambda n: {"kernel": jnp.zeros((n, n))}
    base = {"dense": kernel(4)}
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    opt = dj.make_optimizer(1e-3, 10)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(1))
    mngr = checkpoint.manager(sys.argv[1])
    checkpoint.save(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(base, cfg))
    print("saved 0", flush=True)
    # a large second save, killed while it is written
    big = {"dense": {**trainable["dense"], "lora_a": jnp.ones((4, 2))}}
    state = state.replace(step=jnp.int32(1), opt_state=jax.tree.map(lambda x: x, state.opt_state),
                          method_state={"ballast": jnp.ones((4096, 4096, 8))})
    checkpoint.save(mngr, state, frozen, cfg, fingerprint=checkpoint.fingerprint(base, cfg))
    print("saved 1", flush=True)
""")


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ckpt)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 0"
    deadline = time.time() + 60
    while time.time() < deadline and not any("tmp" in p for p in os.listdir(ckpt)):
        time.sleep(0.01)
    assert any("tmp" in p for p in os.listdir(ckpt)), os.listdir(ckpt)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cfg = dj.AdapterConfig(method="lora", targets="dense$", rank=2)
    base = {"dense": {"kernel": jnp.zeros((4, 4))}}
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    like = dj.init_state(trainable, dj.make_optimizer(1e-3, 10), jax.random.PRNGKey(1))
    mngr = checkpoint.manager(ckpt)
    assert mngr.latest_step() == 0
    restored, _, _ = checkpoint.restore(mngr, like, frozen, cfg, fingerprint=checkpoint.fingerprint(base, cfg))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(like), jax.device_get(restored))
    # the half-written folder is cleaned up: Orbax removes it in the background from the manager's creation
    # (finished before its next save), so the listing may still show it for a moment
    deadline = time.time() + 30
    while time.time() < deadline and any("tmp" in p for p in os.listdir(ckpt)):
        time.sleep(0.05)
    assert not any("tmp" in p for p in os.listdir(ckpt)), os.listdir(ckpt)
    mngr.close()


@pytest.mark.slow  # 30 s; tests/parallel/test_multihost.py kills and resumes `decomp-jax train` in the default suite
def test_cli_run_killed_by_sigkill_resumes_to_the_same_losses(tiny_model_dir, tmp_path):
    """The real thing: `decomp-jax train` SIGKILLed mid-run, then `--resume`."""
    from decomp_jax.app import cli

    sets = [f"model.name={tiny_model_dir}", f"data.path={SST2}", "data.max_train_samples=512", "data.max_eval_samples=32",
            "data.max_length=16", "adapter.rank=4", "train.steps=48", "train.save_every=4", "train.log_every=1",
            "train.batch_size=8", "train.learning_rate=0.01"]
    argv = ["train", str(REPO / "configs" / "quickstart.yaml"), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "full")]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "decomp_jax.app.cli", *argv, "--output-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "8").is_dir():
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert cli.main([*argv, "--output-dir", str(killed), "--resume"]) == 0
    full, resumed = _losses(tmp_path / "full"), _losses(killed)
    assert sorted(resumed) == list(range(1, 49))
    np.testing.assert_allclose([resumed[s] for s in range(1, 49)], [full[s] for s in range(1, 49)], rtol=1e-6, atol=1e-6)
    assert json.loads((killed / "metrics.json").read_text())["eval"] == json.loads((tmp_path / "full" / "metrics.json").read_text())["eval"]


def test_resuming_a_finished_run_only_reevaluates(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "train.steps=4")
    record = run(cfg, progress=False)
    again = run(cfg, progress=False, resume=True)
    assert again["eval"] == record["eval"] and again["steps"] == 4
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2, 3, 4]


def test_the_echo_of_a_failed_orbax_write_is_dropped_and_other_errors_pass():
    """asyncio's "Future exception was never retrieved" for a write Orbax's worker threads failed (its
    message names no module; its traceback runs through orbax) is dropped by the filter the checkpoint
    module puts on asyncio's logger; the same message from elsewhere still reaches the handlers."""
    assert checkpoint.manager  # (the module is imported: its filter is installed)
    assert records_kept("asyncio", "Future exception was never retrieved\nfuture: <Future finished exception=%r>",
                        ("/site-packages/orbax/checkpoint/_src/path/async_path.py", "/home/me/my_code.py")) == [
        "/home/me/my_code.py"]
