"""Commonsense reasoning for decoder LLMs (the LLM-Adapters setting of the paper's toolkit):
dataset registry and loading, answer extraction and accuracy. The instruction prompt, tokenization
and batching are ``decomp_jax.data.lm``'s (imported here, so ``commonsense.tokenize_train`` etc. work).

Data layout (local): one folder per dataset holding ``train.json`` and ``test.json``, each a JSON
list of ``{"instruction", "input", "output", "answer"}`` records, e.g. (BoolQ):

    instruction: "Please answer the following question with true or false, question: ...\\n\\n
                  Answer format: true/false"
    output:      "the correct answer is true"
    answer:      "true"

ARC-Easy / ARC-Challenge / OpenBookQA answers are ``"answer1"``..``"answer5"`` (ARC has 3, 4 or
5 options per question; OBQA always 4). The root folder is ``../shared/data/commonsense``.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from decomp_jax.data.lm import (
    ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, TokenizedSet, TokenizerAdapter, as_tokenizer, bucket_length,
    decode_generations, default_buckets, epoch_batches, eval_batches, example_field, loss_slots, render_example,
    render_prompt, response_slots, steps_per_epoch, tokenize_prompts, tokenize_train, train_batch,
)
from decomp_jax.guards import read_json

__all__ = [
    "CommonsenseSpec",
    "COMMONSENSE_DATASETS",
    "COMMONSENSE_MIXTURE",
    "CommonsenseExample",
    "get_dataset",
    "normalize_split",
    "load_commonsense",
    "load_mixture",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "render_prompt",
    "render_example",
    "TokenizerAdapter",
    "as_tokenizer",
    "TokenizedSet",
    "tokenize_train",
    "tokenize_prompts",
    "default_buckets",
    "bucket_length",
    "steps_per_epoch",
    "epoch_batches",
    "train_batch",
    "eval_batches",
    "decode_generations",
    "response_slots",
    "loss_slots",
    "extract_answer",
    "accuracy",
]

# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class CommonsenseSpec:
    """One commonsense dataset: its folder name, valid answers and the extraction pattern.

    ``pattern`` is the regular expression whose first match in the lower-cased generation is the
    predicted answer (LLM-Adapters' rule: ``true|false`` for BoolQ, ``answer1..answer5`` for the
    multiple-choice sets, whatever the number of options of the question).
    """

    name: str
    folder: str
    answers: tuple[str, ...]
    pattern: str

    @property
    def regex(self) -> re.Pattern:
        return _compiled(self.pattern)


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


_CHOICES = tuple(f"answer{i}" for i in range(1, 6))
_CHOICE_PATTERN = "answer1|answer2|answer3|answer4|answer5"

COMMONSENSE_DATASETS: dict[str, CommonsenseSpec] = {
    "boolq": CommonsenseSpec("boolq", "boolq", ("true", "false"), "true|false"),
    "arc_e": CommonsenseSpec("arc_e", "ARC-Easy", _CHOICES, _CHOICE_PATTERN),
    "arc_c": CommonsenseSpec("arc_c", "ARC-Challenge", _CHOICES, _CHOICE_PATTERN),
    "obqa": CommonsenseSpec("obqa", "openbookqa", _CHOICES[:4], _CHOICE_PATTERN),
    # evaluation-only in ../shared/data (test.json, no train split); HellaSwag and WinoGrande when given
    "piqa": CommonsenseSpec("piqa", "piqa", ("solution1", "solution2"), "solution1|solution2"),
    "siqa": CommonsenseSpec("siqa", "social_i_qa", _CHOICES[:3], _CHOICE_PATTERN),
    "hellaswag": CommonsenseSpec("hellaswag", "hellaswag", tuple(f"ending{i}" for i in range(1, 5)),
                                 "ending1|ending2|ending3|ending4"),
    "winogrande": CommonsenseSpec("winogrande", "winogrande", ("option1", "option2"), "option1|option2"),
}
"""The commonsense datasets by registry name, each one's ``CommonsenseSpec`` (folder, valid answers,
extraction pattern): the four of the training mixture, then the evaluation-only piqa, siqa, hellaswag and
winogrande."""

COMMONSENSE_MIXTURE: tuple[str, ...] = ("boolq", "arc_e", "arc_c", "obqa")
"""The four datasets whose train sets are concatenated for multi-task training (boolq, arc_e, arc_c,
obqa: the default ``data.datasets``)."""

_ALIASES = {
    "boolq": "boolq",
    "arc_e": "arc_e", "arc-e": "arc_e", "arc-easy": "arc_e", "arc_easy": "arc_e", "arceasy": "arc_e",
    "arc_c": "arc_c", "arc-c": "arc_c", "arc-challenge": "arc_c", "arc_challenge": "arc_c",
    "arcchallenge": "arc_c",
    "obqa": "obqa", "openbookqa": "obqa", "openbook_qa": "obqa", "openbook-qa": "obqa",
    "piqa": "piqa", "siqa": "siqa", "social_i_qa": "siqa", "social-i-qa": "siqa", "socialiqa": "siqa",
    "hellaswag": "hellaswag", "hella_swag": "hellaswag", "winogrande": "winogrande", "wino_grande": "winogrande",
}


def present_datasets(data_dir: str | Path | None, split: str = "test") -> list[str]:
    """The registry names whose ``split`` file exists under the commonsense root ``data_dir``."""
    out = []
    for name, spec in COMMONSENSE_DATASETS.items():
        for root in ([Path(data_dir).expanduser()] if data_dir is not None else _default_roots()):
            if (root / spec.folder / f"{normalize_split(split)}.json").is_file():
                out.append(name)
                break
    return out

_SPLITS = {"train": "train", "test": "test", "validation": "test", "dev": "test", "eval": "test"}


def get_dataset(name: str | CommonsenseSpec) -> CommonsenseSpec:
    """The ``CommonsenseSpec`` of ``name`` (case-insensitive; ``ARC-Easy``, ``openbookqa`` ... accepted)."""
    if isinstance(name, CommonsenseSpec):
        return name
    key = _ALIASES.get(str(name).strip().lower())
    if key is None:
        raise ValueError(f"Unknown commonsense dataset {name!r}. Known: {', '.join(COMMONSENSE_DATASETS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))}).")
    return COMMONSENSE_DATASETS[key]


def normalize_split(split: str) -> str:
    """``"train"`` or ``"test"``; ``validation``/``dev``/``eval`` mean the test split (the only
    held-out split these datasets have, the one LLM-Adapters reports)."""
    key = _SPLITS.get(str(split).strip().lower())
    if key is None:
        raise ValueError(f"Unknown split {split!r}; use train or test (validation/dev/eval = test).")
    return key


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class CommonsenseExample:
    """One record of the JSON files, plus the registry name of the dataset it came from."""

    instruction: str
    input: str
    output: str
    answer: str
    dataset: str


def _default_roots() -> list[Path]:
    roots = []
    env = os.environ.get("DECOMP_JAX_COMMONSENSE_DIR")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path.cwd().parent / "shared" / "data" / "commonsense")
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "commonsense")
    return roots


def _resolve_folder(spec: CommonsenseSpec, data_dir: str | Path | None) -> Path:
    """The dataset folder: ``data_dir/<folder>`` (``data_dir`` = the commonsense root) or
    ``data_dir`` itself when it already holds the split files; default roots when ``None``."""
    candidates = [Path(data_dir).expanduser()] if data_dir is not None else _default_roots()
    for root in candidates:
        if (root / spec.folder).is_dir():
            return root / spec.folder
        if (root / "train.json").is_file() or (root / "test.json").is_file():
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"No data folder for commonsense dataset {spec.name!r} (looked for {spec.folder}/ in: {tried}). "
        f"Fix: pass data_dir=../shared/data/commonsense (the folder holding {spec.folder}/train.json), "
        f"set DECOMP_JAX_COMMONSENSE_DIR, or load from the hub with hub=<dataset repo>.")


def records_to_examples(records: Sequence[Mapping[str, Any]], spec: CommonsenseSpec,
                        source: str) -> list[CommonsenseExample]:
    """``CommonsenseExample``s of ``spec``'s set from JSON records (``instruction``, ``output``, ``answer``);
    a missing field or an answer that is not one of the set's raises ``ValueError`` naming ``source``."""
    out = []
    for i, rec in enumerate(records):
        missing = [k for k in ("instruction", "output", "answer") if k not in rec]
        if missing:
            raise ValueError(f"{source}: record {i} lacks {missing}; expected keys instruction, input, "
                             f"output, answer (the LLM-Adapters commonsense format).")
        answer = str(rec["answer"]).strip().lower()
        if answer not in spec.answers:
            raise ValueError(f"{source}: record {i} has answer {rec['answer']!r}, not one of {list(spec.answers)} "
                             f"for dataset {spec.name!r}; is this the right dataset?")
        out.append(CommonsenseExample(str(rec["instruction"]), str(rec.get("input") or ""),
                                      str(rec["output"]), answer, spec.name))
    return out


# what to do about a split file that is not UTF-8 JSON
JSON_FIX = ("re-save it as UTF-8 JSON, a list of {instruction, input, output, answer} records (LLM-Adapters' "
            "format), or download the data again")


def load_commonsense(name: str | CommonsenseSpec, split: str, data_dir: str | Path | None = None,
                     limit: int | None = None, hub: str | None = None) -> list[CommonsenseExample]:
    """Load one split of a commonsense dataset as a list of ``CommonsenseExample``.

    Local files ``<data_dir>/<folder>/<split>.json`` are read when ``hub`` is None (``data_dir``
    defaults to ``$DECOMP_JAX_COMMONSENSE_DIR`` or ``../shared/data/commonsense``; the dataset
    folder itself is accepted too). With ``hub``, the same file is loaded by
    ``datasets.load_dataset(hub, data_files="<folder>/<split>.json")`` from a hub dataset repo laid
    out like the local root. ``limit`` keeps the first ``limit`` rows (file order).
    """
    spec = get_dataset(name)
    split = normalize_split(split)
    if limit is not None and int(limit) <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit}.")
    if hub is not None:
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a declared dependency
            raise ImportError("Loading from the hub needs `datasets`: pip install datasets, "
                              "or pass data_dir=../shared/data/commonsense.") from err
        source = f"hub dataset {hub!r} file {spec.folder}/{split}.json"
        ds = datasets.load_dataset(hub, data_files=f"{spec.folder}/{split}.json", split="train")
        if limit is not None:
            ds = ds.select(range(min(int(limit), len(ds))))
        records = ds.to_list()
    else:
        file = _resolve_folder(spec, data_dir) / f"{split}.json"
        if not file.is_file():
            raise FileNotFoundError(f"Split file for {spec.name!r} {split!r} does not exist: {file}.")
        source = str(file)
        records = read_json(file, JSON_FIX)
        if not isinstance(records, list):
            raise ValueError(f"{file} must hold a JSON list of records, got {type(records).__name__}.")
        if limit is not None:
            records = records[: int(limit)]
    return records_to_examples(records, spec, source)


def load_mixture(names: Sequence[str] = COMMONSENSE_MIXTURE, split: str = "train",
                 data_dir: str | Path | None = None, limit: int | None = None, hub: str | None = None,
                 seed: int | None = 0) -> list[CommonsenseExample]:
    """Concatenate ``split`` of several datasets (default: boolq + arc_e + arc_c + obqa), then
    shuffle with ``np.random.default_rng(seed).permutation`` (``seed=None``: keep concatenation
    order). ``limit`` applies per dataset. Each example keeps its ``dataset`` name."""
    examples: list[CommonsenseExample] = []
    for name in names:
        examples.extend(load_commonsense(name, split, data_dir=data_dir, limit=limit, hub=hub))
    if seed is not None:
        order = np.random.default_rng(int(seed)).permutation(len(examples))
        examples = [examples[i] for i in order]
    return examples


# --------------------------------------------------------------------------- scoring


def extract_answer(dataset: str | CommonsenseSpec, text: str) -> str | None:
    """First occurrence of the dataset's answer pattern in the lower-cased ``text``
    (``true``/``false`` for BoolQ, ``answer1``..``answer5`` for ARC/OBQA), or None when absent.

    Like LLM-Adapters, plain substring matching: the first match wins, wherever it is (give the
    generated continuation only, not the prompt, which lists every option).
    """
    match = get_dataset(dataset).regex.search(str(text).lower())
    return None if match is None else match.group(0)


def accuracy(dataset: str | CommonsenseSpec | None, generations: Sequence[str], examples: Sequence[Any]) -> float:
    """Fraction of ``generations`` whose ``extract_answer`` equals the example's ``answer``
    (a missing answer counts as wrong). ``examples`` are ``CommonsenseExample``, dicts or the
    gold answer strings; ``dataset=None`` uses each example's own ``dataset`` (mixtures)."""
    if len(generations) != len(examples):
        raise ValueError(f"{len(generations)} generations for {len(examples)} examples; they must match.")
    if not examples:
        raise ValueError("accuracy of zero examples is undefined.")
    correct = 0
    for gen, ex in zip(generations, examples):
        gold = ex if isinstance(ex, str) else example_field(ex, "answer")
        name = dataset if dataset is not None else example_field(ex, "dataset")
        if not name:
            raise ValueError("dataset=None needs examples that carry their dataset name.")
        correct += int(extract_answer(name, gen) == gold.strip().lower())
    return correct / len(examples)
