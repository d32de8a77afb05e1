"""The train step: gradients and optimizer state only for trainable leaves, penalties, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from decomp_jax.models.hf import sequence_classifier_apply
from decomp_jax.training.losses import classification_loss
import decomp_jax as dj

from conftest import run_steps


def setup(tiny_bert, cfg, lr=1e-2, steps=10):
    model, base = tiny_bert
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    apply = dj.adapt(sequence_classifier_apply(model), cfg)

    def loss_fn(p, batch, rng):
        return classification_loss(apply(p, batch, train=True, rng=rng), batch["labels"]), {}

    opt = dj.make_optimizer(lr, steps, warmup_ratio=0.0)
    step = dj.make_train_step(loss_fn, opt, cfg)
    return step, dj.init_state(trainable, opt, jax.random.PRNGKey(1)), frozen


def test_only_trainable_leaves_train_and_have_optimizer_state(tiny_bert, tiny_batch):
    _, base = tiny_bert
    before = jax.tree.map(np.array, base)
    cfg = dj.AdapterConfig(method="lora", targets="(query|value)$", rank=4, train_extra="^classifier/", dropout=0.1)
    step, state, frozen = setup(tiny_bert, cfg)
    trainable0 = jax.tree.map(np.array, state.trainable)
    state, losses = run_steps(step, state, frozen, tiny_batch, 5)
    assert losses[-1] < losses[0]

    after = flatten_dict(dj.combine(state.trainable, frozen), sep="/")
    trained = set(flatten_dict(state.trainable, sep="/"))
    assert trained == {f"bert/encoder/layer/{i}/attention/self/{n}/lora_{ab}" for i in range(2) for n in ("query", "value") for ab in "ab"} | {"classifier/kernel", "classifier/bias"}
    for path, value in flatten_dict(before, sep="/").items():  # every base leaf but the head: bit-identical
        if not path.startswith("classifier/"):
            np.testing.assert_array_equal(np.asarray(after[path]), value)
    changed = [k for k, v in flatten_dict(trainable0, sep="/").items() if not np.array_equal(v, np.asarray(after[k]))]
    assert sorted(changed) == sorted(trained)

    # AdamW moments: exactly one mu and one nu per trainable leaf, same shapes
    adam = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    shapes = jax.tree.map(jnp.shape, state.trainable)
    assert jax.tree.map(jnp.shape, adam[0].mu) == shapes and jax.tree.map(jnp.shape, adam[0].nu) == shapes
    n_trainable = dj.count_params(state.trainable)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if jnp.ndim(x) > 0)
    assert n_state == 2 * n_trainable


def test_train_step_is_deterministic(tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method="dora", targets="(query|value)$", rank=4, train_extra="^classifier/", dropout=0.2)
    a, _ = run_steps(*setup(tiny_bert, cfg), tiny_batch, 3)
    b, _ = run_steps(*setup(tiny_bert, cfg), tiny_batch, 3)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.trainable), jax.device_get(b.trainable))


def test_train_step_adds_the_mpc_penalty(tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method="lora", targets="(query|value)$", rank=4, mpc="mpc_o", mpc_lambda=0.5)
    step, state, frozen = setup(tiny_bert, cfg)
    expected = float(dj.penalty(dj.combine(state.trainable, frozen), cfg))
    assert expected > 0
    new_state, metrics = step(state, frozen, tiny_batch)
    assert float(metrics["penalty"]) == pytest.approx(expected, rel=1e-5)
    # the update differs from the same step without the penalty
    step0, state0, frozen0 = setup(tiny_bert, cfg.replace(mpc=None))
    plain, _ = step0(state0, frozen0, tiny_batch)
    diff = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), new_state.trainable, plain.trainable)
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-6


@pytest.mark.parametrize("method", ["ssb", "ssl", "ia3", "bitfit"])
def test_scaling_methods_train(method, tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method=method, targets="(key|value)$|intermediate/dense$", train_extra="^classifier/")
    step, state, frozen = setup(tiny_bert, cfg, lr=5e-2)
    _, losses = run_steps(step, state, frozen, tiny_batch, 6)
    assert losses[-1] < losses[0]


def test_donated_state_leaves_callers_params_valid(tiny_bert, tiny_batch):
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=2, train_extra="^classifier/")
    step, state, frozen = setup(tiny_bert, cfg)
    run_steps(step, state, frozen, tiny_batch, 2)
    np.asarray(base["classifier"]["kernel"])  # raises if the step's donation deleted the caller's buffer
