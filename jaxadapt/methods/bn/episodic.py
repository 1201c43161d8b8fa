"""The episodic training recipe of ARM-BN, CS-ARM-BN and BEN: single-plate episodes.

Each optimizer step draws E plate episodes (default 8) from the training rows: one plate
chosen uniformly at random, L perturbed images (+ N DMSO controls of the same plate for
CS-ARM-BN and BEN); each episode is normalized with its own statistics (BEN: those of
its controls alone, held constant in the gradient) and the step minimizes the mean of
the episodes' cross-entropies (`jaxadapt.methods.bn.arm.episode_loss`). Adam at
``config.train.learning_rate``, no schedule; early stopping on the episodic loss of a
fixed set of validation-split episodes, as in the paper. Same contract as
`jaxadapt.train.supervised.make_erm_trainer`. On several hosts each process reads and
decodes only its E / P episodes of every step; the math is that of one process.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from jaxadapt.data import sampling as samplers
from jaxadapt.methods.bn import arm, shares
from jaxadapt.train import parallel
from jaxadapt.train.loop import FitConfig, fit
from jaxadapt.train.state import TrainState, create_train_state
from jaxadapt.train.supervised import Interrupted
from jaxadapt.train.writer import MetricWriter


Variables = dict[str, Any]

#: The episodic fields of ``config.arm``; their defaults live in `jaxadapt.config`.
ARM_FIELDS = ("episodes_per_step", "n_perturbed", "n_controls", "steps_per_epoch",
              "val_episodes", "on_missing_controls")


def arm_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The episodic settings of ``config.arm``.

    Args:
      config: a study config; `jaxadapt.config.get_defaults()` sets every field.

    Returns:
      Field name -> value for every name in `ARM_FIELDS`.

    Raises:
      ValueError: naming the fields ``config.arm`` lacks.
    """
    sub = config.get("arm")
    missing = [k for k in ARM_FIELDS if sub is None or k not in sub]
    if missing:
        raise ValueError(f"config.arm lacks {missing}; start from jaxadapt.config.get_defaults(), "
                         "which sets every episodic field")
    return {k: sub[k] for k in ARM_FIELDS}


def check_episodes(n_episodes: int) -> None:
    """On several hosts, E episodes must split over processes x local devices.

    Each process reads E / P whole episodes of every step and splits them over its
    devices (an episode never straddles devices or hosts); one host needs nothing, as
    `episode_mesh` then uses the devices that divide E.

    Raises:
      ValueError: naming E, the process count and the devices per process.
    """
    if jax.process_count() > 1:
        samplers.check_process_split(n_episodes, "config.arm.episodes_per_step",
                                     process_count=jax.process_count(),
                                     local_devices=jax.local_device_count(), unit="episodes")


def episode_mesh(n_episodes: int):
    """A data mesh over which `n_episodes` split evenly (episodes stay whole on a device).

    All devices when E is a multiple of the device count; on one host otherwise the
    largest number of devices dividing E (e.g. E = 2 on 8 devices uses 2); on several
    hosts E must be a multiple of the device count (`check_episodes`).
    """
    check_episodes(n_episodes)
    n = jax.device_count()
    if n_episodes % n == 0:
        return parallel.make_data_mesh()
    return parallel.make_data_mesh(jax.devices()[: math.gcd(n_episodes, n)])


def _episode_batch(batch: dict, shape: tuple[int, int]) -> dict:
    """A flat pipeline batch of E * (L + N) rows -> episode arrays [E, L + N, ...]."""
    img = batch["image"]
    return {"image": img.reshape(shape + img.shape[1:]),
            "label": batch["label"].reshape(shape),
            "is_control": batch["is_control"].reshape(shape),
            "mask": batch["mask"].reshape(shape)}


#: Which rows of an episode define its BN statistics: all (ARM-BN / CS-ARM-BN) or the
#: controls alone, as constants (BEN).
EPISODE_STATS = ("episode", "controls")


def make_episodic_trainer(model: nn.Module, config: ml_collections.ConfigDict, *,
                          with_controls: bool, stats: str = "episode"):
    """Builds the (CS-)ARM-BN or BEN training function once per study (steps compile once).

    Args:
      model: the architecture.
      config: the study config; reads ``config.arm`` (episodes_per_step [8],
        n_perturbed [64], n_controls [128; forced to 0 without controls],
        steps_per_epoch [0 = ceil(training perturbed images / (E * L))],
        val_episodes [32], on_missing_controls ["raise" | "skip"]), ``config.train``
        (learning_rate, num_epochs, patience, log_every_steps, stop_after_epochs),
        ``data.crop_size`` and ``model.in_channels``.
      with_controls: True: episodes hold N controls (CS-ARM-BN, BEN); False: ARM-BN.
      stats: "episode" (default): every episode normalized with the statistics of all its
        L + N rows, gradients through them; "controls": BEN, the L perturbed images
        normalized with constant statistics of the N controls (needs with_controls and
        n_controls >= 1; plates without controls follow on_missing_controls).

    Returns:
      ``train(view, rows, run_dir, seed) -> variables`` with the best-validation weights
      and the episode record ``{"episode": {"n_perturbed": L, "n_controls": N}}``
      (`jaxadapt.methods.bn.shares.with_episode_shape`, also written to
      ``<run_dir>/episode.json``), from which test-time methods check their control share.
      Episodes of step s depend only on (seed, s) and augmentation on (seed, epoch,
      step in epoch), so a resumed run is identical to an uninterrupted one.
    """
    a, E, L, N, controls_from = _episode_shape(config, with_controls, stats)
    n_val = -(-max(int(a["val_episodes"]), 1) // E) * E
    cfg = config.train
    mesh = episode_mesh(E)
    tx = optax.adam(cfg.learning_rate)
    train_step, eval_step = _episodic_steps(model, tx, mesh, controls_from)
    # Each process reads E / P whole episodes of every step (its contiguous share of the
    # flat E * (L + N) rows); the sharded step sees the same E episodes as on one process.
    shape = (E // jax.process_count(), L + N)

    def read(load, index, **kwargs):
        return parallel.process_batches(load, index, mesh, group=L + N,
                                        field="config.arm.episodes_per_step", **kwargs)

    def sampler(view, rows, seed):
        return samplers.make_episode_sampler(
            view.table, rows, n_perturbed=L, n_controls=N, n_episodes=E, seed=seed,
            on_missing_controls=a["on_missing_controls"])

    def train(view, rows: dict[str, np.ndarray], run_dir: str, seed: int) -> Variables:
        draw = sampler(view, rows["train"], seed)
        val_draw = sampler(view, rows["validation"], seed)
        val_rows = np.concatenate([val_draw(s).rows.reshape(1, -1) for s in range(n_val // E)])
        n_train = int(np.sum(view.table["label"][rows["train"]] >= 0))
        spe = int(a["steps_per_epoch"]) or max(1, -(-n_train // (E * L)))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
        sample = (1, config.data.crop_size, config.data.crop_size, config.model.in_channels)
        state = parallel.replicate(create_train_state(model, tx, key, sample), mesh)

        def epoch_batches(epoch: int) -> Iterator[dict]:
            index = np.stack([draw(epoch * spe + k).rows.reshape(-1) for k in range(spe)])
            for batch in read(view.train_batches, index, seed=(seed, epoch)):
                yield parallel.shard_batch(_episode_batch(batch, shape), mesh)

        validate = _episodic_validate(
            eval_step, lambda: read(view.eval_batches, val_rows), shape, mesh)
        fit_cfg = _fit_config(cfg, run_dir, spe)
        with MetricWriter(os.path.join(run_dir, "logs")) as writer:
            result = fit(state, fit_cfg, train_step=train_step, epoch_batches=epoch_batches,
                         validate=validate, writer=writer)
        if not result.finished:
            raise Interrupted(run_dir, result.epochs_done)
        record_episode_shape(run_dir, L, N)
        variables = jax.device_put(jax.device_get(result.state.variables()))
        return shares.with_episode_shape(variables, L, N)

    return train


def _episode_shape(config: ml_collections.ConfigDict, with_controls: bool,
                   stats: str) -> tuple[dict[str, Any], int, int, int, int | None]:
    """``(config.arm settings, E, L, N, controls_from)``, checked (see `make_episodic_trainer`).

    ``controls_from`` is L for BEN (``stats="controls"``), else None.
    """
    a = arm_settings(config)
    E, L = int(a["episodes_per_step"]), int(a["n_perturbed"])
    N = int(a["n_controls"]) if with_controls else 0
    if E < 1 or L < 1 or N < 0:
        raise ValueError(f"config.arm: episodes_per_step={E}, n_perturbed={L} must be >= 1 "
                         f"and n_controls={N} >= 0")
    if stats not in EPISODE_STATS:
        raise ValueError(f"episode stats={stats!r}; use one of {EPISODE_STATS}")
    controls_from = L if stats == "controls" else None
    if controls_from is not None and not with_controls:
        raise ValueError("stats='controls' (BEN) normalizes with the episodes' controls: "
                         "pass with_controls=True")
    if controls_from is not None and N < 1:
        raise ValueError(f"config.arm.n_controls={N}: BEN normalizes every episode with its "
                         "controls' statistics; set config.arm.n_controls >= 1")
    return a, E, L, N, controls_from


def _episodic_steps(model: nn.Module, tx: optax.GradientTransformation, mesh,
                    controls_from: int | None) -> tuple[Callable, Callable]:
    """The train step sharded over ``mesh`` and the jitted eval step (replicated outputs)."""
    train_step = parallel.parallel_train_step(
        arm.make_episodic_train_step(model, tx, controls_from=controls_from), mesh)
    rep, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    eval_step = jax.jit(arm.make_episodic_eval_step(model, controls_from=controls_from),
                        in_shardings=(rep, data),
                        out_shardings={"loss": rep, "loss_per_episode": rep, "count": rep,
                                       "correct": rep})
    return train_step, eval_step


def _episodic_validate(eval_step, batches: Callable[[], Iterable[dict]],
                       shape: tuple[int, int], mesh) -> Callable[[TrainState], dict[str, float]]:
    """``validate(state)`` for `fit`: the episodic loss over the fixed validation episodes.

    The mean over every episode with a scored image (not a mean of batch means), and the
    accuracy over all scored images; ``batches()`` reads this process's flat batches.
    """

    def validate(state: TrainState) -> dict[str, float]:
        losses, count, correct = [], 0.0, 0.0
        for batch in batches():
            out = eval_step(state, parallel.shard_batch(_episode_batch(batch, shape), mesh))
            c = np.asarray(out["count"])
            losses.append(np.asarray(out["loss_per_episode"])[c > 0])
            count += float(c.sum())
            correct += float(out["correct"])
        ce = np.concatenate(losses)
        return {"loss": float(ce.mean()) if ce.size else float("nan"),
                "accuracy": correct / max(count, 1.0)}

    return validate


def _fit_config(cfg: ml_collections.ConfigDict, run_dir: str, steps_per_epoch: int) -> FitConfig:
    """The loop options from ``config.train``, checkpointing under ``<run_dir>/checkpoints``."""
    return FitConfig(
        num_epochs=cfg.num_epochs, patience=cfg.patience,
        ckpt_dir=os.path.join(run_dir, "checkpoints"), log_every_steps=cfg.log_every_steps,
        stop_after_epochs=cfg.get("stop_after_epochs") or None, steps_per_epoch=steps_per_epoch)


def record_episode_shape(run_dir: str, n_perturbed: int, n_controls: int) -> None:
    """Writes ``<run_dir>/episode.json`` = {"n_perturbed": L, "n_controls": N} (process 0).

    Raises:
      ValueError: the directory already records another shape (a checkpoint directory
        reused for a model trained differently).
    """
    path = os.path.join(run_dir, "episode.json")
    shape = {"n_perturbed": int(n_perturbed), "n_controls": int(n_controls)}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != shape:
            raise ValueError(f"{path} records episodes {old}, but this model trains on {shape}: "
                             "the directory holds another model; use another checkpoint_dir")
        return
    if jax.process_index() != 0:  # one writer on a shared run directory
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(shape, f)
    os.replace(tmp, path)  # atomic: another process never reads a half-written file
