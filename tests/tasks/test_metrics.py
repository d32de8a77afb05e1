"""Metrics against independent references (scipy, hand-worked confusion matrices)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from decomp_jax.tasks import metrics

# Confusion matrix of PREDS vs LABELS (class 1 positive), counted by hand:
#   index:  0 1 2 3 4 5 6 7 8 9
#   preds:  1 1 1 0 0 0 1 0 1 0
#   labels: 1 1 0 0 1 0 1 0 0 0
#   tp = {0,1,6} = 3, fp = {2,8} = 2, fn = {4} = 1, tn = {3,5,7,9} = 4
PREDS = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 0])
LABELS = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0])


def test_accuracy_counts_matches():
    # 7 of 10 agree (tp + tn = 3 + 4).
    assert metrics.accuracy(PREDS, LABELS) == pytest.approx(0.7)
    assert isinstance(metrics.accuracy(PREDS, LABELS), float)


def test_f1_from_confusion_counts():
    # precision = 3/5, recall = 3/4, F1 = 2*3 / (2*3 + 2 + 1) = 6/9.
    assert metrics.f1(PREDS, LABELS) == pytest.approx(6 / 9)
    p, r = 3 / 5, 3 / 4
    assert metrics.f1(PREDS, LABELS) == pytest.approx(2 * p * r / (p + r))


def test_f1_no_positives_is_zero():
    assert metrics.f1(np.zeros(4, int), np.zeros(4, int)) == 0.0


def test_mcc_from_confusion_counts():
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (12 - 2) / sqrt(5*4*6*5) = 10 / sqrt(600).
    assert metrics.matthews_corrcoef(PREDS, LABELS) == pytest.approx(10 / math.sqrt(600))


def test_mcc_perfect_and_inverted():
    y = np.array([0, 1, 1, 0, 1])
    assert metrics.matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)


@pytest.mark.parametrize("preds", [np.ones(6, int), np.zeros(6, int)])
def test_mcc_degenerate_returns_zero(preds):
    labels = np.array([0, 1, 0, 1, 1, 0])
    assert metrics.matthews_corrcoef(preds, labels) == 0.0


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)


def test_pearson_constant_input_is_zero():
    assert metrics.pearson(np.ones(5), np.arange(5.0)) == 0.0


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=300).astype(float)  # many ties
    y = np.round(x + rng.normal(size=300), 1)
    y[:20] = 2.5  # a large tie block in y
    expected = scipy.stats.spearmanr(x, y)[0]
    assert metrics.spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_small_hand_example():
    # Ranks of x = [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; y is monotone in x -> same ranks -> 1.0.
    assert metrics.spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
    assert metrics.average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="must match"):
        metrics.accuracy(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize(
    "task, keys",
    [
        ("sst2", {"accuracy"}),
        ("SST-2", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("cola", {"matthews_corrcoef", "accuracy"}),
    ],
)
def test_compute_metrics_classification_uses_argmax(task, keys):
    # Logits whose argmax is PREDS.
    logits = np.stack([1.0 - PREDS, PREDS.astype(float)], axis=1) * 2.0 - 0.3
    out = metrics.compute_metrics(task, logits, LABELS)
    assert set(out) == keys
    assert all(isinstance(v, float) for v in out.values())
    assert out["accuracy"] == pytest.approx(0.7)
    if "f1" in out:
        assert out["f1"] == pytest.approx(6 / 9)
    if "matthews_corrcoef" in out:
        assert out["matthews_corrcoef"] == pytest.approx(10 / math.sqrt(600))


@pytest.mark.parametrize("shape", [(50,), (50, 1)])
def test_compute_metrics_regression(shape):
    rng = np.random.default_rng(2)
    labels = rng.uniform(0, 5, size=50).astype(np.float32)
    preds = (labels + rng.normal(size=50)).reshape(shape)
    out = metrics.compute_metrics("stsb", preds, labels)
    assert set(out) == {"pearson", "spearman"}
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(preds.ravel(), labels)[0], abs=1e-6)
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(preds.ravel(), labels)[0], abs=1e-6)


def test_compute_metrics_errors():
    with pytest.raises(ValueError, match="Known tasks"):
        metrics.compute_metrics("wnli", np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, 1\)"):
        metrics.compute_metrics("stsb", np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="must match"):
        metrics.compute_metrics("sst2", np.zeros((3, 2)), np.zeros(2))
