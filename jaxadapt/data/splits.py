"""Study splits by experimental design: train / validation / in-domain / new batch / new source.

The training source's batches are shuffled (by seed) and dealt into validation,
new-batch and training batches. On the training plates (plates of the training
batches) a stratified fraction of wells per (plate, compound) -- DMSO included, since
evaluation units need their controls -- is held out as the in-domain test set; whole
wells are held out so that no site of a test well is seen in training. Every row of
the other sources is the new-source split.

For the source x target matrix, `source:<a>-><b>` names one cell: models trained on
source a, scored on every row of source b (b != a), or on a's held-out in-domain
wells (b == a). `split_rows` resolves any split name for one training source.
"""

from __future__ import annotations

import logging
import zlib

import ml_collections
import numpy as np

from jaxadapt.data import schema

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "in_domain", "new_batch", "new_source")
#: Prefix of a per-pair split name, `source:<train source>-><target source>`.
PAIR_PREFIX = "source:"
_ARROW = "->"


def _count(value, n: int, field: str) -> int:
    """A float in (0, 1) is a fraction of n (rounded, at least 1); an int >= 1 a count."""
    if isinstance(value, float) and 0.0 < value < 1.0:
        return max(1, int(round(value * n)))
    if float(value) == int(value) and int(value) >= 1:
        return int(value)
    raise ValueError(f"splits.{field}={value!r}: use a fraction in (0, 1) or a count >= 1")


def batch_counts(cfg, n_batches: int, train_source: str) -> tuple[int, int]:
    """How many of a training source's batches go to validation and to new_batch.

    Args:
      cfg: the `splits` config (`val_batches`, `new_batch_batches`).
      n_batches: the training source's number of batches.
      train_source: its name (for the message).

    Returns:
      (validation batches, new-batch batches).

    Raises:
      ValueError: a malformed count, or counts that leave no training batch.
    """
    n_val = _count(cfg.val_batches, n_batches, "val_batches")
    n_new = _count(cfg.new_batch_batches, n_batches, "new_batch_batches")
    if n_batches < n_val + n_new + 1:
        raise ValueError(
            f"train_source={train_source!r} has {n_batches} batches but the split needs "
            f"{n_val} validation + {n_new} new-batch + at least 1 training batch; lower "
            "splits.val_batches / splits.new_batch_batches or raise data.sim.batches_per_source")
    return n_val, n_new


def in_domain_fraction(cfg) -> float:
    """`cfg.in_domain_fraction`, checked to lie in (0, 1); raises ValueError otherwise."""
    frac = float(cfg.in_domain_fraction)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"splits.in_domain_fraction={frac}: use a fraction in (0, 1), e.g. 0.2")
    return frac


def _deal_batches(table: schema.SiteTable, train_source: str, cfg) -> dict[str, np.ndarray]:
    """Shuffles the training source's batches and deals them to val / new_batch / train."""
    batches = np.unique(table["batch"][table["source"] == train_source])
    n_val, n_new = batch_counts(cfg, len(batches), train_source)
    rng = np.random.default_rng([int(cfg.seed), zlib.crc32(train_source.encode())])
    order = rng.permutation(batches)
    dealt = {"validation": order[:n_val], "new_batch": order[n_val:n_val + n_new],
             "train": order[n_val + n_new:]}
    log.info("split batches of %s: %s", train_source, {k: v.tolist() for k, v in dealt.items()})
    return dealt


def _held_out_wells(plate: np.ndarray, well: np.ndarray, compound: np.ndarray,
                    fraction: float, seed: int) -> np.ndarray:
    """Boolean per row: its well is held out of its (plate, compound) group."""
    held = np.zeros(len(plate), bool)
    keys = np.char.add(np.char.add(plate.astype(str), "\x00"), compound.astype(str))
    for key in np.unique(keys):
        in_group = keys == key
        wells = np.unique(well[in_group])
        if len(wells) < 2:  # the only well of a class on a plate stays in training
            continue
        k = min(len(wells) - 1, max(1, int(round(fraction * len(wells)))))
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        chosen = rng.choice(wells, size=k, replace=False)
        held |= in_group & np.isin(well, chosen)
    return held


def make_splits(table: schema.SiteTable, *, train_source: str,
                cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Splits the rows of a study into disjoint train/eval sets by design.

    Args:
      table: the study's SiteTable.
      train_source: the source models are trained on.
      cfg: `val_batches` (fraction or count of the training source's batches, e.g.
        0.15), `new_batch_batches` (count or fraction, >= 1 batch), `in_domain_fraction`
        (fraction of wells per (plate, compound) held out of training plates, in (0,1)),
        `seed`; optional `allow_empty` (split names that may be empty, e.g.
        ("new_source",) for a one-source study).

    Returns:
      {"train", "validation", "in_domain", "new_batch", "new_source"} -> sorted int64
      row indices, pairwise disjoint, controls included in each.

    Raises:
      ValueError: unknown source, too few batches, an empty split, or an eval class
        never seen in training.
    """
    sources = table.unique("source")
    if train_source not in sources:
        raise ValueError(f"train_source={train_source!r} is not in the table; valid sources: "
                         f"{sources.tolist()}")
    frac = in_domain_fraction(cfg)
    dealt = _deal_batches(table, train_source, cfg)
    is_src = table["source"] == train_source
    train_b = is_src & np.isin(table["batch"], dealt["train"])
    held = np.zeros(len(table), bool)
    held[train_b] = _held_out_wells(table["plate"][train_b], table["well"][train_b],
                                    table["compound"][train_b], frac, int(cfg.seed))
    masks = {
        "train": train_b & ~held,
        "validation": is_src & np.isin(table["batch"], dealt["validation"]),
        "in_domain": held,
        "new_batch": is_src & np.isin(table["batch"], dealt["new_batch"]),
        "new_source": ~is_src,
    }
    out = {k: np.flatnonzero(m).astype(np.int64) for k, m in masks.items()}
    _check_splits(table, out, tuple(cfg.get("allow_empty", ())))
    return out


def _check_splits(table: schema.SiteTable, splits: dict[str, np.ndarray],
                  allow_empty: tuple[str, ...]) -> None:
    """Raises on an empty split or an eval class absent from the training rows."""
    for name, rows in splits.items():
        if len(rows) == 0 and name not in allow_empty:
            fix = ("add another source to data.sim.sources or set "
                   "splits.allow_empty=('new_source',)"
                   if name == "new_source" else "use more batches/plates/wells per class")
            raise ValueError(f"split {name!r} is empty; {fix}")
    train_classes = set(table["label"][splits["train"]].tolist()) - {schema.NO_LABEL}
    for name in SPLITS[1:]:
        rows = splits[name]
        labels = table["label"][rows]
        for lab in np.unique(labels[labels != schema.NO_LABEL]):
            if int(lab) not in train_classes:
                comp = table["compound"][rows][labels == lab][0]
                raise ValueError(
                    f"class label={int(lab)} (compound {comp}) occurs in split {name!r} but not "
                    "in train; drop that class from the study or give its compound wells on "
                    "the training plates (more plates/wells, lower splits.in_domain_fraction)")


#: Splits the diagonal cell `source:<a>-><a>` of a source matrix may score.
DIAGONALS = ("in_domain", "new_batch")


def pair_name(train_source: str, target_source: str) -> str:
    """The split name of one source pair: `source:<train_source>-><target_source>`."""
    return f"{PAIR_PREFIX}{train_source}{_ARROW}{target_source}"


def parse_pair(name: str) -> tuple[str, str] | None:
    """(train source, target source) of a per-pair split name; None for a pooled name.

    Args:
      name: a split name, e.g. "source:source_3->source_8" or "new_source".

    Returns:
      The two source names, or None when `name` does not start with `source:`.

    Raises:
      ValueError: a `source:` name that is not `source:<a>-><b>` with both names set.
    """
    if not name.startswith(PAIR_PREFIX):
        return None
    a, arrow, b = name[len(PAIR_PREFIX):].partition(_ARROW)
    if not arrow or not a or not b or _ARROW in b:
        raise ValueError(f"split {name!r}: write a source pair as 'source:<train source>->"
                         "<target source>', e.g. 'source:source_3->source_8'")
    return a, b


def source_matrix(train_sources, target_sources) -> tuple[str, ...]:
    """Every pair split of a source x target matrix, row by row.

    Args:
      train_sources: sources models are trained on (rows).
      target_sources: sources they are scored on (columns); a pair with itself is the
        in-domain cell.

    Returns:
      ("source:a->b", ...) for every a in `train_sources`, b in `target_sources`.
    """
    return tuple(pair_name(a, b) for a in train_sources for b in target_sources)


def split_rows(table: schema.SiteTable, rows: dict[str, np.ndarray], name: str,
               train_source: str, diagonal: str = "in_domain") -> np.ndarray | None:
    """The rows a split name scores for models trained on `train_source`.

    Args:
      table: the study's SiteTable.
      rows: `make_splits(table, train_source=train_source, ...)`.
      name: a pooled split (`SPLITS`) or a pair `source:<a>-><b>`.
      train_source: the replicate's training source.
      diagonal: the split a pair of the training source with itself scores:
        "in_domain" (held-out wells of the training plates) or "new_batch" (held-out
        batches; for layouts such as TARGET2, where each compound has one well per
        plate, so that holding out wells would take compounds out of training).

    Returns:
      Sorted row indices; None for a pair split of another training source (a != the
      replicate's source: that cell belongs to another replicate).

    Raises:
      ValueError: an unknown split or source name, naming the valid ones.
    """
    pair = parse_pair(name)
    if pair is None:
        if name not in rows:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS} or a pair "
                             "'source:<train source>-><target source>'")
        return rows[name]
    a, b = pair
    sources = table.unique("source").tolist()
    unknown = [x for x in pair if x not in sources]
    if unknown:
        raise ValueError(f"split {name!r} names unknown source(s) {unknown}; valid sources: "
                         f"{sources}")
    if a != train_source:
        return None
    if b == a:
        if diagonal not in DIAGONALS:
            raise ValueError(f"matrix diagonal {diagonal!r} is unknown; use one of {DIAGONALS}")
        return rows[diagonal]
    new = rows["new_source"]
    return new[table["source"][new] == b]
