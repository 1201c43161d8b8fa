"""Retrieval mAP (copairs) against a NumPy restatement of average precision."""

import numpy as np
import pandas as pd
import pytest

from jaxadapt.data.schema import SiteTable
from jaxadapt.eval import retrieval


def _ap(query, positives, negatives, feats):
    """AP of one query: partners ranked by cosine similarity, mean precision at each hit."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    partners = np.array(list(positives) + list(negatives))
    rel = np.array([1] * len(positives) + [0] * len(negatives))
    order = np.argsort(-(unit[partners] @ unit[query]), kind="stable")
    hits = rel[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def _world(seed=0, plates=3, compounds=("A", "B", "C"), wells=2, dmso=3, d=6):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(plates):
        for c_i, c in enumerate(compounds):
            rows += [(f"p{p}", f"{c}{w}", c, c_i % 2, False) for w in range(wells)]
        rows += [(f"p{p}", f"D{w}", "DMSO", -1, True) for w in range(dmso)]
    meta = pd.DataFrame(rows, columns=["plate", "well", "compound", "label", "is_control"])
    return meta, rng.normal(size=(len(meta), d))


def _reference(meta, feats, *, moa):
    """The mAP rules of the module docstring, restated with loops."""
    per_group = {}
    for q in range(len(meta)):
        m = meta.iloc[q]
        if m.is_control:
            continue
        key = "label" if moa else "compound"
        pos = [j for j in range(len(meta)) if j != q and not meta.is_control[j]
               and meta[key][j] == m[key] and meta.plate[j] != m.plate]
        if moa:
            neg = [j for j in range(len(meta)) if not meta.is_control[j]
                   and meta.label[j] != m.label]
        else:
            neg = [j for j in range(len(meta)) if meta.is_control[j] and meta.plate[j] == m.plate]
        if pos and neg:
            per_group.setdefault(m[key], []).append(_ap(q, pos, neg, feats))
    return np.mean([np.mean(v) for v in per_group.values()])


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_numpy_average_precision(seed):
    meta, feats = _world(seed)
    assert retrieval.replicate_map(meta, feats) == pytest.approx(_reference(meta, feats, moa=False),
                                                                 abs=1e-6)
    assert retrieval.moa_map(meta, feats) == pytest.approx(_reference(meta, feats, moa=True),
                                                           abs=1e-6)


def test_known_answers():
    meta, _ = _world(plates=2, compounds=("A", "B"), wells=1, dmso=2, d=3)
    # Compounds point along their own axis on every plate, DMSO along the third: perfect.
    axis = {"A": 0, "B": 1, "DMSO": 2}
    feats = np.eye(3)[[axis[c] for c in meta.compound]] + 0.01 * np.arange(len(meta))[:, None]
    assert retrieval.replicate_map(meta, feats) == pytest.approx(1.0)
    assert retrieval.moa_map(meta, feats) == pytest.approx(1.0)
    # A plate effect larger than the compound signal: each well's nearest partner is its
    # own plate's DMSO (2 negatives ranked above the single positive: AP = 1/3).
    plate_dir = {"p0": np.array([0, 0, 0, 10.0]), "p1": np.array([0, 0, 0, -10.0])}
    feats4 = np.concatenate([feats, np.zeros((len(meta), 1))], 1) + np.stack(
        [plate_dir[p] for p in meta.plate])
    assert retrieval.replicate_map(meta, feats4) == pytest.approx(1 / 3)


def test_well_profiles_average_sites_and_undefined_metrics_are_skipped(caplog):
    table = SiteTable({
        "plate": np.array(["p0", "p0", "p0", "p1"]), "well": np.array(["A01", "A01", "B01", "A01"]),
        "compound": np.array(["X", "X", "DMSO", "X"]), "label": np.array([0, 0, -1, 0], np.int32),
        "is_control": np.array([False, False, True, False]), "source": np.array(["s"] * 4),
        "batch": np.array(["b0", "b0", "b0", "b1"]), "site": np.array([0, 1, 0, 0], np.int32),
        "moa": np.array(["m", "m", "", "m"]),
    })
    emb = np.array([[1.0, 0], [3.0, 2], [0, 5.0], [7.0, 7]])
    meta, feats = retrieval.well_profiles(emb, np.array([0, 1, 2, 3]), table)
    assert list(meta.well) == ["A01", "B01", "A01"] and list(meta.plate) == ["p0", "p0", "p1"]
    np.testing.assert_allclose(feats, [[2.0, 1], [0, 5.0], [7.0, 7]])
    # One compound, one class: map_moa has no negatives and map_replicate no DMSO on p1.
    scores = retrieval.retrieval_scores(emb, np.arange(4), table)
    assert set(scores) == {"map_replicate"} and "map_moa undefined" in caplog.text
    with pytest.raises(ValueError, match="3 embeddings for 4 rows"):
        retrieval.well_profiles(emb[:3], np.arange(4), table)
