"""The decoder benchmark's targets and files: ``check_targets`` (the measured ratios of
``bench_decoder.run_decoder_bench``'s result against their bounds), ``format_targets`` (log lines),
``markdown`` and ``write_outputs`` (``bench_decoder.json``, ``bench_decoder.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from decomp_jax.app.benchkit import fmt_or_empty, mib, spread, verdict, write_json_and_markdown

# the bounds of the decoder bench's targets
VS_TORCH, LORA_VS_FULL, MEMORY_LORA_VS_FULL, GENERATION_VS_HF = 1.0, 0.70, 0.5, 1.5


def check_targets(models: dict) -> list[dict]:
    """The targets next to the measured ratios: ``{model, what, value, target, passed, noise}``;
    LoRA / full carries ``flops``: the model-FLOP ratio, its bound where the step is compute-bound."""
    out: list[dict] = []

    def times(r):
        return r["step_time_s"], r["step_time_min_s"]

    def add(model, what, value, op, bound, noise=None, **extra):
        passed = value <= bound if op == "<=" else value >= bound
        out.append({"model": model, "what": what, "value": value, "target": f"{op} {bound}", "passed": bool(passed),
                    "noise": noise, **extra})

    for name, result in models.items():
        rows = {(r["framework"], r["method"], r.get("remat", False), r.get("logits")): r for r in result["rows"]
                if "dispatch" not in r}
        ours = {m: r for (fw, m, remat, _), r in rows.items() if fw == "jax" and not remat and "step_time_s" in r}
        for logits, note in (("all", ""), ("scored", ", same logits")):
            theirs = {m: r for (fw, m, _, lg), r in rows.items() if fw == "torch" and lg == logits and "step_time_s" in r}
            for method in ours:
                if method in theirs:
                    what = ("full / transformers full" if method == "full" else f"{method} / HF PEFT {method}") + note
                    add(name, what, ours[method]["step_time_s"] / theirs[method]["step_time_s"], "<=", VS_TORCH,
                        spread(times(ours[method]), times(theirs[method])))
        if "lora" in ours and "full" in ours:
            add(name, "lora / full", ours["lora"]["step_time_s"] / ours["full"]["step_time_s"], "<=", LORA_VS_FULL,
                spread(times(ours["lora"]), times(ours["full"])), flops=result["flops"]["lora_vs_full_flops"])
            full_mem, lora_mem = ours["full"].get("xla_memory_bytes"), ours["lora"].get("xla_memory_bytes")
            if full_mem and lora_mem:
                add(name, "lora / full memory (XLA)", lora_mem / full_mem, "<=", MEMORY_LORA_VS_FULL)
        remat_full, remat_lora = rows.get(("jax", "full", True, None)), rows.get(("jax", "lora", True, None))
        if remat_lora and remat_full and "step_time_s" in remat_lora and "step_time_s" in remat_full:
            add(name, "lora / full, both scan+remat", remat_lora["step_time_s"] / remat_full["step_time_s"], "<=",
                LORA_VS_FULL, spread(times(remat_lora), times(remat_full)))
            if remat_lora.get("xla_memory_bytes") and remat_full.get("xla_memory_bytes"):
                add(name, "lora / full memory (XLA), both scan+remat",
                    remat_lora["xla_memory_bytes"] / remat_full["xla_memory_bytes"], "<=", MEMORY_LORA_VS_FULL)
        ragged = [r for r in result["rows"] if r.get("dispatch") == "ragged" and "step_time_s" in r]
        peft_lora = rows.get(("torch", "lora", False, "all"))
        if ragged and peft_lora and "step_time_s" in peft_lora:
            add(name, "lora, ragged dispatch / HF PEFT lora", ragged[0]["step_time_s"] / peft_lora["step_time_s"], "<=",
                VS_TORCH, spread(times(ragged[0]), times(peft_lora)))
        gen = result.get("generation") or {}
        if "speedup" in gen:
            add(name, "generation vs transformers", gen["speedup"], ">=", GENERATION_VS_HF)
    return out


def format_targets(targets: Sequence[dict]) -> list[str]:
    lines = []
    for t in targets:
        line = f"[{t['model']}] {t['what']:<40} {t['value']:>7.3f}  target {t['target']:<7} {verdict(t)}"
        if "flops" in t:
            line += f"  (model FLOPs: {t['flops']:.3f})"
        lines.append(line)
    return lines


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"{meta['device']} ({meta['cpu_count']} CPUs), JAX {meta['jax']}; loss on the last {meta['response']} "
             f"tokens of each row; LoRA/DoRA r={meta['rank']} alpha={meta['alpha']:g} and SSB on q,k,v,o,gate,up,down; "
             f"AdamW; {meta['rounds']} interleaved rounds of {meta['steps']} steps; median (min); 1-min load average "
             f"{fmt_or_empty(meta['load_avg_1min_start'], '.2f')} at the start, "
             f"{fmt_or_empty(meta['load_avg_1min_end'], '.2f')} at the end; "
             f"allocator: {meta.get('allocator', 'system')}.", ""]
    for name, res in result["models"].items():
        lines += [f"### {name}: {res['description']}", "",
                  f"{res['parameters']:,} parameters, batch {res['batch']} x {res['length']}.", "",
                  "| step | median s (min) | tokens/s | vs its framework's full | compile s | XLA memory MiB | trainable "
                  "| model FLOPs vs full |",
                  "|---|---|---|---|---|---|---|---|"]
        fulls = {(r["framework"], r.get("logits"), r.get("remat", False)): r for r in res["rows"]
                 if r["method"] == "full" and "step_time_s" in r}
        for r in res["rows"]:
            full = fulls.get((r["framework"], r.get("logits"), r.get("remat", False)))
            label = ("ours " if r["framework"] == "jax" else "transformers " if r["method"] == "full" else "HF PEFT ") \
                + r["method"] + (" (scan + remat)" if r.get("remat") else "") \
                + (" (scored logits only)" if r.get("logits") == "scored" else "") \
                + (" (ragged dispatch)" if r.get("dispatch") == "ragged" else "")
            step = f"{r['step_time_s']:.3f} ({r['step_time_min_s']:.3f})" if "step_time_s" in r else ""
            vs = f"{r['step_time_s'] / full['step_time_s']:.3f}" if full and "step_time_s" in r else ""
            memory = mib(r.get("xla_memory_bytes")) if r.get("xla_memory_bytes") else ""
            lines.append(f"| {label} | {step} | {fmt_or_empty(r.get('tokens_per_s'), '.0f')} | {vs} | {fmt_or_empty(r.get('compile_s'), '.1f')} | {memory} "
                         f"| {r.get('trainable_params', 0):,} | {r['flops_vs_full']:.3f} |")
        gen = res.get("generation") or {}
        if gen:
            lines += ["", f"Generation (greedy, batch {gen['batch']}, {gen['prompt_length']}-token prompts, "
                          f"{gen['new_tokens']} new tokens): ours {gen['ours_tokens_per_s']:.1f} tokens/s"
                      + (f", transformers {gen['hf_tokens_per_s']:.1f} tokens/s ({gen['speedup']:.2f}x)"
                         if "speedup" in gen else "") + "."]
        lines.append("")
    lines += ["### Targets", "", "| model | check | measured | target | | model-FLOP ratio |", "|---|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['model']} | {t['what']} | {t['value']:.3f} | {t['target']} | "
                     f"{verdict(t).replace('PASS', 'pass')} | {fmt_or_empty(t.get('flops'))} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir) -> dict[str, Path]:
    """``bench_decoder.json`` and ``bench_decoder.md`` in ``out_dir`` (created)."""
    return write_json_and_markdown(result, out_dir, "bench_decoder", markdown(result))
