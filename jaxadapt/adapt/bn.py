"""BatchNorm statistics as data: context, whole-plate and controls-only statistics.

Statistics here are ``norm_stats`` pytrees (``{layer path: {"mean", "var"}}``, the
paths of the ``batch_stats`` collection) that a model consumes with
``norm_mode="given"`` (see `jaxadapt.models.norm`). Three ways to get them:

- `context_stats`: one train-mode pass over a context batch; every layer is normalized
  with the context's own statistics, exactly as train-mode BN does.
- `plate_stats`: exact statistics of a context larger than one batch (a whole plate of
  thousands of images), streamed in chunks with peak device memory bounded by the chunk
  size, in about one forward pass (activations carried between the BN dependency
  levels, `jaxadapt.adapt.staged`), or one pass per level where memory is short.
  Never an average of per-chunk variances (the reference code's defect).
- per-batch statistics inside the forward pass (`norm_mode="batch"`).

The methods built on them are in `jaxadapt.adapt.adabn` (AdaBN, whole-plate
variants) and `jaxadapt.adapt.ben` (BEN).

This module is the public face of BN statistics: it holds the one-batch functions
(`context_stats`, `apply_with_stats`, `apply_with_context`) and re-exports the rest:

- `jaxadapt.adapt.bn_tree`: the ``norm_stats`` types, the BN layers a tree must cover,
  the running averages as a tree, and the input checks;
- `jaxadapt.adapt.bn_levels`: the BN layers' dependency levels and the staged plan, by
  tracing (`layer_levels`, `carry_bytes`);
- `jaxadapt.adapt.bn_plate`: `plate_stats`, streamed over chunks (carried or recomputed).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapt.base import Variables
from jaxadapt.adapt.bn_levels import carry_bytes, layer_levels
from jaxadapt.adapt.bn_plate import CARRY, plate_stats
from jaxadapt.adapt.bn_tree import (Chunk, LayerPath, NormStats, check_covers, check_finite,
                                    layer_paths, running_norm_stats)
from jaxadapt.models.norm import norm_stats_from_suff

__all__ = [
    "CARRY", "Chunk", "LayerPath", "NormStats", "apply_with_context", "apply_with_stats",
    "carry_bytes", "check_covers", "check_finite", "context_stats", "layer_levels",
    "layer_paths", "plate_stats", "running_norm_stats",
]


@functools.partial(jax.jit, static_argnames=("model",))
def _context_stats(model: nn.Module, variables: Variables, images: jax.Array,
                   stats_mask: jax.Array | None) -> NormStats:
    _, upd = model.apply(variables, images, norm_mode="batch", stats_mask=stats_mask,
                         mutable=["suff_stats"])
    return norm_stats_from_suff(upd["suff_stats"])


def context_stats(model: nn.Module, variables: Variables, images: Any,
                  stats_mask: Any | None = None) -> NormStats:
    """Every BN layer's mean / biased variance over a context, in one train-mode pass.

    Each layer is normalized with the context's own statistics (as train-mode BN does),
    so the statistics of layer l are those of its input under the context's statistics
    of layers < l. Running averages are not touched. Jitted once per shape.

    Args:
      model: a model taking ``norm_mode`` / ``stats_mask`` (e.g. `ResNet`).
      variables: ``{"params", "batch_stats"}``.
      images: the context ``[B, H, W, C]``.
      stats_mask: optional bool ``[B]``; rows that define the statistics (padding never
        contributes, even if it holds NaN).

    Returns:
      ``norm_stats`` ``{layer path: {"mean": [C], "var": [C]}}`` for ``norm_mode="given"``.

    Raises:
      ValueError: non-finite pixels in the selected rows, or a mask selecting no row.
    """
    check_finite(images, stats_mask)
    mask = None if stats_mask is None else jnp.asarray(stats_mask, bool)
    if mask is not None and not bool(np.asarray(stats_mask).any()):
        raise ValueError("context_stats: stats_mask selects no row; include at least one image")
    return _context_stats(model, variables, jnp.asarray(images), mask)


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_with_stats(model, variables, norm_stats, images):
    logits, _ = model.apply({**variables, "norm_stats": norm_stats}, images, norm_mode="given")
    return logits


def apply_with_stats(model: nn.Module, variables: Variables, norm_stats: NormStats,
                     images: Any) -> jax.Array:
    """Logits with fixed, precomputed BN statistics (at ERM cost; jitted once per shape).

    Args:
      model: the model.
      variables: ``{"params", "batch_stats"}``.
      norm_stats: statistics of every BN layer (`context_stats` / `plate_stats`).
      images: ``[B, H, W, C]``.

    Returns:
      float32 logits ``[B, K]``; each row depends on that row only.

    Raises:
      ValueError: norm_stats missing a layer of the model.
    """
    check_covers(variables, norm_stats)
    return _apply_with_stats(model, variables, norm_stats, jnp.asarray(images))


def features_with_stats(model: nn.Module, variables: Variables, norm_stats: NormStats,
                        images: Any) -> jax.Array:
    """Penultimate (pooled) features with fixed BN statistics, as `apply_with_stats` logits.

    Args:
      model, variables, norm_stats, images: as `apply_with_stats`.

    Returns:
      float ``[B, D]`` features; each row depends on that row only.

    Raises:
      ValueError: norm_stats missing a layer of the model.
    """
    check_covers(variables, norm_stats)
    return _features_with_stats(model, variables, norm_stats, jnp.asarray(images))


@functools.partial(jax.jit, static_argnames=("model",))
def _features_with_stats(model, variables, norm_stats, images):
    _, features = model.apply({**variables, "norm_stats": norm_stats}, images, norm_mode="given")
    return features


@functools.partial(jax.jit, static_argnames=("model",))
def _apply_with_context(model, variables, images, context, context_mask):
    x = jnp.concatenate([context, images.astype(context.dtype)])
    mask = jnp.concatenate([context_mask, jnp.zeros(images.shape[0], bool)])
    logits, _ = model.apply(variables, x, norm_mode="batch", stats_mask=mask)
    return logits[context.shape[0]:]


def apply_with_context(model: nn.Module, variables: Variables, images: Any, context: Any,
                       context_mask: Any | None = None) -> jax.Array:
    """Logits of ``images`` with BN statistics taken from a separate context batch.

    One train-mode pass over ``[context; images]`` whose statistics rows are the
    context only; equals ``apply_with_stats(context_stats(context))`` in one pass.

    Args:
      model: the model.
      variables: ``{"params", "batch_stats"}``.
      images: ``[B, H, W, C]`` to classify (they do not enter the statistics).
      context: ``[N, H, W, C]`` images that define the statistics.
      context_mask: optional bool ``[N]`` selecting context rows.

    Returns:
      float32 logits ``[B, K]``.
    """
    check_finite(context, context_mask, what="context")
    cm = (np.ones(np.shape(context)[0], bool) if context_mask is None
          else np.asarray(context_mask, bool))
    if not cm.any():
        raise ValueError("apply_with_context: context_mask selects no row; give a context")
    return _apply_with_context(model, variables, jnp.asarray(images), jnp.asarray(context),
                               jnp.asarray(cm))
