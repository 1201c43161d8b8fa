"""Rebuilds the profile test data from the real files (run by hand; tests never run it).

    python tests/data/profiles/make_test_data.py <lincs SQ00015054 csv.gz> <BR00121431_main.csv>

Writes, beside this script (see SOURCE.md for origins and licences):
- lincs_SQ00015054_f65.csv / .parquet: the real LINCS plate, every well, 7 metadata columns
  and every 7th of its 454 features (65), values unchanged.
- BR00121431_main.csv.gz: the real JUMP TARGET2 well-level profiles, unchanged, gzipped;
  BR00121431_plate.csv / _well.csv: its plate.csv / well.csv rows (source_4, batch from
  its real path, compounds from the real JUMP-Target-2 layout).
- mini/: a RE-TILING of the LINCS plate into 2 pseudo sources x 3 batches x 1 plate (the
  numbers mean nothing; the multi-plate path is the point) and its label table.
"""

import os
import sys

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
META = ["Metadata_Plate", "Metadata_Well", "Metadata_Batch_Number", "Metadata_broad_sample",
        "Metadata_pert_type", "Metadata_moa", "Metadata_mmoles_per_liter"]
LAYOUT = os.path.join(HERE, "..", "..", "..", "jaxadapt", "data", "resources", "jump-target",
                      "JUMP-Target-2_layout.csv")


def lincs(path: str) -> pd.DataFrame:
    df = pd.read_csv(path)
    feats = [c for c in df.columns if not c.startswith("Metadata_")][::7]
    small = df[META + feats]
    small.to_csv(os.path.join(HERE, "lincs_SQ00015054_f65.csv"), index=False)
    small.to_parquet(os.path.join(HERE, "lincs_SQ00015054_f65.parquet"), index=False)
    return small


def target2(path: str) -> None:
    df = pd.read_csv(path)
    df.to_csv(os.path.join(HERE, "BR00121431_main.csv.gz"), index=False)
    pd.DataFrame({"Metadata_Source": ["source_4"], "Metadata_Batch": ["2021_04_20_Target2"],
                  "Metadata_Plate": ["BR00121431"], "Metadata_PlateType": ["TARGET2"]}).to_csv(
        os.path.join(HERE, "BR00121431_plate.csv"), index=False)
    layout = pd.read_csv(LAYOUT)
    wells = layout[layout.Metadata_Well.isin(df.Metadata_Well)][["Metadata_Well", "Metadata_JCP2022"]]
    wells.insert(0, "Metadata_Plate", "BR00121431")
    wells.insert(0, "Metadata_Source", "source_4")
    wells.to_csv(os.path.join(HERE, "BR00121431_well.csv"), index=False)


def mini(df: pd.DataFrame) -> None:
    """Deals the 384 real wells round-robin (sorted by compound) into 6 pseudo plates."""
    df = df.sort_values(["Metadata_broad_sample", "Metadata_Well"], kind="stable").reset_index(drop=True)
    tile = np.arange(len(df)) % 6  # every compound has 6, 12 or 24 wells: spread evenly
    sources = np.where(tile < 3, "lincs_a", "lincs_b")
    df = df.drop(columns=["Metadata_Batch_Number", "Metadata_pert_type", "Metadata_mmoles_per_liter"])
    df.insert(0, "Metadata_Source", sources)
    df.insert(1, "Metadata_Batch", [f"{s}_batch{t % 3 + 1}" for s, t in zip(sources, tile)])
    df["Metadata_Plate"] = [f"SQ00015054_tile{t}" for t in tile]
    out = os.path.join(HERE, "mini")
    os.makedirs(out, exist_ok=True)
    df[df.Metadata_Source == "lincs_a"].to_parquet(os.path.join(out, "lincs_a.parquet"), index=False)
    df[df.Metadata_Source == "lincs_b"].to_csv(os.path.join(out, "lincs_b.csv.gz"), index=False)
    per = df.groupby("Metadata_moa")["Metadata_Well"].size()
    classes = sorted(per[per >= 12].index)  # the 7 MoAs with 12 wells (2 per pseudo plate)
    lab = df[df.Metadata_moa.isin(classes)][["Metadata_broad_sample", "Metadata_moa"]].drop_duplicates()
    lab = lab.rename(columns={"Metadata_broad_sample": "compound", "Metadata_moa": "moa"})
    lab.insert(1, "label", [classes.index(m) for m in lab.moa])
    lab.sort_values("compound").to_csv(os.path.join(out, "labels.csv"), index=False)


if __name__ == "__main__":
    small = lincs(sys.argv[1])
    target2(sys.argv[2])
    mini(small)
