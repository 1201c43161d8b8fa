"""kNN probe: votes equal a NumPy restatement of DINO's weighted kNN classifier."""

import numpy as np
import pytest

from jaxadapt.methods.coda import knn


def _numpy_votes(q, bank, labels, num_classes, k, t):
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    bn = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    sims = qn @ bn.T
    out = np.zeros((len(q), num_classes))
    for i, row in enumerate(sims):
        top = np.argsort(-row)[:k]
        for j in top:
            out[i, labels[j]] += np.exp(row[j] / t)
    return out


def test_votes_match_numpy_restatement():
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(50, 8)), rng.integers(0, 4, 50)
    q = rng.normal(size=(7, 8))
    b = knn.make_bank(bank, labels, 4)
    got = np.asarray(knn.knn_votes(q, b.features, b.labels, num_classes=4, k=5, temperature=0.07))
    want = _numpy_votes(q, bank, labels, 4, 5, 0.07)
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_k_larger_than_bank_uses_whole_bank_and_separable_classes_are_found():
    centres = np.eye(3, 6) * 5
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 4)
    bank = centres[labels] + rng.normal(scale=0.1, size=(12, 6))
    q = centres + rng.normal(scale=0.1, size=(3, 6))
    b = knn.make_bank(bank, labels, 3)
    votes = np.asarray(knn.knn_votes(q, b.features, b.labels, num_classes=3, k=100))
    assert list(votes.argmax(1)) == [0, 1, 2]


@pytest.mark.parametrize("labels, match", [(np.array([0, 5]), "outside"), (np.array([0]), "shape"),
                                           (np.array([-1, 0]), "unlabelled")])
def test_bad_bank_raises(labels, match):
    with pytest.raises(ValueError, match=match):
        knn.make_bank(np.ones((2, 3)), labels, 3)
