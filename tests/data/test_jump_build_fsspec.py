"""The JUMP builder (checks, plan, shards) reading through fsspec, several tables, subsets.

The miniature real gallery (tests/data/jump_mini, CC0) is copied into fsspec's memory file
system: TIFF headers, pixels, illumination functions, tables and store-key stamps are then
all read through `jaxadapt.data.fileio`, and the records must equal the local build's.
"""

import os

import fsspec
import numpy as np
import pytest
from tests.data import test_jump_build as local

from jaxadapt.data.jump import build as jump_build, images as jump_images
from jaxadapt.data.jump.load_data import Subset


MEM = "memory://jaxadapt-mini"


@pytest.fixture
def mem_gallery():
    fs = fsspec.filesystem("memory")
    for dirpath, _, files in os.walk(local.MINI):
        for name in files:
            if name.endswith((".py", ".md")):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), local.MINI)
            with open(os.path.join(dirpath, name), "rb") as f:
                fs.pipe(f"{MEM}/{rel}", f.read())
    yield MEM
    fs.rm("/jaxadapt-mini", recursive=True)


def _mem_build(ld_rel: str, data_dir, **kw):
    return jump_images.build_jump_store(
        ld_rel if isinstance(ld_rel, str) else list(ld_rel), f"{MEM}/metadata/well.csv.gz",
        local._labels(), str(data_dir), path_map={local.S3: MEM + "/"}, num_workers=1, **kw)


def _rel(plate: str, name: str = "load_data.csv.gz") -> str:
    return MEM + "/" + os.path.relpath(local._ld(plate, name=name), local.MINI)


def test_illumination_corrected_build_through_fsspec_equals_the_local_one(mem_gallery, tmp_path):
    jump_build.read_illum.cache_clear()
    ld = "load_data_with_illum.csv.gz"
    want, want_table = local._build(local._ld("BRMINI0201", name=ld), tmp_path / "a")
    got, table = _mem_build(_rel("BRMINI0201", ld), tmp_path / "b", engine="local",
                            shard_sites=5, plate_csv=f"{MEM}/metadata/plate.csv.gz")
    assert len(got) == len(want) == 16
    np.testing.assert_array_equal(table["well"], want_table["well"])
    for i in range(16):
        np.testing.assert_array_equal(got[i]["image"], want[i]["image"])
    # Reopening reads the stamps through fsspec again: the same key, no new store.
    stores = sorted(os.listdir(tmp_path / "b"))
    _mem_build(_rel("BRMINI0201", ld), tmp_path / "b", shard_sites=5,
               plate_csv=f"{MEM}/metadata/plate.csv.gz")
    assert sorted(os.listdir(tmp_path / "b")) == stores


def test_several_tables_with_a_subset_check_and_build_only_the_subset(mem_gallery, tmp_path):
    fs = fsspec.filesystem("memory")
    # A truncated TIFF of a plate outside the subset: never checked, never an error.
    rows = local._rows(local._ld("BRMINI0101"))
    bad = local._file(rows[0], "Orig", "DNA", MEM)
    fs.pipe(bad, fs.cat(bad)[:200])
    tables = [_rel("BRMINI0101"), _rel("UMINI0101")]
    got, table = _mem_build(tables, tmp_path / "a", subset=Subset(sources=("source_2",)))
    want, want_table = local._build(local._ld("UMINI0101"), tmp_path / "b")
    assert table.unique("plate").tolist() == ["UMINI0101"] and len(got) == len(want)
    for i in range(len(want)):
        np.testing.assert_array_equal(got[i]["image"], want[i]["image"])
    # Without the subset the bad file is named (fsspec size vs the TIFF's data offsets).
    with pytest.raises(ValueError, match=r"channel DNA: (truncated|unreadable) TIFF"):
        _mem_build(tables, tmp_path / "c")
    _, kept = _mem_build(tables, tmp_path / "d", on_bad_site="skip")
    assert len(kept) == 16 + len(want) - 1
