"""Shared fixtures of the adaptation tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.models.norm import BatchNorm
from jaxadapt.models.resnet import BasicBlock, ResNet

# rbg keys: model init compiles several times faster on CPU than with threefry.
KEY = jax.random.key(0, impl="rbg")
#: The one-stage width-4 ResNet of the episodic (ARM-BN, CS-ARM-BN, BEN) step tests, S px.
S = 16
EPISODE_MODEL = ResNet(stage_sizes=(1,), block_cls=BasicBlock, width=4, stem="small",
                       num_classes=3, in_channels=5, zero_init_residual=False)


@pytest.fixture(scope="module")
def tiny():
    """A 2-stage width-4 ResNet on 2-channel 32 px input, with non-trivial variables."""
    model = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=4, stem="small",
                   num_classes=3, in_channels=2, zero_init_residual=False)
    v = model.init(KEY, jnp.zeros((1, 32, 32, 2)), norm_mode="running")
    # Non-trivial affine parameters and running statistics (shift != data mean).
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda a: jnp.asarray(a + 0.3 * rng.normal(size=a.shape), a.dtype), v)
    v["batch_stats"] = jax.tree.map(jnp.abs, v["batch_stats"])
    return model, v


class TwoLayer(nn.Module):
    """Per-pixel dense -> BN -> relu -> dense -> BN -> mean pool: small enough to restate."""

    @nn.compact
    def __call__(self, x, *, norm_mode="running", stats_mask=None):
        h = nn.relu(BatchNorm(name="bn1")(nn.Dense(3, name="d1")(x), mode=norm_mode,
                                          mask=stats_mask))
        h = BatchNorm(name="bn2")(nn.Dense(2, name="d2")(h), mode=norm_mode, mask=stats_mask)
        return h.mean((1, 2)), h


def two_layer_numpy(v, x, w, eps=1e-5):
    """NumPy float64 restatement of `TwoLayer` with BN statistics weighted per row by ``w``.

    Returns ({"bn1": (mean, var), "bn2": (mean, var)}, logits).
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)

    def bn(h, name):
        wr = np.broadcast_to(w[:, None, None, None], h.shape[:-1] + (1,))
        mean = (wr * h).sum((0, 1, 2)) / wr.sum()
        var = (wr * (h - mean) ** 2).sum((0, 1, 2)) / wr.sum()
        return (h - mean) / np.sqrt(var + eps) * p[name]["scale"] + p[name]["bias"], (mean, var)

    h, s1 = bn(x @ p["d1"]["kernel"] + p["d1"]["bias"], "bn1")
    h, s2 = bn(np.maximum(h, 0) @ p["d2"]["kernel"] + p["d2"]["bias"], "bn2")
    return {"bn1": s1, "bn2": s2}, h.mean((1, 2))


@pytest.fixture(scope="module")
def two_layer():
    model = TwoLayer()
    v = model.init(KEY, jnp.zeros((1, 2, 2, 2)), norm_mode="running")
    rng = np.random.default_rng(2)
    v = jax.tree.map(lambda a: jnp.asarray(a + 0.5 * rng.normal(size=a.shape), a.dtype), v)
    v["batch_stats"] = jax.tree.map(jnp.abs, v["batch_stats"])
    return model, v
