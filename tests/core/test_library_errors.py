"""Plain bad input to the library (AdapterConfig, inject/merge/unmerge/trainable_mask/partition) raises
one clear error that names the problem and the fix (issue 12), instead of a bare Python error or a
silently wrong result. Tiny random params dicts only: no model is loaded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decomp_jax.core.inject import adapted_layers
from decomp_jax.errors import ConfigTypeError
import decomp_jax as dj

TARGETS = "query|value"


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)
    dense = lambda d_in, d_out: {"kernel": rng.normal(size=(d_in, d_out)).astype(np.float32),
                                 "bias": rng.normal(size=(d_out,)).astype(np.float32)}
    return {"enc": {"query": dense(8, 8), "value": dense(8, 6)}, "head": dense(8, 2)}


@pytest.fixture(scope="module")
def lora():
    return dj.AdapterConfig(method="lora", targets=TARGETS, rank=2)


@pytest.fixture(scope="module")
def adapted(base, lora):
    params = dj.inject(base, lora, jax.random.PRNGKey(0))
    # non-zero lora_b, so that merging changes the kernels
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key == "lora_b" else x, params)


def without(params, layer, leaf):
    """``params`` with one leaf of ``enc/<layer>`` removed."""
    return {**params, "enc": {**params["enc"], layer: {k: v for k, v in params["enc"][layer].items() if k != leaf}}}


# --- AdapterConfig: every field checks its type and value ------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"targets": None}, ConfigTypeError, r"targets must be a regular expression string .* e\.g\. targets='attention/self/\(query\|value\)\$'; got None"),
    ({"targets": 3}, ConfigTypeError, r"targets must be a regular expression string.*got 3 \(int\)"),
    ({"train_extra": 5}, ConfigTypeError, r"train_extra must be a regular expression string \(or None\).*e\.g\. train_extra='\^classifier/'"),
    ({"transposed": ["c_attn"]}, ConfigTypeError, r"transposed must be a regular expression string \(or None\).*e\.g\. transposed="),
    ({"mpc_lambda": "x"}, ConfigTypeError, r"mpc_lambda must be a number, e\.g\. mpc_lambda=0\.1; got 'x' \(str\)"),
    ({"mpc_lambda": "5e-4"}, ConfigTypeError, r"mpc_lambda must be a number.*Write mpc_lambda=0\.0005, not the string '5e-4'"),
    ({"mpc_lambda": float("nan")}, dj.ConfigError, r"mpc_lambda must be a finite number, e\.g\. mpc_lambda=0\.1; got nan"),
    ({"mpc_lambda": float("inf")}, dj.ConfigError, r"mpc_lambda must be a finite number"),
    ({"dropout": "a"}, ConfigTypeError, r"dropout must be a number, e\.g\. dropout=0\.1; got 'a' \(str\)"),
    ({"dropout": float("nan")}, dj.ConfigError, r"dropout must be a finite number"),
    ({"dropout": True}, ConfigTypeError, r"dropout must be a number.*got True \(bool\)"),
    ({"rank": 2.5}, ConfigTypeError, r"rank must be an integer, e\.g\. rank=8; got 2\.5 \(float\)"),
    ({"rank": 8.0}, ConfigTypeError, r"rank must be an integer.*Write rank=8\."),
    ({"rank": "8"}, ConfigTypeError, r"rank must be an integer.*Write rank=8, not the string '8'"),
    ({"alpha": "x"}, ConfigTypeError, r"alpha must be a number, e\.g\. alpha=16\.0; got 'x' \(str\)"),
    ({"alpha": True}, ConfigTypeError, r"alpha must be a number.*got True \(bool\)"),
    ({"alpha": float("inf")}, dj.ConfigError, r"alpha must be a finite number"),
    ({"rslora": "yes"}, ConfigTypeError, r"rslora must be True or False; got 'yes' \(str\)"),
    ({"method": "ia3", "scale_bias": 1}, ConfigTypeError, r"scale_bias must be True or False; got 1 \(int\)"),
    ({"options": [("a", 1)]}, ConfigTypeError, r"options must be a mapping \(a dict\) of method options, e\.g\. options=\{\}; got \[\('a', 1\)\] \(list\)\. Method 'lora' accepts none"),
    ({"method": "trilora", "options": "abc"}, ConfigTypeError,
     r"options must be a mapping \(a dict\) of method options, e\.g\. options=\{'scale_by_rank': False\}; got 'abc' \(str\)\. "
     r"Method 'trilora' accepts \['scale_by_rank'\]"),
    ({"method": None}, ConfigTypeError, r"method must be a string naming a method, e\.g\. method='lora'; got None.*Known methods: .*lora"),
    ({"method": ["lora"]}, ConfigTypeError, r"method must be a string naming a method"),
    ({"init": None}, ConfigTypeError, r"init must be a string, one of \('kaiming', 'normal', 'gaussian'\); got None"),
    ({"mpc": 3}, ConfigTypeError, r"mpc must be None or a string, one of \('mpc_o', 'mpc_d'\); got 3"),
    ({"mpc_norm": None}, ConfigTypeError, r"mpc_norm must be a string, one of \('squared', 'plain'\)"),
])
def test_adapter_config_field_types(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        dj.AdapterConfig(**kwargs)
    assert isinstance(info.value, dj.ConfigError)  # the CLI prints every ConfigError as one line
    if error is ConfigTypeError:
        assert isinstance(info.value, TypeError)


def test_adapter_config_accepts_numpy_scalars_as_python_values():
    cfg = dj.AdapterConfig(rank=np.int64(4), alpha=np.float32(8), dropout=0, rslora=np.bool_(True))
    assert (type(cfg.rank), type(cfg.alpha), type(cfg.dropout), type(cfg.rslora)) == (int, float, float, bool)
    assert dj.AdapterConfig.from_yaml(cfg.to_yaml()) == cfg  # numpy scalars would not dump to YAML
    assert dj.AdapterConfig(alpha=16) == dj.AdapterConfig(alpha=16.0)


def test_yaml_wrong_type_is_a_config_type_error():
    with pytest.raises(ConfigTypeError, match=r"adapter\.targets must be of type str, got None"):
        dj.AdapterConfig.from_dict({"targets": None}, where="adapter")


def test_config_dicts_yaml_replace_and_option():
    from decomp_jax.app.experiment import ExperimentConfig

    with pytest.raises(ConfigTypeError, match=r"adapter must be a mapping of keys to values \(key: value lines in YAML\), "
                                             r"with keys among method, targets, rank.*got \[1, 2\] \(list\)"):
        ExperimentConfig.from_dict({"adapter": [1, 2], "data": {"path": "x"}})
    with pytest.raises(dj.ConfigError, match=r"The AdapterConfig text is not valid YAML"):
        dj.AdapterConfig.from_yaml("rank: [1")
    with pytest.raises(dj.ConfigError, match=r"Unknown key 'rnak' in AdapterConfig\.replace\(\)\. Did you mean 'rank'\?"):
        dj.AdapterConfig().replace(rnak=4)
    with pytest.raises(ConfigTypeError, match=r"rank must be an integer.*Write rank=4, not the string '4'"):
        dj.AdapterConfig().replace(rank="4")
    with pytest.raises(dj.ConfigError, match=r"Method 'trilora' has no option 'scale'; it has \['scale_by_rank'\]"):
        dj.AdapterConfig(method="trilora").option("scale")
    assert dj.AdapterConfig().replace(rank=4).rank == 4


# --- merge/unmerge/adapter_leaves/trainable_mask on part of an adapted tree --------------------------

def test_merge_of_a_layer_missing_a_factor_leaf(adapted, lora):
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query' holds lora factor leaves \['lora_a'\] but lacks "
                                             r"\['lora_b'\].*Pass the whole adapted tree \(e\.g\. dj\.combine\(trainable, buffers, frozen\)"):
        dj.merge(without(adapted, "query", "lora_b"), lora)


def test_complete_tree_still_merges_as_before(base, adapted, lora):
    merged = dj.merge(adapted, lora)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    for name in ("query", "value"):
        layer = adapted["enc"][name]
        expected = layer["kernel"] + lora.scale * np.asarray(layer["lora_a"]) @ np.asarray(layer["lora_b"])
        np.testing.assert_allclose(merged["enc"][name]["kernel"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(merged["enc"][name]["bias"], layer["bias"])
    np.testing.assert_array_equal(merged["head"]["kernel"], base["head"]["kernel"])
    # a split tree put back together merges to the same result
    trainable, buffers, frozen = dj.partition(adapted, lora)
    jax.tree_util.tree_map(np.testing.assert_array_equal, dj.merge(dj.combine(trainable, buffers, frozen), lora), merged)
    # unmerge with the complete adapter gives the adapted params back
    back = dj.unmerge(merged, dj.adapter_leaves(adapted, lora), lora)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), back, adapted)


def test_merge_of_the_trainable_half(adapted, lora):
    trainable, _ = dj.split(adapted, dj.trainable_mask(adapted, lora))
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query' holds lora factor leaves \['lora_a', 'lora_b'\] but "
                                             r"no kernel.*Pass the whole adapted tree"):
        dj.merge(trainable, lora)


def test_buffers_missing_from_a_split_tree(base):
    cfg = dj.AdapterConfig(method="svdiff", targets=TARGETS)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query' holds svdiff factor leaves \['u', 'sigma0', 'vt'\] "
                                             r"but lacks \['delta'\].*dj\.combine"):
        dj.merge(frozen, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, dj.merge(dj.combine(trainable, frozen), cfg), dj.merge(params, cfg))


def test_partial_layer_in_adapter_leaves_trainable_mask_and_partition(adapted, lora):
    partial = without(adapted, "value", "lora_a")
    for call in (dj.adapter_leaves, dj.trainable_mask, dj.partition):
        with pytest.raises(dj.ConfigError, match=r"Layer 'enc/value' holds lora factor leaves \['lora_b'\] but lacks \['lora_a'\]"):
            call(partial, lora)


def test_layer_without_factor_leaves_is_not_adapted(base, adapted, lora):
    # the base params (no factors anywhere) and a tree whose one layer has none: not errors
    assert dj.merge(base, lora) == base
    one = {**adapted, "enc": {**adapted["enc"], "value": base["enc"]["value"]}}
    assert [p for p, _ in adapted_layers(one, lora)] == [("enc", "query")]
    np.testing.assert_array_equal(dj.merge(one, lora)["enc"]["value"]["kernel"], base["enc"]["value"]["kernel"])


def test_merge_with_the_config_of_another_method(adapted):
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query' holds \['lora_a', 'lora_b'\], factor leaves of method .*lora.*"
                                             r"not of 'ssb'.*Pass the AdapterConfig these params were injected with"):
        dj.merge(adapted, dj.AdapterConfig(method="ssb", targets=TARGETS))
    with pytest.raises(dj.ConfigError, match=r"holds dora factor leaves \['lora_a', 'lora_b'\] but lacks \['magnitude'\]"):
        dj.merge(adapted, dj.AdapterConfig(method="dora", targets=TARGETS, rank=2))


def test_unmerge_errors(adapted, lora):
    merged, adapter = dj.merge(adapted, lora), dj.adapter_leaves(adapted, lora)
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query' of the merged params already holds factor leaves "
                                             r"\['lora_a', 'lora_b'\].*unmerge takes the output of dj\.merge"):
        dj.unmerge(adapted, adapter, lora)
    partial = {"enc": {"query": {"lora_a": adapter["enc"]["query"]["lora_a"]}}}
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query': the adapter holds lora factor leaves \['lora_a'\] but "
                                             r"lacks \['lora_b'\]\. Pass adapter_leaves\(params, cfg\) of the whole adapted tree"):
        dj.unmerge(merged, partial, lora)
    with pytest.raises(dj.ConfigError, match=r"Layer 'enc/query' is in the adapter but the merged params have no kernel"):
        dj.unmerge({"other": {"kernel": np.ones((2, 2))}}, adapter, lora)


# --- params that are not a nested dict ----------------------------------------------------------------

@pytest.fixture(scope="module")
def nnx_model():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(8, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)  # non-Param state, split off into `rest`
            self.value = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.value(self.drop(jax.nn.relu(self.query(x))))

    model = Model(nnx.Rngs(0))
    model.eval()
    return model


NNX_MESSAGE = (r"params is a Flax NNX State: this function works on nested dicts of arrays .* does not support NNX modules or "
               r"states\. For an NNX model use decomp_jax\.nnx: decomp_jax\.nnx\.inject\(model, cfg, key\) .* Or convert: "
               r"graphdef, state, rest = nnx\.split\(model, nnx\.Param, \.\.\.\); params = nnx\.to_pure_dict\(state\)")


def test_nnx_state_is_refused_clearly(nnx_model, lora):
    _, state = nnx.split(nnx_model)
    calls = {
        "inject": lambda: dj.inject(state, lora, jax.random.PRNGKey(0)),
        "merge": lambda: dj.merge(state, lora),
        "trainable_mask": lambda: dj.trainable_mask(state, lora),
        "partition": lambda: dj.partition(state, lora),
        "adapter_leaves": lambda: dj.adapter_leaves(state, lora),
    }
    for call in calls.values():
        with pytest.raises(TypeError, match=NNX_MESSAGE):
            call()
    with pytest.raises(TypeError, match=r"params is a Flax NNX Model: .*does not support NNX modules"):
        dj.inject(nnx_model, lora, jax.random.PRNGKey(0))
    _, params_state, _ = nnx.split(nnx_model, nnx.Param, ...)
    with pytest.raises(TypeError, match=r"params leaf 'model/query/bias' is a Flax NNX Param: .*nnx\.to_pure_dict"):
        dj.inject({"model": {k: dict(v) for k, v in dict(params_state).items()}}, lora, jax.random.PRNGKey(0))


def test_the_recommended_nnx_round_trip_works(nnx_model, lora):
    """The conversion the NNX error recommends, with flax's real API."""
    graphdef, state, rest = nnx.split(nnx_model, nnx.Param, ...)
    params = dj.inject(nnx.to_pure_dict(state), lora, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.1 if path[-1].key == "lora_b" else x, params)
    apply = dj.adapt(lambda p, x: nnx.merge(graphdef, p, rest)(x), lora, mode="merged")
    x = np.ones((3, 8), np.float32)
    trainable, frozen = dj.split(params, dj.trainable_mask(params, lora))
    grads = jax.grad(lambda t: apply(dj.combine(t, frozen), x).sum())(trainable)
    assert set(grads["query"]) == {"lora_a", "lora_b"}
    merged_model = nnx.merge(graphdef, dj.merge(params, lora), rest)
    np.testing.assert_allclose(merged_model(x), apply(params, x), rtol=1e-5, atol=1e-5)


def test_factored_forward_that_adapts_no_layer_is_an_error(nnx_model, lora):
    """A model that is no Linen module (NNX, an einsum projection, a function of the params) in factored
    mode used to run the base model and train nothing, silently (gradient norm 0)."""
    _, state, _ = nnx.split(nnx_model, nnx.Param, ...)
    params = dj.inject(nnx.to_pure_dict(state), lora, jax.random.PRNGKey(0))

    def forward(p, x):  # reads the kernels itself: nothing for factored execution to intercept
        h = jax.nn.relu(jnp.einsum("bi,io->bo", x, p["query"]["kernel"]) + p["query"]["bias"])
        return h @ p["value"]["kernel"] + p["value"]["bias"]

    apply = dj.adapt(forward, lora)
    with pytest.raises(dj.ConfigError, match=r"the forward pass ran no Linen layer holding them.*mode='merged'"):
        apply(params, np.ones((3, 8), np.float32))
    with pytest.raises(dj.ConfigError, match=r"ran no Linen layer"):  # under jit too (raised while tracing)
        jax.jit(apply)(params, np.ones((3, 8), np.float32))


@pytest.mark.parametrize("params, message", [
    ([1, 2], r"params must be a nested dict of arrays \(a Linen model's variables\['params'\], an HF Flax model's \.params\); got list\."),
    (np.zeros(3), r"params must be a nested dict of arrays.*got ndarray\."),
    (None, r"params must be a nested dict of arrays.*got NoneType\."),
])
def test_params_that_are_not_a_mapping(params, message, lora):
    for call in (lambda: dj.inject(params, lora, jax.random.PRNGKey(0)), lambda: dj.merge(params, lora),
                 lambda: dj.trainable_mask(params, lora), lambda: dj.partition(params, lora)):
        with pytest.raises(TypeError, match=message):
            call()


def test_swapped_or_wrong_arguments(base, lora):
    class HFModel:
        params = base

    with pytest.raises(TypeError, match=r"got AdapterConfig\. The arguments are \(params, cfg, \.\.\.\): params first"):
        dj.inject(lora, base, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=r"got HFModel\. Pass its \.params"):
        dj.inject(HFModel(), lora, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=r"cfg must be an AdapterConfig, e\.g\. dj\.AdapterConfig\(method='lora'.*got dict\. "
                                        r"Build it from a dict with dj\.AdapterConfig\.from_dict\(d\)"):
        dj.merge(base, {"method": "lora"})
    with pytest.raises(TypeError, match=r"rng must be a JAX PRNG key, e\.g\. jax\.random\.PRNGKey\(0\); got 0"):
        dj.inject(base, lora, 0)


def test_params_with_no_dense_layer(lora):
    with pytest.raises(dj.ConfigError, match=r"params hold no layer \(no dict with a 'kernel' or 'embedding' leaf\); top-level keys: "
                                             r"\['params'\]\. Pass the model's parameter tree"):
        dj.inject({"params": np.zeros(3)}, lora, jax.random.PRNGKey(0))


def test_existing_inject_messages(base, adapted, lora):
    with pytest.raises(dj.ConfigError, match=r"rank=7 is larger than min\(d_in, d_out\)=6 for layer 'enc/value' "
                                             r"\(kernel \(8, 6\)\)\. Use rank <= 6"):
        dj.inject(base, dj.AdapterConfig(targets=TARGETS, rank=7), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"targets='key' matches no dense or embedding layer\. Nearest layer paths"):
        dj.inject(base, dj.AdapterConfig(targets="key"), jax.random.PRNGKey(0))
    with pytest.raises(dj.ConfigError, match=r"already holds \['lora_a', 'lora_b'\]: these params are already adapted"):
        dj.inject(adapted, lora, jax.random.PRNGKey(0))


def test_split_and_combine_errors(adapted, lora):
    trainable, frozen = dj.split(adapted, dj.trainable_mask(adapted, lora))
    with pytest.raises(ValueError, match=r"mask has no entry for leaves \['head/bias', 'head/kernel'\] of params: build "
                                         r"the mask from the same params"):
        dj.split(adapted, {"enc": dj.trainable_mask(adapted, lora)["enc"]})
    with pytest.raises(ValueError, match=r"appears in more than one tree; combine takes disjoint trees"):
        dj.combine(trainable, adapted)
    with pytest.raises(TypeError, match=r"each tree passed to combine must be a nested dict.*got NoneType"):
        dj.combine(trainable, None, frozen)


def test_factored_execution_refuses_a_layer_with_part_of_its_factors(tiny_bert, tiny_batch):
    import jax

    model, base = tiny_bert
    cfg = dj.AdapterConfig(method="lora", targets="query$", rank=2)
    params = dj.inject(base, cfg, jax.random.PRNGKey(0))
    layer = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    del layer["lora_b"]
    apply = dj.adapt(lambda p, b: model(b["input_ids"], params=p).logits, cfg)
    with pytest.raises(dj.ConfigError, match=r"'bert/encoder/layer/0/attention/self/query' holds lora factor leaves "
                                             r"\['lora_a'\] but lacks \['lora_b'\]"):
        apply(params, tiny_batch)
