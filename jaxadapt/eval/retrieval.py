"""Replicate and MoA retrieval scored with copairs mean average precision (JUMP's metric).

A split's retrieval is scored on *well-level profiles*: the mean of a well's site
embeddings (as `Method.embed_unit` returns them), one profile per (plate, well), pooled
over every unit of the split. Average precision (AP) of a query well ranks its positive
and negative partner wells by cosine similarity (copairs' `average_precision`); the
metric is the mean over groups of the groups' mean AP (copairs' `mean_average_precision`
column, without its permutation p-values):

- ``map_replicate`` (phenotypic activity): queries are the perturbed wells; positives are
  wells of the same compound on *other plates*; negatives are the negative-control
  (DMSO) wells of the query's own plate. Averaged over compounds. High when a compound's
  replicates are closer to each other across plates than to their own plate's controls:
  plate effects lower it.
- ``map_moa`` (class consistency): queries are the perturbed wells; positives are wells
  of the same class label (MoA) on other plates; negatives are wells of other classes
  on any plate. Averaged over classes.

A query without positives (its compound on no other plate of the split) has no AP and is
left out, as copairs does; a split where no query has one gets no row (logged).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Iterable, TYPE_CHECKING

import numpy as np

from jaxadapt.data import sampling as samplers
from jaxadapt.data.pipeline import DataView
from jaxadapt.data.schema import SiteTable
from jaxadapt.eval.units import PipelineUnit
from jaxadapt.methods.base import Method, Variables


if TYPE_CHECKING:  # pandas comes with the `metrics` extra (copairs needs it)
    import pandas as pd

log = logging.getLogger(__name__)

#: What `pip install -e ".[metrics]"` brings, imported only when retrieval is scored.
REQUIRES = ("copairs", "pandas")


def missing_requirements() -> list[str]:
    """The packages retrieval needs that are not installed (the `metrics` extra)."""
    return [m for m in REQUIRES if importlib.util.find_spec(m) is None]

METRICS = ("map_replicate", "map_moa")


def well_profiles(embeddings: np.ndarray, rows: np.ndarray, table: SiteTable
                  ) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean site embedding per (plate, well).

    Args:
      embeddings: [n, D] site embeddings.
      rows: [n] their table rows.
      table: the study's SiteTable (plate, well, compound, label, is_control).

    Returns:
      (metadata with columns plate, well, compound, label, is_control, one row per well;
      float64 [W, D] profiles in the same order).

    Raises:
      ValueError: lengths differ.
    """
    import pandas as pd  # pylint: disable=g-import-not-at-top

    rows = np.asarray(rows, np.int64)
    if len(rows) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for {len(rows)} rows; pass one per row")
    meta = pd.DataFrame({k: np.asarray(table[k])[rows]
                         for k in ("plate", "well", "compound", "label", "is_control")})
    codes, first = pd.factorize(meta["plate"].astype(str) + "\x00" + meta["well"].astype(str))
    n_wells = len(first)
    sums = np.zeros((n_wells, embeddings.shape[1]))
    np.add.at(sums, codes, np.asarray(embeddings, np.float64))
    counts = np.bincount(codes, minlength=n_wells)
    heads = np.unique(codes, return_index=True)[1]
    return meta.iloc[heads].reset_index(drop=True), sums / counts[:, None]


def mean_average_precision(meta: pd.DataFrame, feats: np.ndarray, *, pos_sameby, pos_diffby,
                           neg_sameby, neg_diffby, group_by: str) -> float | None:
    """Mean over `group_by` groups of copairs' per-profile average precision.

    Args:
      meta: profile metadata.
      feats: [W, D] profiles.
      pos_sameby, pos_diffby, neg_sameby, neg_diffby: copairs' pair rules.
      group_by: the column whose groups' mean APs are averaged.

    Returns:
      The mAP, or None when no profile has both a positive and a negative partner.
    """
    from copairs.map import average_precision
    from copairs.matching import UnpairedException

    try:
        ap = average_precision(meta, np.asarray(feats, np.float64), pos_sameby=list(pos_sameby),
                               pos_diffby=list(pos_diffby), neg_sameby=list(neg_sameby),
                               neg_diffby=list(neg_diffby), progress_bar=False)
    except UnpairedException:
        return None
    ap = ap[(ap["n_pos_pairs"] > 0) & ap["average_precision"].notna()]
    if ap.empty:
        return None
    return float(ap.groupby(group_by)["average_precision"].mean().mean())


def replicate_map(meta: pd.DataFrame, feats: np.ndarray) -> float | None:
    """``map_replicate``: same compound on other plates against the own plate's DMSO wells."""
    # A distinct reference id per control well keeps controls from pairing with each other
    # (copairs' usual trick): positives share compound *and* ref, negatives differ in both.
    meta = meta.assign(ref=np.where(meta["is_control"], np.arange(len(meta)), -1))
    return mean_average_precision(meta, feats, pos_sameby=["compound", "ref"],
                                  pos_diffby=["plate"], neg_sameby=["plate"],
                                  neg_diffby=["compound", "ref"], group_by="compound")


def moa_map(meta: pd.DataFrame, feats: np.ndarray) -> float | None:
    """``map_moa``: same class on other plates against wells of other classes (no controls)."""
    keep = ~meta["is_control"].to_numpy(bool)
    return mean_average_precision(meta[keep].reset_index(drop=True), feats[keep],
                                  pos_sameby=["label"], pos_diffby=["plate"], neg_sameby=[],
                                  neg_diffby=["label"], group_by="label")


def retrieval_scores(embeddings: np.ndarray, rows: np.ndarray,
                     table: SiteTable) -> dict[str, float]:
    """Both retrieval metrics of one split's site embeddings (samples and controls).

    Args:
      embeddings: [n, D] site embeddings.
      rows: [n] their table rows.
      table: the SiteTable.

    Returns:
      {metric: mAP} for the metrics defined on this split (see the module docstring).
    """
    meta, feats = well_profiles(embeddings, rows, table)
    out = {}
    for name, fn in (("map_replicate", replicate_map), ("map_moa", moa_map)):
        value = fn(meta, feats)
        if value is None:
            log.warning("%s undefined: no well of the split has a positive and a negative "
                        "partner (e.g. its compound on one plate only); no row written", name)
        else:
            out[name] = value
    return out


def split_retrieval(method: Method, variables: Variables, view: DataView,
                    units: Iterable[samplers.EvalUnit]) -> dict[str, float]:
    """A method's retrieval metrics on one split, from its `embed_unit` on every unit.

    Every process embeds every unit (profiles of the whole split are ranked together),
    so on several hosts the metrics are identical everywhere.

    Args:
      method: a method with `embed_unit`.
      variables: its trained variables.
      view: data access.
      units: the split's units (from `protocol.make_units`).

    Returns:
      {metric: mAP}.

    Raises:
      RuntimeError: `embed_unit` returned the wrong number of rows.
    """
    embs, rows = [], []
    for spec in units:
        out = method.embed_unit(variables, PipelineUnit(view, spec, spec.rows.shape[1]))
        scored, controls = spec.rows[spec.mask], spec.control_rows
        if len(out.samples) != len(scored) or len(out.controls) != len(controls):
            raise RuntimeError(
                f"method {method.name} embedded {len(out.samples)} samples and "
                f"{len(out.controls)} controls of unit {spec.name}, which has {len(scored)} "
                f"and {len(controls)}: an embed_unit must embed every one")
        embs += [np.asarray(out.samples, np.float64)]
        rows += [scored]
        if len(controls):
            embs.append(np.asarray(out.controls, np.float64))
            rows.append(controls)
    return retrieval_scores(np.concatenate(embs), np.concatenate(rows), view.table)
