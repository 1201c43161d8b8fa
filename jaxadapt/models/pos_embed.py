"""DINO's positional-embedding interpolation with torch's bicubic semantics.

Written for jaxadapt after facebookresearch/dino `interpolate_pos_encoding` and the
documented behaviour of `torch.nn.functional.interpolate(mode="bicubic")`; separable, as a
pair of (out, in) matrices built in NumPy at trace time (the grids are static).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def bicubic_matrix(n_in: int, n_out: int, scale_factor: float) -> np.ndarray:
    """The (n_out, n_in) matrix of torch's 1-D bicubic resampling (align_corners=False).

    Restates `torch.nn.functional.interpolate(mode="bicubic", scale_factor=s)`: source
    coordinate (o + 0.5) / s - 0.5 (the given scale factor, not n_in / n_out), Keys cubic
    with A = -0.75, the four taps clamped to the border (edge replication), no antialias.

    Args:
      n_in: input length; n_out: output length; scale_factor: torch's ``scale_factor``.

    Returns:
      float64 weights; row o holds the weights of output o over the inputs.
    """
    a = -0.75
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) / scale_factor - 0.5
        i0 = math.floor(src)
        t = src - i0
        near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
        far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
        for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[o, min(max(i0 - 1 + k, 0), n_in - 1)] += w
    return m


def interpolate_pos_embed(pos_embed: Array, grid: tuple[int, int], src_grid: int) -> Array:
    """DINO's interpolate_pos_encoding: resize the patch part of a positional embedding.

    As the reference, the patch grid is resized bicubically with torch's semantics and the
    scale factor (grid + 0.1) / src_grid (DINO's trick so that floor(src * scale) == grid);
    the CLS entry is kept. `jax.image.resize(method="cubic")` would differ: Keys A = -0.5
    instead of -0.75, antialiasing when shrinking (local crops shrink), edge weights
    renormalized instead of clamped taps, and the scale n_in / n_out without the +0.1.

    Args:
      pos_embed: (1, 1 + src_grid**2, D), CLS first, patches row-major.
      grid: the (rows, cols) patch grid of the input.
      src_grid: the side of the stored square grid.

    Returns:
      (1, 1 + rows * cols, D); `pos_embed` itself when grid == (src_grid, src_grid)
      (as the reference: with the +0.1 scale, resampling would not be the identity).
      The weights are float64 cast to float32, so equal to torch's float32 computation
      up to float32 rounding.
    """
    gh, gw = grid
    if (gh, gw) == (src_grid, src_grid):
        return pos_embed
    d = pos_embed.shape[-1]
    patches = pos_embed[0, 1:].reshape(src_grid, src_grid, d).astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(src_grid, gh, (gh + 0.1) / src_grid), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(src_grid, gw, (gw + 0.1) / src_grid), jnp.float32)
    out = jnp.einsum("ai,bj,ijd->abd", mh, mw, patches, precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(1, gh * gw, d).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], out], axis=1)
