"""LoRA on your own Flax NNX model, trained in the NNX style.

The model is a small MLP of `nnx.Linear` layers defined here; the task, as in
examples/linen_lora_loop.py, is to match a teacher that differs from the model by a low-rank
change. The script:

1. adds LoRA to the model object in place (`decomp_jax.nnx.inject`): each targeted
   `nnx.Linear` gains `lora_a`, `lora_b` variables of type `AdapterParam` and runs
   x @ K + b + s (x @ A) @ B (factored execution; K' is never formed),
2. trains with `nnx.Optimizer(model, tx, wrt=AdapterParam)`: gradients and Adam moments exist
   for the factors only, the base kernels stay as they were,
3. folds the factors into the kernels (`decomp_jax.nnx.merge`: a plain NNX model, a copy) and
   checks that it gives the adapted model's outputs.

The model's state is the dict API's adapted params tree, path for path:
`nnx.to_pure_dict(nnx.state(model))` goes to `dj.merge`, `dj.export_peft` or a checkpoint.

Run: python examples/nnx_model.py [--steps 300 --width 256 --rank 4]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import decomp_jax as dj
from decomp_jax import nnx as dnnx


class MLP(nnx.Module):
    def __init__(self, features: int, width: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(features, width, rngs=rngs)
        self.mid = nnx.Linear(width, width, rngs=rngs)
        self.down = nnx.Linear(width, features, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.mid(nnx.gelu(self.up(x)))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    model = MLP(args.features, args.width, nnx.Rngs(0))
    base = nnx.clone(model)
    teacher = nnx.clone(model)  # the base with a rank-`rank` change to "up" and "mid"
    for layer, seed in ((teacher.up, 1), (teacher.mid, 2)):
        (d_in, d_out), (ka, kb) = layer.kernel.shape, jax.random.split(jax.random.PRNGKey(seed))
        a, b = jax.random.normal(ka, (d_in, args.rank)), jax.random.normal(kb, (args.rank, d_out))
        layer.kernel[...] += 0.3 * a @ b / d_in**0.5

    cfg = dj.AdapterConfig(method="lora", targets=r"^(up|mid)$", rank=args.rank, alpha=2.0 * args.rank)
    dnnx.inject(model, cfg, jax.random.PRNGKey(3))  # in place; the same factors dj.inject gives the dict
    n_lora, n_all = dj.count_params(nnx.state(model, dnnx.AdapterParam)), dj.count_params(nnx.state(model))
    print(f"trainable {n_lora:,} of {n_all:,} parameters")
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=dnnx.AdapterParam)

    @nnx.jit
    def step(model, optimizer, teacher, x):
        loss_fn = lambda model: jnp.mean((model(x) - teacher(x)) ** 2)
        # gradients for the AdapterParam variables only
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, dnnx.AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for i in range(args.steps):
        x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(4), i), (args.batch, args.features))
        losses.append(float(step(model, optimizer, teacher, x)))
        if i % max(args.steps // 5, 1) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {losses[-1]:.6f}")
    print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    frozen = nnx.to_pure_dict(nnx.state(model, nnx.Not(dnnx.AdapterParam)))
    kept = jax.tree.all(jax.tree.map(jnp.array_equal, frozen, nnx.to_pure_dict(nnx.state(base))))
    print(f"base kernels and biases unchanged: {kept}")

    merged = dnnx.merge(model, cfg)  # a plain MLP (nnx.Linear layers), K' = K + s A B
    x = jax.random.normal(jax.random.PRNGKey(5), (8, args.features))
    factored, plain, before = model(x), merged(x), base(x)
    print(f"the adapter moves the outputs by up to {float(jnp.abs(factored - before).max()):.2e}")
    print(f"merged vs factored outputs: max |diff| {float(jnp.abs(plain - factored).max()):.2e}")


if __name__ == "__main__":
    main()
