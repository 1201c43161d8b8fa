"""TTT-MAE: per-image episodic test-time training, vmapped over images and sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.methods.coda import mae_tiny

from jaxadapt.methods.coda.mae import mae_loss, mae_targets
from jaxadapt.methods.coda.ttt_mae import classify_with_head, make_ttt_adapt, make_ttt_predict
from jaxadapt.models.mae import mask_noise
from jaxadapt.train.parallel import make_data_mesh


MODEL = mae_tiny.TINY
W = jax.random.normal(jax.random.PRNGKey(11), (32, 3))
SETTINGS = dict(steps=3, lr=0.05, copies=4)


def _head(tokens):
    """A frozen task head on ViT tokens: linear on CLS + mean patch."""
    return (tokens["cls"] + tokens["patches"].mean(1)) @ W


CLASSIFY = classify_with_head(MODEL, _head)


@pytest.fixture(scope="module")
def setup():
    params = mae_tiny.params()
    images = jnp.asarray(mae_tiny.images(6))
    predict = make_ttt_predict(MODEL, CLASSIFY, **SETTINGS)
    logits, losses = predict.with_losses(params, images[:4], jax.random.PRNGKey(3))
    return params, images, predict, np.asarray(logits), np.asarray(losses)


@pytest.fixture(scope="module")
def adapt_one():
    """The unbatched adaptation of one image, jitted once for the module."""
    return jax.jit(make_ttt_adapt(MODEL, **SETTINGS))


def test_vmapped_equals_one_image_at_a_time(setup, adapt_one):
    """(a) N images in one vmapped call == each adapted alone by the unbatched function."""
    params, images, _, logits, losses = setup
    adapt = adapt_one
    key = jax.random.PRNGKey(3)
    for i in range(4):
        enc, loss_i = adapt(params, images[i], jax.random.fold_in(key, i))
        np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logits[i], CLASSIFY(enc, images[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-5)
    assert logits.shape == (4, 3) and losses.shape == (4, 3)


def test_reset_per_image(setup):
    """(b) Image i's result depends on its own id and pixels only, not on the others."""
    params, images, predict, logits, _ = setup
    key = jax.random.PRNGKey(3)
    perm = [2, 0, 3, 1]
    out = np.asarray(predict(params, images[np.array(perm)], key, ids=jnp.array(perm)))
    np.testing.assert_allclose(out, logits[perm], rtol=1e-5, atol=1e-5)
    # image 0 among other images (and other ids): same result
    others = jnp.concatenate([images[:1], images[4:6], images[3:4] * 2.0])
    out = np.asarray(predict(params, others, key, ids=jnp.array([0, 7, 8, 9])))
    np.testing.assert_allclose(out[0], logits[0], rtol=1e-5, atol=1e-5)
    # and adapting did something: differs from the unadapted classifier
    base = np.asarray(CLASSIFY(params["encoder"], images[:4]))
    assert np.abs(base - logits).max() > 1e-4
    # a different key gives different masks, hence different adapted logits
    other = np.asarray(predict(params, images[:4], jax.random.PRNGKey(4)))
    assert np.abs(other - logits).max() > 1e-6


def test_lr_zero_gives_the_unadapted_classifier():
    """(c) lr = 0: no parameter moves; the logits are the frozen classifier's."""
    params = mae_tiny.params()
    images = jnp.asarray(mae_tiny.images(3))
    predict = make_ttt_predict(MODEL, CLASSIFY, steps=2, lr=0.0, copies=2)
    np.testing.assert_allclose(predict(params, images, jax.random.PRNGKey(0)),
                               CLASSIFY(params["encoder"], images), rtol=1e-6, atol=1e-6)


def test_sharded_over_8_devices_equals_single_device(setup):
    """(d) 8 fake devices, image axis sharded (4 images padded to 8) == one device."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    params, images, _, logits, losses = setup
    predict8 = make_ttt_predict(MODEL, CLASSIFY, mesh=make_data_mesh(), **SETTINGS)
    lg8, ls8 = predict8.with_losses(params, images[:4], jax.random.PRNGKey(3))
    np.testing.assert_allclose(lg8, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ls8, losses, rtol=1e-5, atol=1e-6)
    # 10 images in chunks (chunk_size 3 rounds up to 8 = one image per device: chunks of
    # 8 and 2 + 6 padding), with a typed key: the first four are the same as above
    chunked = make_ttt_predict(MODEL, CLASSIFY, mesh=make_data_mesh(), chunk_size=3,
                               **SETTINGS)
    ten = jnp.concatenate([images[:4], jnp.asarray(mae_tiny.images(6, seed=5))])
    out = np.asarray(chunked(params, ten, jax.random.key(3)))
    assert out.shape == (10, 3) and np.isfinite(out).all()
    np.testing.assert_allclose(out[:4], logits, rtol=1e-5, atol=1e-5)


def test_ttt_loss_goes_down_and_generalizes_to_fresh_masks():
    """(e) 20 SGD steps on one image: the training loss falls, and the reconstruction
    loss on 64 masks never seen during adaptation is lower with the adapted encoder."""
    params = mae_tiny.params()
    image = jnp.asarray(mae_tiny.images(1))[0]
    adapt = jax.jit(make_ttt_adapt(MODEL, steps=20, lr=0.2, copies=8))
    enc, losses = adapt(params, image, jax.random.PRNGKey(1))
    losses = np.asarray(losses)
    assert losses.shape == (20,)
    assert losses[-3:].mean() < 0.92 * losses[:3].mean(), losses

    batch = jnp.broadcast_to(image, (64, *image.shape))
    noise = mask_noise(jax.random.PRNGKey(99), 64, mae_tiny.N_PATCHES)

    def held_out(encoder):
        pred, mask = MODEL.apply({"params": {**params, "encoder": encoder}}, batch, noise,
                                 0.75)
        return float(mae_loss(pred, mae_targets(batch, 8), mask))

    before, after = held_out(params["encoder"]), held_out(enc)
    assert after < 0.98 * before, (before, after)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_ratio=1.0), "mask_ratio=1.0 is outside \\(0, 1\\)"),
    (dict(mask_ratio=0.0), "mask_ratio=0.0 is outside \\(0, 1\\)"),
    (dict(steps=0), "steps=0: use an integer >= 1"),
    (dict(copies=0), "copies=0"),
    (dict(momentum=1.0), "momentum=1.0"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(chunk_size=0), "chunk_size=0"),
])
def test_bad_settings(kwargs, match):
    """(f) bad settings fail when the predictor is built, naming value and fix."""
    with pytest.raises(ValueError, match=match):
        make_ttt_predict(MODEL, CLASSIFY, **kwargs)


def test_bad_images():
    """(f) image sizes not divisible by the patch, or not the MAE's, fail at call time."""
    predict = make_ttt_predict(MODEL, CLASSIFY, **SETTINGS)
    params, key = mae_tiny.params(), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="36x36 is not divisible by patch_size=8; crop"):
        predict(params, jnp.zeros((2, 36, 36, 5)), key)
    with pytest.raises(ValueError, match="40x40x5 but the MAE was built for 32x32x5"):
        predict(params, jnp.zeros((2, 40, 40, 5)), key)
    with pytest.raises(ValueError, match="0 images"):
        predict(params, jnp.zeros((0, 32, 32, 5)), key)
    with pytest.raises(ValueError, match="ids have shape"):
        predict(params, jnp.zeros((2, 32, 32, 5)), key, ids=jnp.arange(3))


def test_mask_token_is_adapted_only_in_the_reference_mode(setup, adapt_one):
    """The reference's "encoder" mode also trains the mask token: the first step's loss is
    the same either way, the later ones differ only through the moved mask token."""
    params, images, _, _, _ = setup
    key = jax.random.PRNGKey(2)
    _, loss_t = adapt_one(params, images[0], key)
    _, loss_f = jax.jit(make_ttt_adapt(MODEL, train_mask_token=False, **SETTINGS))(
        params, images[0], key)
    assert float(loss_t[0]) == float(loss_f[0])
    assert np.abs(np.asarray(loss_t[1:]) - np.asarray(loss_f[1:])).max() > 1e-6


def test_augment_feeds_both_input_and_targets(setup, adapt_one):
    """An ``augment`` that flips every copy == adapting the flipped image without it."""
    params, images, _, _, _ = setup
    key = jax.random.PRNGKey(6)
    flip = jax.jit(make_ttt_adapt(MODEL, augment=lambda k, x: x[:, ::-1], **SETTINGS))
    enc_a, loss_a = flip(params, images[0], key)
    enc_b, loss_b = adapt_one(params, images[0][::-1], key)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc_a["norm"]["bias"], enc_b["norm"]["bias"], rtol=1e-4,
                               atol=1e-6)
