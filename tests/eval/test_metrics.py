import numpy as np
import pytest

from jaxadapt.eval import metrics


def _reference_macro_f1(y, p, k):
    """Restatement of macro-F1 over the classes present in y or p."""
    f1s = []
    for c in range(k):
        tp = np.sum((y == c) & (p == c))
        fp = np.sum((y != c) & (p == c))
        fn = np.sum((y == c) & (p != c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return np.mean(f1s)


def test_metrics_match_reference_formulas():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 6, 500))
    p[p == 5] = 4  # class 5 never predicted: its F1 counts as 0, not skipped
    cm = metrics.confusion_matrix(y, p, 8)  # classes 6, 7 absent everywhere: skipped
    assert metrics.accuracy(cm) == pytest.approx(np.mean(y == p))
    assert metrics.macro_f1(cm) == pytest.approx(_reference_macro_f1(y, p, 8))


def test_confusion_matrices_merge_exactly():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    joint = metrics.confusion_matrix(y, p, 4)
    parts = metrics.confusion_matrix(y[:37], p[:37], 4) + metrics.confusion_matrix(y[37:], p[37:], 4)
    np.testing.assert_array_equal(joint, parts)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="label -1"):
        metrics.confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.confusion_matrix(np.array([0, 1]), np.array([0]), 3)
    with pytest.raises(ValueError, match="no labelled sample"):
        metrics.accuracy(np.zeros((3, 3), np.int64))
