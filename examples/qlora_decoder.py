"""QLoRA on a decoder: an NF4-quantized frozen Llama, LoRA factors in float32, causal-LM loss.

A tiny random Llama (decomp_jax's Flax Llama) stands in for a pretrained decoder.
`dj.inject_quantized` stores every frozen dense kernel in 4-bit NormalFloat (QLoRA's NF4, blocks of
64 values, double quantization of the block scales) and adds LoRA factors, started from the
dequantized kernels, in float32. In factored execution (`dj.adapt`) each layer dequantizes its
kernel where it reads it; the gradients reach the factors only. The task: counting sequences
(each token is the previous one plus 1), trained with `dj.make_train_step` and a causal-LM loss.

Run: python examples/qlora_decoder.py [--steps 40 --hidden 256 --layers 4]
"""

import argparse

import jax
import numpy as np

import decomp_jax as dj
from decomp_jax import quant
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, random_params
from decomp_jax.training.losses import causal_lm_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    base = random_params(config)
    cfg = dj.AdapterConfig(method="lora", targets=r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
                           rank=8, factor_dtype="float32")
    # (jitted: one compilation, instead of one per operation of the blockwise quantization)
    qbase, params = jax.jit(lambda base, key: dj.inject_quantized(base, cfg, key, "nf4", block_size=64))(
        base, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    kernels = [x for x in jax.tree.leaves(frozen, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    print(f"{len(kernels)} frozen kernels in nf4: base {quant.stored_bytes(base):,} bytes in float32, "
          f"{quant.stored_bytes(qbase):,} quantized; LoRA {dj.count_params(trainable):,} float32 parameters")

    apply = dj.adapt(model.apply, cfg)  # each layer dequantizes its kernel, then runs x @ K + s (x @ A) @ B

    def loss_fn(params, batch, rng):
        return causal_lm_loss(apply({"params": params}, batch["input_ids"]), batch), {}

    optimizer = dj.make_optimizer(args.lr, args.steps, warmup_ratio=0.1)
    step = dj.make_train_step(loss_fn, optimizer, cfg)
    state = dj.init_state(trainable, optimizer, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    losses = []
    for i in range(args.steps):
        starts = rng.integers(0, config.vocab_size, (args.batch, 1))
        ids = ((starts + np.arange(args.length)) % config.vocab_size).astype(np.int32)
        state, metrics = step(state, frozen, {"input_ids": ids, "loss_mask": np.ones_like(ids)})
        losses.append(float(metrics["loss"]))
        if i % max(args.steps // 5, 1) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(state.trainable)})
    print(f"trained leaves: {dtypes}; frozen kernels still nf4: "
          f"{all(quant.is_quantized(x) for x in kernels)}")


if __name__ == "__main__":
    main()
