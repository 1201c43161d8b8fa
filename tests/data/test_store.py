"""Tests of the TFDS array_record store and the simulated-study cache."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxadapt.data import schema, store
from jaxadapt.data.sim import builder as tfds_sim
from tests.data.damage import flip_bytes


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
    rel = os.path.relpath(info_path, root)
    assert store.check_store(root, key="k1").file == rel  # its checksum changed first
    # A writer that sealed a wrong count with a matching checksum: the count check finds it.
    marker = _manifest(root)
    marker["checksums"][rel] = store.file_digest(info_path)
    _write_manifest(root, marker)
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


# ------------------------------------------------------------------ checksums (issue 17)


def _manifest(root):
    with open(os.path.join(root, "COMPLETE.json")) as f:
        return json.load(f)


def _write_manifest(root, marker):
    with open(os.path.join(root, "COMPLETE.json"), "w") as f:
        json.dump(marker, f)


def test_manifest_records_a_checksum_of_every_file(tmp_path):
    root = str(tmp_path / "st")
    _ensure(root)
    marker = _manifest(root)
    assert marker["manifest_version"] == store.MANIFEST_VERSION and marker["hash"] == "sha256"
    shard = os.path.relpath(_record_file(root), root)
    assert shard in marker["checksums"] and "table.npz" in marker["checksums"]
    for rel, digest in marker["checksums"].items():
        assert store.file_digest(os.path.join(root, rel)) == digest
    import hashlib  # pylint: disable=g-import-not-at-top
    with open(_record_file(root), "rb") as f:
        assert marker["checksums"][shard] == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("restore_mtime", [True, False])
def test_flipped_bytes_are_named_and_the_store_rerendered(tmp_path, monkeypatch, caplog,
                                                          restore_mtime):
    root, calls = str(tmp_path / "st"), []
    _ensure(root, counter=calls)
    shard = _record_file(root)
    flip_bytes(shard, restore_mtime=restore_mtime)
    if restore_mtime:  # same size and mtime: invisible to this process's cache, so the
        monkeypatch.setattr(store, "_VERIFIED", set())  # next process (a fresh cache) finds it
    # Unchecked, array_record ends the run mid-read with its raw error (the old failure).
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    reader = array_record_module.ArrayRecordReader(shard)
    with pytest.raises(RuntimeError, match="Corrupted|hash mismatch|checksum"):
        reader.read_all()
    reader.close()

    rel = os.path.relpath(shard, root)
    problem = store.check_store(root, key="k1")
    assert (problem.kind, problem.file) == ("damaged", rel) and "sha256" in problem.detail
    with pytest.raises(ValueError, match=f"image store {root} is unusable: {rel}:"):
        store.open_store(root)  # a direct reader is refused too, in one line
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        source, table, built = _ensure(root, counter=calls)
    assert built and len(calls) == 2
    assert root in caplog.text and rel in caplog.text and "rebuilding" in caplog.text
    clean = np.concatenate([im for _, im in _chunks(table)])
    assert all(source[i]["image"].tobytes() == clean[i].tobytes() for i in range(20))
    assert store.check_store(root, key="k1") is None


@pytest.mark.parametrize("damage", ["table", "marker_bytes"])
def test_other_damaged_files_are_named(tmp_path, damage):
    root = str(tmp_path / "st")
    _ensure(root)
    if damage == "table":
        flip_bytes(os.path.join(root, "table.npz"), restore_mtime=False, n=4)
        assert store.check_store(root, key="k1").file == "table.npz"
    else:
        with open(os.path.join(root, "COMPLETE.json"), "r+b") as f:
            f.write(b"#")
        problem = store.check_store(root, key="k1")
        assert (problem.kind, problem.file) == ("damaged", "COMPLETE.json")


@pytest.mark.parametrize("manifest", ["missing", "old_format"])
def test_missing_or_old_manifest_is_named_and_rebuilt(tmp_path, caplog, manifest):
    root, calls = str(tmp_path / "st"), []
    _ensure(root, counter=calls)
    if manifest == "missing":
        os.remove(os.path.join(root, "COMPLETE.json"))
        kind, text = "no_manifest", "no manifest COMPLETE.json"
    else:  # exactly what the code before checksums wrote: no version, no checksums
        marker = _manifest(root)
        for k in ("manifest_version", "hash", "checksums"):
            del marker[k]
        _write_manifest(root, marker)
        kind, text = "old_manifest", "cannot be verified, and it needs a rebuild"
    assert store.check_store(root, key="k1").kind == kind
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        _, _, built = _ensure(root, counter=calls)
    assert built and len(calls) == 2 and root in caplog.text and text in caplog.text
    assert _manifest(root)["manifest_version"] == store.MANIFEST_VERSION


def test_each_file_is_hashed_once_per_process(tmp_path, monkeypatch):
    hashed, real = [], store.file_digest
    monkeypatch.setattr(store, "file_digest", lambda p: hashed.append(p) or real(p))
    root = str(tmp_path / "st")
    _ensure(root)
    n_files = len(_manifest(root)["checksums"])
    assert len(hashed) == n_files  # once, when written: not again on the first open
    for _ in range(3):
        _ensure(root)
        store.open_store(root)
    assert len(hashed) == n_files
    monkeypatch.setattr(store, "_VERIFIED", set())  # a new process
    for _ in range(3):
        _ensure(root)
    assert len(hashed) == 2 * n_files
    shard = _record_file(root)  # a file whose mtime moved is hashed again, alone
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))
    _ensure(root)
    _ensure(root)
    assert len(hashed) == 2 * n_files + 1 and hashed[-1] == os.path.abspath(shard)


@pytest.mark.slow
def test_damaged_store_rerenders_and_the_study_prints_the_same_table(tmp_path):
    """Must-show of issue 17: a tiny study on a clean simulator store, then a shard's
    bytes flipped (mtime restored) and the same study re-run in a new process: the damage
    is named, the store re-rendered, and results.json holds the same rows."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cache = str(tmp_path / "cache")
    code = ("import sys, logging; logging.basicConfig(level=logging.WARNING)\n"
            "from tests.eval.tiny import tiny_config\n"
            "from jaxadapt.eval import study\n"
            "study.run_study(tiny_config(sys.argv[1]), sys.argv[2])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))

    def run(out):
        done = subprocess.run([sys.executable, "-c", code, cache, str(tmp_path / out)],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(tmp_path / out / "results.json") as f:
            return json.load(f)["rows"], done.stderr

    clean, _ = run("clean")
    (name,) = [d for d in os.listdir(cache) if d.startswith("sim_") and "." not in d]
    shard = _record_file(os.path.join(cache, name))
    flip_bytes(shard, restore_mtime=True)
    again, log_text = run("damaged")
    rel = os.path.relpath(shard, os.path.join(cache, name))
    assert f"image store {os.path.join(cache, name)} is unusable ({rel}: sha256" in log_text
    assert "Corrupted" not in log_text
    assert again == clean
    (warning,) = [line for line in log_text.splitlines() if "is unusable" in line]
    print(f"{warning}\n-> re-rendered; {len(again)} results.json rows equal the clean run's")
