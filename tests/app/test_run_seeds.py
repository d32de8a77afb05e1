"""Seeds of one experiment trained together (experiment.run_seeds, issue 18): one batched step over one
copy of the frozen base writes the run folders that separate `run` calls write (losses, evaluation,
adapter and checkpoints equal to float rounding), resumes seed by seed, and refuses configs that differ
in more than the seed. On the tiny BERT, SST-2 data."""

import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from decomp_jax.app import cli
from decomp_jax.app.experiment import evaluate_run, load_config, run, run_seeds, seed_runs
from decomp_jax.errors import ConfigError

from conftest import DATA, REPO

SST2 = str(DATA / "glue" / "SST-2")


def config(model_dir, out, seed, *extra):
    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name={model_dir}", f"data.path={SST2}", "data.max_train_samples=96", "data.max_eval_samples=64",
        "data.max_length=32", "train.steps=6", "train.batch_size=8", "train.log_every=2", "train.learning_rate=0.01",
        "train.warmup_ratio=0.0", f"train.seed={seed}", f"train.output_dir={out}", *extra,
    ])


def losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(got, want):
    """Two run folders with the same losses, evaluation and adapter (to float rounding)."""
    np.testing.assert_allclose(losses(got), losses(want), atol=1e-5, rtol=0)
    a, b = load_file(str(got / "adapter.safetensors")), load_file(str(want / "adapter.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
    got_m, want_m = json.loads((got / "metrics.json").read_text()), json.loads((want / "metrics.json").read_text())
    for k, v in want_m["eval"].items():
        assert got_m["eval"][k] == pytest.approx(v, abs=1e-6), k


@pytest.fixture(scope="module")
def headless_dir(tiny_model_dir, tmp_path_factory):
    """The tiny BERT without a classification head: each seed draws its own new head."""
    import shutil

    import jax
    from safetensors.numpy import save_file
    from transformers import BertConfig

    from decomp_jax.models.bert import BertModel, from_hf_config
    from decomp_jax.models.names import torch_state_dict

    folder = tmp_path_factory.mktemp("headless")
    config = BertConfig.from_pretrained(tiny_model_dir)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    params = BertModel(from_hf_config(config)).init(jax.random.PRNGKey(0), ids)["params"]  # a bare BertModel's
    config.architectures = ["BertModel"]
    config.save_pretrained(folder)
    save_file(torch_state_dict(params, "bert"), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("case", [
    # a stateful method (AdaLoRA: its schedule runs vmapped), a mid-run checkpoint
    ("tiny", 2, "adapter.method=adalora", "adapter.options={t_init: 0.2, t_final: 0.2, interval: 1}",
     "adapter.rank=4", "train.save_every=3"),
    # a frozen new head, drawn by each seed: those frozen leaves differ between the seeds and train in
    # each seed's state (the rest of the base is one copy); SSB; from the command line (slow: ~13 s)
    pytest.param(("headless", 2, "adapter.train_extra=null", "adapter.method=ssb"), marks=pytest.mark.slow),
])
def test_seeds_together_equal_separate_runs(case, tiny_model_dir, request, tmp_path):
    model, n, *extra = case
    headless_dir = request.getfixturevalue("headless_dir") if model == "headless" else None  # (built for its case only)
    model = tiny_model_dir if model == "tiny" else headless_dir
    seeds = list(range(n))
    separate = [run(config(model, tmp_path / f"alone{s}", s, *extra), progress=False) for s in seeds]
    if model == headless_dir:  # from the command line: `decomp-jax train CONFIG --seeds 0 1` (folders seed0, seed1)
        (tmp_path / "c.yaml").write_text(config(model, tmp_path / "together", 0, *extra).to_yaml())
        assert cli.main(["train", str(tmp_path / "c.yaml"), "--seeds", *map(str, seeds), "--no-progress"]) == 0
        for s in seeds:
            (tmp_path / f"together/seed{s}").rename(tmp_path / f"together{s}")
        together = [json.loads((tmp_path / f"together{s}" / "metrics.json").read_text()) for s in seeds]
    else:
        together = run_seeds([config(model, tmp_path / f"together{s}", s, *extra) for s in seeds], progress=False)
    for s, rec_alone, rec in zip(seeds, separate, together):
        assert rec["batched"] == n and "batched" not in rec_alone
        assert_same_run(tmp_path / f"together{s}", tmp_path / f"alone{s}")
        # the run folder is an ordinary one: evaluated from its config and adapter, checkpoints restorable
        assert evaluate_run(tmp_path / f"together{s}")["eval"] == pytest.approx(rec["eval"], abs=1e-6)
        saved = sorted(int(p.name) for p in (tmp_path / f"together{s}" / "checkpoints").iterdir() if p.name.isdigit())
        assert saved == sorted(int(p.name) for p in (tmp_path / f"alone{s}" / "checkpoints").iterdir() if p.name.isdigit())
    if model == headless_dir:  # the case holds what it says: the heads are each seed's own, the rest shared
        runs = seed_runs([config(model, tmp_path / f"x{s}", s, *extra) for s in seeds])
        assert {"/".join(p[:1]) for p in flatten_dict(runs[1].own)} == {"classifier"}
        assert not np.array_equal(*(flatten_dict(r.own)[("classifier", "kernel")] for r in runs))
        embedding = lambda r: r.task.frozen["bert"]["embeddings"]["word_embeddings"]["embedding"]
        assert embedding(runs[1]) is embedding(runs[0])
    # the seeds really differ (beyond the tolerance above)
    assert abs(losses(tmp_path / "together0")[0] - losses(tmp_path / "together1")[0]) > 1e-3


def test_a_stopped_group_resumes_seed_by_seed(tiny_model_dir, tmp_path):
    """A batched run stopped after a checkpoint (a killed sweep) leaves each seed a resumable run folder:
    `run(cfg, resume=True)` finishes the second seed's with the losses of its uninterrupted single run."""
    seeds = [3, 4]
    extra = ("train.save_every=2",)
    cfgs = [config(tiny_model_dir, tmp_path / f"g{s}", s, *extra) for s in seeds]
    import decomp_jax.app.experiment as ex

    real_train = ex._train

    def stop_at_3(runs, **kw):
        kw["on_step"] = lambda step, values: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None
        return real_train(runs, **kw)

    ex._train = stop_at_3
    try:
        with pytest.raises(KeyboardInterrupt):
            run_seeds(cfgs, progress=False)
    finally:
        ex._train = real_train
    for s in seeds:
        assert (tmp_path / f"g{s}" / "checkpoints" / "2").is_dir() and not (tmp_path / f"g{s}" / "metrics.json").exists()
    s = seeds[1]  # (the second seed's leaves sit at index 1 of the stacked state)
    run(cfgs[1], progress=False, resume=True)
    run(config(tiny_model_dir, tmp_path / f"alone{s}", s, *extra), progress=False)
    assert_same_run(tmp_path / f"g{s}", tmp_path / f"alone{s}")


def test_bad_seed_groups_are_refused(tiny_model_dir, tmp_path, capsys):
    a = config(tiny_model_dir, tmp_path / "a", 0)
    with pytest.raises(ConfigError, match="differ in more than train.seed.*learning_rate"):
        run_seeds([a, config(tiny_model_dir, tmp_path / "b", 1, "train.learning_rate=0.02")], progress=False)
    with pytest.raises(ConfigError, match="the same train.seed"):
        run_seeds([a, config(tiny_model_dir, tmp_path / "b", 0)], progress=False)
    with pytest.raises(ConfigError, match="the same train.output_dir"):
        run_seeds([a, config(tiny_model_dir, tmp_path / "a", 1)], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing was created
    # the command line: several configs (or --seeds) train together; --resume and --output-dir name one run
    (tmp_path / "one.yaml").write_text(a.to_yaml())
    (tmp_path / "two.yaml").write_text(config(tiny_model_dir, tmp_path / "b", 1).to_yaml())
    two = [str(tmp_path / "one.yaml"), str(tmp_path / "two.yaml")]
    for argv, message in ((two + ["--resume"], "--resume: several seeds train together"),
                          (two + ["--output-dir", str(tmp_path / "c")], "--output-dir with several configs"),
                          (two[:1] + ["--seeds", "0", "1", "--resume"], "resume a stopped one alone"),
                          (two + ["--seeds", "0", "1"], "--seeds takes one config")):
        assert cli.main(["train", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_a_diverging_group_names_the_seed(tiny_model_dir, tmp_path):
    """A NaN step of any seed stops the group before that state is saved, naming the seed and how to go on."""
    from decomp_jax.guards import NonFiniteError

    extra = ("train.learning_rate=1e6", "train.grad_clip=null", "train.save_every=1", "train.log_every=6")
    cfgs = [config(tiny_model_dir, tmp_path / f"d{s}", s, *extra) for s in (0, 1)]
    with pytest.raises(NonFiniteError, match=r"diverged at step \d+ \(seed \d of the 2 seeds trained together.*"
                                             r"--resume\).*Lower train.learning_rate"):
        run_seeds(cfgs, progress=False)
    for s in (0, 1):
        assert not (tmp_path / f"d{s}" / "metrics.json").exists()
