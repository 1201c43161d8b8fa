"""Tests of jaxadapt.data.subsets: which rows of a unit a method adapts on."""

import numpy as np
import pytest
from tests.data.test_splits import make_table

from jaxadapt.data import sampling as samplers, subsets


def _source_unit(t):
    rows = np.flatnonzero(t["source"] == "s0")
    (unit,) = samplers.eval_units(t, rows, unit="source", batch_size=8, seed=0)
    return rows, unit


def test_first_plate_and_named_subsets_select_their_rows():
    t = make_table(n_sources=1, n_batches=2, n_plates=2)
    rows, unit = _source_unit(t)
    assert subsets.adaptation_unit(t, unit, "unit", 8) is None
    sub = subsets.adaptation_unit(t, unit, "first_plate", 5)
    real = sub.rows[sub.mask]
    want = rows[(t["plate"][rows] == "s0b0p0") & ~t["is_control"][rows]]
    assert sub.name == "s0@s0b0p0" and sub.rows.shape[1] == 5
    np.testing.assert_array_equal(np.sort(real), want)  # each perturbed row once
    want_controls = rows[(t["plate"][rows] == "s0b0p0") & t["is_control"][rows]]
    assert len(want_controls) > 0
    np.testing.assert_array_equal(sub.control_rows, want_controls)
    # The scored unit's order is kept (its shuffled order, restricted to the plate).
    order = unit.rows[unit.mask]
    np.testing.assert_array_equal(real, order[t["plate"][order] == "s0b0p0"])
    batch = subsets.adaptation_unit(t, unit, "first_batch", 8)
    assert set(t["batch"][batch.rows[batch.mask]]) == {"s0b0"}
    assert len(batch.rows[batch.mask]) == 2 * len(real)  # both plates of batch s0b0
    named = subsets.adaptation_unit(t, unit, "plate:s0b1p1", 8)
    assert set(t["plate"][named.rows[named.mask]]) == {"s0b1p1"}


def test_unknown_subsets_name_the_valid_ones():
    t = make_table(n_sources=1, n_batches=2, n_plates=2)
    _, unit = _source_unit(t)
    with pytest.raises(ValueError, match=r"unit 's0' has no plate 'p9'; its plates: "
                                         r"\['s0b0p0', 's0b0p1', 's0b1p0', 's0b1p1'\]"):
        subsets.adaptation_unit(t, unit, "plate:p9", 8)
    for bad in ("second_plate", "plate:", "well:w1"):
        with pytest.raises(ValueError, match=r"use one of \('unit', 'first_plate', 'first_batch'\)"):
            subsets.adaptation_unit(t, unit, bad, 8)


def test_with_adaptation_attaches_a_subset_per_unit():
    t = make_table(n_sources=2, n_batches=2, n_plates=2)
    units = samplers.eval_units(t, np.arange(len(t)), unit="source", batch_size=8, seed=0)
    assert subsets.with_adaptation(t, units, "unit", 8) == units
    out = subsets.with_adaptation(t, units, "first_plate", 8)
    assert [u.adaptation.name for u in out] == ["s0@s0b0p0", "s1@s1b0p0"]
    for u, v in zip(units, out):
        np.testing.assert_array_equal(u.rows, v.rows)  # scoring rows unchanged
