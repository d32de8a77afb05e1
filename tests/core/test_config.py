import pytest
import yaml

from decomp_jax.app.experiment import ExperimentConfig, load_config, parse_override
import decomp_jax as dj

from conftest import REPO


def test_adapter_config_yaml_round_trip():
    cfg = dj.AdapterConfig(method="dora", targets="query$", rank=4, alpha=8.0, rslora=True, mpc="mpc_d",
                           mpc_norm="plain", train_extra="^classifier/", dropout=0.1, init="normal")
    assert dj.AdapterConfig.from_yaml(cfg.to_yaml()) == cfg
    assert dj.AdapterConfig.from_dict(yaml.safe_load(cfg.to_yaml())).scale == pytest.approx(8.0 / 2.0)
    assert dj.AdapterConfig(rank=4, alpha=8.0).scale == pytest.approx(2.0)


def test_experiment_config_round_trip_and_overrides(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["adapter.rank=4", "train.learning_rate=5e-4", "adapter.mpc=mpc_o"])
    assert cfg.adapter.rank == 4 and cfg.train.learning_rate == 5e-4 and cfg.adapter.mpc == "mpc_o"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "lorra"}, r"Unknown method 'lorra'\. Did you mean 'lora'\?"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"init": "xavier"}, "init='xavier' is unknown"),
    ({"mpc": "mpc_x"}, "mpc='mpc_x' is unknown"),
    ({"method": "ssb", "mpc": "mpc_o"}, "which method 'ssb' does not have"),
    ({"mpc_norm": "l1"}, "mpc_norm='l1' is unknown"),
    ({"targets": "query("}, "not a valid regular expression"),
    ({"method": "lora", "scale_bias": True}, "scale_bias applies to method 'ia3' only"),
    ({"options": {"warmup": 3}}, r"Unknown option\(s\) \['warmup'\] for method 'lora'"),
])
def test_adapter_config_validation(kwargs, message):
    with pytest.raises(dj.ConfigError, match=message):
        dj.AdapterConfig(**kwargs)


def test_malformed_config_keys(tmp_path):
    with pytest.raises(dj.ConfigError, match=r"Unknown key 'rnak' in adapter\. Did you mean 'rank'\?"):
        ExperimentConfig.from_dict({"adapter": {"rnak": 4}, "data": {"path": "x"}})
    with pytest.raises(dj.ConfigError, match=r"Unknown section\(s\) \['optimizer'\]"):
        ExperimentConfig.from_dict({"optimizer": {}})
    with pytest.raises(dj.ConfigError, match="not of the form section.key=value"):
        parse_override("rank")
    with pytest.raises(dj.ConfigError, match="the key must be section.key"):
        parse_override("rank=3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter: [1, 2")
    with pytest.raises(dj.ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(dj.ConfigError, match="data needs `path`"):
        ExperimentConfig.from_dict({"data": {"task": "sst2"}})
    with pytest.raises(ValueError, match="sst2"):
        ExperimentConfig.from_dict({"data": {"task": "sst3", "path": "x"}})


def test_yaml_scalars_are_coerced_and_checked():
    cfg = ExperimentConfig.from_dict({"data": {"path": "x"}, "train": {"learning_rate": "5e-4", "steps": 10.0},
                                      "adapter": {"alpha": 8}})
    assert cfg.train.learning_rate == 5e-4 and isinstance(cfg.train.steps, int) and isinstance(cfg.adapter.alpha, float)
    with pytest.raises(dj.ConfigError, match=r"train.learning_rate must be of type float, got 'fast'"):
        ExperimentConfig.from_dict({"data": {"path": "x"}, "train": {"learning_rate": "fast"}})
    with pytest.raises(dj.ConfigError, match=r"adapter.rank must be of type int, got True"):
        ExperimentConfig.from_dict({"data": {"path": "x"}, "adapter": {"rank": True}})
