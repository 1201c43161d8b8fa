"""Classification metrics from mergeable confusion matrices.

A confusion matrix is a sufficient statistic for accuracy and macro-F1: matrices of
units, devices or hosts add exactly, so a split's metric never depends on how its
samples were batched (the same idea as clu.metrics' mergeable state).
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "macro_f1")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class) pairs.

    Args:
      labels: int array [n] of true classes in [0, num_classes).
      predictions: int array [n] of predicted classes in [0, num_classes).
      num_classes: number of classes K.

    Returns:
      int64 array [K, K]; entry [i, j] counts samples of class i predicted as j.

    Raises:
      ValueError: on mismatched lengths or a class outside [0, K).
    """
    labels = np.asarray(labels, np.int64).ravel()
    predictions = np.asarray(predictions, np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels ({labels.shape[0]}) and predictions ({predictions.shape[0]}) differ in "
            "length; pass one prediction per labelled sample (drop padding with the mask first)"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise ValueError(
                f"{name} hold {values[bad][0]} outside [0, {num_classes}); controls "
                "(label -1) and padding must be masked out before scoring"
            )
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def accuracy(cm: np.ndarray) -> float:
    """Fraction of samples on the diagonal of confusion matrix `cm`.

    Args:
      cm: confusion matrix [K, K].

    Returns:
      Accuracy in [0, 1].

    Raises:
      ValueError: if `cm` holds no sample.
    """
    total = cm.sum()
    if total == 0:
        raise ValueError("accuracy of an empty confusion matrix: the split has no labelled sample")
    return float(np.trace(cm) / total)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 score of each class; NaN for a class absent from both labels and predictions.

    Args:
      cm: confusion matrix [K, K].

    Returns:
      float array [K].
    """
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    denominator = (support + predicted).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over classes seen in labels or predictions.

    This matches scikit-learn's `f1_score(average="macro")` with its default labels.

    Args:
      cm: confusion matrix [K, K].

    Returns:
      Macro-F1 in [0, 1].
    """
    f1 = per_class_f1(cm)
    if np.all(np.isnan(f1)):
        raise ValueError("macro-F1 of an empty confusion matrix: the split has no labelled sample")
    return float(np.nanmean(f1))


def scores(cm: np.ndarray) -> dict[str, float]:
    """All metrics of `METRICS` from one confusion matrix."""
    return {"accuracy": accuracy(cm), "macro_f1": macro_f1(cm)}
