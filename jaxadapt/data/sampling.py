"""Index samplers that encode the experimental design (pure NumPy, no pixels).

Every sampler draws from `np.random.default_rng((seed, epoch_or_step, ...))`, so a
given (seed, epoch/step) always yields the same indices whatever was drawn before:
resumed training sees the same batches as an uninterrupted run.

Training samplers (ERM batches, CS-ARM-BN episodes, the multi-host share of a batch),
the evaluation units (plates, batches, sources; label-shifted test batches) and the row
helpers they share.
"""

from __future__ import annotations

import logging
import zlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from jaxadapt.data import schema


__all__ = [
    "EvalUnit", "Episodes", "check_process_split", "draw_rows", "eval_units", "group_rows",
    "label_counts", "label_shift_units", "make_episode_sampler", "mixed_batches",
    "padded_batches", "plate_episodes", "process_share",
]

log = logging.getLogger(__name__)


class Episodes(NamedTuple):
    """Single-plate training episodes (CS-ARM-BN): perturbed rows first, then controls.

    Attributes:
      rows: int64 [E, L + N] table rows.
      is_control: bool [E, L + N]; False for the first L, True for the last N.
      plate: str [E] the plate of each episode.
    """

    rows: np.ndarray
    is_control: np.ndarray
    plate: np.ndarray


def mixed_batches(rows, batch_size: int, *, seed: int, epoch: int,
                  drop_remainder: bool = True) -> np.ndarray:
    """Shuffles `rows` for one epoch and cuts them into batches (ERM training).

    Args:
      rows: 1-D row indices.
      batch_size: rows per batch.
      seed: run seed.
      epoch: epoch number; each epoch gets its own permutation.
      drop_remainder: True drops the last partial batch; False fills it by wrapping
        around to the start of this epoch's permutation (every row seen at least once).

    Returns:
      int64 [steps, batch_size].
    """
    rows = as_rows(rows)
    if batch_size < 1 or len(rows) < (batch_size if drop_remainder else 1):
        raise ValueError(f"batch_size={batch_size} with {len(rows)} rows gives no full batch; "
                         "lower batch_size or pass drop_remainder=False")
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(rows)
    steps = len(perm) // batch_size if drop_remainder else -(-len(perm) // batch_size)
    need = steps * batch_size
    if need > len(perm):
        perm = np.concatenate([perm, np.resize(perm, need - len(perm))])
    return perm[:need].reshape(steps, batch_size)


def check_process_split(n: int, field: str, *, process_count: int, local_devices: int,
                        unit: str = "rows") -> None:
    """Checks that `n` (batch rows or episodes) splits evenly over processes and devices.

    Args:
      n: the global count (a batch size, or episodes per step).
      field: the config key it comes from, named in the error.
      process_count: processes (hosts) sharing each batch.
      local_devices: devices of each process the batch is split over.
      unit: what `n` counts ("rows", "episodes"), for the message.

    Raises:
      ValueError: `n` is not a multiple of process_count * local_devices; names the three
        numbers and the nearest valid values.
    """
    need = int(process_count) * int(local_devices)
    if need < 1:
        raise ValueError(f"process_count={process_count} and local_devices={local_devices} "
                         "must be >= 1")
    if n % need == 0:
        return
    valid = n - n % need or need
    fix = f"--{field}={valid}" if field.startswith("config.") else str(valid)
    if process_count == 1:
        raise ValueError(f"{field}={n} is not a multiple of the {local_devices} local devices; "
                         f"set it to a multiple of {local_devices}, e.g. {fix}")
    raise ValueError(
        f"{field}={n} ({unit}) does not split over {process_count} processes x "
        f"{local_devices} devices per process = {need} devices: each process reads its own "
        f"equal share of every batch and splits it over its devices; set it to a multiple "
        f"of {need}, e.g. {fix}, or run on fewer processes or devices")


def process_share(index_batches, process_index: int, process_count: int, *,
                  local_devices: int = 1, group: int = 1,
                  field: str = "batch size") -> tuple[np.ndarray, int]:
    """This process's contiguous share of every global index batch (multi-host reading).

    Every process draws the same global batches (the samplers are seeded identically);
    process p then reads only columns ``[p * B / P, (p + 1) * B / P)`` of each, so the
    global batch is the concatenation of the processes' shares in process order, the
    layout `jaxadapt.train.parallel.shard_batch` assembles.

    Args:
      index_batches: int [K, B] global row batches (identical on every process).
      process_index: this process (0 <= p < P).
      process_count: P, the number of processes.
      local_devices: devices per process over which each share is split again.
      group: columns that must stay together (an episode's L + N rows); the share is
        made of whole groups.
      field: config key of the batch size, named in errors.

    Returns:
      (int [K, B / P] this process's columns, index of its first column in the global
      batch, to seed per-image augmentation by global position).

    Raises:
      ValueError: B is not a multiple of `group`, or B / group does not split over
        P x local_devices.
    """
    index_batches = np.asarray(index_batches)
    if index_batches.ndim != 2:
        raise ValueError(f"index_batches must be [K, B], got shape {index_batches.shape}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
    width = index_batches.shape[1]
    if group < 1 or width % group:
        raise ValueError(f"{field}: batch width {width} is not a multiple of group={group}")
    check_process_split(width // group, field, process_count=process_count,
                        local_devices=local_devices,
                        unit="rows" if group == 1 else "episodes")
    share = width // process_count
    first = process_index * share
    return index_batches[:, first:first + share], first


def make_episode_sampler(table: schema.SiteTable, rows, *, n_perturbed: int, n_controls: int,
                         n_episodes: int, seed: int,
                         on_missing_controls: str = "raise") -> Callable[[int], Episodes]:
    """Groups `rows` by plate once and returns `step -> Episodes` (see `plate_episodes`)."""
    rows = as_rows(rows)
    pert, ctrl = group_rows(table, rows, "plate", False), group_rows(table, rows, "plate", True)
    plates = sorted(pert)
    missing = [p for p in plates if p not in ctrl] if n_controls > 0 else []
    if missing and on_missing_controls != "skip":
        raise ValueError(
            f"plate {missing[0]!r} ({len(missing)} plates in all) has no control rows but "
            f"n_controls={n_controls}; include its DMSO wells in rows, set n_controls=0, or "
            "pass on_missing_controls='skip'")
    if missing:
        log.warning("skipping %d plates without controls: %s", len(missing), missing[:5])
        plates = [p for p in plates if p not in missing]
    if not plates:
        raise ValueError("no plate among rows has perturbed rows (and controls if n_controls>0); "
                         "check the split passed as rows")
    names = np.array(plates)

    def sample(step: int) -> Episodes:
        rng = np.random.default_rng([int(seed), int(step)])
        pick = rng.integers(len(plates), size=n_episodes)
        out = [np.concatenate([draw_rows(rng, pert[plates[i]], n_perturbed),
                               draw_rows(rng, ctrl.get(plates[i], rows[:0]), n_controls)])
               for i in pick]
        is_ctrl = np.zeros((n_episodes, n_perturbed + n_controls), bool)
        is_ctrl[:, n_perturbed:] = True
        return Episodes(np.stack(out).astype(np.int64), is_ctrl, names[pick])

    return sample


def plate_episodes(table: schema.SiteTable, rows, *, n_perturbed: int, n_controls: int,
                   n_episodes: int, seed: int, step: int,
                   on_missing_controls: str = "raise") -> Episodes:
    """Draws CS-ARM-BN training episodes: each from one plate, L perturbed + N controls.

    Args:
      table: the study's SiteTable.
      rows: the rows to draw from (e.g. the train split, controls included).
      n_perturbed: L perturbed rows per episode.
      n_controls: N DMSO control rows per episode (0 for ARM-BN).
      n_episodes: E episodes (plates, with repetition) per step.
      seed: run seed.
      step: training step; the draw depends only on (seed, step).
      on_missing_controls: "raise" (default) or "skip" plates without controls.

    Returns:
      Episodes with rows [E, L+N], is_control [E, L+N], plate [E]. A plate is chosen
      uniformly among plates with perturbed rows; rows are drawn without replacement
      unless the plate has fewer than L (or N) of them.

    For many steps, build the grouping once with `make_episode_sampler`.
    """
    return make_episode_sampler(table, rows, n_perturbed=n_perturbed, n_controls=n_controls,
                                n_episodes=n_episodes, seed=seed,
                                on_missing_controls=on_missing_controls)(step)


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
    rows = as_rows(rows)
    pert, ctrl = group_rows(table, rows, unit, False), group_rows(table, rows, unit, True)
    units = []
    for name in sorted(pert):
        r = np.sort(pert[name])
        if seed is not None:
            r = np.random.default_rng(seed_words(seed) + [zlib.crc32(name.encode())]).permutation(r)
        b, m = padded_batches(r, batch_size)
        units.append(EvalUnit(name, b, m, np.sort(ctrl.get(name, rows[:0]))))
    return units


def label_counts(table: schema.SiteTable, rows, num_classes: int) -> np.ndarray:
    """Returns int64 [num_classes] counts of the labelled rows among `rows`."""
    labels = table["label"][as_rows(rows)]
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
    rows = as_rows(rows)
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
        rng = np.random.default_rng(seed_words(seed) + [zlib.crc32(name.encode())])
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


def as_rows(rows) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ValueError(f"rows must be a 1-D integer index array, got dtype {rows.dtype} "
                         f"shape {rows.shape}; pass np.flatnonzero(mask) for a boolean mask")
    return rows.astype(np.int64)


def seed_words(seed) -> list[int]:
    """An int or a tuple of ints (e.g. (seed, epoch)) as a list of non-negative ints."""
    words = [seed] if np.ndim(seed) == 0 else list(seed)
    return [int(w) for w in words]


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
    rows = as_rows(rows)
    n = -(-len(rows) // batch_size)
    padded = np.resize(rows, n * batch_size)  # np.resize repeats rows from the start
    mask = np.arange(n * batch_size) < len(rows)
    return padded.reshape(n, batch_size), mask.reshape(n, batch_size)
