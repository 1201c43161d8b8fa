"""A tiny 5-channel MAE shared by the MAE and TTT-MAE tests (32 px, patch 8: 16 patches)."""

import jax
import numpy as np

from jaxadapt.models.mae import MAE, init_mae_params

TINY = MAE(img_size=32, in_channels=5, patch_size=8, embed_dim=32, depth=2, num_heads=4,
           decoder_dim=32, decoder_depth=1, decoder_heads=4)
N_PATCHES = 16


def params(seed: int = 0):
    """Reference-initialized params of `TINY`."""
    return init_mae_params(TINY, jax.random.PRNGKey(seed))


def images(n: int, seed: int = 1) -> np.ndarray:
    """(n, 32, 32, 5) float32 images with structure (smooth blobs + noise, per-image offset)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    out = np.empty((n, 32, 32, 5), np.float32)
    for i in range(n):
        for c in range(5):
            fx, fy, ph = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3)
            out[i, :, :, c] = (np.sin(2 * np.pi * fx * xx + ph) * np.cos(2 * np.pi * fy * yy)
                               + 0.3 * rng.standard_normal((32, 32)) + rng.uniform(-1, 1))
    return out
