"""JUMP-CP `load_data.csv` tables -> site metadata and image paths.

JUMP's per-plate `load_data.csv` (CellProfiler LoadData format) lists one row per site
with `Metadata_{Source,Batch,Plate,Well,Site}` and, per channel, `FileName_Orig<ch>` /
`PathName_Orig<ch>` (optionally `Frame_Orig<ch>` for multi-plane TIFFs). Joined with
JUMP's `well.csv` (compound per well) and a compound -> class map, it becomes a
`SiteTable` plus the files to read; `jaxadapt.data.jump.images` turns those into a store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from jaxadapt.data import fileio, schema


log = logging.getLogger(__name__)

META = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Site")
WELL_COLS = ("Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022")
_SHOW = 5  # how many offending values an error message lists


class JumpSites(NamedTuple):
    """Sites of a load_data table with their labels and image files.

    Attributes:
      table: one row per site (schema fields), in load_data row order.
      paths: str [N, C], the file holding channel c of site n.
      frames: int [N, C], the plane of that file to take, -1 for a single-plane file.
      channels: the channel names of axis C.
    """

    table: schema.SiteTable
    paths: np.ndarray
    frames: np.ndarray
    channels: tuple[str, ...]


# --------------------------------------------------------------------------- tables


def read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Reads a CSV, .csv.gz or parquet table (local or fsspec URL) into header and rows."""
    if not fileio.exists(path):
        raise ValueError(f"table {path} does not exist; check the path (relative paths of "
                         "config.data.jump are under config.data.jump.root)")
    return fileio.read_table(path)


def require_columns(header: Sequence[str], needed: Sequence[str], path: str, fix: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing} (it has {list(header)[:12]}...); {fix}")


def site_index(row: dict[str, str], line: int, path: str) -> int:
    value = row["Metadata_Site"]
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{path} line {line}: Metadata_Site={value!r} is not an integer; "
                         "sites must be numbered 1, 2, ... as in JUMP's load_data") from None


def resolve(path_name: str, file_name: str, image_root: str,
             path_map: Mapping[str, str]) -> str:
    """Joins PathName/FileName, rewriting a mapped prefix (e.g. s3://...) to a local one.

    A URL (after the rewrite) stays a URL, read through fsspec (`jaxadapt.data.fileio`).
    """
    for prefix, local in path_map.items():
        if path_name.startswith(prefix):
            path_name = local + path_name[len(prefix):]
            break
    if fileio.is_url(path_name):
        return fileio.join(path_name, file_name)
    return fileio.join(image_root, path_name, file_name)


def _frame(row: dict[str, str], ch: str, line: int, path: str) -> int:
    value = row.get(f"Frame_Orig{ch}", "")
    if value in ("", None):
        return -1
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{path} line {line}: Frame_Orig{ch}={value!r} is not an integer "
                         "plane index; leave it empty for single-plane files") from None


def _check_duplicates(keys: list[tuple], path: str) -> None:
    seen: dict[tuple, int] = {}
    dups = []
    for i, k in enumerate(keys):
        if k in seen:
            dups.append(f"{k} (lines {seen[k] + 2} and {i + 2})")
        seen.setdefault(k, i)
    if dups:
        raise ValueError(f"{path} lists {len(dups)} duplicate site(s) (source, batch, plate, "
                         f"well, site), e.g. {dups[:_SHOW]}; remove the repeated rows")


def _read_wells(well_csv: str) -> dict[tuple[str, str, str], str]:
    """Returns (source, plate, well) -> JCP2022 compound id from a JUMP well table."""
    header, rows = read_csv(well_csv)
    require_columns(header, WELL_COLS, well_csv,
                     "use JUMP's well.csv.gz (Metadata_Source, Metadata_Plate, Metadata_Well, "
                     "Metadata_JCP2022) or rename your columns to match")
    wells: dict[tuple[str, str, str], str] = {}
    for row in rows:
        key = (row["Metadata_Source"], row["Metadata_Plate"], row["Metadata_Well"])
        compound = row["Metadata_JCP2022"]
        if wells.setdefault(key, compound) != compound:
            raise ValueError(f"{well_csv}: well {key} is listed with two compounds "
                             f"{wells[key]!r} and {compound!r}; keep one row per well")
    return wells


def _check_label_map(label_map: Mapping[str, int], control_compounds: Sequence[str]) -> None:
    bad = {c: v for c, v in label_map.items() if int(v) < 0}
    if bad:
        raise ValueError(f"label_map has negative class indices {bad}; classes are 0..K-1 "
                         f"({schema.NO_LABEL} is reserved for controls)")
    both = sorted(set(label_map) & set(control_compounds))
    if both:
        raise ValueError(f"compounds {both} are both in label_map and control_compounds; a "
                         "negative control carries no class: remove them from one of the two")


def _label_rows(compounds: list[str | None], label_map: Mapping[str, int],
                control_compounds: Sequence[str], drop_unlabelled: bool,
                where: list[tuple]) -> np.ndarray:
    """Returns the boolean mask of kept rows; raises or logs for unknown compounds."""
    no_well = [w for c, w in zip(compounds, where) if c is None]
    unknown = sorted({c for c in compounds
                      if c is not None and c not in label_map and c not in control_compounds})
    if (no_well or unknown) and not drop_unlabelled:
        parts = []
        if no_well:
            parts.append(f"{len(no_well)} site(s) whose (source, plate, well) is not in the "
                         f"well table, e.g. {no_well[:_SHOW]}")
        if unknown:
            parts.append(f"{len(unknown)} compound(s) absent from label_map and not controls: "
                         f"{unknown[:_SHOW]}")
        raise ValueError("; ".join(parts) + "; add them to label_map / the well table, or pass "
                         "drop_unlabelled=True to drop those sites")
    keep = np.array([c is not None and (c in label_map or c in control_compounds)
                     for c in compounds], bool)
    if not keep.all():
        log.warning("dropping %d of %d sites: %d without a well-table entry, %d of %d "
                    "compounds without a label", (~keep).sum(), len(keep), len(no_well),
                    len(unknown), len({c for c in compounds if c is not None}))
    return keep


def _check_files(paths: np.ndarray) -> None:
    unique = sorted(set(paths.ravel().tolist()))
    missing = fileio.missing(unique)
    if missing:
        raise ValueError(f"{len(missing)} of {len(unique)} image files are missing, e.g. "
                         f"{missing[:_SHOW]}; download them, or fix image_root / path_map "
                         "(in a study: config.data.jump.root / remote_prefix) so that "
                         "PathName_*/FileName_* point at local files")


class Subset(NamedTuple):
    """Which sites of the load_data tables to keep; an empty tuple keeps every value.

    Attributes:
      sources, batches, plates: `Metadata_Source` / `_Batch` / `_Plate` values to keep.
      compounds: JCP2022 ids to keep (after the join with the well table); list the
        controls too (e.g. DMSO), or they are dropped.
    """

    sources: tuple[str, ...] = ()
    batches: tuple[str, ...] = ()
    plates: tuple[str, ...] = ()
    compounds: tuple[str, ...] = ()


def _read_load_data_rows(paths: Sequence[str], channels: Sequence[str],
                         subset: Subset) -> tuple[list[dict], list[str], list[int]]:
    """Rows of every load_data file that pass the metadata subset, with each row's file
    and line (for messages)."""
    rows, origin, lines = [], [], []
    file_cols = [f"{kind}_Orig{ch}" for ch in channels for kind in ("FileName", "PathName")]
    wanted = {"Metadata_Source": subset.sources, "Metadata_Batch": subset.batches,
              "Metadata_Plate": subset.plates}
    for path in paths:
        header, file_rows = read_csv(path)
        require_columns(header, META + tuple(file_cols), path,
                         f"a JUMP load_data.csv has these; for channels {list(channels)} each "
                         "needs FileName_Orig<ch> and PathName_Orig<ch> (or pass channels= to "
                         "load fewer)")
        if not file_rows:
            raise ValueError(f"{path} has no rows; point it at a non-empty load_data table")
        for i, r in enumerate(file_rows):
            if all(not keep or r[col] in keep for col, keep in wanted.items()):
                rows.append(r)
                origin.append(path)
                lines.append(i + 2)
    if not rows:
        raise ValueError(f"no site of {list(paths)[:_SHOW]} is in the subset (sources "
                         f"{subset.sources}, batches {subset.batches}, plates "
                         f"{len(subset.plates)} chosen); widen the subset or check the names")
    return rows, origin, lines


def read_load_data(load_data_csv: str | Sequence[str], well_csv: str,
                   label_map: Mapping[str, int], *,
                   channels: Sequence[str] = schema.CHANNELS,
                   image_root: str | None = None,
                   path_map: Mapping[str, str] | None = None,
                   moa_map: Mapping[str, str] | None = None,
                   control_compounds: Sequence[str] = (schema.DMSO,),
                   drop_unlabelled: bool = False,
                   check_files: bool = True,
                   subset: Subset | None = None,
                   exclude: Sequence[tuple] = ()) -> JumpSites:
    """Parses load_data tables and joins them with compounds and labels.

    Args:
      load_data_csv: one table or several (e.g. one per plate), each CSV, .csv.gz or
        parquet, local or an fsspec URL, with `Metadata_{Source,Batch,Plate,Well,Site}`
        and, for each channel, `FileName_Orig<ch>` and `PathName_Orig<ch>`; an optional
        `Frame_Orig<ch>` picks a plane of a multi-plane TIFF (CellProfiler's convention).
      well_csv: per-well compounds, JUMP's `well.csv.gz` columns
        `Metadata_{Source,Plate,Well,JCP2022}`.
      label_map: compound (JCP2022 id) -> class index 0..K-1.
      channels: channel names to load, in the order they take in the image; e.g.
        ("DNA", "ER", "RNA") for 3-channel data.
      image_root: base of relative `PathName_*` values; default: each table's directory.
      path_map: prefix -> local prefix rewrites applied to `PathName_*` first (e.g.
        {"s3://cellpainting-gallery/": "/data/cpg/"}).
      moa_map: optional compound -> mechanism-of-action name ("" where absent).
      control_compounds: negative controls: `is_control` True, label `NO_LABEL`.
      drop_unlabelled: drop (and log) sites whose well is not in `well_csv` or whose
        compound is neither labelled nor a control, instead of raising.
      check_files: raise if any referenced image file does not exist.
      subset: sources, batches, plates and compounds to keep (default: all).
      exclude: site keys (source, batch, plate, well, site) to leave out before the
        join, e.g. the sites a builder skips (`jump_build.plan_build`).

    Returns:
      JumpSites(table, paths [N, C], frames [N, C], channels), rows in table order.

    Raises:
      ValueError: naming the missing column, bad value, duplicate site, unlabelled
        compound or missing file, and the fix.
    """
    channels = tuple(channels)
    subset = subset or Subset()
    paths_in = [load_data_csv] if isinstance(load_data_csv, str) else list(load_data_csv)
    if not paths_in:
        raise ValueError("no load_data table given; pass at least one path")
    where = paths_in[0] if len(paths_in) == 1 else f"{len(paths_in)} load_data tables"
    _check_label_map(label_map, control_compounds)
    rows, origin, lines = _read_load_data_rows(paths_in, channels, subset)
    keys = [(r["Metadata_Source"], r["Metadata_Batch"], r["Metadata_Plate"], r["Metadata_Well"],
             site_index(r, line, path)) for r, path, line in zip(rows, origin, lines)]
    _check_duplicates(keys, where)
    if len(exclude):
        out = set(exclude)
        kept = [i for i, k in enumerate(keys) if k not in out]
        rows, origin, lines, keys = ([seq[i] for i in kept]
                                     for seq in (rows, origin, lines, keys))
        if not rows:
            raise ValueError(f"every site of {where} is excluded (skipped as bad); "
                             "nothing is left to build")
    wells = _read_wells(well_csv)
    compounds = [wells.get((k[0], k[2], k[3])) for k in keys]
    if subset.compounds:
        chosen = set(subset.compounds)
        compounds = [c if c in chosen else _OUT for c in compounds]
    kept = [c for c in compounds if c is not _OUT]
    keep = _label_rows(kept, label_map, control_compounds, drop_unlabelled,
                       [k for k, c in zip(keys, compounds) if c is not _OUT])
    keep = _expand_mask(np.array([c is not _OUT for c in compounds], bool), keep)
    if not keep.any():
        raise ValueError(f"no site of {where} has a labelled or control compound of the "
                         "subset; check that well_csv covers these plates and label_map (and "
                         "the compound subset) their compounds")
    idx = np.flatnonzero(keep)
    pm = dict(path_map or {})
    roots = {p: image_root if image_root is not None else table_dir(p) for p in paths_in}
    paths = np.array([[resolve(rows[i][f"PathName_Orig{ch}"], rows[i][f"FileName_Orig{ch}"],
                                roots[origin[i]], pm) for ch in channels] for i in idx])
    frames = np.array([[_frame(rows[i], ch, lines[i], origin[i]) for ch in channels]
                       for i in idx], np.int64)
    if check_files:
        _check_files(paths)
    comp = np.array([compounds[i] for i in idx])
    return JumpSites(_site_table(keys, idx, comp, label_map, moa_map, control_compounds),
                     paths, frames, channels)


_OUT = object()  # a site whose compound is outside the subset


def _expand_mask(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Places `inner` (a mask over the True rows of `outer`) back into `outer`'s rows."""
    out = outer.copy()
    out[outer] = inner
    return out


def table_dir(path: str) -> str:
    if fileio.is_url(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def _site_table(keys, idx, comp, label_map, moa_map, control_compounds) -> schema.SiteTable:
    is_control = np.isin(comp, list(control_compounds))
    return schema.SiteTable({
        "source": np.array([keys[i][0] for i in idx]),
        "batch": np.array([keys[i][1] for i in idx]),
        "plate": np.array([keys[i][2] for i in idx]),
        "well": np.array([keys[i][3] for i in idx]),
        "site": np.array([keys[i][4] for i in idx], np.int64),
        "compound": comp,
        "moa": np.array([(moa_map or {}).get(c, "") for c in comp], dtype=str),
        "label": np.array([schema.NO_LABEL if ctl else int(label_map[c])
                           for c, ctl in zip(comp, is_control)], np.int64),
        "is_control": is_control,
    })
