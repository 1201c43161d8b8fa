"""Per-plate normalization of well-level profiles against the plate's negative controls.

Our own vectorized NumPy code, not pycytominer's: `pycytominer.normalize` computes the
same thing (the tests check equality with it on the real LINCS plate), but through a
pandas DataFrame per call, which costs more. Measured on this project's shared 2-core
machine, one 384-well plate: 454 features 0.24 s (pycytominer mad_robustize) vs
0.002 s (NumPy); the 5,790 raw JUMP features 3.6 s vs 0.05 s, i.e. about 2.5 hours
against 2 minutes for the gallery's 2,500 plates. The formulas, per plate and feature,
over the plate's control wells ``c``:

- ``"mad_robustize"``: ``(x - median_c) / (1.4826 * MAD_c + 1e-18)``, MAD the median
  absolute deviation (pycytominer's ``RobustMAD`` with its default epsilon);
- ``"standardize"``: ``(x - mean_c) / std_c`` with the population std (ddof 0), and
  scale 1 for a feature constant over the controls (sklearn's ``StandardScaler``, which
  pycytominer uses; sklearn also treats a std within rounding error of 0 as constant);
- ``"none"``: unchanged (tables normalized upstream, e.g. JUMP's ``*_normalized``).
"""

from __future__ import annotations

import numpy as np


METHODS: tuple[str, ...] = ("mad_robustize", "standardize", "none")
#: Fewer controls than this cannot give a spread (a MAD or std of one well is 0).
MIN_CONTROLS = 2
#: 1.4826 * MAD estimates the std of a normal distribution (pycytominer's scale).
MAD_SCALE = 1.4826
#: pycytominer's `mad_robustize_epsilon` default.
MAD_EPSILON = 1e-18


def control_stats(xc: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale per feature of one plate's control rows.

    Args:
      xc: float64 [n_controls, D].
      method: "mad_robustize" or "standardize".

    Returns:
      (centre [D], scale [D]); normalized = (x - centre) / scale.
    """
    if method == "mad_robustize":
        centre = np.median(xc, axis=0)
        mad = np.median(np.abs(xc - centre), axis=0)
        return centre, MAD_SCALE * mad + MAD_EPSILON
    centre = xc.mean(axis=0)
    std = np.sqrt(((xc - centre) ** 2).mean(axis=0))
    return centre, np.where(std == 0.0, 1.0, std)


def normalize_per_plate(x: np.ndarray, plate: np.ndarray, is_control: np.ndarray,
                        method: str) -> np.ndarray:
    """Normalizes every plate's rows with statistics of that plate's control rows.

    Args:
      x: float [N, D] raw features (finite).
      plate: [N] plate of each row.
      is_control: bool [N], the negative-control (DMSO) wells.
      method: one of `METHODS`.

    Returns:
      float64 [N, D], rows in the input order.

    Raises:
      ValueError: an unknown method, or a plate with fewer than `MIN_CONTROLS` control
        wells (naming the plate).
    """
    if method not in METHODS:
        raise ValueError(f"profile normalization {method!r} is unknown; set "
                         f"config.data.profiles.normalization to one of {METHODS}")
    x = np.asarray(x, np.float64)
    if method == "none":
        return x
    plate = np.asarray(plate)
    is_control = np.asarray(is_control, bool)
    out = np.empty_like(x)
    for p in np.unique(plate):
        rows = plate == p
        n_ctrl = int((rows & is_control).sum())
        if n_ctrl < MIN_CONTROLS:
            raise ValueError(f"plate {p} has {n_ctrl} control well(s); normalization "
                             f"{method!r} needs at least {MIN_CONTROLS} per plate: add the "
                             "plate's DMSO wells, drop the plate, or set "
                             "config.data.profiles.normalization='none'")
        centre, scale = control_stats(x[rows & is_control], method)
        out[rows] = (x[rows] - centre) / scale
    return out
