"""ResNet shapes, input checks, stems, zero-init residuals and build_model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxadapt.models import build_model
from jaxadapt.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50

# XLA:CPU compiles threefry-based initializers ~7x slower than the "rbg" generator.
KEY = jax.random.key(0, impl="rbg")


def _shapes(model, x_shape, **kw):
    """Output and stage shapes without compiling (eval_shape)."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)

    def run(x):
        v = model.init(jax.random.key(0), x, norm_mode="running")
        return model.apply(v, x, capture_intermediates=True, mutable=["intermediates"], **kw), v

    ((logits, feats), inter), v = jax.eval_shape(run, x)
    return logits.shape, feats.shape, inter["intermediates"], v


@pytest.mark.parametrize("ctor,expansion", [(resnet18, 1), (resnet50, 4)])
def test_shapes_small_stem_48px(ctor, expansion):
    m = ctor(width=8, stem="small", num_classes=7, in_channels=5)
    lg, ft, inter, v = _shapes(m, (2, 48, 48, 5), norm_mode="batch")
    assert lg == (2, 7) and ft == (2, 8 * 8 * expansion)
    last = "stage4_block2" if expansion == 1 else "stage4_block3"
    assert inter[last]["__call__"][0].shape == (2, 3, 3, 64 * expansion)  # 48 px -> 3x3
    assert set(v) == {"params", "batch_stats"}


def test_shapes_imagenet_stem():
    m = resnet18(width=8, stem="imagenet", num_classes=3, in_channels=3)
    lg, ft, inter, _ = _shapes(m, (1, 64, 64, 3))
    assert lg == (1, 3) and ft == (1, 64)
    assert inter["stage1_block1"]["__call__"][0].shape == (1, 16, 16, 8)  # /2 conv, /2 pool
    assert inter["stage4_block2"]["__call__"][0].shape == (1, 2, 2, 64)


def test_channel_check_names_got_expected_and_fix():
    m = resnet18(width=8, stem="small", num_classes=3, in_channels=5)
    with pytest.raises(ValueError, match=r"4 channels.*in_channels=5.*model.in_channels=4"):
        m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="stem='tiny'"):
        resnet18(width=8, stem="tiny", num_classes=3).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 5)))


def _tiny(**kw):
    return ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=4, stem="small",
                  num_classes=3, in_channels=2, **kw)


def test_zero_init_residual_option():
    x = jnp.zeros((1, 16, 16, 2))
    p = jax.jit(lambda k: _tiny().init(k, x))(KEY)["params"]
    assert np.all(np.asarray(p["stage2_block1"]["bn2"]["scale"]) == 0)
    assert np.all(np.asarray(p["stage2_block1"]["proj_bn"]["scale"]) == 1)
    p1 = jax.jit(lambda k: _tiny(zero_init_residual=False).init(k, x))(KEY)
    assert np.all(np.asarray(p1["params"]["stage1_block1"]["bn2"]["scale"]) == 1)


def test_batch_mode_rows_outside_stats_mask_do_not_shape_the_others():
    m = _tiny(zero_init_residual=False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 2)), jnp.float32)
    v = jax.jit(lambda k: m.init(k, x))(KEY)
    f = jax.jit(lambda x, s: m.apply(v, x, norm_mode="batch", stats_mask=s))
    s = jnp.asarray([1, 1, 1, 0], bool)
    x2 = x.at[3].set(100.0)
    (l1, f1), (l2, f2) = f(x, s), f(x2, s)
    np.testing.assert_allclose(l1[:3], l2[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f1[:3], f2[:3], rtol=1e-5, atol=1e-6)
    all_rows = f(x2, jnp.ones(4, bool))[0]
    assert not np.allclose(all_rows[:3], l1[:3], atol=1e-4)
    # Running mode: each row on its own.
    r = jax.jit(lambda x: m.apply(v, x)[0])
    np.testing.assert_allclose(r(x)[:3], r(x2)[:3], rtol=1e-6)


def test_build_model_from_config():
    cfg = ml_collections.ConfigDict(dict(name="resnet50", width=8, stem="small",
                                         num_classes=8, in_channels=5))
    m = build_model(cfg)
    assert isinstance(m, ResNet) and m.block_cls is Bottleneck and m.width == 8
    assert build_model(ml_collections.ConfigDict({"model": cfg})).num_classes == 8
    cfg.name = "vgg"
    with pytest.raises(ValueError, match="model.name='vgg'.*resnet18"):
        build_model(cfg)
