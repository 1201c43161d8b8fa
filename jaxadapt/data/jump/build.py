"""The JUMP image store builder: plan, checks, the resumable local writer, progress.

`plan_build` parses the tables, finds bad sites (`jump_checks`) and fixes the final
table before any pixel is decoded, so record i is row i whatever the engine.
`load_site` is the one function that turns a site into its stored uint8 image (TIFF
read, optional illumination correction, `jump_sites.preprocess`); both engines call it.

The local engine writes the records in shards of `shard_sites` consecutive rows under
`<store>.parts/`: a shard is written to a temp name, renamed, then described by a small
JSON manifest (rows, count, bytes). A shard with a valid manifest is finished: a build
killed midway and restarted reuses finished shards and writes only the rest. When all
shards exist they are moved (no copy) into one TFDS array_record data set with the same
features, layout and reader (`store.open_store`) as every other store. The Beam engine
(`jump_beam`) writes the same records through TFDS's Beam support.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from jaxadapt.data import fileio, schema
from jaxadapt.data.jump import (checks as jump_checks, sites as jump_sites,
                                load_data as jump_load_data)


log = logging.getLogger(__name__)

REPORT = "build_report.json"


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything needed to make record i (picklable, so Beam workers can use it).

    Attributes:
      table: the final SiteTable (bad sites already left out).
      paths, frames: str / int [N, C] image files and planes.
      channels: channel names.
      illum: str [N, C] illumination function files, or None.
      prep: keyword arguments of `jump_sites.preprocess` (not `illum`).
      shape: (h, w, C) of every record.
      skipped: the sites left out, as `BadSite`s.
    """

    table: schema.SiteTable
    paths: np.ndarray
    frames: np.ndarray
    channels: tuple[str, ...]
    illum: np.ndarray | None
    prep: Mapping
    shape: tuple[int, int, int]
    skipped: tuple = ()


def _keys(table: schema.SiteTable) -> list[tuple]:
    return list(zip(table["source"].tolist(), table["batch"].tolist(), table["plate"].tolist(),
                    table["well"].tolist(), table["site"].tolist()))


def _raise_bad(bad: Sequence[jump_checks.BadSite]) -> None:
    shown = "; ".join(f"site {'/'.join(map(str, b.key))}: {b.reason} ({b.where})"
                      for b in bad[:5])
    raise ValueError(f"{len(bad)} bad site(s): {shown}; fix the inputs, or pass "
                     "on_bad_site='skip' to leave them out (they are listed in "
                     f"{REPORT} beside the store)")


def plan_build(load_data_csv: str | Sequence[str], well_csv: str,
               label_map: Mapping[str, int], *,
               prep: Mapping, channels: Sequence[str], image_root: str | None,
               path_map: Mapping[str, str] | None, moa_map: Mapping[str, str] | None,
               control_compounds: Sequence[str], drop_unlabelled: bool,
               plate_csv: str | None = None, illum: bool | None = None,
               on_bad_site: str = "raise", num_workers: int = 4,
               check_headers: bool = True,
               subset: jump_load_data.Subset | None = None) -> BuildPlan:
    """Parses and checks the inputs of a build (see `build_jump_store` for the args).

    Tables, images and illumination functions may be local paths or fsspec URLs; only
    sites of `subset` (default all) are checked and built.

    With `check_headers=False` only the first site's TIFF header is read (for the record
    shape): at gallery scale the per-file header scan is one small read per file on the
    driver; a bad file then fails at decode time in `load_site`, naming site and files.

    Returns:
      The BuildPlan; `skipped` lists the bad sites left out with `on_bad_site="skip"`.

    Raises:
      ValueError: an absent column, a bad option, or (with `on_bad_site="raise"`) every
        bad site found (naming site, reason and file or column).
    """
    if on_bad_site not in ("raise", "skip"):
        raise ValueError(f"on_bad_site={on_bad_site!r}: use 'raise' or 'skip'")
    if on_bad_site == "skip" and not check_headers:
        raise ValueError("on_bad_site='skip' needs check_headers=True: bad files are found "
                         "by the header scan before any record is written")
    channels = tuple(channels)
    bad = jump_checks.table_problems(load_data_csv, well_csv, channels, plate_csv=plate_csv,
                                     subset=subset)
    if bad and on_bad_site == "raise":
        _raise_bad(bad)
    sites = jump_load_data.read_load_data(
        load_data_csv, well_csv, label_map, channels=channels, image_root=image_root,
        path_map=path_map, moa_map=moa_map, control_compounds=control_compounds,
        drop_unlabelled=drop_unlabelled, check_files=False, subset=subset,
        exclude=[b.key for b in bad])
    keys = _keys(sites.table)
    n_checked = len(keys) if check_headers else 1
    head_bad, ref = jump_checks.header_problems(
        sites.paths[:n_checked], sites.frames[:n_checked], channels, keys[:n_checked],
        same_size=prep["image_size"] is None, num_workers=num_workers)
    if head_bad and on_bad_site == "raise":
        _raise_bad(head_bad)
    if ref is None:
        where = load_data_csv if isinstance(load_data_csv, str) else list(load_data_csv)
        raise ValueError(f"no site of {where} is usable; see the reasons: "
                         f"{[b.reason for b in head_bad[:5]]}")
    bad_keys = {b.key for b in head_bad}
    keep = np.array([k not in bad_keys for k in keys], bool)
    table = schema.SiteTable({k: np.asarray(v)[keep] for k, v in sites.table.columns.items()})
    illum_files = jump_checks.illum_paths(load_data_csv, _keys(table), channels,
                                          image_root=image_root, path_map=path_map, use=illum)
    if illum_files is not None:
        for path in sorted(set(illum_files.ravel().tolist())):
            read_illum(path, ref)  # fail early, naming the file
    d = prep["downsample"]
    shape = (*(prep["image_size"] or (ref[0] // d, ref[1] // d)), len(channels))
    return BuildPlan(table, sites.paths[keep], sites.frames[keep], channels, illum_files,
                     dict(prep), tuple(int(s) for s in shape), tuple(bad + head_bad))


@functools.lru_cache(maxsize=16)  # one plate's functions serve all its sites
def read_illum(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Loads one illumination function (.npy, as JUMP ships them) as float64 [H, W].

    Args:
      path: the `.npy` file.
      shape: the expected (H, W) (the raw image size), or None to skip that check.

    Returns:
      The function, finite and > 0.

    Raises:
      ValueError: naming the file when it is missing, unreadable, not 2-D of `shape`,
        or holds non-positive / non-finite values.
    """
    try:
        with fileio.open_binary(path) as handle:  # a local path or an fsspec URL
            f = np.load(handle, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"illumination function {path} cannot be read ({e}); check "
                         "PathName_Illum*/FileName_Illum* or pass illum=False") from None
    if f.ndim != 2 or (shape is not None and tuple(f.shape) != tuple(shape)):
        raise ValueError(f"illumination function {path} has shape {f.shape}, the images "
                         f"{shape}; use the plate's own Illum files")
    f = f.astype(np.float64)
    if not np.isfinite(f).all() or (f <= 0).any():
        raise ValueError(f"illumination function {path} has non-finite or non-positive "
                         "values; CorrectIlluminationApply divides by it")
    return f


def load_site(plan: BuildPlan, i: int) -> np.ndarray:
    """Reads, illumination-corrects and preprocesses site i into its uint8 [h, w, C] record.

    Raises:
      ValueError: naming the site and files when a TIFF cannot be decoded or the result
        has the wrong shape.
    """
    t = plan.table
    name = f"site {t['source'][i]}/{t['batch'][i]}/{t['plate'][i]}/{t['well'][i]}/{t['site'][i]}"
    try:
        raw = jump_sites.read_site(plan.paths[i], plan.frames[i], name=name,
                                    channels=plan.channels)
    except ValueError:
        raise
    except Exception as e:  # a damaged compressed stream passes the header check
        raise ValueError(f"{name}: cannot decode {list(plan.paths[i])} "
                         f"({type(e).__name__}: {e})") from None
    illum = None
    if plan.illum is not None:
        illum = np.stack([read_illum(p, raw.shape[1:]) for p in plan.illum[i]])
    img = jump_sites.preprocess(raw, illum=illum, **plan.prep)
    if img.shape != plan.shape:
        raise ValueError(f"{name} preprocesses to shape {img.shape}, the store holds "
                         f"{plan.shape}; set image_size to crop/pad every site to one size")
    return img


class Progress:
    """Logs sites done, rate (sites/s) and ETA at most every `every_s` seconds."""

    def __init__(self, total: int, every_s: float = 30.0, what: str = "JUMP store"):
        self.total, self.every_s, self.what = int(total), float(every_s), what
        self.done = self.reused = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int, *, reused: bool = False, force: bool = False) -> None:
        """Counts n more sites (reused ones do not enter the rate) and maybe logs."""
        self.done += n
        self.reused += n if reused else 0
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = (self.done - self.reused) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d sites (%.0f%%, %d reused), %.1f sites/s, ETA %.0f s",
                     self.what, self.done, self.total, 100 * self.done / max(self.total, 1),
                     self.reused, rate, eta)
