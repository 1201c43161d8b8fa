"""Derives `jaxadapt/data/sim/resources/jump-target/JUMP-Target-2_layout.csv` from real JUMP tables.

One row per well of the JUMP-Target-2 384-well plate: the well, its JCP2022 compound id,
the compound's InChIKey, name and control type (JUMP-Target, MIT), and its Drug
Repurposing Hub MoA annotation (jump-cellpainting/compound-annotator, BSD-3; several MoAs
pipe-joined in sorted order, "" when none). The JCP2022 id of each well is read from the
layout shared by most TARGET2 plates of `well.csv.gz` (85 of its 119 TARGET2 plates); that
layout maps InChIKeys to JCP2022 ids one to one (302 ids incl. DMSO).

    python experiments/derive_target2_layout.py /path/to/shared/data > JUMP-Target-2_layout.csv
"""

from __future__ import annotations

import collections
import csv
import gzip
import pathlib
import sys


def _tsv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _modal_target2_layout(meta: pathlib.Path) -> dict[str, str]:
    """Returns well -> JCP2022 of the layout most TARGET2 plates of well.csv.gz share."""
    with gzip.open(meta / "plate.csv.gz", "rt", newline="") as f:
        target2 = {r["Metadata_Plate"] for r in csv.DictReader(f) if r["Metadata_PlateType"] == "TARGET2"}
    wells: dict[str, dict[str, str]] = collections.defaultdict(dict)
    with gzip.open(meta / "well.csv.gz", "rt", newline="") as f:
        for r in csv.DictReader(f):
            if r["Metadata_Plate"] in target2:
                wells[r["Metadata_Plate"]][r["Metadata_Well"]] = r["Metadata_JCP2022"]
    layouts = collections.Counter(tuple(sorted(w.items())) for w in wells.values())
    return dict(layouts.most_common(1)[0][0])


def main(data: pathlib.Path) -> None:
    platemap = _tsv(data / "jump-target" / "JUMP-Target-2_compound_platemap.tsv")
    meta = {r["broad_sample"]: r for r in _tsv(data / "jump-target" / "JUMP-Target-2_compound_metadata.tsv")}
    jcp = _modal_target2_layout(data / "jump-cp-metadata")
    moas: dict[str, set[str]] = collections.defaultdict(set)
    with gzip.open(data / "jump-compound-annotator" / "compound_rephub_annot.csv.gz", "rt", newline="") as f:
        for r in csv.DictReader(f):
            moas[r["Metadata_InChIKey"]].update(m for m in r["Metadata_moa"].split("|") if m)
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["Metadata_Well", "Metadata_JCP2022", "InChIKey", "pert_iname", "control_type", "moa"])
    for r in platemap:
        m = meta.get(r["broad_sample"])
        if m is None:  # an empty well: DMSO only
            out.writerow([r["well_position"], jcp[r["well_position"]], "", "DMSO", "negcon", ""])
        else:
            out.writerow([r["well_position"], jcp[r["well_position"]], m["InChIKey"], m["pert_iname"],
                          m["control_type"], "|".join(sorted(moas.get(m["InChIKey"], ())))])


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
