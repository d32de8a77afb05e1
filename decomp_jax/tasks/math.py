"""``data.task: math``: the LLM-Adapters math reasoning suite.

Trains on GSM8K's train set (worked solutions ending "The answer is N."; ``decomp_jax.data.math``)
and evaluates the test sets of ``data.datasets`` (default all seven: gsm8k, addsub, multiarith,
singleeq, svamp, mawps, aqua) by greedy decoding: the last number within 0.001 of the answer
(AQuA: the chosen letter). ``data.path``: the folder holding ``gsm8k/`` and ``math/``.
"""

from __future__ import annotations

from decomp_jax.data import math as mathdata
from decomp_jax.errors import ConfigError
from decomp_jax.tasks.generation import GenerationTask


class MathTask(GenerationTask):
    """The ``math`` task: trains on GSM8K's train set and scores the test sets that ``data.datasets``
    names (default all seven) by the accuracy of the last number (AQuA: the chosen letter) of each
    generation; reads local files only (``data.path``)."""

    name = "math"

    @classmethod
    def eval_sets(cls, d) -> list[str]:
        try:
            return mathdata.set_names(d.datasets)
        except ValueError as err:
            raise ConfigError(f"data.datasets={d.datasets!r}: {err}") from None

    @classmethod
    def check(cls, d) -> None:
        cls.eval_sets(d)
        if d.eval_datasets is not None:
            raise ConfigError("data.eval_datasets is a commonsense setting; for math, data.datasets names the test sets.")
        if d.hub is not None:
            raise ConfigError("data.task: math reads local files (data.path: the folder holding gsm8k/ and math/); "
                              "remove data.hub.")

    def load_train(self, cfg):
        return mathdata.load_train(cfg.data.path, limit=cfg.data.max_train_samples, seed=cfg.train.seed)

    def load_eval(self, cfg):
        d = cfg.data
        return {n: mathdata.load_test(n, d.path, limit=d.max_eval_samples) for n in self.eval_sets(d)}

    def score(self, name, texts, examples):
        return mathdata.score(name, texts, examples)
