"""Typical Variation Normalization (TVN) and per-batch CORAL of frozen embeddings.

TVN as in EFAAR (Celik et al., Recursion's embedding benchmark), fitted on the negative
controls (DMSO) only, so that the controls' "typical" variation becomes white noise:

1. standardize every row with the controls' per-feature mean and std (ddof 0);
2. PCA fitted on the standardized controls, applied to every row;
3. standardize again with the controls' statistics in PCA space: the controls come out
   with zero mean and identity covariance.

Steps 1-3 compose into one affine map, kept as an explicit `TVNState` (`fit_tvn` builds
it, `apply_tvn` uses it; both pure). The optional `coral` step then multiplies each
batch's rows by (cov_ddof1(that batch's controls) + lam I)^(-1/2), as EFAAR does.

Fewer controls than dimensions: n controls span at most n - 1 directions, so the
original divides by ~0 in step 3 and explodes. Here those directions are *dropped*
(see `fit_tvn`). Everything is computed in float64 NumPy (JAX arrays are accepted).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np


__all__ = ["TVNState", "apply_tvn", "coral", "fit_tvn", "inverse_sqrt", "tvn"]

log = logging.getLogger(__name__)


class TVNState(NamedTuple):
    """The fitted TVN map: ``y = ((x - mean) / scale) @ components / pc_std``.

    Attributes:
      mean: float64 [D], the controls' per-feature mean.
      scale: float64 [D], the controls' per-feature std (ddof 0); 1 where a feature is
        constant among the controls (as sklearn's StandardScaler).
      components: float64 [D, K], the kept principal directions of the standardized
        controls, by decreasing variance; each column's largest-magnitude entry is
        positive (a deterministic sign).
      pc_std: float64 [K], the controls' std (ddof 0) along each kept direction.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    pc_std: np.ndarray

    @property
    def out_dim(self) -> int:
        """K, the number of output dimensions (kept principal directions)."""
        return int(self.components.shape[1])


def _embeddings(x: Any, name: str = "embeddings") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array; got shape {x.shape}. "
                         "Reshape to [N, D] (one row per sample).")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers; got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} rows with NaN/inf (first row "
                         f"{int(np.flatnonzero(bad)[0])}); drop or impute them before TVN.")
    return x


def _control_mask(is_control: Any, n: int) -> np.ndarray:
    m = np.asarray(is_control)
    if m.shape != (n,):
        raise ValueError(f"is_control has shape {m.shape} but embeddings have {n} rows; "
                         "pass one flag per embedding row.")
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.integer) or not np.isin(m, (0, 1)).all():
            raise ValueError(f"is_control must be booleans (or 0/1); got dtype {m.dtype}")
        m = m.astype(bool)
    return m


def fit_tvn(embeddings: Any, is_control: Any, *, eps: float = 1e-8,
            min_variance: float = 1e-6) -> TVNState:
    """Fits TVN on the control rows of ``embeddings``.

    Near-zero-variance directions are dropped, not regularized: the controls show no
    typical variation there, so there is nothing to normalize against, and a regularized
    1/sqrt(var + eps) would blow any non-control variation along them up by ~1/sqrt(eps)
    and let it dominate every distance. Dropping keeps the output finite and the kept
    controls exactly white. The output dimension K is therefore at most
    min(D, n_controls - 1) (centred controls span at most n_controls - 1 directions) and
    at most the number of features that vary among the controls; K = D when the controls
    are many and in general position.

    Args:
      embeddings: [N, D] real, finite embeddings (controls and perturbations).
      is_control: [N] booleans (or 0/1), True for the negative-control rows.
      eps: a feature whose controls' std is <= eps is constant among the controls; it is
        centred but not scaled in step 1 (scale 1), and PCA then drops it.
      min_variance: a principal direction is kept only if the controls' variance along
        it exceeds min_variance times the largest one (relative, as numpy's rank
        tolerance); the variances are of standardized features, i.e. in units of 1.

    Returns:
      The TVNState (``state.out_dim`` = K).

    Raises:
      ValueError: not [N, D], NaN/inf rows, is_control of the wrong length or type,
        fewer than 2 controls, controls without variation, or a bad eps/min_variance.
    """
    x = _embeddings(embeddings)
    ctrl = _control_mask(is_control, len(x))
    n_ctrl = int(ctrl.sum())
    if n_ctrl < 2:
        raise ValueError(f"TVN needs >= 2 control rows to estimate their variation; got "
                         f"{n_ctrl} of {len(x)}. Mark the negative-control (e.g. DMSO) rows "
                         "in is_control, or pool controls from more wells/plates.")
    if not (eps >= 0 and 0 <= min_variance < 1):
        raise ValueError(f"need eps >= 0 and 0 <= min_variance < 1; got eps={eps}, "
                         f"min_variance={min_variance}")
    c = x[ctrl]
    mean, std = c.mean(axis=0), c.std(axis=0)
    scale = np.where(std > eps, std, 1.0)
    z = (c - mean) / scale
    # PCA by SVD of the centred controls: variance of direction i = s_i^2 / n (ddof 0).
    # With many controls, the [D, D] R of a QR has the same singular values and right
    # vectors, and spares the [n, D] left vectors that the SVD would allocate.
    zc = z - z.mean(axis=0)
    if n_ctrl > x.shape[1]:
        zc = np.linalg.qr(zc, mode="r")
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    var = s ** 2 / n_ctrl
    keep = var > min_variance * var[0]
    if var[0] <= 0 or not keep.any():
        raise ValueError(f"the {n_ctrl} control rows do not vary (all identical after "
                         "standardization); TVN cannot be fitted on them.")
    comps = vt[keep].T
    # Deterministic signs: each column's largest-magnitude entry positive.
    flip = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(flip == 0, 1.0, flip)
    pc_std = np.sqrt(var[keep])
    log.info("TVN: %d controls, %d features -> %d directions kept", n_ctrl, x.shape[1],
             comps.shape[1])
    return TVNState(mean, scale, comps, pc_std)


def apply_tvn(state: TVNState, embeddings: Any) -> np.ndarray:
    """Maps embeddings through a fitted TVN (steps 1-3).

    The controls' mean after step 2 is zero by construction, so step 3's centring is a
    no-op and omitted.

    Args:
      state: from `fit_tvn`.
      embeddings: [N, D] real, finite embeddings, D as at fit time.

    Returns:
      float64 [N, K] normalized embeddings, K = ``state.out_dim``.

    Raises:
      ValueError: not [N, D] with the fitted D, or NaN/inf rows.
    """
    x = _embeddings(embeddings)
    if x.shape[1] != state.mean.shape[0]:
        raise ValueError(f"embeddings have {x.shape[1]} features but the TVN was fitted on "
                         f"{state.mean.shape[0]}; apply it to embeddings of the same model.")
    return ((x - state.mean) / state.scale) @ state.components / state.pc_std


def inverse_sqrt(cov: np.ndarray, lam: float) -> np.ndarray:
    """(cov + lam I)^(-1/2), the symmetric inverse square root by eigendecomposition.

    Args:
      cov: [D, D] symmetric positive semi-definite matrix.
      lam: ridge added to the diagonal (> 0 keeps it invertible).

    Returns:
      [D, D] symmetric matrix M with M (cov + lam I) M = I.
    """
    w, v = np.linalg.eigh(cov)
    # Eigenvalues of a PSD matrix can come out slightly negative by rounding.
    w = np.maximum(w, 0.0) + lam
    return (v / np.sqrt(w)) @ v.T


def coral(embeddings: Any, is_control: Any, batch_ids: Any, *, lam: float = 0.5) -> np.ndarray:
    """Per-batch CORAL as in EFAAR: rows of batch b times (C_b + lam I)^(-1/2).

    C_b is the covariance (ddof 1) of batch b's control rows. The rows are not centred
    (EFAAR does not: TVN already centred the controls globally). A batch with fewer than
    2 controls has no covariance estimate; that is an error, not a silent fallback.

    Args:
      embeddings: [N, D] real, finite embeddings (usually `apply_tvn`'s output).
      is_control: [N] booleans (or 0/1), True for the negative-control rows.
      batch_ids: [N] batch labels (any hashable scalars: ints, strings).
      lam: ridge (> 0) that keeps the inverse square root finite.

    Returns:
      float64 [N, D] with each batch's rows transformed by its own matrix.

    Raises:
      ValueError: bad embeddings/is_control (as `fit_tvn`), batch_ids of the wrong
        length, lam <= 0, or a batch with fewer than 2 controls.
    """
    x = _embeddings(embeddings)
    ctrl = _control_mask(is_control, len(x))
    ids = np.asarray(batch_ids)
    if ids.shape != (len(x),):
        raise ValueError(f"batch_ids has shape {ids.shape} but embeddings have {len(x)} rows; "
                         "pass one batch label per row.")
    if not lam > 0:
        raise ValueError(f"CORAL lam must be > 0 (it keeps (C + lam I)^(-1/2) finite); got {lam}")
    out = np.empty_like(x)
    for b in np.unique(ids):
        rows = ids == b
        b = b.item() if isinstance(b, np.generic) else b
        c = x[rows & ctrl]
        if len(c) < 2:
            raise ValueError(f"CORAL: batch {b!r} has {len(c)} control rows, need >= 2 for a "
                             "covariance; merge it with another batch or skip CORAL.")
        cov = np.atleast_2d(np.cov(c, rowvar=False, ddof=1))
        out[rows] = x[rows] @ inverse_sqrt(cov, lam)
    return out


def tvn(embeddings: Any, is_control: Any, batch_ids: Any = None, *, lam: float = 0.5,
        eps: float = 1e-8, min_variance: float = 1e-6) -> np.ndarray:
    """TVN fitted on the controls and applied to every row, then CORAL if batches are given.

    Args:
      embeddings: [N, D] real, finite embeddings.
      is_control: [N] booleans (or 0/1), True for the negative-control rows.
      batch_ids: optional [N] batch labels; None skips the CORAL step.
      lam: CORAL ridge.
      eps, min_variance: as in `fit_tvn`.

    Returns:
      float64 [N, K] normalized embeddings (K as in `fit_tvn`).
    """
    state = fit_tvn(embeddings, is_control, eps=eps, min_variance=min_variance)
    out = apply_tvn(state, embeddings)
    return out if batch_ids is None else coral(out, is_control, batch_ids, lam=lam)
