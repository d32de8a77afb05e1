"""The example scripts run: each of examples/*.py in its own process, at small sizes, and what it prints
holds (the loss goes down, merged equals factored, PEFT in PyTorch equals JAX, the mesh equals one device,
the quantized base stays quantized). The environment is the suite's, passed through as it is."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

NUMBER = r"([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:e[-+]?\d+)?)"  # 1.5e-07, 12,345


def run(script: str, *args: str) -> str:
    """The stdout of ``python examples/<script> <args>`` run from the repository root; it must succeed."""
    done = subprocess.run([sys.executable, f"examples/{script}", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    print(done.stdout)
    return done.stdout


def numbers(text: str, pattern: str) -> list[float]:
    """The numbers of the first line matching ``pattern`` (``{}`` marks each number)."""
    match = re.search(pattern.replace("{}", NUMBER), text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return [float(g.replace(",", "")) for g in match.groups()]


def every(text: str, pattern: str) -> list[list[float]]:
    return [[float(g.replace(",", "")) for g in m] for m in re.findall(pattern.replace("{}", NUMBER), text)]


def check_trained_and_merged(out: str) -> None:
    first, last = numbers(out, r"loss {} -> {}")
    assert last < 0.8 * first, (first, last)
    (effect,) = numbers(out, r"the adapter moves the outputs by up to {}")
    (diff,) = numbers(out, r"merged vs factored outputs: max \|diff\| {}")
    assert effect > 0.05 and diff < 1e-4, (effect, diff)


def test_linen_lora_loop():
    out = run("linen_lora_loop.py", "--width", "64", "--batch", "32", "--steps", "40", "--lr", "1e-2")
    trainable, total = numbers(out, r"trainable {} of {} parameters")
    assert 0 < trainable < 0.2 * total
    check_trained_and_merged(out)


def test_nnx_model():
    out = run("nnx_model.py", "--width", "64", "--batch", "32", "--steps", "40", "--lr", "1e-2")
    check_trained_and_merged(out)
    assert "base kernels and biases unchanged: True" in out


def test_peft_round_trip(tmp_path):
    pytest.importorskip("peft")
    out = run("peft_round_trip.py", "--base", "tiny", "--steps", "4", "--out", str(tmp_path))
    first, last = numbers(out, r"loss {} -> {}")
    assert last < first
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    (without,) = numbers(out, r"PyTorch without the adapter vs JAX logits: max \|diff\| {}")
    (diff,) = numbers(out, r"PEFT \(PyTorch\) vs JAX logits: max \|diff\| {}")
    assert diff < 1e-4 and without > 1e-2, (diff, without)
    assert "imported back as lora rank 8" in out
    (back,) = numbers(out, r"imported back .*max \|diff\| {}")
    assert back < 1e-5


def test_mesh_run():
    out = run("mesh_run.py", "--steps", "2", "--hidden", "64", "--layers", "1", "--length", "8")
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    steps = every(out, r"loss one device {}  mesh {}")
    assert len(steps) == 2 and all(abs(a - b) < 1e-5 for a, b in steps), steps
    assert steps[1][0] < steps[0][0]
    assert "kernel P(None, 'tensor'), lora_a P(None, None), lora_b P(None, 'tensor')" in out  # q_proj
    (diff,) = numbers(out, r"final adapter max \|diff\| {}")
    assert diff < 1e-4


def test_qlora_decoder():
    out = run("qlora_decoder.py", "--hidden", "128", "--layers", "1", "--steps", "6", "--batch", "8", "--length", "16")
    kernels, full, quantized = numbers(out, r"{} frozen kernels in nf4: base {} bytes in float32, {} quantized")
    assert kernels == 8 and quantized < 0.35 * full  # q, k, v, o, gate, up, down, lm_head
    first, last = numbers(out, r"loss {} -> {}")
    assert last < first
    assert "trained leaves: ['float32']; frozen kernels still nf4: True" in out
