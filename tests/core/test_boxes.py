"""Boxed Linen params (``nn.with_logical_partitioning``, as MaxText and T5X write their models) under
``nn.scan``: inject, factored execution, merge, partition and training read through the boxes, and the
factors come back boxed with logical names derived from their kernel's, so ``nn.get_partition_spec``,
logical axis rules and ``sharding.param_specs`` agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

import decomp_jax as dj
from helpers import adam_losses  # noqa: E402
from decomp_jax.core.axes import boxes, unbox
from decomp_jax.parallel import sharding as sh

INIT = nn.initializers.normal(0.2)
RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("vocab", "tensor"), ("layers", None))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(48, kernel_init=nn.with_logical_partitioning(INIT, ("embed", "mlp")), name="wi")(x)
        y = nn.Dense(32, kernel_init=nn.with_logical_partitioning(INIT, ("mlp", "embed")), name="wo")(nn.gelu(h))
        return x + y, None


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(8, kernel_init=nn.with_logical_partitioning(INIT, ("embed", "vocab")), name="head")(x)


def _setup():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
    params = Model().init(jax.random.PRNGKey(0), x)["params"]
    cfg = dj.AdapterConfig(method="lora", targets=r"(wi|wo)$", rank=4, alpha=8)
    return x, params, cfg


def test_factors_are_boxed_with_names_derived_from_their_kernel():
    _, params, cfg = _setup()
    assert isinstance(params["layers"]["wi"]["kernel"], nn.LogicallyPartitioned)
    adapted = dj.inject(params, cfg, jax.random.PRNGKey(2))
    wi = adapted["layers"]["wi"]
    assert wi["kernel"].names == ("layers", "embed", "mlp")
    assert isinstance(wi["lora_a"], nn.LogicallyPartitioned) and wi["lora_a"].value.shape == (3, 32, 4)
    specs = flatten_dict(nn.get_partition_spec(adapted))
    assert specs[("layers", "wi", "lora_a")] == P("layers", "embed", None)
    assert specs[("layers", "wi", "lora_b")] == P("layers", None, "mlp")
    assert specs[("layers", "wo", "lora_a")] == P("layers", "mlp", None)
    # the same factors as the unboxed tree gives
    plain = dj.inject(unbox(params), cfg, jax.random.PRNGKey(2))
    for a, b in zip(jax.tree.leaves(unbox(adapted)), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    # param_specs (mesh axes through the logical rules) == the boxes' names through the same rules
    mesh = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"))
    ours = flatten_dict(sh.param_specs(adapted, mesh, rules=(), cfg=cfg, logical_rules=RULES, fsdp_min_size=1),
                        is_leaf=lambda _, x: isinstance(x, P))
    with nn.logical_axis_rules(RULES):
        theirs = {p: nn.logical_to_mesh_axes(tuple(box.names)) for p, box in boxes(adapted).items()}
    assert ours[("layers", "wi", "lora_b")] == P(None, None, "tensor")
    for path in [p for p in theirs if p[-1].startswith("lora")]:
        assert ours[path] == P(*theirs[path]), path


def test_boxed_model_runs_merges_and_trains():
    x, params, cfg = _setup()
    apply = dj.adapt(Model().apply, cfg)
    adapted = dj.inject(params, cfg, jax.random.PRNGKey(2))
    base = Model().apply({"params": params}, x)
    np.testing.assert_allclose(apply({"params": adapted}, x), base, atol=1e-6)  # a no-op at init
    moved = jax.tree.map(lambda v: v + 0.1, adapted)
    moved = dj.combine(dj.partition(moved, cfg)[0], dj.partition(adapted, cfg)[2])
    factored = apply({"params": moved}, x)
    merged = dj.merge(moved, cfg)
    assert isinstance(merged["layers"]["wi"]["kernel"], nn.LogicallyPartitioned) and "lora_a" not in merged["layers"]["wi"]
    assert float(jnp.abs(factored - base).max()) > 1e-2
    np.testing.assert_allclose(Model().apply({"params": merged}, x), factored, rtol=1e-5, atol=1e-5)
    restored = dj.unmerge(merged, dj.partition(moved, cfg)[0], cfg)
    assert isinstance(restored["layers"]["wi"]["lora_a"], nn.LogicallyPartitioned)
    np.testing.assert_allclose(restored["layers"]["wi"]["kernel"].value, moved["layers"]["wi"]["kernel"].value, atol=1e-5)
    trainable, buffers, frozen = dj.partition(adapted, cfg)
    assert set(flatten_dict(unbox(trainable))) == {("layers", n, f) for n in ("wi", "wo") for f in ("lora_a", "lora_b")}
    target = jnp.sin(x[:, :8])

    def loss(p, batch, rng):
        return jnp.mean((apply({"params": p}, batch["x"]) - batch["y"]) ** 2), {}

    losses, state, _ = adam_losses(loss, cfg, (trainable, buffers, frozen), {"x": x, "y": target}, 5)
    assert losses[-1] < losses[0]
    assert isinstance(state.trainable["layers"]["wi"]["lora_a"], nn.LogicallyPartitioned)
