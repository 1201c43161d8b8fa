"""The one protocol runner: train on source domains, adapt and predict per target unit, score.

Every method plugs in through `jaxadapt.adapt.base.Method`; this loop is never copied
per method. A replicate is one (training source, seed) pair; its trained models are
checkpointed under the workdir, so a re-run resumes instead of retraining.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, NamedTuple

import ml_collections
import numpy as np

from jaxadapt.adapt.base import Method, Variables
from jaxadapt.data import samplers
from jaxadapt.eval import metrics
from jaxadapt.eval.reports import Score
from jaxadapt.eval.units import DataView, PipelineUnit

log = logging.getLogger(__name__)

# (data view, rows of each split, checkpoint dir, seed) -> trained variables. Built once
# per study, so jitted steps compile once and serve every replicate.
TrainFn = Callable[[DataView, dict[str, np.ndarray], str, int], Variables]


class Replicate(NamedTuple):
    """One independent repetition of a study: a training source and a seed."""

    train_source: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"train_source={self.train_source},seed={self.seed}"


def replicates(cfg: ml_collections.ConfigDict) -> list[Replicate]:
    """The study's replicates: every training source (leave-one-source-out fold) x seed."""
    return [Replicate(s, int(seed)) for s in cfg.train_sources for seed in cfg.seeds]


def score_split(method: Method, variables: Variables, view: DataView, rows: np.ndarray,
                *, unit: str, batch_size: int, num_classes: int) -> np.ndarray:
    """Adapts and predicts on every unit of a split; returns the split's confusion matrix.

    Args:
      method: the method under test.
      variables: trained model variables.
      view: data access.
      rows: the split's table rows (perturbed and control).
      unit: adaptation unit, "plate", "batch" or "source".
      batch_size: test batch size.
      num_classes: K.

    Returns:
      int64 confusion matrix [K, K], summed over units.
    """
    cm = np.zeros((num_classes, num_classes), np.int64)
    for spec in samplers.eval_units(view.table, rows, unit=unit, batch_size=batch_size):
        target = PipelineUnit(view, spec, batch_size)
        logits = method.predict_unit(variables, target)
        labels = target.labels()
        if len(logits) != len(labels):
            raise RuntimeError(
                f"method {method.name} returned {len(logits)} predictions for the "
                f"{len(labels)} samples of unit {spec.name}: a predict_unit must score every sample"
            )
        cm += metrics.confusion_matrix(labels, np.argmax(logits, -1), num_classes)
    return cm


def run_replicate(rep: Replicate, cfg: ml_collections.ConfigDict, view: DataView,
                  rows: dict[str, np.ndarray], methods: Iterable[Method],
                  trainers: dict[str, TrainFn], workdir: str) -> list[Score]:
    """Trains what the methods need for one replicate, then scores every method and split.

    Args:
      rep: the replicate.
      cfg: study config (eval_splits, eval.unit, eval.batch_size, model.num_classes).
      view: data access normalized with this replicate's training statistics.
      rows: split name -> table rows, from `splits.make_splits`.
      methods: methods to score.
      trainers: trainer name -> training function.
      workdir: run directory; checkpoints go below it.

    Returns:
      One Score per (method, split, metric).
    """
    trained: dict[str, Variables] = {}
    scores = []
    for method in methods:
        if method.trainer not in trained:
            if method.trainer not in trainers:
                raise ValueError(
                    f"method {method.name!r} needs trainer {method.trainer!r}, which this study "
                    f"does not provide (trainers: {sorted(trainers)})"
                )
            ckpt = os.path.join(workdir, "checkpoints", rep.train_source, f"seed{rep.seed}", method.trainer)
            trained[method.trainer] = trainers[method.trainer](view, rows, ckpt, rep.seed)
        for split in cfg.eval_splits:
            cm = score_split(method, trained[method.trainer], view, rows[split],
                             unit=cfg.eval.unit, batch_size=cfg.eval.batch_size,
                             num_classes=cfg.model.num_classes)
            for metric, value in metrics.scores(cm).items():
                scores.append(Score(method.name, split, metric, value, run=rep.run_id))
            log.info("%s %s %s: accuracy %.3f", rep.run_id, method.name, split, metrics.accuracy(cm))
    return scores
