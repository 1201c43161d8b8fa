"""Label-shift test units: Dirichlet class mix per batch, rotated counts, balanced mode."""

import numpy as np
import pytest

from jaxadapt.data import sampling as samplers, schema


K = 4


def make_table(per_class=30, plates=("p0", "p1"), n_ctrl=6):
    cols = {k: [] for k in schema.SITE_FIELDS}
    for p in plates:
        for c in range(K):
            for i in range(per_class):
                cols["label"].append(c)
                cols["is_control"].append(False)
                cols["plate"].append(p)
        for i in range(n_ctrl):
            cols["label"].append(-1)
            cols["is_control"].append(True)
            cols["plate"].append(p)
    n = len(cols["label"])
    table = schema.SiteTable({
        "source": np.array(["s"] * n), "batch": np.array(["b"] * n),
        "plate": np.array(cols["plate"]), "well": np.array([f"W{i}" for i in range(n)]),
        "site": np.zeros(n, np.int64),
        "compound": np.where(cols["is_control"], schema.DMSO, "c"),
        "moa": np.array([""] * n), "label": np.array(cols["label"], np.int64),
        "is_control": np.array(cols["is_control"]),
    })
    return table


def _hists(table, unit):
    return np.stack([np.bincount(table["label"][b], minlength=K) for b in unit.rows])


def test_batches_follow_rotated_multinomial_counts():
    table = make_table()
    rows = np.arange(len(table))
    units = samplers.label_shift_units(table, rows, alpha=0.5, batch_size=16, num_classes=K,
                                       seed=3)
    assert [u.name for u in units] == ["p0", "p1"]
    for u in units:
        assert u.rows.shape == (K, 16) and u.mask.all()
        assert (table["plate"][u.rows] == u.name).all()
        assert not table["is_control"][u.rows].any()
        h = _hists(table, u)
        for k in range(K):
            np.testing.assert_array_equal(h[k], np.roll(h[0], k))
        np.testing.assert_array_equal(h.sum(0), np.full(K, 16))  # balanced over the unit
        assert len(u.control_rows) == 6 and table["is_control"][u.control_rows].all()
        for b in u.rows:  # a class with enough rows is drawn without replacement
            assert len(np.unique(b)) == len(b)
    again = samplers.label_shift_units(table, rows[::-1], alpha=0.5, batch_size=16,
                                       num_classes=K, seed=3)
    np.testing.assert_array_equal(units[1].rows, again[1].rows)


def test_skew_grows_as_alpha_shrinks():
    table = make_table(plates=tuple(f"p{i}" for i in range(12)))
    rows = np.arange(len(table))

    def top_share(alpha):
        us = samplers.label_shift_units(table, rows, alpha=alpha, batch_size=16,
                                        num_classes=K, seed=0)
        return np.mean([_hists(table, u).max(1).mean() / 16 for u in us])

    shares = [top_share(a) for a in (0.01, 1.0, 100.0)]
    assert shares[0] > 0.9  # alpha = 0.01: batches mostly one class
    assert shares[0] > shares[1] > shares[2]
    assert shares[2] < 0.45  # nearly balanced (0.25 exactly balanced)


def test_small_classes_taken_whole_never_resampled_and_counted():
    # Every class (3 rows) is smaller than L = 20: the reference takes "up to n_c".
    table = make_table(per_class=3, plates=("p0",))
    u, = samplers.label_shift_units(table, np.arange(len(table)), alpha=0.01,
                                    batch_size=20, num_classes=K, seed=1)
    assert u.rows.shape == (K, 20)
    for b, m in zip(u.rows, u.mask):
        real = b[m]
        assert len(np.unique(real)) == len(real)  # no row twice in a batch
        assert 3 <= len(real) <= 12  # at most the whole of every class
    assert u.short_batches == K  # every batch came out short of L
    # A batch asks for at most what a class holds when pools are big enough: none short.
    table = make_table(per_class=30, plates=("p0",))
    big, = samplers.label_shift_units(table, np.arange(len(table)), alpha=0.01,
                                      batch_size=20, num_classes=K, seed=1)
    assert big.short_batches == 0 and big.mask.all()


def test_short_batch_holds_whole_pool_of_the_dominant_class():
    table = make_table(per_class=5, plates=("p0",))
    rows = np.arange(len(table))
    u, = samplers.label_shift_units(table, rows, alpha=1e-3, batch_size=16, num_classes=K,
                                    seed=2)
    for b, m in zip(u.rows, u.mask):
        labels, counts = np.unique(table["label"][b[m]], return_counts=True)
        # alpha 1e-3: one class asks for (nearly) all 16 rows and gets its whole pool of 5.
        assert counts.max() == 5
    assert u.short_batches == K


def test_draws_differ_per_replicate_seed_and_repeat_per_seed():
    table = make_table()
    rows = np.arange(len(table))

    def draw(seed):
        return samplers.label_shift_units(table, rows, alpha=0.5, batch_size=16,
                                          num_classes=K, seed=seed)[0].rows

    np.testing.assert_array_equal(draw((0, 1)), draw((0, 1)))
    assert not np.array_equal(draw((0, 1)), draw((0, 2)))
    np.testing.assert_array_equal(draw(7), draw((7,)))  # an int is the 1-word sequence


def test_balanced_mode_covers_every_row_once():
    table = make_table(per_class=7)
    rows = np.arange(len(table))
    units = samplers.label_shift_units(table, rows, alpha=None, batch_size=8,
                                       num_classes=K, seed=0)
    ref = samplers.eval_units(table, rows, batch_size=8, seed=0)
    for u, r in zip(units, ref):
        np.testing.assert_array_equal(u.rows, r.rows)
        real = u.rows[u.mask]
        assert len(real) == K * 7 and len(np.unique(real)) == K * 7


def test_bad_alpha_rejected():
    table = make_table(per_class=2, plates=("p0",))
    with pytest.raises(ValueError, match="alpha"):
        samplers.label_shift_units(table, np.arange(len(table)), alpha=0.0, batch_size=4,
                                   num_classes=K, seed=0)
