"""LoRA training on a device mesh, checked against the same steps on one device.

A tiny random Llama (decomp_jax's Flax Llama) gets LoRA on every linear layer. The same train
step is built twice with `dj.make_train_step`: once for one device, once with
`mesh=dj.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})`. With a mesh every layout is
derived: the frozen base by the Llama partition rules (tensor parallelism on the heads and the
MLP, FSDP on the other axis), each LoRA factor from its kernel, the Adam moments from their
leaves, the batch split over ("data", "fsdp"). The script prints a few layouts and checks that
the sharded run gives the one-device losses and adapter.

On a CPU the 8 devices are simulated: when XLA_FLAGS sets no device count, the script adds
--xla_force_host_platform_device_count=8 (before JAX is imported). On accelerators, choose
sizes whose product is the device count.

Run: python examples/mesh_run.py [--data 2 --fsdp 2 --tensor 2 --steps 5]
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import decomp_jax as dj  # noqa: E402
from decomp_jax.models.llama import LlamaConfig, LlamaForCausalLM, random_params  # noqa: E402
from decomp_jax.training.losses import causal_lm_loss  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--fsdp", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=32)
    args = parser.parse_args()

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    cfg = dj.AdapterConfig(method="lora", targets=r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
                           rank=8)
    params = dj.inject(random_params(config), cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    apply = dj.adapt(model.apply, cfg)

    def loss_fn(params, batch, rng):
        return causal_lm_loss(apply({"params": params}, batch["input_ids"]), batch), {}

    mesh = dj.sharding.make_mesh({"data": args.data, "fsdp": args.fsdp, "tensor": args.tensor})
    print(f"{len(jax.devices())} devices ({jax.devices()[0].platform}), mesh {dict(mesh.shape)}")
    optimizer = dj.make_optimizer(1e-2, args.steps, warmup_ratio=0.0)
    one_step = dj.make_train_step(loss_fn, optimizer, cfg)
    mesh_step = dj.make_train_step(loss_fn, optimizer, cfg, mesh=mesh)  # shardings derived at the first call
    one = dj.init_state(trainable, optimizer, jax.random.PRNGKey(1))
    sharded = dj.init_state(trainable, optimizer, jax.random.PRNGKey(1))

    rng = np.random.default_rng(0)
    for i in range(args.steps):  # counting sequences: each token is the previous one plus 1
        starts = rng.integers(0, config.vocab_size, (4 * args.data * args.fsdp, 1))
        ids = (starts + np.arange(args.length)) % config.vocab_size
        batch = {"input_ids": ids.astype(np.int32), "loss_mask": np.ones_like(ids, np.int32)}
        one, m1 = one_step(one, frozen, batch)
        sharded, m2 = mesh_step(sharded, frozen, batch)
        print(f"step {i}  loss one device {float(m1['loss']):.6f}  mesh {float(m2['loss']):.6f}")

    specs = dj.sharding.param_specs(params, mesh, cfg=cfg)  # the layouts the step derived
    for name in ("self_attn/q_proj", "mlp/down_proj"):
        layer = specs["model"]["layers_0"][name.split("/")[0]][name.split("/")[1]]
        print(f"layout of {name}: kernel {layer['kernel']}, lora_a {layer['lora_a']}, lora_b {layer['lora_b']}")
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(one.trainable), jax.tree.leaves(sharded.trainable)))
    print(f"mesh vs one device: final adapter max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
