"""ResNet-18/34/50 for C-channel NHWC microscopy images, with the norm layer passed in.

Written for jaxadapt after the structure of torchvision's ResNet (v1.5: stride on the
3x3 conv of the bottleneck) and flax examples/imagenet/models.py (norm layer injected).
Paddings are explicit and symmetric, as in PyTorch, so imported torch weights give the
same outputs (Flax 'SAME' pads stride-2 convs asymmetrically).

Every norm layer is called as ``norm(name=...)(x, mode=norm_mode, mask=stats_mask)``,
so the statistics source (running / batch / given) and the context rows are arguments
of `ResNet.__call__`, never a hidden switch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxadapt.models.norm import BatchNorm

Array = jax.Array
ModuleDef = Any

#: Stems: "imagenet" = 7x7/2 conv + 3x3/2 max-pool (224 px); "small" = 3x3/2 conv, no
#: pool (32-64 px inputs; a 48 px image ends as a 3x3 map).
STEMS: tuple[str, ...] = ("imagenet", "small")

# He-normal on fan_out, as torchvision initializes its convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last: bool = True
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, *, mode: str, mask: Array | None) -> Array:
        """Apply the block. Args: x NHWC; mode, mask as in `BatchNorm`. Returns: NHWC."""
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), s, padding=_pad(3), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, mode=mode, mask=mask))
        y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.norm(name="bn2", scale_init=last_init)(y, mode=mode, mask=mask)
        return nn.relu(y + _shortcut(self, x, y.shape[-1], mode, mask))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) with a residual connection (ResNet-50)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    zero_init_last: bool = True
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, *, mode: str, mask: Array | None) -> Array:
        """Apply the block. Args: x NHWC; mode, mask as in `BatchNorm`. Returns: NHWC."""
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, mode=mode, mask=mask))
        y = self.conv(self.filters, (3, 3), s, padding=_pad(3), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y, mode=mode, mask=mask))
        y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.norm(name="bn3", scale_init=last_init)(y, mode=mode, mask=mask)
        return nn.relu(y + _shortcut(self, x, y.shape[-1], mode, mask))


def _shortcut(block: nn.Module, x: Array, out_ch: int, mode: str, mask: Array | None) -> Array:
    """Identity, or a strided 1x1 conv + norm when the shape changes (called in compact)."""
    if x.shape[-1] == out_ch and block.strides == 1:
        return x
    s = (block.strides, block.strides)
    r = block.conv(out_ch, (1, 1), s, name="proj_conv")(x)
    return block.norm(name="proj_bn")(r, mode=mode, mask=mask)


class ResNet(nn.Module):
    """ResNet with injected norm layer, returning ``(logits, features)``.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: size of the linear head.
      width: channels of the first stage (64 = standard); stage i has width * 2**i
        (times the block expansion).
      in_channels: expected input channels (5 for Cell Painting); checked on call.
      stem: "imagenet" or "small" (see `STEMS`).
      zero_init_residual: zero-init the last norm scale of every residual branch, so
        each block starts as the identity.
      dtype: computation dtype of convs / norms / head.
      norm_cls: norm layer class, called ``(x, *, mode, mask)``; default `BatchNorm`.
      norm_momentum, norm_epsilon: passed to ``norm_cls``.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    width: int = 64
    in_channels: int = 5
    stem: str = "imagenet"
    zero_init_residual: bool = True
    dtype: Any = jnp.float32
    norm_cls: Callable[..., nn.Module] = BatchNorm
    norm_momentum: float = 0.9
    norm_epsilon: float = 1e-5

    def _check(self, x: Array) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"ResNet input has shape {x.shape}; expected NHWC [batch, height, width, "
                f"{self.in_channels}] (add a batch axis with x[None])"
            )
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet input has {x.shape[-1]} channels (shape {x.shape}), expected "
                f"in_channels={self.in_channels}; set model.in_channels={x.shape[-1]} in "
                "the config or feed images with the model's channels (NHWC, channels last)"
            )
        if self.stem not in STEMS:
            raise ValueError(f"ResNet stem={self.stem!r}; use one of {STEMS}")

    @nn.compact
    def __call__(
        self, x: Array, *, norm_mode: str = "running", stats_mask: Array | None = None
    ) -> tuple[Array, Array]:
        """Run the network.

        Args:
          x: images ``[B, H, W, in_channels]``, float.
          norm_mode: "running", "batch" or "given" (see `jaxadapt.models.norm`).
          stats_mask: optional bool ``[B]``: rows defining batch statistics.

        Returns:
          ``(logits [B, num_classes] float32, features [B, D])``, features being the
          global-average-pooled output of the last stage.
        """
        self._check(x)
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init
        )
        norm = functools.partial(
            self.norm_cls, momentum=self.norm_momentum, epsilon=self.norm_epsilon,
            dtype=self.dtype,
        )
        kw = dict(mode=norm_mode, mask=stats_mask)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x, **kw))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        else:
            x = conv(self.width, (3, 3), (2, 2), padding=_pad(3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x, **kw))
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = self.block_cls(
                    filters=self.width * 2**i,
                    conv=conv,
                    norm=norm,
                    strides=2 if (i > 0 and j == 0) else 1,
                    zero_init_last=self.zero_init_residual,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x, **kw)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features)
        return logits.astype(jnp.float32), features


def resnet18(**kw: Any) -> ResNet:
    """ResNet-18 (BasicBlock, stages 2-2-2-2). Args: ResNet attributes. Returns: module."""
    return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, **kw)


def resnet34(**kw: Any) -> ResNet:
    """ResNet-34 (BasicBlock, stages 3-4-6-3). Args: ResNet attributes. Returns: module."""
    return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock, **kw)


def resnet50(**kw: Any) -> ResNet:
    """ResNet-50 (Bottleneck, stages 3-4-6-3). Args: ResNet attributes. Returns: module."""
    return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, **kw)
