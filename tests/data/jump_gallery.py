"""A tiny generated Cell Painting Gallery in the real layout and schema, for loader tests.

`write_gallery(fs_root)` writes, under `fs_root` (a local directory or an fsspec URL):

  cpg0016-jump/<source>/images/<batch>/images/<plate>/<plate>_<well>_s<site>_<ch>.tiff
  cpg0016-jump/<source>/workspace/load_data_csv/<batch>/<plate>/load_data.csv.gz
  metadata/plate.csv.gz, metadata/well.csv.gz, metadata/labels.csv

load_data rows name their images by `PathName_Orig<ch> = s3://cellpainting-gallery/
cpg0016-jump/...` as JUMP's do, so reading them needs the root remapping. Two sources x
three batches x one COMPOUND plate (the 8 positive controls in 2 wells each, DMSO in 4),
plus one TARGET2 plate in source_3's first batch whose compounds have no label.
"""

from __future__ import annotations

import csv
import gzip
import io

import fsspec
import numpy as np
import tifffile

from jaxadapt.data import schema
from jaxadapt.data.sim import design


SOURCES = ("source_3", "source_8")
BATCHES = {s: tuple(f"2021_0{i + 1}_0{k}_Batch{k}" for k in range(1, 4))
           for i, s in enumerate(SOURCES)}
POSCONS = design.POSCONS
TARGET2_COMPOUNDS = ("JCP2022_000001", "JCP2022_000002")
RAW_SIZE = 72  # raw px; downsampled 2x -> 36


def plate_name(source: str, batch: str, kind: str = "COMPOUND") -> str:
    return f"{'T2' if kind == 'TARGET2' else 'BR'}{SOURCES.index(source)}{batch[-1]}"


def _layout(kind: str) -> list[tuple[str, str]]:
    """[(well, compound)] of a plate."""
    if kind == "TARGET2":
        return [("A01", TARGET2_COMPOUNDS[0]), ("A02", TARGET2_COMPOUNDS[1])]
    wells = [(f"B{2 * i + k + 1:02d}", c) for i, c in enumerate(POSCONS) for k in range(2)]
    return wells + [(f"P{k + 1:02d}", schema.DMSO) for k in range(4)]


def _write(fs, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _csv_bytes(rows: list[dict], gz: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    data = buf.getvalue().encode()
    return gzip.compress(data, mtime=0) if gz else data


def _tiff(rng: np.random.Generator, level: int) -> bytes:
    buf = io.BytesIO()
    img = rng.integers(0, 400, (RAW_SIZE, RAW_SIZE)) + level
    tifffile.imwrite(buf, img.astype(np.uint16))
    return buf.getvalue()


def _plates() -> list[tuple[str, str, str, str]]:
    out = [(s, b, plate_name(s, b), "COMPOUND") for s in SOURCES for b in BATCHES[s]]
    s, b = SOURCES[0], BATCHES[SOURCES[0]][0]
    return out + [(s, b, plate_name(s, b, "TARGET2"), "TARGET2")]


def write_gallery(fs_root: str, *, seed: int = 0) -> dict[str, str]:
    """Writes the gallery under `fs_root`; returns paths relative to it by name.

    Args:
      fs_root: local directory or fsspec URL (e.g. "memory://gallery").
      seed: pixel seed.

    Returns:
      {"load_data": glob of every load_data table, "well_csv", "plate_csv", "labels"}.
    """
    fs, _, _ = fsspec.core.get_fs_token_paths(fs_root)
    root = fs_root.rstrip("/")
    rng = np.random.default_rng(seed)
    wells, plates = [], []
    for source, batch, plate, kind in _plates():
        plates.append({"Metadata_Source": source, "Metadata_Batch": batch,
                       "Metadata_Plate": plate, "Metadata_PlateType": kind})
        rel = f"cpg0016-jump/{source}/images/{batch}/images/{plate}/"
        rows = []
        for well, compound in _layout(kind):
            wells.append({"Metadata_Source": source, "Metadata_Plate": plate,
                          "Metadata_Well": well, "Metadata_JCP2022": compound})
            row = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
                   "Metadata_Well": well, "Metadata_Site": "1"}
            for c, ch in enumerate(schema.CHANNELS):
                name = f"{plate}_{well}_s1_{ch}.tiff"
                _write(fs, f"{root}/{rel}{name}", _tiff(rng, 100 * c))
                row[f"FileName_Orig{ch}"] = name
                row[f"PathName_Orig{ch}"] = f"s3://cellpainting-gallery/{rel}"
            rows.append(row)
        _write(fs, f"{root}/cpg0016-jump/{source}/workspace/load_data_csv/{batch}/{plate}/"
               "load_data.csv.gz", _csv_bytes(rows, gz=True))
    _write(fs, f"{root}/metadata/plate.csv.gz", _csv_bytes(plates, gz=True))
    _write(fs, f"{root}/metadata/well.csv.gz", _csv_bytes(wells, gz=True))
    labels = [{"Metadata_JCP2022": c, "label": str(k), "moa": design.POSCON_MOA[c]}
              for k, c in enumerate(POSCONS)]
    _write(fs, f"{root}/metadata/labels.csv", _csv_bytes(labels, gz=False))
    return {"load_data": "cpg0016-jump/*/workspace/load_data_csv/*/*/load_data.csv.gz",
            "well_csv": "metadata/well.csv.gz", "plate_csv": "metadata/plate.csv.gz",
            "labels": "metadata/labels.csv"}


def jump_config(cfg, gallery_root: str, paths: dict[str, str], **changes):
    """Points study config `cfg` at a gallery written by `write_gallery`; returns `cfg`."""
    cfg.data.source = "jump"
    j = cfg.data.jump
    j.root = gallery_root
    j.load_data = (paths["load_data"],)
    j.well_csv, j.plate_csv, j.labels = paths["well_csv"], paths["plate_csv"], paths["labels"]
    j.plate_types = ("COMPOUND",)
    for key, value in changes.items():
        j[key] = value
    return cfg
