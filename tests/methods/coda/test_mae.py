"""MAE objective (patchify, norm-pix targets, masked loss) against float64 NumPy
restatements of the reference, and the data-parallel pre-training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.methods.coda import mae_tiny

from jaxadapt.methods.coda.mae import (create_mae_state, image_noise, mae_loss, mae_lr_schedule,
                                       mae_targets, make_mae_optimizer, make_mae_step, patchify,
                                       unpatchify)
from jaxadapt.models.mae import MAE, init_mae_params, random_masking
from jaxadapt.train.parallel import make_data_mesh


def _ref_patchify(imgs_nhwc, p):
    """The reference's patchify on NCHW: (n,c,h,p,w,q) -> nhwpqc -> (n, h*w, p*p*c)."""
    x = np.transpose(imgs_nhwc, (0, 3, 1, 2))
    n, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    x = x.reshape(n, c, h, p, w, p)
    x = np.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def _ref_targets(imgs, p):
    t = _ref_patchify(imgs.astype(np.float64), p)
    mean = t.mean(-1, keepdims=True)
    var = t.var(-1, keepdims=True, ddof=1)  # torch .var default: unbiased
    return (t - mean) / (var + 1e-6) ** 0.5


def _ref_loss(pred, target, mask):
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("shape,p", [((3, 32, 32, 5), 8), ((2, 24, 16, 3), 4)])
def test_patchify_order_and_inverse(shape, p):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = np.asarray(patchify(jnp.asarray(x), p))
    np.testing.assert_array_equal(got, _ref_patchify(x, p))
    # element order inside a patch: (row, column, channel), channel fastest
    assert got[0, 0, 1] == x[0, 0, 0, 1] and got[0, 0, shape[3]] == x[0, 0, 1, 0]
    back = unpatchify(jnp.asarray(got), p, (shape[1] // p, shape[2] // p), shape[3])
    np.testing.assert_array_equal(back, x)


def test_targets_and_loss_match_float64_reference():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 32, 32, 5)) * 3 + 10).astype(np.float32)
    tgt = np.asarray(mae_targets(jnp.asarray(x), 8), np.float64)
    ref = _ref_targets(x, 8)
    np.testing.assert_allclose(tgt, ref, rtol=1e-5, atol=1e-5)
    # ddof matters: the biased variance would be off by sqrt(319/320) ~ 0.16 %
    biased = (ref * np.sqrt((320 - 1) / 320))
    assert np.abs(tgt - biased).max() > 1e-3
    np.testing.assert_allclose(np.asarray(mae_targets(jnp.asarray(x), 8, norm_pix=False)),
                               _ref_patchify(x, 8), rtol=0, atol=0)
    pred = rng.standard_normal(ref.shape).astype(np.float32)
    _, mask, _ = random_masking(jax.random.uniform(jax.random.PRNGKey(0), (4, 16)), 0.75)
    got = float(mae_loss(jnp.asarray(pred), jnp.asarray(tgt, jnp.float32), mask))
    want = _ref_loss(pred.astype(np.float64), ref, np.asarray(mask, np.float64))
    assert abs(got - want) <= 1e-6 * abs(want)
    # only removed patches count: changing a kept patch's prediction changes nothing
    kept = int(np.flatnonzero(np.asarray(mask[0]) == 0)[0])
    pred2 = pred.copy()
    pred2[0, kept] += 100.0
    assert float(mae_loss(jnp.asarray(pred2), jnp.asarray(tgt, jnp.float32), mask)) == got


def test_constant_patch_target_is_zero_not_nan():
    tgt = mae_targets(jnp.full((1, 16, 16, 2), 7.0), 8)
    assert np.isfinite(np.asarray(tgt)).all() and not np.asarray(tgt).any()


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="30x32 is not divisible by patch_size=8"):
        patchify(jnp.zeros((1, 30, 32, 5)), 8)
    with pytest.raises(ValueError, match="mae_loss"):
        mae_loss(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 3)), jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        make_mae_step(mae_tiny.TINY, make_mae_optimizer(8), mask_ratio=1.0)


def test_lr_schedule_and_optimizer_groups():
    sched = mae_lr_schedule(1.0, total_steps=10, warmup_steps=4, min_lr=0.1)
    ref = [s / 4 if s < 4 else 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - 4) / 6))
           for s in range(10)]
    np.testing.assert_allclose([float(sched(s)) for s in range(10)], ref, rtol=1e-6)
    # lr = blr * batch / 256; decay (0.05) on matrices and tokens, not biases / LayerNorm
    opt = make_mae_optimizer(512, blr=1.5e-4)
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2), "ln": {"scale": jnp.ones(2)},
              "cls_token": jnp.ones((1, 1, 2))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):
        upd, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(upd["w"], -3e-4 * 0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(upd["cls_token"], -3e-4 * 0.05 * np.ones((1, 1, 2)), rtol=1e-6)
    assert not np.asarray(upd["bias"]).any() and not np.asarray(upd["ln"]["scale"]).any()


def test_image_noise_is_per_image():
    key = jax.random.PRNGKey(4)
    a = image_noise(key, jnp.arange(8), 16)
    b = image_noise(key, jnp.arange(4, 8), 16)
    np.testing.assert_array_equal(a[4:], b)


def test_parallel_step_equals_single_device():
    """8 fake devices (shard_map, pcast, pmean of grads) == one device on the batch.

    Compared with plain SGD: Adam divides by sqrt(v), so on leaves whose gradient is
    exactly zero in exact arithmetic (the attention key bias) it turns float noise into
    full-size steps of either sign; the machinery under test is the same for any optax
    transformation."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    model = MAE(img_size=32, in_channels=5, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                decoder_dim=16, decoder_depth=1, decoder_heads=2)
    params = init_mae_params(model, jax.random.PRNGKey(0))
    opt = optax.sgd(0.5, momentum=0.9)
    images = jnp.asarray(mae_tiny.images(16))
    key = jax.random.PRNGKey(7)
    single = make_mae_step(model, opt)
    par = make_mae_step(model, opt, make_data_mesh())
    s1 = s8 = create_mae_state(params, opt)
    for _ in range(2):
        s1, m1 = single(s1, images, key)
        s8, m8 = par(s8, images, key)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    moved = 0.0
    for a, b, c in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params),
                       jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        moved = max(moved, float(jnp.abs(b - c).max()))
    assert moved > 1e-3 and int(s8.step) == 2
    with pytest.raises(ValueError, match="batch size 12 .* 8 devices"):
        par(create_mae_state(params, opt), images[:12], key)


def test_adamw_step_learns_and_freezes():
    """MAE's AdamW through the step: the reconstruction loss on a fixed batch goes down;
    with freeze=("decoder",) the decoder stays bit-identical while the encoder moves."""
    model = MAE(img_size=32, in_channels=5, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                decoder_dim=16, decoder_depth=1, decoder_heads=2)
    opt = make_mae_optimizer(16, blr=0.1)
    params = init_mae_params(model, jax.random.PRNGKey(0))
    images = jnp.asarray(mae_tiny.images(16))
    for freeze in ((), ("decoder",)):
        step = make_mae_step(model, opt, freeze=freeze)
        state = create_mae_state(params, opt, freeze=freeze)
        losses = []
        for t in range(8):
            state, m = step(state, images, jax.random.PRNGKey(t))
            losses.append(float(m["loss"]))
        # a random frozen decoder leaves the encoder less to gain
        gain = 0.995 if freeze else 0.9
        assert np.mean(losses[-3:]) < gain * np.mean(losses[:3]), (freeze, losses)
        dec_same = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(state.params["decoder"]), jax.tree.leaves(params["decoder"])))
        assert dec_same == bool(freeze)
        assert not np.array_equal(state.params["encoder"]["norm"]["bias"],
                                  params["encoder"]["norm"]["bias"])
    with pytest.raises(ValueError, match="freeze=\\('head',\\) names \\['head'\\]"):
        create_mae_state(params, opt, freeze=("head",))
