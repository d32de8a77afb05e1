"""GLUE tasks: task specs, example loading (local TSV or the Hugging Face hub),
tokenization and deterministic, resumable batching.

Local files follow the GLUE layout (one folder per task holding ``train.tsv`` and
``dev.tsv``). They are read by splitting on tabs with quoting off, because some rows
hold ``"`` characters that default CSV parsing would mangle.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from decomp_jax.guards import read_text

__all__ = [
    "TaskSpec",
    "TASKS",
    "Examples",
    "get_task",
    "normalize_split",
    "read_tsv",
    "load_examples",
    "tokenize",
    "num_rows",
    "steps_per_epoch",
    "batches",
    "train_batch",
]

SPLITS = ("train", "validation")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "dev": "validation", "val": "validation"}


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to load and score one GLUE task.

    ``text_columns``/``label_column`` name the columns of the local TSV files;
    ``hub_text_columns``/``hub_label_column`` name those of
    ``datasets.load_dataset("glue", hub_name)``. Headerless files (CoLA) give their
    column names in ``column_names``. ``label_names`` maps string labels to ids by
    position (RTE); ``None`` means the labels are written as numbers.
    """

    name: str
    folder: str
    hub_name: str
    text_columns: tuple[str, ...]
    label_column: str
    hub_text_columns: tuple[str, ...]
    hub_label_column: str
    num_labels: int
    is_regression: bool
    best_metric: str
    has_header: bool = True
    column_names: tuple[str, ...] | None = None
    label_names: tuple[str, ...] | None = None
    split_files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))
    hub_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"))

    def split_file(self, split: str) -> str:
        """File name holding ``split`` ("train", "validation" or "dev")."""
        return dict(self.split_files)[normalize_split(split)]


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2", folder="SST-2", hub_name="sst2",
        text_columns=("sentence",), label_column="label",
        hub_text_columns=("sentence",), hub_label_column="label",
        num_labels=2, is_regression=False, best_metric="accuracy",
    ),
    "rte": TaskSpec(
        name="rte", folder="RTE", hub_name="rte",
        text_columns=("sentence1", "sentence2"), label_column="label",
        hub_text_columns=("sentence1", "sentence2"), hub_label_column="label",
        num_labels=2, is_regression=False, best_metric="accuracy",
        label_names=("entailment", "not_entailment"),
    ),
    "mrpc": TaskSpec(
        name="mrpc", folder="MRPC", hub_name="mrpc",
        text_columns=("#1 String", "#2 String"), label_column="Quality",
        hub_text_columns=("sentence1", "sentence2"), hub_label_column="label",
        num_labels=2, is_regression=False, best_metric="f1",
    ),
    "stsb": TaskSpec(
        name="stsb", folder="STS-B", hub_name="stsb",
        text_columns=("sentence1", "sentence2"), label_column="score",
        hub_text_columns=("sentence1", "sentence2"), hub_label_column="label",
        num_labels=1, is_regression=True, best_metric="pearson",
    ),
    "cola": TaskSpec(
        name="cola", folder="CoLA", hub_name="cola",
        text_columns=("sentence",), label_column="label",
        hub_text_columns=("sentence",), hub_label_column="label",
        num_labels=2, is_regression=False, best_metric="matthews_corrcoef",
        has_header=False, column_names=("source", "label", "original_label_mark", "sentence"),
    ),
    # the paper's three large tasks: GLUE's TSV columns; MNLI is scored on the matched dev set
    "mnli": TaskSpec(
        name="mnli", folder="MNLI", hub_name="mnli",
        text_columns=("sentence1", "sentence2"), label_column="gold_label",
        hub_text_columns=("premise", "hypothesis"), hub_label_column="label",
        num_labels=3, is_regression=False, best_metric="accuracy",
        label_names=("entailment", "neutral", "contradiction"),
        split_files=(("train", "train.tsv"), ("validation", "dev_matched.tsv")),
        hub_splits=(("train", "train"), ("validation", "validation_matched")),
    ),
    "qnli": TaskSpec(
        name="qnli", folder="QNLI", hub_name="qnli",
        text_columns=("question", "sentence"), label_column="label",
        hub_text_columns=("question", "sentence"), hub_label_column="label",
        num_labels=2, is_regression=False, best_metric="accuracy",
        label_names=("entailment", "not_entailment"),
    ),
    "qqp": TaskSpec(
        name="qqp", folder="QQP", hub_name="qqp",
        text_columns=("question1", "question2"), label_column="is_duplicate",
        hub_text_columns=("question1", "question2"), hub_label_column="label",
        num_labels=2, is_regression=False, best_metric="f1",
    ),
}
"""The GLUE tasks by name (sst2, rte, mrpc, stsb, cola, mnli, qnli, qqp), each one's ``TaskSpec``;
``get_task`` looks a name up (case-insensitive, ``sst-2``/``sts-b`` accepted)."""

_TASK_ALIASES = {"sst2": "sst2", "sst-2": "sst2", "rte": "rte", "mrpc": "mrpc",
                 "stsb": "stsb", "sts-b": "stsb", "cola": "cola", "mnli": "mnli", "qnli": "qnli", "qqp": "qqp"}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """Return the ``TaskSpec`` for a task name (case-insensitive; ``sst-2``/``sts-b`` accepted)."""
    if isinstance(task, TaskSpec):
        return task
    key = _TASK_ALIASES.get(str(task).strip().lower())
    if key is None:
        known = ", ".join(sorted(_TASK_ALIASES))
        raise ValueError(f"Unknown GLUE task {task!r}. Known tasks: {known}.")
    return TASKS[key]


def normalize_split(split: str) -> str:
    """Map ``"train"``/``"validation"``/``"dev"`` to ``"train"`` or ``"validation"``."""
    key = _SPLIT_ALIASES.get(str(split).strip().lower())
    if key is None:
        raise ValueError(f"Unknown split {split!r}. Use one of: train, validation (or dev).")
    return key


@dataclass
class Examples:
    """Raw examples of one split: texts and labels (int32 classes or float32 scores)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if self.text_b is not None and len(self.text_b) != n:
            raise ValueError(f"text_b has {len(self.text_b)} entries but text_a has {n}; they must match.")
        if len(self.labels) != n:
            raise ValueError(f"labels has {len(self.labels)} entries but text_a has {n}; they must match.")

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Examples":
        """Return the examples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        text_b = None if self.text_b is None else [self.text_b[i] for i in idx]
        return Examples([self.text_a[i] for i in idx], text_b, self.labels[idx])


# --------------------------------------------------------------------------- reading


def read_tsv(file: str | Path, column_names: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Read a tab-separated file with quoting off; return ``(header, rows)``.

    The header is the first line unless ``column_names`` is given (headerless files).
    A UTF-8 byte-order mark is stripped. Blank lines are skipped; a row whose field
    count differs from the header raises ``ValueError`` naming the file and line.
    """
    file = Path(file)
    text = read_text(file, "re-save it as UTF-8, or download the GLUE data again", encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    if column_names is None:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{file} is empty; expected a header line and data rows.")
        header = [name.lstrip("\ufeff").strip() for name in header]
    else:
        header = list(column_names)
    rows = [row for row in reader if row]
    first_line = 1 if column_names is not None else 2
    for offset, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"{file}: line {first_line + offset} has {len(row)} tab-separated fields but the "
                f"header {header} has {len(header)}. Check that the file is the GLUE TSV for this task."
            )
    return header, rows


def _column_index(header: Sequence[str], column: str, source: str) -> int:
    """Index of ``column`` in ``header``, or a ``ValueError`` naming what exists."""
    try:
        return list(header).index(column)
    except ValueError:
        raise ValueError(
            f"Column {column!r} is missing from {source}. Columns found: {list(header)}. "
            f"Fix: point data.path at the GLUE folder for this task (unmodified GLUE TSV files), "
            f"or choose the task that matches the file."
        ) from None


def _parse_label(value: Any, spec: TaskSpec, source: str) -> int | float:
    """Convert one raw label to an int class id or a float score."""
    text = str(value).strip()
    try:
        if spec.is_regression:
            return float(text)
        if spec.label_names is not None and text in spec.label_names:
            return spec.label_names.index(text)
        label = int(text)
    except ValueError:
        expected = "a number" if spec.is_regression else (
            f"one of {list(spec.label_names)} or an integer" if spec.label_names else "an integer class id")
        raise ValueError(f"Bad label {value!r} in {source}; task {spec.name!r} expects {expected}.") from None
    if not 0 <= label < spec.num_labels:
        raise ValueError(f"Label {label} in {source} is out of range for task {spec.name!r} "
                         f"(expected 0..{spec.num_labels - 1}).")
    return label


def _labels_array(values: Sequence[Any], spec: TaskSpec, source: str) -> np.ndarray:
    """Parse labels into int32 (classification) or float32 (regression)."""
    dtype = np.float32 if spec.is_regression else np.int32
    return np.asarray([_parse_label(v, spec, source) for v in values], dtype=dtype)


def _examples_from_columns(columns: Mapping[str, Sequence[Any]], text_columns: Sequence[str],
                           label_column: str, spec: TaskSpec, source: str) -> Examples:
    """Build ``Examples`` from a column mapping (already checked for presence)."""
    text_a = [str(t) for t in columns[text_columns[0]]]
    text_b = [str(t) for t in columns[text_columns[1]]] if len(text_columns) > 1 else None
    return Examples(text_a, text_b, _labels_array(columns[label_column], spec, source))


def _resolve_folder(path: str | Path, spec: TaskSpec) -> Path:
    """The task folder: ``path`` itself, or ``path/<folder>`` when given the GLUE root."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Data folder for task {spec.name!r} does not exist: {folder}. Fix: pass the GLUE folder "
            f"for the task, e.g. data.path=../shared/data/glue/{spec.folder}, or set data.hub=glue "
            f"to download it with `datasets` (used when data.path does not exist, or with data.path=null)."
        )
    nested = folder / spec.folder
    if not any((folder / f).is_file() for _, f in spec.split_files) and nested.is_dir():
        return nested
    return folder


def _load_local(spec: TaskSpec, split: str, path: str | Path) -> Examples:
    """Read one split of ``spec`` from a GLUE-layout folder."""
    folder = _resolve_folder(path, spec)
    file = folder / spec.split_file(split)
    if not file.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.suffix == ".tsv")
        raise FileNotFoundError(
            f"Split file for {spec.name!r} {split!r} does not exist: {file} (TSV files there: {present}). "
            f"Fix: pass the GLUE folder for the task holding train.tsv and dev.tsv, e.g. "
            f"data.path=../shared/data/glue/{spec.folder}, or set data.hub=glue."
        )
    header, rows = read_tsv(file, None if spec.has_header else spec.column_names)
    wanted = (*spec.text_columns, spec.label_column)
    index = {c: _column_index(header, c, str(file)) for c in wanted}
    columns = {c: [row[i] for row in rows] for c, i in index.items()}
    return _examples_from_columns(columns, spec.text_columns, spec.label_column, spec, str(file))


def _load_hub(spec: TaskSpec, split: str, hub: str) -> Examples:
    """Load one split of ``spec`` with ``datasets.load_dataset(hub, spec.hub_name)``."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a declared dependency
        raise ImportError("Loading from the hub needs the `datasets` package: pip install datasets, "
                          "or pass a local GLUE folder with data.path.") from err
    split = dict(spec.hub_splits)[split]
    dataset = datasets.load_dataset(hub, spec.hub_name, split=split)
    source = f"hub dataset {hub!r} config {spec.hub_name!r} split {split!r}"
    for column in (*spec.hub_text_columns, spec.hub_label_column):
        _column_index(dataset.column_names, column, source)
    columns = {c: dataset[c] for c in (*spec.hub_text_columns, spec.hub_label_column)}
    return _examples_from_columns(columns, spec.hub_text_columns, spec.hub_label_column, spec, source)


def _sample(examples: Examples, max_samples: int | None, seed: int) -> Examples:
    """Deterministic random subset of ``max_samples`` rows (file order kept); all rows otherwise."""
    if max_samples is None or max_samples >= len(examples):
        return examples
    if max_samples <= 0:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}.")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_samples])
    return examples.subset(chosen)


def load_examples(task: str | TaskSpec, split: str, path: str | Path | None = None,
                  hub: str | None = None, max_samples: int | None = None, seed: int = 0) -> Examples:
    """Load one split ("train", "validation" or "dev") of a GLUE task.

    Reads ``<path>/train.tsv`` or ``<path>/dev.tsv`` when ``path`` is given (a GLUE task
    folder such as ``../shared/data/glue/SST-2``; the GLUE root also works), else
    ``datasets.load_dataset(hub, <config>)``; with both, the hub when ``path`` does not exist (the quick
    start's config names both). ``max_samples`` keeps a deterministic random subset
    (``default_rng(seed).permutation``) in file order when smaller than the split.
    """
    spec = get_task(task)
    split = normalize_split(split)
    if path is not None and (hub is None or Path(path).expanduser().exists()):
        examples = _load_local(spec, split, path)
    elif hub is not None and path is not None:  # the fallback: say why the hub was asked
        try:
            examples = _load_hub(spec, split, hub)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds (network, missing config, ...)
            raise FileNotFoundError(
                f"Data folder for task {spec.name!r} does not exist: {Path(path).expanduser()} (data.path), and "
                f"data.hub={hub!r} could not be loaded instead: {type(err).__name__}: {err}. Fix: point data.path at "
                f"the GLUE folder for the task, e.g. data.path=../shared/data/glue/{spec.folder}, or check the "
                f"network for the hub.") from err
    elif hub is not None:
        examples = _load_hub(spec, split, hub)
    else:
        raise ValueError(
            f"No data source for task {spec.name!r}: pass path= (e.g. data.path=../shared/data/glue/"
            f"{spec.folder}) or hub= (e.g. data.hub=glue)."
        )
    return _sample(examples, max_samples, seed)


# --------------------------------------------------------------------------- tokenizing


def tokenize(examples: Examples, tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Tokenize all examples in one batched call; pad/truncate to ``max_length``.

    Returns int32 ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape
    ``(n, max_length)`` plus ``labels``. Sentence pairs are encoded together when
    ``examples.text_b`` is set (second segment gets token type 1 on BERT-style models).
    """
    if int(max_length) <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}.")
    n = len(examples)
    if n == 0:
        empty = np.zeros((0, max_length), np.int32)
        return {"input_ids": empty, "attention_mask": empty.copy(), "token_type_ids": empty.copy(),
                "labels": examples.labels}
    pair = () if examples.text_b is None else (list(examples.text_b),)
    encoded = tokenizer(list(examples.text_a), *pair, padding="max_length", truncation=True,
                        max_length=int(max_length), return_attention_mask=True,
                        return_token_type_ids=True, return_tensors="np")
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    if input_ids.shape != (n, max_length):
        raise ValueError(f"Tokenizer returned input_ids of shape {input_ids.shape}, expected {(n, max_length)}; "
                         f"use a tokenizer that supports padding='max_length'.")
    type_ids = encoded.get("token_type_ids")
    return {
        "input_ids": input_ids,
        "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
        "token_type_ids": np.zeros_like(input_ids) if type_ids is None else np.asarray(type_ids, np.int32),
        "labels": examples.labels,
    }


# --------------------------------------------------------------------------- batching


def num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    """Common leading dimension of all arrays; ``ValueError`` if they disagree or none are given."""
    if not arrays:
        raise ValueError("arrays is empty; pass a dict of arrays such as the output of tokenize().")
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"All arrays must have the same number of rows, got {sizes}.")
    return next(iter(sizes.values()))


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch: ``n // batch_size`` with ``drop_last``, else ``ceil(n / batch_size)``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffled row order of one epoch, ``default_rng((seed, epoch)).permutation(n)`` (read-only, cached)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got seed={seed}, epoch={epoch}.")
    order = np.random.default_rng((seed, epoch)).permutation(n)
    order.setflags(write=False)
    return order


def _gather(arrays: Mapping[str, np.ndarray], idx: np.ndarray, n_real: int) -> dict[str, np.ndarray]:
    """Rows ``idx`` of every array plus float32 ``weights`` (1 for the first ``n_real`` rows, else 0)."""
    batch = {name: np.asarray(a)[idx] for name, a in arrays.items() if name != "weights"}
    mask = (np.arange(len(idx)) < n_real).astype(np.float32)
    base = np.asarray(arrays["weights"], np.float32)[idx] if "weights" in arrays else 1.0
    batch["weights"] = (base * mask).astype(np.float32)
    return batch


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool, seed: int,
            epoch: int = 0, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
    """Yield fixed-shape batches of one epoch.

    The order is ``default_rng((seed, epoch)).permutation(n)`` when ``shuffle`` else the
    row order. With ``drop_last`` the incomplete tail is dropped; otherwise the last batch
    is padded to ``batch_size`` by repeating row 0. Every batch carries float32 ``weights``
    (1 real row, 0 padding; an input ``weights`` array is carried through for real rows).
    """
    n = num_rows(arrays)
    count = steps_per_epoch(n, batch_size, drop_last)
    order = _epoch_order(n, int(seed), int(epoch)) if shuffle else np.arange(n)
    for b in range(count):
        idx = order[b * batch_size:(b + 1) * batch_size]
        n_real = len(idx)
        if n_real < batch_size:
            idx = np.concatenate([idx, np.zeros(batch_size - n_real, dtype=idx.dtype)])
        yield _gather(arrays, idx, n_real)


def train_batch(arrays: Mapping[str, np.ndarray], batch_size: int, step: int, seed: int,
                rows: Optional[slice] = None) -> dict[str, np.ndarray]:
    """Batch for global optimizer step ``step`` (0-based) of an endless shuffled stream; ``rows``
    reads only those rows of it (one process's share of a global batch).

    Epoch ``step // steps_per_epoch`` is shuffled with ``default_rng((seed, epoch))`` and its
    incomplete tail dropped, so the data position is a pure function of ``step`` (exact
    resume) and matches ``batches(..., shuffle=True, drop_last=True, epoch=epoch)``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    n = num_rows(arrays)
    per_epoch = steps_per_epoch(n, batch_size, drop_last=True)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples; "
                         f"lower the batch size or use more data.")
    epoch, position = divmod(int(step), per_epoch)
    idx = _epoch_order(n, int(seed), epoch)[position * batch_size:(position + 1) * batch_size]
    idx = idx if rows is None else idx[rows]
    return _gather(arrays, idx, len(idx))
