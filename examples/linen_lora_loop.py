"""LoRA on your own Flax Linen model, trained by your own optax loop.

The model is a small MLP defined here. Its "pretrained" weights are random; the task is to
match a teacher: the same MLP with a low-rank change to two of its kernels, which a LoRA of
that rank can learn exactly. The script:

1. adds LoRA factors beside the targeted kernels (`dj.inject`),
2. splits the params into trainable factors and the frozen base (`dj.trainable_mask`, `dj.split`),
3. runs the model in factored execution (`dj.adapt`: x @ K + s (x @ A) @ B, K' never formed),
4. trains with a jitted optax step written here: gradients and Adam moments exist for the
   factors only,
5. folds the factors into the kernels (`dj.merge`) and checks that the plain model gives the
   adapted model's outputs.

Run: python examples/linen_lora_loop.py [--steps 300 --width 256 --rank 4]
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import decomp_jax as dj


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.width, name="up")(x))
        h = nn.gelu(nn.Dense(self.width, name="mid")(h))
        return nn.Dense(x.shape[-1], name="down")(h)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    model = MLP(args.width)
    k_init, k_teacher, k_lora, k_data = jax.random.split(jax.random.PRNGKey(0), 4)
    x0 = jnp.zeros((1, args.features))
    base = jax.jit(model.init)(k_init, x0)["params"]  # (jitted: one compilation instead of one per op)

    @jax.jit
    def with_low_rank_change(params, key):  # the teacher: a rank-`rank` change to "up" and "mid"
        out = dict(params)
        for name, k in zip(("up", "mid"), jax.random.split(key)):
            (d_in, d_out), (ka, kb) = params[name]["kernel"].shape, jax.random.split(k)
            a, b = jax.random.normal(ka, (d_in, args.rank)), jax.random.normal(kb, (args.rank, d_out))
            out[name] = {**params[name], "kernel": params[name]["kernel"] + 0.3 * a @ b / d_in**0.5}
        return out

    teacher = with_low_rank_change(base, k_teacher)

    cfg = dj.AdapterConfig(method="lora", targets=r"^(up|mid)$", rank=args.rank, alpha=2.0 * args.rank)
    params = dj.inject(base, cfg, k_lora)  # lora_a, lora_b beside up/kernel and mid/kernel
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    print(f"trainable {dj.count_params(trainable):,} of {dj.count_params(params):,} parameters")

    apply = dj.adapt(model.apply, cfg)  # factored execution of the Linen apply
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(trainable)  # moments for the factors only

    def loss_fn(trainable, frozen, x):
        y = model.apply({"params": teacher}, x)
        pred = apply({"params": dj.combine(trainable, frozen)}, x)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def step(trainable, opt_state, frozen, x):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for i in range(args.steps):
        x = jax.random.normal(jax.random.fold_in(k_data, i), (args.batch, args.features))
        trainable, opt_state, loss = step(trainable, opt_state, frozen, x)
        losses.append(float(loss))
        if i % max(args.steps // 5, 1) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {losses[-1]:.6f}")
    print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f}")

    # merge: plain params of the base's shape, run by the plain model
    params = dj.combine(trainable, frozen)
    merged = dj.merge(params, cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, args.features))
    factored = jax.jit(apply)({"params": params}, x)
    plain, before = (jax.jit(model.apply)({"params": p}, x) for p in (merged, base))
    print(f"the adapter moves the outputs by up to {float(jnp.abs(factored - before).max()):.2e}")
    print(f"merged vs factored outputs: max |diff| {float(jnp.abs(plain - factored).max()):.2e}")


if __name__ == "__main__":
    main()
