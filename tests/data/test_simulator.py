"""Tests of the Cell Painting simulator (jaxadapt.data.sim.simulator)."""

import numpy as np
import pytest

from jaxadapt.data.schema import check_images
from jaxadapt.data.sim import design, effects as sim_effects, simulator


def cfg_(**kw):
    cfg = design.default_sim_config()
    cfg.sources = ("source_3",)
    cfg.batches_per_source, cfg.plates_per_batch, cfg.sites_per_well = 2, 1, 2
    cfg.image_size, cfg.chunk_size = 32, 128
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def study():
    cfg = cfg_()
    table = design.build_design(cfg)
    images, latents = simulator.render_sites(table, cfg)
    return cfg, table, images, latents


@pytest.fixture(scope="module")
def clean_study(study):
    cfg, table, _, _ = study
    clean = cfg_(clean=True)
    images, latents = simulator.render_sites(table, clean)
    return clean, images, latents


def ctrl_means(table, images, batch):
    m = table["is_control"] & (table["batch"] == batch)
    return images[m].reshape(m.sum(), -1, 5).mean(1)


def test_shapes_and_dtype(study):
    cfg, table, images, latents = study
    assert images.shape == (len(table), 32, 32, 5) and images.dtype == np.uint8
    check_images(images)
    assert latents["phenotype"].shape == (len(table), len(sim_effects.PHENO))
    assert latents["gain"].shape == (len(table), 5) and latents["crosstalk"].shape == (len(table), 5, 5)
    assert all(len(v) == len(table) for v in latents.values())
    assert 0 < images.mean() < 128 and latents["n_cells"].mean() > 3


def test_subset_in_any_order_renders_identical_pixels(study):
    cfg, table, images, latents = study
    rows = np.array([200, 3, 77, 130, 5])
    sub_images, sub_latents = simulator.render_sites(table.take(rows), cfg)
    np.testing.assert_array_equal(sub_images, images[rows])
    np.testing.assert_array_equal(sub_latents["n_cells"], latents["n_cells"][rows])
    np.testing.assert_allclose(sub_latents["gain"], latents["gain"][rows], rtol=1e-6)


def test_other_study_knobs_do_not_change_a_site(study):
    cfg, table, images, _ = study
    bigger = cfg_(batches_per_source=3, sites_per_well=3)
    t2 = design.build_design(bigger)
    row = int(np.flatnonzero(t2["site_id"] == table["site_id"][10])[0])
    img2, _ = simulator.render_sites(t2.take(np.array([row])), bigger)
    np.testing.assert_array_equal(img2[0], images[10])


def test_clean_mode_same_cells_no_technical_variation(study, clean_study):
    cfg, table, images, latents = study
    _, clean_images, clean_lat = clean_study
    ctrl = table["is_control"]
    # DMSO wells carry no class effect, so their cell phenotype is the same in both modes
    np.testing.assert_allclose(clean_lat["phenotype"][ctrl], latents["phenotype"][ctrl], rtol=1e-6)
    np.testing.assert_array_equal(clean_lat["gain"], 1.0)
    np.testing.assert_array_equal(clean_lat["crosstalk"], np.broadcast_to(np.eye(5), (len(table), 5, 5)))
    assert not np.array_equal(clean_images, images)
    # controls of different batches: equal distributions when clean, shifted when not
    b0, b1 = np.unique(table["batch"])
    clean_gap = np.abs(ctrl_means(table, clean_images, b0).mean(0) - ctrl_means(table, clean_images, b1).mean(0))
    gap = np.abs(ctrl_means(table, images, b0).mean(0) - ctrl_means(table, images, b1).mean(0))
    noise = ctrl_means(table, clean_images, b0).std(0) / np.sqrt(64)
    assert np.all(clean_gap < 4 * noise + 0.3), (clean_gap, noise)
    assert gap.max() > 3 * clean_gap.max()


def test_replicate_wells_closer_than_across_batches(study):
    cfg, table, images, _ = study
    means = images.reshape(len(images), -1, 5).mean(1)
    ctrl = table["is_control"]
    keys = np.char.add(table["batch"], table["well"])
    batches = np.unique(table["batch"])
    wells = [np.unique(table["well"][ctrl & (table["batch"] == b)]) for b in batches]
    wm = [np.array([means[keys == b + w].mean(0) for w in ws]) for b, ws in zip(batches, wells)]
    within = np.mean([np.abs(m[:, None] - m[None]).sum(-1).sum() / (len(m) * (len(m) - 1)) for m in wm])
    across = np.mean([np.abs(wm[i][:, None] - wm[j][None]).sum(-1).mean()
                      for i in range(len(wm)) for j in range(i + 1, len(wm))])
    # The batch severity is set so that ERM loses 5-15 points on new batches, as on real
    # JUMP data (not more): replicate DMSO wells still agree clearly better within a batch.
    assert across > 1.1 * within, (within, across)


def test_severity_zero_removes_batch_effects():
    cfg = cfg_()
    for level in ("source", "batch", "plate", "well"):
        cfg.severity[level] = 0.0
    lat = sim_effects.technical(design.build_design(cfg), cfg)
    np.testing.assert_allclose(lat["gain"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(lat["density"], 1.0, rtol=1e-6)


def test_bad_inputs_raise():
    cfg = cfg_()
    table = design.build_design(cfg)
    cols = dict(table.columns)
    cols["source"] = np.array(["source_99"] * len(table))
    with pytest.raises(ValueError, match="source_99"):
        simulator.render_sites(type(table)(cols), cfg)
    del cols["site_id"]
    with pytest.raises(ValueError, match="site_id.*build_design"):
        simulator.render_sites(type(table)(cols), cfg)
    with pytest.raises(ValueError, match="image_size=12"):
        simulator.render_sites(table, cfg_(image_size=12))
