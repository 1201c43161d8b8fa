"""Real-data worlds by config: a generated gallery in the real layout, read locally, through
fsspec's memory and local file systems, as parquet, by subset; and the errors of bad paths."""

import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from tests.data import jump_gallery as gallery

from jaxadapt import config
from jaxadapt.data import fileio, schema, worlds
from jaxadapt.data.jump import sites as jump_sites


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gallery"))
    return root, gallery.write_gallery(root)


def _cfg(gallery_root, paths, cache, **changes):
    cfg = gallery.jump_config(config.get_defaults(), gallery_root, paths, **changes)
    cfg.data.cache_dir = str(cache)
    cfg.data.crop_size = 32  # the generated sites are 36 px, the miniature gallery's 32
    return cfg


def _site_pixels(root: str, table, i: int) -> np.ndarray:
    """An independent read of site i: its five TIFFs, preprocessed as documented."""
    rel = (f"cpg0016-jump/{table['source'][i]}/images/{table['batch'][i]}/images/"
           f"{table['plate'][i]}")
    stack = np.stack([tifffile.imread(os.path.join(
        root, rel, f"{table['plate'][i]}_{table['well'][i]}_s1_{ch}.tiff"))
        for ch in schema.CHANNELS])
    return jump_sites.preprocess(stack)


def test_local_gallery_by_config_has_the_design_labels_and_pixels(local, tmp_path):
    root, paths = local
    source, table = worlds.load_world(_cfg(root, paths, tmp_path))
    # 2 sources x 3 batches x 1 COMPOUND plate x 20 wells; the TARGET2 plate is left out.
    assert len(table) == 120 and len(source) == 120
    assert table.unique("source").tolist() == list(gallery.SOURCES)
    assert len(table.unique("batch")) == 6 and len(table.unique("plate")) == 6
    assert not any(p.startswith("T2") for p in table.unique("plate"))
    assert table["is_control"].sum() == 24
    np.testing.assert_array_equal(table["compound"][table["is_control"]], schema.DMSO)
    for k, c in enumerate(gallery.POSCONS):
        assert set(table["label"][table["compound"] == c].tolist()) == {k}
        assert set(table["moa"][table["compound"] == c].tolist()) != {""}
    for i in (0, 57, 119):
        np.testing.assert_array_equal(source[i]["image"], _site_pixels(root, table, i))


def test_memory_filesystem_reads_the_same_world_and_keeps_its_store(local, tmp_path):
    root, paths = local
    _, want = worlds.load_world(_cfg(root, paths, tmp_path / "a"))
    mem = "memory://jaxadapt-test-gallery"
    gallery.write_gallery(mem)  # same seed: the same bytes
    try:
        cfg = _cfg(mem, paths, tmp_path / "b")
        source, table = worlds.load_world(cfg)
        for key in ("plate", "well", "compound", "label", "is_control"):
            np.testing.assert_array_equal(table[key], want[key])
        np.testing.assert_array_equal(source[5]["image"], _site_pixels(root, table, 5))
        stores = os.listdir(tmp_path / "b")
        worlds.load_world(cfg)  # reopened: same key (URL stamps are stable), no new store
        assert os.listdir(tmp_path / "b") == stores and len(stores) == 1
        # A changed image file changes the key: a new store.
        fs = fsspec.filesystem("memory")
        name = fileio.expand(f"{mem}/cpg0016-jump/source_8/images/*/images/*/*_DNA.tiff")[0]
        fs.pipe(name, fs.cat(name))
        worlds.load_world(cfg)
        assert len(os.listdir(tmp_path / "b")) == 2
    finally:
        fsspec.filesystem("memory").rm("/jaxadapt-test-gallery", recursive=True)


def test_file_url_root_reads_through_fsspecs_local_filesystem(local, tmp_path):
    root, paths = local
    _, want = worlds.load_world(_cfg(root, paths, tmp_path / "a"))
    # file:// root: tables and images read through fsspec's local file system.
    _, table = worlds.load_world(_cfg(f"file://{root}", paths, tmp_path / "b"))
    np.testing.assert_array_equal(table["well"], want["well"])


def test_parquet_load_data_and_subsets(local, tmp_path):
    root, paths = local
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    for path in fileio.expand(os.path.join(root, paths["load_data"])):
        header, rows = fileio.read_table(path)
        plate = rows[0]["Metadata_Plate"]
        cols = {c: [r[c] for r in rows] for c in header}
        cols["Metadata_Site"] = [int(s) for s in cols["Metadata_Site"]]  # typed, as JUMP's
        pq.write_table(pa.table(cols), pq_dir / f"{plate}.parquet")
    keep = (gallery.POSCONS[0], gallery.POSCONS[3], schema.DMSO)
    cfg = _cfg(root, paths, tmp_path / "c", load_data=(str(pq_dir / "*.parquet"),),
               sources=("source_8",), batches=gallery.BATCHES["source_8"][:2], compounds=keep)
    _, table = worlds.load_world(cfg)
    assert table.unique("source").tolist() == ["source_8"]
    assert len(table.unique("batch")) == 2
    assert set(table["compound"].tolist()) == set(keep)
    assert len(table) == 2 * (2 + 2 + 4)
    np.testing.assert_array_equal(np.unique(table["label"]), [-1, 0, 3])


@pytest.mark.parametrize("change, match", [
    ({"root": "/nonexistent/gallery"}, r"config.data.jump.root='/nonexistent/gallery' is not a "
                                       "directory"),
    ({"load_data": ("nope/*/load_data.csv",)}, r"config.data.jump.load_data: 'nope/\*/load_data"
                                               r".csv' .* matches no file"),
    ({"compounds": (gallery.POSCONS[0], "JCP2022_999999", schema.DMSO)},
     r"config.data.jump.compounds lists 1 compound\(s\) absent from the label table "
     r".*JCP2022_999999"),
    ({"plate_types": ()},
     r"2 compound\(s\) absent from label_map.*JCP2022_000001.*drop_unlabelled"),
    ({"well_csv": "metadata/none.csv.gz"}, r"table .*none.csv.gz does not exist"),
    ({"labels": "metadata/plate.csv.gz"}, r"label table .*plate.csv.gz has columns"),
])
def test_path_and_table_mistakes_are_named(local, tmp_path, change, match):
    root, paths = local
    with pytest.raises(ValueError, match=match):
        worlds.load_world(_cfg(root, paths, tmp_path, **change))


def test_too_few_model_classes_are_named(local, tmp_path):
    root, paths = local
    cfg = _cfg(root, paths, tmp_path)
    cfg.model.num_classes = 4
    with pytest.raises(ValueError, match=r"config.model.num_classes=4: .* set "
                                         r"--config.model.num_classes=8"):
        worlds.load_world(cfg)


def test_crops_larger_than_the_stored_images_are_named(local, tmp_path):
    root, paths = local
    cfg = _cfg(root, paths, tmp_path)
    cfg.data.crop_size = 40
    with pytest.raises(ValueError, match=r"config.data.crop_size=40 exceeds the stored JUMP "
                                         r"images 36x36 .* set --config.data.crop_size=36"):
        worlds.load_world(cfg)


def test_drop_unlabelled_keeps_the_labelled_sites(local, tmp_path):
    root, paths = local
    _, table = worlds.load_world(_cfg(root, paths, tmp_path, plate_types=(),
                                      drop_unlabelled=True))
    assert len(table) == 120  # the TARGET2 plate's two sites were dropped


def test_sim_source_is_the_simulator(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(worlds.LOADERS, "sim", lambda cfg: calls.append(cfg) or ("s", "t"))
    cfg = config.get_defaults()
    assert worlds.load_world(cfg) == ("s", "t") and calls == [cfg]
    assert worlds.stats_sample(cfg) is None
    cfg.data.source = "jump"
    assert worlds.stats_sample(cfg) == cfg.data.jump.stats_sample


MINI = os.path.join(os.path.dirname(__file__), "jump_mini")
MINI_PATHS = {"load_data": "cpg0016-jump/*/workspace/load_data_csv/*/*/load_data.csv.gz",
              "well_csv": "metadata/well.csv.gz", "plate_csv": "metadata/plate.csv.gz",
              "labels": "metadata/labels.csv"}


def test_miniature_real_gallery_loads_pixel_exact_and_splits_by_its_real_batches(tmp_path):
    from jaxadapt.data import splits

    cfg = _cfg(MINI, MINI_PATHS, tmp_path)
    source, table = worlds.load_world(cfg)
    assert len(table) == 64 and table.unique("source").tolist() == ["source_1", "source_2"]
    assert table["is_control"].sum() == 16 and sorted(np.unique(table["label"])) == [-1, 0, 1, 2]
    # An independent read: the load_data row of site 0 names its Phenix files (ch5 = DNA...).
    _, rows = fileio.read_table(fileio.expand(os.path.join(MINI, MINI_PATHS["load_data"]))[0])
    row = rows[0]
    folder = row["PathName_OrigDNA"].replace("s3://cellpainting-gallery/", MINI + "/")
    raw = np.stack([tifffile.imread(os.path.join(folder, row[f"FileName_Orig{ch}"]))
                    for ch in schema.CHANNELS])
    assert raw.dtype == np.uint16 and raw.shape == (5, 64, 64)
    first = np.flatnonzero((table["plate"] == row["Metadata_Plate"])
                           & (table["well"] == row["Metadata_Well"])
                           & (table["site"] == int(row["Metadata_Site"])))[0]
    np.testing.assert_array_equal(source[first]["image"], jump_sites.preprocess(raw))
    # Splits deal source_1's real batch names; source_2 is the new source.
    rows_of = splits.make_splits(table, train_source="source_1", cfg=cfg.splits)
    batches = {k: set(table["batch"][v].tolist()) for k, v in rows_of.items()}
    assert len(batches["validation"]) == len(batches["new_batch"]) == 1
    assert batches["train"] == batches["in_domain"] and len(batches["train"]) == 1
    dealt = set().union(*[batches[k] for k in ("train", "validation", "new_batch")])
    assert dealt == set(table["batch"][table["source"] == "source_1"].tolist()) and len(dealt) == 3
    assert set(table["source"][rows_of["new_source"]].tolist()) == {"source_2"}
    assert worlds.stats_sample(cfg) == cfg.data.jump.stats_sample


def test_builtin_label_tables_match_the_simulator_classes(local, tmp_path):
    root, paths = local
    _, from_file = worlds.load_world(_cfg(root, paths, tmp_path / "a"))
    _, builtin = worlds.load_world(_cfg(root, paths, tmp_path / "b", labels="builtin:jump_poscon"))
    for key in ("compound", "label", "moa"):
        np.testing.assert_array_equal(builtin[key], from_file[key])
    labels, moa = worlds.read_labels("builtin:jump_target2", (schema.DMSO,))
    assert len(labels) == 145 and len(set(labels.values())) == 58 == max(labels.values()) + 1
    assert schema.DMSO not in labels and len(moa) == 301
    with pytest.raises(ValueError, match=r"no such built-in label table; use one of "
                                         r"\['builtin:jump_poscon', 'builtin:jump_target2'\]"):
        worlds.read_labels("builtin:poscons", (schema.DMSO,))


def _tiff_of(root: str, source: str, kind: str, ch: str) -> str:
    """The first site's `ch` TIFF of `source`'s first plate of `kind` in a written gallery."""
    prefix = "T2" if kind == "TARGET2" else "BR"
    return fileio.expand(f"{root}/cpg0016-jump/{source}/images/*/images/{prefix}*/*_{ch}.tiff")[0]


def test_bad_sites_from_config_raise_or_are_skipped_and_reported(tmp_path, caplog):
    root = str(tmp_path / "g")
    paths = gallery.write_gallery(root)
    gone = _tiff_of(root, "source_3", "COMPOUND", "RNA")
    os.remove(gone)
    # Outside the subset (the TARGET2 plates): never checked, never an error.
    os.remove(_tiff_of(root, "source_3", "TARGET2", "DNA"))
    with pytest.raises(ValueError, match=f"1 bad site.*channel RNA: missing TIFF.*"
                                         f"{os.path.basename(gone)}.*on_bad_site='skip'"):
        worlds.load_world(_cfg(root, paths, tmp_path / "a"))
    caplog.set_level("WARNING", logger="jaxadapt.data.jump.images")
    _, table = worlds.load_world(_cfg(root, paths, tmp_path / "b", on_bad_site="skip"))
    assert len(table) == 119
    report = [r.getMessage() for r in caplog.records if "build_report.json" in r.getMessage()]
    assert len(report) == 1, caplog.records
    path = report[0].split(" in ")[-1]
    with open(path) as f:
        skipped = json.load(f)["skipped"]
    assert [s["where"] for s in skipped] == [gone] and skipped[0]["source"] == "source_3"


def test_beam_engine_from_config_builds_the_same_world(local, tmp_path):
    root, paths = local
    small = {"sources": ("source_8",), "batches": gallery.BATCHES["source_8"][:1]}
    source, table = worlds.load_world(_cfg(root, paths, tmp_path / "a", **small))
    cfg = _cfg(root, paths, tmp_path / "b", engine="beam", shard_sites=7, **small)
    beam_source, beam_table = worlds.load_world(cfg)
    assert len(beam_table) == len(table) == 20
    for key in ("plate", "well", "compound", "label"):
        np.testing.assert_array_equal(beam_table[key], table[key])
    for i in range(len(table)):
        np.testing.assert_array_equal(beam_source[i]["image"], source[i]["image"])


def test_builder_options_pass_through_from_config():
    j = config.get_defaults().data.jump
    assert worlds.builder_options(j) == {
        "engine": "local", "on_bad_site": "raise", "illum": None, "shard_sites": 256,
        "check_headers": True, "progress_every_s": 30.0, "beam_runner": None,
        "beam_options": None}
    j.illum, j.on_bad_site, j.beam_runner = "off", "skip", "DirectRunner"
    got = worlds.builder_options(j)
    assert (got["illum"], got["on_bad_site"], got["beam_runner"]) == (False, "skip",
                                                                      "DirectRunner")
