"""Masked autoencoder (MAE, He et al. 2022) for C-channel NHWC images, built on `vit.Block`.

Written for jaxadapt after the semantics of facebookresearch/mae `models_mae.py` and
`util/pos_embed.py` (and the TTT-MAE fork, which uses the same model):

- Encoder: conv patch embedding (stride = patch) -> + fixed 2-D sin-cos positions ->
  random masking (per image: argsort of uniform noise, keep the first
  ``int(N * (1 - mask_ratio))``) -> prepend CLS (+ its position, all zeros) -> pre-norm
  blocks -> LayerNorm. Unmasked (`MAEEncoder.__call__`) it returns ``{"cls", "patches"}``
  exactly as `jaxadapt.models.vit.ViT` does, so a task head built for ViT tokens runs on it.
- Decoder: Linear to the decoder width -> append mask tokens, unshuffle with
  ``ids_restore`` -> + fixed sin-cos positions -> blocks -> LayerNorm -> Linear to
  ``p * p * C`` per patch (the element order of `jaxadapt.methods.coda.mae.patchify`); CLS dropped.

Parameters: ``{"encoder": {...}, "mask_token": (1, 1, Dd), "decoder": {...}}``; the encoder
subtree has the ViT names (``patch_embed``, ``cls_token``, ``block{i}``, ``norm``) but no
``pos_embed`` (the sin-cos table is a constant, as the reference's frozen buffer).
`init_mae_params` re-initializes as the reference (xavier-uniform Linear and patch
kernels, zero biases); the plain Flax init keeps `vit.Block`'s trunc-normal kernels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.models.vit import Block, check_vit_config

__all__ = ["MAE", "MAEDecoder", "MAEEncoder", "MAE_SIZES", "init_mae_params", "mae",
           "mask_noise", "random_masking", "sincos_pos_embed_2d"]

Array = jax.Array
_LN_EPS = 1e-6
_normal02 = nn.initializers.normal(0.02)  # MAE: cls and mask tokens ~ N(0, 0.02)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """MAE's fixed 2-D sine-cosine positional embedding, computed in float64.

    For patch (row r, column c) in row-major order the vector is
    ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_k = 10000 ** (-k / (dim / 4))``,
    k = 0 .. dim/4 - 1: the first half encodes the column, the second the row (the
    reference's meshgrid puts w first). With ``cls_token`` a zero row is prepended.

    Args:
      dim: embedding width, a multiple of 4.
      grid_h, grid_w: patch rows and columns.
      cls_token: prepend the CLS row of zeros.

    Returns:
      (1 + grid_h * grid_w, dim) or (grid_h * grid_w, dim) float64 array.

    Raises:
      ValueError: dim not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding: dim={dim} is not a multiple of 4; "
                         f"use an embed/decoder width divisible by 4")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                             np.arange(grid_w, dtype=np.float64), indexing="ij")

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(cols), one_d(rows)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0) if cls_token else emb


def mask_noise(key: Array, batch: int, n: int) -> Array:
    """The uniform noise MAE's masking sorts: (batch, n) draws in [0, 1).

    Args:
      key: PRNG key; batch: images; n: patches per image.

    Returns:
      (batch, n) float32.
    """
    return jax.random.uniform(key, (batch, n))


def random_masking(noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
    """MAE's per-image random masking: argsort of uniform noise, small noise is kept.

    The noise is an argument (not drawn here) so that a caller can give every image its
    own key (e.g. ``fold_in(key, global image index)``): then masks do not depend on how
    a batch is split over devices.

    Args:
      noise: (B, N) noise, e.g. `mask_noise`.
      mask_ratio: fraction removed, in (0, 1); ``len_keep = int(N * (1 - mask_ratio))``
        (the reference's floor), at least 1.

    Returns:
      ids_keep (B, len_keep) int32: the kept patches, in shuffled order;
      mask (B, N) float32: 1 = removed, 0 = kept, in the original patch order;
      ids_restore (B, N) int32: the inverse permutation of the shuffle.

    Raises:
      ValueError: mask_ratio outside (0, 1) or keeping no patch.
    """
    n = noise.shape[1]
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} is outside (0, 1); use a fraction of "
                         f"patches to remove such as 0.75 (MAE's)")
    len_keep = int(n * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio!r} keeps no patch of {n}; use a smaller "
                         f"mask_ratio (at most {1 - 1 / n:.4g}) or smaller patches")
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return ids_shuffle[:, :len_keep], mask, ids_restore


def layer_norm(x: Array, name: str) -> Array:
    # As vit's: eps 1e-6, exact variance (use_fast_variance=False), float32.
    return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=jnp.float32,
                        name=name)(x.astype(jnp.float32))


def _check_input(x: Array, p: int) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"MAE input has shape {x.shape}; expected (B, H, W, C) images")
    h, w = x.shape[1:3]
    if h % p or w % p:
        bad = h if h % p else w
        raise ValueError(
            f"image size {h}x{w} is not divisible by patch_size={p}; crop or resize the "
            f"images to a multiple of {p} (e.g. {bad // p * p or p}) or use a patch size "
            f"that divides {bad}")
    return h // p, w // p


class MAEEncoder(nn.Module):
    """The MAE encoder: a ViT with fixed sin-cos positions and optional random masking.

    Attributes: patch_size, embed_dim, depth, num_heads, mlp_ratio, dtype as `vit.ViT`.
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def _tokens(self, x: Array, ids_keep: Array | None) -> Array:
        p, d = self.patch_size, self.embed_dim
        gh, gw = _check_input(x, p)
        b = x.shape[0]
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(x.astype(self.dtype))
        x = x.reshape(b, gh * gw, d).astype(jnp.float32)
        pos = jnp.asarray(sincos_pos_embed_2d(d, gh, gw), jnp.float32)
        x = x + pos[None, 1:]
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
        cls = self.param("cls_token", _normal02, (1, 1, d)) + pos[None, :1]
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, 0.0, self.dtype, name=f"block{i}")(x)
        return layer_norm(x, "norm")

    def __call__(self, x: Array) -> dict[str, Array]:
        """Unmasked forward, as `vit.ViT.__call__`.

        Args:
          x: (B, H, W, C) images, H and W multiples of `patch_size`.

        Returns:
          {"cls": (B, D), "patches": (B, H/p * W/p, D)} after the final LayerNorm.
        """
        t = self._tokens(x, None)
        return {"cls": t[:, 0], "patches": t[:, 1:]}

    def masked(self, x: Array, noise: Array, mask_ratio: float
               ) -> tuple[Array, Array, Array]:
        """Masked forward (pre-training and test-time training).

        Args:
          x: (B, H, W, C) images; noise: (B, N) masking noise (`mask_noise`);
          mask_ratio: fraction removed.

        Returns:
          latent (B, 1 + len_keep, D) (CLS first), mask (B, N), ids_restore (B, N).
        """
        gh, gw = _check_input(x, self.patch_size)
        if noise.shape != (x.shape[0], gh * gw):
            raise ValueError(f"masking noise has shape {noise.shape}; expected (B, N) = "
                             f"{(x.shape[0], gh * gw)} (one value per patch of each image)")
        ids_keep, mask, ids_restore = random_masking(noise, mask_ratio)
        return self._tokens(x, ids_keep), mask, ids_restore


class MAEDecoder(nn.Module):
    """The MAE decoder: tokens (+ mask tokens, unshuffled) -> per-patch pixel predictions.

    Attributes:
      patch_size, in_channels: the prediction is ``patch_size**2 * in_channels`` wide.
      embed_dim, depth, num_heads, mlp_ratio, dtype: the decoder transformer.
      grid: (rows, cols) of the patch grid.
    """

    patch_size: int
    in_channels: int
    grid: tuple[int, int]
    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, latent: Array, ids_restore: Array, mask_token: Array) -> Array:
        """Args: latent (B, 1 + K, De) from `MAEEncoder.masked`; ids_restore (B, N);
        mask_token (1, 1, D). Returns: (B, N, p * p * C) predictions."""
        d = self.embed_dim
        x = nn.Dense(d, dtype=self.dtype, name="embed")(latent).astype(jnp.float32)
        b, n = ids_restore.shape
        fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n + 1 - x.shape[1], d))
        x_ = jnp.concatenate([x[:, 1:], fill], axis=1)
        x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)  # unshuffle
        pos = jnp.asarray(sincos_pos_embed_2d(d, *self.grid), jnp.float32)
        x = jnp.concatenate([x[:, :1], x_], axis=1) + pos[None]
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, 0.0, self.dtype, name=f"block{i}")(x)
        x = layer_norm(x, "norm")
        out = self.patch_size ** 2 * self.in_channels
        return nn.Dense(out, dtype=self.dtype, name="pred")(x)[:, 1:].astype(jnp.float32)


class MAE(nn.Module):
    """Masked autoencoder; params {"encoder", "mask_token", "decoder"}.

    Attributes:
      img_size: image side the decoder's position grid is made for (square images).
      in_channels: C (the prediction width is patch_size**2 * C).
      patch_size, embed_dim, depth, num_heads: the encoder.
      decoder_dim, decoder_depth, decoder_heads: the decoder.
      mlp_ratio, dtype: shared.
    """

    img_size: int = 224
    in_channels: int = 5
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.nowrap
    def encoder_def(self) -> MAEEncoder:
        """The encoder module (unbound): ``encoder_def().apply({"params": p["encoder"]}, x)``
        gives the ViT-style tokens. Returns: `MAEEncoder`."""
        return MAEEncoder(self.patch_size, self.embed_dim, self.depth, self.num_heads,
                          self.mlp_ratio, self.dtype)

    def setup(self) -> None:
        check_vit_config(self.img_size, self.patch_size)
        g = self.img_size // self.patch_size
        self.encoder = self.encoder_def()
        self.mask_token = self.param("mask_token", _normal02, (1, 1, self.decoder_dim))
        self.decoder = MAEDecoder(self.patch_size, self.in_channels, (g, g), self.decoder_dim,
                                  self.decoder_depth, self.decoder_heads, self.mlp_ratio,
                                  self.dtype)

    def __call__(self, x: Array, noise: Array, mask_ratio: float = 0.75
                 ) -> tuple[Array, Array]:
        """Mask, encode, decode.

        Args:
          x: (B, img_size, img_size, C) images; noise: (B, N) masking noise
            (`mask_noise`); mask_ratio: in (0, 1).

        Returns:
          pred (B, N, p * p * C) and mask (B, N) (1 = removed).
        """
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"MAE input size {x.shape[1]}x{x.shape[2]} differs from "
                             f"img_size={self.img_size}; resize or crop to {self.img_size} "
                             f"or build the MAE with img_size={x.shape[1]}")
        if x.shape[3] != self.in_channels:
            raise ValueError(f"MAE input has {x.shape[3]} channels but in_channels="
                             f"{self.in_channels}; build the MAE with in_channels={x.shape[3]}")
        latent, mask, ids_restore = self.encoder.masked(x, noise, mask_ratio)
        return self.decoder(latent, ids_restore, self.mask_token), mask

    def tokens(self, x: Array) -> dict[str, Array]:
        """The unmasked encoder tokens, as `vit.ViT.__call__`. Args: x (B, H, W, C).
        Returns: {"cls": (B, D), "patches": (B, N, D)}."""
        return self.encoder(x)


def _xavier_uniform(key: Array, fan_in: int, fan_out: int, shape: tuple[int, ...]) -> Array:
    bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_mae_params(model: MAE, key: Array) -> Any:
    """Initialize as the reference: xavier-uniform Linear kernels and patch kernel (seen as
    (p*p*C, D)), zero biases, LayerNorm 1/0, CLS and mask tokens N(0, 0.02).

    Args:
      model: the `MAE`; key: PRNG key.

    Returns:
      The params pytree.
    """
    k_init, k_x = jax.random.split(key)
    x = jnp.zeros((1, model.img_size, model.img_size, model.in_channels), jnp.float32)
    n = (model.img_size // model.patch_size) ** 2
    params = model.init(k_init, x, mask_noise(k_init, 1, n))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(k_x, len(leaves))
    out = []
    for k, (path, v) in zip(keys, leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_out = v.shape[-1]
            out.append(_xavier_uniform(k, int(np.prod(v.shape[:-1])), fan_out, v.shape))
        elif name == "bias":
            out.append(jnp.zeros_like(v))
        else:
            out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


#: Named sizes: "mae_small" as TTT-MAE's mae_vit_small_patch16 (patch 16, ViT-S encoder,
#: 12 heads of 32 as the reference, where DeiT-S has 6 of 64; decoder 512 x 8); "mae_cpu" a
#: patch-8 model for 48 px CPU runs and tests.
MAE_SIZES: dict[str, dict[str, int]] = {
    "mae_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, img_size=224,
                      decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "mae_cpu": dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, img_size=48,
                    decoder_dim=32, decoder_depth=1, decoder_heads=4),
}


def mae(name: str, **overrides) -> MAE:
    """An `MAE` of a named size (see `MAE_SIZES`), fields overridable.

    Args:
      name: a key of `MAE_SIZES`; **overrides: `MAE` fields (e.g. in_channels, img_size).

    Returns:
      The module (not initialized).
    """
    if name not in MAE_SIZES:
        raise ValueError(f"MAE size {name!r} is unknown; use one of {sorted(MAE_SIZES)}")
    return MAE(**{**MAE_SIZES[name], **overrides})
