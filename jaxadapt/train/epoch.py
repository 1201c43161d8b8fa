"""One epoch of `jaxadapt.train.loop.fit`: its train steps, their metrics, and reports.

`_run_epoch` runs the steps (logging every ``log_every_steps``, a progress bar), and
`_epoch_means` reduces their scalars to the epoch's values; `_validate` checks the
user's validation; `_epoch_scalars` and `_summary` report the finished epoch to the
writer and to stderr. The loop's counters and checkpoints stay in `jaxadapt.train.loop`.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jaxadapt.train.fit_types import Batch, FitConfig, State, TrainStep
from jaxadapt.train.progress import ProgressBar
from jaxadapt.train.writer import MetricWriter


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
