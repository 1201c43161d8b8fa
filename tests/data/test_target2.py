"""Tests of the jump_target2 simulator preset (jaxadapt.data.sim.target2, design, sim_effects)."""

import collections
import csv

import numpy as np
import pytest

from jaxadapt.data.schema import DMSO, NO_LABEL, check_images
from jaxadapt.data.sim import design, effects as sim_effects, simulator, target2


def cfg_(**kw):
    cfg = design.default_sim_config("jump_target2")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def plate():
    t = design.build_design(cfg_(sources=("source_3",), batches_per_source=1))
    assert len(t) == 384
    return t


def test_layout_counts_match_the_real_platemap(plate):
    assert plate["is_control"].sum() == 64 and set(plate["compound"][plate["is_control"]]) == {DMSO}
    assert len(np.unique(plate["compound"])) == 302  # 301 compounds + DMSO
    wells = collections.Counter(plate["compound"][~plate["is_control"]])
    assert collections.Counter(wells.values()) == {1: 282, 2: 19}
    with open(target2.LAYOUT_CSV.parent / "JUMP-Target-2_compound_platemap.tsv", newline="") as f:
        empty = {r["well_position"] for r in csv.DictReader(f, delimiter="\t") if not r["broad_sample"]}
    assert set(plate["well"][plate["is_control"]]) == empty
    assert len(set(plate["well"])) == 384 and plate["is_edge"].sum() == 76


def test_moa_classes_sized_as_coda(plate):
    classes = target2.moa_classes()
    assert len(classes) == 58 == design.num_classes("jump_target2")
    treated = ~plate["is_control"]
    comp_label = dict(zip(plate["compound"][treated], plate["label"][treated]))
    labelled = {c: k for c, k in comp_label.items() if k != NO_LABEL}
    assert len(labelled) == 145
    sizes = np.bincount(list(labelled.values()), minlength=58)
    assert sizes.min() >= target2.MIN_COMPOUNDS_PER_CLASS and sizes.max() == 7 and sizes.sum() == 145
    moa = dict(zip(plate["compound"], plate["moa"]))
    assert all(moa[c] == classes[k] and "|" not in moa[c] for c, k in labelled.items())
    # unlabelled compounds: several MoAs, none, or an MoA of a single compound
    single = collections.Counter(m for c, m in moa.items() if c != DMSO and m and "|" not in m)
    for c in set(comp_label) - set(labelled):
        assert "|" in moa[c] or not moa[c] or single[moa[c]] == 1
    assert set(plate["label"][plate["is_control"]]) == {NO_LABEL}


def test_real_target2_plates_per_source():
    full = cfg_(sources=target2.MAIN_SOURCES + target2.AUX_SOURCES, batches_per_source=23,
                plates_per_batch=2)
    plates = collections.Counter(s for s, _, _ in design.study_plates(full))
    assert plates == {"source_3": 25, "source_5": 24, "source_8": 4, "source_11": 7,
                      "source_7": 7, "source_10": 6}
    batches = {(s, b) for s, b, _ in design.study_plates(full)}
    assert collections.Counter(s for s, _ in batches) == {
        "source_3": 13, "source_5": 23, "source_8": 4, "source_11": 4, "source_7": 7, "source_10": 6}
    small = design.study_plates(cfg_())  # CPU default: 4 sources x 3 batches x 1 plate
    assert [p for _, _, p in small[:3]] == ["JCPQC051", "JCPQC053", "JCPQC016"]
    assert collections.Counter(s for s, _, _ in small) == {s: 3 for s in target2.MAIN_SOURCES}
    assert tuple(cfg_().sources) == ("source_3", "source_5", "source_8", "source_11")
    # the CPU default holds the four plates CODA validates on
    assert {"JCPQC016", "ACPJUM012", "A1166127", "EC103-132LM2"} <= {p for _, _, p in small}


def test_source_without_target2_plates_raises():
    with pytest.raises(ValueError, match="'source_1', which has no TARGET2 plates"):
        design.build_design(cfg_(sources=("source_1",)))


def test_moa_directions_shared_within_class_distinct_between():
    cfg = cfg_()
    lay = target2.plate_layout()
    comp = np.array([c for _, c, _, _ in lay])
    moa = np.array([m for _, _, m, _ in lay])
    label = np.array([k for _, _, _, k in lay])
    d = sim_effects.class_directions(comp, cfg, moa)
    assert np.all(d[comp == DMSO] == 0) and np.all(np.abs(d[comp != DMSO]).sum(1) > 0)
    unit = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    within, between = [], []
    for k in range(58):
        idx = np.flatnonzero(label == k)
        first = idx[comp[idx] == comp[idx[0]]][0]
        other = idx[comp[idx] != comp[idx[0]]]
        within += list(unit[other] @ unit[first])
        assert not np.allclose(d[other], d[first])  # per-compound variation
        between.append(unit[np.flatnonzero(label == (k + 1) % 58)[0]] @ unit[first])
    # deviation 0.3 x |d| on the class's own parameters: cosine >= ~0.8 (measured 0.79)
    assert min(within) > 0.7 and np.median(within) > 0.95 and np.median(between) < 0.5
    base = np.stack([sim_effects.moa_direction(m) for m in target2.moa_classes()])
    assert len(np.unique(base.round(6), axis=0)) == 58  # every class its own direction
    np.testing.assert_array_equal(sim_effects.moa_direction("CDK inhibitor"),
                                  sim_effects.moa_direction("CDK inhibitor"))


def test_tiny_build_renders_with_each_microscope():
    cfg = cfg_(batches_per_source=1, image_size=32, chunk_size=64)
    t = design.build_design(cfg)
    assert len(t) == 4 * 384
    rows = np.flatnonzero(np.isin(t["well"], ["A01", "A02", "B05", "A05"]))
    images, lat = simulator.render_sites(t.take(rows), cfg)
    assert images.shape == (16, 32, 32, 5) and images.dtype == np.uint8
    check_images(images)
    assert 0 < images.mean() < 128 and lat["n_cells"].mean() > 3
    for src in cfg.sources:
        m = t["source"][rows] == src
        expect = float(design.microscopes()[src]["Metadata_Pixel_Size_Microns"]) * cfg.binning
        np.testing.assert_allclose(lat["pixel_um"][m], expect, rtol=1e-6)
    dmso = t["is_control"][rows]
    assert dmso.sum() == 4 and lat["penetrance"][dmso].max() == 0 and lat["penetrance"][~dmso].min() > 0
