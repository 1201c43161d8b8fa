"""BatchNorm statistics as data: context, whole-plate and controls-only statistics.

Statistics here are ``norm_stats`` pytrees (``{layer path: {"mean", "var"}}``, the
paths of the ``batch_stats`` collection) that a model consumes with
``norm_mode="given"`` (see `jaxadapt.models.norm`). Three ways to get them:

- `context_stats`: one train-mode pass over a context batch; every layer is normalized
  with the context's own statistics, exactly as train-mode BN does.
- `plate_stats` (`jaxadapt.methods.bn.plate_stats`): exact statistics of a context
  larger than one batch (a whole plate of thousands of images), streamed in chunks with
  peak device memory bounded by the chunk size, in about one forward pass (activations
  carried between the BN dependency levels, `jaxadapt.methods.bn.staged`), or one pass
  per level where memory is short. Never an average of per-chunk variances (the
  reference code's defect).
- per-batch statistics inside the forward pass (`norm_mode="batch"`).

This module holds the ``norm_stats`` types, the BN layers a tree must cover, the
running averages as a tree, the input checks, and the one-batch functions
(`context_stats`, `apply_with_stats`, `apply_with_context`). The methods built on them
are `jaxadapt.methods.bn.adabn` (AdaBN, whole-plate variants) and
`jaxadapt.methods.bn.ben` (BEN).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxadapt.methods.base import Variables
from jaxadapt.models.norm import norm_stats_from_suff


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


NormStats = dict[str, Any]
Chunk = tuple[Any, Any]  # (images [B, H, W, C], mask [B] bool or None)
LayerPath = tuple[str, ...]


def check_finite(images: Any, mask: Any | None = None, *, what: str = "context") -> None:
    """Raise if any selected image holds NaN or Inf (cheap host/device reduction).

    Args:
      images: ``[B, H, W, C]`` array (NumPy or JAX).
      mask: optional bool ``[B]``; only selected rows are checked (padding may be junk,
        BN never reads it).
      what: how to name the batch in the error, e.g. "context chunk 3".

    Raises:
      ValueError: naming how many non-finite values there are and in which rows.
    """
    if isinstance(images, np.ndarray):
        ok = bool(np.isfinite(images).all()) if mask is None else bool(
            np.isfinite(images[np.asarray(mask, bool)]).all())
    else:
        ok = bool(_all_finite(images, None if mask is None else jnp.asarray(mask, bool)))
    if ok:
        return
    bad = ~np.isfinite(np.asarray(images))
    if mask is not None:
        bad &= np.asarray(mask, bool).reshape((-1,) + (1,) * (bad.ndim - 1))
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(1))
    raise ValueError(
        f"{what} has {int(bad.sum())} non-finite pixel values (NaN or Inf) in "
        f"{len(rows)} image(s), rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}; "
        "BN statistics would be NaN: drop or repair those images (or mask them out)"
    )


@jax.jit
def _all_finite(images: jax.Array, mask: jax.Array | None) -> jax.Array:
    fin = jnp.isfinite(images).reshape(images.shape[0], -1).all(1)
    return jnp.all(fin if mask is None else fin | ~mask)


def layer_paths(variables: Variables) -> list[LayerPath]:
    """Paths of the model's BN layers (those holding ``batch_stats``), sorted."""
    if "batch_stats" not in variables:
        raise ValueError(
            f"variables have collections {sorted(variables)}, no 'batch_stats': BN "
            "adaptation needs a model with BatchNorm layers (pass model.init(...) output)"
        )
    flat = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    return sorted({k[:-1] for k in flat})


def check_covers(variables: Variables, norm_stats: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``norm_stats`` has an entry for every BN layer of ``variables``."""
    have = {k[:-1] for k in traverse_util.flatten_dict(dict(norm_stats))}
    missing = [p for p in layer_paths(variables) if p not in have]
    if missing:
        raise ValueError(
            f"norm_stats lack {len(missing)} BN layer(s), e.g. {'/'.join(missing[0])}; "
            "they would silently fall back to batch statistics: pass statistics of every "
            "layer (from context_stats or plate_stats of the same model)"
        )


def running_norm_stats(variables: Variables) -> NormStats:
    """The running averages as a ``norm_stats`` tree (what ERM normalizes with)."""
    return jax.tree.map(lambda a: a, dict(variables["batch_stats"]))
