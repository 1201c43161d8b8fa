"""The sample schema: field names, dtypes and validation shared by every data source.

Field names follow the JUMP Cell Painting metadata where a JUMP name exists. A
`SiteTable` holds one row per site image (the unit of a sample) as a dict of
equal-length NumPy arrays; samplers and splits work on it without touching pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

#: Channel order of every image, as in JUMP-CP.
CHANNELS: tuple[str, ...] = ("DNA", "ER", "RNA", "AGP", "Mito")

#: JUMP's DMSO negative control compound.
DMSO = "JCP2022_033924"

#: Label given to rows that carry no class (negative controls, unlabelled wells).
NO_LABEL = -1

#: Required metadata fields and their NumPy dtype kind ('U' string, 'i' int, 'b' bool).
SITE_FIELDS: dict[str, str] = {
    "source": "U",  # lab / data-generating centre, e.g. "source_3"
    "batch": "U",  # experimental batch (one run of plates)
    "plate": "U",  # plate barcode
    "well": "U",  # well name, e.g. "A01"
    "site": "i",  # site (field of view) index within the well
    "compound": "U",  # JCP2022 compound id; DMSO for negative controls
    "moa": "U",  # mechanism-of-action name, "" where unknown
    "label": "i",  # class index, NO_LABEL for controls
    "is_control": "b",  # negative-control (DMSO) well
}


@dataclasses.dataclass(frozen=True)
class SiteTable:
    """Metadata of a set of site images: one row per site, columns as NumPy arrays.

    Row `i` describes record `i` of the matching image store. Extra columns (e.g.
    `site_id`, `row`, `col`, simulator latents) are allowed beside `SITE_FIELDS`.

    Attributes:
      columns: field name -> 1-D array, all of the same length.
    """

    columns: Mapping[str, np.ndarray]

    def __post_init__(self):
        validate_columns(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, field: str) -> np.ndarray:
        if field not in self.columns:
            raise KeyError(
                f"SiteTable has no field {field!r}; fields are {sorted(self.columns)}"
            )
        return self.columns[field]

    def __contains__(self, field: str) -> bool:
        return field in self.columns

    def take(self, rows: np.ndarray) -> "SiteTable":
        """Returns the table restricted to `rows` (integer indices or a boolean mask)."""
        return SiteTable({k: v[rows] for k, v in self.columns.items()})

    def unique(self, field: str) -> np.ndarray:
        """Returns the sorted distinct values of `field`."""
        return np.unique(self[field])


def validate_columns(columns: Mapping[str, np.ndarray]) -> None:
    """Checks that `columns` holds every schema field, 1-D, equal length, right kind.

    Args:
      columns: field name -> array.

    Raises:
      ValueError: naming the missing or malformed field and how to fix it.
    """
    missing = [f for f in SITE_FIELDS if f not in columns]
    if missing:
        raise ValueError(
            f"site metadata lacks fields {missing}; every data source must provide "
            f"{list(SITE_FIELDS)} (see jaxadapt.data.schema.SITE_FIELDS)"
        )
    lengths = {k: np.shape(v) for k, v in columns.items()}
    if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        raise ValueError(
            f"site metadata columns must be 1-D and of equal length, got shapes {lengths}"
        )
    for field, kind in SITE_FIELDS.items():
        got = np.asarray(columns[field]).dtype.kind
        ok = got == kind or (kind == "i" and got == "u") or (kind == "U" and got == "S")
        if not ok:
            raise ValueError(
                f"site metadata field {field!r} has dtype {columns[field].dtype}; expected "
                f"kind {kind!r} (U=str, i=int, b=bool): convert it with np.asarray(..., dtype=...)"
            )


def check_images(images: np.ndarray, *, channels: int = len(CHANNELS), what: str = "images") -> None:
    """Fails early on a wrong layout, channel count or non-finite pixel.

    Args:
      images: array [N, H, W, C] (uint8 on disk, float in memory).
      channels: the channel count the caller expects.
      what: name used in the message, e.g. "plate BR00117010 images".

    Raises:
      ValueError: naming the shape, channel count or count and position of NaN/Inf pixels.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"{what} must be NHWC [N, H, W, C], got shape {images.shape}; add a batch axis "
            "with images[None] for one image, or transpose NCHW with images.transpose(0, 2, 3, 1)"
        )
    if images.shape[-1] != channels:
        raise ValueError(
            f"{what} have {images.shape[-1]} channels (shape {images.shape}); expected "
            f"{channels} ({', '.join(CHANNELS[:channels]) if channels <= len(CHANNELS) else 'per config'}); "
            "set the config's data.channels or select channels before the model"
        )
    if images.dtype.kind == "f":
        bad = ~np.isfinite(images)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{what} contain {int(bad.sum())} NaN/Inf pixel values (first at index "
                f"{first} [n, y, x, c]); clean or drop those images before training"
            )
