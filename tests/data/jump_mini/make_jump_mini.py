"""One-off generator of the miniature JUMP gallery in this folder (see SOURCE.md).

Reads the two real CC0 fields in ../shared/data (BBBC022 crop: 16-bit DNA/ER/RNA;
CellProfiler ExampleHuman: 8-bit DNA/PH3/cell body), cuts them into 32x32 tiles and
re-tiles four tiles (each cut at the same position in every channel) into 64x64
16-bit 5-channel sites, written as one TIFF per site and channel with JUMP's
Phenix file names, plus JUMP-schema tables. Tests read only the output; only this
script reads ../shared. Deterministic (fixed seed): re-running rewrites the same bytes.

Run from the repository root:  python tests/data/jump_mini/make_jump_mini.py
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil

import numpy as np
import tifffile

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("JAXADAPT_SHARED_DATA", "/work/shared/data")
BBBC = os.path.join(SHARED, "images-bbbc022-cellpainting-crop", "IXMtest_A02_s9.tif")
CPH = [os.path.join(SHARED, "images-cellprofiler-examplehuman",
                    f"AS_09125_050116030001_D03f00d{i}.tif") for i in range(3)]

S3 = "s3://cellpainting-gallery/cpg0016-jump"
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
# Phenix channel numbers of JUMP source_4 plates (BR00121431's Image.csv): ch1 Mito,
# ch2 AGP, ch3 RNA, ch4 ER, ch5 DNA.
CH_NUMBER = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}
TILE, SITE_PX, SITES_PER_WELL = 32, 64, 2
DMSO = "JCP2022_033924"
# Real JUMP positive controls (jump-cp-metadata perturbation_control.csv) as the classes.
CLASSES = [("JCP2022_025848", "dexamethasone", "glucocorticoid receptor agonist"),
           ("JCP2022_037716", "AMG900", "Aurora kinase inhibitor"),
           ("JCP2022_046054", "FK-866", "NAMPT inhibitor")]
# Plate layout (the same on every plate): 2 DMSO wells + 2 wells per class.
LAYOUT = [("A01", DMSO), ("B02", DMSO)] + [
    (w, c[0]) for c, ws in zip(CLASSES, [("A02", "B03"), ("A03", "B01"), ("A04", "B04")])
    for w in ws]
# (source, batch, plate, acquisition folder suffix, image field)
PLATES = [
    ("source_1", "2021_01_11_Batch1", "BRMINI0101", "2021-01-12T10_00_00", "bbbc022"),
    ("source_1", "2021_01_18_Batch2", "BRMINI0201", "2021-01-19T10_00_00", "bbbc022"),
    ("source_1", "2021_01_25_Batch3", "BRMINI0301", "2021-01-26T10_00_00", "bbbc022"),
    ("source_2", "2021_02_01_Batch1", "UMINI0101", "2021-02-02T10_00_00", "examplehuman"),
]
ILLUM_PLATE = "BRMINI0201"  # the plate that also gets load_data_with_illum + illum/*.npy


def fields() -> dict[str, np.ndarray]:
    """The two real fields as 16-bit [5, H, W] stacks (AGP and Mito are placeholders,
    see `site_stack`)."""
    bbbc = tifffile.imread(BBBC)  # uint16 [3, 395, 695]: DNA, ER, RNA
    # 8 -> 16 bit: x * 257 maps 0..255 onto 0..65535 exactly (255 * 257 = 65535).
    cph = np.stack([tifffile.imread(p) for p in CPH]).astype(np.uint16) * 257
    # ExampleHuman d0 = DNA, d2 = cell body (-> ER), d1 = PH3 (-> RNA).
    return {"bbbc022": bbbc, "examplehuman": cph[[0, 2, 1]]}


def site_stack(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uint16 [5, 64, 64] site: a 2x2 mosaic of 32x32 tiles cut at random positions
    of the real field (each tile at the same position in DNA/ER/RNA). AGP and Mito are
    re-tiled crops of the real ER and RNA channels taken at other random positions."""
    _, h, w = field.shape

    def mosaic(chans: list[int]) -> np.ndarray:
        out = np.empty((len(chans), SITE_PX, SITE_PX), np.uint16)
        for ty in range(2):
            for tx in range(2):
                y, x = rng.integers(0, h - TILE), rng.integers(0, w - TILE)
                out[:, ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE] = \
                    field[chans, y:y + TILE, x:x + TILE]
        return out

    dna_er_rna = mosaic([0, 1, 2])
    agp = mosaic([1])  # ER (ConA / cell body) crops elsewhere in the field
    mito = mosaic([2])  # RNA (SYTO14 / PH3) crops elsewhere in the field
    return np.concatenate([dna_er_rna, agp, mito])


def illum_function(channel_index: int) -> np.ndarray:
    """A smooth vignetting field like CellProfiler's CorrectIlluminationCalculate output
    (float32, about 1 in the centre, darker at the edges, mean ~1)."""
    yy, xx = np.mgrid[0:SITE_PX, 0:SITE_PX] / (SITE_PX - 1) - 0.5
    cy, cx = 0.05 * (channel_index - 2), -0.04 * (channel_index - 2)
    f = 1.2 - 0.9 * ((yy - cy) ** 2 + (xx - cx) ** 2)
    return (f / f.mean()).astype(np.float32)


def _write_csv_gz(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    # mtime=0: the gzip bytes do not change between runs.
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue().encode())


def _well_rc(well: str) -> tuple[int, int]:
    return ord(well[0]) - ord("A") + 1, int(well[1:])


def write_plate(source, batch, plate, stamp, field, rng, wells_rows) -> None:
    img_rel = f"{source}/images/{batch}/images/{plate}__{stamp}-Measurement1/Images"
    os.makedirs(os.path.join(HERE, "cpg0016-jump", img_rel), exist_ok=True)
    illum = plate == ILLUM_PLATE
    illum_rel = f"{source}/images/{batch}/illum/{plate}"
    funcs = {ch: illum_function(i) for i, ch in enumerate(CHANNELS)}
    if illum:
        os.makedirs(os.path.join(HERE, "cpg0016-jump", illum_rel), exist_ok=True)
        for ch, f in funcs.items():
            np.save(os.path.join(HERE, "cpg0016-jump", illum_rel, f"{plate}_Illum{ch}.npy"), f)
    rows, rows_illum = [], []
    for well, compound in LAYOUT:
        wells_rows.append({"Metadata_Source": source, "Metadata_Plate": plate,
                           "Metadata_Well": well, "Metadata_JCP2022": compound})
        r, c = _well_rc(well)
        for site in range(1, SITES_PER_WELL + 1):
            stack = site_stack(field, rng)
            if illum:  # this plate was imaged through a vignetting: raw = clean * illum
                stack = np.stack([np.clip(np.rint(stack[i] * funcs[ch]), 0, 65535)
                                  for i, ch in enumerate(CHANNELS)]).astype(np.uint16)
            row = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
                   "Metadata_Well": well, "Metadata_Site": str(site)}
            for i, ch in enumerate(CHANNELS):
                name = f"r{r:02d}c{c:02d}f{site:02d}p01-ch{CH_NUMBER[ch]}sk1fk1fl1.tiff"
                tifffile.imwrite(os.path.join(HERE, "cpg0016-jump", img_rel, name), stack[i],
                                 compression="zlib", predictor=True, metadata=None)
                row[f"FileName_Orig{ch}"] = name
            for ch in CHANNELS:
                row[f"PathName_Orig{ch}"] = f"{S3}/{img_rel}/"
            rows.append(row)
            with_illum = dict(row)
            for ch in CHANNELS:
                with_illum[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
            for ch in CHANNELS:
                with_illum[f"PathName_Illum{ch}"] = f"{S3}/{illum_rel}/"
            rows_illum.append(with_illum)
    ld_dir = os.path.join(HERE, "cpg0016-jump", source, "workspace", "load_data_csv", batch, plate)
    _write_csv_gz(os.path.join(ld_dir, "load_data.csv.gz"), rows)
    if illum:
        _write_csv_gz(os.path.join(ld_dir, "load_data_with_illum.csv.gz"), rows_illum)


def main() -> None:
    shutil.rmtree(os.path.join(HERE, "cpg0016-jump"), ignore_errors=True)
    shutil.rmtree(os.path.join(HERE, "metadata"), ignore_errors=True)
    src = fields()
    rng = np.random.default_rng(20260101)
    wells_rows: list[dict] = []
    for source, batch, plate, stamp, field in PLATES:
        write_plate(source, batch, plate, stamp, src[field], rng, wells_rows)
    _write_csv_gz(os.path.join(HERE, "metadata", "plate.csv.gz"), [
        {"Metadata_Source": s, "Metadata_Batch": b, "Metadata_Plate": p,
         "Metadata_PlateType": "COMPOUND"} for s, b, p, _, _ in PLATES])
    _write_csv_gz(os.path.join(HERE, "metadata", "well.csv.gz"), wells_rows)
    with open(os.path.join(HERE, "metadata", "labels.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Metadata_JCP2022", "Metadata_Name", "label", "moa"])
        for k, (jcp, name, moa) in enumerate(CLASSES):
            writer.writerow([jcp, name, k, moa])


if __name__ == "__main__":
    main()
