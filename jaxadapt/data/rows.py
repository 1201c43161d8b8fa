"""Row-index helpers shared by the samplers (pure NumPy, no pixels).

Checking a row-index array, turning a seed into entropy words, grouping rows by their
plate / batch / source, drawing rows, and cutting rows into padded batches: used by the
training samplers (`jaxadapt.data.samplers`, which re-exports the public ones) and the
target units (`jaxadapt.data.target_units`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxadapt.data import schema


def _rows(rows) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ValueError(f"rows must be a 1-D integer index array, got dtype {rows.dtype} "
                         f"shape {rows.shape}; pass np.flatnonzero(mask) for a boolean mask")
    return rows.astype(np.int64)


def _seed_words(seed: int | Sequence[int]) -> list[int]:
    """Entropy words of a seed given as an int or a sequence of ints (e.g. (eval seed, replicate seed))."""
    return [int(seed)] if np.ndim(seed) == 0 else [int(x) for x in seed]


def group_rows(table: schema.SiteTable, rows: np.ndarray, field: str,
               control: bool) -> dict[str, np.ndarray]:
    """Groups the control (or perturbed) rows among `rows` by a unit field.

    Args:
      table: the study's SiteTable.
      rows: candidate rows.
      field: the unit: "plate", "batch" or "source".
      control: True for control rows, False for perturbed ones.

    Returns:
      unit name -> its rows with is_control == control, in the order of `rows`. Perturbed
      rows are the *labelled* ones: a treated image without a class (label -1, e.g. a
      TARGET2 compound without a single MoA) can be neither trained on nor scored.
    """
    keep = table["is_control"][rows] == control
    if not control:
        keep &= table["label"][rows] >= 0
    sel = rows[keep]
    names = table[field][sel]
    uniq, inv = np.unique(names, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    splits = np.split(sel[order], np.cumsum(np.bincount(inv, minlength=len(uniq)))[:-1])
    return {str(u): s for u, s in zip(uniq, splits)}


def draw_rows(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    """Draws k rows of `pool`, without replacement unless the pool is too small.

    Args:
      rng: the generator to draw with.
      pool: candidate rows.
      k: how many to draw (0 gives an empty array of pool's dtype).

    Returns:
      int array [k].
    """
    if k == 0:
        return pool[:0]
    return rng.choice(pool, size=k, replace=len(pool) < k)


def padded_batches(rows, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts rows into batches, padding the last one with repeats masked False.

    Args:
      rows: int row indices, in the order they should be visited.
      batch_size: rows per batch (>= 1).

    Returns:
      (rows int64 [n, batch_size], mask bool [n, batch_size]); every input row appears
      exactly once with mask True, so nothing is dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive batch size")
    rows = _rows(rows)
    n = -(-len(rows) // batch_size)
    padded = np.resize(rows, n * batch_size)  # np.resize repeats rows from the start
    mask = np.arange(n * batch_size) < len(rows)
    return padded.reshape(n, batch_size), mask.reshape(n, batch_size)
