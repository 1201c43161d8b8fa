"""Tests of the index samplers: determinism, design properties, padding, errors."""


import numpy as np
import pytest

from jaxadapt.data import samplers, schema


def make_table(plates=("pA", "pB", "pC"), n_pert=(10, 3, 40), n_ctrl=(6, 2, 0)):
    """Plates with given perturbed/control counts; batch = plate name's batch."""
    cols = {k: [] for k in schema.SITE_FIELDS}
    for i, (p, npert, nctrl) in enumerate(zip(plates, n_pert, n_ctrl)):
        for j in range(npert + nctrl):
            ctrl = j >= npert
            vals = ("s0" if i < 2 else "s1", f"b{i // 2}", p, f"W{j:02d}", 0,
                    schema.DMSO if ctrl else f"c{j % 3}", "", -1 if ctrl else j % 3, ctrl)
            for k, v in zip(cols, vals):
                cols[k].append(v)
    return schema.SiteTable({k: np.array(v) for k, v in cols.items()})


def test_mixed_batches_permutation_and_determinism():
    rows = np.arange(5, 105)
    a = samplers.mixed_batches(rows, 10, seed=1, epoch=0)
    assert a.shape == (10, 10) and a.dtype == np.int64
    np.testing.assert_array_equal(np.sort(a.ravel()), rows)
    np.testing.assert_array_equal(a, samplers.mixed_batches(rows, 10, seed=1, epoch=0))
    assert not np.array_equal(a, samplers.mixed_batches(rows, 10, seed=1, epoch=1))
    d = samplers.mixed_batches(rows, 30, seed=1, epoch=0)
    assert d.shape == (3, 30) and len(np.unique(d)) == 90
    w = samplers.mixed_batches(rows, 30, seed=1, epoch=0, drop_remainder=False)
    assert w.shape == (4, 30) and set(w.ravel()) == set(rows)
    with pytest.raises(ValueError, match="batch_size=200"):
        samplers.mixed_batches(rows, 200, seed=1, epoch=0)


def test_plate_episodes_properties():
    t = make_table()
    rows = np.arange(len(t))
    kw = dict(n_perturbed=4, n_controls=5, n_episodes=50, seed=0,
              on_missing_controls="skip")
    ep = samplers.plate_episodes(t, rows, step=7, **kw)
    assert ep.rows.shape == (50, 9) and ep.is_control.shape == (50, 9) and ep.plate.shape == (50,)
    assert set(ep.plate) == {"pA", "pB"}  # pC has no controls -> skipped
    for r, c, p in zip(ep.rows, ep.is_control, ep.plate):
        assert (t["plate"][r] == p).all()  # single plate
        np.testing.assert_array_equal(t["is_control"][r], c)
        assert (~c[:4]).all() and c[4:].all()  # perturbed first, then controls
        n_unique_pert, n_unique_ctrl = len(set(r[:4])), len(set(r[4:]))
        if p == "pA":  # 10 perturbed, 6 controls: without replacement
            assert n_unique_pert == 4 and n_unique_ctrl == 5
        else:  # 3 perturbed, 2 controls: replacement needed
            assert n_unique_pert <= 3 and n_unique_ctrl <= 2
    again = samplers.plate_episodes(t, rows, step=7, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(ep, again))
    sampler = samplers.make_episode_sampler(t, rows, **{k: v for k, v in kw.items()})
    for step in (3, 7, 1):  # order of calls does not matter
        np.testing.assert_array_equal(
            sampler(step).rows, samplers.plate_episodes(t, rows, step=step, **kw).rows)
    assert not np.array_equal(sampler(8).rows, ep.rows)


def test_plate_episodes_uniform_over_plates():
    t = make_table(plates=("pA", "pB"), n_pert=(100, 5), n_ctrl=(5, 5))
    ep = samplers.plate_episodes(t, np.arange(len(t)), n_perturbed=2, n_controls=1,
                                 n_episodes=2000, seed=0, step=0)
    assert abs((ep.plate == "pA").mean() - 0.5) < 0.05  # by plate, not by row count


def test_plate_episodes_missing_controls_raises():
    t = make_table()
    with pytest.raises(ValueError, match="plate 'pC'.*on_missing_controls='skip'"):
        samplers.plate_episodes(t, np.arange(len(t)), n_perturbed=2, n_controls=2,
                                n_episodes=2, seed=0, step=0)
    ep = samplers.plate_episodes(t, np.arange(len(t)), n_perturbed=2, n_controls=0,
                                 n_episodes=20, seed=0, step=0)
    assert ep.rows.shape == (20, 2) and "pC" in set(ep.plate)


@pytest.mark.parametrize("unit", ["plate", "batch", "source"])
def test_eval_units_cover_each_row_once(unit):
    t = make_table()
    rows = np.arange(len(t))
    units = samplers.eval_units(t, rows, unit=unit, batch_size=4)
    names = [u.name for u in units]
    assert names == sorted(set(t[unit]))
    seen = np.concatenate([u.rows[u.mask] for u in units])
    pert = rows[~t["is_control"]]
    np.testing.assert_array_equal(np.sort(seen), pert)  # each perturbed row once
    for u in units:
        assert u.rows.shape == u.mask.shape and u.rows.shape[1] == 4
        assert u.mask[:-1].all() and u.mask[-1, 0]  # only the tail is padding
        assert (t[unit][u.rows] == u.name).all()  # padding repeats rows of the unit
        np.testing.assert_array_equal(
            u.control_rows, rows[t["is_control"] & (t[unit] == u.name)])
    by = {u.name: u for u in units}
    if unit == "plate":
        assert by["pB"].rows.shape == (1, 4) and by["pB"].mask.sum() == 3
        assert len(by["pC"].control_rows) == 0
    again = samplers.eval_units(t, rows, unit=unit, batch_size=4)
    assert all(np.array_equal(a.rows, b.rows) for a, b in zip(units, again))


def test_eval_units_shuffle_mixes_classes():
    t = make_table(plates=("pA",), n_pert=(60,), n_ctrl=(0,))
    t = t.take(np.argsort(t["label"], kind="stable"))  # rows sorted by class
    u = samplers.eval_units(t, np.arange(len(t)), unit="plate", batch_size=20)[0]
    assert all(len(set(t["label"][r])) > 1 for r in u.rows)
    plain = samplers.eval_units(t, np.arange(len(t)), unit="plate", batch_size=20, seed=None)[0]
    assert all(len(set(t["label"][r])) == 1 for r in plain.rows)


def test_bad_inputs():
    t = make_table()
    with pytest.raises(ValueError, match="unit='well'"):
        samplers.eval_units(t, np.arange(3), unit="well", batch_size=2)
    with pytest.raises(ValueError, match="1-D integer"):
        samplers.mixed_batches(np.ones(5, bool), 2, seed=0, epoch=0)
    np.testing.assert_array_equal(samplers.label_counts(t, np.arange(len(t)), 4),
                                  np.bincount(t["label"][t["label"] >= 0], minlength=4))


def test_unlabelled_treated_rows_are_neither_units_nor_episodes():
    t = make_table(plates=("pA",), n_pert=(12,), n_ctrl=(4,))
    labels = t["label"].copy()
    labels[:3] = -1  # treated images of compounds without a class (TARGET2 without one MoA)
    t = schema.SiteTable({**{k: t[k] for k in schema.SITE_FIELDS}, "label": labels})
    rows = np.arange(len(t))
    pert = samplers.group_rows(t, rows, "plate", False)["pA"]
    np.testing.assert_array_equal(pert, np.arange(3, 12))
    np.testing.assert_array_equal(samplers.group_rows(t, rows, "plate", True)["pA"],
                                  np.arange(12, 16))
    (unit,) = samplers.eval_units(t, rows, batch_size=4)
    assert set(unit.rows[unit.mask]) == set(range(3, 12))
