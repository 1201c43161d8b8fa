"""Index samplers that encode the experimental design (pure NumPy, no pixels).

Every sampler draws from `np.random.default_rng((seed, epoch_or_step, ...))`, so a
given (seed, epoch/step) always yields the same indices whatever was drawn before:
resumed training sees the same batches as an uninterrupted run.

Training samplers live here (ERM batches, CS-ARM-BN episodes, the multi-host share of a
batch); the row helpers they share are in `jaxadapt.data.rows` and the evaluation units
in `jaxadapt.data.target_units`, both re-exported here.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import numpy as np

from jaxadapt.data import schema
from jaxadapt.data.rows import _rows, draw_rows, group_rows, padded_batches
from jaxadapt.data.target_units import EvalUnit, eval_units, label_counts, label_shift_units

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
    rows = _rows(rows)
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
    rows = _rows(rows)
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
