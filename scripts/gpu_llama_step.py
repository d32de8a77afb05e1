#!/usr/bin/env python3
"""GPU baseline of one training step of our Llama: JAX full fine-tuning vs LoRA/DoRA/SSB,
float32 and bfloat16, against transformers + HF PEFT in PyTorch on the same GPU.

    python3 scripts/gpu_llama_step.py --out OUT            # the GPU run (phases in subprocesses)
    python3 scripts/gpu_llama_step.py --tiny --out /tmp/x  # a CPU smoke test at tiny sizes
    python3 scripts/gpu_llama_step.py --out OUT --items jax:135m:dora:bf16,torch:1b:lora:bf16
    python3 scripts/gpu_llama_step.py --out OUT --packed 4   # each row packs 4 examples of seq/4 tokens

Each measurement is one jitted (JAX) / eager (PyTorch) train step: causal-LM loss on a fixed random
batch (with ``--packed K``, each row holds K examples of seq/K tokens: segment ids and positions restarting
per example in JAX, the same block-diagonal causal mask as a 4-D mask and position ids in PyTorch, and
no loss across an example's boundary on either side), backward, global-norm clipping at 1.0 and AdamW (decomp_jax.training.train.make_optimizer; torch.optim.AdamW,
lr 1e-4, weight decay 0.01). JAX adapters: decomp_jax.core.inject + partition (trainable factors only) +
decomp_jax.core.execution.adapt (factored); the frozen base is an argument of the step. Items run in priority
order inside a few subprocesses (one failing or running out of memory cannot take the others with it),
each skipped once the time budget is spent; results stream to OUT/results.jsonl and end in
OUT/results.json, OUT/table.md and a table printed last.

Model FLOPs per token (PaLM-style; s = sequence length, full s x s attention scores counted, no causal
halving; N = parameters of the matmuls: L * (q + k + v + o + gate + up + down) plus the LM head h * V,
which runs as a matmul even when tied; the embedding lookup costs none):
    full:   6 N + 12 L s (H d)
    LoRA:   4 N + 12 L s (H d) + sum_adapted 6 r (d_in + d_out)
            (forward 2N, activation gradients 2N, no weight gradients for frozen kernels)
    DoRA:   LoRA's + per step sum_adapted (2 r d_in d_out + 3 d_in d_out)  (column norms of K + sAB)
    SSB:    4 N + 12 L s (H d)  (the scales are elementwise)
MFU = model FLOPs per step / step time / peak; peaks 989e12 (dense bf16) and 67e12 (fp32, H200 SXM
datasheet), and the achieved 8192^3 matmul of the same dtype measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

# HF config.json fields (SmolLM2-135M; Llama-3.2-1B without its llama3 rope scaling, which costs nothing)
SHAPES = {
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=8192),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}
TINY_SHAPES = {
    "135m": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=256),
    "1b": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
               max_position_embeddings=256),
}
MODEL_NAMES = {"135m": "SmolLM2-135M shape", "1b": "Llama-3.2-1B shape"}
RANK, ALPHA = 16, 32.0
TARGETS = r"self_attn/(q_proj|k_proj|v_proj|o_proj)$|mlp/(gate_proj|up_proj|down_proj)$"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, WEIGHT_DECAY = 1e-4, 0.01
PEAK = {"bf16": 989e12, "fp32": 67e12}

# phases: (name, framework, items in priority order); required items first, optional ones after
PLAN = [
    ("jax-bf16", "jax", ["jax:135m:lora:bf16", "jax:135m:full:bf16", "jax:1b:lora:bf16", "jax:1b:full:bf16"]),
    ("torch-bf16", "torch", ["torch:135m:full:bf16", "torch:135m:lora:bf16", "torch:1b:full:bf16",
                             "torch:1b:lora:bf16"]),
    ("jax-fp32", "jax", ["jax:135m:lora:fp32", "jax:135m:full:fp32"]),
    ("jax-optional", "jax", ["jax:135m:dora:bf16", "jax:135m:ssb:bf16", "jax:1b:dora:bf16", "jax:1b:lora:fp32",
                             "jax:1b:full:fp32"]),
    ("torch-optional", "torch", ["torch:135m:dora:bf16", "torch:1b:dora:bf16"]),
]
# --plan long: what the long-sequence targets need, nothing else: the 1b bf16 steps of both sides
PLANS = {"all": PLAN, "long": [("jax-1b", "jax", ["jax:1b:full:bf16", "jax:1b:lora:bf16"]),
                               ("torch-1b", "torch", ["torch:1b:full:bf16", "torch:1b:lora:bf16"])]}
# the targets the table is checked against (1b, bf16): our full fine-tuning's MFU (of the dense bf16 peak),
# and our LoRA step against transformers (sdpa) + HF PEFT's
TARGETS_1B = {"full_mfu": 0.45, "lora_vs_peft": 0.8}


def log(msg: str) -> None:
    print(msg, flush=True)


def emit(out: str, record: dict) -> None:
    with open(os.path.join(out, "results.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")


def parse_item(item: str):
    fw, shape, method, dtype = item.split(":")
    assert fw in ("jax", "torch") and shape in SHAPES and method in ("full", "lora", "dora", "ssb") \
        and dtype in ("fp32", "bf16"), item
    return fw, shape, method, dtype


# ---------------------------------------------------------------------------------------------------
# model FLOPs


def model_flops(c: dict, method: str, batch: int, seq: int, rank: int = RANK) -> dict:
    """Model FLOPs of one train step (see the module docstring) and its terms."""
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    mats = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]
    n_layer = sum(a * b for a, b in mats)
    n_mm = layers * n_layer
    n_head = h * vocab
    n = n_mm + n_head
    attn = 12 * layers * seq * heads * hd  # fwd 4 L s (H d): QK^T and PV over s keys; x3 with backward
    tokens = batch * seq
    adapter_tok = layers * sum(6 * rank * (a + b) for a, b in mats)
    per_step = 0
    if method == "full":
        per_token = 6 * n + attn
    elif method in ("lora", "dora"):
        per_token = 4 * n + attn + adapter_tok
        if method == "dora":
            per_step = layers * sum(2 * rank * a * b + 3 * a * b for a, b in mats)
    elif method == "ssb":
        per_token = 4 * n + attn
    else:
        raise ValueError(method)
    return {"flops_per_step": per_token * tokens + per_step, "flops_per_token": per_token, "n_matmul_params": n,
            "n_layer_params": n_mm, "n_head_params": n_head, "attn_flops_per_token": attn,
            "adapter_flops_per_token": adapter_tok if method in ("lora", "dora") else 0, "per_step_extra": per_step}


# ---------------------------------------------------------------------------------------------------
# JAX


def import_decomp_jax():
    """Import the submodules we use; if ``decomp_jax/__init__.py`` itself fails (an import that breaks on
    newer jax/transformers), register a bare package so the submodules still import, and say so."""
    note = None
    try:
        import decomp_jax  # noqa: F401
    except Exception as err:  # noqa: BLE001
        import types

        note = f"import decomp_jax failed ({type(err).__name__}: {err}); used a bare package stub"
        log("NOTE " + note)
        for name in [m for m in sys.modules if m == "decomp_jax" or m.startswith("decomp_jax.")]:
            del sys.modules[name]
        pkg = types.ModuleType("decomp_jax")
        pkg.__path__ = [os.path.join(os.getcwd(), "decomp_jax") if os.path.isdir("decomp_jax")
                        else os.path.join(os.path.dirname(HERE), "decomp_jax")]
        sys.modules["decomp_jax"] = pkg
    return note


def jax_env() -> dict:
    import flax
    import jax
    import optax

    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
            "device": str(dev), "device_kind": getattr(dev, "device_kind", None), "python": platform.python_version()}
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def jax_ceiling(tiny: bool) -> dict:
    """Achieved matmul rate: 8192^3 products of random inputs (bf16; fp32 at default precision, which XLA
    runs as TF32 on this GPU; fp32 at HIGHEST precision)."""
    import jax
    import jax.numpy as jnp

    n = 256 if tiny else 8192
    reps = 3 if tiny else 20
    out = {"n": n}
    for label, dtype, precision in (("bf16", jnp.bfloat16, None), ("fp32", jnp.float32, None),
                                    ("fp32_highest", jnp.float32, jax.lax.Precision.HIGHEST)):
        try:
            keys = jax.random.split(jax.random.PRNGKey(7), 4)
            mats = [jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in keys]
            f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
            for _ in range(3):
                jax.block_until_ready(f(mats[0], mats[1]))
            t0 = time.perf_counter()
            results = [f(mats[i % 2], mats[2 + i % 2]) for i in range(reps)]
            jax.block_until_ready(results)
            dt = (time.perf_counter() - t0) / reps
            out[label] = {"time_s": dt, "flops_per_s": 2 * n ** 3 / dt}
            log(f"[ceiling] jax {label} {n}^3 matmul: {dt * 1e3:.3f} ms, {2 * n ** 3 / dt / 1e12:.1f} TFLOP/s")
            del mats, results
        except Exception as err:  # noqa: BLE001
            out[label] = {"error": f"{type(err).__name__}: {err}"}
            log(f"[ceiling] jax {label} FAILED: {err}")
    return out


def packed_layout(batch: int, seq: int, packed: int):
    """``(segments, positions)``, each ``(batch, seq)`` int32: ``packed`` examples of ``seq // packed`` tokens
    per row (ids 1..packed; positions restarting at each example)."""
    import numpy as np

    length = seq // packed
    segments = np.repeat(np.arange(1, packed + 1, dtype=np.int32), length)
    positions = np.tile(np.arange(length, dtype=np.int32), packed)
    return np.broadcast_to(segments, (batch, seq)).copy(), np.broadcast_to(positions, (batch, seq)).copy()


def jax_measure(item: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from decomp_jax.core.config import AdapterConfig
    from decomp_jax.core.execution import adapt
    from decomp_jax.core.inject import inject, partition
    from decomp_jax.core.tree import count_params
    from decomp_jax.models.attention import choose
    from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, random_params
    from decomp_jax.training.train import init_state, make_optimizer, make_train_step

    _, shape, method, dtype = parse_item(item)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    config = LlamaConfig(**shapes[shape], dtype="bfloat16" if dtype == "bf16" else "float32", param_dtype="float32",
                         attention=args.attention)
    model = LlamaForCausalLM(config)
    t0 = time.perf_counter()
    params = random_params(config)
    jax.block_until_ready(params)
    row = {"init_s": time.perf_counter() - t0, "total_params": count_params(params),
           "attention": choose(args.attention, args.seq, args.seq, config.compute_dtype, segments=True),
           "packed": args.packed}
    if method == "full":
        acfg, trainable, buffers, frozen, apply = None, params, {}, {}, model.apply
        row["precision"] = ("fp32 params and AdamW; bf16 compute (LlamaConfig dtype=bfloat16, param_dtype=float32)"
                            if dtype == "bf16" else "fp32 params and compute (XLA default dot precision)")
    else:
        acfg = AdapterConfig(method=method, targets=TARGETS, rank=RANK, alpha=ALPHA)
        adapted = inject(params, acfg, jax.random.PRNGKey(1))
        trainable, buffers, frozen = partition(adapted, acfg)
        del adapted
        if dtype == "bf16":  # the frozen base stored in bf16, the factors fp32 (cast to bf16 in the dots)
            frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  frozen)
            row["precision"] = "frozen base bf16, factors + AdamW fp32, bf16 compute (factors cast in the dots)"
        else:
            row["precision"] = "fp32 everywhere (XLA default dot precision)"
        apply = adapt(model.apply, acfg)  # factored
    del params
    row["trainable_params"] = count_params(trainable)
    row["frozen_params"] = count_params(frozen)

    def loss_fn(p, batch, rng):
        logits = apply({"params": p}, batch["input_ids"], None, batch.get("position_ids"),
                       segment_ids=batch.get("segment_ids")).astype(jnp.float32)[:, :-1]  # (B, L-1, V)
        targets = batch["input_ids"][:, 1:]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        if "segment_ids" not in batch:
            return jnp.mean(log_z - picked), {}
        same = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]).astype(jnp.float32)  # within an example
        return jnp.sum((log_z - picked) * same) / jnp.sum(same), {}

    optimizer = make_optimizer(LR, 1000, weight_decay=WEIGHT_DECAY)
    step = make_train_step(loss_fn, optimizer, acfg)
    state = init_state(trainable, optimizer, jax.random.PRNGKey(2), buffers=buffers)
    del trainable
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    batch = {"input_ids": jax.device_put(ids)}
    if args.packed > 1:
        segments, positions = packed_layout(args.batch, args.seq, args.packed)
        batch.update(segment_ids=jax.device_put(segments), position_ids=jax.device_put(positions))
    jax.block_until_ready((state, frozen, batch))

    t0 = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    row["trace_lower_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t1
    row["compile_total_s"] = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
        fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "generated_code_size_in_bytes", "host_temp_size_in_bytes", "peak_memory_in_bytes")
        m = {f: int(getattr(mem, f)) for f in fields if getattr(mem, f, None) is not None}
        m["temp_arg_out_bytes"] = m.get("temp_size_in_bytes", 0) + m.get("argument_size_in_bytes", 0) \
            + m.get("output_size_in_bytes", 0)
        m["net_bytes"] = m["temp_arg_out_bytes"] - m.get("alias_size_in_bytes", 0)  # donated outputs alias inputs
        row["memory"] = m
    except Exception as err:  # noqa: BLE001
        row["memory"] = {"error": f"{type(err).__name__}: {err}"}

    holder = {"state": state}
    del state
    losses = []

    def call():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    t0 = time.perf_counter()
    metrics = call()
    row["first_call_s"] = time.perf_counter() - t0
    losses.append(float(metrics["loss"]))
    for _ in range(args.warmup - 1):
        call()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        metrics = call()
        times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
    row.update(step_time_s=statistics.median(times), step_time_min_s=min(times), step_times_s=times,
               loss_first=losses[0], loss_last=losses[-1], finite=bool(all(math.isfinite(x) for x in losses)))
    try:
        stats = jax.devices()[0].memory_stats() or {}
        row["device_peak_bytes_in_process"] = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001
        pass
    del holder, compiled, lowered, step, frozen, batch
    gc.collect()
    return row


# ---------------------------------------------------------------------------------------------------
# PyTorch (transformers + HF PEFT)


def torch_env() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import peft

        info["peft"] = peft.__version__
    except Exception as err:  # noqa: BLE001
        info["peft"] = f"import failed: {err}"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def torch_ceiling(tiny: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    n = 256 if tiny else 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    mats = [torch.randn(n, n, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]
    for _ in range(3):
        mats[0] @ mats[1]
    torch.cuda.synchronize()
    reps = 20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        mats[i % 2] @ mats[2 + i % 2]
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1e3 / reps
    log(f"[ceiling] torch bf16 {n}^3 matmul: {dt * 1e3:.3f} ms, {2 * n ** 3 / dt / 1e12:.1f} TFLOP/s")
    return {"n": n, "bf16": {"time_s": dt, "flops_per_s": 2 * n ** 3 / dt}}


def torch_measure(item: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, shape, method, dtype = parse_item(item)
    if dtype != "bf16":
        raise ValueError("only bf16 is measured in PyTorch")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(**shapes[shape], hidden_act="silu", attention_dropout=0.0, attn_implementation="sdpa",
                         use_cache=False)
    row = {"packed": args.packed}
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config)
    row["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    rope = getattr(model.config, "rope_theta", None) or (getattr(model.config, "rope_parameters", None) or {}).get(
        "rope_theta")
    row["rope_theta_seen"] = rope
    if method == "full":
        row["precision"] = "fp32 weights and AdamW, torch.autocast(bfloat16)"
    else:
        from peft import LoraConfig, get_peft_model

        model = model.to(torch.bfloat16)
        lcfg = LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=PEFT_TARGETS, use_dora=(method == "dora"))
        model = get_peft_model(model, lcfg)  # autocast_adapter_dtype=True: adapter weights fp32
        row["precision"] = "base weights bf16, adapter weights + AdamW fp32 (PEFT default), torch.autocast(bfloat16)"
    model.train()
    row["init_s"] = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    row["trainable_params"] = int(sum(p.numel() for p in params))
    row["total_params"] = int(sum(p.numel() for p in model.parameters()))
    row["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    inputs = {"input_ids": ids, "labels": ids}
    if args.packed > 1:  # a 4-D mask (transformers uses it as given): causal within each example
        segments, positions = (torch.as_tensor(a).to(device) for a in packed_layout(args.batch, args.seq, args.packed))
        causal = torch.ones(args.seq, args.seq, dtype=torch.bool, device=device).tril()
        labels = ids.clone()
        labels[:, args.seq // args.packed::args.seq // args.packed] = -100  # no loss across a boundary
        inputs = {"input_ids": ids, "labels": labels, "position_ids": positions,
                  "attention_mask": (causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def call():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = model(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return out.loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [float(call())]
    row["first_call_s"] = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        call()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = call()
        times.append(time.perf_counter() - t0)
    losses.append(float(loss))
    row.update(step_time_s=statistics.median(times), step_time_min_s=min(times), step_times_s=times,
               loss_first=losses[0], loss_last=losses[-1], finite=bool(all(math.isfinite(x) for x in losses)))
    if device == "cuda":
        row["torch_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    del model, optimizer, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------
# a phase (one subprocess)


def run_phase(args) -> None:
    items = [i for i in args.items.split(",") if i]
    fw = parse_item(items[0])[0] if items else args.framework
    deadline = args.deadline
    if fw == "jax":
        note = import_decomp_jax()
        env = jax_env()
        if note:
            env["import_note"] = note
        log(f"[env] {json.dumps(env)}")
        emit(args.out, {"kind": "env", "framework": "jax", **env})
        if args.ceiling:
            emit(args.out, {"kind": "ceiling", "framework": "jax", **jax_ceiling(args.tiny)})
    else:
        env = torch_env()
        log(f"[env] {json.dumps(env)}")
        emit(args.out, {"kind": "env", "framework": "torch", **env})
        if args.ceiling:
            try:
                emit(args.out, {"kind": "ceiling", "framework": "torch", **torch_ceiling(args.tiny)})
            except Exception as err:  # noqa: BLE001
                log(f"[ceiling] torch FAILED: {err}")
    walls = {}  # (framework, model) -> wall time of the last item: the estimate for the next one
    for item in items:
        left = deadline - time.time()
        key = parse_item(item)[:2]
        need = max(args.min_left, 0.8 * walls.get(key, 60.0 if fw == "jax" else 25.0))
        if left < need:
            log(f"[{item}] SKIPPED: {left:.0f} s left in the budget, about {need:.0f} s needed")
            emit(args.out, {"kind": "skipped", "item": item, "reason": f"{left:.0f} s left"})
            continue
        t0 = time.time()
        log(f"[{item}] start ({left:.0f} s left)")
        try:
            row = jax_measure(item, args) if fw == "jax" else torch_measure(item, args)
            row.update(kind="result", item=item, wall_s=time.time() - t0)
            walls[key] = row["wall_s"]
            emit(args.out, row)
            mem = row.get("memory", {})
            log(f"[{item}] step {row['step_time_s'] * 1e3:.1f} ms (min {row['step_time_min_s'] * 1e3:.1f}) "
                f"compile {fmt(row.get('compile_total_s'), '.1f')} s  trainable {row['trainable_params']:,}  "
                f"xla temp+arg+out {mem.get('temp_arg_out_bytes', 0) / 2 ** 30:.2f} GiB  "
                f"loss {row['loss_first']:.3f}->{row['loss_last']:.3f}  ({row['wall_s']:.0f} s)")
        except Exception as err:  # noqa: BLE001
            tb = traceback.format_exc()
            log(f"[{item}] FAILED: {type(err).__name__}: {str(err)[:2000]}\n{tb[-3000:]}")
            emit(args.out, {"kind": "error", "item": item, "error": f"{type(err).__name__}: {str(err)[:4000]}",
                            "traceback": tb[-6000:], "wall_s": time.time() - t0})
            gc.collect()


# ---------------------------------------------------------------------------------------------------
# the driver


def smi() -> dict:
    try:
        q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu"
        text = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
        return {"query": q, "value": text}
    except Exception as err:  # noqa: BLE001
        return {"error": str(err)}


def derive(records: list[dict], args) -> dict:
    """Table rows with FLOPs, MFU and ratios from the streamed records."""
    shapes = TINY_SHAPES if args.tiny else SHAPES
    ceilings = {r["framework"]: r for r in records if r.get("kind") == "ceiling"}
    jc = ceilings.get("jax", {})
    rows = []
    for r in records:
        if r.get("kind") not in ("result", "error", "skipped"):
            continue
        fw, shape, method, dtype = parse_item(r["item"])
        row = {"item": r["item"], "framework": fw, "model": shape, "method": method, "dtype": dtype,
               "status": {"result": "ok", "error": "error", "skipped": "skipped"}[r["kind"]]}
        if r["kind"] == "result":
            f = model_flops(shapes[shape], method, args.batch, args.seq)
            t = r["step_time_s"]
            ceil = (jc.get(dtype) or {}).get("flops_per_s")
            row.update(step_ms=t * 1e3, tokens_per_s=args.batch * args.seq / t, compile_s=r.get("compile_total_s"),
                       xla_mem_gib=(r.get("memory", {}).get("temp_arg_out_bytes") or 0) / 2 ** 30 or None,
                       xla_net_gib=(lambda m: (m["temp_arg_out_bytes"] - m.get("alias_size_in_bytes", 0)) / 2 ** 30
                                    if "temp_arg_out_bytes" in m else None)(r.get("memory", {})),
                       torch_mem_gib=(r.get("torch_max_memory_allocated_bytes") or 0) / 2 ** 30 or None,
                       tflop_per_step=f["flops_per_step"] / 1e12, achieved_tflops=f["flops_per_step"] / t / 1e12,
                       mfu_peak=f["flops_per_step"] / t / PEAK[dtype], peak_used=PEAK[dtype],
                       mfu_ceiling=(f["flops_per_step"] / t / ceil) if ceil else None, ceiling_flops_per_s=ceil,
                       trainable=r["trainable_params"], loss_first=r["loss_first"], loss_last=r["loss_last"],
                       finite=r["finite"], flops=f)
        else:
            row["error"] = r.get("error") or r.get("reason")
        rows.append(row)
    by = {(r["framework"], r["model"], r["method"], r["dtype"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        full = by.get((r["framework"], r["model"], "full", r["dtype"]))
        r["vs_full"] = r["step_ms"] / full["step_ms"] if full else None
        if r["framework"] == "jax":
            other = by.get(("torch", r["model"], r["method"], r["dtype"]))
            r["jax_vs_torch"] = r["step_ms"] / other["step_ms"] if other else None
    return {"rows": rows, "ceilings": ceilings, "targets": check_targets(by)}


def check_targets(by: dict) -> list[dict]:
    """TARGETS_1B against the 1b bf16 rows there are (a target whose rows are missing is left out)."""
    out = []
    full, lora, peft = (by.get((fw, "1b", method, "bf16")) for fw, method in
                        (("jax", "full"), ("jax", "lora"), ("torch", "lora")))
    if full:
        out.append({"what": "1b bf16 full fine-tuning MFU (dense bf16 peak)", "value": full["mfu_peak"],
                    "target": f">= {TARGETS_1B['full_mfu']}", "passed": full["mfu_peak"] >= TARGETS_1B["full_mfu"]})
    if lora and peft:
        ratio = lora["step_ms"] / peft["step_ms"]
        out.append({"what": "1b bf16 LoRA step, decomp_jax / HF PEFT", "value": ratio,
                    "target": f"<= {TARGETS_1B['lora_vs_peft']}", "passed": ratio <= TARGETS_1B["lora_vs_peft"]})
    return out


def target_lines(derived: dict) -> list[str]:
    return [f"target: {t['what']} = {t['value']:.3f} (target {t['target']}): {'PASS' if t['passed'] else 'FAIL'}"
            for t in derived.get("targets", [])]


def write_results(out: str, result: dict, derived: dict) -> str:
    """OUT/results.json and OUT/table.md (the table, then the targets' verdicts); returns the table's text."""
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    text = "\n".join([table(derived), "", *target_lines(derived)])
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(derived: dict) -> str:
    head = ("| model | fw | method | dtype | step ms | tok/s | compile s | mem GiB | net GiB | TFLOP/step | TFLOP/s "
            "| MFU peak | MFU ceil | vs full | jax/torch |")
    lines = [head, "|" + "---|" * 15]
    order = {"135m": 0, "1b": 1}
    rows = sorted(derived["rows"], key=lambda r: (order[r["model"]], r["dtype"] != "bf16", r["framework"] != "jax",
                                                  ["full", "lora", "dora", "ssb"].index(r["method"])))
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['framework']} | {r['method']} | {r['dtype']} | {r['status']}: "
                         f"{(r.get('error') or '')[:60]} ||||||||||")
            continue
        mem = r["xla_mem_gib"] if r["framework"] == "jax" else r["torch_mem_gib"]
        lines.append(
            f"| {r['model']} | {r['framework']} | {r['method']} | {r['dtype']} | {r['step_ms']:.1f} "
            f"| {r['tokens_per_s']:,.0f} | {fmt(r['compile_s'], '.1f')} | {fmt(mem, '.1f')} "
            f"| {fmt(r.get('xla_net_gib') if r['framework'] == 'jax' else mem, '.1f')} "
            f"| {r['tflop_per_step']:.2f} | {r['achieved_tflops']:.0f} | {r['mfu_peak']:.3f} "
            f"| {fmt(r['mfu_ceiling'], '.3f')} | {fmt(r.get('vs_full'), '.2f')} | {fmt(r.get('jax_vs_torch'), '.2f')} |")
    return "\n".join(lines)


def run_driver(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    deadline = started + args.budget
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "batch": args.batch, "seq": args.seq, "rank": RANK,
            "plan": args.plan, "attention": args.attention, "packed": args.packed,
            "alpha": ALPHA, "targets": TARGETS, "lr": LR, "weight_decay": WEIGHT_DECAY, "warmup": args.warmup,
            "steps": args.steps, "tiny": args.tiny, "budget_s": args.budget, "nvidia_smi_before": smi(),
            "peaks": PEAK, "shapes": TINY_SHAPES if args.tiny else SHAPES, "host_cpus": os.cpu_count(),
            "python_executable": sys.executable, "xla_flags": os.environ.get("XLA_FLAGS"),
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92 (set by the driver)"),
            "formulas": __doc__.split("Model FLOPs")[1].strip()}
    log(f"[meta] {json.dumps({k: v for k, v in meta.items() if k not in ('formulas', 'shapes')})}")
    wanted = set(args.items.split(",")) if args.items else None
    plan = [(name, fw, [i for i in items if wanted is None or i in wanted]) for name, fw, items in PLANS[args.plan]]
    if wanted:
        known = {i for _, _, items in PLANS[args.plan] for i in items}
        for extra in sorted(wanted - known):
            fw = parse_item(extra)[0]
            plan.append((f"{fw}-extra", fw, [extra]))
    ceiling_done = set()
    for name, fw, items in plan:
        if not items:
            continue
        left = deadline - time.time()
        if left < args.min_left:
            log(f"[{name}] SKIPPED (budget): {items}")
            for item in items:
                emit(args.out, {"kind": "skipped", "item": item, "reason": f"{left:.0f} s left before its phase"})
            continue
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", "--items", ",".join(items), "--out", args.out,
               "--deadline", str(deadline), "--batch", str(args.batch), "--seq", str(args.seq),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--min-left", str(args.min_left),
               "--attention", args.attention, "--packed", str(args.packed)]
        if args.tiny:
            cmd.append("--tiny")
        if fw not in ceiling_done and not args.no_ceiling:
            cmd.append("--ceiling")
            ceiling_done.add(fw)
        log(f"[{name}] {len(items)} items, {left:.0f} s left")
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, timeout=max(left + 15, 30))
            log(f"[{name}] exit {proc.returncode} after {time.time() - t0:.0f} s")
        except subprocess.TimeoutExpired:
            log(f"[{name}] killed at the budget after {time.time() - t0:.0f} s")
    records = []
    path = os.path.join(args.out, "results.jsonl")
    if os.path.exists(path):
        records = [json.loads(line) for line in open(path) if line.strip()]
    done = {r["item"] for r in records if r.get("kind") in ("result", "error", "skipped")}
    for _, _, items in plan:
        for item in items:
            if item not in done:
                records.append({"kind": "skipped", "item": item, "reason": "no record (phase killed?)"})
    derived = derive(records, args)
    meta["nvidia_smi_after"] = smi()
    meta["wall_s"] = time.time() - started
    result = {"meta": meta, "env": [r for r in records if r.get("kind") == "env"], **derived,
              "raw": [r for r in records if r.get("kind") in ("result", "error", "skipped")]}
    text = write_results(args.out, result, derived)
    log("\n=== envs ===")
    for r in result["env"]:
        log(json.dumps({k: v for k, v in r.items() if k != "kind"}))
    for fw, c in derived["ceilings"].items():
        log(f"ceiling {fw}: " + ", ".join(f"{k} {v['flops_per_s'] / 1e12:.0f} TFLOP/s" for k, v in c.items()
                                          if isinstance(v, dict) and "flops_per_s" in v))
    log(f"batch {args.batch} x {args.seq}; LoRA r={RANK} alpha={ALPHA:g} on q,k,v,o,gate,up,down; peaks bf16 989e12, "
        f"fp32 67e12; 'MFU ceil' = vs the JAX 8192^3 matmul of the same dtype; mem = XLA temp+arg+out, net = that minus "
        f"the donated (aliased) outputs (jax); torch max_memory_allocated (torch); wall {meta['wall_s']:.0f} s")
    for r in derived["rows"]:
        if r["status"] == "ok" and not r["finite"]:
            log(f"WARNING non-finite loss: {r['item']}")
    log(text)


def merge_runs(args) -> None:
    """Combine the records of several runs (each item's last result wins; the first run's ceilings and
    meta are kept, the others' meta listed) and write results.json / table.md into --out."""
    os.makedirs(args.out, exist_ok=True)
    records, metas = [], []
    for folder in args.merge:
        records += [json.loads(line) for line in open(os.path.join(folder, "results.jsonl")) if line.strip()]
        path = os.path.join(folder, "results.json")
        if os.path.exists(path):
            metas.append(json.load(open(path))["meta"])
    last = {}
    for r in records:
        if r.get("kind") in ("result", "error", "skipped"):
            prev = last.get(r["item"])
            if prev is None or prev.get("kind") != "result" or r.get("kind") == "result":
                last[r["item"]] = r
    ceilings, envs = {}, []
    for r in records:
        if r.get("kind") == "ceiling":
            ceilings.setdefault(r["framework"], r)
        elif r.get("kind") == "env":
            envs.append(r)
    merged = list(ceilings.values()) + list(last.values())
    derived = derive(merged, args)
    result = {"meta": metas[0] if metas else {}, "runs": metas, "env": envs, **derived, "raw": list(last.values()),
              "all_ceilings": [r for r in records if r.get("kind") == "ceiling"]}
    text = write_results(args.out, result, derived)
    log(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, batch 2 x 32, few steps")
    p.add_argument("--items", default="", help="comma-separated fw:model:method:dtype items (default: the plan)")
    p.add_argument("--plan", choices=sorted(PLANS), default="all",
                   help="all: every item in priority order; long: the 1b bf16 full and LoRA steps of both sides only")
    p.add_argument("--budget", type=float, default=380.0, help="seconds for the whole run")
    p.add_argument("--min-left", type=float, default=25.0, help="skip an item with fewer seconds left")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--attention", default="auto", help="our attention implementation (decomp_jax.models.attention: "
                   "auto = cudnn on a GPU in bf16, xla, chunked, cudnn, splash); recorded per row")
    p.add_argument("--packed", type=int, default=1,
                   help="examples per row (packing): segment ids and positions restarting per example; seq must be a "
                        "multiple of it (default 1: one example per row)")
    p.add_argument("--merge", nargs="+", default=None,
                   help="folders of earlier runs: combine their results.jsonl (later runs win per item) into --out")
    # internal
    p.add_argument("--phase", action="store_true")
    p.add_argument("--framework", default="jax")
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--ceiling", action="store_true")
    args = p.parse_args(argv)
    defaults = (2, 32, 2, 3) if args.tiny else (8, 1024, 3, 10)
    for name, value in zip(("batch", "seq", "warmup", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.packed < 1 or args.seq % args.packed:
        p.error(f"--packed {args.packed}: the row length --seq {args.seq} must be a positive multiple of it")
    if args.merge:
        merge_runs(args)
    elif args.phase:
        run_phase(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
