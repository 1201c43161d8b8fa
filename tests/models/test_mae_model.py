"""MAE model: sin-cos positions, masking, the unmasked encoder == ViT, the decoder's unshuffle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.methods.coda import mae_tiny

from jaxadapt.models.mae import (MAE, MAEDecoder, MAEEncoder, mae, mask_noise, random_masking,
                                 sincos_pos_embed_2d)
from jaxadapt.models.vit import ViT


def _reference_sincos(dim, g):
    """MAE's util/pos_embed.py restated: meshgrid(w, h); emb_h from grid[0] (= w!)."""
    gw_, gh_ = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))

    def one(d, pos):
        om = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        om = 1.0 / 10000 ** om
        out = np.einsum("m,d->md", pos.reshape(-1), om)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(dim // 2, gw_), one(dim // 2, gh_)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


@pytest.mark.parametrize("dim,g", [(32, 4), (64, 6)])
def test_sincos_matches_reference(dim, g):
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, g, g), _reference_sincos(dim, g),
                               rtol=0, atol=1e-12)


def test_sincos_rejects_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="dim=30 .* multiple of 4"):
        sincos_pos_embed_2d(30, 4, 4)


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (36, 0.75), (49, 0.75), (10, 0.5)])
def test_random_masking_matches_reference(n, ratio):
    noise = mask_noise(jax.random.PRNGKey(3), 4, n)
    ids_keep, mask, ids_restore = map(np.asarray, random_masking(noise, ratio))
    keep = int(n * (1 - ratio))
    assert keep == round(n * (1 - ratio)) or n == 49  # floor, as the reference
    shuffle = np.argsort(np.asarray(noise), axis=1)
    np.testing.assert_array_equal(ids_keep, shuffle[:, :keep])
    np.testing.assert_array_equal(np.take_along_axis(shuffle, ids_restore, 1),
                                  np.broadcast_to(np.arange(n), (4, n)))
    ref_mask = np.ones((4, n))
    ref_mask[:, :keep] = 0
    np.testing.assert_array_equal(mask, np.take_along_axis(ref_mask, ids_restore, 1))
    assert (mask.sum(1) == n - keep).all()
    for b in range(4):  # the kept patches are exactly the unmasked ones
        assert sorted(ids_keep[b]) == list(np.flatnonzero(mask[b] == 0))


def test_masks_differ_across_keys_and_images():
    m1 = np.asarray(random_masking(mask_noise(jax.random.PRNGKey(0), 8, 16), 0.75)[1])
    m2 = np.asarray(random_masking(mask_noise(jax.random.PRNGKey(1), 8, 16), 0.75)[1])
    assert (m1 != m2).any(axis=1).all()
    assert len({tuple(r) for r in m1}) > 1


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 0.99])
def test_masking_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=f"mask_ratio={ratio!r}"):
        random_masking(jnp.zeros((1, 16)), ratio)


def test_unmasked_encoder_equals_vit_with_sincos_positions():
    """The encoder's tokens are ViT.__call__'s with pos_embed = the sin-cos table."""
    m = mae_tiny.TINY
    params = mae_tiny.params()
    x = jnp.asarray(mae_tiny.images(3))
    ours = m.encoder_def().apply({"params": params["encoder"]}, x)
    vit = ViT(patch_size=8, embed_dim=32, depth=2, num_heads=4, img_size=32)
    vp = dict(params["encoder"])
    vp["pos_embed"] = jnp.asarray(sincos_pos_embed_2d(32, 4, 4)[None], jnp.float32)
    ref = vit.apply({"params": vp}, x)
    assert set(ours) == {"cls", "patches"} and ours["patches"].shape == (3, 16, 32)
    for k in ours:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5)
    via_mae = m.apply({"params": params}, x, method="tokens")
    np.testing.assert_array_equal(via_mae["cls"], ours["cls"])


def test_masked_encoder_sees_only_kept_patches_and_decoder_unshuffles():
    m = mae_tiny.TINY
    params = mae_tiny.params()
    x = np.asarray(mae_tiny.images(2))
    noise = mask_noise(jax.random.PRNGKey(5), 2, 16)
    enc = MAEEncoder(8, 32, 2, 4)
    latent, mask, _ = enc.apply({"params": params["encoder"]}, jnp.asarray(x), noise, 0.75,
                                method="masked")
    assert latent.shape == (2, 1 + 4, 32)
    # Changing the pixels of removed patches changes nothing the encoder returns.
    x2 = x.copy()
    for b in range(2):
        for j in np.flatnonzero(np.asarray(mask[b])):
            r, c = divmod(int(j), 4)
            x2[b, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 9.0
    latent2, _, _ = enc.apply({"params": params["encoder"]}, jnp.asarray(x2), noise, 0.75,
                              method="masked")
    np.testing.assert_array_equal(latent, latent2)
    pred, mask_m = m.apply({"params": params}, jnp.asarray(x), noise, 0.75)
    np.testing.assert_array_equal(mask_m, mask)
    assert pred.shape == (2, 16, 8 * 8 * 5)
    # The decoder reads only the kept tokens: its predictions do not change either.
    pred2, _ = m.apply({"params": params}, jnp.asarray(x2), noise, 0.75)
    np.testing.assert_array_equal(pred, pred2)


def test_decoder_unshuffle_matches_numpy_restatement():
    """Depth-0 decoder: kept patch j gets embed(latent[1 + ids_restore[j]]), removed
    patches the mask token; + sin-cos position; LayerNorm; Linear; CLS dropped."""
    dec = MAEDecoder(8, 5, (4, 4), 32, depth=0, num_heads=4)
    latent = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 24))
    _, mask, ids_restore = random_masking(mask_noise(jax.random.PRNGKey(1), 2, 16), 0.75)
    token = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 32))
    prm = dec.init(jax.random.PRNGKey(3), latent, ids_restore, token)["params"]
    prm = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(4), v.shape),
                       prm)  # non-trivial LayerNorm affine and biases
    out = np.asarray(dec.apply({"params": prm}, latent, ids_restore, token))
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    e = f(latent) @ f(prm["embed"]["kernel"]) + f(prm["embed"]["bias"])
    pos = sincos_pos_embed_2d(32, 4, 4)
    ref = np.empty((2, 16, 320))
    for b in range(2):
        for j in range(16):
            keep = np.asarray(mask)[b, j] == 0
            t = (e[b, 1 + int(ids_restore[b, j])] if keep else f(token)[0, 0]) + pos[1 + j]
            t = (t - t.mean()) / np.sqrt(t.var() + 1e-6)
            t = t * f(prm["norm"]["scale"]) + f(prm["norm"]["bias"])
            ref[b, j] = t @ f(prm["pred"]["kernel"]) + f(prm["pred"]["bias"])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_init_is_the_references():
    params = mae_tiny.params()
    k = np.asarray(params["encoder"]["patch_embed"]["kernel"])
    bound = np.sqrt(6.0 / (8 * 8 * 5 + 32))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    assert not np.asarray(params["decoder"]["pred"]["bias"]).any()
    np.testing.assert_array_equal(params["encoder"]["norm"]["scale"], np.ones(32))
    assert 0.005 < float(np.std(params["mask_token"])) < 0.05


def test_named_sizes_and_bad_input():
    assert mae("mae_cpu", in_channels=3).in_channels == 3
    with pytest.raises(ValueError, match="unknown"):
        mae("mae_huge")
    m = mae_tiny.TINY
    params = mae_tiny.params()
    with pytest.raises(ValueError, match="36x36 is not divisible by patch_size=8"):
        m.apply({"params": params}, jnp.zeros((1, 36, 36, 5)), method="tokens")
    with pytest.raises(ValueError, match="in_channels=5"):
        m.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16)))
    with pytest.raises(ValueError, match="img_size=32"):
        m.apply({"params": params}, jnp.zeros((1, 40, 40, 5)), jnp.zeros((1, 25)))
    with pytest.raises(ValueError, match="noise has shape"):
        m.apply({"params": params}, jnp.zeros((1, 32, 32, 5)), jnp.zeros((1, 9)))
    assert isinstance(MAE(), MAE)
