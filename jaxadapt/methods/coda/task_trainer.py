"""CODA's supervised recipes: the supervised ViT and the dual model's task transformer.

Both train with the reference's step-2 recipe (`config.coda.task`): cross-entropy on the
training source's MoA labels, AdamW (lr 1e-4, weight decay 1e-5), a linear warm-up then
a constant rate, gradients clipped to global norm 1.0, the best validation epoch kept
(`jaxadapt.train.supervised.make_classifier_trainer`).

- `supervised`: a ViT of `config.model` + a linear classifier on its CLS, all trained.
- `dual_dino` / `dual_cb`: DINO pretraining of the extractor first (plain, or with
  CODA's cross-batch pairs; `jaxadapt.methods.coda.dino_trainer`, checkpointed in the run's
  ``extractor/`` folder), then the `DualModel`'s task transformer on the frozen
  teacher backbone (``task/``). The variables carry the whole DINO state under
  ``"dino"`` (teacher, student, centre), which online adaptation (ODA, CODA) continues.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxadapt.methods.base import Method, collect_logits
from jaxadapt.methods.coda import dino_optim, dino_trainer
from jaxadapt.models import build_model
from jaxadapt.models.dual import DualModel, TaskHead, ViTClassifier
from jaxadapt.train.supervised import make_classifier_trainer


Variables = dict[str, Any]


def task_optimizer(t: ml_collections.ConfigDict, steps_per_epoch: int,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """The reference's step-2 optimizer: global-norm clip, AdamW, linear warm-up then constant.

    Weight decay applies to kernels and embeddings only: biases and LayerNorm scales and
    offsets (every 1-D parameter) are exempt, as in the reference's parameter groups.

    Args:
      t: `config.coda.task` (learning_rate, weight_decay, warmup_epochs, clip_grad).
      steps_per_epoch: optimizer steps per epoch (the warm-up is given in epochs).
      frozen: top-level parameter names that never move (their updates are zero).

    Returns:
      The optax transformation.
    """
    warmup = int(t.warmup_epochs) * int(steps_per_epoch)
    base_lr = t.learning_rate
    # The reference's LinearWarmup scales the rate by (step + 1) / warmup: step 0 moves.
    lr = (lambda step: base_lr * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup)
          ) if warmup else base_lr
    parts = [optax.clip_by_global_norm(t.clip_grad)] if t.clip_grad > 0 else []
    # As the reference, no decay on biases and LayerNorm (1-D) parameters.
    tx = optax.chain(*parts, optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8,
                                         weight_decay=t.weight_decay,
                                         mask=dino_optim.decay_mask))
    if not frozen:
        return tx
    labels = lambda params: {k: ("frozen" if k in frozen else "train") for k in params}  # noqa: E731
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def task_head(config: ml_collections.ConfigDict) -> TaskHead:
    """The dual model's task transformer of `config.coda.task`. Returns: the module."""
    t = config.coda.task
    return TaskHead(num_classes=config.model.num_classes, embed_dim=t.embed_dim, depth=t.depth,
                    num_heads=t.num_heads, mlp_ratio=t.mlp_ratio)


def dual_model(config: ml_collections.ConfigDict) -> DualModel:
    """`config.model`'s ViT as the extractor under `task_head(config)`. Returns: the module."""
    return DualModel(extractor=build_model(config.model), task=task_head(config))


def vit_classifier(config: ml_collections.ConfigDict) -> ViTClassifier:
    """`config.model`'s ViT with a linear classifier. Returns: the module."""
    return ViTClassifier(backbone=build_model(config.model), num_classes=config.model.num_classes)


def make_task_trainer(model, config: ml_collections.ConfigDict, frozen: tuple[str, ...] = (),
                      prepare=None):
    """The step-2 recipe (`config.coda.task`) for any classifier with the BN call signature.

    Args:
      model: e.g. a `DualModel` or `ViTClassifier`.
      config: the study config.
      frozen: top-level parameter names that never move.
      prepare: optional starting variables (see `supervised.make_classifier_trainer`).

    Returns:
      `train(view, rows, run_dir, seed) -> variables`.
    """
    t = config.coda.task
    return make_classifier_trainer(model, config, t, "config.coda.task",
                                   lambda n: task_optimizer(t, n, frozen), prepare)


def make_supervised_trainer(config: ml_collections.ConfigDict):
    """The `supervised` recipe: a ViT classifier trained end to end.

    Args:
      config: the study config (`model`, `coda.task`, `data`).

    Returns:
      `train(view, rows, run_dir, seed) -> variables` ({"params": {"backbone", "fc"}}).
    """
    return make_task_trainer(vit_classifier(config), config)


def make_dual_trainer(config: ml_collections.ConfigDict, *, pairs: str = "none"):
    """The `dual_dino` (pairs="none") or `dual_cb` (cross-batch pairs) recipe.

    Args:
      config: the study config (`model`, `dino`, `coda.task`, `data`).
      pairs: "none", "plate" or "batch": the DINO pretraining's pairs.

    Returns:
      `train(view, rows, run_dir, seed) -> variables`: {"params": {"extractor": teacher
      backbone, "task": ...}, "batch_stats": {}, "dino": {"teacher", "student", "centre"}}.
    """
    pretrain = dino_trainer.make_dino_trainer(config, pairs=pairs)
    extractor: dict[str, Any] = {}  # the replicate's pretrained backbone, set before training

    def prepare(variables: Variables, *_) -> Variables:
        return {"params": {**variables["params"], "extractor": extractor["params"]},
                "batch_stats": {}}

    # Built once per study, so the task step compiles once.
    train_task = make_task_trainer(dual_model(config), config, ("extractor",), prepare)

    def train(view, rows: dict, run_dir: str, seed: int) -> Variables:
        dino_vars = pretrain(view, rows, os.path.join(run_dir, "extractor"), seed)
        extractor["params"] = dino_vars["params"]["backbone"]
        trained = train_task(view, rows, os.path.join(run_dir, "task"), seed)
        dino_state = {"teacher": dino_vars["params"], "student": dino_vars["student"],
                      "centre": dino_vars["centre"]}
        return {**trained, "dino": jax.device_get(dino_state)}

    return train


def frozen_method(name: str, trainer: str, model_of):
    """A registry factory for a classifier used as trained (`supervised`, `dual_dino`, `dual_cb`).

    Args:
      name: method name.
      trainer: the recipe that produces its variables.
      model_of: config -> the module (`vit_classifier`, `dual_model`).

    Returns:
      ``(model, cfg, setting) -> Method``; nothing adapts, so the context size, the
      adaptation unit and its subset cannot change its predictions (scored once per sweep).
    """
    def factory(model, cfg, setting) -> Method:
        module = model_of(cfg)
        predict = jax.jit(lambda variables, x: module.apply(
            {"params": variables["params"]}, x)[0])

        def predict_unit(variables: Variables, unit) -> np.ndarray:
            return collect_logits(functools.partial(predict, variables), unit)

        return Method(name=name, trainer=trainer, predict_unit=predict_unit,
                      ignores=("L", "unit", "adapt_on"))

    return factory
