"""Tests of the simulator's experimental design (jaxadapt.data.sim.design)."""

import numpy as np
import pytest

from jaxadapt.data.schema import DMSO, NO_LABEL, SITE_FIELDS
from jaxadapt.data.sim import design


def small_cfg(**kw):
    cfg = design.default_sim_config()
    cfg.batches_per_source, cfg.plates_per_batch, cfg.sites_per_well = 2, 1, 1
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_default_config_has_every_knob():
    cfg = design.default_sim_config("jump_poscon")
    for knob in ("preset", "sources", "batches_per_source", "plates_per_batch", "sites_per_well",
                 "image_size", "seed", "clean"):
        assert knob in cfg
    assert set(cfg.severity) == {"source", "batch", "plate", "well"}
    assert cfg.biology.effect_size > 0
    assert tuple(cfg.sources) == ("source_3", "source_8")


def test_design_columns_and_counts():
    cfg = small_cfg()
    t = design.build_design(cfg)
    assert len(t) == 2 * 2 * 1 * 64 * 1  # sources x batches x plates x (32 DMSO + 32 poscon) x sites
    for f in list(SITE_FIELDS) + ["site_id", "row", "col", "is_edge"]:
        assert f in t
    assert t["site_id"].dtype == np.int64
    assert len(np.unique(t["site_id"])) == len(t)


def test_real_compound_plate_layout():
    t = design.build_design(small_cfg())
    one = t.take(t["plate"] == t["plate"][0])
    wells = dict(zip(one["well"], one["compound"]))
    assert wells["A01"] == "JCP2022_085227" and wells["A02"] == DMSO and wells["P24"] == "JCP2022_046054"
    assert one["is_control"].sum() == 32
    comp, counts = np.unique(one["compound"][~one["is_control"]], return_counts=True)
    assert list(comp) == sorted(design.POSCON_MOA) and set(counts) == {4}
    # label = index in the sorted list of the 8 positive controls; controls get NO_LABEL
    np.testing.assert_array_equal(one["label"][~one["is_control"]],
                                  [design.POSCONS.index(c) for c in one["compound"][~one["is_control"]]])
    assert set(one["label"][one["is_control"]]) == {NO_LABEL}
    assert one["is_edge"][one["well"] == "A01"].all() and not one["is_edge"][one["well"] == "B02"].any()


def test_real_batch_and_plate_names_then_synthetic():
    cfg = small_cfg(batches_per_source=20, sources=("source_3",))
    plates = design.study_plates(cfg)
    assert plates[0] == ("source_3", "CP59", "BR5867a3")
    assert plates[-1][1].startswith("source_3_simB")  # source_3 has fewer real batches
    assert len(plates) == 20


def test_site_id_stable_under_other_knobs():
    a = design.build_design(small_cfg())
    b = design.build_design(small_cfg(sites_per_well=3, image_size=32, seed=7))
    ida = dict(zip(zip(a["plate"], a["well"], a["site"]), a["site_id"]))
    idb = dict(zip(zip(b["plate"], b["well"], b["site"]), b["site_id"]))
    assert all(idb[k] == v for k, v in ida.items())


@pytest.mark.parametrize("field,value,needle", [
    ("batches_per_source", 0, "batches_per_source=0"),
    ("plates_per_batch", -1, "plates_per_batch=-1"),
    ("sites_per_well", 0, "sites_per_well=0"),
    ("image_size", 8, "image_size=8"),
    ("sources", ("source_99",), "source_99"),
])
def test_bad_config_raises_naming_field_and_value(field, value, needle):
    cfg = small_cfg()
    cfg[field] = value
    with pytest.raises(ValueError, match=needle):
        design.build_design(cfg)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="preset='nope'.*use one of"):
        design.default_sim_config("nope")
