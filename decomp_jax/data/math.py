"""Math reasoning (the LLM-Adapters math suite of the paper's toolkit): data and answer scoring.

Training: ``gsm8k/train.jsonl`` (``{question, answer}``; the answer is a worked solution whose last
line is ``#### N``). The calculator annotations ``<<48/2=24>>`` are dropped and the last line becomes
``The answer is N.``, the form of the test sets' reference outputs. Evaluation: ``math/<set>/test.json``
(``{instruction, input, output, answer}``) for GSM8K, AddSub, MultiArith, SingleEq, SVAMP, MAWPS and
AQuA, by greedy decoding:

- numeric sets: the last number in the generation (commas removed), correct when within 0.001 of the
  answer (LLM-Adapters' rule);
- AQuA (choices A-E): the letter after the last "answer is" when there is one, else the last
  standalone capital A-E. (LLM-Adapters takes the first ``A|B|C|D|E`` anywhere, which matches the
  "A" of "Answer"; we do not copy that.)

Roots: ``data.path`` is the folder that holds ``gsm8k/`` and ``math/`` (``../shared/data``); the
default looks in ``$DECOMP_JAX_DATA_DIR`` and ``../shared/data``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from decomp_jax.guards import FileFormatError, read_json, read_text

#: registry name -> folder under math/
MATH_SETS: dict[str, str] = {
    "gsm8k": "gsm8k", "addsub": "AddSub", "multiarith": "MultiArith", "singleeq": "SingleEq",
    "svamp": "SVAMP", "mawps": "mawps", "aqua": "AQuA",
}
LETTER_SETS = ("aqua",)
TOLERANCE = 1e-3


@dataclass(frozen=True)
class MathExample:
    """One problem in the instruction format of the commonsense examples (``render_prompt`` reads it)."""

    instruction: str
    input: str
    output: str
    answer: str
    dataset: str


def set_names(spec: Optional[str]) -> list[str]:
    """``data.datasets`` for math: a comma-separated subset of the seven test sets (default all)."""
    if not spec:
        return list(MATH_SETS)
    aliases = {k.lower(): k for k in MATH_SETS} | {v.lower(): k for k, v in MATH_SETS.items()}
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n.lower() not in aliases]
    if unknown:
        raise ValueError(f"Unknown math test set(s) {unknown}; known: {', '.join(MATH_SETS)}.")
    return [aliases[n.lower()] for n in names]


def _roots(data_dir) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots = [Path(os.environ["DECOMP_JAX_DATA_DIR"]).expanduser()] if os.environ.get("DECOMP_JAX_DATA_DIR") else []
    return roots + [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]


def _find(data_dir, relative: str) -> Path:
    for root in _roots(data_dir):
        if (root / relative).is_file():
            return root / relative
    tried = ", ".join(str(r) for r in _roots(data_dir))
    raise FileNotFoundError(f"No {relative} under {tried}. Fix: data.path must be the folder holding gsm8k/ and "
                            f"math/ (e.g. ../shared/data), or set DECOMP_JAX_DATA_DIR.")


_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """``(worked solution ending in "The answer is N.", N)`` from a GSM8K train answer."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer must end with '#### N'; got {answer[-80:]!r}.")
    body, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    body = _CALCULATOR.sub("", body).strip()
    return f"{body}\nThe answer is {final}.", final


def load_train(data_dir=None, limit: Optional[int] = None, seed: Optional[int] = 0) -> list[MathExample]:
    """GSM8K's train set as instruction examples (shuffled with ``seed``; ``limit`` after shuffling)."""
    file = _find(data_dir, "gsm8k/train.jsonl")
    fix = "re-save it as UTF-8 JSON Lines, one {question, answer} object a line (GSM8K's format), or download it again"
    out = []
    for i, line in enumerate(io.StringIO(read_text(file, fix), newline=None)):  # (lines as open() splits them)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FileFormatError(f"{file} is not valid JSON Lines ({err.msg.removesuffix(' at')} at line {i + 1}, "
                                  f"column {err.colno}); {fix}.") from None
        if "question" not in record or "answer" not in record:
            raise ValueError(f"{file}: line {i + 1} lacks question/answer (GSM8K's format).")
        solution, final = gsm8k_solution(record["answer"])
        out.append(MathExample(record["question"], "", solution, final, "gsm8k"))
    if seed is not None:
        out = [out[i] for i in np.random.default_rng(int(seed)).permutation(len(out))]
    return out[: int(limit)] if limit else out


def load_test(name: str, data_dir=None, limit: Optional[int] = None) -> list[MathExample]:
    """One test set (file order; the first ``limit``)."""
    file = _find(data_dir, f"math/{MATH_SETS[name]}/test.json")
    records = read_json(file, "re-save it as UTF-8 JSON, a list of {instruction, input, output, answer} records "
                              "(LLM-Adapters' format), or download it again")
    if not isinstance(records, list):
        raise ValueError(f"{file} must hold a JSON list of records.")
    out = []
    for i, r in enumerate(records[: int(limit)] if limit else records):
        if "instruction" not in r or "answer" not in r:
            raise ValueError(f"{file}: record {i} lacks instruction/answer (the LLM-Adapters math format).")
        out.append(MathExample(str(r["instruction"]), str(r.get("input") or ""), str(r.get("output") or ""),
                               str(r["answer"]).strip(), name))
    return out


_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER_AFTER = re.compile(r"answer is\s*:?\s*\(?([A-E])\b")
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")


def extract_number(text: str) -> Optional[float]:
    """The last number in ``text`` (commas removed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def extract_letter(text: str) -> Optional[str]:
    """AQuA's choice: the letter after the last "answer is", else the last standalone A-E."""
    after = _LETTER_AFTER.findall(text)
    if after:
        return after[-1]
    found = _LETTER.findall(text)
    return found[-1] if found else None


def extract(name: str, text: str):
    return extract_letter(text) if name in LETTER_SETS else extract_number(text)


def is_correct(name: str, text: str, answer: str) -> bool:
    got = extract(name, text)
    if got is None:
        return False
    if name in LETTER_SETS:
        return got == answer.strip().upper()
    try:
        want = float(answer.replace(",", ""))
    except ValueError:
        return False
    return math.isfinite(got) and abs(got - want) <= TOLERANCE


def score(name: str, generations: Sequence[str], examples: Sequence[MathExample]) -> dict[str, float]:
    """``accuracy`` and ``answered`` (the share of generations with an extractable answer)."""
    if len(generations) != len(examples):
        raise ValueError(f"{len(generations)} generations for {len(examples)} examples.")
    right = [is_correct(name, g, e.answer) for g, e in zip(generations, examples)]
    answered = [extract(name, g) is not None for g in generations]
    return {"accuracy": float(np.mean(right)) if right else 0.0,
            "answered": float(np.mean(answered)) if answered else 0.0}
