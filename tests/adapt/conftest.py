"""Shared fixtures of the adaptation tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.models.resnet import BasicBlock, ResNet

# rbg keys: model init compiles several times faster on CPU than with threefry.
KEY = jax.random.key(0, impl="rbg")


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
