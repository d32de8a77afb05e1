"""The decoder benchmark (decomp_jax.app.bench_decoder, issue 14) on a tiny random Llama: every variant runs
and computes the same first loss as its PyTorch twin (ours full = transformers full; LoRA and DoRA, a
no-op at init, = full = HF PEFT's), greedy generation gives transformers' tokens, the FLOP counts
follow from the parameter tree, and the target checks are computed from the measured numbers.
Nothing here compares a time with a threshold. The comparisons with PyTorch are `slow` (about 25 s);
the default suite runs our side alone."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax.app import bench_decoder as bd
from decomp_jax.app.cli import main
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, random_params

CONFIG = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny():
    return LlamaForCausalLM(CONFIG), random_params(CONFIG, 0)


QWEN3 = LlamaConfig(**{**CONFIG.__dict__, "model_type": "qwen3", "qk_norm": True, "head_dim": 16})


@pytest.fixture(scope="module")
def result(tiny):
    pytest.importorskip("peft")
    bench = bd.DecoderBenchConfig(shapes={"tiny": (2, 32), "tiny-qwen3": (2, 32)}, remat=("tiny",), response=8, rounds=2,
                                  steps=1, gen_batch=2, prompt_length=8, new_tokens=6, gen_repeats=1)
    lines = []
    qwen3 = (LlamaForCausalLM(QWEN3), random_params(QWEN3, 0))
    return bd.run_decoder_bench(bench, log=lines.append, models={"tiny": tiny, "tiny-qwen3": qwen3}), lines


@pytest.mark.slow
def test_every_variant_runs_and_matches_pytorch_at_step_one(result):
    out, lines = result
    rows = {(r["framework"], r["method"], r.get("remat", False), r.get("logits")): r for r in out["models"]["tiny"]["rows"]}
    assert set(rows) == {("jax", m, False, None) for m in ("full", "lora", "dora", "ssb")} | {
        ("jax", "full", True, None), ("jax", "lora", True, None)} | {
        ("torch", m, False, "all") for m in ("full", "lora", "dora")} | {("torch", m, False, "scored") for m in ("full", "lora")}
    full = rows[("jax", "full", False, None)]["first_loss"]
    assert np.log(256) - 0.5 < full < np.log(256) + 0.5  # random model on random tokens: about log(V)
    for key, row in rows.items():
        if "first_loss" in row:  # adapters are a no-op at init: every first loss is the base model's
            assert row["first_loss"] == pytest.approx(full, abs=2e-5), key
        assert len(row["step_times_s"]) == 2 and 0 < row["step_time_min_s"] <= row["step_time_s"]
    for method in ("full", "lora", "dora"):  # same factors as HF PEFT's
        assert rows[("jax", method, False, None)]["trainable_params"] == rows[("torch", method, False, "all")]["trainable_params"]
    for key in (("jax", "full", False, None), ("jax", "lora", False, None), ("jax", "full", True, None)):
        assert rows[key]["compile_s"] > 0 and rows[key]["xla_memory_bytes"] > 0
    assert any("ours dora" in line and "median step" in line for line in lines)


@pytest.mark.slow
def test_qwen3_case_runs_against_transformers_qwen3(result):
    """The Qwen3-shaped case: transformers loads the folder as Qwen3ForCausalLM (q/k norms), HF PEFT's LoRA
    starts from the same loss as ours, and generation gives its tokens."""
    out, lines = result
    rows = {(r["framework"], r["method"], r.get("logits")): r for r in out["models"]["tiny-qwen3"]["rows"]}
    full = rows[("jax", "full", None)]["first_loss"]
    for key in (("torch", "full", "all"), ("torch", "lora", "all"), ("jax", "lora", None)):
        assert rows[key]["first_loss"] == pytest.approx(full, abs=2e-5), key
    assert out["models"]["tiny-qwen3"]["generation"]["same_tokens"] == 1.0
    assert any(line.startswith("[tiny-qwen3]") for line in lines)


@pytest.mark.slow
def test_generation_gives_transformers_tokens(result):
    gen = result[0]["models"]["tiny"]["generation"]
    assert gen["same_tokens"] == 1.0
    assert gen["speedup"] == pytest.approx(gen["hf_s"] / gen["ours_s"])
    assert gen["ours_tokens_per_s"] == pytest.approx(2 * 6 / gen["ours_s"])


@pytest.mark.slow
def test_targets_are_computed_from_the_measurements(result, tmp_path):
    out = result[0]
    rows = {(r["framework"], r["method"]): r for r in out["models"]["tiny"]["rows"]
            if not r.get("remat") and r.get("logits") != "scored"}
    scored = {r["method"]: r for r in out["models"]["tiny"]["rows"] if r.get("logits") == "scored"}
    checks = {t["what"]: t for t in out["targets"] if t["model"] == "tiny"}
    lora, full = rows[("jax", "lora")], rows[("jax", "full")]
    assert checks["lora / full"]["value"] == pytest.approx(lora["step_time_s"] / full["step_time_s"])
    assert checks["lora / full"]["passed"] == (checks["lora / full"]["value"] <= bd.LORA_VS_FULL)
    assert checks["lora / full"]["flops"] == out["models"]["tiny"]["flops"]["lora_vs_full_flops"]
    assert checks["lora / HF PEFT lora"]["value"] == pytest.approx(lora["step_time_s"] / rows[("torch", "lora")]["step_time_s"])
    assert checks["full / transformers full"]["value"] == pytest.approx(
        full["step_time_s"] / rows[("torch", "full")]["step_time_s"])
    assert checks["lora / HF PEFT lora, same logits"]["value"] == pytest.approx(
        lora["step_time_s"] / scored["lora"]["step_time_s"])
    assert checks["lora / full memory (XLA)"]["value"] == pytest.approx(lora["xla_memory_bytes"] / full["xla_memory_bytes"])
    remat = {r["method"]: r for r in out["models"]["tiny"]["rows"] if r.get("remat")}
    assert checks["lora / full memory (XLA), both scan+remat"]["value"] == pytest.approx(
        remat["lora"]["xla_memory_bytes"] / remat["full"]["xla_memory_bytes"])
    assert checks["lora / full, both scan+remat"]["value"] == pytest.approx(
        remat["lora"]["step_time_s"] / remat["full"]["step_time_s"])
    assert checks["generation vs transformers"]["target"] == ">= 1.5"
    assert len(bd.format_targets(out["targets"])) == len(out["targets"])
    paths = bd.write_outputs(out, tmp_path)
    assert json.loads(paths["json"].read_text())["targets"] == json.loads(json.dumps(out["targets"]))
    text = paths["md"].read_text()
    assert "| HF PEFT dora |" in text and "| HF PEFT lora (scored logits only) |" in text and "| ours full (scan + remat) |" in text and "Generation" in text


def test_our_side_alone_gives_rows_and_targets(tiny):
    """Without PyTorch, generation and remat: our full fine-tuning and LoRA, their ratio and memory."""
    bench = bd.DecoderBenchConfig(shapes={"tiny": (2, 32)}, response=8, rounds=1, steps=2, methods=("lora",),
                                  torch=False, generation=False, remat=())
    out = bd.run_decoder_bench(bench, log=lambda _: None, models={"tiny": tiny})
    rows = {r["method"]: r for r in out["models"]["tiny"]["rows"]}
    assert set(rows) == {"full", "lora"} and rows["full"]["first_loss"] == pytest.approx(rows["lora"]["first_loss"], abs=1e-6)
    assert rows["lora"]["trainable_params"] == 2 * sum(16 * (a + b) for a, b in (
        (32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)))  # r (d_in + d_out) per matrix
    checks = {t["what"]: t for t in out["targets"]}
    assert set(checks) == {"lora / full", "lora / full memory (XLA)"}
    assert checks["lora / full"]["value"] == pytest.approx(rows["lora"]["step_time_s"] / rows["full"]["step_time_s"])
    assert "| ours lora |" in bd.markdown(out) and out["models"]["tiny"]["generation"] == {}


def test_model_flops_follow_the_parameter_tree(tiny):
    _, params = tiny
    flat = flatten_dict(params)
    n = sum(np.size(v) for k, v in flat.items() if k[-1] == "kernel" and k[-2] in bd.PROJECTIONS)
    head = np.size(params["model"]["embed_tokens"]["embedding"])
    r, b, s, scored = 16, 2, 32, 8
    attention = 12 * 2 * s * 4 * 8
    adapter = sum(6 * r * sum(v.shape) for k, v in flat.items() if k[-1] == "kernel" and k[-2] in bd.PROJECTIONS)
    full = bd.model_flops(CONFIG, "full", b, s, r, scored=scored)
    lora = bd.model_flops(CONFIG, "lora", b, s, r, scored=scored)
    assert full["matmul_params"] == n and full["head_params"] == head
    assert full["flops_per_step"] == (6 * n + attention) * b * s + 6 * head * b * scored
    assert lora["flops_per_step"] == (4 * n + attention + adapter) * b * s + 4 * head * b * scored
    assert bd.model_flops(CONFIG, "ssb", b, s, r)["flops_per_step"] == (4 * n + attention) * b * s + 4 * head * b * s
    with pytest.raises(ValueError, match="unknown method"):
        bd.model_flops(CONFIG, "ia3", b, s)


def test_synthetic_batch_scores_the_last_tokens():
    batch = bd.synthetic_batch(100, 3, 16, 5, seed=1)
    assert batch["input_ids"].shape == (3, 16) and batch["loss_mask"][:, -5:].all() and not batch["loss_mask"][:, :-5].any()
    real = batch["loss_weights"] > 0
    assert real.sum(axis=1).tolist() == [5, 5, 5]  # positions 10..14 predict the response tokens 11..15
    np.testing.assert_array_equal(batch["loss_index"][real].reshape(3, 5), np.tile(np.arange(10, 15), (3, 1)))
    np.testing.assert_array_equal(batch["loss_targets"][real].reshape(3, 5), batch["input_ids"][:, 11:16])
    with pytest.raises(ValueError, match="response=16"):
        bd.synthetic_batch(100, 3, 16, 16)


def test_cli_refuses_what_does_not_apply(capsys):
    assert main(["bench", "--decoder", "--models", "minilm"]) == 2
    assert "unknown decoder models ['minilm']" in capsys.readouterr().err
    assert main(["bench", "--decoder", "--warmup", "2"]) == 2
    assert "--warmup: not for --decoder" in capsys.readouterr().err
    assert main(["bench", "--rounds", "2"]) == 2
    assert "--decoder only" in capsys.readouterr().err
    assert main(["bench", "--decoder", "--methods", "lora,ia3", "--no-generation"]) == 2
    assert "unknown methods ['ia3']" in capsys.readouterr().err


MOE = LlamaConfig(**{**CONFIG.__dict__, "model_type": "qwen3_moe", "qk_norm": True, "head_dim": 16, "num_experts": 4,
                     "num_experts_per_tok": 2, "moe_intermediate_size": 24, "norm_topk_prob": True,
                     "tie_word_embeddings": False})


@pytest.mark.slow
def test_moe_case_runs_lora_on_the_experts_against_hf_peft():
    """The mixture case: LoRA on the attention projections and the stacked experts, ours (both dispatches)
    and HF PEFT's (target_parameters), from the same first loss and with as many trainable parameters."""
    pytest.importorskip("peft")
    bench = bd.DecoderBenchConfig(shapes={"moe": (2, 32)}, response=8, rounds=1, steps=1, generation=False, remat=())
    out = bd.run_decoder_bench(bench, log=lambda _: None, models={"moe": (LlamaForCausalLM(MOE), random_params(MOE, 0))})
    rows = {(r["framework"], r["method"], r.get("logits"), r.get("dispatch")): r for r in out["models"]["moe"]["rows"]}
    assert set(rows) == {("jax", "full", None, None), ("jax", "lora", None, None), ("jax", "lora", None, "ragged"),
                         ("torch", "full", "all", None), ("torch", "lora", "all", None),
                         ("torch", "full", "scored", None), ("torch", "lora", "scored", None)}
    full = rows[("jax", "full", None, None)]["first_loss"]
    for key, row in rows.items():
        assert row["first_loss"] == pytest.approx(full, abs=2e-5), key
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_time_s"])
    ours, peft = rows[("jax", "lora", None, None)], rows[("torch", "lora", "all", None)]
    experts = 2 * 4 * 16 * ((32 + 48) + (24 + 32))  # layers x experts x r (d_in + d_out), gate_up and down
    attention = 2 * 16 * sum((32 + d) for d in (64, 32, 32)) + 2 * 16 * (64 + 32)
    assert ours["trainable_params"] == peft["trainable_params"] == experts + attention
    checks = {t["what"] for t in out["targets"]}
    assert {"lora / HF PEFT lora", "lora, ragged dispatch / HF PEFT lora"} <= checks
    assert "| ours lora (ragged dispatch) |" in bd.markdown(out)


def test_moe_flops_count_the_router_and_the_chosen_experts():
    b, s, r = 2, 32, 16
    full, lora = (bd.model_flops(MOE, m, b, s, r) for m in ("full", "lora"))
    attention_mats = 32 * 64 + 2 * 32 * 32 + 64 * 32
    experts = 2 * (32 * 48 + 24 * 32)  # top 2 of (gate_up, down) per token
    n = 2 * (attention_mats + experts + 32 * 4)
    assert full["matmul_params"] == n
    head = 32 * 256
    assert full["flops_per_step"] == (6 * n + 12 * 2 * s * 4 * 16) * b * s + 6 * head * b * s
    adapter = 2 * 6 * r * ((32 + 64) + 2 * (32 + 32) + (64 + 32) + 2 * ((32 + 48) + (24 + 32)))
    assert lora["flops_per_step"] == (4 * n + 12 * 2 * s * 4 * 16 + adapter) * b * s + 4 * head * b * s


@pytest.mark.slow
def test_long_bench_runs_end_to_end(tmp_path):
    """`decomp-jax bench --long` at two short lengths (chunks of 64) and packing on 8 examples per dataset:
    every row is measured, the losses of both attentions agree, the files are written and the targets printed."""
    from decomp_jax.app import bench_long as bl

    result = bl.run_long_bench(bl.LongBenchConfig(lengths=(128, 256), attention_chunk=64, steps=1, packing_examples=8,
                                                  mlp_chunk=96, remat_segments=5))
    rows = {(r["length"], r["setting"], r["base"]): r for r in result["sweep"]}
    settings = ("xla", "chunked", bl.LONG_ROWS)
    assert set(rows) == {(n, s, "float32") for n in (128, 256) for s in settings} | {
        (256, s, "float16") for s in ("xla", bl.LONG_ROWS)}
    for n in (128, 256):
        for s in settings[1:]:
            assert rows[n, s, "float32"]["first_loss"] == pytest.approx(rows[n, "xla", "float32"]["first_loss"], abs=1e-4)
    assert rows[256, "xla", "float16"]["step_time_s"] is None  # compiled for its memory, not run
    p = result["packing"]
    assert p["padded per batch"]["padding"] < p["padded to the longest"]["padding"]  # (few examples: packed rows part-filled)
    assert all(v > 0 for v in p["speedup"].values())
    # the epochs ran interleaved, each whole (its round slices add up to it), one ratio per round
    assert p["rounds"] == min(8, p["packed"]["steps"])
    for way in bl.PACKING_WAYS:
        assert len(p[way]["round_s"]) == p["rounds"] and sum(p[way]["round_s"]) == pytest.approx(p[way]["time_s"])
        assert sum(p[way]["round_tokens"]) == p[way]["tokens"]
    assert all(len(r) == p["rounds"] and min(r) > 0 for r in p["speedup_by_round"].values())
    paths = bl.write_outputs(result, tmp_path)
    assert "Packing against padding" in paths["md"].read_text() and "round by round" in paths["md"].read_text()
    assert [t["what"] for t in result["targets"]] == [
        "chunked / xla memory at 256 tokens", "chunked / xla temporaries at 256 tokens",
        f"{bl.LONG_ROWS} / xla memory at 256 tokens", f"{bl.LONG_ROWS} / xla memory at 256 tokens, float16 base",
        "packed / padded to the longest: trained tokens/s", "packed / padded per batch: trained tokens/s"]


@pytest.mark.slow
def test_packing_layouts_script_prints_each_layout(capsys):
    """scripts/packing_layouts.py on 2 examples per dataset: one line per layout, the first its own reference."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "packing_layouts.py"
    spec = importlib.util.spec_from_file_location("packing_layouts", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.overrides("640:chunked:128", 160) == ["data.packing=true", "data.pack_length=640",
                                                        "model.attention=chunked", "model.attention_chunk=128"]
    assert script.overrides("320x2:xla", 160) == ["data.packing=true", "data.pack_length=320", "model.attention=xla",
                                                  "train.batch_size=2"]
    with pytest.raises(ValueError, match="not one batch of 4; take more examples"):
        script.main(["--examples", "1", "--layouts", "padded,640:xla"])
    script.main(["--examples", "4", "--rounds", "2", "--layouts", "padded,320:xla"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "ms per slot" in ln]
    assert [ln.split(":")[0].strip() for ln in lines] == ["padded", "320"]
    assert "(1.00 x padded)" in lines[0] and "padding 0.0%" not in lines[1]
