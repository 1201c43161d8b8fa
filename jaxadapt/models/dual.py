"""CODA's task models on a ViT: the supervised classifier and the dual model.

- `ViTClassifier`: a ViT (DeiT-S shaped) whose CLS token feeds a linear layer to the
  classes, trained end to end with cross-entropy (CODA's `supervised` baseline).
- `DualModel` (CODA's "Ymodel", `domain_adaptation/ODA/models.py`): a frozen feature
  extractor -- the DINO teacher's ViT -- returns *all* its tokens after its final
  LayerNorm; a linear layer projects them to the task transformer's width; DeiT blocks
  (no patch embedding, no CLS of their own, no new positional embedding: the tokens
  already carry the extractor's) and a LayerNorm follow; token 0 (the projected
  extractor CLS) goes through a linear layer to the classes. Only the projection, the
  blocks and the classifier train; the extractor is what online adaptation (ODA, CODA)
  changes later, under the frozen task model.

Both take the BatchNorm family's call signature ``model(x, norm_mode=..., stats_mask=...)
-> (logits, features)`` (no BN here: the arguments are accepted and ignored), so the
house's training and evaluation steps (`jaxadapt.train.steps`) drive them unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxadapt.models.vit import Block, ViT, layer_norm, trunc_normal

Array = jax.Array


def tokens(vit_out: dict[str, Array]) -> Array:
    """All tokens of a ViT output, CLS first. Args: ViT output. Returns: (B, 1 + N, D)."""
    return jnp.concatenate([vit_out["cls"][:, None], vit_out["patches"]], axis=1)


class TaskHead(nn.Module):
    """The dual model's task transformer on an extractor's tokens.

    Attributes:
      num_classes: K.
      embed_dim, depth, num_heads, mlp_ratio: the task transformer's size (CODA: DeiT-S,
        384 / 12 / 6 / 4).
      dtype: matmul dtype (LayerNorms and the residual stream stay float32).
    """

    num_classes: int
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        """Args: x (B, T, D_ext) tokens, CLS first. Returns: (logits (B, K), CLS (B, embed_dim))."""
        x = nn.Dense(self.embed_dim, kernel_init=trunc_normal, name="projector")(x)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, 0.0, self.dtype, name=f"block{i}")(x)
        cls = layer_norm(x, "norm")[:, 0]
        return nn.Dense(self.num_classes, kernel_init=trunc_normal, name="fc")(cls), cls


class DualModel(nn.Module):
    """Frozen extractor -> all tokens -> `TaskHead` (params {"extractor", "task"}).

    The extractor's output is cut from the gradient (`jax.lax.stop_gradient`), so a
    training step never moves it and never pays for its backward pass; its parameters
    stay whatever the caller put there (the DINO teacher's backbone, or an adapted one).
    """

    extractor: ViT
    task: TaskHead

    def __call__(self, x: Array, norm_mode: str = "running", stats_mask=None,
                 train: bool = False) -> tuple[Array, Array]:
        """Args: x (B, H, W, C) images; norm_mode, stats_mask: accepted, unused (no BN).

        Returns: (logits (B, K), task CLS features (B, embed_dim)).
        """
        del norm_mode, stats_mask, train
        feats = jax.lax.stop_gradient(tokens(self.extractor(x)))
        return self.task(feats)


class ViTClassifier(nn.Module):
    """A ViT whose CLS feeds a linear classifier (params {"backbone", "fc"}), all trained."""

    backbone: ViT
    num_classes: int

    @nn.compact
    def __call__(self, x: Array, norm_mode: str = "running", stats_mask=None,
                 train: bool = False) -> tuple[Array, Array]:
        """Args: x (B, H, W, C); norm_mode, stats_mask: accepted, unused (no BN).

        Returns: (logits (B, K), CLS features (B, D)).
        """
        del norm_mode, stats_mask
        cls = self.backbone(x, train=train)["cls"]
        return nn.Dense(self.num_classes, kernel_init=trunc_normal, name="fc")(cls), cls
