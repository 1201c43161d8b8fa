"""Tests of the simulator's biology (penetrance, heterogeneity) and of the calibration
statistics, against direct NumPy restatements."""

import numpy as np
import pytest

from jaxadapt.data.sim import design, calibration, effects as sim_effects, render as sim_render, simulator


def small_cfg(**biology):
    cfg = design.default_sim_config()
    cfg.sources = ("source_3",)
    cfg.batches_per_source, cfg.plates_per_batch, cfg.sites_per_well = 3, 2, 2
    cfg.image_size = 48
    for k, v in biology.items():
        cfg.biology[k] = v
    return cfg


@pytest.fixture(scope="module")
def wells():
    return calibration.measure_simulator(small_cfg())


def test_count_spreads_match_a_direct_computation():
    rng = np.random.default_rng(0)
    batch = np.repeat(["b0", "b1", "b2"], 40)
    plate = np.repeat([f"p{i}" for i in range(6)], 20)
    ctrl = np.tile(np.arange(20) < 8, 6)
    count = rng.integers(500, 3000, size=120)
    got = calibration.count_spreads(batch, plate, ctrl, count)
    lc = np.log(count)
    per_plate = [lc[(plate == p) & ctrl] for p in np.unique(plate)]
    assert got["well_sd"] == pytest.approx(np.median([np.std(v, ddof=1) for v in per_plate]))
    med = np.array([np.median(v) for v in per_plate]).reshape(3, 2)
    assert got["plate_sd"] == pytest.approx(np.median(np.std(med, axis=1, ddof=1)))
    assert got["batch_sd"] == pytest.approx(np.std(med.mean(1), ddof=1))


def test_dmso_z_and_family_distance():
    x = np.array([[1.0, 10.0], [3.0, 14.0], [2.0, 12.0], [8.0, 12.0]])
    ctrl = np.array([True, True, True, False])
    z = calibration.dmso_z(x, ctrl)
    np.testing.assert_allclose(z, [[6.0, 0.0]])  # (8 - 2) / sd(1,3,2)=1; (12-12)/2
    d = calibration.family_distance(z, ["Cells_AreaShape_X", "Cells_Intensity_Y"], ("Cells_",))
    np.testing.assert_allclose(d, [3.0])
    with pytest.raises(ValueError, match="Nuclei_"):
        calibration.family_distance(z, ["Cells_AreaShape_X", "Cells_Intensity_Y"], ("Nuclei_",))


def test_real_tables_load():
    real = calibration.real_counts()
    assert len(np.unique(real["plate"])) == 136 and len(np.unique(real["batch"])) == 5
    assert real["is_control"].sum() > 3000 and real["count"].min() >= 0
    x, ctrl, names = calibration.real_profiles()
    assert x.shape == (384, 454) and ctrl.sum() == 24 and len(names) == 454
    cells = calibration.real_cells()
    assert np.sum(cells["object"] == "Cells") == 89 + 36


def test_sim_heterogeneity_is_calibrated_to_real_cells(wells):
    # The knobs are set from the real per-cell table: the simulator's DMSO cells must
    # reproduce its spreads of areas within 25 % (measured, not assumed).
    names = list(sim_render.CELL_FEATURES)
    ctrl = wells.is_control[wells.cell_well]
    real = calibration.real_cells()
    for sim_name, obj in (("Cells_Area", "Cells"), ("Nuclei_Area", "Nuclei")):
        sel = real["object"] == obj
        r = calibration.log_sd_in_wells(real["AreaShape_Area"][sel], real["well"][sel])
        s = calibration.log_sd_in_wells(np.exp(wells.cell_features[ctrl, names.index(sim_name)]),
                                        wells.cell_well[ctrl])
        assert abs(s - r) < 0.25 * r, (sim_name, s, r)


def test_penetrance_sets_the_share_of_responding_cells():
    cfg = small_cfg(penetrance=0.4, penetrance_well_sd=0.0)
    table = design.build_design(cfg)
    tech = sim_effects.technical(table, cfg)
    bio = sim_effects.phenotype(table, cfg, tech["strength"])
    keys = np.asarray(sim_effects.site_key(cfg.seed, table["site_id"]))
    kernel = sim_render.make_feature_kernel(48, int(cfg.max_cells), simulator.bio_items(cfg))
    f32 = lambda a: np.asarray(a, np.float32)
    _, on, resp = kernel(keys, {k: f32(v) for k, v in bio.items()}, {k: f32(v) for k, v in tech.items()})
    on, resp = np.asarray(on) > 0, np.asarray(resp) > 0
    treated = ~table["is_control"]
    share = resp[treated].sum() / on[treated].sum()
    assert abs(share - 0.4) < 0.03, share
    assert not resp[table["is_control"]].any()  # DMSO cells never respond
    np.testing.assert_array_equal(bio["penetrance"][table["is_control"]], 0.0)


def test_toxic_class_loses_cells_in_proportion_to_penetrance():
    # FK-866 (NAMPT inhibitor) kills responding cells: count ~ (1 - p) + p * exp(d), against
    # the same wells with p = 0 (same seeding noise, edge positions and batch density).
    log_count = {}
    for p in (0.0, 0.5, 1.0):
        w = calibration.measure_simulator(small_cfg(penetrance=p, penetrance_well_sd=0.0))
        log_count[p] = np.log(w.count[w.compound == "JCP2022_046054"])
    cfg = small_cfg()
    table = design.build_design(cfg)
    fk = table["compound"] == "JCP2022_046054"
    d = sim_effects.phenotype(table, cfg, sim_effects.technical(table, cfg)["strength"])["class"]
    d = d[fk, sim_effects.P["density"]]  # class direction x strength, per FK-866 site
    assert d.max() < -0.5  # a strong toxic class
    for p in (0.5, 1.0):
        expected = np.mean(np.log((1 - p) + p * np.exp(d)))
        assert np.mean(log_count[p] - log_count[0.0]) == pytest.approx(expected, abs=0.08)


def test_bad_biology_knobs_raise():
    with pytest.raises(ValueError, match="penetrance=1.5"):
        design.build_design(small_cfg(penetrance=1.5))
    with pytest.raises(ValueError, match="cell_size_sd=-0.1"):
        design.build_design(small_cfg(cell_size_sd=-0.1))


def test_calibration_table_has_every_statistic():
    rows = calibration.calibration_table(small_cfg())
    names = [r.name for r in rows]
    assert "cell count: batch sd" in names and "cells: nucleus area spread" in names
    assert sum(n.startswith("profile:") for n in names) == 6
    assert "| statistic | simulator | real |" in calibration.markdown(rows)
