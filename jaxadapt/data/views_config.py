"""The settings of the multi-crop views (`ViewsConfig`) and their config-time checks.

`jaxadapt.data.views` makes the views and re-exports `ViewsConfig`, `views_config` and
`check_views_config`; the validator checks a study config's view sections here, before
anything runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


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
        for name in ("global_size", "local_size"):
            if getattr(cfg, name) > min(h, w):
                out.append(f"{where}.{name}={getattr(cfg, name)} exceeds the image size "
                           f"{h}x{w}; lower {name} to <= {min(h, w)}")
    if not out and patch_size is not None:
        for name in ("global_size", "local_size"):
            if getattr(cfg, name) % patch_size:
                out.append(f"{where}.{name}={getattr(cfg, name)} is not a multiple of the "
                           f"patch size {patch_size}; use a multiple of {patch_size}")
    if out:
        raise ValueError("; ".join(out))
    return cfg
