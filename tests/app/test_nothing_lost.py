"""Output folders that refuse what their writer did not write, one run per folder, results kept
when the final checkpoint cannot be written, interrupted and extended runs, damaged files named."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from decomp_jax import guards
from decomp_jax.app import cli, sweep as study
from decomp_jax.app.experiment import evaluate_run, load_config, run
from decomp_jax.app.runs import AdapterFileFallbackWarning, export_merged, export_peft_run, restore_run
from decomp_jax.errors import ConfigError

from conftest import DATA, REPO
from helpers import records_kept
from test_study import write_study

SST2 = str(DATA / "glue" / "SST-2")
QUICK = str(REPO / "configs" / "quickstart.yaml")


def tiny(model_dir, out_dir, *extra):
    return [f"model.name={model_dir}", f"data.path={SST2}", "data.max_train_samples=64", "data.max_eval_samples=16",
            "data.max_length=16", "adapter.rank=4", "train.steps=4", "train.log_every=1", "train.learning_rate=0.01",
            "train.batch_size=16", f"train.output_dir={out_dir}", *extra]


def tiny_config(model_dir, out_dir, *extra):
    return load_config(QUICK, tiny(model_dir, out_dir, *extra))


def tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- output folders ---------------------------------------------------------------------------------

def _write_output(tmp: Path, manifest: str = "made.json") -> None:
    (tmp / "model.bin").write_bytes(b"new")
    guards.write_manifest(tmp, manifest, {"what": "test"})


def ours(folder):
    return guards.manifest_files(folder, "made.json")


def test_an_output_folder_replaces_its_own_output_and_refuses_everything_else(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with guards.atomic_folder(out, ours=ours) as tmp:
        _write_output(tmp)
    assert json.loads((out / "made.json").read_text())["files"] == ["model.bin"]
    (out / "model.bin").write_bytes(b"old")
    with guards.atomic_folder(out, ours=ours) as tmp:  # its own earlier output: replaced whole
        _write_output(tmp)
    assert (out / "model.bin").read_bytes() == b"new"

    (out / "notes.txt").write_text("mine")  # the user's file: refused, nothing touched
    before = tree(out)
    with pytest.raises(guards.OutputExistsError, match=r"holds files it did not write \(notes.txt\).*--overwrite"):
        with guards.atomic_folder(out, ours=ours):
            raise AssertionError("not reached")
    assert tree(out) == before
    with guards.atomic_folder(out, ours=ours, overwrite=True) as tmp:  # --overwrite: written into it, the rest kept
        (tmp / "model.bin").write_bytes(b"newer")
    assert tree(out) == {**before, "model.bin": b"newer"}

    run_dir = tmp_path / "runs" / "r1"  # a run folder, and a folder of runs
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(guards.OutputExistsError, match=r"is a training run's folder \(checkpoints, metrics.json\)"):
        guards.check_output_folder(run_dir, ours=ours, writer="merge")
    with pytest.raises(guards.OutputExistsError, match=r"holds run folders \(r1\); merge writes a folder of its own"):
        guards.check_output_folder(tmp_path / "runs", ours=ours, writer="merge")
    monkeypatch.chdir(out)  # the current directory and its ancestors: refused even when empty of others
    with pytest.raises(guards.OutputExistsError, match="is the current directory"):
        guards.check_output_folder(".", ours=ours)
    with pytest.raises(guards.OutputExistsError, match="holds the current directory"):
        guards.check_output_folder(tmp_path, ours=ours)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(guards.OutputExistsError, match="exists and is not a folder"):
        guards.check_output_folder(tmp_path / "afile")


def test_a_failed_write_leaves_the_folder_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    with guards.atomic_folder(out, ours=ours) as tmp:
        _write_output(tmp)
    before = tree(out)
    with pytest.raises(OSError, match="No space"):
        with guards.atomic_folder(out, ours=ours) as tmp:
            (tmp / "model.bin").write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_writer_are_removed_and_a_moved_folder_put_back(tmp_path):
    dead = _dead_pid()
    target = tmp_path / "merged"
    stale_tmp = tmp_path / f".merged.{dead}@{guards._host()}.ab12.tmp"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_bytes(b"half")
    moved = tmp_path / f".merged.{dead}@{guards._host()}.cd34.old"  # killed between moving aside and renaming
    moved.mkdir()
    (moved / "model.safetensors").write_bytes(b"the previous merge")
    live = tmp_path / f".merged.{os.getppid()}@{guards._host()}.ef56.tmp"  # a live writer's: left alone
    live.mkdir()
    removed = guards.remove_stale_temporaries(target)
    assert removed == [stale_tmp]
    assert (target / "model.safetensors").read_bytes() == b"the previous merge"
    assert sorted(os.listdir(tmp_path)) == sorted(["merged", live.name])


# -- one run per folder ----------------------------------------------------------------------------

HOLDER = r"""
import fcntl, json, os, socket, sys, time
folder = sys.argv[1]
os.makedirs(folder, exist_ok=True)
fd = os.open(os.path.join(folder, ".decomp_jax.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then",
                          "command": "the other run"}).encode(), 0)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds (as a running ``decomp-jax train`` does)."""
    folder = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_holder_taken_over(held, tiny_model_dir, capsys):
    folder, proc = held
    assert guards.lock_holder(folder)["pid"] == proc.pid
    before = sorted(os.listdir(folder))
    with pytest.raises(guards.FolderInUseError, match=rf"in use by another run: pid {proc.pid} .*the other run.*"
                                                      r"choose another train.output_dir"):
        run(tiny_config(tiny_model_dir, folder), progress=False)
    assert sorted(os.listdir(folder)) == before  # nothing written
    args = ["train", QUICK, "--no-progress"] + [a for kv in tiny(tiny_model_dir, folder) for a in ("--set", kv)]
    assert cli.main(args) == 2  # the command: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by another run: pid {proc.pid}" in err
    proc.kill()
    proc.wait()
    assert guards.lock_holder(folder) is None
    with pytest.warns(UserWarning, match=rf"took over the lock of .* left by pid {proc.pid}"):
        with guards.folder_lock(folder):
            assert guards.lock_holder(folder)["pid"] == os.getpid()
    assert not (folder / guards.LOCK_NAME).exists()


def test_the_sweep_leaves_a_cell_in_use_to_its_process(held, tmp_path):
    folder, proc = held
    spec = study.load_study(write_study(tmp_path))
    spec.grid = {"train.seed": [0, 1]}
    cells = study.expand(spec)
    busy = spec.output_dir / "runs" / cells[0].id
    busy.parent.mkdir(parents=True)
    shutil.move(str(folder), str(busy))  # the holder's folder becomes the cell's (the lock moves with it)
    (busy / "metrics.jsonl").write_text('{"step": 1}\n')
    script = tmp_path / "cell.py"
    script.write_text("import sys, pathlib, yaml, json\nout = pathlib.Path(yaml.safe_load(open(sys.argv[1]))['train']"
                      "['output_dir']); out.mkdir(parents=True, exist_ok=True)\n(out / 'metrics.json').write_text("
                      "json.dumps({'eval': {'accuracy': 1.0}}))\n")
    lines = []
    result = study.sweep(spec, log=lines.append, poll_s=0.05, command=lambda d, c, r: [
        sys.executable, str(script), str(d / "configs" / f"{c.id}.yaml")])
    assert result["busy"] == [cells[0].id] and result["done"] == [cells[1].id] and not result["failed"]
    assert (busy / "metrics.jsonl").read_text() == '{"step": 1}\n'  # neither set aside nor written
    assert any(f"busy   {cells[0].id}: its run folder is in use by pid {proc.pid}" in line for line in lines)


def test_bad_output_folders_and_ranks_are_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import decomp_jax.app.experiment as experiment

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(experiment, "make_task", no_load)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run(tiny_config(tiny_model_dir, tmp_path / "afile"), progress=False)
    with pytest.raises(guards.UnwritableFolderError, match="cannot be created or written .*choose a folder you can write"):
        run(tiny_config(tiny_model_dir, tmp_path / "afile" / "run"), progress=False)
    with pytest.raises(ConfigError, match=r"adapter.rank=40 is larger than any layer .*hidden size 32"):
        run(tiny_config(tiny_model_dir, tmp_path / "r", "adapter.rank=40"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # no folder left behind


# -- a final checkpoint that cannot be written --------------------------------------------------------

@pytest.fixture(scope="module")
def no_final_checkpoint(tiny_model_dir, tmp_path_factory):
    """A run whose final checkpoint failed with a full disk (Orbax's save raises ENOSPC)."""
    from decomp_jax.training import checkpoint

    out = tmp_path_factory.mktemp("full") / "run"
    original = checkpoint.ocp.CheckpointManager.save

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    checkpoint.ocp.CheckpointManager.save = full
    try:
        with pytest.raises(checkpoint.CheckpointError, match=r"Could not write checkpoint step 4 .*the disk is full.*"
                                                             r"The results are kept: adapter.safetensors and metrics.json"):
            run(tiny_config(tiny_model_dir, out), progress=False)
    finally:
        checkpoint.ocp.CheckpointManager.save = original
    return out


def test_the_results_of_a_run_whose_final_checkpoint_failed_are_kept_and_usable(no_final_checkpoint, tmp_path):
    out = no_final_checkpoint
    record = json.loads((out / "metrics.json").read_text())
    assert record["checkpoint"] is None and record["steps"] == 4
    assert os.listdir(out / "checkpoints") == []
    evaluated = evaluate_run(out)
    assert evaluated["eval"] == record["eval"]
    with pytest.warns(AdapterFileFallbackWarning, match="no checkpoint holds its final step 4; using its "
                                                        "adapter.safetensors"):
        restored = restore_run(out)
    assert restored.step == 4
    export_peft_run(restored, tmp_path / "peft")
    info = export_merged(restored, tmp_path / "merged")
    assert info["source_step"] == 4 and "model.safetensors" in info["files"]
    with pytest.raises(ConfigError, match=r"--resume: .* holds a finished run .* but no checkpoint .* start a new "
                                          r"train.output_dir"):
        run(load_config(out / "config.yaml"), progress=False, resume=True)


def test_a_full_disk_mid_run_says_how_to_go_on(tiny_model_dir, tmp_path, monkeypatch):
    from decomp_jax.training import checkpoint

    original, calls = checkpoint.ocp.CheckpointManager.save, []

    def full_at_the_second(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full_at_the_second)
    out = tmp_path / "run"
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .*the disk is full.* Training stopped at step 2; the "
                                                         r"last checkpoint is step 1: .*continue with `decomp-jax train "
                                                         r".*config.yaml --resume`"):
        run(tiny_config(tiny_model_dir, out, "train.save_every=1"), progress=False)
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]  # the partial one is gone
    _unawaited_writes_are_not_echoed()
    _orbax_thread_errors_are_not_echoed()


def _orbax_thread_errors_are_not_echoed():
    """After a failed write, an Orbax worker thread that logs the error it ended on (with a traceback
    through Orbax's code) after the call has raised is not printed; absl records from elsewhere are."""
    assert records_kept("absl", "_SignalingThread.run() raised an exception: %s",
                        ("/site-packages/orbax/checkpoint/_src/futures/future.py", "/home/me/my_code.py")) == [
        "/home/me/my_code.py"]


def _unawaited_writes_are_not_echoed():
    """After a failed write, Orbax's serializing coroutines that never ran warn when collected (at exit,
    after the one-line error): those are silenced, others are not."""
    import gc
    import warnings

    def async_serialize_from_host():
        async def write_fragment():
            pass
        return write_fragment()

    async def unrelated():
        pass

    with warnings.catch_warnings(record=True) as seen:
        pending = [async_serialize_from_host(), unrelated()]
        del pending
        gc.collect()
    assert [str(w.message).split("'")[1].split(".")[-1] for w in seen] == ["unrelated"]


def test_ctrl_c_ends_train_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import decomp_jax.app.experiment as experiment

    def interrupted(cfg, **kwargs):
        (tmp_path / "run" / "checkpoints" / "3").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    assert cli.main(["train", QUICK, "--output-dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"decomp-jax: stopped (Ctrl-C); the last checkpoint is step 3 in {tmp_path / 'run' / 'checkpoints'}; continue "
        f"with `decomp-jax train {tmp_path / 'run' / 'config.yaml'} --resume`."]


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_says_so_in_one_line(tiny_model_dir, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "60k"):  # a small file system needs root (as CI has)
        pytest.skip("mounting a 60 KiB tmpfs needs root; test_the_results_of_a_run_whose_final_checkpoint_failed_"
                    "are_kept_and_usable covers the same failure from within")
    try:
        out = disk / "run"
        proc = subprocess.run([sys.executable, "-m", "decomp_jax.app.cli", "train", QUICK, "--no-progress",
                               *[a for kv in tiny(tiny_model_dir, out) for a in ("--set", kv)]],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 2
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr[-3000:]  # no echo of Orbax's worker threads
        assert "the disk is full (no space left on device)" in lines[0] and "The results are kept" in lines[0]
        assert json.loads((out / "metrics.json").read_text())["checkpoint"] is None
        assert os.listdir(out / "checkpoints") == []  # the partial checkpoint is removed: its space is back
        assert sorted(os.listdir(out)) == ["adapter.safetensors", "checkpoints", "config.yaml", "metrics.json",
                                           "metrics.jsonl"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- damaged files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_config(tiny_model_dir, out), progress=False)
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_byte_in_an_adapter_file_is_named(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    _flip(copy / "adapter.safetensors", -3)  # in the last tensor's data: the file still parses
    with pytest.raises(guards.ChecksumError, match=r"adapter.safetensors is corrupted: its tensors do not match the "
                                                   r"checksum"):
        evaluate_run(copy)
    # an export carries its checksum too, and import verifies it
    from decomp_jax.interop.peft import import_peft

    restored = restore_run(finished)
    export_peft_run(restored, tmp_path / "peft")
    import_peft(tmp_path / "peft", restored.base_params, arch="bert")  # as written: imports
    _flip(tmp_path / "peft" / "adapter_model.safetensors", -3)
    with pytest.raises(guards.ChecksumError, match=r"adapter_model.safetensors is corrupted"):
        import_peft(tmp_path / "peft", restored.base_params, arch="bert")


def test_a_changed_byte_in_a_checkpoints_metadata_is_detected(finished, tmp_path):
    from decomp_jax.training import checkpoint

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    meta = copy / "checkpoints" / "4" / "meta" / "metadata"
    text = meta.read_text()
    assert '"lora"' in text
    meta.write_text(text.replace('"lora"', '"lorb"', 1))  # still JSON, another method
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4 is corrupted: its metadata does not match"):
        restore_run(copy / "checkpoints" / "4")
    with pytest.warns(AdapterFileFallbackWarning, match="no checkpoint can be read .* using its adapter.safetensors "
                                                        r"\(step 4\)"):
        restored = restore_run(copy)
    assert restored.cfg.adapter.method == "lora" and restored.step == 4


def test_merge_refuses_a_run_folder_and_replaces_its_own_output(finished, tmp_path, capsys, monkeypatch):
    before = tree(finished)
    for out in (finished, finished.parent, "."):
        monkeypatch.chdir(tmp_path)
        assert cli.main(["merge", "--checkpoint", str(finished), "--out", str(out)]) == 2
        assert "writes a folder of its own and would replace it" in capsys.readouterr().err
    assert tree(finished) == before and os.listdir(tmp_path) == []
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--checkpoint", str(finished), "--out", str(merged)]) == 0
    first = tree(merged)
    assert cli.main(["merge", "--checkpoint", str(finished), "--out", str(merged)]) == 0  # its own output: replaced
    assert tree(merged).keys() == first.keys()
    (merged / "README.md").write_text("my notes")
    assert cli.main(["merge", "--checkpoint", str(finished), "--out", str(merged)]) == 2
    assert cli.main(["merge", "--checkpoint", str(finished), "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "README.md").read_text() == "my notes" and tree(merged).keys() == {*first, "README.md"}
    capsys.readouterr()


# -- interrupted and extended runs --------------------------------------------------------------------

def test_sigterm_stops_a_run_in_one_line_and_it_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "decomp_jax.app.cli", "train", QUICK, "--no-progress",
            *[a for kv in tiny(tiny_model_dir, out, "train.steps=400", "train.save_every=2") for a in ("--set", kv)]]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 300
    while not [p for p in (out / "checkpoints").glob("*") if p.name.isdigit()] and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130
    last = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert err.splitlines() == [f"decomp-jax: stopped (SIGTERM); the last checkpoint is step {last} in "
                                f"{out / 'checkpoints'}; continue with `decomp-jax train {out / 'config.yaml'} --resume`."]
    assert not (out / guards.LOCK_NAME).exists()
    record = run(load_config(out / "config.yaml", [f"train.steps={last + 2}"]), progress=False, resume=True)
    assert record["steps"] == last + 2


def test_resume_extends_a_run_and_names_what_it_cannot_change(finished, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    moved = [f"train.output_dir={copy}"]  # (config.yaml names the folder it was trained in)
    cfg = load_config(copy / "config.yaml", moved + ["train.learning_rate=0.5", "adapter.rank=8"])
    with pytest.raises(ConfigError, match=r"adapter.rank.*train.learning_rate") as info:
        run(cfg, progress=False, resume=True)
    assert "steps" in str(info.value)  # what may change is said too
    with pytest.raises(ConfigError, match="reached step 4 .*give at least 4"):
        run(load_config(copy / "config.yaml", moved + ["train.steps=3"]), progress=False, resume=True)
    capsys.readouterr()
    record = run(load_config(copy / "config.yaml", moved + ["train.steps=6", "train.log_every=2"]), progress=False,
                 resume=True)
    out = capsys.readouterr().out
    assert "resuming at step 4 of 4 with 6 steps now" in out and "train.log_every=2 (was 1)" in out
    assert record["steps"] == 6 and record["checkpoint"].endswith("checkpoints/6")
    logged = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 6]
    assert np.isfinite([r["loss"] for r in logged if "loss" in r]).all()
