"""The ERM training recipe: mixed batches of one source's labelled images, BN in batch mode.

Follows the CS-ARM-BN paper's protocol: Adam (lr 1e-3, no schedule), cross-entropy on
the perturbed (labelled) images, early stopping on the validation loss of held-out
batches of the training source. Data parallel over every device via `parallel`; on
several hosts each process reads only its share of every batch (`parallel.process_batches`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from jaxadapt.data import sampling as samplers
from jaxadapt.data.schema import NO_LABEL
from jaxadapt.train import parallel, steps
from jaxadapt.train.loop import FitConfig, fit
from jaxadapt.train.state import TrainState, create_train_state, init_opt_state
from jaxadapt.train.writer import MetricWriter


Variables = dict[str, Any]


def labelled_rows(table, rows: np.ndarray) -> np.ndarray:
    """The rows of `rows` that carry a class label (controls have none)."""
    return rows[table["label"][rows] != NO_LABEL]


def check_batch_size(batch_size: int, field: str) -> None:
    """A global batch must split evenly over the processes and then their local devices.

    Args:
      batch_size: the global batch size.
      field: its config key, named in the error.

    Raises:
      ValueError: naming the batch size, the process and per-process device counts, and
        valid sizes (`samplers.check_process_split`).
    """
    samplers.check_process_split(batch_size, field, process_count=jax.process_count(),
                                 local_devices=jax.local_device_count())


def make_validator(eval_step: Callable, view, rows: np.ndarray, batch_size: int,
                   mesh) -> Callable[[TrainState], dict[str, float]]:
    """`state -> {"loss", "accuracy"}` over `rows`, padding masked, exact over batches.

    Args:
      eval_step: parallel eval step `(state, batch) -> {loss_sum, count, correct, ...}`.
      view: DataView for loading images.
      rows: labelled validation rows.
      batch_size: evaluation batch size.
      mesh: device mesh the batches are sharded over.

    Returns:
      The validation function.
    """
    index, mask = samplers.padded_batches(rows, batch_size)

    def validate(state: TrainState) -> dict[str, float]:
        loss = count = correct = 0.0  # the step's sums are global: every process gets them
        for batch in parallel.process_batches(view.eval_batches, index, mesh, masks=mask,
                                              field="config.train.eval_batch_size"):
            out = eval_step(state, parallel.shard_batch(_model_batch(batch), mesh))
            loss += float(out["loss_sum"])
            count += float(out["count"])
            correct += float(out["correct"])
        return {"loss": loss / max(count, 1.0), "accuracy": correct / max(count, 1.0)}

    return validate


def _model_batch(batch: dict) -> dict:
    return {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}


def make_erm_trainer(model: nn.Module, config: ml_collections.ConfigDict):
    """Builds the ERM training function once per study (steps compile once).

    Args:
      model: the architecture.
      config: the study config; reads `train` (batch_size, eval_batch_size,
        learning_rate, num_epochs, patience, log_every_steps, stop_after_epochs),
        `data.crop_size` and `model.in_channels`.

    Returns:
      `train(view, rows, run_dir, seed) -> variables` with the best-validation weights.
    """
    lr = config.train.learning_rate
    return make_classifier_trainer(model, config, config.train, "config.train",
                                   lambda steps_per_epoch: optax.adam(lr))


#: (variables from init, view, rows, run_dir, seed) -> the variables training starts from.
Prepare = Callable[[Variables, Any, dict, str, int], Variables]


def make_classifier_trainer(model: nn.Module, config: ml_collections.ConfigDict,
                            loop: ml_collections.ConfigDict, field: str,
                            make_tx: Callable[[int], optax.GradientTransformation],
                            prepare: Prepare | None = None):
    """Cross-entropy training of any classifier with the BN family's call signature.

    Mixed batches of labelled training images, early stopping on the validation loss,
    checkpoints and exact resume (`loop.fit`); the ERM recipe and CODA's task models
    (`jaxadapt.methods.coda.task_trainer`) are instances.

    Args:
      model: called ``model(x, norm_mode=..., stats_mask=...) -> (logits, features)``.
      config: the study config (`data.crop_size`, `model.in_channels`,
        `train.stop_after_epochs`).
      loop: the recipe's section: batch_size, eval_batch_size, num_epochs, patience,
        log_every_steps.
      field: the section's dotted name, for error messages (e.g. "config.train").
      make_tx: steps per epoch -> the optimizer (schedules in epochs need the length).
      prepare: optional; turns freshly initialized variables into the starting ones
        (e.g. a pretrained, frozen extractor put into a dual model).

    Returns:
      `train(view, rows, run_dir, seed) -> variables` with the best-validation weights.
    """
    check_batch_size(loop.batch_size, f"{field}.batch_size")
    check_batch_size(loop.eval_batch_size, f"{field}.eval_batch_size")
    mesh = parallel.make_data_mesh()
    eval_step = parallel.parallel_eval_step(steps.make_eval_step(model), mesh)

    @functools.lru_cache(maxsize=None)
    def compiled(steps_per_epoch: int):
        tx = make_tx(steps_per_epoch)
        return tx, parallel.parallel_train_step(steps.make_train_step(model, tx), mesh)

    def train(view, rows: dict[str, np.ndarray], run_dir: str, seed: int) -> Variables:
        train_rows = labelled_rows(view.table, rows["train"])
        val_rows = labelled_rows(view.table, rows["validation"])
        if len(train_rows) < loop.batch_size:
            raise ValueError(
                f"training split has {len(train_rows)} labelled images, fewer than "
                f"{field}.batch_size={loop.batch_size}; lower the batch size or add plates"
            )
        steps_per_epoch = len(train_rows) // loop.batch_size
        tx, train_step = compiled(steps_per_epoch)
        state = _initial_state(model, tx, config, seed, prepare, (view, rows, run_dir, seed))
        state = parallel.replicate(state, mesh)

        def epoch_batches(epoch: int) -> Iterator[dict]:
            index = samplers.mixed_batches(train_rows, loop.batch_size, seed=seed, epoch=epoch)
            for batch in parallel.process_batches(view.train_batches, index, mesh,
                                                  seed=(seed, epoch),
                                                  field=f"{field}.batch_size"):
                yield parallel.shard_batch(_model_batch(batch), mesh)

        fit_cfg = FitConfig(
            num_epochs=loop.num_epochs, patience=loop.patience,
            ckpt_dir=os.path.join(run_dir, "checkpoints"), log_every_steps=loop.log_every_steps,
            stop_after_epochs=config.train.stop_after_epochs or None,
            steps_per_epoch=steps_per_epoch,
        )
        with MetricWriter(os.path.join(run_dir, "logs")) as writer:
            result = fit(state, fit_cfg, train_step=train_step, epoch_batches=epoch_batches,
                         validate=make_validator(eval_step, view, val_rows, loop.eval_batch_size, mesh),
                         writer=writer)
        if not result.finished:
            raise Interrupted(run_dir, result.epochs_done)
        # Evaluation runs on one device: bring the replicated weights home once.
        return jax.device_put(jax.device_get(result.state.variables()))

    return train


def _initial_state(model, tx, config, seed: int, prepare: Prepare | None, args: tuple) -> TrainState:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    sample = (1, config.data.crop_size, config.data.crop_size, config.model.in_channels)
    state = create_train_state(model, tx, key, sample)
    if prepare is None:
        return state
    variables = prepare(state.variables(), *args)
    params = variables["params"]
    return state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                         opt_state=init_opt_state(tx, params))


class Interrupted(RuntimeError):
    """Training stopped before its end (config.train.stop_after_epochs); re-run to resume."""

    def __init__(self, run_dir: str, epochs: int):
        super().__init__(
            f"training in {run_dir} stopped after {epochs} epoch(s) as config.train."
            "stop_after_epochs asked; re-run the same command to resume from its checkpoint"
        )
