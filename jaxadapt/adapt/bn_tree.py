"""``norm_stats`` trees: their types, the BN layers they cover, and the input checks.

Shared vocabulary of the BN-statistics modules (`jaxadapt.adapt.bn`, `bn_levels`,
`bn_plate`): a ``norm_stats`` tree is ``{layer path: {"mean", "var"}}`` over the paths of
the ``batch_stats`` collection. The checks here keep such trees complete (every BN layer)
and finite (no NaN image in a context). Import them from `jaxadapt.adapt.bn`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxadapt.adapt.base import Variables

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
