"""Per-plate normalization of well-level profiles against the plate's negative controls.

Done by **pycytominer** (`pycytominer.normalize` with ``samples`` = the plate's DMSO
wells), called once per plate: it is the JUMP community's reference implementation, and
at about 0.1 s per 384-well plate of 454 features (measured on one CPU core) a whole
gallery of 2,500 plates costs minutes, which is not worth a second implementation.
The formulas, restated in the tests with NumPy:

- ``"mad_robustize"``: ``(x - median_c) / (1.4826 * MAD_c + 1e-18)``, median and MAD
  (median absolute deviation) over the plate's controls ``c``, per feature;
- ``"standardize"``: ``(x - mean_c) / std_c`` (population std, ddof 0; a feature
  constant over the controls keeps scale 1, sklearn's convention);
- ``"none"``: unchanged (tables normalized upstream, e.g. JUMP's ``*_normalized``).
"""

from __future__ import annotations

import numpy as np

METHODS: tuple[str, ...] = ("mad_robustize", "standardize", "none")
#: Fewer controls than this cannot give a spread (a MAD or std of one well is 0).
MIN_CONTROLS = 2


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
    import pandas as pd  # pylint: disable=g-import-not-at-top
    from pycytominer import normalize  # pylint: disable=g-import-not-at-top

    names = [f"Cells_f{j}" for j in range(x.shape[1])]  # unique, pycytominer-style names
    out = np.empty_like(x)
    is_control = np.asarray(is_control, bool)
    for p in np.unique(plate):
        rows = np.flatnonzero(plate == p)
        n_ctrl = int(is_control[rows].sum())
        if n_ctrl < MIN_CONTROLS:
            raise ValueError(f"plate {p} has {n_ctrl} control well(s); normalization "
                             f"{method!r} needs at least {MIN_CONTROLS} per plate: add the "
                             "plate's DMSO wells, drop the plate, or set "
                             "config.data.profiles.normalization='none'")
        df = pd.DataFrame(x[rows], columns=names)
        df["Metadata_is_control"] = is_control[rows]
        done = normalize(df, features=names, meta_features=["Metadata_is_control"],
                         samples="Metadata_is_control == True", method=method)
        out[rows] = done[names].to_numpy(np.float64)
    return out
