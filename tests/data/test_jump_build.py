"""The JUMP store builder on the miniature real gallery (tests/data/jump_mini, CC0).

Must-shows: the store equals an independent read of the TIFFs (tifffile + a NumPy
restatement of illumination division, 2x2 block mean and the 99.99th-percentile clip),
pixel for pixel, with the local engine and with Apache Beam; a build interrupted midway
and restarted reuses its finished shards (counts asserted and printed). Bad inputs raise
a ValueError naming the file/column/plate, or with on_bad_site="skip" are left out and
listed in build_report.json beside the store.
"""

import csv
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from jaxadapt.data import schema
from jaxadapt.data.jump import build as jump_build, images as jump_images


MINI = os.path.join(os.path.dirname(__file__), "jump_mini")
S3 = "s3://cellpainting-gallery/"
CH5 = schema.CHANNELS
LD = "cpg0016-jump/{src}/workspace/load_data_csv/{batch}/{plate}/{name}"
PLATES = {"BRMINI0101": ("source_1", "2021_01_11_Batch1"),
          "BRMINI0201": ("source_1", "2021_01_18_Batch2"),
          "UMINI0101": ("source_2", "2021_02_01_Batch1")}


def _labels(root=MINI) -> dict[str, int]:
    with open(os.path.join(root, "metadata", "labels.csv")) as f:
        return {r["Metadata_JCP2022"]: int(r["label"]) for r in csv.DictReader(f)}


def _ld(plate: str, root=MINI, name="load_data.csv.gz") -> str:
    src, batch = PLATES[plate]
    return os.path.join(root, LD.format(src=src, batch=batch, plate=plate, name=name))


def _rows(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _write(path: str, rows: list[dict], drop=()) -> str:
    with open(path, "w", newline="") as f:
        cols = [c for c in rows[0] if c not in drop]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _build(ld: str, data_dir, root=MINI, **kw):
    return jump_images.build_jump_store(
        ld, os.path.join(root, "metadata", "well.csv.gz"), _labels(root), str(data_dir),
        path_map={S3: root + "/"}, num_workers=1, **kw)


def _copy(tmp_path) -> str:
    dest = str(tmp_path / "mini")
    shutil.copytree(MINI, dest, ignore=shutil.ignore_patterns("*.py", "*.md"))
    return dest


def _file(row: dict, kind: str, ch: str, root: str) -> str:
    return row[f"PathName_{kind}{ch}"].replace(S3, root + "/") + row[f"FileName_{kind}{ch}"]


def _expected(row: dict, root: str, illum: bool) -> np.ndarray:
    """Independent restatement: tifffile read, divide by the .npy illumination function,
    mean of 2x2 blocks, clip to [min, 99.99th percentile], stretch to 0..255, round."""
    out = []
    for ch in CH5:
        x = tifffile.imread(_file(row, "Orig", ch, root)).astype(np.float64)
        assert x.dtype == np.float64 and x.shape == (64, 64)
        if illum:
            x = x / np.load(_file(row, "Illum", ch, root)).astype(np.float64)
        x = x.reshape(32, 2, 32, 2).mean(axis=(1, 3))
        lo, hi = x.min(), np.percentile(x, 99.99)
        out.append(np.floor((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo)) + 0.5))
    return np.stack(out, -1).astype(np.uint8)


# ----------------------------------------------------------------------------- the data


def test_mini_gallery_is_small_real_16bit_and_in_jump_schema():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MINI) for f in fs)
    assert total < 2_000_000
    plates = _rows(os.path.join(MINI, "metadata", "plate.csv.gz"))
    assert {(p["Metadata_Source"], p["Metadata_Plate"]) for p in plates} == {
        ("source_1", "BRMINI0101"), ("source_1", "BRMINI0201"), ("source_1", "BRMINI0301"),
        ("source_2", "UMINI0101")}
    wells = _rows(os.path.join(MINI, "metadata", "well.csv.gz"))
    for p in plates:  # every plate: DMSO and every class, two wells each
        comps = [w["Metadata_JCP2022"] for w in wells if w["Metadata_Plate"] == p["Metadata_Plate"]]
        assert sorted(set(comps)) == sorted([schema.DMSO, *_labels()])
        assert all(comps.count(c) == 2 for c in comps)
    rows = _rows(_ld("BRMINI0201", name="load_data_with_illum.csv.gz"))
    assert len(rows) == 16 and rows[0]["FileName_OrigDNA"] == "r01c01f01p01-ch5sk1fk1fl1.tiff"
    assert {f"FileName_Illum{c}" for c in CH5} <= set(rows[0])
    raw = tifffile.imread(_file(rows[0], "Orig", "DNA", MINI))
    assert raw.dtype == np.uint16 and raw.shape == (64, 64)


# ----------------------------------------------------------------------------- must show


@pytest.mark.parametrize("plate,name,engine", [
    ("BRMINI0201", "load_data_with_illum.csv.gz", "local"),
    ("BRMINI0201", "load_data_with_illum.csv.gz", "beam"),
    ("UMINI0101", "load_data.csv.gz", "local"),
    ("BRMINI0101", "load_data.csv.gz", "beam"),
])
def test_store_equals_independent_read_pixel_for_pixel(tmp_path, plate, name, engine):
    ld = _ld(plate, name=name)
    source, table = _build(ld, tmp_path, engine=engine, shard_sites=5)
    rows = _rows(ld)
    assert len(source) == len(table) == len(rows) == 16
    illum = "illum" in name
    for i, row in enumerate(rows):
        rec = source[i]
        assert rec["row"] == i and table["well"][i] == row["Metadata_Well"]
        assert table["site"][i] == int(row["Metadata_Site"])
        np.testing.assert_array_equal(rec["image"], _expected(row, MINI, illum))
    (store_dir,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, store_dir, jump_build.REPORT)) as f:
        report = json.load(f)
    assert report["engine"] == engine and report["skipped"] == []
    print(f"{plate} {name} {engine}: 16/16 sites equal pixel for pixel")


def test_illumination_correction_changes_the_records_and_is_optional(tmp_path):
    ld = _ld("BRMINI0201", name="load_data_with_illum.csv.gz")
    corrected, _ = _build(ld, tmp_path / "a")
    plain, _ = _build(ld, tmp_path / "b", illum=False)
    row = _rows(ld)[3]
    np.testing.assert_array_equal(plain[3]["image"], _expected(row, MINI, illum=False))
    assert np.abs(corrected[3]["image"].astype(int) - plain[3]["image"]).mean() > 1
    with pytest.raises(ValueError, match="FileName_IllumDNA"):
        _build(_ld("BRMINI0101"), tmp_path / "c", illum=True)


def test_bad_illumination_function_names_the_file(tmp_path):
    root = _copy(tmp_path)
    ld = _ld("BRMINI0201", root, "load_data_with_illum.csv.gz")
    bad = _file(_rows(ld)[0], "Illum", "ER", root)
    f = np.load(bad)
    f[3, 3] = 0.0
    np.save(bad, f)
    jump_build.read_illum.cache_clear()
    with pytest.raises(ValueError, match="BRMINI0201_IllumER.npy has non-finite or non-positive"):
        _build(ld, tmp_path / "c", root)
    np.save(bad, f[:32])
    jump_build.read_illum.cache_clear()
    with pytest.raises(ValueError, match=r"IllumER.npy has shape \(32, 64\)"):
        _build(ld, tmp_path / "c", root)


def _build_killed_at_site_10(tmp_path, monkeypatch):
    """A 4-shard build whose reader fails at the 10th site (row 9, shard 2).

    Returns:
      (load_data, the real reader, the rows read so far, the parts folder's name).
    """
    ld = _ld("UMINI0101")
    real, calls = jump_build.load_site, []

    def dies_after_9(plan, i):
        calls.append(i)
        if len(calls) > 9:
            raise RuntimeError("killed")
        return real(plan, i)

    monkeypatch.setattr(jump_build, "load_site", dies_after_9)
    with pytest.raises(RuntimeError, match="killed"):
        _build(ld, tmp_path, shard_sites=4)
    (parts,) = [d for d in os.listdir(tmp_path) if d.endswith(".parts")]
    return ld, real, calls, parts


def test_interrupted_build_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    ld, real, calls, parts = _build_killed_at_site_10(tmp_path, monkeypatch)
    finished = sorted(f for f in os.listdir(tmp_path / parts) if f.endswith(".json"))
    assert finished == ["part-00000.json", "part-00001.json"]  # shards of rows 0..7
    assert not [d for d in os.listdir(tmp_path) if d.startswith("jump_") and "." not in d]

    calls.clear()
    monkeypatch.setattr(jump_build, "load_site", lambda plan, i: calls.append(i) or real(plan, i))
    source, _ = _build(ld, tmp_path, shard_sites=4)
    assert sorted(calls) == list(range(8, 16))  # only the unfinished shards' sites
    (store_dir,) = [d for d in os.listdir(tmp_path) if "." not in d]
    with open(tmp_path / store_dir / jump_build.REPORT) as f:
        report = json.load(f)
    assert (report["shards"], report["shards_reused"], report["shards_built"]) == (4, 2, 2)
    assert (report["sites_reused"], report["sites_built"]) == (8, 8)
    assert not os.path.exists(tmp_path / parts)  # moved into the store
    rows = _rows(ld)
    for i in range(16):
        np.testing.assert_array_equal(source[i]["image"], _expected(rows[i], MINI, False))
    print(f"run 1: 2 of 4 shards finished before the failure; run 2: reused "
          f"{report['shards_reused']}, built {report['shards_built']} ({len(calls)} sites read)")


def test_a_part_damaged_while_the_build_waited_is_rewritten(tmp_path, monkeypatch):
    # A finished shard's part is trusted on resume only if its checksum still matches: a
    # part damaged in place (same size and mtime) is rewritten, not sealed into the store.
    from jaxadapt.data import store  # pylint: disable=g-import-not-at-top
    from tests.data.damage import flip_bytes  # pylint: disable=g-import-not-at-top
    ld, real, calls, parts = _build_killed_at_site_10(tmp_path, monkeypatch)
    flip_bytes(str(tmp_path / parts / "part-00000.array_record"), restore_mtime=True)
    calls.clear()
    monkeypatch.setattr(jump_build, "load_site", lambda plan, i: calls.append(i) or real(plan, i))
    source, _ = _build(ld, tmp_path, shard_sites=4)
    assert sorted(calls) == [*range(0, 4), *range(8, 16)]  # part 0 again, part 1 reused
    (root,) = [tmp_path / d for d in os.listdir(tmp_path) if "." not in d]
    with open(root / jump_build.REPORT) as f:
        assert json.load(f)["shards_reused"] == 1
    with open(root / "COMPLETE.json") as f:  # the parts' checksums became the store's
        checksums = json.load(f)["checksums"]
    assert all(store.file_digest(str(root / rel)) == d for rel, d in checksums.items())
    rows = _rows(ld)
    for i in range(16):
        np.testing.assert_array_equal(source[i]["image"], _expected(rows[i], MINI, False))


def test_progress_logs_rate_and_eta(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=jump_build.__name__):
        _build(_ld("UMINI0101"), tmp_path, shard_sites=8, progress_every_s=0.0)
    lines = [r.getMessage() for r in caplog.records if "sites/s" in r.getMessage()]
    assert lines and "ETA" in lines[0] and "16/16 sites (100%" in lines[-1]


def test_unknown_engine_and_policy_raise(tmp_path):
    with pytest.raises(ValueError, match="engine='spark'"):
        _build(_ld("UMINI0101"), tmp_path, engine="spark")
    with pytest.raises(ValueError, match="on_bad_site='ignore'"):
        _build(_ld("UMINI0101"), tmp_path, on_bad_site="ignore")


def test_package_imports_and_builds_without_apache_beam(tmp_path):
    code = ("import sys; sys.modules['apache_beam'] = None\n"
            "from jaxadapt.data.jump import beam, images, shards\n"
            "from tests.data import test_jump_build as t\n"
            f"src, _ = t._build(t._ld('UMINI0101'), {str(tmp_path)!r})\n"
            "print('ok', len(src))")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=repo), timeout=120, cwd=repo)
    assert out.stdout.strip().splitlines()[-1:] == ["ok 16"], out.stderr[-2000:]


# ----------------------------------------------------------------------------- bad input


def _skip_build(ld, tmp_path, root, **kw):
    source, table = _build(ld, tmp_path / "s", root, on_bad_site="skip", **kw)
    (store_dir,) = [d for d in os.listdir(tmp_path / "s") if "." not in d]
    with open(tmp_path / "s" / store_dir / jump_build.REPORT) as f:
        return source, table, json.load(f)["skipped"]


def _check_skipped(source, table, skipped, rows, root, bad_rows):
    """The skipped sites are exactly the bad ones; every other site is in the store."""
    assert [(s["well"], s["site"]) for s in skipped] == [
        (rows[i]["Metadata_Well"], int(rows[i]["Metadata_Site"])) for i in bad_rows]
    good = [r for i, r in enumerate(rows) if i not in bad_rows]
    assert len(source) == len(table) == len(good)
    for i, row in enumerate(good):
        assert (table["well"][i], table["site"][i]) == (row["Metadata_Well"],
                                                         int(row["Metadata_Site"]))
        np.testing.assert_array_equal(source[i]["image"], _expected(row, root, False))


@pytest.mark.parametrize("engine", ["local", "beam"])
def test_missing_tiff(tmp_path, engine):
    root = _copy(tmp_path)
    ld, rows = _ld("UMINI0101", root), _rows(_ld("UMINI0101", root))
    gone = _file(rows[5], "Orig", "RNA", root)
    os.remove(gone)
    with pytest.raises(ValueError, match=f"channel RNA: missing TIFF.*{os.path.basename(gone)}"):
        _build(ld, tmp_path / "r", root, engine=engine)
    source, table, skipped = _skip_build(ld, tmp_path, root, engine=engine)
    assert skipped[0]["reason"] == "channel RNA: missing TIFF" and skipped[0]["where"] == gone
    _check_skipped(source, table, skipped, rows, root, [5])


def _truncate(path: str) -> str:
    """Cuts a file to half its bytes (a truncated download); returns its path."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_without_header_scan_a_bad_file_fails_at_decode_naming_it(tmp_path):
    root = _copy(tmp_path)
    ld, rows = _ld("UMINI0101", root), _rows(_ld("UMINI0101", root))
    cut = _truncate(_file(rows[11], "Orig", "DNA", root))
    with pytest.raises(ValueError, match=r"UMINI0101/B01/2: cannot decode .*"
                                         f"{os.path.basename(cut)}"):
        _build(ld, tmp_path / "r", root, check_headers=False)
    os.remove(cut)
    with pytest.raises(ValueError, match=f"input file .*{os.path.basename(cut)} cannot be read"):
        _build(ld, tmp_path / "r", root, check_headers=False)
    with pytest.raises(ValueError, match="on_bad_site='skip' needs check_headers=True"):
        _build(ld, tmp_path / "r", root, check_headers=False, on_bad_site="skip")


def test_truncated_tiff(tmp_path):
    root = _copy(tmp_path)
    ld, rows = _ld("UMINI0101", root), _rows(_ld("UMINI0101", root))
    cut = _truncate(_file(rows[2], "Orig", "AGP", root))
    with pytest.raises(ValueError, match=f"channel AGP: (truncated|unreadable) TIFF.*"
                                         f"{os.path.basename(cut)}"):
        _build(ld, tmp_path / "r", root)
    source, table, skipped = _skip_build(ld, tmp_path, root)
    assert "TIFF" in skipped[0]["reason"] and skipped[0]["where"] == cut
    _check_skipped(source, table, skipped, rows, root, [2])


def test_channel_missing_from_load_data(tmp_path):
    root = _copy(tmp_path)
    rows = _rows(_ld("UMINI0101", root))
    rows[7]["FileName_OrigMito"] = ""
    ld = _write(str(tmp_path / "load_data.csv"), rows)
    with pytest.raises(ValueError, match="empty FileName_OrigMito.*line 9 column FileName_Orig"):
        _build(ld, tmp_path / "r", root)
    source, table, skipped = _skip_build(ld, tmp_path, root)
    assert skipped[0]["reason"] == "channel missing from load_data: empty FileName_OrigMito"
    _check_skipped(source, table, skipped, rows, root, [7])


def test_required_column_absent_raises_even_when_skipping(tmp_path):
    rows = _rows(_ld("UMINI0101"))
    ld = _write(str(tmp_path / "load_data.csv"), rows, drop=("PathName_OrigAGP",))
    for policy in ("raise", "skip"):
        with pytest.raises(ValueError, match=r"csv lacks column\(s\) \['PathName_OrigAGP'\]"):
            _build(ld, tmp_path / "r", on_bad_site=policy)
    ld = _write(str(tmp_path / "load_data.csv"), rows, drop=("Metadata_Batch",))
    with pytest.raises(ValueError, match="Metadata_Batch"):
        _build(ld, tmp_path / "r", on_bad_site="skip")


def test_plate_absent_from_plate_or_well_metadata(tmp_path):
    root = _copy(tmp_path)
    ld, rows = _ld("UMINI0101", root), _rows(_ld("UMINI0101", root))
    plates = [p for p in _rows(os.path.join(root, "metadata", "plate.csv.gz"))
              if p["Metadata_Plate"] != "UMINI0101"]
    plate_csv = _write(str(tmp_path / "plate.csv"), plates)
    with pytest.raises(ValueError, match="plate UMINI0101 .source_2/2021_02_01_Batch1. is absent "
                                         "from the plate table"):
        _build(ld, tmp_path / "r", root, plate_csv=plate_csv)
    wells = [w for w in _rows(os.path.join(root, "metadata", "well.csv.gz"))
             if w["Metadata_Plate"] != "UMINI0101"]
    _write(os.path.join(root, "metadata", "well.csv"), wells)
    with pytest.raises(ValueError, match="plate UMINI0101 of source_2 is absent from the well"):
        jump_images.build_jump_store(ld, os.path.join(root, "metadata", "well.csv"), _labels(),
                                     str(tmp_path / "r"), path_map={S3: root + "/"})
    # Skipping a whole plate leaves nothing to build: still an error, never an empty store.
    with pytest.raises(ValueError, match="every site of .* is excluded"):
        _build(ld, tmp_path / "s", root, plate_csv=plate_csv, on_bad_site="skip")
    # A plate listed in plate.csv builds; the report lists no skipped site.
    _, _, skipped = _skip_build(ld, tmp_path, root,
                                plate_csv=os.path.join(root, "metadata", "plate.csv.gz"))
    assert skipped == [] and len(rows) == 16


def test_images_of_inconsistent_sizes(tmp_path):
    root = _copy(tmp_path)
    ld, rows = _ld("UMINI0101", root), _rows(_ld("UMINI0101", root))
    for ch in CH5:  # site 4 is 48x48 in every channel
        path = _file(rows[4], "Orig", ch, root)
        tifffile.imwrite(path, tifffile.imread(path)[:48, :48])
    with pytest.raises(ValueError, match=r"size \(48, 48\) differs from the first site's \(64,"):
        _build(ld, tmp_path / "r", root)
    source, table, skipped = _skip_build(ld, tmp_path, root)
    _check_skipped(source, table, skipped, rows, root, [4])
    source, _ = _build(ld, tmp_path / "f", root, image_size=32)  # a fixed size fits every site
    assert len(source) == 16 and source[4]["image"].shape == (32, 32, 5)
    path = _file(rows[9], "Orig", "ER", root)  # one channel of a site of another size
    tifffile.imwrite(path, tifffile.imread(path)[:60])
    with pytest.raises(ValueError, match=r"channels differ in shape.*'ER': \(60, 64\)"):
        _build(ld, tmp_path / "g", root, image_size=32)


# ----------------------------------------------------------------------------- script


def _script():
    import importlib.util  # pylint: disable=g-import-not-at-top
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "build_jump_store", os.path.join(repo, "experiments", "build_jump_store.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_builds_the_store_its_study_opens(tmp_path, caplog):
    # The script takes a study's config and builds exactly the store that study opens:
    # the study then reuses it (one store directory, no second build).
    from jaxadapt.data import worlds
    from jaxadapt.eval import cli
    from tests.eval.tiny import set_keys  # pylint: disable=g-import-not-at-top

    cfg = set_keys(cli.load_config_file("configs/domain_gap.py"), {
        "data.source": "jump", "data.jump.root": MINI,
        "data.jump.load_data": ("cpg0016-jump/*/workspace/load_data_csv/*/*/load_data.csv.gz",),
        "data.jump.well_csv": "metadata/well.csv.gz", "data.jump.labels": "metadata/labels.csv",
        "data.jump.num_workers": 1, "data.crop_size": 24, "data.cache_dir": str(tmp_path),
        "train_sources": ("source_1",)})
    script = _script()  # defines absl flags: load it once
    line = script.build(cfg)
    assert line.startswith("store ready: 64 sites, 4 plates")
    stores = [d for d in os.listdir(tmp_path) if d.startswith("jump_") and "." not in d]
    assert len(stores) == 1
    with caplog.at_level(logging.INFO):
        source, _ = worlds.load_world(cfg)
    assert len(source) == 64 and "building" not in caplog.text.lower()
    assert [d for d in os.listdir(tmp_path) if d.startswith("jump_") and "." not in d] == stores
    with pytest.raises(ValueError, match="data.source='sim'"):
        script.build(cli.load_config_file("configs/domain_gap.py"))
