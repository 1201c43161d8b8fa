"""JUMP Cell Painting site images from TIFFs (local or fsspec URLs) into the cached image store.

Three steps, each usable alone:

1. `jump_load_data.read_load_data`: a JUMP/CellProfiler `load_data.csv` (one row per site, one
   `FileName_Orig<ch>` / `PathName_Orig<ch>` pair per channel, optional
   `Frame_Orig<ch>` for multi-plane files as in CellProfiler's LoadData) joined with a
   per-well compound table (JUMP's `well.csv.gz`) and a label map -> `JumpSites`
   (a `SiteTable` plus the image file of every site and channel).
2. `jaxadapt.data.jump.sites.preprocess`: one site's raw stack -> uint8 [h, w, C] as in the CS-ARM-BN paper's
   data code: each channel downsampled 2x, then 16 -> 8 bit by clipping at its
   99.99th percentile, optionally centre-cropped/padded to a fixed size.
3. `build_jump_store`: checks the tables and TIFF headers (`jump_checks`; bad sites
   raise or are skipped and reported), then reads every site with tifffile, divides by
   its illumination functions when load_data names them, preprocesses it and writes the
   store under `<data_dir>/jump_<key>`, where the key hashes the inputs (table files,
   every image file's path/size/mtime, all options), so a re-run reuses the store and
   any change builds a new one. Engines: "local" (`jump_shards`: threads, resumable
   shards) or "beam" (`jump_beam`: Apache Beam through TFDS, DirectRunner or a cluster).
   A store of this key that fails `store.check_store` (a file damaged on disk, no or an
   older manifest) stops the run with one line naming it and the fix (`refusal`).

Tables and images are local files, or URLs read through fsspec (`jaxadapt.data.fileio`):
download the images (e.g. from the Cell Painting Gallery) and map the `s3://` prefixes of
`PathName_*` to the local copy with `path_map`, or read `s3://cellpainting-gallery/...`
directly where fsspec has access.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence


from jaxadapt.data import fileio, schema, store
from jaxadapt.data.jump import beam as jump_beam, build as jump_build, shards as jump_shards
from jaxadapt.data.jump.load_data import Subset
from jaxadapt.data.jump.sites import size_pair


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- store


def _file_stamps(paths: Sequence[str]) -> list[list]:
    """[path, size, version] of each file: local (absolute path, size, mtime in ns) or a
    URL's through fsspec (`fileio.stamps`: one listing per directory)."""
    found = fileio.stamps(paths)
    missing = [p for p in paths if found[p] is None]
    if missing:
        raise ValueError(f"input file {missing[0]} cannot be read (missing; {len(missing)} "
                         f"missing in all, e.g. {missing[:5]}); download it or fix "
                         "image_root / path_map")
    return [found[p] for p in paths]


def store_key(sites, inputs: Sequence[str], options: Mapping) -> str:
    """Returns a 16-hex-digit hash of the input files (path, size, mtime) and options.

    Args:
      sites: the parsed sites (`JumpSites` or a `jump_build.BuildPlan`: anything with
        `paths` and `frames` [N, C]).
      inputs: the table files (load_data, well table, plate table, illum functions).
      options: everything else that changes the records (channels, sizes, percentiles...).

    Returns:
      A stable string; any changed file or option gives a different key.
    """
    files = hashlib.sha256()
    for stamp in _file_stamps(sorted(set(sites.paths.ravel().tolist()))):
        files.update(json.dumps(stamp).encode())
    content = {"format": store.FORMAT_VERSION, "inputs": _file_stamps(list(inputs)),
               "images": files.hexdigest(), "frames": sites.frames.tolist(),
               "options": options}
    text = json.dumps(content, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


#: How to rebuild a refused store (see `refusal`).
REBUILD = ("python experiments/build_jump_store.py with the study's flags (or rerun the "
           "study)")


def refusal(root: str, problem: store.Problem) -> str:
    """The one-line error for an unusable JUMP store: the store, the file, the rebuild.

    A real-data store is not rebuilt on the spot, unlike the simulator's: a rebuild reads
    every TIFF again (hours for a study, on a Beam cluster for a large one, from inputs that
    may be remote), the wrong thing to start unannounced inside a training run, and bytes
    that changed on disk point at a failing disk or copy the user needs to know about. So
    a study stops before reading a record, and the user rebuilds once, on purpose.

    Args:
      root: the store directory.
      problem: from `store.check_store` (not "missing").

    Returns:
      The message: store, problem (naming the file), and the command that rebuilds it.
    """
    old = (" (stores written before checksums, by an older jaxadapt, need this once)"
           if problem.kind in ("old_manifest", "no_manifest") else "")
    return (f"JUMP image store {root} is unusable: {problem}; it is not rebuilt "
            f"automatically{old}: delete it (rm -r {root}) and rebuild it: {REBUILD}")


def build_jump_store(load_data_csv: str | Sequence[str], well_csv: str,
                     label_map: Mapping[str, int],
                     data_dir: str, *, channels: Sequence[str] = schema.CHANNELS,
                     image_size: int | Sequence[int] | None = None, downsample: int = 2,
                     upper_percentile: float = 99.99, lower_percentile: float = 0.0,
                     image_root: str | None = None, path_map: Mapping[str, str] | None = None,
                     moa_map: Mapping[str, str] | None = None,
                     control_compounds: Sequence[str] = (schema.DMSO,),
                     drop_unlabelled: bool = False,
                     num_workers: int = 4, subset: Subset | None = None,
                     engine: str = "local",
                     plate_csv: str | None = None, illum: bool | None = None,
                     on_bad_site: str = "raise", shard_sites: int = 256,
                     beam_runner=None, beam_options=None, progress_every_s: float = 30.0,
                     check_headers: bool = True):
    """Builds (or reuses) the uint8 image store of the sites of a load_data table.

    The store lives in `<data_dir>/jump_<key>`; the key hashes the tables, every image
    (and illumination) file's path/size/mtime and every option that changes records,
    so an unchanged re-run opens the cached store and a change builds a new one. Both
    engines write the same records into the same layout (`store.open_store` reads it).

    Args:
      load_data_csv, well_csv, label_map, channels, image_root, path_map, moa_map,
        control_compounds, drop_unlabelled, subset: see `read_load_data` (tables and
        images may be local paths or fsspec URLs).
      data_dir: parent directory of the cache.
      image_size, downsample, upper_percentile, lower_percentile: see `preprocess`;
        with `image_size=None` every site must preprocess to the same size.
      num_workers: threads reading TIFFs (speed only).
      engine: "local" (threads on this machine; resumable: finished shards of a killed
        build are reused) or "beam" (Apache Beam through TFDS; see `jump_beam`).
      plate_csv: optional JUMP `plate.csv.gz`; every plate must be listed there.
      illum: None = divide by the illumination functions when load_data has
        `FileName_Illum<ch>`/`PathName_Illum<ch>` (JUMP's load_data_with_illum);
        True = require them; False = never correct.
      on_bad_site: "raise" (default) a ValueError naming every bad site (missing,
        truncated or unreadable TIFF, channel missing from load_data, plate absent
        from the metadata, inconsistent sizes), or "skip" them and list each with its
        reason in `<store>/build_report.json`.
      shard_sites: sites per shard (local: the unit of resumption) or per Beam work item.
      beam_runner, beam_options: Beam runner (name or object) and PipelineOptions for
        `engine="beam"`; default the DirectRunner.
      progress_every_s: seconds between progress lines (sites done, sites/s, ETA).
      check_headers: read every TIFF header before building (finds missing, truncated
        and mis-sized files up front; needed for on_bad_site="skip"); False reads only
        the first site's, for very large builds where that scan is too slow, and a bad
        file then stops the build with a ValueError naming it when it is decoded.

    Returns:
      (source, table): `source[i]` -> {"image": uint8 [h, w, C], "row": i} and the
      SiteTable whose row i describes record i.

    Raises:
      ValueError: the store of these inputs exists but is unusable (a file damaged on
        disk, no or an older manifest): one line naming the store, the file and the
        rebuild command (`refusal`); it is not rebuilt behind the caller's back.
    """
    if engine not in ("local", "beam"):
        raise ValueError(f"engine={engine!r}: use 'local' or 'beam'")
    os.makedirs(data_dir, exist_ok=True)
    prep = {"downsample": int(downsample), "upper_percentile": float(upper_percentile),
            "lower_percentile": float(lower_percentile), "image_size": size_pair(image_size)}
    plan = jump_build.plan_build(
        load_data_csv, well_csv, label_map, prep=prep, channels=channels,
        image_root=image_root, path_map=path_map, moa_map=moa_map,
        control_compounds=control_compounds, drop_unlabelled=drop_unlabelled,
        plate_csv=plate_csv, illum=illum, on_bad_site=on_bad_site, num_workers=num_workers,
        check_headers=check_headers, subset=subset)
    illum_files = [] if plan.illum is None else sorted(set(plan.illum.ravel().tolist()))
    options = dict(prep, channels=list(plan.channels), label_map=dict(label_map),
                   moa_map=dict(moa_map or {}), control_compounds=list(control_compounds),
                   drop_unlabelled=bool(drop_unlabelled), illum=plan.illum is not None,
                   skipped=[b.as_dict() for b in plan.skipped])
    if subset is not None and any(subset):  # without one, the keys of before subsets
        options["subset"] = {k: list(v) for k, v in subset._asdict().items()}
    tables = [load_data_csv] if isinstance(load_data_csv, str) else list(load_data_csv)
    inputs = [*tables, well_csv] + ([plate_csv] if plate_csv else []) + illum_files
    key = store_key(plan, inputs, options)
    root = os.path.join(data_dir, f"jump_{key}")
    problem = store.check_store(root, key=key)
    if problem is not None and problem.kind != "missing":
        raise ValueError(refusal(root, problem))
    if problem is not None:
        store.remove_stale_temps(root)
        if engine == "local":
            jump_shards.build_local(plan, root, key=key, shard_sites=shard_sites,
                                    num_workers=num_workers, progress_every_s=progress_every_s)
        else:
            jump_beam.build_beam(plan, root, key=key, beam_runner=beam_runner,
                                 beam_options=beam_options, shard_sites=shard_sites,
                                 progress_every_s=progress_every_s)
    source, table = store.open_store(root)
    log.info("%s JUMP image store jump_%s: %d sites, images %s, %d skipped",
             "built" if problem else "reused", key, len(table), plan.shape, len(plan.skipped))
    if plan.skipped:
        log.warning("%d bad site(s) left out of the JUMP image store (on_bad_site='skip'); "
                    "each is listed with its reason in %s", len(plan.skipped),
                    os.path.join(root, jump_build.REPORT))
    return source, table
