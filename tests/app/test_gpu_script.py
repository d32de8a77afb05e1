"""scripts/gpu_llama_step.py, the GPU step benchmark, without a GPU: its table's MFU and ratios follow from the
FLOP formulas and the measured step times, and the long-sequence targets (1b bf16: full fine-tuning MFU >= 0.45,
our LoRA step <= 0.8x HF PEFT's) are checked from those rows, PASS and FAIL alike. The tiny CPU smoke run of
``--plan long`` (both frameworks, a few seconds of steps in subprocesses, about a minute) is `slow`."""

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_llama_step.py"


@pytest.fixture(scope="module")
def gls():
    spec = importlib.util.spec_from_file_location("gpu_llama_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(item: str, seconds: float) -> dict:
    return {"kind": "result", "item": item, "step_time_s": seconds, "trainable_params": 1, "loss_first": 12.0,
            "loss_last": 11.0, "finite": True}


def test_mfu_and_the_long_sequence_targets_follow_from_the_step_times(gls):
    args = Namespace(tiny=False, batch=8, seq=1024)
    full_flops = gls.model_flops(gls.SHAPES["1b"], "full", 8, 1024)["flops_per_step"]
    full_s = full_flops / (0.5 * gls.PEAK["bf16"])  # MFU 0.5 of the dense bf16 peak
    records = [_result("jax:1b:full:bf16", full_s), _result("jax:1b:lora:bf16", 0.150),
               _result("torch:1b:lora:bf16", 0.200), _result("torch:1b:full:bf16", 0.210),
               {"kind": "skipped", "item": "jax:135m:lora:bf16", "reason": "budget"}]
    derived = gls.derive(records, args)
    rows = {r["item"]: r for r in derived["rows"]}
    assert rows["jax:1b:full:bf16"]["mfu_peak"] == pytest.approx(0.5)
    assert rows["jax:1b:lora:bf16"]["jax_vs_torch"] == pytest.approx(0.75)
    assert rows["jax:135m:lora:bf16"]["status"] == "skipped"
    assert [(t["value"], t["passed"]) for t in derived["targets"]] == [(pytest.approx(0.5), True),
                                                                       (pytest.approx(0.75), True)]
    lines = gls.target_lines(derived)
    assert lines[0].endswith("= 0.500 (target >= 0.45): PASS") and lines[1].endswith("= 0.750 (target <= 0.8): PASS")

    records[0]["step_time_s"] = full_s * 0.5 / 0.338  # the MFU measured before (2026-11-30)
    records[1]["step_time_s"] = 0.170  # 0.85 x PEFT's
    derived = gls.derive(records, args)
    assert [(round(t["value"], 3), t["passed"]) for t in derived["targets"]] == [(0.338, False), (0.85, False)]
    # without PEFT's LoRA row there is nothing to compare ours with: that target is left out, not passed
    derived = gls.derive([r for r in records if r["item"] != "torch:1b:lora:bf16"], args)
    assert [t["what"] for t in derived["targets"]] == ["1b bf16 full fine-tuning MFU (dense bf16 peak)"]


def test_the_long_plan_is_the_1b_bf16_steps_of_both_sides(gls):
    items = [i for _, _, phase in gls.PLANS["long"] for i in phase]
    assert sorted(items) == ["jax:1b:full:bf16", "jax:1b:lora:bf16", "torch:1b:full:bf16", "torch:1b:lora:bf16"]
    assert set(items) <= {i for _, _, phase in gls.PLANS["all"] for i in phase}


@pytest.mark.slow
def test_tiny_long_plan_runs_on_cpu_and_checks_its_targets(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--plan", "long", "--packed", "4", "--budget", "600",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["plan"] == "long" and result["meta"]["packed"] == 4
    rows = {r["item"]: r for r in result["rows"]}
    assert sorted(rows) == ["jax:1b:full:bf16", "jax:1b:lora:bf16", "torch:1b:full:bf16", "torch:1b:lora:bf16"]
    assert all(r["status"] == "ok" and r["finite"] for r in rows.values()), rows
    (mfu, ratio) = result["targets"]
    assert mfu["value"] == pytest.approx(rows["jax:1b:full:bf16"]["mfu_peak"])
    assert ratio["value"] == pytest.approx(rows["jax:1b:lora:bf16"]["step_ms"] / rows["torch:1b:lora:bf16"]["step_ms"])
    assert "target: 1b bf16 LoRA step, decomp_jax / HF PEFT = " in proc.stdout
