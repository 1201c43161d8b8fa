"""The epoch loop: train, validate, keep the best, stop early, checkpoint, resume.

`fit` is generic: it receives the jitted step function, a provider of each
epoch's batches and a validation function, so every method's training uses the
same loop. CS-ARM-BN's protocol (Adam 1e-3, up to 200 epochs, early stopping on
validation loss with patience 20) is `FitConfig(num_epochs=200, patience=20)`.

Resumption is exact: after every epoch the train state, the best parameters and
the loop counters (epoch, global step, best loss/epoch, epochs without
improvement, history) are checkpointed. Re-running the same `fit` call with the
same `ckpt_dir` continues from the last completed epoch, and because the batches
of epoch `e` come from `epoch_batches(e)` (deterministic in `e`), the run ends
with the same state and history as an uninterrupted one. An interrupted epoch
is re-run from its start.

This module holds the loop's types (`FitConfig`, `FitResult`), `fit` with its counters,
best snapshot and checkpoints, and one epoch's steps, metrics and reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jaxadapt.train.checkpoint import Checkpointer
from jaxadapt.train.progress import ProgressBar
from jaxadapt.train.writer import MetricWriter


__all__ = ["Batch", "FitConfig", "FitResult", "State", "TrainStep", "fit"]


def _fresh_meta() -> dict[str, Any]:
    """Loop counters before the first epoch (JSON-able: checkpointed as is)."""
    return {
        "epoch": 0,
        "global_step": 0,
        "best_val_loss": None,
        "best_epoch": -1,
        "bad_epochs": 0,
        "stopped_early": False,
        "history": [],
    }


def _best_of(state: State, fields: tuple[str, ...]) -> dict[str, Any]:
    """Copies the best-tracked fields of `state`.

    A copy, not a reference: a train step that donates its input buffers would
    otherwise delete the kept best parameters.
    """

    def copy(x):
        return x.copy() if isinstance(x, (jax.Array, np.ndarray)) else x

    return {
        f: jax.tree.map(copy, getattr(state, f))
        for f in fields
        if getattr(state, f, None) is not None
    }


def _record(
    meta: dict[str, Any], epoch: int, train: dict[str, float], val: dict[str, float], cfg: FitConfig
) -> bool:
    """Updates counters and history after an epoch; returns True if improved."""
    best = meta["best_val_loss"]
    # NaN never improves; the first finite epoch always does.
    improved = (not math.isnan(val["loss"])) and (
        best is None or val["loss"] < best - cfg.min_delta
    )
    if improved:
        meta.update(best_val_loss=val["loss"], best_epoch=epoch, bad_epochs=0)
    else:
        meta["bad_epochs"] += 1
    meta["stopped_early"] = meta["bad_epochs"] >= cfg.patience
    meta["epoch"] = epoch + 1
    entry = {"epoch": epoch}
    entry.update({f"train_{k}": v for k, v in train.items()})
    entry.update({f"val_{k}": v for k, v in val.items()})
    meta["history"].append(entry)
    return improved


def _resume(
    ckpt: Checkpointer | None, state: State, cfg: FitConfig
) -> tuple[State, dict[str, Any], dict[str, Any]]:
    """Returns (state, best, meta): from the latest checkpoint, or fresh."""
    best = _best_of(state, cfg.best_fields)
    if ckpt is not None:
        found = ckpt.restore_latest({"state": state, "best": best})
        if found is not None:
            _, payload, meta = found
            return payload["state"], payload["best"], meta
    return state, best, _fresh_meta()


def _finished(meta: dict[str, Any], cfg: FitConfig) -> bool:
    """Done: patience ran out, or `num_epochs` reached (a larger num_epochs on a
    re-run of a completed, not early-stopped run trains further)."""
    return meta["stopped_early"] or meta["epoch"] >= cfg.num_epochs


def _result(state: State, best: dict[str, Any], meta: dict[str, Any], cfg: FitConfig) -> FitResult:
    """Builds the FitResult from the loop's state and counters."""
    done = _finished(meta, cfg)
    bvl = meta["best_val_loss"]
    return FitResult(
        state=state.replace(**best) if best else state,
        last_state=state,
        history=list(meta["history"]),
        best_epoch=meta["best_epoch"],
        best_val_loss=math.inf if bvl is None else bvl,
        stopped_early=meta["stopped_early"],
        finished=done,
        epochs_done=meta["epoch"],
        global_step=meta["global_step"],
    )


def fit(
    state: State,
    config: FitConfig,
    *,
    train_step: TrainStep,
    epoch_batches: Callable[[int], Iterable[Batch]],
    validate: Callable[[State], Mapping[str, Any]],
    writer: MetricWriter | None = None,
    lr_schedule: Callable[[int], Any] | None = None,
) -> FitResult:
    """Trains for up to `num_epochs` with early stopping, checkpoints and resume.

    Args:
      state: initial train state (a flax struct with `.replace` and the
        `config.best_fields` attributes, e.g. `TrainState`); also the template
        (structure, dtypes, shardings) into which a checkpoint is restored.
      config: `FitConfig`.
      train_step: `(state, batch) -> (state, metrics)`, usually jitted; scalar
        metrics (e.g. "loss", "accuracy") are logged and averaged per epoch.
      epoch_batches: `epoch -> iterable of batches` (0-based epoch). Must be
        deterministic in `epoch` for exact resumption.
      validate: `state -> {"loss": scalar, ...}`; "loss" drives early stopping.
      writer: optional `MetricWriter`: `train/*` every `log_every_steps` steps
        (x = global step), `epoch/*` every epoch (x = epochs completed).
      lr_schedule: optional `step -> lr` (an optax schedule), logged as train/lr.

    Returns:
      `FitResult`. If `ckpt_dir` holds a finished run, it is returned at once.
    """
    ckpt = (
        Checkpointer(
            config.ckpt_dir, max_to_keep=config.max_to_keep, async_save=config.async_checkpoint
        )
        if config.ckpt_dir is not None
        else None
    )
    try:
        state, best, meta = _resume(ckpt, state, config)
        ran = 0
        while not _finished(meta, config):
            if config.stop_after_epochs is not None and ran >= config.stop_after_epochs:
                break
            state, best = _one_epoch(
                state,
                best,
                meta,
                config,
                ckpt,
                train_step,
                epoch_batches,
                validate,
                writer,
                lr_schedule,
            )
            ran += 1
        return _result(state, best, meta, config)
    finally:
        if ckpt is not None:
            ckpt.close()
        if writer is not None:
            writer.flush()


def _one_epoch(
    state: State,
    best: dict[str, Any],
    meta: dict[str, Any],
    cfg: FitConfig,
    ckpt: Checkpointer | None,
    train_step: TrainStep,
    epoch_batches: Callable[[int], Iterable[Batch]],
    validate: Callable[[State], Mapping[str, Any]],
    writer: MetricWriter | None,
    lr_schedule: Callable[[int], Any] | None,
) -> tuple[State, dict[str, Any]]:
    """Trains, validates, records and checkpoints epoch `meta["epoch"]`.

    Args:
      state, best: current train state and best-field snapshot.
      meta: loop counters, updated in place.
      cfg, ckpt, train_step, epoch_batches, validate, writer, lr_schedule: as
        in `fit` (ckpt: the open Checkpointer or None).

    Returns:
      (state, best) after the epoch.
    """
    epoch = meta["epoch"]
    start = time.perf_counter()
    state, train, meta["global_step"], images = _run_epoch(
        state,
        epoch,
        train_step=train_step,
        batches=epoch_batches(epoch),
        cfg=cfg,
        global_step=meta["global_step"],
        writer=writer,
        lr_schedule=lr_schedule,
    )
    seconds = time.perf_counter() - start
    val = _validate(validate, state)
    if _record(meta, epoch, train, val, cfg):
        best = _best_of(state, cfg.best_fields)
    if writer is not None:
        writer.write_scalars(epoch + 1, _epoch_scalars(meta, train, val, images, seconds))
        writer.flush()
    if cfg.progress and jax.process_index() == 0:
        _summary(meta, cfg)
    if ckpt is not None:
        # A detached copy: an async save must not see later in-place updates.
        ckpt.save(epoch + 1, {"state": state, "best": best}, json.loads(json.dumps(meta)))
    return state, best


def _batch_size(batch: Batch) -> int:
    """Number of examples in a batch: leading dim of "image" or the first leaf."""
    leaf = batch["image"] if "image" in batch else jax.tree.leaves(batch)[0]
    return int(np.shape(leaf)[0]) if np.ndim(leaf) else 1


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Keeps the scalar entries of a metrics dict (still on device)."""
    return {k: v for k, v in metrics.items() if np.ndim(v) == 0}


def _log_step(
    writer: MetricWriter | None,
    step: int,
    metrics: Mapping[str, Any],
    lr_schedule: Callable[[int], Any] | None,
) -> dict[str, float]:
    """Fetches one step's scalars to the host and writes them as `train/<name>`."""
    host = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    out = {f"train/{k}": v for k, v in host.items()}
    if lr_schedule is not None:
        out["train/lr"] = float(lr_schedule(step - 1))  # lr of the update just made
    if writer is not None:
        writer.write_scalars(step, out)
    return host


def _run_epoch(
    state: State,
    epoch: int,
    *,
    train_step: TrainStep,
    batches: Iterable[Batch],
    cfg: FitConfig,
    global_step: int,
    writer: MetricWriter | None,
    lr_schedule: Callable[[int], Any] | None,
) -> tuple[State, dict[str, float], int, int]:
    """Runs the train steps of one epoch.

    Returns:
      (state, mean of each scalar metric over the steps, global step, images).
    """
    total = len(batches) if hasattr(batches, "__len__") else cfg.steps_per_epoch
    bar = (
        ProgressBar(total, desc=f"epoch {epoch + 1}/{cfg.num_epochs}")
        if cfg.progress and jax.process_index() == 0
        else None
    )
    per_step, images = [], 0
    for batch in batches:
        n = _batch_size(batch)
        state, metrics = train_step(state, batch)
        metrics = _scalars(metrics)
        per_step.append(metrics)
        global_step += 1
        images += n
        host = None
        if global_step % cfg.log_every_steps == 0:
            host = _log_step(writer, global_step, metrics, lr_schedule)
        if bar is not None:
            bar.update(1, images=n, metrics=host)
    if bar is not None:
        bar.close()
    if not per_step:
        raise ValueError(
            f"epoch_batches({epoch}) yielded no batch; it must yield "
            "at least one batch per epoch (check the batch size and "
            "the number of training rows)."
        )
    # One transfer for the whole epoch; it also waits for the device to finish.
    return state, _epoch_means(jax.device_get(per_step)), global_step, images


def _epoch_means(per_step: list[dict[str, Any]]) -> dict[str, float]:
    """Averages per-step scalars over an epoch.

    When the steps report a "count" (sum of loss weights, as
    `jaxadapt.train.steps` does), the other metrics are count-weighted means, so
    the epoch value equals the metric over all the epoch's weighted examples, and
    "count" is summed. Otherwise plain means over steps.
    """
    keys = per_step[0].keys()
    cols = {k: np.array([m[k] for m in per_step], np.float64) for k in keys}
    w = cols.get("count")
    if w is None or w.sum() <= 0:
        return {k: float(v.mean()) for k, v in cols.items()}
    out = {k: float((v * w).sum() / w.sum()) for k, v in cols.items()}
    out["count"] = float(w.sum())
    return out


def _validate(validate: Callable[[State], Mapping[str, Any]], state: State) -> dict[str, float]:
    """Calls the user's validation and checks it returns a "loss"."""
    out = validate(state)
    if "loss" not in out:
        raise ValueError(
            f"validate returned keys {sorted(out)}; it must return a "
            "dict with at least 'loss' (the early-stopping criterion)."
        )
    return {k: float(np.asarray(jax.device_get(v))) for k, v in out.items() if np.ndim(v) == 0}


def _epoch_scalars(
    meta: dict[str, Any],
    train: dict[str, float],
    val: dict[str, float],
    images: int,
    seconds: float,
) -> dict[str, float]:
    """Per-epoch scalars for the writer (timings here, not in the history)."""
    out = {f"epoch/train_{k}": v for k, v in train.items()}
    out.update({f"epoch/val_{k}": v for k, v in val.items()})
    best = meta["best_val_loss"]
    out.update(
        {
            "epoch/best_val_loss": math.inf if best is None else best,
            "epoch/bad_epochs": meta["bad_epochs"],
            "epoch/images_per_sec": images / max(seconds, 1e-9),
            "epoch/seconds": seconds,
        }
    )
    return out


def _summary(meta: dict[str, Any], cfg: FitConfig) -> None:
    """One line per epoch on stderr: losses, best so far, patience used."""
    h = meta["history"][-1]
    vals = " ".join(f"{k}={v:.4g}" for k, v in h.items() if k != "epoch")
    best = meta["best_val_loss"]
    best = "none" if best is None else f"{best:.4g}"
    sys.stderr.write(
        f"epoch {h['epoch'] + 1}/{cfg.num_epochs}: {vals} | best "
        f"{best} @ epoch {meta['best_epoch'] + 1} | "
        f"patience {meta['bad_epochs']}/{cfg.patience}\n"
    )
    sys.stderr.flush()


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
