"""(CS-)ARM-BN training: episodes normalized with their own context, and their steps.

Training (Zhang et al. 2021; Sanchez-Fernandez et al. 2026): an *episode* is one plate's
context, L perturbed images (+ N DMSO controls for CS-ARM-BN). Each episode is forwarded
on its own with BN in "batch" mode, every BN layer normalizing with the mean / variance
pooled over all L + N images of that episode (never over other episodes); the
cross-entropy is taken on the perturbed images only, and gradients flow through the
statistics. The per-step loss is the mean over the E episodes of the per-episode mean
cross-entropy, i.e. the average of the episodes' gradients, as the paper does with 8.

The same episodic steps train BEN (`jaxadapt.adapt.ben`) with ``controls_from=L``: the
L perturbed images of an episode are normalized with constant statistics of its N
controls alone.

The training step still updates the running BN averages (see `episode_forward`) so that
an ERM-style "running" evaluation stays possible. The test-time predictors and methods
are in `jaxadapt.adapt.arm`, which re-exports these functions.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxadapt.adapt import ben

Batch = Mapping[str, jax.Array]
# A `jaxadapt.train.state.TrainState` (not imported: adapt must not depend on train).
TrainState = Any


def episode_forward(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array,
                    stats_mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Forward E episodes, each normalized with its own context statistics.

    Args:
      model: module called ``model(x, norm_mode=, stats_mask=) -> (logits, features)``.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (running averages).
      images: float ``[E, L + N, H, W, C]``.
      stats_mask: optional bool ``[E, L + N]``: rows of each episode that define its
        statistics (default: all of them; pass it when episodes are padded).

    Returns:
      ``(logits [E, L + N, K], new_batch_stats)``. ``new_batch_stats`` is the mean over
      episodes of the per-episode updated running averages, i.e. one momentum step
      ``m * ra + (1 - m) * mean_e(stat_e)`` towards the mean of the E episodes' batch
      mean and (biased) variance.
    """
    if images.ndim != 5:
        raise ValueError(f"episode images have shape {images.shape}; expected "
                         "[episodes, L + N, H, W, C]")

    def one(x, m):
        (logits, _), new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, norm_mode="batch",
            stats_mask=m, mutable=["batch_stats"])
        return logits, new.get("batch_stats", {})

    if stats_mask is None:
        logits, stats = jax.vmap(lambda x: one(x, None))(images)
    else:
        logits, stats = jax.vmap(one)(images, jnp.asarray(stats_mask).astype(bool))
    return logits, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def _episode_ce(logits: jax.Array, labels: jax.Array, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-episode mean CE over weighted rows; returns (ce_mean [E], count [E], hits [E])."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    valid = labels >= 0
    w = weights.astype(jnp.float32) * valid.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    count = jnp.sum(w, axis=-1)
    hits = jnp.sum(w * (jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis=-1)
    return jnp.sum(w * ce, axis=-1) / jnp.maximum(count, 1.0), count, hits


def _loss_weights(is_control: jax.Array, mask: jax.Array | None) -> jax.Array:
    w = ~jnp.asarray(is_control).astype(bool)
    if mask is not None:
        w = w & jnp.asarray(mask).astype(bool)
    return w.astype(jnp.float32)


def _mean_over_episodes(per_episode: jax.Array, count: jax.Array) -> jax.Array:
    """Mean over episodes that have at least one scored row (0 if none has)."""
    has = (count > 0).astype(jnp.float32)
    return jnp.sum(per_episode * has) / jnp.maximum(jnp.sum(has), 1.0)


def _scored_forward(model: nn.Module, params: Any, batch_stats: Any, batch: Batch,
                    controls_from: int | None) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """(logits, new running stats, labels, loss weights) of the rows a step scores.

    ``controls_from=None``: (CS-)ARM-BN, every episode normalized with the statistics of
    its ``stats_mask`` rows (default all), gradients through them. An int L: BEN, the
    first L rows normalized with constant statistics of the rows from L on (the
    controls; ``stats_mask[:, L:]`` selects among them), only the first L rows scored.
    """
    mask = batch.get("mask")
    if controls_from is None:
        logits, new = episode_forward(model, params, batch_stats, batch["image"],
                                      batch.get("stats_mask"))
        return logits, new, batch["label"], _loss_weights(batch["is_control"], mask)
    L = int(controls_from)
    stats_mask = batch.get("stats_mask")
    logits, new = ben.control_stats_forward(
        model, params, batch_stats, batch["image"], L,
        None if stats_mask is None else jnp.asarray(stats_mask)[:, L:])
    w = _loss_weights(jnp.asarray(batch["is_control"])[:, :L],
                      None if mask is None else jnp.asarray(mask)[:, :L])
    return logits, new, jnp.asarray(batch["label"])[:, :L], w


def episode_loss(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array,
                 labels: jax.Array, is_control: jax.Array, mask: jax.Array | None = None,
                 stats_mask: jax.Array | None = None, controls_from: int | None = None
                 ) -> jax.Array:
    """The (CS-)ARM-BN episodic loss (or BEN's, with ``controls_from``).

    Args:
      model, params, batch_stats: as in `episode_forward`.
      images: ``[E, L + N, H, W, C]``, each episode one plate's context.
      labels: int ``[E, L + N]``; negative (controls) never scored.
      is_control: bool ``[E, L + N]``; controls shape the statistics, carry no loss.
      mask: optional ``[E, L + N]`` loss mask (False: not scored, e.g. padding).
      stats_mask: optional bool ``[E, L + N]`` rows defining the statistics.
      controls_from: None: (CS-)ARM-BN. L: BEN, rows ``[:L]`` of each episode
        normalized with the statistics of rows ``[L:]`` (its controls), held constant
        in the gradient (`jaxadapt.adapt.ben.control_stats_forward`).

    Returns:
      Scalar: mean over episodes of the mean cross-entropy of each episode's scored
      (perturbed, valid, labelled) images; episodes without any scored image are left
      out of the mean.
    """
    batch = {"image": images, "label": labels, "is_control": is_control, "mask": mask,
             "stats_mask": stats_mask}
    logits, _, labels, w = _scored_forward(model, params, batch_stats, batch, controls_from)
    ce, count, _ = _episode_ce(logits, labels, w)
    return _mean_over_episodes(ce, count)


def make_episodic_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                             controls_from: int | None = None
                             ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build ``(state, batch) -> (state, metrics)`` for episodic (CS-)ARM-BN training.

    Args:
      model: the architecture.
      tx: optax optimizer whose state is ``state.opt_state``.
      controls_from: None for (CS-)ARM-BN; L for BEN: rows ``[:L]`` of each episode are
        the perturbed images, normalized with constant statistics of its controls, rows
        ``[L:]`` (see `episode_loss`).

    Returns:
      The step (not jitted; use `jaxadapt.train.parallel.parallel_train_step`, which
      shards the episodes along E over the devices: each episode's statistics stay on
      one device and the mean over episodes is global). Batch fields: ``image``
      ``[E, L+N, H, W, C]``, ``label`` ``[E, L+N]``, ``is_control`` ``[E, L+N]``,
      optional ``mask`` (loss mask) and ``stats_mask``. Metrics: ``loss`` (episodic
      loss), ``accuracy`` (over scored images) and ``count`` (scored images).
    """

    def loss_fn(params, batch_stats, batch):
        logits, new_stats, labels, w = _scored_forward(model, params, batch_stats, batch,
                                                       controls_from)
        ce, count, hits = _episode_ce(logits, labels, w)
        return _mean_over_episodes(ce, count), (new_stats, jnp.sum(count), jnp.sum(hits))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        (loss, (new_stats, count, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax internals, see steps.py
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1,
                                  params=optax.apply_updates(state.params, updates),
                                  batch_stats=new_stats, opt_state=opt_state)
        return new_state, {"loss": loss, "accuracy": hits / jnp.maximum(count, 1.0),
                           "count": count}

    return train_step


def make_episodic_eval_step(model: nn.Module, *, controls_from: int | None = None
                            ) -> Callable[[TrainState, Batch], dict]:
    """``(state, batch) -> {"loss", "loss_per_episode", "count", "correct"}`` without updates.

    Args:
      model: the architecture.
      controls_from: as in `make_episodic_train_step` (None, or L for BEN).

    Returns:
      The step (not jitted). ``loss`` is `episode_loss`; ``loss_per_episode`` [E] and
      ``count`` [E] let a caller average over several batches of episodes exactly.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict:
        logits, _, labels, w = _scored_forward(model, state.params, state.batch_stats, batch,
                                               controls_from)
        ce, count, hits = _episode_ce(logits, labels, w)
        return {"loss": _mean_over_episodes(ce, count), "loss_per_episode": ce,
                "count": count, "correct": jnp.sum(hits)}

    return eval_step
