"""Several processes (hosts) on localhost: `decomp-jax train` with --coordinator/--num-processes/
--process-id, 2 processes x 4 simulated CPU devices each (gloo collectives), FSDP over all 8 (the
trained word embeddings are split across the processes, so checkpoints, checksums and the adapter
file gather them). The metrics equal the one-process run; kill -9 of one process ends the other with a message naming it; --resume continues
exactly; the checkpoint restores onto 1 x 8 and 1 x 1 devices; an unreachable coordinator is a clear
error."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from decomp_jax.app.experiment import load_config, run

REPO = Path(__file__).resolve().parents[2]
SST2 = REPO.parent / "shared" / "data" / "glue" / "SST-2"
STEPS = 12


def _sets(model_dir):
    return [f"model.name={model_dir}", f"data.path={SST2}", "data.max_train_samples=256", "data.max_eval_samples=32",
            "data.max_length=16", "adapter.rank=4", f"train.steps={STEPS}", "train.save_every=4", "train.log_every=1",
            "train.batch_size=8", "train.learning_rate=0.01",
            "adapter.train_extra=word_embeddings"]  # a trained (30522, 32) leaf: FSDP splits it across the processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir, out_dir, *extra, devices=4, processes=2):
    port = _free_port()
    argv = ["train", str(REPO / "configs" / "quickstart.yaml"), "--no-progress", "--output-dir", str(out_dir),
            *[x for s in [*_sets(model_dir), "train.mesh={fsdp: 8}"] for x in ("--set", s)], *extra]
    env = {**os.environ, "XLA_FLAGS": _device_flags(devices)}
    return [subprocess.Popen([sys.executable, "-m", "decomp_jax.app.cli", *argv, "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", str(processes), "--process-id", str(i), "--heartbeat-timeout", "5"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _device_flags(devices: int) -> str:
    """The suite's XLA flags (tests/conftest.py: fast CPU code generation) with ``devices`` CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def _records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_die_together_and_resume_exactly(tiny_model_dir, tmp_path):
    one = run(load_config(REPO / "configs" / "quickstart.yaml", [*_sets(tiny_model_dir), f"train.output_dir={tmp_path / 'one'}"]),
              progress=False)
    reference = {r["step"]: r["loss"] for r in _records(tmp_path / "one") if "loss" in r}

    out = tmp_path / "two"
    procs = _launch(tiny_model_dir, out)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "checkpoints" / "4").is_dir() and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
    killed = time.time()
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=120)
    ended = time.time() - killed
    print(f"process 0 ended {ended:.1f} s after process 1 was killed")
    assert ended < 60
    assert procs[0].returncode == 2
    assert "a peer died: process 1 " in err and "--resume" in err, err[-2000:]
    assert not (out / "metrics.json").exists()

    procs = _launch(tiny_model_dir, out, "--resume")
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "resuming at step" in outputs[0][0] and "2 processes, 8 devices" in outputs[0][0]
    # only process 0 prints (gloo itself writes "[Gloo] Rank i is connected to ... peer ranks" lines to stdout,
    # from several threads, sometimes interleaved)
    assert [ln for ln in outputs[1][0].splitlines() if ln.strip() and "Gloo" not in ln and "peer ranks" not in ln] == []
    losses = {r["step"]: r["loss"] for r in _records(out) if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in reference], list(reference.values()), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "metrics.json").read_text())["eval"] == one["eval"]
    assert not (out / ".processes").exists()

    # the 2 x 4 checkpoint restores onto 1 x 1 (here) and 1 x 8 (a subprocess) devices
    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from multihost_worker import restore_and_compare

    single = restore_and_compare(out, "null")
    env = {**os.environ, "XLA_FLAGS": _device_flags(8)}
    eight = json.loads(subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "multihost_worker.py"), str(out),
                                       "{data: 2, fsdp: 4}"], env=env, capture_output=True, text=True, check=True
                                      ).stdout.splitlines()[-1])
    assert (single["step"], single["devices"]) == (STEPS, 1) and single["max_diff"] == 0.0
    assert (eight["step"], eight["devices"]) == (STEPS, 8) and eight["max_diff"] == 0.0


def test_unreachable_coordinator_is_a_clear_error(tiny_model_dir, tmp_path):
    port = _free_port()  # nobody listens there
    proc = subprocess.run([sys.executable, "-m", "decomp_jax.app.cli", "train", str(REPO / "configs" / "quickstart.yaml"),
                           "--set", f"model.name={tiny_model_dir}", "--output-dir", str(tmp_path / "run"),
                           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                           "--init-timeout", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"could not reach the coordinator at 127.0.0.1:{port} within 2 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_multiprocess_settings_are_checked_before_anything_starts():
    import pytest

    from decomp_jax.parallel.distributed import DistributedError, settings

    assert settings() is None
    assert settings("10.0.0.1:1234", 4, 3) == {"coordinator": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    for args, message in [(("10.0.0.1:1234", 4, None), "missing --process-id"),
                          (("10.0.0.1:1234", 2, 2), "must be in 0..1"),
                          (("10.0.0.1", 2, 0), "is not HOST:PORT")]:
        with pytest.raises(DistributedError, match=message):
            settings(*args)
