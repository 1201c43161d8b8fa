"""An MLP with BatchNorm for CellProfiler profiles: the "CellProfiler features + MLP" baseline.

Same call signature and variable layout as `jaxadapt.models.resnet.ResNet`:
``model.apply(variables, x, norm_mode=..., stats_mask=...) -> (logits, features)`` with
``params`` / ``batch_stats`` collections and every norm layer a `BatchNorm`, so every
BN-family method (ERM, AdaBN, TENT, BEN, ARM-BN, CS-ARM-BN) runs on profiles unchanged.
A profile arrives as a 1 x 1 image with D channels ([B, 1, 1, D], as
`jaxadapt.data.profiles.tables.ProfileSource` serves it) or as [B, D].
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxadapt.models.norm import BatchNorm

Array = jax.Array


class MLP(nn.Module):
    """``hidden_layers`` x (Dense -> BatchNorm -> ReLU), then a linear head.

    Attributes:
      num_classes: size of the head.
      in_channels: number of profile features D; checked on call.
      width: units of every hidden layer.
      hidden_layers: number of Dense-BN-ReLU blocks (>= 1).
      dtype: computation dtype.
      norm_cls: norm layer class, called ``(x, *, mode, mask)``; default `BatchNorm`.
      norm_momentum, norm_epsilon: passed to ``norm_cls``.
    """

    num_classes: int
    in_channels: int
    width: int = 64
    hidden_layers: int = 2
    dtype: Any = jnp.float32
    norm_cls: Callable[..., nn.Module] = BatchNorm
    norm_momentum: float = 0.9
    norm_epsilon: float = 1e-5

    def _flatten(self, x: Array) -> Array:
        if x.ndim == 4 and x.shape[1:3] == (1, 1):
            x = x.reshape(x.shape[0], x.shape[3])
        if x.ndim != 2 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"MLP input has shape {x.shape}; expected [batch, {self.in_channels}] or "
                f"[batch, 1, 1, {self.in_channels}] profiles; set model.in_channels to the "
                "number of features")
        if self.hidden_layers < 1:
            raise ValueError(f"MLP hidden_layers={self.hidden_layers}; use >= 1 (a BN layer "
                             "is what the BN-family methods adapt)")
        return x

    @nn.compact
    def __call__(self, x: Array, *, norm_mode: str = "running",
                 stats_mask: Array | None = None) -> tuple[Array, Array]:
        """Run the network.

        Args:
          x: profiles [B, D] or [B, 1, 1, D], float.
          norm_mode: "running", "batch" or "given" (see `jaxadapt.models.norm`).
          stats_mask: optional bool/float [B]: rows defining batch statistics.

        Returns:
          (logits [B, num_classes] float32, features [B, width]: the last hidden layer).
        """
        x = self._flatten(x).astype(self.dtype)
        norm = functools.partial(self.norm_cls, momentum=self.norm_momentum,
                                 epsilon=self.norm_epsilon, dtype=self.dtype)
        for i in range(self.hidden_layers):
            # No bias: the BN shift that follows makes it redundant.
            x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name=f"dense{i + 1}")(x)
            x = nn.relu(norm(name=f"bn{i + 1}")(x, mode=norm_mode, mask=stats_mask))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32), x
