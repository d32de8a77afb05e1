"""Quality over a quantized frozen base: the same commonsense LoRA run of SmolLM2 over a float32 base
and over quantized ones, side by side: the loss curves, the accuracies per test set, the training time, and how
many greedy test answers each quantized run shares with the float run.

    python scripts/quality_quant.py [--kinds nf4,q4_1] [--out runs/quality_quant] [--set KEY=VALUE ...]

The config is configs/commonsense/smollm2_lora_cpu.yaml with the ``--set`` overrides (e.g. ``train.steps=120
data.max_train_samples=480 data.max_eval_samples=100``); each base trains from the same seed and data order.
SmolLM2 ships as a Q4_1 GGUF file: its float32 base is the dequantized file, so ``q4_1`` (the file's blocks kept)
is that same base stored in 4 bits, while ``nf4`` quantizes it a second time. Run it alone (timings).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="nf4,q4_1")
    ap.add_argument("--out", default="runs/quality_quant")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from decomp_jax.app.experiment import load_adapter, load_config, make_task, run
    from decomp_jax.core.tree import combine

    results = {}
    for kind in ["float32"] + [k for k in args.kinds.split(",") if k]:
        out = Path(args.out) / kind
        extra = [] if kind == "float32" else [f"model.quantize={kind}"]
        cfg = load_config(REPO / "configs" / "commonsense" / "smollm2_lora_cpu.yaml",
                          [*args.set, *extra, f"train.output_dir={out}"])
        record = run(cfg, progress=False, resume=(out / "metrics.json").exists())
        task = make_task(cfg, need_train=False)  # the answers themselves: evaluate the saved adapter again
        adapter = load_adapter(out / "adapter.safetensors", combine(task.trainable, task.buffers))
        metrics, generations = task.evaluate(adapter, {}, return_generations=True)
        assert metrics == record["eval"], (metrics, record["eval"])
        losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[kind] = {"eval": metrics, "generations": generations, "train_seconds": record["train_seconds"],
                         "losses": {r["step"]: r["loss"] for r in losses if "loss" in r}}
    ref = results["float32"]
    steps = sorted(ref["losses"])
    print("step  " + "  ".join(f"{k:>9s}" for k in results))
    for s in steps:
        print(f"{s:4d}  " + "  ".join(f"{r['losses'].get(s, float('nan')):9.4f}" for r in results.values()))
    for kind, r in results.items():
        same = sum(a == b for name in ref["generations"] for a, b in zip(r["generations"][name], ref["generations"][name]))
        total = sum(len(v) for v in ref["generations"].values())
        accs = ", ".join(f"{k[:-len('_accuracy')]} {v:.3f}" for k, v in r["eval"].items() if k.endswith("_accuracy"))
        print(f"{kind:8s} accuracy {r['eval']['accuracy']:.4f} ({accs}); training {r['train_seconds']:.1f} s; "
              f"answers equal to float32's: {same}/{total}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return results


if __name__ == "__main__":
    main()
