"""Plate predictor for users: adapt BN statistics to a whole plate once, then stream.

Like the CS-ARM-BN authors' released predictor: one or several trained checkpoints (an
ensemble) are adapted to a plate by computing exact whole-plate BN statistics
(`jaxadapt.methods.bn.stats.plate_stats`, per member) from the plate's perturbed images and/or
its negative controls; afterwards any number of the plate's images is classified at ERM
cost. Output: the members' mean softmax and, as uncertainty, the entropy of that mean.

Example::

    pred = PlatePredictor(model, [variables_a, variables_b], context="both")
    state = pred.adapt(plate_batches, control_batches)
    probs, uncertainty = pred.predict(state, images)
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.methods.base import Variables
from jaxadapt.methods.bn.plate_stats import plate_stats
from jaxadapt.methods.bn.stats import NormStats, check_covers, check_finite


#: Which images define a plate's statistics.
CONTEXTS: tuple[str, ...] = ("both", "images", "controls")


class PlateState(NamedTuple):
    """A plate's adapted state: one ``norm_stats`` tree per ensemble member."""

    norm_stats: tuple[NormStats, ...]


def entropy(probs: jax.Array) -> jax.Array:
    """Entropy ``-sum_k p_k log p_k`` (nats) of each row, with ``0 log 0 = 0``.

    Args:
      probs: ``[n, K]`` probabilities.

    Returns:
      ``[n]``.
    """
    safe = jnp.where(probs > 0, probs, 1.0)
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(safe), 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _ensemble_probs(model, members, norm_stats, images):
    probs = []
    for variables, stats in zip(members, norm_stats):
        logits, _ = model.apply({**variables, "norm_stats": stats}, images, norm_mode="given")
        probs.append(jax.nn.softmax(logits, axis=-1))
    mean = sum(probs[1:], probs[0]) / len(probs)
    return mean, entropy(mean)


def _as_chunks(batches: Iterable[Any] | None) -> list:
    if batches is None:
        return []
    if isinstance(batches, (np.ndarray, jax.Array)):
        batches = [batches]
    return [b if isinstance(b, tuple) else (b, None) for b in batches]


class PlatePredictor:
    """Ensemble plate predictor with exact whole-plate BN statistics.

    Attributes:
      model: the architecture (shared by all members).
      members: the members' variables (``{"params", "batch_stats"}`` each).
      context: "both" (perturbed images + controls), "images" or "controls".
      batch_size: rows per device call in `adapt` and `predict` (inputs are split and
        padded to it, so each compiles once).
    """

    def __init__(self, model: nn.Module, variables: Variables | Sequence[Variables], *,
                 context: str = "both", batch_size: int = 256):
        """Args: see class attributes; ``variables`` is one member or a sequence."""
        members = [variables] if isinstance(variables, Mapping) else list(variables)
        if not members:
            raise ValueError("PlatePredictor: variables is empty; give at least one checkpoint")
        if context not in CONTEXTS:
            raise ValueError(f"PlatePredictor context={context!r}; use one of {CONTEXTS}")
        if batch_size < 1:
            raise ValueError(f"PlatePredictor batch_size={batch_size}; use a positive size")
        self.model, self.members = model, tuple(members)
        self.context, self.batch_size = context, int(batch_size)

    def adapt(self, plate_images: Iterable[Any] | None = None,
              control_images: Iterable[Any] | None = None) -> PlateState:
        """Compute each member's exact statistics over the plate's context, once.

        Args:
          plate_images: the plate's perturbed images: an array ``[n, H, W, C]`` or an
            iterable of arrays / ``(images, mask)`` chunks.
          control_images: the plate's negative-control images, same forms.

        Returns:
          The PlateState.

        Raises:
          ValueError: the chosen context needs controls (or images) and none are given,
            or non-finite pixels.
        """
        imgs, ctrls = _as_chunks(plate_images), _as_chunks(control_images)
        if self.context in ("both", "controls") and not any(len(c[0]) for c in ctrls):
            raise ValueError(
                f"PlatePredictor(context={self.context!r}) needs the plate's negative "
                "controls but control_images is empty; pass them, or use context='images'")
        if self.context in ("both", "images") and not any(len(c[0]) for c in imgs):
            raise ValueError(
                f"PlatePredictor(context={self.context!r}) needs the plate's images but "
                "plate_images is empty; pass them, or use context='controls'")
        chunks = ({"both": imgs + ctrls, "images": imgs, "controls": ctrls}[self.context])
        stats = tuple(plate_stats(self.model, v, chunks, chunk_size=self.batch_size)
                      for v in self.members)
        return PlateState(norm_stats=stats)

    def predict(self, state: PlateState, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Classify any number of images with the plate's fixed statistics (ERM cost).

        Args:
          state: from `adapt` for the same plate.
          images: ``[n, H, W, C]``.

        Returns:
          ``(probs [n, K] = mean softmax over members, uncertainty [n] = entropy of
          probs in nats)`` as NumPy arrays.
        """
        if len(state.norm_stats) != len(self.members):
            raise ValueError(
                f"PlateState has {len(state.norm_stats)} members' statistics, the predictor "
                f"{len(self.members)}; use the state returned by this predictor's adapt")
        for v, s in zip(self.members, state.norm_stats):
            check_covers(v, s)
        images = np.asarray(images)
        check_finite(images, what="predict images")
        probs, unc = [], []
        for s in range(0, len(images), self.batch_size):
            chunk = images[s:s + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            p, u = _ensemble_probs(self.model, self.members, state.norm_stats, jnp.asarray(chunk))
            probs.append(np.asarray(p)[:n])
            unc.append(np.asarray(u)[:n])
        if not probs:
            return np.zeros((0, 0), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(probs), np.concatenate(unc)
