"""Tests of the index samplers: determinism, design properties, padding, errors."""


import numpy as np
import pytest

from jaxadapt.data import sampling as samplers, schema


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


def test_process_shares_are_contiguous_and_concatenate_to_the_global_batch():
    index = np.arange(3 * 12).reshape(3, 12)
    shares = [samplers.process_share(index, p, 3, local_devices=2) for p in range(3)]
    assert [first for _, first in shares] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([s for s, _ in shares], axis=1), index)
    # One process: the whole batch.
    whole, first = samplers.process_share(index, 0, 1, local_devices=4)
    assert first == 0 and whole is not None
    np.testing.assert_array_equal(whole, index)


def test_process_shares_keep_episodes_whole():
    E, width = 4, 6  # 4 episodes of L + N = 6 rows, flat
    index = np.arange(2 * E * width).reshape(2, E * width)
    local, first = samplers.process_share(index, 1, 2, group=width)
    assert first == 2 * width
    np.testing.assert_array_equal(local.reshape(2, 2, width),
                                  index.reshape(2, E, width)[:, 2:])


def test_batch_that_does_not_split_over_processes_names_both_numbers():
    index = np.zeros((1, 12), np.int64)
    with pytest.raises(ValueError) as err:
        samplers.process_share(index, 0, 2, local_devices=4, field="config.train.batch_size")
    msg = str(err.value)
    for part in ("config.train.batch_size=12", "2 processes", "4 devices per process",
                 "multiple of 8", "--config.train.batch_size=8"):
        assert part in msg, msg
    with pytest.raises(ValueError, match=r"episodes_per_step=3 \(episodes\) does not split "
                                         r"over 2 processes x 1 devices"):
        samplers.process_share(np.zeros((1, 18), np.int64), 0, 2, group=6,
                               field="config.arm.episodes_per_step")
    with pytest.raises(ValueError, match="not a multiple of group=4"):
        samplers.process_share(np.zeros((1, 18), np.int64), 0, 2, group=4)
    with pytest.raises(ValueError, match=r"process_index=2 must lie in \[0, 2\)"):
        samplers.process_share(np.zeros((1, 4), np.int64), 2, 2)


def test_one_process_message_speaks_of_local_devices_only():
    with pytest.raises(ValueError) as err:
        samplers.check_process_split(12, "config.train.batch_size", process_count=1,
                                     local_devices=8)
    assert str(err.value) == ("config.train.batch_size=12 is not a multiple of the 8 local "
                              "devices; set it to a multiple of 8, e.g. "
                              "--config.train.batch_size=8")
    with pytest.raises(ValueError, match=r"e\.g\. --config.train.batch_size=8,"):
        samplers.check_process_split(4, "config.train.batch_size", process_count=2,
                                     local_devices=4)  # below one per device: suggest 8
    samplers.check_process_split(16, "x", process_count=2, local_devices=4)  # fine
