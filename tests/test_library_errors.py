"""Plain bad input to the library (AdapterConfig, inject/merge/unmerge/trainable_mask/partition) raises
one clear error that names the problem and the fix (issue 12), instead of a bare Python error or a
silently wrong result. Tiny random params dicts only: no model is loaded."""

import jax
import numpy as np
import pytest
from flax import nnx

import decomp_jax as dj
from decomp_jax.config import ConfigTypeError
from decomp_jax.inject import adapted_layers

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
