"""Pure training and evaluation steps (jittable; no RNG needed by the ResNet models).

Batch dict fields:
  image: float32 ``[B, H, W, C]``.
  label: int32 ``[B]``; ``-1`` (NO_LABEL) for controls.
  mask: ``[B]`` loss weights (bool or float): 0 for controls and padding. Rows with a
    negative label get weight 0 whatever ``mask`` says (they have no class).
  stats_mask: optional bool ``[B]``: rows whose statistics BN uses in "batch" mode;
    default all rows, e.g. a CS-ARM-BN context of perturbed images plus DMSO controls.
    Pass it whenever a batch contains padding, or the padding shapes the statistics.

Loss = sum(w * ce) / max(sum(w), 1), so an all-padding batch gives loss 0, not NaN.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxadapt.train.state import TrainState

Batch = Mapping[str, jax.Array]


def _weights_and_ce(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-row loss weight and cross-entropy (labels < 0 clipped, weight 0)."""
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    valid = label >= 0
    w = jnp.asarray(batch["mask"]).astype(jnp.float32) * valid.astype(jnp.float32)
    # A -1 label would gather out of range; its weight is 0 anyway.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, label, 0))
    return w, ce


def _accuracy_sum(logits: jax.Array, batch: Batch, w: jax.Array) -> jax.Array:
    hit = (jnp.argmax(logits, -1) == jnp.asarray(batch["label"])).astype(jnp.float32)
    return jnp.sum(w * hit)


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build a step training with BN in "batch" mode (gradients through the statistics).

    Args:
      model: module called ``model(x, norm_mode=..., stats_mask=...) -> (logits, feats)``.
      tx: the optax optimizer whose state is in ``state.opt_state``.

    Returns:
      ``train_step(state, batch) -> (state, metrics)``; metrics: ``loss`` (weighted
      mean), ``accuracy`` (weighted), ``count`` (sum of weights). Running statistics
      are updated with the batch statistics of the ``stats_mask`` rows. Not jitted:
      wrap with ``jax.jit`` or `jaxadapt.train.parallel.parallel_train_step`.
    """

    def loss_fn(params, batch_stats, batch):
        (logits, _), new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            norm_mode="batch",
            stats_mask=batch.get("stats_mask"),
            mutable=["batch_stats"],
        )
        w, ce = _weights_and_ce(logits, batch)
        count = jnp.sum(w)
        loss = jnp.sum(w * ce) / jnp.maximum(count, 1.0)
        return loss, (new_vars.get("batch_stats", {}), logits, w, count)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, logits, w, count)), grads = grad_fn(
            state.params, state.batch_stats, batch
        )
        # optax (e.g. adam's bias correction float ** int32 step) relies on standard
        # promotion; keep it working when a caller (our tests) turns on strict mode.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss,
            "accuracy": _accuracy_sum(logits, batch, w) / jnp.maximum(count, 1.0),
            "count": count,
        }
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module, norm_mode: str = "running"
) -> Callable[..., dict[str, jax.Array]]:
    """Build an evaluation step (no state change, padding never counts).

    Args:
      model: as for `make_train_step`.
      norm_mode: "running" (running averages), "batch" (statistics of the batch's
        ``stats_mask`` rows, default all rows; running averages untouched) or "given".

    Returns:
      ``eval_step(state, batch, norm_stats=None) -> {"logits", "features", "loss_sum",
      "count", "correct"}``; ``loss_sum``/``correct``/``count`` are weighted sums so
      they add over batches and devices. ``norm_stats`` (a tree like ``batch_stats``
      of ``{mean, var}``) feeds mode "given"; layers missing from it use the batch.
    """
    if norm_mode not in ("running", "batch", "given"):
        raise ValueError(f"norm_mode={norm_mode!r}; use 'running', 'batch' or 'given'")

    def eval_step(state: TrainState, batch: Batch, norm_stats: Any = None):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if norm_stats is not None:
            variables["norm_stats"] = norm_stats
        logits, features = model.apply(
            variables, batch["image"], norm_mode=norm_mode,
            stats_mask=batch.get("stats_mask"),
        )
        w, ce = _weights_and_ce(logits, batch)
        return {
            "logits": logits,
            "features": features,
            "loss_sum": jnp.sum(w * ce),
            "count": jnp.sum(w),
            "correct": _accuracy_sum(logits, batch, w),
        }

    return eval_step
