"""grain pipelines: index batches from the samplers -> dict batches of normalized images.

One grain element is one whole batch (a row of `index_batches`): its records are read
with one `__getitems__` call, checked, transformed and stacked. Parallelism comes from
grain's read threads (`grain.ReadOptions`), not worker processes, so the TFDS source
and the table are shared, not pickled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from jaxadapt.data import schema
from jaxadapt.data.sampling import seed_words
from jaxadapt.data.transforms import ChannelStats, Transform, integer_sums, stats_from_sums


def read_records(source: Any, rows: np.ndarray, table: schema.SiteTable,
          channels: int) -> list[np.ndarray]:
    """Reads the records of `rows`, failing with the row's identity on a bad image."""
    images = []
    for r, rec in zip(rows, source.__getitems__([int(r) for r in rows])):
        img = np.asarray(rec["image"])
        where = (f"image of row {int(r)} (plate {table['plate'][r]}, well {table['well'][r]}, "
                 f"site {table['site'][r]})")
        schema.check_images(img[None], channels=channels, what=where)
        images.append(img)
    return images


class _LoadBatch:
    """grain map function: batch index k -> dict batch (picklable, no lambdas)."""

    def __init__(self, source, table, index_batches, masks, transform, seed, first_index,
                 channels, first_column=0):
        self.source, self.table = source, table
        self.index_batches, self.masks = index_batches, masks
        self.transform, self.seed = transform, seed_words(seed)
        self.first_index, self.channels = first_index, channels
        self.first_column = int(first_column)
        self.labels = np.asarray(table["label"], np.int32)
        self.is_control = np.asarray(table["is_control"], bool)

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        rows = self.index_batches[k]
        raw = read_records(self.source, rows, self.table, self.channels)
        step = self.first_index + int(k)
        # One Generator per (seed, step, position in the global batch): independent of
        # threads, order and of which process reads the image.
        images = [self.transform(img, np.random.default_rng([*self.seed, step,
                                                             self.first_column + j]))
                  for j, img in enumerate(raw)]
        is_control = self.is_control[rows]
        return {
            "image": np.stack(images).astype(np.float32, copy=False),
            "label": self.labels[rows],
            "is_control": is_control,
            "mask": self.masks[k] & ~is_control,
            "row": rows.astype(np.int64),
        }


def batches(source: Any, table: schema.SiteTable, index_batches, *, transform: Transform,
            seed, masks=None, first_index: int = 0, num_threads: int = 4,
            prefetch: int = 8, channels: int = len(schema.CHANNELS),
            first_column: int = 0) -> Iterator[dict]:
    """Iterates dict batches for the given rows, in order, read and transformed by threads.

    Args:
      source: random-access records, `source[i]["image"]` uint8 [H, W, C] (e.g. from
        `tfds_sim.load_simulated`); must offer `__getitems__`.
      table: the SiteTable of `source` (labels and controls come from it).
      index_batches: int [K, B] rows per batch (mixed_batches, Episodes.rows, EvalUnit.rows).
      transform: per-image transform, called as transform(image, rng).
      seed: int or tuple of ints, e.g. (cfg.seed, epoch); augmentation of image j of
        batch k uses np.random.default_rng([*seed, first_index + k, first_column + j]).
      masks: bool [K, B] valid rows (padding False); default all True.
      first_index: step number of index_batches[0] (to resume mid-epoch identically).
      num_threads: grain read threads (batches prepared in parallel).
      prefetch: grain prefetch buffer size (batches).
      channels: expected channel count of every image.
      first_column: global position of column 0 of `index_batches` (a process reading
        its share of each batch, `samplers.process_share`): image j is augmented as
        image first_column + j of the global batch, so any split over processes
        yields the images of a one-process read.

    Returns:
      Iterator of dicts: `image` float32 [B, h, w, C], `label` int32 [B] (-1 for
      controls), `is_control` bool [B], `mask` bool [B] = valid and not a control (the
      rows that count in the loss / score), `row` int64 [B].

    Raises (while iterating):
      ValueError: naming the row whose image has NaN/Inf or a wrong channel count.
    """
    index_batches = np.asarray(index_batches, np.int64)
    if index_batches.ndim != 2:
        raise ValueError(f"index_batches must be [K, B], got shape {index_batches.shape}; "
                         "use samplers.mixed_batches / Episodes.rows / EvalUnit.rows")
    masks = np.ones(index_batches.shape, bool) if masks is None else np.asarray(masks, bool)
    if masks.shape != index_batches.shape:
        raise ValueError(f"masks shape {masks.shape} != index_batches shape {index_batches.shape}")
    load = _LoadBatch(source, table, index_batches, masks, transform, seed, first_index,
                      channels, first_column)
    ds = grain.MapDataset.range(len(index_batches)).map(load)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def channel_stats(source: Any, rows: Sequence[int], *, chunk: int = 256,
                  max_rows: int | None = None, seed: int = 0,
                  share: tuple[int, int] = (0, 1),
                  combine: Callable[[list[int]], list[int]] | None = None) -> ChannelStats:
    """Per-channel mean/std over all pixels of the images of `rows` (full images, 0-255).

    Exact: integer sums in Python ints, then float64 (ddof 0). Several readers (one per
    process) each read a contiguous share of the rows and `combine` totals their integer
    sums, so the result is exactly that of one reader.

    Args:
      source: random-access records with "image" uint8 [H, W, C].
      rows: training rows.
      chunk: records read per call.
      max_rows: if set and smaller than len(rows), a random subset (by seed) is used.
      seed: subset seed.
      share: (reader index p, reader count P): read only the p-th of P contiguous parts
        of the (subset of) rows.
      combine: with P > 1, ``[count, *sums, *sumsqs]`` of this reader -> the totals over
        all readers (e.g. summed over processes).

    Returns:
      ChannelStats(mean, std), float64 [C].
    """
    rows = np.asarray(rows, np.int64)
    if max_rows is not None and max_rows < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    p, n_readers = share
    if n_readers > 1 and (combine is None or len(rows) < n_readers):
        raise ValueError(f"channel_stats: share={share} needs a combine function and at least "
                         f"{n_readers} rows (got {len(rows)}); pass combine, or more rows")
    rows = np.array_split(rows, n_readers)[p]
    count, sums, sumsqs = 0, None, None
    for start in range(0, len(rows), chunk):
        recs = source.__getitems__([int(r) for r in rows[start:start + chunk]])
        n, s, q = integer_sums(np.stack([np.asarray(r["image"]) for r in recs]))
        count += n
        sums = s if sums is None else [a + b for a, b in zip(sums, s)]
        sumsqs = q if sumsqs is None else [a + b for a, b in zip(sumsqs, q)]
    if sums is None:
        raise ValueError("channel_stats needs at least one row; pass the training rows")
    if n_readers > 1:
        total = combine([count, *sums, *sumsqs])
        c = len(sums)
        count, sums, sumsqs = total[0], total[1:1 + c], total[1 + c:]
    return stats_from_sums(count, sums, sumsqs)


@dataclasses.dataclass
class DataView:
    """Everything needed to turn table rows into model-ready image batches.

    Attributes:
      source: random-access record source (record i -> {"image": uint8 HWC, ...}).
      table: metadata of every record.
      eval_transform: deterministic transform for evaluation (centre crop + normalize).
      train_transform: random transform for training (crop, flips + normalize).
      num_threads: grain reader threads.
      channels: channels of every record (5 Cell Painting stains; a profile's features).
    """

    source: Any
    table: schema.SiteTable
    eval_transform: Any
    train_transform: Any
    num_threads: int = 2
    channels: int = len(schema.CHANNELS)

    def eval_batches(self, rows: np.ndarray, masks: np.ndarray | None = None, *,
                     first_column: int = 0) -> Iterator[dict]:
        """Deterministically transformed batches of `rows` [n_batches, batch_size].

        `first_column`: global position of column 0 (see `batches`).
        """
        return batches(
            self.source, self.table, rows, transform=self.eval_transform, seed=0,
            masks=masks, num_threads=self.num_threads, first_column=first_column,
            channels=self.channels,
        )

    def train_batches(self, rows: np.ndarray, *, seed: int, first_column: int = 0
                      ) -> Iterator[dict]:
        """Randomly augmented batches of `rows` [n_batches, batch_size].

        `first_column`: global position of column 0, a process reading its share of
        each batch (see `batches`).
        """
        return batches(
            self.source, self.table, rows, transform=self.train_transform, seed=seed,
            num_threads=self.num_threads, first_column=first_column, channels=self.channels,
        )
