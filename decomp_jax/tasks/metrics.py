"""Evaluation metrics for GLUE-style tasks, in plain NumPy.

Every function returns a Python ``float``. Binary metrics treat class 1 as positive.
"""

from __future__ import annotations

import numpy as np

from decomp_jax.data.glue import get_task

__all__ = [
    "accuracy",
    "f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "TASK_METRICS",
    "compute_metrics",
]

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "rte": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "cola": ("matthews_corrcoef", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "qqp": ("accuracy", "f1"),
}


def _pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten two arrays and check they are non-empty and the same length."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} has {a.size} values but {names[1]} has {b.size}; they must match.")
    if a.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty; metrics need at least one value.")
    return a, b


def _confusion(preds: np.ndarray, labels: np.ndarray) -> tuple[int, int, int, int]:
    """Binary confusion counts ``(tp, fp, fn, tn)`` with class 1 as positive."""
    p, y = _pair(preds, labels, ("preds", "labels"))
    p, y = p == 1, y == 1
    return (int(np.sum(p & y)), int(np.sum(p & ~y)), int(np.sum(~p & y)), int(np.sum(~p & ~y)))


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _pair(preds, labels, ("preds", "labels"))
    return float(np.mean(p == y))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1: ``2tp / (2tp + fp + fn)``; 0.0 when there are no positives at all."""
    tp, fp, fn, _ = _confusion(preds, labels)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary Matthews correlation; 0.0 when any confusion-matrix margin is empty."""
    tp, fp, fn, tn = _confusion(preds, labels)
    denom = float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
    if denom == 0.0:
        return 0.0
    return float((float(tp) * tn - float(fp) * fn) / np.sqrt(denom))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either input is constant (correlation undefined)."""
    a, b = _pair(x, y, ("x", "y"))
    a = a.astype(np.float64) - a.mean(dtype=np.float64)
    b = b.astype(np.float64) - b.mean(dtype=np.float64)
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts_group = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], x.size)  # exclusive
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties averaged)."""
    a, b = _pair(x, y, ("x", "y"))
    return pearson(average_ranks(a), average_ranks(b))


def _class_predictions(predictions: np.ndarray) -> np.ndarray:
    """Class ids from logits ``(n, num_labels)`` (argmax) or from integer ids ``(n,)``."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        return np.argmax(predictions, axis=-1)
    if predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
        return predictions
    raise ValueError(f"Classification predictions must be logits of shape (n, num_labels) or integer "
                     f"class ids of shape (n,); got shape {predictions.shape} dtype {predictions.dtype}.")


def _regression_predictions(predictions: np.ndarray) -> np.ndarray:
    """Scores from ``(n,)`` or ``(n, 1)`` predictions."""
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim == 1 or (predictions.ndim == 2 and predictions.shape[1] == 1):
        return predictions.reshape(-1)
    raise ValueError(f"Regression predictions must have shape (n,) or (n, 1); got {predictions.shape}.")


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics for a GLUE task from model outputs.

    - Classification: ``predictions`` are logits ``(n, num_labels)`` (argmax taken).
    - Regression (stsb): ``predictions`` are ``(n,)`` or ``(n, 1)`` scores.
    - Keys: sst2/rte/mnli/qnli accuracy; mrpc/qqp accuracy, f1; cola matthews_corrcoef, accuracy;
      stsb pearson, spearman.
    """
    spec = get_task(task)
    labels = np.asarray(labels).reshape(-1)
    if spec.is_regression:
        preds = _regression_predictions(predictions)
    else:
        preds = _class_predictions(predictions)
    if preds.shape[0] != labels.size:
        raise ValueError(f"Got {preds.shape[0]} predictions for {labels.size} labels; they must match.")
    return {name: float(_METRIC_FNS[name](preds, labels)) for name in TASK_METRICS[spec.name]}
