"""``data.task``: a GLUE task (sst2, rte, mrpc, stsb, cola, mnli, qnli, qqp) on an encoder classifier
(BERT, RoBERTa, MiniLM): tokenized fixed-shape batches, classification or regression loss, dev-set
metrics. Same interface as ``GenerationTask``."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import partition
from decomp_jax.core.tree import combine, count_params
from decomp_jax.data import check_train_size, glue
from decomp_jax.errors import ConfigError, closest
from decomp_jax.guards import NonFiniteError
from decomp_jax.models.hf import load_sequence_classifier, sequence_classifier_apply
from decomp_jax.models.llama import LlamaConfig
from decomp_jax.parallel.distributed import to_host
from decomp_jax.tasks.base import LM_TASK_NAMES, model_params
from decomp_jax.tasks.metrics import TASK_METRICS, compute_metrics
from decomp_jax.training.losses import classification_loss, regression_loss
from decomp_jax.training.train import make_eval_step


class GlueTask:
    """Data, model and jitted steps for one GLUE experiment, shared by training and evaluation.

    The runner needs: ``trainable, buffers, frozen, base_params, model, backbone_params, name,
    primary_metric, num_train, train_batch(micro), loss(params, batch, rng), evaluate(trainable,
    buffers)``; ``tasks.GenerationTask`` has the same for decoder LLMs.
    """

    def __init__(self, cfg, need_train: bool = True):
        self.cfg = cfg
        self.spec = glue.get_task(cfg.data.task)
        seed = cfg.train.seed
        read = lambda split, n: glue.load_examples(
            self.spec, split, path=cfg.data.path, hub=cfg.data.hub, max_samples=n, seed=seed
        )
        # data first: a wrong path or column fails before the model is loaded
        train_examples = read("train", cfg.data.max_train_samples) if need_train else None
        if need_train:
            check_train_size(len(train_examples), cfg)
        eval_examples = read("validation", cfg.data.max_eval_samples)
        self.model, self.base_params, self.tokenizer = load_sequence_classifier(
            cfg.model.name, self.spec.num_labels, cfg.model.dtype, seed=seed, backbone=cfg.model.backbone
        )
        check_positions(cfg, self.model.config)
        if cfg.model.head_bias == "label_mean":  # also when evaluating: the base must be the one trained on
            labels = (train_examples if need_train else read("train", cfg.data.max_train_samples)).labels
            self.base_params = set_head_bias(self.base_params, float(np.mean(labels)))
        train_length = cfg.data.train_max_length or cfg.data.max_length
        self.train_arrays = glue.tokenize(train_examples, self.tokenizer, train_length) if need_train else None
        self.eval_arrays = glue.tokenize(eval_examples, self.tokenizer, cfg.data.max_length)
        self.base_params, params = model_params(self.base_params, cfg, jax.random.PRNGKey(seed))
        self.trainable, self.buffers, self.frozen = partition(params, cfg.adapter)
        self.apply = adapt(sequence_classifier_apply(self.model), cfg.adapter, mode=cfg.train.mode)
        self.eval_step = make_eval_step(self.predict)

    @classmethod
    def check(cls, d) -> None:
        """The data section of a GLUE experiment (raises ConfigError)."""
        try:
            glue.get_task(d.task)
        except ValueError:
            known = sorted({t.name for t in glue.TASKS.values()}) + list(LM_TASK_NAMES)
            raise ConfigError(f"data.task={d.task!r} is unknown.{closest(d.task, known)} "
                              f"Choose one of {', '.join(known)}.") from None
        if d.path is None and d.hub is None:
            raise ConfigError("data needs `path` (a GLUE task folder, e.g. ../shared/data/glue/SST-2) or `hub: glue`.")
        if d.eval_datasets is not None:
            raise ConfigError(f"data.eval_datasets applies to data.task: commonsense, not {d.task!r}; remove it.")

    @classmethod
    def metric_names(cls, d) -> list[str]:
        return list(TASK_METRICS[glue.get_task(d.task).name])

    def predict(self, params, batch):
        return self.apply(params, batch, train=False)

    def use_mesh(self, mesh) -> None:
        """Evaluate with each batch split over the mesh (the params keep their placement)."""
        self.eval_step = make_eval_step(self.predict, mesh=mesh)

    @property
    def backbone_params(self) -> int:
        return count_params(self.base_params)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def primary_metric(self) -> str:
        return TASK_METRICS[self.spec.name][0]

    @property
    def num_train(self) -> int:
        return glue.num_rows(self.train_arrays)

    def train_batch(self, micro: int, rows: Optional[slice] = None) -> dict:
        return glue.train_batch(self.train_arrays, self.cfg.train.batch_size, micro, self.cfg.train.seed, rows=rows)

    def loss(self, params, batch, rng):
        outputs = self.apply(params, batch, train=True, rng=rng)
        if self.spec.is_regression:
            return regression_loss(outputs, batch["labels"]), {}
        return classification_loss(outputs, batch["labels"]), {}

    def evaluate(self, trainable, buffers: Optional[dict] = None) -> dict[str, float]:
        frozen = combine(self.buffers if buffers is None else buffers, self.frozen)
        preds, labels = [], []
        for batch in glue.batches(self.eval_arrays, self.cfg.train.eval_batch_size, shuffle=False, seed=0, drop_last=False):
            real = batch["weights"] > 0
            out = np.asarray(to_host(self.eval_step(trainable, frozen, batch)), np.float32)
            preds.append(out[real])
            labels.append(batch["labels"][real])
        preds = np.concatenate(preds)
        check_predictions(preds)
        return compute_metrics(self.spec.name, preds, np.concatenate(labels))


def check_positions(cfg, model_config) -> None:
    """``data.max_length`` must fit the model's learned position embeddings (beyond them BERT-type
    models index past the table and produce NaN). RoBERTa's positions start after its padding index."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None or isinstance(model_config, LlamaConfig):  # rotary positions: no table to index past
        return
    if getattr(model_config, "model_type", None) == "roberta":
        limit -= (getattr(model_config, "pad_token_id", 1) or 0) + 1
    for name in ("max_length", "train_max_length"):
        value = getattr(cfg.data, name)
        if value is not None and value > limit:
            raise ConfigError(f"data.{name}={value} exceeds the {limit} positions of model {cfg.model.name!r}; "
                              f"set data.{name} to {limit} or less.")


def check_predictions(outputs: np.ndarray) -> None:
    """Refuse to score NaN or inf model outputs (argmax would silently call them class 0)."""
    bad = ~np.isfinite(outputs).reshape(len(outputs), -1).all(axis=1)
    if bad.any():
        raise NonFiniteError(
            f"Evaluation produced NaN or inf outputs for {int(bad.sum())} of {len(outputs)} examples; no metric is "
            f"reported. The adapter or the base model holds non-finite values, or data.max_length exceeds the model."
        )


def set_head_bias(params, value: float):
    """``params`` with the regression head's output bias (the one ``(1,)`` bias under ``classifier``:
    BERT's ``classifier/bias``, RoBERTa's ``classifier/out_proj/bias``) set to ``value``."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(params)
    found = [k for k, v in flat.items() if k[0] == "classifier" and k[-1] == "bias" and np.shape(v) == (1,)]
    if len(found) != 1:
        raise ConfigError(f"model.head_bias=label_mean needs a regression head with one output bias under "
                          f"'classifier'; found {['/'.join(k) for k in found] or 'none'}. It applies to regression "
                          f"tasks (stsb); remove it for this task.")
    flat[found[0]] = jnp.full_like(flat[found[0]], value)
    return unflatten_dict(flat)
