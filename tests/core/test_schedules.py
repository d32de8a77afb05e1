"""Stateful methods: AdaLoRA's budget and masking, LoRA-Dash's direction search, inside the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.core.methods import adalora, dash, flexlora
from decomp_jax.core.tree import set_leaves
from decomp_jax.models.hf import sequence_classifier_apply
from decomp_jax.training.losses import classification_loss
import decomp_jax as dj

from conftest import run_steps


def test_adalora_budget_equals_closed_form():
    total, target, T = 48, 32, 100
    cfg = dj.AdapterConfig(method="adalora", rank=12, options={"target_rank": 8, "t_init": 0.1, "t_final": 0.2})
    t_init, end = adalora.phase_steps(cfg, T)
    assert (t_init, end) == (10, 80)
    for t in (1, 5, 10, 11, 25, 40, 63, 79, 80, 81, 100):
        if t <= 10:
            expected = total
        elif t >= 80:
            expected = target
        else:
            expected = int(np.floor(target + (total - target) * (1 - (t - 10) / (80 - 10)) ** 3))
        got = int(adalora.budget(t, total=total, target=target, t_init=t_init, end=end))
        assert got == expected, (t, got, expected)
    # traced step (inside jit) gives the same numbers
    jitted = jax.jit(lambda t: adalora.budget(t, total=total, target=target, t_init=t_init, end=end))
    assert [int(jitted(t)) for t in (11, 40, 80)] == [47, 34, 32]  # 32 + 16 * (1 - 30/70) ** 3 = 34.99


def test_mask_to_budget_masks_exactly_the_lowest_scores():
    rng = np.random.default_rng(0)
    scores = [jnp.asarray(rng.permutation(12)[:4] + 0.5 * i, jnp.float32) for i in range(3)]
    flat = np.concatenate([np.asarray(s) for s in scores])
    for n in (0, 1, 5, 11):
        keep = np.concatenate([np.asarray(k) for k in adalora.mask_to_budget(scores, jnp.int32(n))])
        lowest = set(np.argsort(flat)[:n])
        assert {i for i in range(len(flat)) if not keep[i]} == lowest


def _layers(params, cfg):
    from decomp_jax.core.inject import adapted_layers

    return dict(adapted_layers(params, cfg))


def test_adalora_update_zeroes_the_lowest_triplets_then_keeps_the_pattern(tiny_bert):
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="adalora", targets="query$", rank=4, options={"target_rank": 2})
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    layers = _layers(params, cfg)
    # non-zero lora_e everywhere, known EMAs: unc = 1 so the element score is ipt
    params = dj.set_leaves(params, {p + ("lora_e",): jnp.asarray(rng.uniform(0.5, 1.0, 4), jnp.float32) for p in layers})
    schedule = dj.make_schedule(cfg, total_steps=50)
    state = schedule.init(params)
    ipt = {k: jnp.asarray(rng.uniform(size=v.shape), jnp.float32) for k, v in flatten_dict(state["ipt"]).items()}
    state = {**state, "ipt": unflatten_dict(ipt), "unc": jax.tree.map(jnp.ones_like, state["unc"])}
    expected_scores = [
        np.asarray(ipt[p + ("lora_e",)]) + np.asarray(ipt[p + ("lora_a",)]).mean(0) + np.asarray(ipt[p + ("lora_b",)]).mean(1)
        for p in layers
    ]
    _, end = adalora.phase_steps(cfg, 50)
    grads = jax.tree.map(jnp.zeros_like, dj.split(params, dj.trainable_mask(params, cfg))[0])
    state2, out = jax.jit(schedule.update)(state, jnp.int32(end), params, grads)  # fixes the pattern at target
    flat_scores = np.concatenate(expected_scores)
    lowest = set(np.argsort(flat_scores)[:4])  # total 8 - target 4
    params_e = dict(flatten_dict(params))
    e_before = np.concatenate([np.asarray(params_e[p + ("lora_e",)]) for p in layers])
    e_after = np.concatenate([np.asarray(_layers(out, cfg)[p]["lora_e"]) for p in layers])
    assert {i for i in range(8) if e_after[i] == 0.0} == lowest
    np.testing.assert_array_equal(np.delete(e_after, sorted(lowest)), np.delete(e_before, sorted(lowest)))
    # later steps re-apply the same pattern even when the scores change
    state2 = {**state2, "ipt": jax.tree.map(lambda x: 1 - x, state2["ipt"])}
    _, out2 = jax.jit(schedule.update)(state2, jnp.int32(end + 3), params, grads)
    e_later = np.concatenate([np.asarray(_layers(out2, cfg)[p]["lora_e"]) for p in layers])
    np.testing.assert_array_equal(e_later, e_after)


def test_adalora_orthogonality_term_is_mpc_o(tiny_bert):
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="adalora", targets="query$", rank=4)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    as_lora = dj.AdapterConfig(method="trilora", targets="query$", rank=4, mpc="mpc_o")
    np.testing.assert_allclose(float(dj.penalty(params, cfg)), float(dj.penalty(params, as_lora)), rtol=1e-6)
    assert float(dj.penalty(params, cfg)) > 0
    assert float(dj.penalty(params, cfg.replace(mpc_lambda=0.0))) == 0.0


def test_dash_directions_pick_the_top_delta():
    rng = np.random.default_rng(0)
    d_in, d_out = 9, 7
    U, _ = np.linalg.qr(rng.normal(size=(d_in, d_out)))
    V, _ = np.linalg.qr(rng.normal(size=(d_out, d_out)))
    S = np.array([10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.5])
    K = U @ np.diag(S) @ V.T
    # dK's diagonal in K's singular basis: delta_i = |d_i| / S_i = [0.1, 0.05, 0.5, 0.25, 0.2, 0.3, 0.02]
    d = np.array([1.0, -0.4, 3.0, -1.0, 0.4, 0.3, 0.01])
    M = np.diag(d) + 0.5 * (1 - np.eye(d_out)) * rng.normal(size=(d_out, d_out))  # off-diagonals do not count
    dK = U @ M @ V.T
    dash_u, dash_vt, index = dash.dash_directions(jnp.asarray(K, jnp.float32), jnp.asarray(dK, jnp.float32), 3)
    assert list(np.asarray(index)) == [2, 5, 3]
    np.testing.assert_allclose(np.abs(np.asarray(dash_u).T @ U[:, [2, 5, 3]]), np.eye(3), atol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(dash_vt) @ V[:, [2, 5, 3]]), np.eye(3), atol=1e-4)


def _trainer(tiny_bert, cfg, total_steps, grad_accum=1):
    model, base = tiny_bert
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, buffers, frozen = dj.partition(params, cfg)
    apply = dj.adapt(sequence_classifier_apply(model), cfg)

    def loss_fn(p, batch, rng):
        return classification_loss(apply(p, batch, train=True, rng=rng), batch["labels"]), {}

    opt = dj.make_optimizer(1e-2, total_steps, warmup_ratio=0.0, grad_accum=grad_accum)
    schedule = dj.make_schedule(cfg, total_steps)
    step = dj.make_train_step(loss_fn, opt, cfg, schedule=schedule)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(1), buffers=buffers, schedule=schedule, frozen=frozen)
    return step, state, frozen


def test_adalora_training_reaches_the_target_budget_deterministically(tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method="adalora", targets="(query|value)$", rank=4,
                           options={"target_rank": 2, "interval": 3, "t_init": 0.1, "t_final": 0.2})
    runs = []
    for _ in range(2):
        step, state, frozen = _trainer(tiny_bert, cfg, total_steps=30)
        state, losses = run_steps(step, state, frozen, tiny_batch, 30)
        runs.append((state, losses))
    (state, losses), (state_b, losses_b) = runs
    assert losses == losses_b  # bit-identical
    assert losses[-1] < losses[0]
    e = np.concatenate([np.asarray(v) for k, v in flatten_dict(state.trainable).items() if k[-1] == "lora_e"])
    assert e.size == 16 and int((e == 0).sum()) == 16 - 8  # total 4 layers x 4 -> target 4 x 2
    keep = np.concatenate([np.asarray(v) for v in jax.tree.leaves(state.method_state["keep"])])
    np.testing.assert_array_equal(keep, e != 0)


def test_lora_dash_switches_on_at_the_warmup_step(tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method="lora_dash", targets="(query|value)$", rank=4, options={"warmup_steps": 4, "dash_k": 3})
    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=8)
    assert set(flatten_dict(state.buffers)) and all(k[-1] in ("dash_u", "dash_vt") for k in flatten_dict(state.buffers))
    state, _ = run_steps(step, state, frozen, tiny_batch, 3)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.buffers))
    dash_values = [np.asarray(v) for k, v in flatten_dict(state.trainable).items() if k[-1] == "dash"]
    assert not any(np.any(v) for v in dash_values)  # zero gradient while the directions are zero
    state, _ = run_steps(step, state, frozen, tiny_batch, 1)  # optimizer step 4: the search runs
    params = dj.combine(state.trainable, state.buffers, frozen)
    for path, layer in _layers(params, cfg).items():
        expected_u, expected_vt, _ = dash.dash_directions(layer["kernel"], cfg.scale * layer["lora_a"] @ layer["lora_b"], 3)
        np.testing.assert_allclose(np.asarray(layer["dash_u"]), np.asarray(expected_u), atol=1e-5)
        np.testing.assert_allclose(np.asarray(layer["dash_vt"]), np.asarray(expected_vt), atol=1e-5)
    snapshot = jax.tree.map(np.array, state.buffers)
    state, _ = run_steps(step, state, frozen, tiny_batch, 4)
    jax.tree.map(np.testing.assert_array_equal, snapshot, jax.tree.map(np.asarray, state.buffers))  # once only
    assert all(np.any(np.asarray(v)) for k, v in flatten_dict(state.trainable).items() if k[-1] == "dash")


def test_schedule_counts_optimizer_steps_under_gradient_accumulation(tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method="lora_dash", targets="query$", rank=4, options={"warmup_steps": 3, "dash_k": 2})
    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=4, grad_accum=2)
    state, _ = run_steps(step, state, frozen, tiny_batch, 5)  # 2 optimizer updates and a half
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.buffers))
    state, _ = run_steps(step, state, frozen, tiny_batch, 1)  # the 3rd update
    assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(state.buffers))


@pytest.mark.parametrize("options,match", [
    ({"t_init": 0.6, "t_final": 0.5}, "leaves no steps"),
    ({"target_rank": 9}, r"target_rank must be an integer in \[1, rank=8\]"),
    ({"interval": 0}, "interval must be a positive integer"),
])
def test_adalora_bad_options(options, match):
    with pytest.raises(dj.ConfigError, match=match):
        dj.AdapterConfig(method="adalora", options=options)


def test_lora_dash_bad_options(tiny_bert):
    with pytest.raises(dj.ConfigError, match="warmup_steps of lora_dash must be a positive integer"):
        dj.AdapterConfig(method="lora_dash", options={"warmup_steps": 0})
    cfg = dj.AdapterConfig(method="lora_dash", targets="query$", rank=2, options={"dash_k": 40})
    with pytest.raises(dj.ConfigError, match=r"dash_k=40 is larger than min\(d_in, d_out\)=32"):
        dj.inject(tiny_bert[1], cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("name,options", [
    ("adalora", {"target_rank": 2, "interval": 2, "t_init": 0.1, "t_final": 0.2}),
    ("lora_dash", {"warmup_steps": 4, "dash_k": 3}),
])
def test_train_state_holds_everything_a_resume_needs(name, options, tiny_bert, tiny_batch):
    """Stop after k steps, move the state through host memory (as a checkpoint would), rebuild it
    and go on: the losses and the final state equal the uninterrupted run's exactly."""
    cfg = dj.AdapterConfig(method=name, targets="(query|value)$", rank=4, options=options)
    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=12)
    full_state, full_losses = run_steps(step, state, frozen, tiny_batch, 12)

    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=12)
    state, first = run_steps(step, state, frozen, tiny_batch, 5)
    host = jax.device_get(state)
    restored = jax.tree.map(jnp.asarray, host)
    state, rest = run_steps(step, restored, frozen, tiny_batch, 7)
    assert first + rest == full_losses
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full_state), jax.device_get(state))


def test_stateful_api_misuse_gets_clear_errors(tiny_bert, tiny_batch):
    model, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora_dash", targets="query$", rank=4, options={"warmup_steps": 2, "dash_k": 2})
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    apply = dj.adapt(sequence_classifier_apply(model), cfg)
    loss_fn = lambda p, b, r: (classification_loss(apply(p, b), b["labels"]), {})
    opt = dj.make_optimizer(1e-2, 5)
    with pytest.raises(dj.ConfigError, match="stateful: pass schedule=make_schedule"):
        dj.make_train_step(loss_fn, opt, cfg)
    schedule = dj.make_schedule(cfg, 5)
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))  # not partition()
    with pytest.raises(dj.ConfigError, match="needs frozen="):
        dj.init_state(trainable, opt, jax.random.PRNGKey(0), schedule=schedule)
    step = dj.make_train_step(loss_fn, opt, cfg, schedule=schedule)
    with pytest.raises(dj.ConfigError, match="no method state"):
        step(dj.init_state(trainable, opt, jax.random.PRNGKey(0)), frozen, tiny_batch)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(0), schedule=schedule, frozen=frozen)
    with pytest.raises(dj.ConfigError, match=r"rewrites its buffers.*partition\(params, cfg\)"):
        step(state, frozen, tiny_batch)
    with pytest.raises(dj.ConfigError, match="warmup_steps=2 is not below the run's 2 optimizer steps"):
        dj.make_schedule(cfg, 2)


def test_adalora_sensitivity_under_accumulation_uses_the_mean_gradient(tiny_bert, tiny_batch):
    """Micro-batches A then B accumulated == one step on the batch A+B (its gradient is their
    mean): AdaLoRA's EMAs must match, so they used the mean gradient, not B's alone."""
    cfg = dj.AdapterConfig(method="adalora", targets="query$", rank=4, options={"target_rank": 2})
    half = lambda part: {k: v[:2] if part == 0 else v[2:] for k, v in tiny_batch.items()}
    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=4, grad_accum=2)
    state, _ = step(state, frozen, half(0))
    state, _ = step(state, frozen, half(1))
    step1, state1, frozen1 = _trainer(tiny_bert, cfg, total_steps=4)
    state1, _ = step1(state1, frozen1, tiny_batch)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-10)
    jax.tree.map(close, state.trainable, state1.trainable)
    jax.tree.map(close, state.method_state["ipt"], state1.method_state["ipt"])
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(state.method_state["ipt"]))


def test_lora_dash_with_a_bfloat16_frozen_base(tiny_bert, tiny_batch):
    """The direction search runs in float32 and writes the buffers in their own dtype."""
    cfg = dj.AdapterConfig(method="lora_dash", targets="query$", rank=4, options={"warmup_steps": 2, "dash_k": 2})
    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=4)
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, frozen)
    state, losses = run_steps(step, state, frozen, tiny_batch, 3)
    assert all(np.isfinite(losses))
    assert all(x.dtype == jnp.float32 and np.any(np.asarray(x)) for x in jax.tree.leaves(state.buffers))


# --- FlexLoRA -------------------------------------------------------------------------------------------


def _np_entropy(e, active):
    energy = np.asarray(e, np.float64) ** 2 * active
    r = active.sum()
    if r <= 1:
        return 0.0
    if energy.sum() == 0:
        return 1.0
    p = energy[energy > 0] / energy.sum()
    return float(-(p * np.log(p)).sum() / np.log(r))


@pytest.mark.parametrize("e,active", [
    ([3.0, 4.0, 9.0], [1, 1, 0]),          # p = (0.36, 0.64) over the two live
    ([1.0, -1.0, 1.0, 1.0], [1, 1, 1, 1]),  # uniform: 1
    ([2.0, 0.0, 0.0, 5.0], [1, 1, 1, 0]),   # one carries everything: 0
    ([0.0, 0.0, 0.0], [1, 1, 1]),           # nothing learned yet: 1
    ([0.7, 0.2], [0, 1]),                   # a single live triplet: 0
    ([0.5, -0.1, 0.3, 2.0], [1, 1, 1, 1]),
])
def test_flexlora_spectral_entropy(e, active):
    active = np.asarray(active, np.float32)
    got = float(flexlora.spectral_entropy(jnp.asarray(e, jnp.float32), jnp.asarray(active)))
    assert got == pytest.approx(_np_entropy(e, active), abs=1e-6)
    if e == [3.0, 4.0, 9.0]:
        assert got == pytest.approx(-(0.36 * np.log(0.36) + 0.64 * np.log(0.64)) / np.log(2), abs=1e-6)


def test_flexlora_chooses_layers_by_entropy():
    entropy = jnp.asarray([0.2, 0.9, 0.5, 0.1, 0.95, 0.2], jnp.float32)
    live = jnp.asarray([3, 3, 1, 2, 4, 2], jnp.int32)
    prune, grow = flexlora.choose_layers(entropy, live, slots=4, n=2)
    # prunable (live > 1): 0, 1, 3, 4, 5 -> lowest two: 3 (0.1), then 0 and 5 tie at 0.2 -> the earlier, 0
    assert list(np.flatnonzero(np.asarray(prune))) == [0, 3]
    # growable (live < 4, not pruned): 1, 2, 5 -> highest two: 1 (0.9), 2 (0.5); 4 is full
    assert list(np.flatnonzero(np.asarray(grow))) == [1, 2]
    prune, grow = flexlora.choose_layers(entropy, live, slots=4, n=0)
    assert not np.any(np.asarray(prune)) and not np.any(np.asarray(grow))
    prune, grow = flexlora.choose_layers(entropy, live, slots=4, n=10)  # more than there are
    assert list(np.flatnonzero(np.asarray(prune))) == [0, 1, 3, 4, 5] and list(np.flatnonzero(np.asarray(grow))) == [2]


def test_flexlora_change_counts():
    kw = dict(b=4, t_init=10, end=80)
    assert [int(flexlora.changes_at(t, decay=False, **kw)) for t in (5, 10, 11, 80, 81)] == [0, 0, 4, 4, 0]
    decayed = [int(flexlora.changes_at(t, decay=True, **kw)) for t in (11, 30, 45, 60, 80)]
    assert decayed == [int(np.floor(4 * (1 - (t - 10) / 70) ** 3)) for t in (11, 30, 45, 60, 80)] == [3, 1, 0, 0, 0]


def _flex_params(tiny_bert, **options):
    _, base = tiny_bert
    cfg = dj.AdapterConfig(method="flexlora", targets="(query|value)$", rank=2, alpha=4.0,
                           options={"max_rank": 4, "interval": 5, "b": 1, **options})
    return dj.inject(base, cfg, jax.random.PRNGKey(0)), cfg


def test_flexlora_update_moves_one_triplet_on_constructed_values(tiny_bert):
    params, cfg = _flex_params(tiny_bert)
    layers = _layers(params, cfg)
    paths = sorted(layers)  # 4 layers: layer_0 query, value; layer_1 query, value
    e_values = {paths[0]: [0.5, 0.5], paths[1]: [2.0, -0.01], paths[2]: [0.3, 0.2], paths[3]: [1.0, 0.02]}
    changes = {p + ("lora_e",): jnp.asarray(v + [0.0, 0.0], jnp.float32) for p, v in e_values.items()}
    params = set_leaves(params, changes)
    schedule = dj.make_schedule(cfg, 100)  # t_init 10, end 80
    state = schedule.init(params)
    _, same = schedule.update(state, jnp.int32(7), params, None)  # off the schedule: nothing moves
    jax.tree.map(np.testing.assert_array_equal, same, params)
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 32))

    def delta(p, layer):
        f = {n: layer[n] for n in ("lora_a", "lora_e", "lora_b", "active")}
        return np.asarray(x @ flexlora._delta(f, cfg))

    before = {p: delta(p, layer) for p, layer in _layers(params, cfg).items()}
    _, new = schedule.update(state, jnp.int32(15), params, None)
    after = _layers(new, cfg)
    # entropies: paths[0] 1.0 (uniform), paths[1] ~0.0002, paths[2] 0.96, paths[3] 0.003
    prune, grow = paths[1], paths[0]
    np.testing.assert_array_equal(np.asarray(after[prune]["active"]), [1, 0, 0, 0])  # the smallest *signed* e (-0.01)
    np.testing.assert_array_equal(np.asarray(after[prune]["lora_e"]), [2.0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(after[grow]["active"]), [1, 1, 1, 0])  # the lowest free slot
    np.testing.assert_array_equal(np.asarray(after[grow]["lora_e"]), [0.5, 0.5, 0, 0])
    new_a, new_b = np.asarray(after[grow]["lora_a"][:, 2]), np.asarray(after[grow]["lora_b"][2])
    assert 0.6 < new_a.std() < 1.5 and 0.6 < new_b.std() < 1.5  # N(0, 1), not the 0.02 init
    np.testing.assert_array_equal(np.asarray(after[grow]["lora_a"][:, :2]), np.asarray(layers[grow]["lora_a"][:, :2]))
    # the new triplet adds nothing; the layer's scale goes from alpha/2 to alpha/3
    np.testing.assert_allclose(delta(grow, after[grow]), before[grow] * 2 / 3, rtol=1e-5, atol=1e-6)
    for p in (paths[2], paths[3]):
        jax.tree.map(np.testing.assert_array_equal, after[p], _layers(params, cfg)[p])
    # deterministic; another seed draws other new vectors
    _, again = schedule.update(state, jnp.int32(15), params, None)
    jax.tree.map(np.testing.assert_array_equal, again, new)
    other_cfg = cfg.replace(options={**cfg.options, "seed": 1})
    _, other = dj.make_schedule(other_cfg, 100).update(state, jnp.int32(15), params, None)
    assert not np.allclose(np.asarray(_layers(other, other_cfg)[grow]["lora_a"][:, 2]), new_a)


def test_flexlora_training_moves_ranks_and_resets_the_new_slots_moments(tiny_bert, tiny_batch):
    cfg = dj.AdapterConfig(method="flexlora", targets="(query|value)$", rank=2,
                           options={"max_rank": 4, "interval": 3, "b": 1, "t_init": 0.1, "t_final": 0.2})
    step, state, frozen = _trainer(tiny_bert, cfg, total_steps=30)
    assert {k[-1] for k in flatten_dict(state.buffers)} == {"active"}
    losses, trace = [], []
    for i in range(30):  # (determinism and resume: the constructed test above, test_checkpoint)
        live_before = jax.tree.map(np.asarray, state.buffers)
        state, metrics = step(state, frozen, tiny_batch)
        losses.append(float(metrics["loss"]))
        if i + 1 == 6:  # optimizer step 6: the first change (t_init = 3 is not after t_init)
            trace.append((live_before, jax.tree.map(np.asarray, state)))  # (the step donates the state)
    assert losses[-1] < losses[0]
    live = {k[:-1]: int(np.asarray(v).sum()) for k, v in flatten_dict(state.buffers).items()}
    print("FlexLoRA live ranks after 30 steps:", sorted(live.values()))
    assert sum(live.values()) == 4 * 2 and sorted(live.values()) != [2, 2, 2, 2]  # moved, conserved (b=1 each side)
    # the slot added at step 6 starts with zero Adam moments; the other live ones keep theirs
    live_before, after = trace[0]
    flat_before, flat_after = flatten_dict(live_before), flatten_dict(after.buffers)
    grown = [k for k in flat_after if np.asarray(flat_after[k]).sum() > np.asarray(flat_before[k]).sum()]
    assert len(grown) == 1
    slot = int(np.flatnonzero(np.asarray(flat_after[grown[0]]) - np.asarray(flat_before[grown[0]]))[0])
    adam = [s for s in jax.tree.leaves(after.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")][0]
    mu = flatten_dict(adam.mu)
    a_mu = np.asarray(mu[grown[0][:-1] + ("lora_a",)])
    assert not np.any(a_mu[:, slot]) and np.all(np.abs(a_mu[:, 0]) > 0)


@pytest.mark.parametrize("options,match", [
    ({"max_rank": 1}, r"max_rank must be an integer >= rank=2"),
    ({"t_init": 0.6, "t_final": 0.5}, "leaves no steps"),
    ({"b": -1}, "b must be an integer >= 0"),
])
def test_flexlora_bad_options(options, match):
    with pytest.raises(dj.ConfigError, match=match):
        dj.AdapterConfig(method="flexlora", rank=2, options=options)
    with pytest.raises(dj.ConfigError, match="flexlora with mpc"):
        dj.AdapterConfig(method="flexlora", rank=2, mpc="mpc_o")
