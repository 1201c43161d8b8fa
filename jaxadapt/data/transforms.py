"""Per-image transforms: random crop + flips (train), centre crop (eval), normalization.

Images arrive uint8 HWC (0-255) and leave float32 HWC, normalized per channel with the
training rows' mean/std on the 0-255 scale. Randomness comes from a NumPy Generator
the caller derives from (seed, step, position), so augmentation is reproducible.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jaxadapt.data import schema


class ChannelStats(NamedTuple):
    """Per-channel mean and std (float64 [C], 0-255 scale, ddof 0) of training pixels."""

    mean: np.ndarray
    std: np.ndarray


def stats_from_sums(count: int, sums, sumsqs) -> ChannelStats:
    """Exact mean/std from integer pixel sums (Python ints: no overflow, no cancellation).

    Args:
      count: pixels per channel.
      sums: per-channel sum of pixel values (ints).
      sumsqs: per-channel sum of squared pixel values (ints).

    Returns:
      ChannelStats (float64, ddof 0).

    Raises:
      ValueError: no pixels, or a channel with zero variance (normalization would divide by 0).
    """
    if count <= 0:
        raise ValueError("channel statistics need at least one image; pass non-empty rows")
    sums, sumsqs = [int(s) for s in sums], [int(q) for q in sumsqs]
    mean = np.array([s / count for s in sums], np.float64)
    var = np.array([(count * q - s * s) / (count * count) for s, q in zip(sums, sumsqs)])
    if (var <= 0).any():
        c = int(np.flatnonzero(var <= 0)[0])
        name = schema.CHANNELS[c] if c < len(schema.CHANNELS) else str(c)
        raise ValueError(f"channel {c} ({name}) is constant over the training images; "
                         "drop that channel or check the images")
    return ChannelStats(mean, np.sqrt(var))


def integer_sums(images: np.ndarray) -> tuple[int, list[int], list[int]]:
    """Returns (pixels per channel, per-channel sums, per-channel sums of squares) as ints."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"integer_sums expects uint8 images, got {x.dtype}")
    flat = x.reshape(-1, x.shape[-1]).astype(np.int64)
    # int64 per chunk is exact: 65025 * pixels < 2**63 for any realistic chunk.
    return flat.shape[0], flat.sum(0).tolist(), (flat * flat).sum(0).tolist()


def channel_stats_of(images: np.ndarray) -> ChannelStats:
    """ChannelStats of uint8 images [N, H, W, C] held in memory."""
    return stats_from_sums(*integer_sums(images))


def crop_window(rng: np.random.Generator | None, height: int, width: int,
                size: int) -> tuple[int, int]:
    """Top-left corner of a size x size window: uniform if rng is given, else centred."""
    if size > height or size > width:
        raise ValueError(f"crop_size={size} exceeds the image size {height}x{width}; "
                         "lower data.crop_size")
    if rng is None:
        return (height - size) // 2, (width - size) // 2
    return int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))


def normalize(image: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """(image - mean) / std per channel, as float32."""
    return ((image.astype(np.float32) - stats.mean.astype(np.float32))
            / stats.std.astype(np.float32))


#: Floor of the per-channel std in `standardize` (0-1 intensity scale): a channel whose
#: std is below it (a constant / empty stain) is only centred, not amplified.
STD_EPS = 1e-6


def standardize(view: np.ndarray, eps: float = STD_EPS) -> np.ndarray:
    """(view - mean) / max(std, eps) per channel over the pixels; std unbiased (ddof = 1).

    Args:
      view: float [h, w, C].
      eps: std floor; a channel with std < eps (constant) is centred only.

    Returns:
      float32 [h, w, C]; every channel with std >= eps has mean 0 and unbiased std 1.
    """
    x = view.reshape(-1, view.shape[-1])
    if x.shape[0] < 2:
        raise ValueError(f"standardize needs at least 2 pixels for the unbiased std, got "
                         f"view shape {view.shape}")
    centred = x - x.mean(0, dtype=np.float64).astype(np.float32)
    var = np.einsum("ij,ij->j", centred, centred, dtype=np.float64) / (x.shape[0] - 1)
    scale = (1.0 / np.maximum(np.sqrt(var), eps)).astype(np.float32)
    return (centred * scale).reshape(view.shape)



@dataclasses.dataclass(frozen=True)
class Transform:
    """uint8 HWC -> normalized float32 crop.

    Attributes:
      crop_size: side of the square crop.
      stats: ChannelStats for normalization (None: only scale to float32, 0-255).
      train: True: uniform random crop + random horizontal and vertical flips (p = 0.5
        each); False: centre crop, no flips.
      per_image: standardize every crop by its own per-channel mean and unbiased std
        (CODA's `SelfNormalize`, as the DINO views do) instead of `stats`.
    """

    crop_size: int
    stats: ChannelStats | None = None
    train: bool = False
    per_image: bool = False

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Args: image uint8 [H, W, C]; rng (required when train). Returns float32 [s, s, C]."""
        if self.train and rng is None:
            raise ValueError("a training Transform needs an rng; pass np.random.default_rng(...)")
        h, w = image.shape[:2]
        y, x = crop_window(rng if self.train else None, h, w, self.crop_size)
        out = image[y:y + self.crop_size, x:x + self.crop_size]
        if self.train:
            flip_h, flip_v = rng.integers(2, size=2)
            out = out[:, ::-1] if flip_h else out
            out = out[::-1] if flip_v else out
        if self.per_image:
            return standardize(out.astype(np.float32) / 255.0)
        if self.stats is None:
            return np.ascontiguousarray(out, dtype=np.float32)
        return normalize(out, self.stats)


def train_transform(crop_size: int, stats: ChannelStats | None) -> Transform:
    """Random crop + h/v flips + normalization."""
    return Transform(crop_size, stats, train=True)


def eval_transform(crop_size: int, stats: ChannelStats | None) -> Transform:
    """Centre crop + normalization."""
    return Transform(crop_size, stats, train=False)


def per_image_eval_transform(crop_size: int) -> Transform:
    """Centre crop + per-image per-channel standardization (the DINO family's input)."""
    return Transform(crop_size, None, train=False, per_image=True)
