"""Classification metrics: accuracy, balanced accuracy, per-class recall,
one-vs-rest macro AUC and the confusion matrix.

Plain numpy, so the site (evaluation) and the coordinator (reports) compute them
the same way. Every value is an aggregate over a site's validation set; nothing
per case leaves the site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common import wire

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("normal", "cyst", "tumour", "stone")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of cases of true class ``t`` predicted as ``p``."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank statistic (Mann-Whitney U), ties counted as half.

    Returns NaN when either the positives or the negatives are missing.
    """
    scores = np.asarray(scores, float)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, float]:
    """All classification metrics of one validation set, as wire metric keys.

    Parameters
    ----------
    y_true : sequence of int
        True class index per case.
    probs : ndarray, shape (cases, classes)
        Predicted class probabilities; the prediction is the arg-max.
    class_names : sequence of str
        Names in class-index order; they appear in the keys.

    Returns
    -------
    dict
        ``accuracy``; ``balanced-accuracy`` (mean recall over the classes
        present, as scikit-learn defines it); ``recall-<class>`` and the
        per-class AUC behind ``auc-macro`` only for classes with cases (and,
        for AUC, with cases of other classes too), so no value is NaN;
        ``cm-<true>-<pred>`` counts for every pair. Empty input gives only the
        zero confusion counts.
    """
    n = len(class_names)
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float).reshape(len(y), n)
    pred = probs.argmax(1) if len(y) else np.zeros(0, int)
    cm = confusion_matrix(y, pred, n)
    out: dict[str, float] = {
        wire.confusion_key(t, p): float(cm[i, j])
        for i, t in enumerate(class_names)
        for j, p in enumerate(class_names)
    }
    if len(y) == 0:
        return out
    out[wire.ACCURACY] = float(np.trace(cm) / len(y))
    support = cm.sum(1)
    recalls = []
    for i, name in enumerate(class_names):
        if support[i]:
            recalls.append(cm[i, i] / support[i])
            out[wire.recall_key(name)] = float(recalls[-1])
    out[wire.BALANCED_ACCURACY] = float(np.mean(recalls))
    aucs = [binary_auc(probs[:, i], y == i) for i in range(n)]
    aucs = [a for a in aucs if np.isfinite(a)]
    if aucs:
        out[wire.AUC_MACRO] = float(np.mean(aucs))
    return out


def class_weights_from_counts(
    counts: Sequence[int], cap: float = 10.0
) -> tuple[float, ...]:
    """Inverse-frequency class weights, scaled to mean 1 over present classes.

    A class without cases gets weight 1 (it never appears in the loss); the
    ratio between any two weights is capped so that a class with one case does
    not dominate every gradient.
    """
    c = np.asarray(counts, dtype=float)
    present = c > 0
    if not present.any():
        return tuple(1.0 for _ in c)
    w = np.ones_like(c)
    w[present] = c[present].sum() / (present.sum() * c[present])
    w[present] = np.clip(w[present], w[present].min(), w[present].min() * cap)
    w[present] /= w[present].mean()
    return tuple(float(x) for x in w)
