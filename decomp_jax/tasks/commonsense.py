"""``data.task: commonsense``: the LLM-Adapters commonsense suite.

Trains on the mixed train sets of ``data.datasets`` (BoolQ, ARC-e, ARC-c, OBQA by default) and
evaluates ``data.eval_datasets`` (default: the training sets; ``all``: every set whose test file is
under ``data.path``: PIQA and SIQA in ../shared/data, HellaSwag and WinoGrande when their files are
given) by greedy decoding and answer extraction (accuracy per set and their mean).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from decomp_jax.data import commonsense as cs
from decomp_jax.errors import ConfigError
from decomp_jax.tasks.generation import GenerationTask


def dataset_names(spec: Optional[str]) -> list[str]:
    """``data.datasets`` (comma-separated; default the four of the paper's mixture) as registry names."""
    if not spec:
        return list(cs.COMMONSENSE_MIXTURE)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    try:
        return [cs.get_dataset(n).name for n in names]
    except ValueError as err:
        raise ConfigError(f"data.datasets={spec!r}: {err}") from None


class CommonsenseTask(GenerationTask):
    """The ``commonsense`` task: trains on the mixture of ``data.datasets``' train sets and scores each
    set of ``data.eval_datasets`` (``all``: every set found under ``data.path``) by the accuracy of the
    extracted answers and the fraction of generations with an answer."""

    name = "commonsense"

    @classmethod
    def eval_sets(cls, d) -> list[str]:
        spec = d.eval_datasets
        if spec is None:
            return dataset_names(d.datasets)
        if str(spec).strip().lower() == "all":
            present = cs.present_datasets(d.path)
            if not present:
                raise ConfigError(f"data.eval_datasets=all: no commonsense test files under data.path={d.path!r}.")
            return present
        try:
            return dataset_names(spec)
        except ConfigError as err:
            raise ConfigError(str(err).replace("data.datasets", "data.eval_datasets")) from None

    @classmethod
    def check(cls, d) -> None:
        dataset_names(d.datasets)
        if d.eval_datasets is not None and str(d.eval_datasets).strip().lower() != "all":
            cls.eval_sets(d)

    def load_train(self, cfg):
        d = cfg.data
        return cs.load_mixture(dataset_names(d.datasets), "train", data_dir=d.path, hub=d.hub,
                               limit=d.max_train_samples, seed=cfg.train.seed)

    def load_eval(self, cfg):
        d = cfg.data
        return {n: cs.load_commonsense(n, "test", data_dir=d.path, hub=d.hub, limit=d.max_eval_samples)
                for n in self.eval_sets(d)}

    def score(self, name, texts, examples):
        return {"accuracy": cs.accuracy(name, texts, examples),
                "answered": float(np.mean([cs.extract_answer(name, t) is not None for t in texts]))}
