"""Experimental design of a simulated Cell Painting study: config, presets, site table.

The design is real where the real JUMP tables say something: the well positions of the
DMSO and positive-control wells on COMPOUND plates (source_3 `well.csv.gz`), the batch and
plate names of each source (`plate.csv.gz`), and each source's microscope
(`microscope_config.csv`). The `jump_target2` preset takes the real JUMP-Target-2 layout
and MoA classes (`jaxadapt.data.sim.target2`) and the real TARGET2 batches and plates. These
tables ship in `jaxadapt/data/sim/resources/` (see the ORIGIN.md files there); the package
never reads anything else at run time.

Reproduce the default design:
    python -c "from jaxadapt.data.sim.design import *; print(len(build_design(default_sim_config())))"
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import pathlib

import ml_collections
import numpy as np

from jaxadapt.data.schema import DMSO, NO_LABEL, SiteTable
from jaxadapt.data.sim import target2


RESOURCES = pathlib.Path(__file__).parent / "resources"
PRESETS = ("jump_poscon", "jump_target2")
#: plate.csv plate type of each preset's plates.
PLATE_TYPE = {"jump_poscon": "COMPOUND", "jump_target2": "TARGET2"}
ROWS = "ABCDEFGHIJKLMNOP"  # 384-well plate: 16 rows x 24 columns

#: JUMP positive controls (perturbation_control.csv) with a short mechanism note from
#: public pharmacology (AMG900: Aurora kinase inhibitor, etc.); label = sorted index.
POSCON_MOA: dict[str, str] = {
    "JCP2022_012818": "DYRK inhibitor",  # TC-S-7004
    "JCP2022_025848": "glucocorticoid receptor agonist",  # dexamethasone
    "JCP2022_035095": "TGF-beta receptor inhibitor",  # LY2109761
    "JCP2022_037716": "Aurora kinase inhibitor",  # AMG900
    "JCP2022_046054": "NAMPT inhibitor",  # FK-866
    "JCP2022_050797": "sodium channel blocker",  # quinidine
    "JCP2022_064022": "PAK inhibitor",  # NVS-PAK1-1
    "JCP2022_085227": "cathepsin inhibitor",  # aloxistatin
}
POSCONS: tuple[str, ...] = tuple(sorted(POSCON_MOA))


def stable_hash(text: str, bits: int = 32) -> int:
    """Returns a platform-independent hash of `text` (blake2b), `bits` <= 63 bits wide."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


@functools.lru_cache(maxsize=None)
def microscopes() -> dict[str, dict[str, str]]:
    """Returns the real `microscope_config.csv` as source -> row (read-only, cached)."""
    with open(RESOURCES / "jump-cp-metadata" / "microscope_config.csv", newline="") as f:
        return {r["Metadata_Source"]: r for r in csv.DictReader(f)}


@functools.lru_cache(maxsize=None)
def real_plates(plate_type: str = "COMPOUND") -> dict[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    """Returns source -> ((batch, (plate, ...)), ...) for plates of `plate_type`, file order."""
    out: dict[str, dict[str, list[str]]] = {}
    with gzip.open(RESOURCES / "jump-cp-metadata" / "plate.csv.gz", "rt", newline="") as f:
        for r in csv.DictReader(f):
            if r["Metadata_PlateType"] == plate_type:
                batches = out.setdefault(r["Metadata_Source"], {})
                batches.setdefault(r["Metadata_Batch"], []).append(r["Metadata_Plate"])
    return {s: tuple((b, tuple(p)) for b, p in d.items()) for s, d in out.items()}


@functools.lru_cache(maxsize=None)
def compound_plate_layout() -> tuple[tuple[str, str], ...]:
    """Returns ((well, JCP2022 id), ...): the real DMSO + positive-control wells of COMPOUND plates."""
    with open(RESOURCES / "jump-cp-metadata" / "compound_plate_controls.csv", newline="") as f:
        return tuple((r["Metadata_Well"], r["Metadata_JCP2022"]) for r in csv.DictReader(f))


def default_sim_config(preset: str = "jump_poscon") -> ml_collections.ConfigDict:
    """Returns every knob of the simulator for a preset (the `data.sim` sub-config).

    Severity knobs multiply the spread of each level of technical variation: 0 turns a
    level off, 1 is the default (modelled on real JUMP/LINCS shifts), 2 doubles it.

    Args:
      preset: study design; one of PRESETS.

    Returns:
      A ConfigDict; see the inline comments for each knob.
    """
    if preset not in PRESETS:
        raise ValueError(
            f"sim preset={preset!r} is unknown; use one of {PRESETS}"
        )
    c = ml_collections.ConfigDict()
    c.preset = preset
    if preset == "jump_poscon":
        c.sources = ("source_3", "source_8")  # keys of microscope_config.csv
        c.batches_per_source = 6  # real batch names first (plate.csv), then synthetic ones
        c.plates_per_batch = 2
        c.sites_per_well = 9  # as real JUMP source_3 and source_8
    else:  # jump_target2, CPU-sized: 4 sources x 3 batches x 1 plate x 384 wells x 1 site.
        # Real TARGET2 batches only (see study_plates). Full size, every TARGET2 plate of
        # CODA's sources: sources=MAIN_SOURCES + AUX_SOURCES, batches_per_source=23,
        # plates_per_batch=2 (73 plates; source_3 25, source_5 24, source_8 4, source_11 7,
        # source_7 7, source_10 6) and sites_per_well=9 (real count of all these sources but
        # source_10, which takes 6; the simulator uses one count for every source).
        # Build time of the CPU default (4,608 sites at 64 px, 2 loaded cores): ~46 s.
        c.sources = target2.MAIN_SOURCES
        c.batches_per_source = 3  # the first real TARGET2 batches of each source (plate.csv order)
        c.plates_per_batch = 1  # at most this many real plates of each batch
        c.sites_per_well = 1
    c.image_size = 64  # pixels per side
    c.binning = 4.0  # image px = binning x camera px; keeps ~20 cells in a 64 px field
    c.seed = 0
    c.clean = False  # True: same cells, no technical variation at all
    c.chunk_size = 256  # sites per jitted call
    c.max_cells = 48  # cells per site are drawn up to this cap (padding)
    c.reference_pixel_um = 0.65  # pixel size used in clean mode

    b = c.biology = ml_collections.ConfigDict()
    b.cells_per_mm2 = 900.0  # DMSO seeding density (~20 cells per 64 px field at 0.6 um)
    b.nucleus_radius_um = 6.0
    b.cell_radius_um = 13.0
    # Multiplies every class direction. 2.4: the share of treated wells that lose more than
    # half their cells matches the real LINCS share (0.15; experiments/calibrate_simulator.py).
    # At 1.6 (before partial penetrance) ERM stopped early at epoch 2 (in domain 0.55).
    b.effect_size = 2.4
    b.compound_deviation = 0.3  # compound-specific deviation, relative to its MoA direction
    # Partial penetrance: the fraction of a treated well's cells that respond, logit-normal
    # over wells (no real single-cell data of these compounds ship with the package).
    b.penetrance = 0.75
    b.penetrance_well_sd = 0.5  # logit units
    b.well_sd = 0.04  # well-to-well biological noise of the phenotype (log units)
    # Calibrated on real data (experiments/calibrate_simulator.py prints both side by side):
    b.well_density_sd = 0.12  # LINCS DMSO wells: within-plate sd of log count 0.14 (incl. counting)
    b.nucleus_size_sd = 0.16  # log radius; JUMP BR00121431 nuclei: sd of log area 0.30-0.35
    b.cell_size_sd = 0.22  # log radius; BR00121431 cells: sd of log area 0.36-0.56
    b.intensity_sd = 0.16  # log mean intensity per compartment; BR00121431: 0.10-0.20

    s = c.severity = ml_collections.ConfigDict()
    s.source = 1.0
    s.batch = 1.0
    s.plate = 1.0
    s.well = 1.0

    t = c.technical = ml_collections.ConfigDict()
    # source (lab / microscope); blur and pixel size come from microscope_config.csv
    t.source_gain_sd = 0.35  # per-channel log gain (filter set, laser power, exposure)
    t.source_offset = 0.03  # max per-channel camera offset (fraction of full scale)
    t.source_crosstalk = 0.08  # max bleed-through into a neighbouring channel
    t.source_gamma_sd = 0.08  # log-sd of the intensity non-linearity exponent
    t.widefield_blur_px = 0.9  # extra optical blur (px) at NA 1.0; confocal gets half
    t.widefield_haze = 0.25  # out-of-focus light, fraction of the channel mean
    t.vignetting = 0.25  # max relative fall-off at the field corner
    t.photons = 120.0  # photons per unit intensity (shot noise); confocal LED gets less
    t.read_noise = 0.012  # camera read noise (fraction of full scale)
    t.background = 0.03  # max per-channel background (fraction of full scale)
    # batch (one experiment run)
    t.batch_stain_sd = 0.16  # per-channel log stain concentration
    t.batch_density_sd = 0.13  # log seeding density (LINCS replicate batches: ~1.4k-2.4k cells/well)
    t.batch_strength_sd = 0.10  # log phenotype strength (incubation time)
    t.batch_focus_sd = 0.23  # focus offset, px of extra blur
    # plate
    t.plate_gradient = 0.1  # max illumination gradient across the field
    t.plate_gain_sd = 0.05  # per-channel log gain jitter
    t.plate_density_sd = 0.05  # log seeding density; LINCS: sd of plate DMSO medians in a batch 0.05
    t.edge_intensity = 0.08  # evaporation: relative intensity rise in outer rows/cols
    t.edge_count = 0.15  # evaporation: relative cell-count loss in outer rows/cols
    # well / site
    t.site_focus_sd = 0.25  # px of extra blur
    t.site_intensity_sd = 0.03  # log gain per channel
    t.debris_rate = 0.01  # chance a site holds a bright debris particle
    t.empty_rate = 0.004  # chance a site holds no cells
    return c


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming field, value and fix for an unusable design config.

    Args:
      cfg: the `data.sim` config (see `default_sim_config`).

    Raises:
      ValueError: for the first unusable knob; messages start with `sim <field>`.
    """
    if cfg.preset not in PRESETS:
        raise ValueError(f"sim preset={cfg.preset!r} is unknown; use one of {PRESETS}")
    for field in ("batches_per_source", "plates_per_batch", "sites_per_well", "max_cells", "chunk_size"):
        value = cfg[field]
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"sim {field}={value!r} must be a positive integer; set it to e.g. 1 or more")
    if not isinstance(cfg.image_size, (int, np.integer)) or cfg.image_size < 16:
        raise ValueError(
            f"sim image_size={cfg.image_size!r} is too small; cells need at least 16 px (use 32-64)"
        )
    if len(cfg.sources) == 0:
        raise ValueError("sim sources=() is empty; give at least one, e.g. ('source_3',)")
    known = microscopes()
    for src in cfg.sources:
        if src not in known:
            raise ValueError(
                f"sim sources contains unknown source {src!r}; use sources listed in "
                f"microscope_config.csv: {sorted(known)}"
            )
    if cfg.preset == "jump_target2":
        have = real_plates("TARGET2")
        for src in cfg.sources:
            if src not in have:
                raise ValueError(f"sim sources contains {src!r}, which has no TARGET2 plates in "
                                 f"plate.csv; for jump_target2 use some of {sorted(have)}")
    if len(set(cfg.sources)) != len(cfg.sources):
        raise ValueError(f"sim sources={tuple(cfg.sources)} has duplicates; list each source once")
    for field in ("source", "batch", "plate", "well"):
        if cfg.severity[field] < 0:
            raise ValueError(f"sim severity.{field}={cfg.severity[field]} must be >= 0 (0 turns it off)")
    b = cfg.biology
    if not 0.0 <= b.penetrance <= 1.0:
        raise ValueError(f"sim biology.penetrance={b.penetrance} must lie in [0, 1] "
                         "(the fraction of a treated well's cells that respond)")
    for field in ("well_sd", "well_density_sd", "nucleus_size_sd", "cell_size_sd",
                  "intensity_sd", "penetrance_well_sd", "compound_deviation"):
        if b[field] < 0:
            raise ValueError(f"sim biology.{field}={b[field]} must be >= 0 (a spread)")
    if cfg.binning <= 0:
        raise ValueError(f"sim binning={cfg.binning} must be > 0; use e.g. 4.0")


def study_plates(cfg: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """Returns (source, batch, plate) of the study: real names first, synthetic beyond them.

    jump_poscon: real batches and COMPOUND plate barcodes of each source are taken in
    `plate.csv` order; batches with fewer real plates than `plates_per_batch` are skipped.
    When a source has too few, synthetic names `<source>_simB<k>` / `<batch>_simP<k>` fill
    up (deterministically), so every source has exactly `batches_per_source` batches of
    `plates_per_batch` plates.

    jump_target2: only real TARGET2 batches and plates: the first `batches_per_source`
    TARGET2 batches of each source (plate.csv order), each with its first
    `plates_per_batch` plates; a source with fewer batches, or a batch with fewer plates,
    contributes what it has (most real TARGET2 batches hold one plate).
    """
    if cfg.preset == "jump_target2":
        return [(src, batch, p) for src in cfg.sources
                for batch, plates in real_plates("TARGET2")[src][: cfg.batches_per_source]
                for p in plates[: cfg.plates_per_batch]]
    out = []
    for src in cfg.sources:
        real = [(b, p) for b, p in real_plates().get(src, ()) if len(p) >= cfg.plates_per_batch]
        for k in range(cfg.batches_per_source):
            if k < len(real):
                batch, plates = real[k][0], real[k][1][: cfg.plates_per_batch]
            else:
                batch = f"{src}_simB{k:02d}"
                plates = tuple(f"{batch}_simP{j:02d}" for j in range(cfg.plates_per_batch))
            out.extend((src, batch, p) for p in plates)
    return out


def num_classes(preset: str) -> int:
    """Returns the number of classes (labels 0..K-1) of a preset."""
    return len(POSCONS) if preset == "jump_poscon" else len(target2.moa_classes())


def plate_layout(preset: str) -> list[tuple[str, str, str, int]]:
    """Returns [(well, compound, moa, label)] of one plate of the preset, sorted by well."""
    if preset == "jump_target2":
        return target2.plate_layout()
    layout = []
    for well, jcp in compound_plate_layout():
        if jcp == DMSO:
            layout.append((well, DMSO, "", NO_LABEL))
        else:
            layout.append((well, jcp, POSCON_MOA[jcp], POSCONS.index(jcp)))
    return sorted(layout)


def build_design(cfg: ml_collections.ConfigDict) -> SiteTable:
    """Builds the table of every site image of the study.

    Args:
      cfg: the simulator config (`default_sim_config()` or the `data.sim` sub-config).

    Returns:
      A SiteTable with SITE_FIELDS plus `site_id` (int64, a 62-bit hash of
      source/batch/plate/well/site, so it does not depend on any other knob), `row`, `col`
      (0-based), `is_edge` (outer row or column) and `site_key` is NOT stored: derive it with
      `simulator.site_key(cfg.seed, site_id)`.

    Raises:
      ValueError: for unusable knobs (naming the field, value and fix).
    """
    check_config(cfg)
    layout = plate_layout(cfg.preset)
    rows = []
    for src, batch, plate in study_plates(cfg):
        for well, compound, moa, label in layout:
            for site in range(cfg.sites_per_well):
                rows.append((src, batch, plate, well, site, compound, moa, label))
    cols = list(zip(*rows))
    r = np.array([ROWS.index(w[0]) for w in cols[3]], np.int64)
    c = np.array([int(w[1:]) - 1 for w in cols[3]], np.int64)
    site_id = np.array(
        [stable_hash(f"{s}/{b}/{p}/{w}/{i}", bits=62) for s, b, p, w, i, *_ in rows], np.int64
    )
    if len(np.unique(site_id)) != len(site_id):  # 62-bit hash: practically never
        raise ValueError("site_id hash collision; rename a batch or plate of the study")
    columns = {
        "source": np.array(cols[0]),
        "batch": np.array(cols[1]),
        "plate": np.array(cols[2]),
        "well": np.array(cols[3]),
        "site": np.array(cols[4], np.int64),
        "compound": np.array(cols[5]),
        "moa": np.array(cols[6]),
        "label": np.array(cols[7], np.int64),
        "is_control": np.array(cols[5]) == DMSO,
        "site_id": site_id,
        "row": r,
        "col": c,
        "is_edge": (r == 0) | (r == len(ROWS) - 1) | (c == 0) | (c == 23),
    }
    return SiteTable(columns)
