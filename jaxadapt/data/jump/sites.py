"""One JUMP site from its TIFFs to the model's pixels: read the planes, preprocess.

`read_site` reads a site's channel planes (local files or fsspec URLs), dividing by
the plate's illumination functions when given; `preprocess` turns the raw stack into
uint8 [h, w, C] as in the CS-ARM-BN paper's data code: each channel downsampled 2x,
then 16 -> 8 bit by clipping at its 99.99th percentile, optionally centre-cropped or
padded to a fixed size. The store builders (`jaxadapt.data.jump.build`, `shards`,
`beam`) call them for every site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tifffile

from jaxadapt.data import fileio


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


def size_pair(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
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
    size = size_pair(image_size)
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


