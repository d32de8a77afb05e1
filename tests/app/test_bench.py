"""The benchmark harness (decomp_jax.app.bench) on a tiny random BERT: it runs, its rows carry the
fields, the optimizer state is exactly the AdamW moments, and the ratios and target checks are
computed from the measured times. Nothing here compares a time with a threshold."""

import json

import pytest

from decomp_jax.app import bench
from decomp_jax.app.cli import build_parser, main
from decomp_jax.core.inject import trainable_count
from decomp_jax.core.tree import count_params

FIELDS = ("model", "method", "step_time_s", "step_time_min_s", "ratio_vs_full", "compile_s", "trainable_params",
          "opt_state_bytes", "peak_bytes")
COUNTERS = 8  # two int32 step counts: Adam's and the learning-rate schedule's


@pytest.fixture(scope="module")
def result(tiny_bert):
    config = bench.BenchConfig(batch_size=4, seq_len=8, methods=("lora",), merged=("tiny",), merged_methods=("lora",),
                               warmup=1, steps=2, peft=False, total_steps=20)
    lines = []
    out = bench.run_bench(config, models={"tiny": tiny_bert}, log=lines.append)
    return out, lines


def test_rows_have_the_fields(result):
    out, lines = result
    rows = {r["method"]: r for r in out["rows"]}
    assert list(rows) == ["full", "lora"]
    for row in rows.values():
        for key in FIELDS:
            assert row[key] is not None, key
        assert row["model"] == "tiny" and len(row["step_times_s"]) == 2
        assert 0 < row["step_time_min_s"] <= row["step_time_s"] and row["compile_s"] > 0 and row["peak_bytes"] > 0
    assert {"merged_step_time_s", "factored_vs_merged"} <= set(rows["lora"])
    assert "merged_step_time_s" not in rows["full"]
    assert any("lora" in line and "merged" in line for line in lines)
    assert out["meta"]["batch_size"] == 4 and out["meta"]["seq_len"] == 8


def test_trainable_counts_and_optimizer_state_are_exact(result, tiny_bert):
    _, params = tiny_bert
    rows = {r["method"]: r for r in result[0]["rows"]}
    assert rows["full"]["trainable_params"] == count_params(params)
    assert rows["lora"]["trainable_params"] == trainable_count(params, bench.method_config("lora"))
    for row in rows.values():  # float32 leaves: mu and nu, plus the step counters, nothing for frozen leaves
        assert row["opt_state_bytes"] == 2 * 4 * row["trainable_params"] + COUNTERS
        assert row["opt_state_extra_bytes"] == COUNTERS and row["opt_state_is_adamw_moments"]


def test_ratios_are_computed_from_the_times(result):
    rows = {r["method"]: r for r in result[0]["rows"]}
    full, lora = rows["full"], rows["lora"]
    assert full["ratio_vs_full"] == 1.0
    assert lora["ratio_vs_full"] == pytest.approx(lora["step_time_s"] / full["step_time_s"])
    assert lora["factored_vs_merged"] == pytest.approx(lora["step_time_s"] / lora["merged_step_time_s"])
    targets = {t["what"]: t for t in result[0]["targets"]}
    assert targets["lora / full"]["value"] == lora["ratio_vs_full"]
    assert targets["lora / full"]["passed"] == (lora["ratio_vs_full"] <= bench.LORA_VS_FULL)
    assert targets["lora factored / merged"]["value"] == lora["factored_vs_merged"]
    assert targets["lora opt state = AdamW moments"]["passed"]


def _row(method, t, **extra):
    return {"model": "m", "method": method, "step_time_s": t, "ratio_vs_full": t / 1.0, "opt_state_extra_bytes": 8,
            "opt_state_is_adamw_moments": True, **extra}


def test_target_checks_on_given_times():
    rows = [_row("full", 1.0), _row("lora", 0.6, step_time_min_s=0.55, peft_step_time_s=0.5, ratio_vs_peft=1.2),
            _row("ssl", 0.61, step_time_min_s=0.6), _row("ssb", 0.59, factored_vs_merged=0.9), _row("dora", 0.79),
            _row("houlsby", 0.9), _row("ia3", 0.55, opt_state_extra_bytes=4096, opt_state_is_adamw_moments=False)]
    checks = {t["what"]: t for t in bench.check_targets(rows)}
    assert checks["lora / full"]["passed"]
    assert checks["ssl / lora"]["value"] == pytest.approx(0.61 / 0.6) and not checks["ssl / lora"]["passed"]
    assert checks["ssb / lora"]["passed"]
    assert checks["dora / lora"]["value"] == pytest.approx(0.79 / 0.6) and not checks["dora / lora"]["passed"]
    assert checks["dora / full"]["passed"] and "houlsby / full" not in checks  # houlsby is not mergeable
    assert not checks["lora / HF PEFT lora"]["passed"]
    assert checks["ssb factored / merged"]["passed"]
    assert not checks["ia3 opt state = AdamW moments"]["passed"]
    lines = bench.format_targets(bench.check_targets(rows))
    assert len(lines) == len(checks)
    # ssl / lora = 1.017 fails, by less than the lora timings' median-min spread (0.05 / 0.6)
    assert checks["ssl / lora"]["noise"] == pytest.approx(0.05 / 0.6)
    assert any("ssl / lora" in line and "within timing noise 8%" in line for line in lines)
    assert any("dora / lora" in line and line.endswith("FAIL") for line in lines)  # no min times: no noise


def test_outputs_are_written(result, tmp_path):
    paths = bench.write_outputs(result[0], tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert [r["method"] for r in data["rows"]] == ["full", "lora"] and data["targets"]
    text = paths["md"].read_text()
    assert "| method |" in text and "| lora |" in text and "Targets" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peft_step_is_timed(tmp_path):
    pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    cfg = bench.BenchConfig(batch_size=4, seq_len=8)
    batch = bench.random_batch(4, 8, 100)
    for method in ("lora", None):
        row = bench.measure_peft(str(tmp_path), method, batch, cfg, warmup=1, steps=2)
        assert 0 < row["peft_step_time_min_s"] <= row["peft_step_time_s"]
    assert row["peft_trainable_params"] == sum(p.numel() for p in BertForSequenceClassification(config).parameters())


def test_cli_bench_arguments(capsys):
    args = build_parser().parse_args(["bench", "--quick", "--out", "x", "--steps", "3", "--no-peft"])
    assert args.quick and args.out == "x" and args.steps == 3 and args.no_peft and args.func.__name__ == "_bench"
    quick = bench.BenchConfig.quick_config()
    assert quick.models == ("minilm",) and set(quick.methods) >= {"lora", "dora", "ssl", "ssb", "ia3"}
    assert main(["bench", "--models", "gpt5"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_cli_long_bench_flags_are_checked_before_anything_runs(capsys, monkeypatch):
    """--no-sweep measures packing alone; with --no-packing or --lengths, or without --long, it is refused by name;
    --decoder --long is --long (a decoder bench); --seq-len is --long's --lengths, refused by name."""
    from decomp_jax.app import bench_long

    seen = []
    result = {"targets": [], "meta": {"wall_s": 0.0, "load_avg_1min_start": None, "load_avg_1min_end": None}}
    monkeypatch.setattr(bench_long, "run_long_bench", lambda config: seen.append(config) or result)
    monkeypatch.setattr(bench_long, "write_outputs", lambda result, out: {})
    monkeypatch.setattr(bench_long, "format_targets", lambda targets: [])
    for argv, message in ((["--long", "--no-sweep", "--no-packing"], "nothing to measure"),
                          (["--long", "--no-sweep", "--lengths", "512"], "give one or the other"),
                          (["--no-sweep"], "apply to --long only")):
        assert main(["bench", *argv]) == 2
        assert message in capsys.readouterr().err
    assert seen == []
    assert main(["bench", "--long", "--no-sweep", "--out", "x"]) == 0
    assert seen[0].lengths == () and seen[0].packing
    assert main(["bench", "--decoder", "--long", "--lengths", "512,1024", "--no-packing", "--out", "x"]) == 0
    assert seen[1].lengths == (512, 1024) and not seen[1].packing
    assert main(["bench", "--long", "--seq-len", "512"]) == 2
    assert "--seq-len: not for --long" in capsys.readouterr().err
    assert main(["bench", "--decoder", "--long", "--rounds", "2"]) == 2
    assert "--rounds: not for --long" in capsys.readouterr().err


def test_native_backbone(tiny_bert):
    from decomp_jax.models.bert import NativeSequenceClassifier

    model, params = tiny_bert
    assert bench.with_backbone(model, "hf") is model
    native = bench.with_backbone(model, "native")
    assert isinstance(native, NativeSequenceClassifier) and native.config is model.config
    config = bench.BenchConfig(batch_size=2, seq_len=8, methods=("lora",), merged=(), warmup=1, steps=1, peft=False,
                               total_steps=20, backbone="native")
    out = bench.run_bench(config, models={"tiny": tiny_bert}, log=lambda _: None)
    rows = {r["method"]: r for r in out["rows"]}
    assert out["meta"]["backbone"] == "native" and rows["lora"]["step_time_s"] > 0
    assert rows["lora"]["trainable_params"] == trainable_count(params, bench.method_config("lora"))
    with pytest.raises(ValueError):
        bench.with_backbone(model, "torch")
