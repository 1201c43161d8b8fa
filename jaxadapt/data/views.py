"""Multi-crop views for DINO / CODA on C-channel fluorescence images (NumPy, no JAX).

One sample gives 2 global views and `n_local` local views, cut from the image's central
`centre_crop` pixels (CODA's CenterCrop; 0: the whole image). Per view, in this order:

1. with `crop_mode="plain"` (CODA's recipe), a plain random crop of the view size, taken
   as it is (no resampling: cells keep their size); with `crop_mode="resized"` (DINO's),
   a random resized crop with torchvision's `RandomResizedCrop` semantics: area fraction
   drawn from `scale`, aspect ratio log-uniform in `ratio`, 10 tries then a centred
   fallback (DINO: global (0.4, 1), local (0.05, 0.4));
2. (resized mode) resize to the view size by separable bilinear interpolation (half-pixel centres;
   when shrinking, the triangle filter widens by the shrink factor: antialiasing as
   PIL / torchvision `antialias=True`). DINO resizes bicubically; bilinear is cheaper and
   has no overshoot, which matters for dim fluorescence channels;
3. random horizontal and vertical flips (p = 0.5 each; DINO flips only horizontally,
   CODA both: a micrograph has no "up");
4. CODA's intensity augmentation (`RandomIntensityBrightness`, p = 0.5 per view, on the
   0-1 scale): a per-channel additive shift ~ N(0, intensity_shift), clipped to [0, 1],
   then a per-channel gamma ~ N(1, intensity_gamma) clipped to 1 +- intensity_gamma,
   clipped to [0, 1];
5. per-image per-channel standardization with the unbiased std (ddof = 1), as CODA's
   `SelfNormalize` (which divides by std + 1e-6; we divide by max(std, STD_EPS), so a
   channel has exactly unit std and a constant channel becomes 0 instead of blowing up).

DINO's colour jitter, grayscale, Gaussian blur and solarization are for RGB photographs
and are not applied: as in CODA's Cell Painting recipe, the channels are independent
stains whose relative intensities carry the biology.

Pairs (CODA's cross-batch consistency): global view 0 and locals[:n_local // 2] come from
image A, global view 1 and locals[n_local // 2:] from image B; plain DINO passes the same
image twice. Randomness: one Generator per sample from (seed, epoch, row_a, row_b), so a
view never depends on the batch it sits in, its position or the read thread.

The settings (`ViewsConfig`) and their config-time checks (`check_views_config`) are
here too.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import grain
import numpy as np

from jaxadapt.data import schema
from jaxadapt.data.pipeline import read_records
from jaxadapt.data.sampling import seed_words
from jaxadapt.data.transforms import standardize


def crop_box(rng: np.random.Generator, height: int, width: int,
             scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random crop (top, left, h, w) with torchvision RandomResizedCrop.get_params semantics.

    Args:
      rng: the sample's Generator.
      height, width: image size.
      scale: area fraction range (lo, hi).
      ratio: aspect ratio (w / h) range, sampled log-uniformly.

    Returns:
      (top, left, h, w): 10 tries for a box inside the image, else the largest centred box
      whose aspect ratio is clamped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(log_lo, log_hi))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation from n_in to n_out pixels as taps: (index, weight) [n_out, K].

    Output pixel i samples input coordinate (i + 0.5) * n_in / n_out - 0.5 (half-pixel
    centres). When shrinking, the triangle kernel is widened by n_in / n_out so every
    input pixel contributes (antialias), as PIL and torchvision `antialias=True`; at the
    border the kernel is renormalized (edge clamping). Taps instead of a dense matrix:
    no BLAS call, so a view costs the same in every thread and is bitwise reproducible.

    Returns:
      index int64 [n_out, K] into [0, n_in), weight float32 [n_out, K] (rows sum to 1).
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    taps = int(np.ceil(2 * support)) + 1  # covers every x with |x + 0.5 - centre| < support
    index = np.floor(centres - support - 0.5).astype(np.int64)[:, None] + np.arange(taps)
    weight = np.maximum(0.0, 1.0 - np.abs(index + 0.5 - centres[:, None]) / support)
    weight[(index < 0) | (index >= n_in)] = 0.0
    weight /= weight.sum(1, keepdims=True)
    return np.clip(index, 0, n_in - 1), weight.astype(np.float32)


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int, *,
                 flip_h: bool = False, flip_v: bool = False) -> np.ndarray:
    """Crops `box` = (top, left, h, w), resizes to size x size, optionally flips.

    Args:
      image: [H, W, C], uint8 (0-255, scaled to 0-1) or float (taken as 0-1 already).
      box: crop window, e.g. from `crop_box`.
      size: output side.
      flip_h, flip_v: mirror left-right / up-down.

    Returns:
      float32 [size, size, C] on the 0-1 scale.
    """
    top, left, h, w = box
    iy, wy = resize_taps(h, size)
    ix, wx = resize_taps(w, size)
    if image.dtype == np.uint8:
        wy = wy * np.float32(1 / 255)  # the 0-255 -> 0-1 rescale, folded into the weights
    # Flipping the output = reversing the taps (no pixel copy).
    iy, wy = (iy[::-1], wy[::-1]) if flip_v else (iy, wy)
    ix, wx = (ix[::-1], wx[::-1]) if flip_h else (ix, wx)
    band = image[:, left:left + w]
    rows = wy[:, :1, None] * band[top + iy[:, 0]]
    for k in range(1, iy.shape[1]):
        rows += wy[:, k:k + 1, None] * band[top + iy[:, k]]
    out = wx[None, :, :1] * rows[:, ix[:, 0]]
    for k in range(1, ix.shape[1]):
        out += wx[None, :, k:k + 1] * rows[:, ix[:, k]]
    return out.astype(np.float32, copy=False)


def intensity_augment(view: np.ndarray, rng: np.random.Generator,
                      cfg: ViewsConfig) -> np.ndarray:
    """CODA's RandomIntensityBrightness on a 0-1 view [h, w, C] (per-channel shift + gamma).

    The Generator is advanced by the same amount whether or not the augmentation fires,
    so the draws of later views do not depend on this coin.
    """
    c = view.shape[-1]
    fire = rng.uniform() < cfg.intensity_p
    shift = rng.normal(0.0, cfg.intensity_shift, c)
    g = cfg.intensity_gamma
    gamma = np.clip(rng.normal(1.0, g, c), 1.0 - g, 1.0 + g)
    if not fire:
        return view
    out = np.clip(view + shift.astype(np.float32), 0.0, 1.0)
    return np.clip(out ** gamma.astype(np.float32), 0.0, 1.0)


def plain_crop(image: np.ndarray, top: int, left: int, size: int, *, flip_h: bool = False,
               flip_v: bool = False) -> np.ndarray:
    """The size x size window at (top, left), as it is (no resampling), optionally flipped.

    Args:
      image: [H, W, C], uint8 (0-255, scaled to 0-1) or float (taken as 0-1 already).
      top, left: the window's corner.
      size: its side.
      flip_h, flip_v: mirror left-right / up-down.

    Returns:
      float32 [size, size, C] on the 0-1 scale: exactly the image's pixels there.
    """
    window = image[top:top + size, left:left + size]
    window = window[::-1] if flip_v else window
    window = window[:, ::-1] if flip_h else window
    if image.dtype == np.uint8:
        return window.astype(np.float32) / np.float32(255)
    return window.astype(np.float32)


def centre_crop(image: np.ndarray, size: int, name: str = "image") -> np.ndarray:
    """The central size x size part of `image` (CODA's CenterCrop before its random crops).

    Args:
      image: [H, W, C].
      size: the side kept; 0 keeps the whole image.
      name: the image's name in messages.

    Returns:
      [size, size, C] (a view of `image`, no copy), or `image` itself for size 0.

    Raises:
      ValueError: `size` larger than the image, naming both sizes.
    """
    if size == 0:
        return image
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ValueError(f"ViewsConfig.centre_crop={size} exceeds the {name} size {h}x{w}; "
                         f"lower centre_crop to <= {min(h, w)} (0 keeps the whole image)")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def _view(image: np.ndarray, rng: np.random.Generator, size: int,
          scale: tuple[float, float], cfg: ViewsConfig) -> np.ndarray:
    if cfg.crop_mode == "plain":  # CODA's RandomCrop: cells keep their size in every view
        top = int(rng.integers(image.shape[0] - size + 1))
        left = int(rng.integers(image.shape[1] - size + 1))
    else:
        box = crop_box(rng, image.shape[0], image.shape[1], scale, cfg.ratio)
    flip_h, flip_v = rng.integers(2, size=2) if cfg.flips else (0, 0)
    if cfg.crop_mode == "plain":
        view = plain_crop(image, top, left, size, flip_h=bool(flip_h), flip_v=bool(flip_v))
    else:
        view = resized_crop(image, box, size, flip_h=bool(flip_h), flip_v=bool(flip_v))
    view = intensity_augment(view, rng, cfg)
    return standardize(view) if cfg.standardize else view


def _check_image(image: np.ndarray, name: str, cfg: ViewsConfig) -> None:
    """`image` (after the centre crop) holds views of both sizes."""
    if image.ndim != 3:
        raise ValueError(f"{name} must be one HWC image [H, W, C], got shape {image.shape}")
    h, w = image.shape[:2]
    what = f"centre-cropped {name}" if cfg.centre_crop else name
    for field in ("global_size", "local_size"):
        if getattr(cfg, field) > min(h, w):
            raise ValueError(f"ViewsConfig.{field}={getattr(cfg, field)} exceeds the {what} "
                             f"size {h}x{w}; lower {field} to <= {min(h, w)}")


def make_views(image_a: np.ndarray, image_b: np.ndarray, rng: np.random.Generator,
               cfg: ViewsConfig) -> dict[str, np.ndarray]:
    """The multi-crop views of one sample (a pair of images, or one image twice).

    Args:
      image_a: [H, W, C] uint8 (0-255) or float (0-1).
      image_b: the partner image (same C; may differ in H, W); pass image_a itself (or
        None) for plain DINO.
      rng: the sample's Generator, e.g. `view_rng(seed, epoch, row_a, row_b)`.
      cfg: ViewsConfig.

    Returns:
      {"global": float32 [2, G, G, C], "local": float32 [n_local, l, l, C]}: global 0 and
      locals[:n_local // 2] from image_a, global 1 and locals[n_local // 2:] from image_b.

    Raises:
      ValueError: bad settings, a view larger than an image, differing channel counts, or
        an odd n_local with two different images.
    """
    problems = _problems(cfg, "ViewsConfig")
    if problems:
        raise ValueError("; ".join(problems))
    same = image_b is None or image_b is image_a
    image_a = np.asarray(image_a)
    image_b = image_a if same else np.asarray(image_b)
    if image_a.ndim == 3:
        image_a = centre_crop(image_a, cfg.centre_crop, "image_a")
        image_b = image_a if same else centre_crop(image_b, cfg.centre_crop, "image_b")
    _check_image(image_a, "image_a", cfg)
    if not same:
        _check_image(image_b, "image_b", cfg)
        if image_a.shape[-1] != image_b.shape[-1]:
            raise ValueError(f"image_a has {image_a.shape[-1]} channels, image_b "
                             f"{image_b.shape[-1]}; pair images of the same channels")
        if cfg.n_local % 2:
            raise ValueError(f"ViewsConfig.n_local={cfg.n_local} is odd but two different "
                             "images split the local views in halves; use an even n_local")
    half = cfg.n_local // 2
    globals_ = [_view(im, rng, cfg.global_size, cfg.global_scale, cfg)
                for im in (image_a, image_b)]
    locals_ = [_view(image_a if i < half else image_b, rng, cfg.local_size, cfg.local_scale, cfg)
               for i in range(cfg.n_local)]
    c = image_a.shape[-1]
    return {"global": np.stack(globals_),
            "local": (np.stack(locals_) if locals_ else
                      np.zeros((0, cfg.local_size, cfg.local_size, c), np.float32))}


def view_rng(seed: int | Sequence[int], epoch: int, row_a: int, row_b: int) -> np.random.Generator:
    """The Generator of one sample: a function of (seed, epoch, row_a, row_b) only.

    Plain DINO (row_b == row_a) is keyed by (seed, epoch, row); a cross-batch pair also by
    its partner, so an anchor drawn twice in an epoch with two partners gets fresh crops.
    """
    words = [*seed_words(seed), int(epoch), int(row_a), int(row_b)]
    if min(words) < 0:
        raise ValueError(f"seed, epoch and rows must be >= 0, got {words}")
    return np.random.default_rng(words)


class _LoadViews:
    """grain map function: batch index k -> dict batch of views (picklable, no lambdas)."""

    def __init__(self, source, table, pair_batches, cfg, seed, epoch, channels):
        self.source, self.table, self.pair_batches = source, table, pair_batches
        self.cfg, self.seed, self.epoch, self.channels = cfg, seed, epoch, channels
        self.labels = np.asarray(table["label"], np.int32)
        self.is_control = np.asarray(table["is_control"], bool)

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        pairs = self.pair_batches[k]
        rows = np.unique(pairs)  # a row read once per batch even when it appears twice
        images = dict(zip(rows.tolist(), read_records(self.source, rows, self.table, self.channels)))
        views = []
        for a, b in pairs.tolist():
            img_a = images[a]
            img_b = img_a if a == b else images[b]
            views.append(make_views(img_a, img_b, view_rng(self.seed, self.epoch, a, b),
                                    self.cfg))
        row_a, row_b = pairs[:, 0], pairs[:, 1]
        return {
            "global": np.stack([v["global"] for v in views]),
            "local": np.stack([v["local"] for v in views]),
            "row_a": row_a, "row_b": row_b,
            "label": self.labels[row_a], "is_control": self.is_control[row_a],
        }


def _pair_batches(pair_batches: Any, n_rows: int, cfg: ViewsConfig) -> list[np.ndarray]:
    out = []
    for k, pairs in enumerate(pair_batches):
        pairs = np.asarray(pairs)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or (pairs.size and pairs.dtype.kind not in "iu"):
            raise ValueError(f"pair_batches[{k}] must be an int array [B, 2] of (row_a, row_b), "
                             f"got dtype {pairs.dtype} shape {pairs.shape}; plain DINO passes "
                             "np.stack([rows, rows], 1)")
        if pairs.size and (pairs.min() < 0 or pairs.max() >= n_rows):
            raise ValueError(f"pair_batches[{k}] holds rows outside [0, {n_rows}) of the table")
        if cfg.n_local % 2 and (pairs[:, 0] != pairs[:, 1]).any():
            raise ValueError(f"ViewsConfig.n_local={cfg.n_local} is odd but pair_batches[{k}] "
                             "pairs different images, which split the local views in halves; "
                             "use an even n_local")
        out.append(pairs.astype(np.int64))
    return out


def view_batches(source: Any, table: schema.SiteTable, pair_batches: Any, *,
                 cfg: ViewsConfig, seed: int | Sequence[int], epoch: int,
                 num_threads: int = 4, prefetch: int = 8,
                 channels: int = len(schema.CHANNELS)) -> Iterator[dict[str, np.ndarray]]:
    """Iterates batches of multi-crop views of (row_a, row_b) pairs, read by grain threads.

    Reads with `pipeline`'s checked reader (a bad image names its row) and grain's
    `MapDataset` + `ReadOptions`, one grain element per batch, as `pipeline.batches`.

    Args:
      source: random-access records with `__getitems__`, `["image"]` uint8 [H, W, C]
        (e.g. the TFDS array_record source of `store.ensure_store`).
      table: the SiteTable of `source`.
      pair_batches: sequence of int [B, 2] arrays (row_a, row_b), or one int [K, B, 2]
        array; plain DINO passes row_b == row_a.
      cfg: ViewsConfig.
      seed: int or tuple of ints (the run seed).
      epoch: epoch number; sample (a, b) uses `view_rng(seed, epoch, a, b)`, so its views
        do not depend on the batch, the position in it or the thread.
      num_threads: grain read threads (batches prepared in parallel).
      prefetch: grain prefetch buffer size (batches).
      channels: expected channel count of every image.

    Returns:
      Iterator of dicts: `global` float32 [B, 2, G, G, C], `local` float32 [B, n_local,
      l, l, C] (image-major), `row_a`, `row_b` int64 [B], `label` int32 [B] and
      `is_control` bool [B] of row_a.

    Raises:
      ValueError: bad settings or pair arrays (at once); while iterating, a view larger
        than an image or a bad image (naming its row).
    """
    problems = _problems(cfg, "ViewsConfig")
    if problems:
        raise ValueError("; ".join(problems))
    pairs = _pair_batches(pair_batches, len(table), cfg)
    load = _LoadViews(source, table, pairs, cfg, seed_words(seed), int(epoch), channels)
    ds = grain.MapDataset.range(len(pairs)).map(load)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


class ViewsConfig(NamedTuple):
    """Multi-crop view settings.

    Attributes:
      global_size: side of the 2 global views (DINO 224).
      local_size: side of the local views (DINO 96).
      n_local: number of local views (DINO 8 / 10, CODA 6); even when pairs split them.
      global_scale: area fraction range of global crops, within (0, 1].
      local_scale: area fraction range of local crops, within (0, 1].
      ratio: aspect-ratio (w / h) range of crops; (1, 1) with a fixed scale gives
        fixed-size random crops (CODA's released recipe uses plain random crops).
      flips: random horizontal and vertical flips.
      intensity_p: probability per view of CODA's intensity augmentation (0: off).
      intensity_shift: std of the per-channel additive shift (0-1 scale).
      intensity_gamma: std (and clip half-width) of the per-channel gamma around 1.
      standardize: per-view per-channel z-score with the unbiased std.
      crop_mode: "resized" (DINO's RandomResizedCrop: `*_scale` and `ratio`, then a
        bilinear resize to the view size) or "plain" (CODA's RandomCrop: a window of the
        view size taken as it is, so cells keep their size in every view; `*_scale` and
        `ratio` are unused).
      centre_crop: side of the image's centre kept before any view is cut (CODA: 448 of
        the 1080 px field); 0 keeps the whole image.
    """

    global_size: int = 96
    local_size: int = 48
    n_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flips: bool = True
    intensity_p: float = 0.5
    intensity_shift: float = 0.005
    intensity_gamma: float = 0.005
    standardize: bool = True
    crop_mode: str = "resized"
    centre_crop: int = 0


#: How views are cut (`ViewsConfig.crop_mode`).
CROP_MODES = ("resized", "plain")


def views_config(section: Any) -> ViewsConfig:
    """A ViewsConfig from a ViewsConfig, dict or ConfigDict section (missing keys: defaults).

    Raises:
      ValueError: a key that is not a ViewsConfig field.
    """
    if isinstance(section, ViewsConfig):
        return section
    items = dict(section.items())
    unknown = sorted(set(items) - set(ViewsConfig._fields))
    if unknown:
        raise ValueError(f"unknown views setting(s) {unknown}; allowed: "
                         f"{list(ViewsConfig._fields)}")
    return ViewsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in items.items()})


def _range_problems(name: str, value: Any, low_open: float, high: float | None) -> list[str]:
    """(lo, hi) with low_open < lo <= hi (<= high when given)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        return [f"{name}={value!r} must be a pair (lo, hi) of numbers"]
    top = "" if high is None else f" <= {high:g}"
    if not (low_open < lo <= hi and (high is None or hi <= high)):
        return [f"{name}={tuple(value)} must satisfy {low_open:g} < lo <= hi{top}; "
                f"e.g. (0.4, 1.0) for global, (0.05, 0.4) for local crops"]
    return []


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _problems(cfg: ViewsConfig, where: str) -> list[str]:
    """Every problem of the settings alone (no image size), as messages."""
    out = [f"{where}.{name}={getattr(cfg, name)!r} must be a positive int (pixels)"
           for name in ("global_size", "local_size")
           if not (_is_int(getattr(cfg, name)) and getattr(cfg, name) > 0)]
    if not (_is_int(cfg.n_local) and cfg.n_local >= 0):
        out.append(f"{where}.n_local={cfg.n_local!r} must be an int >= 0")
    out += _range_problems(f"{where}.global_scale", cfg.global_scale, 0.0, 1.0)
    out += _range_problems(f"{where}.local_scale", cfg.local_scale, 0.0, 1.0)
    out += _range_problems(f"{where}.ratio", cfg.ratio, 0.0, None)
    for name, high, fix in [("intensity_p", 1.0, "0 turns it off"),
                            ("intensity_shift", 0.5, "CODA uses 0.005"),
                            ("intensity_gamma", 0.5, "CODA uses 0.005")]:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= high:
            out.append(f"{where}.{name}={v!r} must be a number in [0, {high:g}] ({fix})")
    out += [f"{where}.{name}={getattr(cfg, name)!r} must be True or False"
            for name in ("flips", "standardize") if not isinstance(getattr(cfg, name), bool)]
    if cfg.crop_mode not in CROP_MODES:
        out.append(f"{where}.crop_mode={cfg.crop_mode!r} is not one of {list(CROP_MODES)}; "
                   "use 'resized' (DINO) or 'plain' (CODA)")
    if not (_is_int(cfg.centre_crop) and cfg.centre_crop >= 0):
        out.append(f"{where}.centre_crop={cfg.centre_crop!r} must be an int >= 0 (pixels; "
                   "0 keeps the whole image)")
    return out


def check_views_config(cfg_views: Any, image_size: int | tuple[int, int] | None, *,
                       patch_size: int | None = None, paired: bool = True,
                       where: str = "ViewsConfig") -> ViewsConfig:
    """Checks view settings at config time (the validator calls this).

    Args:
      cfg_views: ViewsConfig, dict or ConfigDict section with ViewsConfig keys.
      image_size: side (or (height, width)) of the stored images; None skips size checks.
      patch_size: ViT patch size that must divide both view sizes; None skips.
      paired: cross-batch pairs split the locals between two images: n_local must be even.
      where: name of the section in messages, e.g. "config.dino.views".

    Returns:
      the ViewsConfig.

    Raises:
      ValueError: listing every problem, each naming the field, its value and the fix.
    """
    cfg = views_config(cfg_views)
    out = _problems(cfg, where)
    if not out and paired and cfg.n_local % 2:
        out.append(f"{where}.n_local={cfg.n_local} is odd but pairs give half the local views "
                   f"to each image; use an even n_local such as {cfg.n_local + 1}")
    if not out and image_size is not None:
        h, w = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
        if cfg.centre_crop > min(h, w):
            out.append(f"{where}.centre_crop={cfg.centre_crop} exceeds the image size {h}x{w}; "
                       f"lower centre_crop to <= {min(h, w)} (0 keeps the whole image)")
        elif cfg.centre_crop:
            h = w = cfg.centre_crop
        what = "centre-cropped image" if cfg.centre_crop else "image"
        for name in () if out else ("global_size", "local_size"):
            if getattr(cfg, name) > min(h, w):
                out.append(f"{where}.{name}={getattr(cfg, name)} exceeds the {what} size "
                           f"{h}x{w}; lower {name} to <= {min(h, w)}")
    if not out and patch_size is not None:
        for name in ("global_size", "local_size"):
            if getattr(cfg, name) % patch_size:
                out.append(f"{where}.{name}={getattr(cfg, name)} is not a multiple of the "
                           f"patch size {patch_size}; use a multiple of {patch_size}")
    if out:
        raise ValueError("; ".join(out))
    return cfg
