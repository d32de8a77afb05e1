"""Compile time of one LoRA train step on SmolLM2-135M's shape (random weights), scanned vs unrolled.

    python scripts/scan_compile_time.py [--length 64] [--batch 1] [--remat]

Prints, per variant, the seconds of jit lowering and of XLA compilation, the first step's loss (equal
for both), and the load average (measure on a quiet machine).
"""

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import optax

from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, cast_params, init_params, stack_layers
import decomp_jax as dj

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                           rope_theta=100000.0, rms_norm_eps=1e-5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="a bfloat16 frozen base (float32 factors, float32 compute)")
    ap.add_argument("--compute", default="float32", help="the model's compute dtype (LlamaConfig.dtype)")
    ap.add_argument("--no-step", action="store_true", help="compile only (no step run)")
    ap.add_argument("--only", choices=["scanned", "unrolled"], default=None)
    args = ap.parse_args()
    cfg = dj.AdapterConfig(method="lora", targets=r"self_attn/(q_proj|v_proj)$", rank=8)
    base = jax.jit(init_params, static_argnums=0)(SMOLLM2_135M, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.length + 1), 0, SMOLLM2_135M.vocab_size)
    print("load average before:", os.getloadavg())
    if args.bf16:
        base = cast_params(base, "bfloat16")
    for scan in (False, True):
        if args.only and args.only != ("scanned" if scan else "unrolled"):
            continue
        config = dataclasses.replace(SMOLLM2_135M, scan_layers=scan, remat=args.remat, dtype=args.compute)
        params = dj.inject(stack_layers(base) if scan else base, cfg, jax.random.PRNGKey(2))
        trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
        apply = dj.adapt(LlamaForCausalLM(config).apply, cfg)

        def loss(p, batch, rng):
            logits = apply({"params": p}, batch["ids"][:, :-1])
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["ids"][:, 1:, None], -1)
            return jnp.mean(nll), {}

        opt = optax.adamw(1e-4)
        state = dj.init_state(trainable, opt, jax.random.PRNGKey(3))
        step = dj.make_train_step(loss, opt, cfg, donate=False)
        t0 = time.perf_counter()
        lowered = step.lower(state, frozen, {"ids": ids})
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        metrics = {"loss": float("nan")}
        if not args.no_step:
            _, metrics = jax.block_until_ready(compiled(state, frozen, {"ids": ids}))
        t3 = time.perf_counter()
        mem = compiled.memory_analysis()
        peak = "" if mem is None else (f"  XLA memory: temp {mem.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
                                       f"{mem.argument_size_in_bytes / 2**20:.0f} MiB")
        print(f"{'scanned ' if scan else 'unrolled'}: lower {t1 - t0:6.2f} s  compile {t2 - t1:6.2f} s  "
              f"first step {t3 - t2:5.2f} s  loss {float(metrics['loss']):.6f}  load {os.getloadavg()[0]:.2f}{peak}")


if __name__ == "__main__":
    main()
