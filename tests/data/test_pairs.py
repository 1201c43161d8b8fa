"""Tests of cross-batch pairs (jaxadapt.data.pairs)."""

import numpy as np
import pytest

from jaxadapt.data import pairs
from jaxadapt.data.schema import DMSO, NO_LABEL, SiteTable


def make_table(spec):
    """spec: [(source, batch, plate, well, compound)] -> a SiteTable with one site per entry."""
    src, batch, plate, well, comp = (np.array(c) for c in zip(*spec))
    n = len(spec)
    return SiteTable({"source": src, "batch": batch, "plate": plate, "well": well,
                      "site": np.zeros(n, np.int64), "compound": comp, "moa": np.full(n, ""),
                      "label": np.full(n, NO_LABEL), "is_control": comp == DMSO})


def grid_table(n_batches=3, plates_per_batch=2, wells=("A01", "A02", "B01", "B02"), sites=2):
    """Every plate holds compound c<k> in well k (two sites each) and DMSO in the last well."""
    spec = []
    for b in range(n_batches):
        for p in range(plates_per_batch):
            for k, w in enumerate(wells):
                comp = DMSO if k == len(wells) - 1 else f"c{k}"
                spec += [("s1", f"b{b}", f"b{b}p{p}", w, comp)] * sites
    return make_table(spec)


def key(t, field, r):
    return t["source"][r] + "/" + t[field][r] if field == "batch" else t[field][r]


@pytest.mark.parametrize("level", ["plate", "batch"])
def test_partners_share_compound_on_another_plate_or_batch(level):
    t = grid_table()
    rows = np.arange(len(t))
    p, counts = pairs.cross_batch_pairs(t, rows, level=level, seed=0, epoch=0)
    assert p.shape == (len(t), 2) and p.dtype == np.int64
    np.testing.assert_array_equal(p[:, 0], rows)
    assert counts == {"partner": len(t), "same_plate_fallback": 0, "self_fallback": 0}
    np.testing.assert_array_equal(t["compound"][p[:, 0]], t["compound"][p[:, 1]])
    assert np.all(key(t, level, p[:, 0]) != key(t, level, p[:, 1]))
    # DMSO pairs with DMSO of another plate/batch too
    dmso = t["is_control"][p[:, 0]]
    assert dmso.any() and t["is_control"][p[dmso, 1]].all()


def test_partners_are_drawn_uniformly():
    t = grid_table(n_batches=3, plates_per_batch=1, sites=1)
    anchor = 0  # c0 on b0p0; candidates: c0 on b1p0 and on b2p0
    got = [pairs.cross_batch_pairs(t, np.arange(len(t)), seed=1, epoch=e)[0][anchor, 1]
           for e in range(400)]
    cand = np.flatnonzero((t["compound"] == "c0") & (t["plate"] != t["plate"][anchor]))
    assert set(got) == set(cand.tolist())
    share = np.mean(np.array(got) == cand[0])
    assert abs(share - 0.5) < 0.1, share  # binomial sd 0.025 at 400 draws


def test_partners_only_among_given_rows():
    t = grid_table()
    rows = np.flatnonzero(t["batch"] != "b2")
    p, counts = pairs.cross_batch_pairs(t, rows, level="batch", seed=3, epoch=1)
    assert np.isin(p[:, 1], rows).all() and counts["partner"] == len(rows)


def test_fallbacks_are_counted_never_raise():
    spec = [("s1", "b0", "P1", "A01", "c0"), ("s1", "b1", "P2", "A01", "c0"),  # partner
            ("s1", "b0", "P1", "A02", "lonely"), ("s1", "b0", "P1", "A03", "lonely"),  # 1 plate
            ("s1", "b0", "P1", "A04", "twosites"), ("s1", "b0", "P1", "A04", "twosites"),
            ("s1", "b0", "P1", "A05", "single")]  # one image only
    t = make_table(spec)
    p, counts = pairs.cross_batch_pairs(t, np.arange(len(t)), level="plate", seed=0, epoch=0)
    assert counts == {"partner": 2, "same_plate_fallback": 4, "self_fallback": 1}
    assert p[0, 1] == 1 and p[1, 1] == 0
    assert p[2, 1] == 3 and p[3, 1] == 2  # another well of the compound on the same plate
    assert p[4, 1] == 5 and p[5, 1] == 4  # only one well: another site of it
    assert p[6, 1] == 6  # nothing else: the image itself
    assert sum(counts.values()) == len(t)


def test_batch_level_falls_back_inside_the_batch():
    spec = [("s1", "b0", "P1", "A01", "c0"), ("s1", "b0", "P2", "A01", "c0")]  # one batch
    p, counts = pairs.cross_batch_pairs(make_table(spec), np.arange(2), level="batch", seed=0,
                                        epoch=0)
    assert counts == {"partner": 0, "same_plate_fallback": 2, "self_fallback": 0}
    np.testing.assert_array_equal(p[:, 1], [1, 0])
    p, counts = pairs.cross_batch_pairs(make_table(spec), np.arange(2), level="plate", seed=0,
                                        epoch=0)
    assert counts["partner"] == 2


def test_deterministic_per_seed_and_epoch():
    t = grid_table(n_batches=4, plates_per_batch=3)
    rows = np.arange(len(t))
    draw = lambda seed, epoch: pairs.cross_batch_pairs(t, rows, seed=seed, epoch=epoch)[0]
    np.testing.assert_array_equal(draw(0, 5), draw(0, 5))
    assert not np.array_equal(draw(0, 5), draw(0, 6))
    assert not np.array_equal(draw(0, 5), draw(1, 5))


def test_bad_level_raises():
    with pytest.raises(ValueError, match="level='well'.*'plate', 'batch'"):
        pairs.cross_batch_pairs(grid_table(), np.arange(4), level="well", seed=0, epoch=0)


def test_empty_rows_give_no_pairs():
    p, counts = pairs.cross_batch_pairs(grid_table(), np.arange(0), seed=0, epoch=0)
    assert p.shape == (0, 2) and sum(counts.values()) == 0


def test_pair_batches_drop_or_wrap():
    p = np.stack([np.arange(10), np.arange(10) + 100], axis=1)
    b = pairs.pair_batches(p, 4, seed=0, epoch=0)
    assert b.shape == (2, 4, 2)
    np.testing.assert_array_equal(b[..., 1], b[..., 0] + 100)  # pairs stay together
    assert len(np.unique(b[..., 0])) == 8
    w = pairs.pair_batches(p, 4, seed=0, epoch=0, drop_remainder=False)
    assert w.shape == (3, 4, 2) and set(w[..., 0].ravel()) == set(range(10))
    assert not np.array_equal(pairs.pair_batches(p, 4, seed=0, epoch=1), b)
    np.testing.assert_array_equal(pairs.pair_batches(p, 4, seed=0, epoch=0), b)
    with pytest.raises(ValueError, match="shape"):
        pairs.pair_batches(p[:, 0], 4, seed=0, epoch=0)


def test_epoch_pair_batches():
    t = grid_table()
    b, counts = pairs.epoch_pair_batches(t, np.arange(len(t)), 8, level="batch", seed=0, epoch=2)
    assert b.shape == (len(t) // 8, 8, 2) and counts["partner"] == len(t)
    assert np.all(t["compound"][b[..., 0]] == t["compound"][b[..., 1]])
