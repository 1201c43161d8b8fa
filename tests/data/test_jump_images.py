"""Tests of the JUMP load_data reader, preprocessing and image store on real TIFF bytes.

Fixtures (tests/data/fixtures, CC0, see ORIGIN.md): a real 16-bit Cell Painting crop of
BBBC022 (one 3-plane TIFF: DNA, ER, RNA) and a real 8-bit CellProfiler ExampleHuman field
(one TIFF per channel). They are copied into tmp_path so tests may touch their mtimes.
"""

import csv
import json
import logging
import os
import shutil

import numpy as np
import pytest
import tifffile

from jaxadapt.data import schema, store
from jaxadapt.data.jump import images as jump_images, load_data as jump_load_data, sites as jump_sites
from jaxadapt.eval import cli
from tests.data.damage import flip_bytes


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BBBC = "IXMtest_A02_s9.tif"
CP = [f"AS_09125_050116030001_D03f00d{i}.tif" for i in range(3)]
CH3 = ("DNA", "ER", "RNA")
DEX = "JCP2022_025848"  # dexamethasone, one of the 8 CS-ARM-BN classes
LABELS = {DEX: 0}

# (well, site, kind): "cp" = one file per channel, "bbbc" = planes of one TIFF.
SITES = [("A01", 1, "cp"), ("A01", 2, "bbbc"), ("B02", 1, "bbbc"), ("B02", 2, "cp")]


def _images(tmp_path) -> str:
    img = tmp_path / "images"
    if not img.exists():
        img.mkdir()
        for name in [BBBC] + CP:
            shutil.copy(os.path.join(FIXTURES, name), img / name)
    return str(img)


def _channel_cells(kind: str, img_dir: str) -> dict[str, str]:
    cells = {}
    for c, ch in enumerate(CH3):
        cells[f"FileName_Orig{ch}"] = CP[c] if kind == "cp" else BBBC
        cells[f"PathName_Orig{ch}"] = img_dir
        cells[f"Frame_Orig{ch}"] = "" if kind == "cp" else str(c)
    return cells


def _write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _inputs(tmp_path, sites=SITES, wells=(("A01", schema.DMSO), ("B02", DEX)), drop=()):
    """Writes load_data.csv and well.csv into tmp_path; returns their paths."""
    img_dir = _images(tmp_path)
    rows = []
    for well, site, kind in sites:
        row = {"Metadata_Source": "source_1", "Metadata_Batch": "B1", "Metadata_Plate": "P1",
               "Metadata_Well": well, "Metadata_Site": str(site)}
        row.update(_channel_cells(kind, img_dir))
        rows.append({k: v for k, v in row.items() if k not in drop})
    load_data = _write_csv(tmp_path / "load_data.csv", rows)
    well_rows = [{"Metadata_Source": "source_1", "Metadata_Plate": "P1", "Metadata_Well": w,
                  "Metadata_JCP2022": c} for w, c in wells]
    return load_data, _write_csv(tmp_path / "well.csv", well_rows)


def _restated(raw_chw: np.ndarray, q: float = 99.99) -> np.ndarray:
    """NumPy restatement of the reference: 2x2 block mean, clip at percentile, 0..255."""
    c, h, w = raw_chw.shape
    x = raw_chw[:, : h - h % 2, : w - w % 2].astype(np.float64)
    x = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4
    out = np.empty(x.shape[1:] + (c,), np.uint8)
    for k in range(c):
        lo, hi = x[k].min(), np.percentile(x[k], q)
        out[..., k] = np.floor((np.clip(x[k], lo, hi) - lo) / (hi - lo) * 255 + 0.5)
    return out


def _center(img: np.ndarray, s: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _cp_stack() -> np.ndarray:
    return np.stack([tifffile.imread(os.path.join(FIXTURES, n)) for n in CP])


# ----------------------------------------------------------------------------- reader


def test_read_load_data_joins_compounds_labels_and_files(tmp_path):
    load_data, wells = _inputs(tmp_path)
    sites = jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)
    t = sites.table
    assert len(t) == 4 and sites.paths.shape == (4, 3) and sites.channels == CH3
    np.testing.assert_array_equal(t["well"], ["A01", "A01", "B02", "B02"])
    np.testing.assert_array_equal(t["site"], [1, 2, 1, 2])
    np.testing.assert_array_equal(t["is_control"], [True, True, False, False])
    np.testing.assert_array_equal(t["label"], [schema.NO_LABEL, schema.NO_LABEL, 0, 0])
    np.testing.assert_array_equal(t["compound"], [schema.DMSO, schema.DMSO, DEX, DEX])
    assert os.path.basename(sites.paths[0, 1]) == CP[1]
    np.testing.assert_array_equal(sites.frames[1], [0, 1, 2])
    np.testing.assert_array_equal(sites.frames[0], [-1, -1, -1])


# ----------------------------------------------------------------------------- pixels


def test_preprocess_matches_numpy_restatement_on_real_16bit_image():
    raw = tifffile.imread(os.path.join(FIXTURES, BBBC))
    assert raw.dtype == np.uint16 and raw.shape == (3, 395, 695)
    got = jump_sites.preprocess(raw)
    assert got.dtype == np.uint8 and got.shape == (197, 347, 3)  # odd height loses a line
    np.testing.assert_array_equal(got, _restated(raw))
    # Per channel, the clip maps its 99.99th percentile to 255 and its minimum to 0.
    assert (got.reshape(-1, 3).min(0) == 0).all() and (got.reshape(-1, 3).max(0) == 255).all()
    np.testing.assert_array_equal(jump_sites.preprocess(raw.transpose(1, 2, 0), channel_axis=-1), got)


def test_preprocess_real_8bit_image_and_other_percentile():
    raw = _cp_stack()
    np.testing.assert_array_equal(jump_sites.preprocess(raw, upper_percentile=99.0),
                                  _restated(raw, q=99.0))


def test_constant_channel_maps_to_zero_and_crop_pad_fix_the_shape():
    raw = tifffile.imread(os.path.join(FIXTURES, BBBC))
    raw[1] = 1234
    with np.errstate(all="raise"):
        got = jump_sites.preprocess(raw)
    assert (got[..., 1] == 0).all()
    np.testing.assert_array_equal(got[..., 0], _restated(raw[:1])[..., 0])
    cropped = jump_sites.preprocess(raw, image_size=64)
    np.testing.assert_array_equal(cropped, _center(got, 64))
    padded = jump_sites.preprocess(raw, image_size=(256, 300))
    assert padded.shape == (256, 300, 3)
    # 197 rows are zero-padded by 29 above and 30 below; 347 columns centre-cropped to 300.
    np.testing.assert_array_equal(padded[29:29 + 197], got[:, 23:23 + 300])
    assert (padded[:29] == 0).all() and (padded[29 + 197:] == 0).all()


# ----------------------------------------------------------------------------- store


def test_store_records_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    load_data, wells = _inputs(tmp_path)
    cache = str(tmp_path / "cache")
    source, table = jump_images.build_jump_store(load_data, wells, LABELS, cache,
                                                 channels=CH3, image_size=96, num_workers=2)
    assert len(source) == len(table) == 4
    np.testing.assert_array_equal(table["label"], [-1, -1, 0, 0])
    expected = {"cp": _center(_restated(_cp_stack()), 96),
                "bbbc": _center(_restated(tifffile.imread(os.path.join(FIXTURES, BBBC))), 96)}
    for i, (_, _, kind) in enumerate(SITES):
        rec = source[i]
        assert rec["row"] == i and rec["image"].dtype == np.uint8
        assert rec["image"].shape == (96, 96, 3)
        np.testing.assert_array_equal(rec["image"], expected[kind])

    (root,) = os.listdir(cache)
    marker = os.path.join(cache, root, "COMPLETE.json")
    stamp = os.path.getmtime(marker)
    reads = []
    real_read = jump_sites.read_site
    monkeypatch.setattr(jump_sites, "read_site", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    source2, _ = jump_images.build_jump_store(load_data, wells, LABELS, cache, channels=CH3,
                                              image_size=96)
    assert not reads and os.listdir(cache) == [root] and os.path.getmtime(marker) == stamp
    assert source2[3]["image"].tobytes() == source[3]["image"].tobytes()

    # A touched image file is a changed input: a new store is built beside the old one.
    img = os.path.join(tmp_path, "images", CP[0])
    os.utime(img, ns=(os.stat(img).st_atime_ns, os.stat(img).st_mtime_ns + 10**9))
    jump_images.build_jump_store(load_data, wells, LABELS, cache, channels=CH3, image_size=96)
    assert reads and len(os.listdir(cache)) == 2


def test_store_without_image_size_keeps_the_downsampled_shape(tmp_path):
    load_data, wells = _inputs(tmp_path, sites=[("A01", 1, "cp"), ("B02", 1, "cp")])
    source, _ = jump_images.build_jump_store(load_data, wells, LABELS, str(tmp_path / "c"),
                                             channels=CH3)
    assert source[0]["image"].shape == (256, 256, 3)


@pytest.mark.parametrize("damage", ["flipped", "no_manifest", "old_manifest"])
def test_unusable_store_is_refused_in_one_line_naming_the_fix(tmp_path, monkeypatch, capsys,
                                                               damage):
    # A real-data store is not rebuilt behind the user's back (hours of TIFF reads): the
    # run stops before any record is read, naming the store, the file and the rebuild.
    load_data, wells = _inputs(tmp_path)
    cache = str(tmp_path / "cache")

    def build():
        return jump_images.build_jump_store(load_data, wells, LABELS, cache, channels=CH3,
                                            image_size=96, num_workers=1)

    clean, _ = build()
    clean_images = [clean[i]["image"] for i in range(4)]
    (name,) = os.listdir(cache)
    root = os.path.join(cache, name)
    marker = os.path.join(root, "COMPLETE.json")
    if damage == "flipped":  # same size, same mtime, seen by a new process (fresh cache)
        vdir = store.version_dir(root)
        shard = os.path.join(vdir, next(f for f in os.listdir(vdir) if ".array_record" in f))
        flip_bytes(shard, restore_mtime=True)
        monkeypatch.setattr(store, "_VERIFIED", set())
        rel = os.path.relpath(shard, root)
    elif damage == "no_manifest":
        os.remove(marker)
        rel = "COMPLETE.json"
    else:  # the manifest the code before checksums wrote: no version, no checksums
        with open(marker) as f:
            m = json.load(f)
        with open(marker, "w") as f:
            json.dump({k: v for k, v in m.items()
                       if k not in ("manifest_version", "hash", "checksums")}, f)
        rel = "COMPLETE.json"
    with pytest.raises(ValueError) as err:
        build()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"JUMP image store {root} is unusable: ")
    assert rel in msg
    assert f"rm -r {root}" in msg and "experiments/build_jump_store.py" in msg
    assert ("older jaxadapt" in msg) == (damage != "flipped")
    assert os.path.isdir(root)  # left as it was: nothing deleted, nothing rebuilt

    with pytest.raises(SystemExit):  # what a study or the build script prints: one line
        cli.report_errors(build)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {msg}"]
    print(lines[0])

    shutil.rmtree(root)  # the fix the message names
    rebuilt, _ = build()
    for i in range(4):
        np.testing.assert_array_equal(rebuilt[i]["image"], clean_images[i])


# ----------------------------------------------------------------------------- errors


def test_missing_column_names_it(tmp_path):
    load_data, wells = _inputs(tmp_path, drop=("FileName_OrigER",))
    with pytest.raises(ValueError, match="FileName_OrigER"):
        jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)
    load_data, wells = _inputs(tmp_path)
    with pytest.raises(ValueError, match="FileName_OrigAGP"):  # 5 channels by default
        jump_load_data.read_load_data(load_data, wells, LABELS)


def test_missing_file_is_listed(tmp_path):
    load_data, wells = _inputs(tmp_path)
    os.remove(os.path.join(tmp_path, "images", CP[2]))
    with pytest.raises(ValueError, match=r"1 of 4 image files are missing.*d2\.tif"):
        jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)


def test_unlabelled_compound_raises_or_is_dropped_with_a_log(tmp_path, caplog):
    load_data, wells = _inputs(tmp_path, wells=(("A01", schema.DMSO), ("B02", "JCP2022_999999")))
    with pytest.raises(ValueError, match="JCP2022_999999.*drop_unlabelled=True"):
        jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)
    with caplog.at_level(logging.WARNING, logger=jump_load_data.__name__):
        sites = jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3,
                                           drop_unlabelled=True)
    assert len(sites.table) == 2 and sites.table["is_control"].all()
    assert "dropping 2 of 4 sites" in caplog.text


def test_duplicate_site_and_unknown_well(tmp_path):
    load_data, wells = _inputs(tmp_path, sites=SITES + [("A01", 1, "bbbc")])
    with pytest.raises(ValueError, match="duplicate site.*'A01', 1"):
        jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)
    load_data, wells = _inputs(tmp_path, sites=SITES + [("C03", 1, "cp")])
    with pytest.raises(ValueError, match="not in the well table"):
        jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)


def test_mismatched_channel_shapes_name_the_site(tmp_path):
    load_data, wells = _inputs(tmp_path)
    with open(load_data) as f:
        rows = list(csv.DictReader(f))
    rows[0]["FileName_OrigER"], rows[0]["Frame_OrigER"] = BBBC, "1"  # 395x695 beside 512x512
    _write_csv(load_data, rows)
    sites = jump_load_data.read_load_data(load_data, wells, LABELS, channels=CH3)
    with pytest.raises(ValueError, match=r"P1/A01/1: channels differ in shape.*'ER': \(395, 695\)"):
        jump_sites.read_site(sites.paths[0], sites.frames[0], name="site source_1/B1/P1/A01/1",
                              channels=CH3)
    with pytest.raises(ValueError, match="channels differ in shape"):
        jump_images.build_jump_store(load_data, wells, LABELS, str(tmp_path / "c"),
                                     channels=CH3, image_size=64)
    assert not [d for d in os.listdir(tmp_path / "c") if d.startswith("jump_")
                and ".tmp-" not in d]  # no half-built store is left as complete
