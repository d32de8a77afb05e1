"""Many adapters on one base (decomp_jax.core.named): named adapters in one tree, each one alone equal to its
single-adapter tree; switching by data without recompiling; mixed batches equal to running each example
with its own adapter, forward and gradients; training one adapter of the tree leaves the others alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.models.hf import sequence_classifier_apply
import decomp_jax as dj

CFGS = {
    "default": dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=4, alpha=8),
    "b": dj.AdapterConfig(method="ssb", targets=r"attention/self/value$|intermediate/dense$",
                          train_extra="classifier"),
    "c": dj.AdapterConfig(method="dora", targets=r"attention/self/query$|output/dense$", rank=2,
                          train_extra="classifier"),
}
KEYS = {name: jax.random.PRNGKey(i) for i, name in enumerate(CFGS)}


def perturb(params, seed):
    """Every floating leaf moved off its init (so each adapter changes the outputs)."""
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    return unflatten_dict({p: v + 0.2 * rng.standard_normal(v.shape).astype(v.dtype) for p, v in flat.items()})


@pytest.fixture(scope="module")
def tree(tiny_bert):
    """Three adapters (lora unnamed, ssb "b", dora "c" of rank 2) in one tree, each trained (perturbed) as its
    own single-adapter tree, then attached; and those single-adapter trees."""
    model, base = tiny_bert
    alone = {}
    params = base
    for i, (name, cfg) in enumerate(CFGS.items()):
        one = dj.inject(base, cfg, KEYS[name])
        trained = dj.combine(perturb(dj.split(one, dj.trainable_mask(one, cfg))[0], i),
                             dj.split(one, dj.trainable_mask(one, cfg))[1])
        alone[name] = trained
        params = dj.named.attach(params, trained, cfg, name)
    return model, base, params, alone


def test_inject_by_name_equals_injecting_alone(tiny_bert):
    model, base = tiny_bert
    params = base
    for name, cfg in CFGS.items():
        params = dj.inject(params, cfg, KEYS[name], name=name)
    assert dj.named.adapter_names(params) == ["default", "b", "c"]
    flat = flatten_dict(params)
    value = ("bert", "encoder", "layer", "0", "attention", "self", "value")
    assert {value + (n,) for n in ("lora_a", "lora_b", "scale_in@b", "scale_out@b")} <= set(flat)
    for name, cfg in CFGS.items():
        got, want = flatten_dict(dj.named.select(params, name)), flatten_dict(dj.inject(base, cfg, KEYS[name]))
        assert sorted(got) == sorted(want)
        assert all(np.array_equal(got[p], want[p]) for p in want), name
    assert sorted(flatten_dict(dj.named.select(params, None))) == sorted(flatten_dict(base))
    # the base leaves stay the base's: each adapter trains its own copy of the head
    assert np.array_equal(flat[("classifier", "kernel")], flatten_dict(base)[("classifier", "kernel")])
    assert ("classifier", "kernel@b") in flat and ("classifier", "kernel@default") not in flat


def test_trainable_mask_by_name_and_training_one_adapter(tree, tiny_batch):
    model, base, params, _ = tree
    apply = sequence_classifier_apply(model)
    for name, cfg in CFGS.items():
        mask = flatten_dict(dj.trainable_mask(params, cfg, name=name))
        on = sorted("/".join(p) for p, t in mask.items() if t)
        want = sorted("/".join(p) + ("" if name == "default" else f"@{name}")
                      for p, t in flatten_dict(dj.trainable_mask(dj.inject(base, cfg, KEYS[name]), cfg)).items() if t)
        assert on == want, name
    # one AdamW step on adapter "c" through the whole tree: only its leaves move
    cfg = CFGS["c"]
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg, name="c"))
    run = dj.adapt(apply, cfg)

    def loss(tr):
        logits = run(dj.named.select(dj.combine(tr, frozen), "c"), tiny_batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tiny_batch["labels"]).mean()

    tx = optax.adamw(1e-2)
    updates, _ = tx.update(jax.jit(jax.grad(loss))(trainable), tx.init(trainable), trainable)
    after = flatten_dict(dj.combine(optax.apply_updates(trainable, updates), frozen))
    before = flatten_dict(params)
    moved = sorted("/".join(p) for p in before if not np.array_equal(before[p], after[p]))
    assert moved and all(p.endswith("@c") for p in moved), moved
    assert any(p.endswith("magnitude@c") for p in moved) and "classifier/kernel@c" in moved


def _alone(model, alone, name, batch):
    """Adapter ``name``'s logits run on its own single-adapter tree; the base model's for None."""
    apply = sequence_classifier_apply(model)
    if name is None:
        return np.asarray(apply(dj.named.select(alone["default"], None), batch))
    return np.asarray(dj.adapt(apply, CFGS[name])(alone[name], batch))


def test_switching_is_data_not_structure(tree, tiny_batch):
    model, base, params, alone = tree
    traces = []

    def counted(params, batch, **kw):
        traces.append(1)
        return sequence_classifier_apply(model)(params, batch, **kw)

    run = jax.jit(dj.adapt_many(counted, CFGS))
    effect = []
    for name in CFGS:
        got = np.asarray(run(params, tiny_batch, adapter_weights=dj.adapter_weights(CFGS, active=name)))
        want = _alone(model, alone, name, tiny_batch)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        effect.append(np.abs(want - _alone(model, alone, None, tiny_batch)).max())
    base_out = np.asarray(run(params, tiny_batch, adapter_weights=jnp.zeros(3)))
    np.testing.assert_allclose(base_out, _alone(model, alone, None, tiny_batch), atol=1e-5, rtol=0)
    assert len(traces) == 1, "switching adapters recompiled"
    assert min(effect) > 1e-2, effect  # each adapter moves the logits far beyond the tolerance


def test_active_set_sums_the_updates(tiny_bert, tiny_batch):
    """Two LoRA adapters active at once: the model whose kernels hold K + dK_a + dK_b (PEFT's sum)."""
    model, base = tiny_bert
    cfg_a = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=4, alpha=8)
    cfg_b = dj.AdapterConfig(method="lora", targets=r"attention/self/value$|output/dense$", rank=2, alpha=2)
    singles = {}
    params = base
    for i, (name, cfg) in enumerate((("a", cfg_a), ("b", cfg_b))):
        one = dj.inject(base, cfg, KEYS["default"])
        singles[name] = perturb(one, i + 5)
        singles[name] = unflatten_dict({**flatten_dict(singles[name]),
                                        **{p: v for p, v in flatten_dict(base).items()}})
        params = dj.named.attach(params, singles[name], cfg, name)
    merged = {n: flatten_dict(dj.merge(singles[n], c)) for n, c in (("a", cfg_a), ("b", cfg_b))}
    flat_base = flatten_dict(base)
    summed = unflatten_dict({p: merged["a"][p] + merged["b"][p] - v for p, v in flat_base.items()})
    apply = sequence_classifier_apply(model)
    want = np.asarray(apply(summed, tiny_batch))
    cfgs = {"a": cfg_a, "b": cfg_b}
    got = np.asarray(dj.adapt_many(apply, cfgs)(params, tiny_batch,
                                                adapter_weights=dj.adapter_weights(cfgs, active=["a", "b"])))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - np.asarray(apply(base, tiny_batch))).max() > 0.05


PICKS = ["c", None, "default", "b"]


def test_mixed_batch_equals_each_example_alone(tree, tiny_batch):
    model, base, params, alone = tree
    run = jax.jit(dj.adapt_many(sequence_classifier_apply(model), CFGS))
    got = np.asarray(run(params, tiny_batch, adapter_weights=dj.adapter_weights(CFGS, per_example=PICKS)))
    for row, name in enumerate(PICKS):
        one = {k: v[row:row + 1] for k, v in tiny_batch.items()}
        np.testing.assert_allclose(got[row:row + 1], _alone(model, alone, name, one), atol=1e-5, rtol=0)


def test_mixed_batch_gradients_reach_each_adapter_from_its_examples(tree, tiny_batch):
    """Training on a mixed batch: each adapter's gradient equals its own run's on its examples alone."""
    model, base, params, alone = tree
    apply = sequence_classifier_apply(model)
    weights = dj.adapter_weights(CFGS, per_example=PICKS)
    run = dj.adapt_many(apply, CFGS)
    labels = tiny_batch["labels"]

    def total_loss(p):
        logits = run(p, tiny_batch, adapter_weights=weights)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    grads = flatten_dict(jax.jit(jax.grad(total_loss))(params))
    for name in ("b", "c"):
        rows = [i for i, n in enumerate(PICKS) if n == name]
        one = {k: v[rows] for k, v in tiny_batch.items()}
        cfg = CFGS[name]
        trainable, frozen = dj.split(alone[name], dj.trainable_mask(alone[name], cfg))

        def own_loss(tr):
            logits = dj.adapt(apply, cfg)(dj.combine(tr, frozen), one)
            return optax.softmax_cross_entropy_with_integer_labels(logits, one["labels"]).sum()

        want = flatten_dict(jax.jit(jax.grad(own_loss))(trainable))
        for path, g in want.items():
            named = path[:-1] + (f"{path[-1]}@{name}",)
            np.testing.assert_allclose(grads[named], g, atol=1e-5, rtol=1e-4)
        assert max(np.abs(g).max() for g in want.values()) > 1e-3


def test_errors_name_the_fix(tree, tiny_bert):
    model, base, params, alone = tree
    with pytest.raises(dj.ConfigError, match="already hold an adapter named 'b'"):
        dj.inject(params, CFGS["b"], KEYS["b"], name="b")
    with pytest.raises(dj.ConfigError, match="rewrites the base kernels"):
        dj.inject(params, dj.AdapterConfig(method="pissa", targets="query$", rank=2), KEYS["b"], name="p")
    with pytest.raises(dj.ConfigError, match="adapter name"):
        dj.inject(base, CFGS["b"], KEYS["b"], name="x@y")
    with pytest.raises(dj.ConfigError, match="no adapter named 'z'"):
        dj.named.select(params, "z")
    with pytest.raises(dj.ConfigError, match=r"merge acts on one: pass dj.select"):
        dj.merge(params, CFGS["default"])
    run = dj.adapt_many(sequence_classifier_apply(model), CFGS)
    batch = {"input_ids": np.ones((2, 5), "int32")}
    with pytest.raises(dj.ConfigError, match="needs adapter_weights="):
        run(params, batch)
    with pytest.raises(dj.ConfigError, match=r"must be \(3,\) or \(batch, 3\)"):
        run(params, batch, adapter_weights=jnp.ones(2))
    with pytest.raises(dj.ConfigError, match="no adapter named"):
        dj.adapter_weights(CFGS, per_example=["b", "nope"])


def test_checkpoints_by_name(tree, tmp_path):
    """A train-state checkpoint of one named adapter (SVDiff: its SVD buffers are constants saved with it), and
    a set of named adapters saved and loaded by name onto the base."""
    from decomp_jax.training import checkpoint

    model, base, params, _ = tree
    cfg = dj.AdapterConfig(method="svdiff", targets=r"attention/output/dense$")
    params = dj.inject(params, cfg, KEYS["b"], name="s")
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg, name="s"))
    tx = optax.adam(1e-2)
    state = dj.init_state(perturb(trainable, 7), tx, jax.random.PRNGKey(0))
    finger = checkpoint.fingerprint(dj.select(params, None), cfg)
    mngr = checkpoint.manager(tmp_path / "run")
    checkpoint.save(mngr, state, frozen, cfg, fingerprint=finger, name="s")
    emptied = {p: (jnp.zeros_like(v) if p[-1] in ("u@s", "vt@s", "sigma0@s") else v)
               for p, v in flatten_dict(frozen).items()}
    assert sum(p[-1] == "u@s" for p in emptied) == 2
    like = dj.init_state(trainable, tx, jax.random.PRNGKey(1))
    restored, frozen_back, _ = checkpoint.restore(mngr, like, unflatten_dict(emptied), cfg, fingerprint=finger, name="s")
    for a, b in zip(jax.tree_util.tree_leaves((restored.trainable, frozen_back)),
                    jax.tree_util.tree_leaves((state.trainable, frozen))):
        np.testing.assert_array_equal(a, b)
    # the set of adapters, by name
    cfgs = {**CFGS, "s": cfg}
    checkpoint.save_adapters(tmp_path / "set", params, cfgs)
    loaded, loaded_cfgs = checkpoint.load_adapters(tmp_path / "set", base)
    assert loaded_cfgs == cfgs
    want, got = flatten_dict(params), flatten_dict(loaded)
    assert sorted(want) == sorted(got) and all(np.array_equal(want[p], got[p]) for p in want)
    only, _ = checkpoint.load_adapters(tmp_path / "set", base, names=["c"])
    assert dj.adapter_names(only) == ["c"]
    other = unflatten_dict({p: (v + 1 if p[-1] == "kernel" else v) for p, v in flatten_dict(base).items()})
    with pytest.raises(dj.ConfigError, match="different base model"):
        checkpoint.load_adapters(tmp_path / "set", other, names=["b"])
