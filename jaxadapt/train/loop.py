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

This module holds `fit` and the loop's counters, best snapshot and checkpoints; one
epoch's steps, metrics and reports are in `jaxadapt.train.epoch`, and `FitConfig` /
`FitResult` in `jaxadapt.train.fit_types` (both re-exported here).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jaxadapt.train.checkpoint import Checkpointer
from jaxadapt.train.epoch import _epoch_scalars, _run_epoch, _summary, _validate
from jaxadapt.train.fit_types import Batch, FitConfig, FitResult, State, TrainStep
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
