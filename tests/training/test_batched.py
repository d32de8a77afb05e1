"""Batched multi-adapter training (make_train_step(..., batched=...)): N adapters trained in one jitted
step over one frozen base equal N separate runs (seeds on one batch, tasks on their own batches, learning
rates through with_lr_factor)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decomp_jax.models.hf import sequence_classifier_apply
from decomp_jax.training.losses import classification_loss
import decomp_jax as dj

CFG = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=4, alpha=8, dropout=0.1,
                       train_extra="classifier")
STEPS = 3


def _setup(tiny_bert, cfg, seeds, lr_factors=None):
    model, base = tiny_bert
    apply = dj.adapt(sequence_classifier_apply(model), cfg)

    def loss_fn(params, batch, rng):
        logits = apply(params, batch, train=True, rng=rng)
        return classification_loss(logits, batch["labels"]), {}

    tx = dj.make_optimizer(3e-2, STEPS, warmup_ratio=0.0)
    if lr_factors is not None:
        tx = dj.with_lr_factor(tx)
    states, frozen = [], None
    for i, seed in enumerate(seeds):
        trainable, frozen_i = dj.split(*(lambda p: (p, dj.trainable_mask(p, cfg)))(
            dj.inject(base, cfg, jax.random.PRNGKey(seed))))
        state = dj.init_state(trainable, tx, jax.random.PRNGKey(100 + seed))
        if lr_factors is not None:
            state = dj.set_lr_factor(state, lr_factors[i])
        states.append(state)
        frozen = frozen_i  # LoRA's frozen part is the base, the same for every seed
    return loss_fn, tx, states, frozen


def _batches(tiny_batch, n):
    """``n`` different batches (labels and ids permuted)."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        order = rng.permutation(len(tiny_batch["labels"]))
        out.append({k: v[order] for k, v in tiny_batch.items()})
    return out


def _separate(loss_fn, tx, states, frozen, batches):
    step = dj.make_train_step(loss_fn, tx, CFG, donate=False)
    out = []
    for state, batch in zip(states, batches):
        for _ in range(STEPS):
            state, _ = step(state, frozen, batch)
        out.append(state)
    return out


def _assert_equal_runs(stacked, separate):
    for i, want in enumerate(separate):
        got = dj.unstack_state(stacked, i)
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), want.trainable,
                             jax.tree.map(lambda x: x[0], stacked.trainable))
        for a, b in zip(jax.tree_util.tree_leaves(got.trainable), jax.tree_util.tree_leaves(want.trainable)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        if i:  # the adapters differ from each other far beyond the tolerance
            assert max(jax.tree_util.tree_leaves(moved)) > 1e-2


@pytest.mark.parametrize("mode", ["shared", "stacked"])
def test_batched_equals_separate_runs(mode, tiny_bert, tiny_batch):
    seeds = [0, 1, 2]
    loss_fn, tx, states, frozen = _setup(tiny_bert, CFG, seeds)
    batches = _batches(tiny_batch, 3) if mode == "stacked" else [tiny_batch] * 3
    separate = _separate(loss_fn, tx, states, frozen, batches)
    step = dj.make_train_step(loss_fn, tx, CFG, batched=mode)
    state = dj.stack_states(states)
    batch = jax.tree.map(lambda *xs: np.stack(xs), *batches) if mode == "stacked" else tiny_batch
    for _ in range(STEPS):
        state, metrics = step(state, frozen, batch)
    assert metrics["loss"].shape == (3,)
    _assert_equal_runs(state, separate)


def test_batched_learning_rates(tiny_bert, tiny_batch):
    """One seed, three learning rates (factors 0.5, 1, 2 of make_optimizer's) in one step: each equals its run
    with make_optimizer(factor * lr)."""
    factors = [0.5, 1.0, 2.0]
    loss_fn, tx, states, frozen = _setup(tiny_bert, CFG, [0, 0, 0], lr_factors=factors)
    step = dj.make_train_step(loss_fn, tx, CFG, batched="shared")
    state = dj.stack_states(states)
    for _ in range(STEPS):
        state, _ = step(state, frozen, tiny_batch)
    separate = []
    for factor in factors:
        loss_fn, tx_i, (state_i,), _ = _setup(tiny_bert, CFG, [0])
        tx_i = dj.make_optimizer(3e-2 * factor, STEPS, warmup_ratio=0.0)
        state_i = dj.init_state(state_i.trainable, tx_i, state_i.rng)
        single = dj.make_train_step(loss_fn, tx_i, CFG, donate=False)
        for _ in range(STEPS):
            state_i, _ = single(state_i, frozen, tiny_batch)
        separate.append(state_i)
    _assert_equal_runs(state, separate)


def test_batched_errors(tiny_bert):
    loss_fn, tx, states, frozen = _setup(tiny_bert, CFG, [0])
    with pytest.raises(dj.ConfigError, match="choose 'shared'"):
        dj.make_train_step(loss_fn, tx, CFG, batched="yes")
    other = dj.AdapterConfig(method="lora", targets=r"attention/self/query$", rank=2)
    _, _, others, _ = _setup(tiny_bert, other, [0])
    with pytest.raises(dj.ConfigError, match="differ in structure"):
        dj.stack_states([states[0], others[0]])
