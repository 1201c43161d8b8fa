"""The simulator's biology beside real Cell Painting measurements, computed the same way.

Three kinds of real data ship in `resources/calibration/` (see ORIGIN.md there):
LINCS per-well cell counts of 136 plates in 5 replicate batches, one LINCS plate of
well-level CellProfiler profiles, and the per-cell tables of two JUMP TARGET2 wells. The
statistics below are defined once and applied to a real table and to the simulator's
own measurements of the cells it draws (`sim_render.make_feature_kernel`: areas, mean
intensities, compartment distribution of every cell, the same cells the images show):

- cell number: within-plate, plate-to-plate and batch-to-batch spread of DMSO wells'
  log counts, and how far treated wells' counts move from their plate's DMSO wells;
- profiles: how far treated wells sit from DMSO in DMSO standard deviations, feature by
  feature, summarized per feature family (shape, intensity, distribution);
- cells: the cell-to-cell spread (sd of log) of areas and mean intensities in one well.

`experiments/calibrate_simulator.py` prints the table.
"""

from __future__ import annotations

import csv
import gzip
from typing import Iterable, NamedTuple

import ml_collections
import numpy as np

from jaxadapt.data.schema import DMSO
from jaxadapt.data.sim import design, effects as sim_effects, render as sim_render, simulator


RESOURCES = design.RESOURCES / "calibration"

#: Feature families: CellProfiler name prefixes (real) and simulator features (sim).
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (("Cells_AreaShape", "Nuclei_AreaShape", "Cytoplasm_AreaShape"),
              ("Nuclei_Area", "Cells_Area", "Nuclei_Eccentricity", "Cells_Eccentricity")),
    "intensity": (("Cells_Intensity", "Nuclei_Intensity", "Cytoplasm_Intensity"),
                  ("MeanIntensity_DNA", "MeanIntensity_ER", "MeanIntensity_RNA",
                   "MeanIntensity_AGP", "MeanIntensity_Mito")),
    "distribution": (("Cells_RadialDistribution", "Cytoplasm_RadialDistribution",
                      "Nuclei_RadialDistribution", "Cells_Granularity",
                      "Cytoplasm_Granularity", "Nuclei_Granularity"),
                     ("Nucleoli_Intensity", "Golgi_Intensity", "AGP_RingFraction",
                      "Mito_RadialSpread")),
}
QUANTILES = (0.5, 0.9, 0.99)


class Stat(NamedTuple):
    """One row of the calibration table."""

    name: str
    definition: str
    simulator: str
    real: str


# ----------------------------------------------------------------- statistics


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    _, inv = np.unique(keys, return_inverse=True)
    return [np.flatnonzero(inv == g) for g in range(inv.max() + 1)] if len(keys) else []


def count_spreads(batch: np.ndarray, plate: np.ndarray, is_control: np.ndarray,
                  count: np.ndarray) -> dict[str, float]:
    """Spreads of DMSO wells' log cell counts at three levels.

    Args:
      batch, plate: per-well batch and plate names.
      is_control: per-well DMSO flag.
      count: per-well cell count (> 0).

    Returns:
      ``well_sd``: median over plates of the sd (ddof 1) of log counts of its DMSO wells;
      ``plate_sd``: median over batches of the sd of its plates' median DMSO log count;
      ``batch_sd``: sd over batches of the batch mean of plate medians.
    """
    log_c = np.log(np.maximum(count, 1))
    well_sd, plate_med, plate_batch = [], [], []
    for rows in _groups(plate):
        ctrl = rows[is_control[rows]]
        if len(ctrl) > 1:
            well_sd.append(np.std(log_c[ctrl], ddof=1))
            plate_med.append(np.median(log_c[ctrl]))
            plate_batch.append(batch[ctrl[0]])
    plate_med, plate_batch = np.array(plate_med), np.array(plate_batch)
    by_batch = [plate_med[g] for g in _groups(plate_batch)]
    return {
        "well_sd": float(np.median(well_sd)),
        "plate_sd": float(np.median([np.std(m, ddof=1) for m in by_batch if len(m) > 1])),
        "batch_sd": float(np.std([m.mean() for m in by_batch], ddof=1)),
    }


def count_effects(plate: np.ndarray, is_control: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Log fold change of each treated well's count against its plate's DMSO median.

    Returns:
      float [n_treated] log(count / median DMSO count of the plate).
    """
    log_c = np.log(np.maximum(count, 1))
    out = []
    for rows in _groups(plate):
        ctrl = rows[is_control[rows]]
        out.append(log_c[rows[~is_control[rows]]] - np.median(log_c[ctrl]))
    return np.concatenate(out) if out else np.zeros(0)


def dmso_z(features: np.ndarray, is_control: np.ndarray) -> np.ndarray:
    """Treated wells' features in DMSO standard deviations (one plate).

    Args:
      features: float [wells, F] well-level profiles of one plate.
      is_control: bool [wells].

    Returns:
      float [treated wells, F]: (x - median DMSO) / sd DMSO (ddof 1) per feature.
    """
    ctrl = features[is_control]
    sd = np.std(ctrl, axis=0, ddof=1)
    return (features[~is_control] - np.median(ctrl, axis=0)) / np.where(sd > 0, sd, np.inf)


def family_distance(z: np.ndarray, names: Iterable[str], members: Iterable[str]) -> np.ndarray:
    """Median |z| over a family's features, per treated well (members: name prefixes)."""
    members = tuple(members)
    cols = [i for i, n in enumerate(names) if n.startswith(members)]
    if not cols:
        raise ValueError(f"no feature starts with any of {members}; check the feature names")
    return np.median(np.abs(z[:, cols]), axis=1)


def log_sd_in_wells(values: np.ndarray, well: np.ndarray) -> float:
    """Median over wells of the sd (ddof 1) of log(values) of the cells of a well."""
    sds = [np.std(np.log(values[g]), ddof=1) for g in _groups(well) if len(g) > 2]
    return float(np.median(sds))


# ----------------------------------------------------------------- real tables


def real_counts() -> dict[str, np.ndarray]:
    """LINCS batch-1 per-well cell counts: batch, plate, is_control, count (52,223 wells)."""
    with gzip.open(RESOURCES / "lincs_batch1_cell_counts.csv.gz", "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"batch": np.array([r["batch_number"] for r in rows]),
            "plate": np.array([r["plate"] for r in rows]),
            "is_control": np.array([r["broad_sample"] == "DMSO" for r in rows]),
            "count": np.array([int(r["cell_count"]) for r in rows], np.int64)}


def real_profiles() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The LINCS SQ00015054 plate: (features [384, 454], is_control [384], feature names)."""
    with gzip.open(RESOURCES / "SQ00015054_normalized_feature_select.csv.gz", "rt") as f:
        rows = list(csv.reader(f))
    head = rows[0]
    cols = [i for i, c in enumerate(head) if not c.startswith("Metadata_")]
    sample = head.index("Metadata_broad_sample")
    x = np.array([[float(r[i]) for i in cols] for r in rows[1:]])
    return x, np.array([r[sample] == "DMSO" for r in rows[1:]]), [head[i] for i in cols]


def real_cells() -> dict[str, np.ndarray]:
    """Per-cell table of two JUMP TARGET2 wells: well, object (Cells/Nuclei), measurements."""
    with open(RESOURCES / "BR00121431_cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {k: np.array([r[k] for r in rows]) for k in ("well", "object")}
    for k in rows[0]:
        if k.startswith(("AreaShape", "Intensity")):
            out[k] = np.array([float(r[k]) for r in rows])
    return out


# ----------------------------------------------------------------- simulator


class SimWells(NamedTuple):
    """The simulator's measurements, per well and per cell.

    Attributes:
      batch, plate, compound: per well.
      is_control: per well (DMSO).
      count: per well, cells summed over its sites.
      profile: float [wells, len(CELL_FEATURES)], the median over the well's cells.
      cell_well: int [cells] well index of every cell; cell_features: [cells, F] (log).
    """

    batch: np.ndarray
    plate: np.ndarray
    compound: np.ndarray
    is_control: np.ndarray
    count: np.ndarray
    profile: np.ndarray
    cell_well: np.ndarray
    cell_features: np.ndarray


def measure_simulator(cfg: ml_collections.ConfigDict, chunk: int = 512) -> SimWells:
    """Draws every cell of the design of `cfg` (no pixels) and measures it per well.

    Args:
      cfg: a simulator config (`design.default_sim_config()` or `data.sim`).
      chunk: sites per jitted call.

    Returns:
      SimWells of every well of the study.
    """
    table = design.build_design(cfg)
    tech = sim_effects.technical(table, cfg)
    bio = sim_effects.phenotype(table, cfg, tech["strength"])
    keys = np.asarray(sim_effects.site_key(cfg.seed, table["site_id"]))
    kernel = sim_render.make_feature_kernel(int(cfg.image_size), int(cfg.max_cells),
                                            simulator.bio_items(cfg))
    f32 = lambda a: np.asarray(a, np.float32)
    feats, on = [], []
    for s in range(0, len(table), chunk):
        idx = np.minimum(np.arange(s, s + chunk), len(table) - 1)  # one compiled shape
        f, o, _ = kernel(keys[idx], {k: f32(v[idx]) for k, v in bio.items()},
                         {k: f32(v[idx]) for k, v in tech.items()})
        keep = min(chunk, len(table) - s)
        feats.append(np.asarray(f)[:keep])
        on.append(np.asarray(o)[:keep] > 0)
    feats, on = np.concatenate(feats), np.concatenate(on)
    well_key = np.char.add(np.char.add(table["plate"], "/"), table["well"])
    uniq, first, site_well = np.unique(well_key, return_index=True, return_inverse=True)
    cell_well = np.broadcast_to(site_well[:, None], on.shape)[on]
    cell_features = feats[on]
    # Cells grouped by well once (sorted), then one median per well; empty wells get NaN.
    order = np.argsort(cell_well, kind="stable")
    per_well = np.split(cell_features[order], np.cumsum(np.bincount(cell_well, minlength=len(uniq)))[:-1])
    profile = np.stack([np.median(c, axis=0) if len(c) else np.full(feats.shape[-1], np.nan)
                        for c in per_well])
    return SimWells(
        batch=np.char.add(np.char.add(table["source"][first], "/"), table["batch"][first]),
        plate=table["plate"][first], compound=table["compound"][first],
        is_control=table["compound"][first] == DMSO,
        count=np.bincount(site_well, weights=on.sum(1), minlength=len(uniq)),
        profile=profile, cell_well=cell_well, cell_features=cell_features)


def _sim_z(wells: SimWells) -> tuple[np.ndarray, np.ndarray]:
    """Treated wells' profiles in DMSO sd of their plate; returns (z, compound)."""
    zs, comps = [], []
    for rows in _groups(wells.plate):
        ok = rows[np.isfinite(wells.profile[rows]).all(1)]
        zs.append(dmso_z(wells.profile[ok], wells.is_control[ok]))
        comps.append(wells.compound[ok][~wells.is_control[ok]])
    return np.concatenate(zs), np.concatenate(comps)


# ----------------------------------------------------------------- the table


def _q(values: np.ndarray) -> str:
    return " / ".join(f"{v:.2f}" for v in np.quantile(values, QUANTILES))


def _per_class(values: np.ndarray, compound: np.ndarray) -> str:
    """Median per class, sorted: the spread of the 8 classes."""
    med = sorted(float(np.median(values[compound == c])) for c in np.unique(compound))
    return ", ".join(f"{v:.2f}" for v in med)


def calibration_table(cfg: ml_collections.ConfigDict) -> list[Stat]:
    """Every calibration statistic, simulator (config `cfg`) beside real.

    Args:
      cfg: the simulator config to measure.

    Returns:
      Stat rows in table order.
    """
    real, sim = real_counts(), measure_simulator(cfg)
    rs = count_spreads(real["batch"], real["plate"], real["is_control"], real["count"])
    ss = count_spreads(sim.batch, sim.plate, sim.is_control, sim.count)
    rows = [Stat(f"cell count: {k.replace('_sd', '')} sd",
                 f"sd of log cell count of DMSO wells, {what}", f"{ss[k]:.3f}", f"{rs[k]:.3f}")
            for k, what in (("well_sd", "within a plate (median over plates)"),
                            ("plate_sd", "of plate medians within a batch"),
                            ("batch_sd", "of batch means"))]
    rd = count_effects(real["plate"], real["is_control"], real["count"])
    sd_ = count_effects(sim.plate, sim.is_control, sim.count)
    # count_effects walks the plates in sorted order: label its wells the same way
    treated = np.concatenate([sim.compound[r][~sim.is_control[r]] for r in _groups(sim.plate)])
    rows.append(Stat("cell count: treated abs. log change", "quantiles 50/90/99 % over treated "
                     "wells of abs(log(count / plate DMSO median))", _q(np.abs(sd_)), _q(np.abs(rd))))
    rows.append(Stat("cell count: wells losing > 50 %", "share of treated wells",
                     f"{np.mean(sd_ < np.log(0.5)):.3f}", f"{np.mean(rd < np.log(0.5)):.3f}"))
    rows.append(Stat("cell count: per-class log change (sim)", "median per class, sorted",
                     _per_class(sd_, treated), "(library of many compounds: see quantiles)"))
    x, ctrl, names = real_profiles()
    rz = dmso_z(x, ctrl)
    sz, comp = _sim_z(sim)
    for fam, (real_prefixes, sim_names) in FAMILIES.items():
        r = family_distance(rz, names, real_prefixes)
        s = family_distance(sz, sim_render.CELL_FEATURES, sim_names)
        rows.append(Stat(f"profile: {fam} distance", "quantiles 50/90/99 % over treated wells "
                         "of the median abs(z) over the family's features (z in DMSO sd)",
                         _q(s), _q(r)))
        rows.append(Stat(f"profile: {fam} distance per class (sim)", "median per class, sorted",
                         _per_class(s, comp), "-"))
    rows += _cell_rows(sim)
    return rows


def _cell_rows(sim: SimWells) -> list[Stat]:
    cells = real_cells()
    ctrl_cells = sim.is_control[sim.cell_well]
    names = list(sim_render.CELL_FEATURES)
    out = []
    for label, obj, real_col, sim_col in (
            ("cell area", "Cells", "AreaShape_Area", "Cells_Area"),
            ("nucleus area", "Nuclei", "AreaShape_Area", "Nuclei_Area"),
            *[(f"mean intensity {c}", "Cells", f"Intensity_MeanIntensity_{c}",
               f"MeanIntensity_{c}") for c in ("DNA", "ER", "RNA", "AGP", "Mito")]):
        sel = cells["object"] == obj
        real = log_sd_in_wells(cells[real_col][sel], cells["well"][sel])
        feat = sim.cell_features[ctrl_cells, names.index(sim_col)]
        sim_sd = log_sd_in_wells(np.exp(feat), sim.cell_well[ctrl_cells])
        out.append(Stat(f"cells: {label} spread", "sd of log over the cells of a well "
                        "(median over wells; sim: DMSO wells)", f"{sim_sd:.3f}", f"{real:.3f}"))
    return out


def markdown(rows: list[Stat]) -> str:
    """The table as Markdown."""
    lines = ["| statistic | simulator | real | definition |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.simulator} | {r.real} | {r.definition} |" for r in rows]
    return "\n".join(lines)
