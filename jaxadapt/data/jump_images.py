"""JUMP Cell Painting site images from TIFFs (local or fsspec URLs) into the cached image store.

Three steps, each usable alone:

1. `jump_load_data.read_load_data`: a JUMP/CellProfiler `load_data.csv` (one row per site, one
   `FileName_Orig<ch>` / `PathName_Orig<ch>` pair per channel, optional
   `Frame_Orig<ch>` for multi-plane files as in CellProfiler's LoadData) joined with a
   per-well compound table (JUMP's `well.csv.gz`) and a label map -> `JumpSites`
   (a `SiteTable` plus the image file of every site and channel).
2. `preprocess`: one site's raw stack -> uint8 [h, w, C] as in the CS-ARM-BN paper's
   data code: each channel downsampled 2x, then 16 -> 8 bit by clipping at its
   99.99th percentile, optionally centre-cropped/padded to a fixed size.
3. `build_jump_store`: checks the tables and TIFF headers (`jump_checks`; bad sites
   raise or are skipped and reported), then reads every site with tifffile, divides by
   its illumination functions when load_data names them, preprocesses it and writes the
   store under `<data_dir>/jump_<key>`, where the key hashes the inputs (table files,
   every image file's path/size/mtime, all options), so a re-run reuses the store and
   any change builds a new one. Engines: "local" (`jump_shards`: threads, resumable
   shards) or "beam" (`jump_beam`: Apache Beam through TFDS, DirectRunner or a cluster).

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
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import tifffile

from jaxadapt.data import fileio, schema, store
from jaxadapt.data.jump_load_data import (JumpSites, Subset,  # noqa: F401 (re-exported)
                                          read_load_data)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- pixels


def _downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of [C, H, W]; trailing rows/cols that do not fill
    a block are cropped (an odd size loses one line at factor 2)."""
    if factor == 1:
        return x.astype(np.float64)
    c, h, w = x.shape
    h2, w2 = h // factor, w // factor
    x = x[:, :h2 * factor, :w2 * factor].astype(np.float64)
    return x.reshape(c, h2, factor, w2, factor).mean(axis=(2, 4))


def _to_uint8(x: np.ndarray, lower_percentile: float, upper_percentile: float) -> np.ndarray:
    """Per channel of [C, H, W]: clip to [lo, hi] percentiles, stretch to 0..255, round."""
    lo = np.percentile(x, lower_percentile, axis=(1, 2), keepdims=True)
    hi = np.percentile(x, upper_percentile, axis=(1, 2), keepdims=True)
    span = hi - lo
    # A constant channel has span 0: map it to 0 rather than divide by zero (no NaN).
    scale = np.where(span > 0, 255.0 / np.where(span > 0, span, 1.0), 0.0)
    y = (np.clip(x, lo, hi) - lo) * scale
    return np.floor(y + 0.5).astype(np.uint8)


def _fit(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crops and/or zero-pads [h, w, C] to `size` so every record has one shape."""
    out = x
    for axis, want in enumerate(size):
        have = out.shape[axis]
        if have > want:
            start = (have - want) // 2
            out = np.take(out, np.arange(start, start + want), axis=axis)
        elif have < want:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((want - have) // 2, want - have - (want - have) // 2)
            out = np.pad(out, pad)
    return out


def _size_pair(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    pair = (int(image_size), int(image_size)) if np.ndim(image_size) == 0 else tuple(
        int(s) for s in image_size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int or (height, width)")
    return pair


def preprocess(stack: np.ndarray, *, channel_axis: int = 0, downsample: int = 2,
               upper_percentile: float = 99.99, lower_percentile: float = 0.0,
               image_size: int | Sequence[int] | None = None,
               illum: np.ndarray | None = None) -> np.ndarray:
    """Turns one site's raw channels into the uint8 image stored on disk.

    Follows the CS-ARM-BN data code: each channel is downsampled `downsample`x (mean
    over blocks; an odd height/width loses its last line), then mapped to 8 bit by
    clipping at its `upper_percentile` (99.99) percentile. The percentiles are computed
    per image and per channel, on the downsampled channel, so every site is stretched
    to its own range (this also removes per-image brightness differences). The values
    are stretched from the `lower_percentile` percentile (default 0 = the channel's
    minimum) to 255 and rounded half up; a constant channel maps to all 0 (no NaN).
    With `illum`, each raw channel is first divided by its illumination function at
    full resolution, as CellProfiler's CorrectIlluminationApply ("Divide") does (it
    divides the image scaled to [0, 1]; the per-image percentile stretch makes that
    scale irrelevant, so the raw values are divided in float64).

    Args:
      stack: integer (e.g. uint16, uint8) or finite float array, [C, H, W] with
        `channel_axis=0` (default) or [H, W, C] with `channel_axis=-1`.
      channel_axis: the axis of the channels in `stack`.
      downsample: block size of the mean downsampling; 1 disables it.
      upper_percentile: clipping percentile mapped to 255.
      lower_percentile: percentile mapped to 0.
      image_size: None to keep the downsampled size, else an int or (height, width) to
        centre-crop / zero-pad to.
      illum: optional float illumination functions [C, H, W] (channels first, the raw
        size), finite and > 0 (see `jump_build.read_illum`).

    Returns:
      uint8 array [h, w, C].

    Raises:
      ValueError: for a stack that is not 3-D, non-finite floats or bad options.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"a site stack must be 3-D [C, H, W] or [H, W, C], got shape "
                         f"{stack.shape}; stack the channels with np.stack(..., axis=0)")
    if not 0 <= lower_percentile < upper_percentile <= 100:
        raise ValueError(f"need 0 <= lower_percentile ({lower_percentile}) < upper_percentile "
                         f"({upper_percentile}) <= 100")
    if int(downsample) < 1:
        raise ValueError(f"downsample={downsample} must be a positive integer (1 = none)")
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise ValueError("site stack has NaN/Inf values; clean the image before preprocessing")
    chw = np.moveaxis(stack, channel_axis, 0)
    if illum is not None:
        illum = np.asarray(illum, np.float64)
        if illum.shape != chw.shape:
            raise ValueError(f"illumination functions of shape {illum.shape} do not match the "
                             f"site's [C, H, W] {chw.shape}; use the plate's own Illum files")
        chw = chw.astype(np.float64) / illum
    if min(chw.shape[1:]) < int(downsample):
        raise ValueError(f"site of shape {chw.shape} [C, H, W] is smaller than one "
                         f"{downsample}x{downsample} block; check channel_axis")
    small = _downsample(chw, int(downsample))
    out = np.moveaxis(_to_uint8(small, lower_percentile, upper_percentile), 0, -1)
    size = _size_pair(image_size)
    return out if size is None else _fit(out, size)


def _read_planes(path: str) -> np.ndarray:
    """Reads a TIFF as [P, H, W]: every axis except Y and X (C, Z, T, S...) becomes planes."""
    with fileio.open_binary(path) as f, tifffile.TiffFile(f) as tif:
        series = tif.series[0]
        data, axes = series.asarray(), series.axes
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path}: TIFF axes {axes!r} lack Y/X; expected a 2-D image or a stack")
    data = np.moveaxis(data, [axes.index("Y"), axes.index("X")], [-2, -1])
    return data.reshape((-1,) + data.shape[-2:])


def read_site(paths: Sequence[str], frames: Sequence[int], *, name: str = "site",
              channels: Sequence[str] | None = None) -> np.ndarray:
    """Reads one site's channels from TIFFs as a raw [C, H, W] stack.

    Args:
      paths: the file of each channel (the same file may serve several channels).
      frames: the plane of each file, -1 for a single-plane file.
      name: the site, for error messages.
      channels: channel names, for error messages.

    Returns:
      The stacked raw channels in their stored dtype.

    Raises:
      ValueError: naming the site, the files and shapes when the channels differ in shape,
        a single-plane channel points at a multi-plane file, or a frame is out of range.
    """
    channels = list(channels) if channels is not None else [str(i) for i in range(len(paths))]
    cache: dict[str, np.ndarray] = {}  # a multi-plane file serves several channels: read once
    planes = []
    for path, frame, ch in zip(paths, frames, channels):
        if path not in cache:
            cache[path] = _read_planes(path)
        data = cache[path]
        if frame < 0 and len(data) != 1:
            raise ValueError(f"{name}: channel {ch} file {path} holds {len(data)} planes; set "
                             f"Frame_Orig{ch} in load_data to choose one")
        if frame >= len(data):
            raise ValueError(f"{name}: Frame_Orig{ch}={frame} but {path} holds {len(data)} planes")
        planes.append(data[max(frame, 0)])
    shapes = {ch: p.shape for ch, p in zip(channels, planes)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: channels differ in shape {shapes} (files {list(paths)}); all "
                         "channels of a site must be the same field at the same resolution")
    return np.stack(planes)


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
    """
    # pylint: disable=g-import-not-at-top  (the builder modules import this one)
    from jaxadapt.data import jump_beam, jump_build, jump_shards
    if engine not in ("local", "beam"):
        raise ValueError(f"engine={engine!r}: use 'local' or 'beam'")
    os.makedirs(data_dir, exist_ok=True)
    prep = {"downsample": int(downsample), "upper_percentile": float(upper_percentile),
            "lower_percentile": float(lower_percentile), "image_size": _size_pair(image_size)}
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
    problem = store.store_problem(root, key=key)
    if problem is not None:
        store._remove_stale_temps(root)  # pylint: disable=protected-access
        if problem != "missing":
            log.warning("image store %s is unusable (%s); rebuilding it", root, problem)
            shutil.rmtree(root, ignore_errors=True)
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
