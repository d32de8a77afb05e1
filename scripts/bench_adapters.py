"""Many adapters on one base: throughput of batched multi-adapter training and of mixed-batch inference
against running the adapters one after another.

    python scripts/bench_adapters.py [--model minilm] [--n 4] [--batch 32] [--seq 64] [--steps 5]

Training: N LoRA adapters (query/value, rank 8, with their own heads; seeds 0..N-1) of MiniLM, one AdamW
step each on a batch of ``--batch`` examples: N calls of the single-adapter step (sequential) against one
call of ``make_train_step(..., batched="shared")`` (one batch for all) and ``batched="stacked"`` (one batch
per adapter). Inference: ``--batch`` examples routed to N adapters (``adapt_many``, per example) against N
calls of each adapter alone on its share, and one adapter on the whole batch (the cost of one). Times are
medians of ``--steps`` calls after 2 warm-up calls; throughput in examples per second; the ratios are
printed against their targets (batched / sequential >= 1). Run it alone: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from decomp_jax.app.bench import build_model, method_config, random_batch
from decomp_jax.training.losses import classification_loss
import decomp_jax as dj


def median_time(call, steps: int) -> float:
    for _ in range(2):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    model, base = build_model(args.model)
    cfg = method_config("lora")
    from decomp_jax.models.hf import sequence_classifier_apply

    apply = sequence_classifier_apply(model)
    run = dj.adapt(apply, cfg)

    def loss_fn(params, batch, rng):
        return classification_loss(run(params, batch, train=True, rng=rng), batch["labels"]), {}

    vocab = int(base["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[0])
    batches = [random_batch(args.batch, args.seq, vocab, seed=i) for i in range(args.n)]
    tx = dj.make_optimizer(1e-3, 100)
    states, frozen = [], None
    for seed in range(args.n):
        trainable, frozen = dj.split(*(lambda p: (p, dj.trainable_mask(p, cfg)))(
            dj.inject(base, cfg, jax.random.PRNGKey(seed))))
        states.append(dj.init_state(trainable, tx, jax.random.PRNGKey(seed)))
    out: dict = {"n": args.n, "batch": args.batch, "seq": args.seq, "devices": str(jax.devices()[0])}

    single = dj.make_train_step(loss_fn, tx, cfg, donate=False)
    out["train_sequential_s"] = median_time(
        lambda: [single(s, frozen, b)[1]["loss"] for s, b in zip(states, batches)], args.steps)
    stacked_state = dj.stack_states(states)
    for mode in ("shared", "stacked"):
        step = dj.make_train_step(loss_fn, tx, cfg, batched=mode, donate=False)
        batch = batches[0] if mode == "shared" else jax.tree.map(lambda *xs: np.stack(xs), *batches)
        out[f"train_batched_{mode}_s"] = median_time(lambda: step(stacked_state, frozen, batch)[1]["loss"],
                                                      args.steps)
    per_round = args.n * args.batch
    for key in ("train_sequential_s", "train_batched_shared_s", "train_batched_stacked_s"):
        out[key[:-2] + "_examples_per_s"] = per_round / out[key]

    # inference: one batch routed per example to N adapters of one tree
    params, cfgs = base, {}
    for i in range(args.n):
        name = f"a{i}"
        cfgs[name] = cfg
        params = dj.inject(params, cfg, jax.random.PRNGKey(i), name=name)
    picks = [f"a{i % args.n}" for i in range(args.batch)]
    weights = dj.adapter_weights(cfgs, per_example=picks)
    mixed = jax.jit(dj.adapt_many(apply, cfgs))
    eval_batch = batches[0]
    out["infer_mixed_s"] = median_time(lambda: mixed(params, eval_batch, adapter_weights=weights), args.steps)
    views = {n: dj.select(params, n) for n in cfgs}
    alone = jax.jit(run)
    shares = {n: {k: v[[i for i, p in enumerate(picks) if p == n]] for k, v in eval_batch.items()} for n in cfgs}
    out["infer_separate_s"] = median_time(lambda: [alone(views[n], shares[n]) for n in cfgs], args.steps)
    out["infer_one_adapter_s"] = median_time(lambda: alone(views["a0"], eval_batch), args.steps)
    out["load_average"] = os.getloadavg()

    seq = out["train_sequential_examples_per_s"]
    print(f"{args.model}: N={args.n} LoRA adapters, batch {args.batch} x {args.seq}, {out['devices']}; "
          f"load average {out['load_average'][0]:.2f}")
    print(f"  train, sequential ({args.n} steps):  {out['train_sequential_s']:.3f} s  {seq:.1f} examples/s")
    for mode in ("shared", "stacked"):
        rate = out[f"train_batched_{mode}_examples_per_s"]
        print(f"  train, batched {mode:8s}:        {out[f'train_batched_{mode}_s']:.3f} s  {rate:.1f} examples/s  "
              f"ratio {rate / seq:.2f} (target >= 1: {'met' if rate >= seq else 'not met'})")
    print(f"  inference, mixed batch:         {out['infer_mixed_s']:.3f} s; {args.n} adapters apart "
          f"{out['infer_separate_s']:.3f} s (ratio {out['infer_separate_s'] / out['infer_mixed_s']:.2f}); one adapter "
          f"on the whole batch {out['infer_one_adapter_s']:.3f} s")
    return out


if __name__ == "__main__":
    main()
