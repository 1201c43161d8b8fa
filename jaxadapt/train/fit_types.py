"""The types of `jaxadapt.train.loop.fit`: its options, its result, its step and batch.

Import them from `jaxadapt.train.loop`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np

State = Any
Batch = Mapping[str, Any]
TrainStep = Callable[[State, Batch], tuple[State, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Options of `fit`.

    Attributes:
      num_epochs: maximum number of epochs (>= 1).
      patience: stop after this many consecutive epochs without a validation loss
        below `best - min_delta` (>= 1).
      min_delta: smallest decrease of the validation loss that counts (>= 0).
      ckpt_dir: checkpoint folder (created); None: no checkpoints, no resume.
      max_to_keep: checkpoints kept (>= 1; 2 leaves a fallback).
      log_every_steps: write per-step scalars every this many global steps (>= 1).
      stop_after_epochs: run at most this many epochs in this call, then return
        with `finished=False` (a checkpointed run continues on the next call);
        None: no cap. Simulates an interruption in tests; caps a job's length.
      steps_per_epoch: shown by the progress bar when the batches have no len().
      best_fields: state attributes saved as "best" and swapped back in at the
        end (attributes that are None are skipped).
      progress: show a progress bar and per-epoch summary on stderr.
      async_checkpoint: write checkpoints in the background.
    """

    num_epochs: int
    patience: int = 20
    min_delta: float = 0.0
    ckpt_dir: str | None = None
    max_to_keep: int = 2
    log_every_steps: int = 50
    stop_after_epochs: int | None = None
    steps_per_epoch: int | None = None
    best_fields: tuple[str, ...] = ("params", "batch_stats")
    progress: bool = True
    async_checkpoint: bool = True

    def __post_init__(self):
        def need(field: str, ok: bool, fix: str) -> None:
            if not ok:
                raise ValueError(f"FitConfig.{field}={getattr(self, field)!r} is invalid; {fix}.")

        need(
            "num_epochs", _is_int(self.num_epochs) and self.num_epochs >= 1, "pass an integer >= 1"
        )
        need(
            "patience",
            _is_int(self.patience) and self.patience >= 1,
            "pass an integer >= 1 (use patience=num_epochs to disable early stopping)",
        )
        need("min_delta", self.min_delta >= 0, "pass a number >= 0")
        need(
            "max_to_keep",
            _is_int(self.max_to_keep) and self.max_to_keep >= 1,
            "pass an integer >= 1",
        )
        need(
            "log_every_steps",
            _is_int(self.log_every_steps) and self.log_every_steps >= 1,
            "pass an integer >= 1",
        )
        need(
            "stop_after_epochs",
            self.stop_after_epochs is None
            or (_is_int(self.stop_after_epochs) and self.stop_after_epochs >= 1),
            "pass None or an integer >= 1",
        )
        need(
            "ckpt_dir",
            self.ckpt_dir is None or not os.path.isfile(self.ckpt_dir),
            "it is an existing file; pass a directory path (created if missing)",
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the last train state with the `best_fields` of the best epoch
        swapped in (the model to evaluate).
      last_state: the last train state as trained (to continue training).
      history: one dict per completed epoch: "epoch" (0-based), "train_<metric>"
        (mean over the epoch's steps), "val_<metric>". Deterministic: no timings.
      best_epoch: 0-based epoch of the lowest validation loss (-1 if none ran).
      best_val_loss: that loss (inf if none ran).
      stopped_early: whether patience ran out.
      finished: False only when `stop_after_epochs` cut the run short.
      epochs_done: epochs completed in total (over all resumed calls).
      global_step: train steps taken in total.
    """

    state: State
    last_state: State
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    finished: bool
    epochs_done: int
    global_step: int
