"""Finds the bad sites of a JUMP image build before any pixel is decoded.

Two cheap passes, so that a build knows its final table (and record numbering) before it
writes a record: (1) the tables: a channel with an empty file cell in load_data, a plate
absent from the well table (or from `plate.csv.gz` when given); (2) the TIFF headers
(no pixel decoding): a missing or unreadable file, a truncated file (its image data end
past the end of the file), a frame beyond the planes of a file, channels of one site of
different sizes, a site whose size differs from the first good site's (only when no
`image_size` makes every site one size). A missing column is never a site problem: it
raises. Each finding is a `BadSite`; the builder raises them or skips and reports them.
Only sites of the chosen `Subset` are checked. Tables and TIFFs may be local paths or
fsspec URLs (`fileio`).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tifffile

from jaxadapt.data import fileio
from jaxadapt.data.jump import load_data as jld


SiteKey = tuple[str, str, str, str, int]  # source, batch, plate, well, site



class BadSite(NamedTuple):
    """One site a build cannot use: its key, why, and the file or column at fault."""

    key: SiteKey
    reason: str
    where: str

    def as_dict(self) -> dict:
        """JSON-ready form for the build report."""
        names = ("source", "batch", "plate", "well", "site")
        return dict(zip(names, self.key), reason=self.reason, where=self.where)


def _row_key(row: Mapping[str, str], line: int, path: str) -> SiteKey:
    return (row["Metadata_Source"], row["Metadata_Batch"], row["Metadata_Plate"],
            row["Metadata_Well"], jld.site_index(row, line, path))


def _tables(load_data_csv: str | Sequence[str]) -> list[str]:
    return [load_data_csv] if isinstance(load_data_csv, str) else list(load_data_csv)


def _in_subset(row: Mapping[str, str], subset: jld.Subset) -> bool:
    return all(not keep or row[col] in keep for col, keep in (
        ("Metadata_Source", subset.sources), ("Metadata_Batch", subset.batches),
        ("Metadata_Plate", subset.plates)))


def table_problems(load_data_csv: str | Sequence[str], well_csv: str,
                   channels: Sequence[str], *, plate_csv: str | None = None,
                   subset: jld.Subset | None = None) -> list[BadSite]:
    """Sites whose load_data row lacks a channel file or whose plate is not in the metadata.

    Args:
      load_data_csv: the load_data table(s) (e.g. one per plate), local or URLs.
      well_csv: JUMP's well table (`Metadata_Source, Metadata_Plate, Metadata_Well, ...`).
      channels: the channels to build.
      plate_csv: optional JUMP plate table (`Metadata_Source, Metadata_Batch,
        Metadata_Plate`); when given every plate must be listed there.
      subset: only sites of these sources/batches/plates (and, where the well table names
        their compound, compounds) are checked; default all.

    Returns:
      One BadSite per bad row (the first problem of the row).

    Raises:
      ValueError: a required column is absent (naming it and the file).
    """
    subset = subset or jld.Subset()
    cols = [f"{k}_Orig{ch}" for ch in channels for k in ("FileName", "PathName")]
    well_header, well_rows = jld.read_csv(well_csv)
    jld.require_columns(well_header, jld.WELL_COLS, well_csv,
                     "use JUMP's well.csv.gz columns")
    well_plates = {(r["Metadata_Source"], r["Metadata_Plate"]) for r in well_rows}
    compound = {(r["Metadata_Source"], r["Metadata_Plate"], r["Metadata_Well"]):
                r["Metadata_JCP2022"] for r in well_rows}
    plates = None
    if plate_csv is not None:
        plate_header, plate_rows = jld.read_csv(plate_csv)
        need = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate")
        jld.require_columns(plate_header, need, plate_csv,
                         "use JUMP's plate.csv.gz columns")
        plates = {tuple(r[c] for c in need) for r in plate_rows}
    bad = []
    for path in _tables(load_data_csv):
        header, rows = jld.read_csv(path)
        jld.require_columns(header, jld.META + tuple(cols), path,
                         f"a JUMP load_data.csv has these; channels {list(channels)} each need "
                         "FileName_Orig<ch> and PathName_Orig<ch> (or pass channels= to load "
                         "fewer)")
        for i, row in enumerate(rows):
            if not _in_subset(row, subset):
                continue
            key = _row_key(row, i + 2, path)
            comp = compound.get((key[0], key[2], key[3]))
            if subset.compounds and comp is not None and comp not in subset.compounds:
                continue
            empty = [c for c in cols if not (row.get(c) or "").strip()]
            if empty:
                bad.append(BadSite(key, f"channel missing from load_data: empty {empty[0]}",
                                   f"{path} line {i + 2} column {empty[0]}"))
            elif (key[0], key[2]) not in well_plates:
                bad.append(BadSite(key, f"plate {key[2]} of {key[0]} is absent from the well "
                                   "table", well_csv))
            elif plates is not None and key[:3] not in plates:
                bad.append(BadSite(key, f"plate {key[2]} ({key[0]}/{key[1]}) is absent from "
                                   "the plate table", plate_csv))
    return bad


def _header(path: str, stamp: list | None) -> tuple[tuple[int, int], int]:
    """((H, W), planes) of a TIFF from its header and its `fileio.stamps` entry (None:
    missing); raises ValueError for a missing, unreadable or truncated file."""
    if stamp is None:
        raise ValueError("missing TIFF")
    size = int(stamp[1])
    try:
        with fileio.open_binary(path) as f, tifffile.TiffFile(f) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
            end = max((o + c for page in tif.pages
                       for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
    except Exception as e:  # tifffile raises many types for a damaged header
        raise ValueError(f"unreadable TIFF ({type(e).__name__}: {e})") from None
    if end > size:
        raise ValueError(f"truncated TIFF: image data end at byte {end}, file has {size} bytes")
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"TIFF axes {axes!r} lack Y/X")
    yx = (shape[axes.index("Y")], shape[axes.index("X")])
    return yx, int(np.prod(shape)) // (yx[0] * yx[1])


def _site_problem(paths: Sequence[str], frames: Sequence[int], channels: Sequence[str],
                  headers: Mapping[str, object]) -> tuple[str, str] | tuple[None, tuple]:
    """(reason, file) of a site's first problem, or (None, its (H, W))."""
    shapes = {}
    for path, frame, ch in zip(paths, frames, channels):
        head = headers[path]
        if isinstance(head, ValueError):
            return f"channel {ch}: {head}", path
        yx, planes = head
        if frame >= planes or (frame < 0 and planes != 1):
            return (f"channel {ch}: frame {frame} but the file holds {planes} plane(s)", path)
        shapes[ch] = yx
    if len(set(shapes.values())) != 1:
        return f"channels differ in shape {shapes}", ", ".join(paths)
    return None, next(iter(shapes.values()))


def header_problems(paths: np.ndarray, frames: np.ndarray, channels: Sequence[str],
                    keys: Sequence[SiteKey], *, same_size: bool,
                    num_workers: int = 8) -> tuple[list[BadSite], tuple[int, int] | None]:
    """Checks every site's TIFF headers (threads; no pixel decoding).

    Args:
      paths, frames: [N, C] files and planes (`JumpSites.paths`, `.frames`).
      channels: channel names.
      keys: the N site keys.
      same_size: every site must have the first good site's size (no `image_size`).
      num_workers: threads reading headers.

    Returns:
      (bad sites, (H, W) of the first good site or None if none is good).
    """
    unique = sorted(set(paths.ravel().tolist()))
    stamps = fileio.stamps(unique)  # sizes: os.stat, or one fsspec listing per directory

    def head(p):
        try:
            return _header(p, stamps[p])
        except ValueError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        headers = dict(zip(unique, pool.map(head, unique)))
    bad, ref = [], None
    for i, key in enumerate(keys):
        reason, info = _site_problem(paths[i], frames[i], channels, headers)
        if reason is not None:
            bad.append(BadSite(key, reason, info))
        elif ref is None:
            ref = info
        elif same_size and info != ref:
            bad.append(BadSite(key, f"size {info} differs from the first site's {ref}; set "
                               "image_size to crop/pad every site to one size", paths[i][0]))
    return bad, ref


def illum_paths(load_data_csv: str | Sequence[str], keys: Sequence[SiteKey],
                channels: Sequence[str], *, image_root: str | None,
                path_map: Mapping[str, str] | None, use: bool | None) -> np.ndarray | None:
    """The illumination function file of every site and channel, or None.

    Args:
      load_data_csv: the table(s) (JUMP's `load_data_with_illum` adds `FileName_Illum<ch>`
        and `PathName_Illum<ch>` per channel).
      keys: the kept sites, in table order.
      channels: the channels built.
      image_root, path_map: as for the images (`read_load_data`; default root: each
        table's directory).
      use: None = use the columns when every table has them for every channel; True =
        require them; False = ignore them.

    Returns:
      str [N, C] paths of `.npy` illumination functions, or None without correction.

    Raises:
      ValueError: `use=True` and a column is absent, or a site has an empty illum cell.
    """
    if use is False:
        return None
    cols = [f"{k}_Illum{ch}" for ch in channels for k in ("FileName", "PathName")]
    read = [(path, *jld.read_csv(path)) for path in _tables(load_data_csv)]
    if use is None and not all(c in header for _, header, _ in read for c in cols):
        return None
    by_key = {}
    for path, header, rows in read:
        jld.require_columns(header, cols, path,
                         "use JUMP's load_data_with_illum table, or pass illum=False")
        root = image_root if image_root is not None else jld.table_dir(path)
        by_key.update({_row_key(r, i + 2, path): (path, i, r, root) for i, r in enumerate(rows)})
    out = np.empty((len(keys), len(channels)), dtype=object)
    for n, key in enumerate(keys):
        path, i, row, root = by_key[key]
        for c, ch in enumerate(channels):
            name, where = row[f"FileName_Illum{ch}"], row[f"PathName_Illum{ch}"]
            if not name.strip() or not where.strip():
                raise ValueError(f"{path} line {i + 2}: empty FileName_Illum{ch} or "
                                 f"PathName_Illum{ch}; fill it or pass illum=False")
            out[n, c] = jld.resolve(where, name, root, dict(path_map or {}))
    return out.astype(str)
