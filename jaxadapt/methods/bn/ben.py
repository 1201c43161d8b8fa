"""BEN: BatchNorm with the statistics of the plate's negative controls, trained and tested.

As the CS-ARM-BN paper's baseline defines it (ml-jku/cs-arm-bn, ``plt/trainer/BEN.py``),
BEN is a *trained* method, not ERM weights with swapped statistics:

- Training episode: one plate, L perturbed images + N of its DMSO controls. Every BN
  layer normalizes the perturbed images with the mean / variance of the controls alone
  (layer l's control statistics are those of the controls normalized with the control
  statistics of layers < l, i.e. one train-mode pass over the controls). The statistics
  are constants in the gradient (the reference takes them in a ``no_grad`` pass over the
  controls); the cross-entropy is taken on the perturbed images only, so a perturbed
  image never influences any statistic.
- Test: each unit (plate) is normalized with the statistics of its controls, then every
  perturbed image is classified at ERM cost.

Differences from the reference, on purpose:

- Test statistics are the exact pooled statistics over ALL the unit's controls
  (`jaxadapt.methods.bn.stats.plate_stats`). The reference resets the running averages and
  then accumulates the controls' batch statistics with momentum 0.1, so it normalizes
  with statistics shrunk towards the reset values (mean 0, variance 1); and its
  per-batch variances are averaged, not pooled.
- Training episodes follow the episodic sampler of ARM-BN / CS-ARM-BN
  (`jaxadapt.methods.bn.episodic`, ``config.arm``: E plates per step, L perturbed + N
  controls each) so that BEN, ARM-BN and CS-ARM-BN differ only in which rows define the
  statistics and whether gradients flow through them.

The training forward here (`control_stats_forward`) is two passes per episode: a
gradient-free train-mode pass over the N controls that records every layer's statistics,
then a ``norm_mode="given"`` pass over the L perturbed images with those statistics. The
backward pass covers the L perturbed images only: cheaper than one masked pass over all
L + N rows with stop-gradient statistics, which would also back-propagate through the
controls' rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxadapt.methods.base import Method
from jaxadapt.methods.bn import adabn
from jaxadapt.models.norm import norm_stats_from_suff


def episode_control_stats(model: nn.Module, params: Any, batch_stats: Any,
                          controls: jax.Array, mask: jax.Array | None = None
                          ) -> tuple[dict, Any]:
    """Every BN layer's statistics of one episode's controls, as gradient-free constants.

    Args:
      model: module called ``model(x, norm_mode=, stats_mask=)``.
      params, batch_stats: the model's collections.
      controls: ``[N, H, W, C]`` the episode's control images.
      mask: optional bool ``[N]``: controls that define the statistics (e.g. not padding).

    Returns:
      ``(norm_stats, new_batch_stats)``: ``norm_stats`` ``{layer: {"mean", "var"}}``
      (biased variance) under `jax.lax.stop_gradient`; ``new_batch_stats`` the running
      averages after one momentum step towards the controls' statistics.
    """
    _, upd = model.apply({"params": params, "batch_stats": batch_stats}, controls,
                         norm_mode="batch", stats_mask=mask,
                         mutable=["suff_stats", "batch_stats"])
    stats = jax.lax.stop_gradient(norm_stats_from_suff(upd["suff_stats"]))
    return stats, upd.get("batch_stats", batch_stats)


def control_stats_forward(model: nn.Module, params: Any, batch_stats: Any,
                          images: jax.Array, n_perturbed: int,
                          control_mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Forward E BEN episodes: perturbed rows normalized with their controls' statistics.

    Args:
      model: module called ``model(x, norm_mode=, stats_mask=) -> (logits, features)``.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (running averages).
      images: float ``[E, L + N, H, W, C]``; in each episode rows ``[:L]`` are the
        perturbed images and rows ``[L:]`` its controls (the layout of
        `jaxadapt.data.sampling.Episodes`).
      n_perturbed: L (static).
      control_mask: optional bool ``[E, N]``: controls that define the statistics.

    Returns:
      ``(logits [E, L, K] of the perturbed rows, new_batch_stats)``; the statistics are
      constants for differentiation. ``new_batch_stats`` is the mean over episodes of
      the per-episode running averages updated with the controls' statistics.

    Raises:
      ValueError: images not 5-D, or no control row (``L >= L + N``).
    """
    if images.ndim != 5:
        raise ValueError(f"episode images have shape {images.shape}; expected "
                         "[episodes, L + N, H, W, C]")
    L = int(n_perturbed)
    if not 0 < L < images.shape[1]:
        raise ValueError(f"BEN episodes of {images.shape[1]} rows with n_perturbed={L}: "
                         "each episode needs L >= 1 perturbed rows followed by N >= 1 "
                         "controls (config.arm.n_controls >= 1)")

    def one(x, m):
        stats, new = episode_control_stats(model, params, batch_stats, x[L:], m)
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats,
                                 "norm_stats": stats}, x[:L], norm_mode="given")
        return logits, new

    if control_mask is None:
        logits, stats = jax.vmap(lambda x: one(x, None))(images)
    else:
        logits, stats = jax.vmap(one)(images, jnp.asarray(control_mask).astype(bool))
    return logits, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def ben(model: nn.Module, cfg: Any = None, setting: Mapping[str, Any] | None = None) -> Method:
    """BEN at test time: each unit normalized with exact statistics of all its controls.

    The weights come from the ``ben`` trainer (`jaxadapt.methods.bn.episodic`, episodes
    normalized with their controls' statistics). Unlike the reference, which resets the
    running averages and accumulates the controls' batch statistics with momentum 0.1
    (statistics shrunk towards mean 0, variance 1, per-batch variances averaged), the
    statistics here are the exact pooled mean and variance over ALL the unit's controls
    (`jaxadapt.methods.bn.stats.plate_stats`), computed once per unit.

    Args:
      model: the architecture.
      cfg: reads ``cfg.adapt.plate_chunk_size`` (default None = the controls' batch size)
        and ``cfg.adapt.on_missing_controls`` ("raise", default; or "perturbed_only":
        fall back to the unit's perturbed images, with a warning).
      setting: unused (the test batch size cannot change a prediction).

    Returns:
      The ``ben`` Method, trained by the ``ben`` trainer; its predict_unit raises
      ValueError for a unit without controls unless the fallback is configured.
    """
    return adabn.plate_method("ben", model, cfg, images=False, controls=True, trainer="ben")
