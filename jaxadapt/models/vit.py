"""Vision Transformer (ViT / DeiT-S) for C-channel NHWC images, and the DINO head.

Written for jaxadapt after the semantics of facebookresearch/dino `vision_transformer.py`
(itself after timm): a conv patch embedding (stride = patch size), a CLS token, a learned
positional embedding interpolated bicubically for other input sizes, pre-norm blocks
(LayerNorm eps 1e-6, qkv with bias, exact GELU), a final LayerNorm; and DINO's head (MLP ->
L2-normalize -> weight-normalized last layer with g = 1 frozen) and multi-crop wrapper.

Layouts for imported torch weights: the patch conv OIHW -> HWIO, linear (out, in) ->
(in, out); the qkv output units keep torch's (3, heads, head_dim) order, so the kernel maps
one to one. The last layer's torch ``weight_v`` (out, in) is our ("last_layer", "kernel")
transposed; torch's ``weight_g`` (all ones, frozen) has no counterpart.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.models.pos_embed import bicubic_matrix, interpolate_pos_embed

__all__ = [
    "VIT_SIZES", "Attention", "Block", "DINOHead", "DINOModel", "Mlp", "ViT",
    "WeightNormDense", "bicubic_matrix", "check_vit_config", "crop_groups",
    "interpolate_pos_embed", "l2_normalize", "vit",
]

Array = jax.Array

# DINO's trunc_normal_(std=.02) truncates at +-2 *absolute* (= +-100 std): in effect a
# plain normal with std .02; flax's `lower`/`upper` are in units of std.
trunc_normal = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
# torch's default Linear/Conv init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)).
_torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_LN_EPS = 1e-6
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default


def _torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)


def layer_norm(x: Array, name: str) -> Array:
    """LayerNorm (eps 1e-6) in float32 whatever the compute dtype, as torch autocast does.

    use_fast_variance=False: E[x^2]-E[x]^2 is badly wrong for large-mean float32 inputs.
    Must be called inside a compact method (it creates the submodule `name`).
    """
    return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=jnp.float32,
                        name=name)(x.astype(jnp.float32))


def check_vit_config(img_size: int, patch_size: int, *crop_sizes: int,
                     **named_sizes: int) -> None:
    """Config-time check that the patch size divides the model's size and every crop size.

    (A crop larger than the image is the views helper's check, not this one.)

    Args:
      img_size: the size of the positional-embedding grid in pixels (`ViT.img_size`).
      patch_size: `ViT.patch_size`.
      *crop_sizes: square crop sizes the model will see (named "crop size" in errors).
      **named_sizes: the same, named by their config key in errors, e.g.
        ``**{"dino.local_size": 96}``.

    Raises:
      ValueError: naming the size, the patch size and the fix.
    """
    if not (isinstance(patch_size, (int, np.integer)) and patch_size >= 1):
        raise ValueError(f"patch_size={patch_size!r}: use an integer >= 1")
    sizes = ([("img_size", img_size)] + [("crop size", s) for s in crop_sizes]
             + list(named_sizes.items()))
    for what, size in sizes:
        if not (isinstance(size, (int, np.integer)) and size >= 1):
            raise ValueError(f"{what}={size!r}: use an integer >= 1")
        if size % patch_size:
            lo, hi = size // patch_size * patch_size, -(-size // patch_size) * patch_size
            raise ValueError(
                f"{what}={size} is not divisible by patch_size={patch_size}; use a "
                f"{what} that is a multiple of {patch_size} (e.g. {lo or hi} or {hi}) or a "
                f"patch size that divides {size}")


def _attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """softmax(q k^T * scale) v over (B, N, heads, hd); logits and softmax in float32.

    (What jax.nn.dot_product_attention's XLA path computes, but it also runs under
    jax_numpy_dtype_promotion="strict" with bfloat16 inputs, which that one does not.)
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * jnp.float32(scale), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection (bias) and an output projection."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    # None: `_attention` (einsums); "xla" | "cudnn": jax.nn.dot_product_attention's.
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x (B, N, D). Returns: (B, N, D)."""
        b, n, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"embed_dim={d} is not divisible by num_heads={self.num_heads}; "
                             f"choose num_heads dividing embed_dim")
        hd = d // self.num_heads

        def dense(f: int, name: str) -> nn.Dense:
            return nn.Dense(f, dtype=self.dtype, kernel_init=trunc_normal, name=name)

        qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.implementation is None:
            y = _attention(q, k, v, hd ** -0.5)
        else:
            y = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5,
                                             implementation=self.implementation)
        return dense(d, "proj")(y.reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (torch.nn.GELU is exact; jax.nn.gelu defaults to tanh)."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x (..., D). Returns: (..., D)."""
        d = x.shape[-1]
        y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=trunc_normal, name="fc1")(x)
        y = jax.nn.gelu(y, approximate=False)
        return nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (exact GELU)."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attn_implementation: str | None = None

    def _drop_path(self, y: Array, train: bool) -> Array:
        # Stochastic depth per sample, as DINO's drop_path (scaled by 1 / keep).
        if not train or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1))
        return y * (mask.astype(y.dtype) / jnp.asarray(keep, y.dtype))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Args: x (B, N, D); train: applies drop path (needs a "dropout" rng). Returns: x."""
        d = x.shape[-1]
        y = layer_norm(x, "norm1").astype(self.dtype)
        y = Attention(self.num_heads, self.dtype, self.attn_implementation, name="attn")(y)
        x = x + self._drop_path(y.astype(x.dtype), train)
        y = layer_norm(x, "norm2").astype(self.dtype)
        y = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(y)
        return x + self._drop_path(y.astype(x.dtype), train)


class ViT(nn.Module):
    """Vision Transformer for (B, H, W, C) images with any channel count C.

    Attributes:
      patch_size: side of the square patches (the conv's kernel and stride).
      embed_dim, depth, num_heads, mlp_ratio: the transformer's size (DeiT-S: 384, 12, 6, 4).
      img_size: the image side the positional embedding's grid is made for
        (img_size // patch_size per side); other sizes interpolate it.
      dtype: dtype of the matmuls and attention; parameters, the residual stream, the
        LayerNorms and the returned tokens stay float32 (as torch autocast).
      drop_path_rate: stochastic depth, linear from 0 to this over the blocks (DINO's
        student uses 0.1); active only with ``train=True`` and a "dropout" rng.
      attn_implementation: None (plain einsums) or `jax.nn.dot_product_attention`'s
        implementation ("xla", "cudnn": fused attention on recent NVIDIA GPUs).
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    img_size: int = 224
    dtype: jnp.dtype = jnp.float32
    drop_path_rate: float = 0.0
    attn_implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> dict[str, Array]:
        """Embed patches, add CLS and positions, run the blocks, apply the final LayerNorm.

        Args:
          x: (B, H, W, C) images; H and W multiples of `patch_size`.
          train: drop path on (when `drop_path_rate` > 0).

        Returns:
          {"cls": (B, D), "patches": (B, H/p * W/p, D)}, float32 tokens after the final
          LayerNorm.
        """
        p, d = self.patch_size, self.embed_dim
        check_vit_config(self.img_size, p)
        if x.ndim != 4:
            raise ValueError(f"ViT input has shape {x.shape}; expected (B, H, W, C) images")
        b, h, w, c = x.shape
        if h % p or w % p:
            bad = h if h % p else w
            raise ValueError(
                f"input size {h}x{w} is not divisible by patch_size={p}; crop or resize the "
                f"images to a multiple of {p} (e.g. {bad // p * p or p}), or use a patch size "
                f"that divides {bad}")
        fan_in = p * p * c
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=_torch_default_kernel, bias_init=_torch_default_bias(fan_in),
                    name="patch_embed")(x.astype(self.dtype))
        # The residual stream stays float32 (as under torch autocast); the matmuls and
        # attention run in `dtype`.
        x = x.reshape(b, (h // p) * (w // p), d).astype(jnp.float32)
        cls = self.param("cls_token", trunc_normal, (1, 1, d))
        g = self.img_size // p
        pos = self.param("pos_embed", trunc_normal, (1, 1 + g * g, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + interpolate_pos_embed(pos, (h // p, w // p), g).astype(x.dtype)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype,
                      self.attn_implementation, name=f"block{i}")(x, train)
        x = layer_norm(x, "norm")
        return {"cls": x[:, 0], "patches": x[:, 1:]}


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """x / max(||x||, 1e-12), as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, jnp.asarray(_NORMALIZE_EPS, x.dtype))


class WeightNormDense(nn.Module):
    """Linear layer without bias, weight-normalized: x @ (g * V / ||V||), g = 1 frozen by default.

    Each output column of the (in, out) kernel V is divided by its norm (torch's
    weight_norm over dim 0 of its (out, in) weight); no eps, as torch: a zero column is a
    bug worth a NaN. V keeps torch's default Linear init, as in the reference where the
    last layer is created after the MLP's trunc-normal init. With ``learn_scale`` the
    per-column g is a parameter ("scale"), initialized as torch's weight_norm does, to
    the columns' initial norms (DINO's ``norm_last_layer=False``).
    """

    features: int
    learn_scale: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x (..., in). Returns: (..., features) in float32."""
        v = self.param("kernel", _torch_default_kernel, (x.shape[-1], self.features),
                       jnp.float32)
        # x @ (V / ||V||) computed as (x @ V) / ||V|| (the same per output column): the
        # normalized (in, out) matrix is never formed. Formed, its gradient made XLA:CPU
        # fuse the column-norm reduction into a (in, out)-sized loop and recompute it per
        # element (in x more work: 11 s of a 12 s CPU step at out_dim 65536).
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0, keepdims=True))
        out = jnp.dot(x.astype(jnp.float32), v) / norm
        if self.learn_scale:
            g = self.param("scale", lambda _, shape: jnp.reshape(norm, shape), (self.features,))
            out = out * g
        return out


class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU) -> L2-normalize -> weight-normalized linear.

    The last layer is weight-normalized with g = 1 frozen (DINO's norm_last_layer=True):
    output = x @ (V / ||V||), each output column of V normalized, no bias. V is the only
    parameter at ("last_layer", "kernel"); there is no g parameter to train. With
    ``norm_last_layer=False`` (what DINO's authors use for ViT-S) g is learned, at
    ("last_layer", "scale"), frozen with V during the first epoch.

    Attributes:
      out_dim: output units (DINO: 65536; CODA: 4096).
      hidden_dim, bottleneck_dim, nlayers: MLP sizes (nlayers Linear layers; 1 = one
        Linear straight to the bottleneck).
      dtype: computation dtype of the MLP; normalization and the last layer run in float32.
      norm_last_layer: True freezes g = 1; False learns it.
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    dtype: jnp.dtype = jnp.float32
    norm_last_layer: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Args: x (B, D) features. Returns: (B, out_dim) float32 outputs (logits)."""
        if self.nlayers < 1:
            raise ValueError(f"DINOHead.nlayers={self.nlayers}; use nlayers >= 1")
        widths = [self.hidden_dim] * (self.nlayers - 1) + [self.bottleneck_dim]
        for i, f in enumerate(widths):
            x = nn.Dense(f, dtype=self.dtype, kernel_init=trunc_normal, name=f"mlp{i}")(x)
            if i < len(widths) - 1:
                x = jax.nn.gelu(x, approximate=False)
        x = l2_normalize(x.astype(jnp.float32))
        return WeightNormDense(self.out_dim, learn_scale=not self.norm_last_layer,
                               name="last_layer")(x)


def crop_groups(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive crops with the same spatial size (DINO's grouping).

    Args:
      shapes: each crop's (B, h, w, C) shape.

    Returns:
      The runs in order, e.g. 2 globals then 6 locals -> [(0, 2), (2, 8)].
    """
    runs: list[tuple[int, int]] = []
    for i, s in enumerate(shapes):
        if runs and tuple(shapes[runs[-1][0]][1:3]) == tuple(s[1:3]):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class DINOModel(nn.Module):
    """DINO's multi-crop wrapper: backbone per run of equal-size crops, head on all CLS.

    Params are {"backbone": ..., "head": ...}; the head's last layer sits at
    ("head", "last_layer", "kernel").
    """

    backbone: ViT
    head: DINOHead

    def __call__(self, crops: Sequence[Array] | Array, *, train: bool = False) -> Array:
        """Args: crops: a list of (B, h, w, C) crops (or one array); train: as `ViT`.

        Returns:
          (len(crops) * B, out_dim) head outputs, crop-major (crop 0's B rows first).
        """
        crops = [crops] if not isinstance(crops, (list, tuple)) else list(crops)
        if not crops:
            raise ValueError("DINOModel got no crops; pass a list of (B, h, w, C) arrays")
        batch = {c.shape[0] for c in crops}
        if len(batch) != 1:
            raise ValueError(f"crops have batch sizes {sorted(batch)}; every crop needs the "
                             f"same batch size B")
        feats = [self.backbone(jnp.concatenate(crops[s:e], axis=0), train=train)["cls"]
                 for s, e in crop_groups([c.shape for c in crops])]
        return self.head(jnp.concatenate(feats, axis=0))

    def features(self, x: Array) -> Array:
        """The backbone's CLS features. Args: x (B, H, W, C). Returns: (B, embed_dim)."""
        return self.backbone(x, train=False)["cls"]


#: Named sizes: "vit_tiny" and "vit_small" as DINO's ViT-Ti/16 and ViT-S/16 (= DeiT-S);
#: "vit_cpu" a small patch-8 model for 48 px CPU runs and tests.
VIT_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, img_size=224),
    "vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, img_size=224),
    "vit_cpu": dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, img_size=48),
}


def vit(name: str, **overrides) -> ViT:
    """A `ViT` of a named size (see `VIT_SIZES`), fields overridable.

    Args:
      name: a key of `VIT_SIZES`.
      **overrides: `ViT` fields replacing the named size's (e.g. patch_size, img_size).

    Returns:
      The module (not initialized).
    """
    if name not in VIT_SIZES:
        raise ValueError(f"ViT size {name!r} is unknown; use one of {sorted(VIT_SIZES)}")
    return ViT(**{**VIT_SIZES[name], **overrides})
