"""Tests of the TFDS array_record store and the simulated-study cache."""

import json
import os

import numpy as np
import pytest

from jaxadapt.data import schema, store
from jaxadapt.data.sim import builder as tfds_sim


S = 32


def _table(n: int) -> schema.SiteTable:
    return schema.SiteTable({
        "source": np.array(["s0"] * n), "batch": np.array(["b0"] * n),
        "plate": np.array([f"p{i % 3}" for i in range(n)]),
        "well": np.array([f"A{i:02d}" for i in range(n)]), "site": np.zeros(n, np.int64),
        "compound": np.array(["c"] * n), "moa": np.array([""] * n),
        "label": np.zeros(n, np.int64), "is_control": np.zeros(n, bool),
    })


def _images(rows: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(rows[0])
    return rng.integers(0, 256, size=(len(rows), S, S, 5), dtype=np.uint8)


def _chunks(table, size=7):
    for start in range(0, len(table), size):
        rows = np.arange(start, min(start + size, len(table)))
        yield rows, _images(rows)


def _ensure(root, n=20, key="k1", counter=None):
    def chunks(t):
        if counter is not None:
            counter.append(1)
        return _chunks(t)
    return store.ensure_store(root, lambda: _table(n), chunks, image_shape=(S, S, 5), key=key)


def test_records_match_images_byte_for_byte(tmp_path):
    source, table, built = _ensure(str(tmp_path / "st"))
    assert built and len(source) == len(table) == 20
    expected = np.concatenate([im for _, im in _chunks(table)])
    for i in range(20):
        rec = source[i]
        assert rec["row"] == i
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (S, S, 5)
        assert rec["image"].tobytes() == expected[i].tobytes()
    np.testing.assert_array_equal(table["plate"], _table(20)["plate"])


def test_reuse_does_not_rebuild(tmp_path):
    root, calls = str(tmp_path / "st"), []
    _ensure(root, counter=calls)
    mtime = os.path.getmtime(os.path.join(root, "COMPLETE.json"))
    _, _, built = _ensure(root, counter=calls)
    assert not built and len(calls) == 1
    assert os.path.getmtime(os.path.join(root, "COMPLETE.json")) == mtime


def _record_file(root):
    vdir = os.path.join(root, store.BUILDER_NAME, "1.0.0")
    return os.path.join(vdir, next(f for f in os.listdir(vdir) if ".array_record" in f))


@pytest.mark.parametrize("damage", ["truncate", "remove", "marker", "key"])
def test_damaged_store_is_detected_and_rebuilt(tmp_path, damage, caplog):
    root, calls = str(tmp_path / "st"), []
    _ensure(root, counter=calls)
    key = "k1"
    if damage == "truncate":
        path = _record_file(root)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "remove":
        os.remove(_record_file(root))
    elif damage == "marker":  # a build killed before its last step leaves no marker
        os.remove(os.path.join(root, "COMPLETE.json"))
    else:
        key = "k2"  # a changed config
    assert store.store_problem(root, key=key) is not None
    source, table, built = _ensure(root, key=key, counter=calls)
    assert built and len(calls) == 2
    assert store.store_problem(root, key=key) is None
    assert source[19]["image"].tobytes() == _images(np.arange(14, 20))[5].tobytes()


def test_record_count_mismatch_is_detected(tmp_path):
    root = str(tmp_path / "st")
    _ensure(root)
    info_path = os.path.join(root, store.BUILDER_NAME, "1.0.0", "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["splits"][0]["shardLengths"] = ["21"]
    with open(info_path, "w") as f:
        json.dump(info, f)
    assert "21" in store.store_problem(root, key="k1")


def test_bad_chunks_fail(tmp_path):
    def out_of_order(t):
        yield np.array([1, 0]), _images(np.array([1, 0]))
    with pytest.raises(ValueError, match="in row order"):
        store.ensure_store(str(tmp_path / "a"), lambda: _table(2), out_of_order,
                           image_shape=(S, S, 5))

    def wrong_dtype(t):
        yield np.arange(2), np.zeros((2, S, S, 5), np.float32)
    with pytest.raises(ValueError, match="uint8"):
        store.ensure_store(str(tmp_path / "b"), lambda: _table(2), wrong_dtype,
                           image_shape=(S, S, 5))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_config_key_changes_with_content_only():
    ml_collections = pytest.importorskip("ml_collections")
    a = ml_collections.ConfigDict({"preset": "x", "seed": 0, "chunk_size": 8,
                                   "severity": {"batch": 1.0}})
    b = ml_collections.ConfigDict(a.to_dict())
    assert tfds_sim.config_key(a) == tfds_sim.config_key(b)
    b.chunk_size = 64  # speed only
    assert tfds_sim.config_key(a) == tfds_sim.config_key(b)
    b.severity.batch = 2.0
    assert tfds_sim.config_key(a) != tfds_sim.config_key(b)


def _small_sim_cfg():
    design = pytest.importorskip("jaxadapt.data.sim.design")
    pytest.importorskip("jaxadapt.data.sim.simulator")
    cfg = design.default_sim_config()
    cfg.batches_per_source, cfg.plates_per_batch = 1, 1
    cfg.sites_per_well, cfg.image_size = 1, 32
    return cfg


def test_load_simulated_matches_render_and_caches(tmp_path):
    cfg = _small_sim_cfg()
    from jaxadapt.data.sim import simulator
    source, table = tfds_sim.load_simulated(cfg, str(tmp_path), chunk_sites=64)
    root = tfds_sim.store_dir(cfg, str(tmp_path))
    rows = np.arange(len(table) - 64, len(table))  # same shape as a build chunk: no recompile
    ref, _ = simulator.render_sites(table.take(rows), cfg)
    assert len(source) == len(table) == len(design_table(cfg))
    for r, im in zip(rows, ref):
        assert source[int(r)]["image"].tobytes() == np.asarray(im).tobytes()
    latents = tfds_sim.load_latents(cfg, str(tmp_path))
    assert all(len(v) == len(table) for v in latents.values())
    mtime = os.path.getmtime(os.path.join(root, "COMPLETE.json"))
    tfds_sim.load_simulated(cfg, str(tmp_path))  # reused: not rebuilt
    assert os.path.getmtime(os.path.join(root, "COMPLETE.json")) == mtime
    cfg.seed = 1  # a changed config maps to another cache directory
    assert tfds_sim.store_dir(cfg, str(tmp_path)) != root


def design_table(cfg):
    from jaxadapt.data.sim import design
    return design.build_design(cfg)
