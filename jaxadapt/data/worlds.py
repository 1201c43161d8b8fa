"""The data a study runs on, chosen by `config.data.source`: simulator, JUMP images, profiles.

`load_world(cfg) -> (source, table)` looks the loader up in `LOADERS` (one entry per data
source), so a study, its splits and its methods are the same whichever data it reads:

- "sim": the simulated study (`tfds_sim.load_simulated(cfg.data.sim, ...)`).
- "jump": Cell Painting Gallery images (`jump_images.build_jump_store`) from the tables
  of `cfg.data.jump`: per-plate load_data files, JUMP's well (and plate) table, and a
  label table compound -> class. Relative paths are under `cfg.data.jump.root`, the local
  copy of the gallery (or an fsspec URL such as `s3://cellpainting-gallery`).
  `PathName_*` values under `remote_prefix` (`s3://cellpainting-gallery/`) are read from
  the same place under root. The builder's options (engine "local"/"beam", bad sites
  raised or skipped and reported, illumination correction, shards) come from the same
  section.
- "jump_profiles": well-level CellProfiler profiles (`profiles.load_profile_world`) from
  `cfg.data.profiles`, as 1 x 1 records for `model.name = "mlp"`.

Which config keys a source never reads (`inert_keys`) is declared here beside its loader,
so the checkpoint keys (`jaxadapt.methods.registry.checkpoint_key`) leave them out.

Channel statistics for normalization read at most `stats_sample(cfg)` training images.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import ml_collections

from jaxadapt.data import fileio, schema
from jaxadapt.data.jump import images as jump_images
from jaxadapt.data.jump.load_data import Subset
from jaxadapt.data.profiles import tables as profiles
from jaxadapt.data.sim import builder as tfds_sim


log = logging.getLogger(__name__)

_SHOW = 5


def _load_sim(cfg: ml_collections.ConfigDict):
    return tfds_sim.load_simulated(cfg.data.sim, cfg.data.cache_dir)


def under_root(root: str, path: str) -> str:
    """`path` itself when absolute or a URL, else `path` below `root` (`~` expanded).

    Args:
      root: the gallery copy (local directory or URL).
      path: a table path or glob from `config.data.jump`.

    Returns:
      The path to read.
    """
    path = os.path.expanduser(path)
    if fileio.is_url(path) or os.path.isabs(path):
        return path
    return fileio.join(os.path.expanduser(root), path)


def load_data_files(jump: ml_collections.ConfigDict) -> list[str]:
    """Every load_data table `jump.load_data` names (paths or globs, under root).

    Args:
      jump: `config.data.jump`.

    Returns:
      The files, in the order given (each glob's matches sorted), without repeats.

    Raises:
      ValueError: naming a path or pattern that matches no file.
    """
    files: list[str] = []
    for pattern in jump.load_data:
        path = under_root(jump.root, pattern)
        found = fileio.expand(path)
        if not found:
            raise ValueError(f"config.data.jump.load_data: {pattern!r} ({path}) matches no "
                             "file; give per-plate load_data tables (.csv, .csv.gz or "
                             ".parquet) as paths or globs, absolute or under "
                             "config.data.jump.root")
        files += [f for f in found if f not in files]
    return files


def _poscon_labels() -> tuple[dict[str, int], dict[str, str]]:
    from jaxadapt.data.sim import design

    return ({c: k for k, c in enumerate(design.POSCONS)}, dict(design.POSCON_MOA))


def _target2_labels() -> tuple[dict[str, int], dict[str, str]]:
    from jaxadapt.data.sim import target2

    moa = {jcp: m for _, jcp, m in target2.layout() if jcp != schema.DMSO}
    labels = {jcp: target2.compound_label(m) for jcp, m in moa.items()}
    return {c: k for c, k in labels.items() if k != schema.NO_LABEL}, moa


#: `config.data.jump.labels = "builtin:<name>"`: label tables shipped with jaxadapt, the
#: same classes as the simulator's presets: the 8 JUMP positive controls (CS-ARM-BN's
#: classes, in `design.POSCONS` order) and TARGET2's MoA classes (CODA's recipe, 58).
BUILTIN_LABELS: dict[str, Callable[[], tuple[dict[str, int], dict[str, str]]]] = {
    "jump_poscon": _poscon_labels,
    "jump_target2": _target2_labels,
}
BUILTIN = "builtin:"


def read_labels(path: str, controls) -> tuple[dict[str, int], dict[str, str]]:
    """A label table: compound -> class index, and compound -> MoA name.

    `builtin:jump_poscon` / `builtin:jump_target2` name a shipped table (`BUILTIN_LABELS`).
    Columns: `Metadata_JCP2022` (or `compound`), and `label` (integer class 0..K-1) or,
    without it, `moa` (class names, numbered in sorted order); an optional `moa` column
    also fills each site's `moa`. Rows of control compounds are skipped (controls carry
    no class).

    Args:
      path: CSV / .csv.gz / parquet, local or URL, or "builtin:<name>".
      controls: the negative-control compounds.

    Returns:
      (label_map, moa_map).

    Raises:
      ValueError: naming a missing column, a non-integer label or a compound listed
        with two classes.
    """
    if path.startswith(BUILTIN):
        name = path[len(BUILTIN):]
        if name not in BUILTIN_LABELS:
            raise ValueError(f"config.data.jump.labels={path!r}: no such built-in label table; "
                             f"use one of {[BUILTIN + n for n in BUILTIN_LABELS]} or a path")
        labels, moa = BUILTIN_LABELS[name]()
        return {c: k for c, k in labels.items() if c not in set(controls)}, moa
    if not fileio.exists(path):
        raise ValueError(f"config.data.jump.labels: label table {path} does not exist; give a "
                         "CSV of Metadata_JCP2022 and label (or moa), absolute or under root")
    header, rows = fileio.read_table(path)
    comp_col = next((c for c in ("Metadata_JCP2022", "compound") if c in header), None)
    class_col = next((c for c in ("label", "moa") if c in header), None)
    if comp_col is None or class_col is None:
        raise ValueError(f"label table {path} has columns {header[:8]}; it needs "
                         "Metadata_JCP2022 (or compound) and label (class 0..K-1) or moa")
    rows = [r for r in rows if r[comp_col] not in set(controls)]
    names = sorted({r[class_col] for r in rows}) if class_col == "moa" else None
    labels: dict[str, int] = {}
    for line, r in enumerate(rows, start=2):
        try:
            value = names.index(r[class_col]) if names else int(float(r[class_col]))
        except ValueError:
            raise ValueError(f"label table {path}: {r[comp_col]} has label {r[class_col]!r}, "
                             "not an integer class index 0..K-1") from None
        if labels.setdefault(r[comp_col], value) != value:
            raise ValueError(f"label table {path}: {r[comp_col]} is listed with two classes "
                             f"{labels[r[comp_col]]} and {value}; keep one row per compound")
    moa = {r[comp_col]: r["moa"] for r in rows} if "moa" in header else {}
    return labels, moa


def plates_of_types(path: str, plate_types, sources=(), batches=()) -> tuple[str, ...]:
    """Plates of JUMP's plate table whose `Metadata_PlateType` is one of `plate_types`.

    Args:
      path: plate.csv(.gz) with Metadata_{Source,Batch,Plate,PlateType}.
      plate_types: e.g. ("COMPOUND",) or ("TARGET2",).
      sources, batches: restrict to these too (empty: all).

    Returns:
      The plate barcodes, sorted.

    Raises:
      ValueError: a missing table or column, or no plate of those types.
    """
    if not fileio.exists(path):
        raise ValueError(f"config.data.jump.plate_csv: plate table {path} does not exist; "
                         "plate_types needs JUMP's plate.csv.gz (absolute or under root)")
    header, rows = fileio.read_table(path)
    need = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType")
    lacking = [c for c in need if c not in header]
    if lacking:
        raise ValueError(f"plate table {path} lacks column(s) {lacking}; use JUMP's "
                         "plate.csv.gz or rename your columns to match")
    plates = sorted({r["Metadata_Plate"] for r in rows
                     if r["Metadata_PlateType"] in plate_types
                     and (not sources or r["Metadata_Source"] in sources)
                     and (not batches or r["Metadata_Batch"] in batches)})
    if not plates:
        types = sorted({r["Metadata_PlateType"] for r in rows})
        raise ValueError(f"config.data.jump.plate_types={tuple(plate_types)!r}: no plate of "
                         f"{path} (within the chosen sources/batches) has these types; the "
                         f"table has {types}")
    return tuple(plates)


def _check_classes(cfg: ml_collections.ConfigDict, labels: dict[str, int]) -> None:
    jump = cfg.data.jump
    lacking = [c for c in jump.compounds if c not in labels and c not in jump.controls]
    if lacking:
        raise ValueError(f"config.data.jump.compounds lists {len(lacking)} compound(s) absent "
                         f"from the label table {jump.labels!r}, e.g. {lacking[:_SHOW]}; add "
                         "them to the table (or to config.data.jump.controls) or drop them")
    used = {labels[c] for c in jump.compounds if c in labels} if jump.compounds else set(
        labels.values())
    k = max(used, default=-1) + 1
    if k > cfg.model.num_classes:
        raise ValueError(f"config.model.num_classes={cfg.model.num_classes}: the label table "
                         f"{jump.labels!r} uses classes up to {k - 1}; set "
                         f"--config.model.num_classes={k}")


def _check_crop(cfg: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
    """The crops a study takes must fit the stored images (known once they are built)."""
    crop, side = cfg.data.crop_size, min(shape[:2])
    if crop > side:
        raise ValueError(f"config.data.crop_size={crop} exceeds the stored JUMP images "
                         f"{shape[0]}x{shape[1]} (after config.data.jump.downsample="
                         f"{cfg.data.jump.downsample}); set --config.data.crop_size={side} or "
                         "less, or downsample less")


def _load_jump(cfg: ml_collections.ConfigDict):
    jump = cfg.data.jump
    root = os.path.expanduser(jump.root)
    if not root:
        raise ValueError("config.data.source='jump' needs config.data.jump.root, the local "
                         "copy of the Cell Painting Gallery (or its URL)")
    if not fileio.is_url(root) and not os.path.isdir(root):
        raise ValueError(f"config.data.jump.root={jump.root!r} is not a directory; point it at "
                         "the local copy of the Cell Painting Gallery")
    root = root if fileio.is_url(root) else os.path.abspath(root)
    tables = load_data_files(jump)
    labels_path = jump.labels if jump.labels.startswith(BUILTIN) else under_root(root, jump.labels)
    labels, moa = read_labels(labels_path, tuple(jump.controls))
    _check_classes(cfg, labels)
    plates = (plates_of_types(under_root(root, jump.plate_csv), tuple(jump.plate_types),
                              tuple(jump.sources), tuple(jump.batches))
              if jump.plate_types else ())
    prefix = jump.remote_prefix
    # root == the prefix (e.g. s3://cellpainting-gallery): PathName URLs are read as they are.
    base = root.rstrip("/") + "/"
    path_map = {prefix: base} if prefix and base != prefix else {}
    source, table = jump_images.build_jump_store(
        tables, under_root(root, jump.well_csv), labels, cfg.data.cache_dir,
        channels=tuple(jump.channels), image_size=jump.image_size or None,
        downsample=jump.downsample, upper_percentile=jump.upper_percentile,
        lower_percentile=jump.lower_percentile, path_map=path_map, moa_map=moa,
        control_compounds=tuple(jump.controls), drop_unlabelled=jump.drop_unlabelled,
        num_workers=jump.num_workers,
        subset=Subset(tuple(jump.sources), tuple(jump.batches), plates, tuple(jump.compounds)),
        plate_csv=under_root(root, jump.plate_csv) if jump.plate_csv else None,
        **builder_options(jump))
    _check_crop(cfg, tuple(source[0]["image"].shape))
    log.info("JUMP world: %d sites, sources %s, %d batches, %d plates, %d compounds",
             len(table), table.unique("source").tolist(), len(table.unique("batch")),
             len(table.unique("plate")), len(table.unique("compound")))
    return source, table


#: `config.data.jump.illum` -> `build_jump_store(illum=...)`.
ILLUM = {"auto": None, "on": True, "off": False}
#: `config.data.jump` keys that only choose how (not what) the builder builds.
BUILDER_SPEED_KEYS = ("num_workers", "engine", "beam_runner", "beam_options", "shard_sites",
                      "check_headers", "progress_every_s")


def builder_options(jump: ml_collections.ConfigDict) -> dict[str, Any]:
    """The store builder's keywords from `config.data.jump` (engine, bad sites, illum...).

    Args:
      jump: `config.data.jump`.

    Returns:
      Keyword arguments of `jump_images.build_jump_store`.
    """
    options = None
    if jump.engine == "beam" and jump.beam_options:
        from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top

        options = pipeline_options.PipelineOptions(list(jump.beam_options))
    return {"engine": jump.engine, "on_bad_site": jump.on_bad_site,
            "illum": ILLUM[jump.illum], "shard_sites": jump.shard_sites,
            "check_headers": jump.check_headers, "progress_every_s": jump.progress_every_s,
            "beam_runner": jump.beam_runner or None, "beam_options": options}


def _load_profiles(cfg: ml_collections.ConfigDict):
    source, table = profiles.load_profile_world(cfg)
    held = set(table.unique("source").tolist())
    absent = [s for s in cfg.train_sources if s not in held]
    if absent:  # the validator cannot know the sources before the tables are read
        raise ValueError(f"config.train_sources lists {absent}, which the profiles do not hold; "
                         f"their sources are {sorted(held)}")
    return source, table


#: Data source name -> loader(cfg) -> (source, table). A new kind of data adds one entry.
LOADERS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {
    "sim": _load_sim,
    "jump": _load_jump,
    "jump_profiles": _load_profiles,
}

#: Data source name -> the most training images channel statistics read (None: all).
STATS_SAMPLE: dict[str, Callable[[ml_collections.ConfigDict], int | None]] = {
    "sim": lambda cfg: None,
    "jump": lambda cfg: cfg.data.jump.stats_sample or None,
    "jump_profiles": lambda cfg: None,  # normalized per plate when loaded: no statistics
}


#: Data source name -> config keys that do not change its records (left out of the keys of
#: trained models): the other sources' settings, and speed-only settings. A simulator
#: study's keys are therefore those it had before real data and profiles existed.
INERT_KEYS: dict[str, tuple[str, ...]] = {
    "sim": ("data.source", "data.jump", "data.profiles"),
    "jump": ("data.sim", "data.profiles") + tuple(f"data.jump.{k}" for k in BUILDER_SPEED_KEYS),
    "jump_profiles": ("data.sim", "data.jump", "data.profiles.report_dir"),
}


def inert_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Dotted config keys that change nothing a model is trained on, for this data source.

    Args:
      cfg: the study config (without `data.source`: the simulator).

    Returns:
      The keys, e.g. ("data.source", "data.jump", "data.profiles") for a simulator study.
    """
    return INERT_KEYS.get(cfg.get("data", {}).get("source", "sim"), ())


def load_world(cfg: ml_collections.ConfigDict) -> tuple[Any, schema.SiteTable]:
    """The study's images and their metadata, from the data source the config names.

    Args:
      cfg: the study config (`cfg.data.source` picks the loader of `LOADERS`).

    Returns:
      (source, table): `source[i]` -> {"image": uint8 [H, W, C], "row": i}, and the
      SiteTable whose row i describes record i.

    Raises:
      ValueError: an unknown source, or bad paths/tables (naming the key and the fix).
    """
    name = cfg.data.source
    if name not in LOADERS:
        raise ValueError(f"config.data.source={name!r}: use one of {tuple(LOADERS)}")
    return LOADERS[name](cfg)


def stats_sample(cfg: ml_collections.ConfigDict) -> int | None:
    """The most training images the channel statistics read (None: every one).

    Args:
      cfg: the study config.

    Returns:
      An int >= 1, or None.
    """
    return STATS_SAMPLE[cfg.data.source](cfg)
