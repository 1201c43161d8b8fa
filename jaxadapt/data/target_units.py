"""Target units: a plate's (batch's, source's) perturbed rows cut into padded test batches.

`eval_units` shuffles each unit's rows into mixed batches (the paper's test chunks);
`label_shift_units` draws batches with a per-batch Dirichlet label shift (the CS-ARM-BN
label-shift protocol). Every draw depends only on (seed, unit name). Re-exported by
`jaxadapt.data.samplers`.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Sequence

import numpy as np

from jaxadapt.data import schema
from jaxadapt.data.rows import _rows, _seed_words, group_rows, padded_batches


class EvalUnit(NamedTuple):
    """The perturbed rows of one plate/batch/source cut into padded batches.

    Attributes:
      name: the unit's plate/batch/source name.
      rows: int64 [n_batches, batch_size]; padding repeats a row of the unit.
      mask: bool [n_batches, batch_size]; False on padding.
      control_rows: int64 [n_controls] the unit's control rows (from the given rows).
      short_batches: label-shift units only: how many batches hold fewer than
        ``batch_size`` samples because a class had fewer rows than the batch's count of
        it (that class is then taken whole, never resampled); 0 otherwise.
      adaptation: the EvalUnit a method adapts on when it is not this unit itself
        (`jaxadapt.data.subsets`, e.g. the unit's first plate); None: this unit.
    """

    name: str
    rows: np.ndarray
    mask: np.ndarray
    control_rows: np.ndarray
    short_batches: int = 0
    adaptation: "EvalUnit | None" = None


def eval_units(table: schema.SiteTable, rows, *, unit: str = "plate", batch_size: int,
               seed: int | Sequence[int] | None = 0) -> list[EvalUnit]:
    """Groups the perturbed rows of each plate/batch/source into padded evaluation batches.

    Args:
      table: the study's SiteTable.
      rows: the evaluation rows (controls included; they become `control_rows`).
      unit: "plate", "batch" or "source".
      batch_size: rows per batch; the last batch is padded (mask False), never dropped.
      seed: an int or a sequence of ints; shuffles each unit's perturbed rows (by seed
        and unit name) before cutting, so that batches mix classes as the paper's test
        chunks do (batch-statistics methods would otherwise see one-class batches); None
        keeps row order.

    Returns:
      One EvalUnit per unit with perturbed rows, sorted by name. Every perturbed row
      appears exactly once with mask True.
    """
    if unit not in ("plate", "batch", "source"):
        raise ValueError(f"unit={unit!r}: use 'plate', 'batch' or 'source'")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive batch size")
    rows = _rows(rows)
    pert, ctrl = group_rows(table, rows, unit, False), group_rows(table, rows, unit, True)
    units = []
    for name in sorted(pert):
        r = np.sort(pert[name])
        if seed is not None:
            r = np.random.default_rng(_seed_words(seed) + [zlib.crc32(name.encode())]).permutation(r)
        b, m = padded_batches(r, batch_size)
        units.append(EvalUnit(name, b, m, np.sort(ctrl.get(name, rows[:0]))))
    return units


def label_counts(table: schema.SiteTable, rows, num_classes: int) -> np.ndarray:
    """Returns int64 [num_classes] counts of the labelled rows among `rows`."""
    labels = table["label"][_rows(rows)]
    return np.bincount(labels[labels != schema.NO_LABEL], minlength=num_classes).astype(np.int64)


def label_shift_units(table: schema.SiteTable, rows, *, alpha: float | None, batch_size: int,
                      num_classes: int, seed: int | Sequence[int],
                      unit: str = "plate") -> list[EvalUnit]:
    """Test batches with a per-batch Dirichlet label shift (CS-ARM-BN label-shift protocol).

    Per unit: ``p ~ Dirichlet(alpha * 1_K)`` over the K' classes present among the unit's
    perturbed rows (K' = K on a complete plate), ``counts ~ Multinomial(batch_size, p)``;
    the unit gets K' batches, batch k asking for ``roll(counts, k)[j]`` rows of class j, so
    the unit is balanced over its batches while each batch is skewed (alpha = 0.01: most
    batches are (nearly) one class; large alpha: nearly balanced).

    As in the reference ("up to n_c"), the rows of class j in a batch are drawn from the
    unit's rows of class j without replacement, and a class with fewer rows than asked
    for is taken whole, never resampled: such a batch holds fewer than ``batch_size``
    samples (padded, mask False) and is counted in `EvalUnit.short_batches`. Draws are
    independent across batches, so (as in the reference) a row may appear in several
    batches and some rows in none; the scores are then over the drawn samples. Rows
    within a batch are shuffled. Unlabelled perturbed rows are never drawn.

    Args:
      table: the study's SiteTable.
      rows: the evaluation rows (controls included; they become `control_rows`).
      alpha: Dirichlet concentration (> 0); None: balanced, i.e. exactly `eval_units`
        (every perturbed row once, shuffled chunks, last one padded).
      batch_size: rows per batch (the test context L).
      num_classes: K; labels must lie in [0, K).
      seed: an int or a sequence of ints (e.g. ``(config.eval.seed, replicate seed)``);
        the draw of unit u depends only on (seed, u's name).
      unit: "plate", "batch" or "source".

    Returns:
      One EvalUnit per unit with labelled perturbed rows, sorted by name; with alpha
      set, ``rows`` is [K', batch_size], ``mask`` False only where a short batch is
      padded.
    """
    if alpha is None:
        return eval_units(table, rows, unit=unit, batch_size=batch_size, seed=seed)
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r}: the Dirichlet concentration must be > 0 "
                         "(or None for balanced batches)")
    if unit not in ("plate", "batch", "source"):
        raise ValueError(f"unit={unit!r}: use 'plate', 'batch' or 'source'")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive batch size")
    rows = _rows(rows)
    labels = np.asarray(table["label"])
    pert, ctrl = group_rows(table, rows, unit, False), group_rows(table, rows, unit, True)
    units = []
    for name in sorted(pert):
        r = np.sort(pert[name])
        r = r[labels[r] != schema.NO_LABEL]
        if len(r) == 0:
            continue
        lab = labels[r]
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(f"unit {name!r} has labels outside [0, {num_classes}); "
                             "check num_classes (config.model.num_classes)")
        rng = np.random.default_rng(_seed_words(seed) + [zlib.crc32(name.encode())])
        b, m = _shifted_batches(rng, [r[lab == c] for c in np.unique(lab)], alpha, batch_size)
        units.append(EvalUnit(name, b, m, np.sort(ctrl.get(name, rows[:0])),
                              short_batches=int((~m.all(1)).sum())))
    return units


def _shifted_batches(rng: np.random.Generator, by_class: list[np.ndarray], alpha: float,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One unit's K' label-shifted batches, padded: (rows [K', L], mask [K', L])."""
    p = rng.dirichlet(np.full(len(by_class), float(alpha)))
    counts = rng.multinomial(batch_size, p)
    rows, masks = [], []
    for k in range(len(by_class)):
        c = np.roll(counts, k)
        # Up to n_c of class c: a small pool is taken whole (permuted), never resampled.
        batch = np.concatenate([rng.permutation(pool)[: int(n)] for pool, n in zip(by_class, c)])
        b, m = padded_batches(rng.permutation(batch), batch_size)
        rows.append(b[0])
        masks.append(m[0])
    return np.stack(rows).astype(np.int64), np.stack(masks)
