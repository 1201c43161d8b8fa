"""Target units (plates, batches, sources) backed by the data pipeline.

Implements `jaxadapt.methods.base.Unit`: adapters see images only; labels stay here,
with the protocol runner, so no method can peek at them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator

import numpy as np

from jaxadapt.data import sampling as samplers
from jaxadapt.data.pipeline import DataView
from jaxadapt.data.schema import NO_LABEL, SiteTable
from jaxadapt.methods.base import UnitBatch, UnlabelledImages


@dataclasses.dataclass
class PipelineUnit:
    """One target unit whose images are read through the data pipeline on demand.

    ``events`` counts what methods report on the unit (`jaxadapt.methods.base.count_event`,
    e.g. a configured fallback); the protocol runner writes the counts to the results.
    """

    view: DataView
    spec: samplers.EvalUnit
    batch_size: int
    events: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n_controls(self) -> int:
        """How many control images the unit has."""
        return len(self.spec.control_rows)

    def adaptation(self) -> "PipelineUnit":
        """The unit a method adapts on: the subset `spec.adaptation` selects, else itself.

        It shares this unit's event counter, so fallbacks on it are counted.
        """
        if self.spec.adaptation is None:
            return self
        return PipelineUnit(self.view, self.spec.adaptation, self.batch_size, self.events)

    def unlabelled(self) -> UnlabelledImages:
        """The unit's scored and control rows with the labels blanked (`UnlabelledImages`)."""
        rows = np.concatenate([self.spec.rows[self.spec.mask], self.spec.control_rows])
        columns = dict(self.view.table.columns)
        columns["label"] = np.full(len(self.view.table), NO_LABEL, columns["label"].dtype)
        columns["moa"] = np.full(len(self.view.table), "", columns["moa"].dtype)
        return UnlabelledImages(self.view.source, SiteTable(columns), rows.astype(np.int64),
                                self.view.num_threads, self.view.train_transform)

    def batches(self) -> Iterator[UnitBatch]:
        for batch in self.view.eval_batches(self.spec.rows, self.spec.mask):
            yield UnitBatch(image=batch["image"], mask=batch["mask"])

    def labels(self) -> np.ndarray:
        """True labels of the unit's real samples, in the order of `batches()`."""
        return self.view.table["label"][self.spec.rows[self.spec.mask]]

    def controls(self, count: int, seed: int) -> np.ndarray:
        rows = self.spec.control_rows
        if len(rows) == 0:
            raise ValueError(
                f"unit {self.name!r} has no negative-control wells; methods that need "
                "controls (ben, cs_arm_bn) cannot run on it: choose units with DMSO wells"
            )
        rng = np.random.default_rng(seed)
        chosen = rng.choice(rows, size=count, replace=count > len(rows))
        (batch,) = self.view.eval_batches(chosen[None])
        return batch["image"]

    def all_controls(self) -> Iterator[np.ndarray]:
        rows = self.spec.control_rows
        for start in range(0, len(rows), self.batch_size):
            (batch,) = self.view.eval_batches(rows[None, start : start + self.batch_size])
            yield batch["image"]
