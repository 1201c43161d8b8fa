"""Cross-batch pairs for self-supervised training (CODA): two images of one compound.

CODA feeds DINO's two global views (and half the local views each) from two images of the
same compound taken on different plates (or batches), so the teacher and student must agree
across technical variation. `cross_batch_pairs` draws, for every anchor row, a partner row
of the same compound in another plate/batch, uniformly among the candidates, from
`np.random.default_rng((seed, epoch, level))`, so an epoch's pairs do not depend on what was
drawn before (a resumed run sees the same pairs).

Where no such partner exists the reference crashes; here the anchor falls back, and each
fallback is counted:
  1. `same_plate_fallback`: another image of the compound inside the anchor's own plate
     (level "plate") or batch (level "batch"): another well if there is one, else another
     site of the anchor's well;
  2. `self_fallback`: the anchor itself (DINO then sees two augmentations of one image).

DMSO is paired like any compound (with DMSO of another plate/batch): the controls carry the
purest plate effect, so pairing them across plates is the same invariance lesson. Callers
who want treated images only pass rows without controls.
"""

from __future__ import annotations

import zlib

import numpy as np

from jaxadapt.data import sampling as samplers, schema


LEVELS = ("plate", "batch")


def _codes(*columns: np.ndarray) -> np.ndarray:
    """Integer code per row of the joint value of string columns (equal rows, equal codes)."""
    joined = columns[0].astype(str)
    for c in columns[1:]:
        joined = np.char.add(np.char.add(joined, "\x00"), c.astype(str))
    return np.unique(joined, return_inverse=True)[1].reshape(-1)


def _blocks(sorted_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) in a sorted array of the run of equal codes each position belongs to."""
    n = len(sorted_codes)
    edge = np.flatnonzero(np.diff(sorted_codes)) + 1
    starts, ends = np.r_[0, edge], np.r_[edge, n]
    run = np.repeat(np.arange(len(starts)), ends - starts)
    return starts[run], ends[run]


def _pick_outside(u: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  in_lo: np.ndarray, in_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform position in [lo, hi) minus the sub-range [in_lo, in_hi); (position, any?)."""
    n_cand = (hi - lo) - (in_hi - in_lo)
    k = np.minimum((u * n_cand).astype(np.int64), np.maximum(n_cand - 1, 0))
    before = in_lo - lo
    return np.where(k < before, lo + k, in_hi + (k - before)), n_cand > 0


def cross_batch_pairs(table: schema.SiteTable, rows, *, level: str = "plate", seed: int,
                      epoch: int) -> tuple[np.ndarray, dict[str, int]]:
    """Pairs each row with an image of the same compound on another plate or batch.

    Args:
      table: the study's SiteTable (uses compound, source, batch, plate, well).
      rows: 1-D int row indices to pair; partners are drawn among these rows only.
      level: "plate": the partner lies on another plate; "batch": in another batch
        (batches are told apart with their source).
      seed: run seed.
      epoch: epoch number; every epoch redraws the partners.

    Returns:
      pairs: int64 [M, 2], row i = (rows[i], partner of rows[i]), M = len(rows).
      counts: {"partner", "same_plate_fallback", "self_fallback"} -> number of anchors
        paired that way (they sum to M); see the module docstring for the fallbacks.

    Raises:
      ValueError: an unknown level or malformed rows.
    """
    if level not in LEVELS:
        raise ValueError(f"cross_batch_pairs level={level!r} is unknown; use one of {LEVELS}")
    rows = samplers.as_rows(rows)
    empty = {"partner": 0, "same_plate_fallback": 0, "self_fallback": 0}
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64), empty
    col = lambda f: np.asarray(table[f])[rows]
    group = (col("source"), col("batch")) + ((col("plate"),) if level == "plate" else ())
    comp, grp = _codes(col("compound")), _codes(*group)
    well = _codes(col("compound"), col("source"), col("batch"), col("plate"), col("well"))
    order = np.lexsort((np.arange(len(rows)), well, grp, comp))  # last key sorts first
    c_lo, c_hi = _blocks(comp[order])
    g_lo, g_hi = _blocks(comp[order] * (grp.max() + 1) + grp[order])
    w_lo, w_hi = _blocks(well[order])
    pos = np.arange(len(rows))
    u = np.random.default_rng([int(seed), int(epoch), zlib.crc32(level.encode())]).random(len(rows))
    partner, ok = _pick_outside(u, c_lo, c_hi, g_lo, g_hi)
    in_group, ok_group = _pick_outside(u, g_lo, g_hi, w_lo, w_hi)
    in_well, ok_well = _pick_outside(u, w_lo, w_hi, pos, pos + 1)
    fallback = np.where(ok_group, in_group, np.where(ok_well, in_well, pos))
    chosen = np.where(ok, partner, fallback)
    out = np.empty(len(rows), np.int64)
    out[order] = rows[order][chosen]
    counts = {"partner": int(ok.sum()),
              "same_plate_fallback": int((~ok & (ok_group | ok_well)).sum()),
              "self_fallback": int((~ok & ~ok_group & ~ok_well).sum())}
    return np.stack([rows, out], axis=1), counts


def pair_batches(pairs: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                 drop_remainder: bool = True) -> np.ndarray:
    """Shuffles an epoch's pairs and cuts them into batches of (anchor, partner) rows.

    Dropping the last partial batch is the default, as DINO's loader does: every step
    then has the same shape (one compiled step) and splits evenly over devices, and
    the dropped pairs differ from epoch to epoch. drop_remainder=False pads the last batch
    by wrapping around to the start of the epoch's order (every pair seen at least once,
    a few twice), as `samplers.mixed_batches` does.

    Args:
      pairs: int64 [M, 2] from `cross_batch_pairs`.
      batch_size: pairs per batch (B).
      seed: run seed.
      epoch: epoch number; each epoch gets its own order.
      drop_remainder: see above.

    Returns:
      int64 [steps, B, 2].

    Raises:
      ValueError: bad pairs shape, or no full batch with drop_remainder.
    """
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pair_batches pairs must be [M, 2], got shape {pairs.shape}; "
                         "pass the first output of cross_batch_pairs")
    index = samplers.mixed_batches(np.arange(len(pairs)), batch_size, seed=seed, epoch=epoch,
                                   drop_remainder=drop_remainder)
    return pairs[index].astype(np.int64)


def epoch_pair_batches(table: schema.SiteTable, rows, batch_size: int, *, level: str = "plate",
                       seed: int, epoch: int,
                       drop_remainder: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """Draws the epoch's cross-batch pairs and batches them: (int64 [steps, B, 2], counts)."""
    pairs, counts = cross_batch_pairs(table, rows, level=level, seed=seed, epoch=epoch)
    return pair_batches(pairs, batch_size, seed=seed, epoch=epoch,
                        drop_remainder=drop_remainder), counts
