"""Tests of the multi-crop views (data/views.py) against NumPy / PIL restatements."""

import numpy as np
import pytest
from PIL import Image  # pillow ships with matplotlib, a declared dependency

from jaxadapt.data import schema, store, transforms, views

C = 5
CFG = views.ViewsConfig(global_size=32, local_size=16, n_local=4)
RAW = CFG._replace(intensity_p=0.0, standardize=False)  # geometry only, 0-1 scale


def _image(seed=0, h=48, w=48):
    return np.random.default_rng(seed).integers(0, 256, (h, w, C), dtype=np.uint8)


def test_shapes_dtypes_and_standardization():
    out = views.make_views(_image(0), _image(1), views.view_rng(0, 0, 3, 7), CFG)
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (2, 32, 32, C) and out["global"].dtype == np.float32
    assert out["local"].shape == (4, 16, 16, C) and out["local"].dtype == np.float32
    for v in [*out["global"], *out["local"]]:
        x = v.reshape(-1, C).astype(np.float64)
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(x.std(0, ddof=1), 1, atol=1e-5)
    none = views.make_views(_image(0), None, views.view_rng(0, 0, 3, 3), CFG._replace(n_local=0))
    assert none["local"].shape == (0, 16, 16, C) and none["local"].dtype == np.float32


def test_standardize_matches_numpy_and_guards_constant_channels():
    v = np.random.default_rng(0).uniform(0, 1, (9, 7, C)).astype(np.float32)
    v[..., 2] = 0.3  # a constant stain: centred, not divided by ~0
    x = v.astype(np.float64)
    mean, std = x.mean((0, 1)), x.std((0, 1), ddof=1)
    ref = (x - mean) / np.maximum(std, transforms.STD_EPS)
    out = transforms.standardize(v)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.isfinite(out).all() and np.abs(out[..., 2]).max() < 1e-6
    with pytest.raises(ValueError, match="at least 2 pixels"):
        transforms.standardize(v[:1, :1])


def test_crop_box_follows_random_resized_crop():
    rng = np.random.default_rng(0)
    boxes = [views.crop_box(rng, 40, 60, (0.05, 0.4), (3 / 4, 4 / 3)) for _ in range(500)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w
        # rounding of w and h to pixels moves area and ratio by at most a pixel each
        assert 0.05 * 2400 - (h + w + 1) <= h * w <= 0.4 * 2400 + (h + w + 1)
        assert 3 / 4 * (h - 1) / (h + 1) <= w / h <= 4 / 3 * (h + 1) / max(h - 1, 1)
    assert len({b[:2] for b in boxes}) > 300
    areas = np.array([h * w for _, _, h, w in boxes]) / 2400
    assert areas.min() < 0.1 and areas.max() > 0.35  # the whole scale range is used
    # No box of >= 90 % area fits a 10 x 100 image with ratio <= 4/3: torchvision's
    # fallback is the centred box of height 10 and width round(10 * 4/3).
    assert views.crop_box(rng, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 43, 10, 13)
    assert views.crop_box(rng, 100, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (43, 0, 13, 10)


def _dense(n_in, n_out):
    index, weight = views.resize_taps(n_in, n_out)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), index.shape[1]), index.ravel()), weight.ravel())
    return m


def test_resize_taps_are_bilinear_with_antialias():
    np.testing.assert_allclose(_dense(7, 7), np.eye(7), atol=1e-7)
    # shrink by 2: the triangle widened to support 2 gives PIL's 1/8, 3/8, 3/8, 1/8
    m = _dense(8, 4)
    np.testing.assert_allclose(m[1, 1:5], [1 / 8, 3 / 8, 3 / 8, 1 / 8], atol=1e-7)
    np.testing.assert_allclose(m[0, :3], [3 / 7, 3 / 7, 1 / 7], atol=1e-7)  # edge renormalized
    # enlarge: plain bilinear at half-pixel centres with the coordinate clamped at edges
    n_in, n_out = 5, 13
    ref = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = np.clip((i + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        x0 = int(np.floor(src))
        x1 = min(x0 + 1, n_in - 1)
        ref[i, x0] += 1 - (src - x0)
        ref[i, x1] += src - x0
    np.testing.assert_allclose(_dense(n_in, n_out), ref, atol=1e-6)
    for n_in, n_out in [(128, 48), (37, 96), (500, 31)]:
        np.testing.assert_allclose(_dense(n_in, n_out).sum(1), 1, atol=1e-6)


def test_resized_crop_matches_pil_crop_then_resize():
    x = np.random.default_rng(1).uniform(0, 1, (50, 60, 2)).astype(np.float32)
    for box, size in [((3, 5, 41, 37), 16), ((10, 0, 9, 12), 32), ((0, 0, 50, 60), 48)]:
        top, left, h, w = box
        out = views.resized_crop(x, box, size)
        for c in range(2):
            pil = Image.fromarray(x[..., c], mode="F").crop((left, top, left + w, top + h))
            ref = np.asarray(pil.resize((size, size), Image.BILINEAR))
            np.testing.assert_allclose(out[..., c], ref, atol=2e-6)
    u8 = _image(2)
    np.testing.assert_allclose(views.resized_crop(u8, (0, 0, 48, 48), 48), u8 / 255, atol=1e-6)


def test_flips_cover_all_four_mirrors():
    img = _image(3, 32, 32)
    cfg = RAW._replace(global_size=32, local_size=32, n_local=0, global_scale=(1.0, 1.0),
                       ratio=(1.0, 1.0))  # whole image, no resize: only flips act
    mirrors = [img, img[:, ::-1], img[::-1], img[::-1, ::-1]]
    seen = set()
    for k in range(40):
        g = views.make_views(img, None, np.random.default_rng(k), cfg)["global"][0]
        hit = [m for m, ref in enumerate(mirrors) if np.allclose(g, ref / 255, atol=1e-6)]
        assert len(hit) == 1
        seen.add(hit[0])
    assert seen == {0, 1, 2, 3}
    g = views.make_views(img, None, np.random.default_rng(0), cfg._replace(flips=False))
    np.testing.assert_allclose(g["global"][0], img / 255, atol=1e-6)


def test_intensity_augmentation_matches_coda_formula():
    v = np.random.default_rng(4).uniform(0, 1, (6, 6, C)).astype(np.float32)
    cfg = CFG._replace(intensity_p=1.0, intensity_shift=0.2, intensity_gamma=0.3)
    out = views.intensity_augment(v, np.random.default_rng(9), cfg)
    rng = np.random.default_rng(9)
    rng.uniform()  # the coin
    shift = rng.normal(0, 0.2, C)
    gamma = np.clip(rng.normal(1, 0.3, C), 0.7, 1.3)
    ref = np.clip(np.clip(v.astype(np.float64) + shift, 0, 1) ** gamma, 0, 1)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert (out == 0).any() and (out == 1).any()  # the shift of 0.2 std hits both clips
    assert not np.allclose(out, v)
    off = views.intensity_augment(v, np.random.default_rng(9), cfg._replace(intensity_p=0.0))
    np.testing.assert_array_equal(off, v)
    fired = [not np.array_equal(views.intensity_augment(v, np.random.default_rng(s), CFG), v)
             for s in range(400)]
    assert 0.4 < np.mean(fired) < 0.6  # CODA's p = 0.5 per view


def test_pairs_split_globals_and_locals_between_the_two_images():
    a = np.full((48, 48, C), 10, np.uint8)
    b = np.full((40, 56, C), 200, np.uint8)
    out = views.make_views(a, b, np.random.default_rng(0), RAW)
    np.testing.assert_allclose(out["global"][0], 10 / 255, atol=1e-6)
    np.testing.assert_allclose(out["global"][1], 200 / 255, atol=1e-6)
    np.testing.assert_allclose(out["local"][:2], 10 / 255, atol=1e-6)
    np.testing.assert_allclose(out["local"][2:], 200 / 255, atol=1e-6)
    odd = RAW._replace(n_local=3)
    assert views.make_views(a, a, np.random.default_rng(0), odd)["local"].shape[0] == 3
    with pytest.raises(ValueError, match="n_local=3 is odd"):
        views.make_views(a, b, np.random.default_rng(0), odd)


def test_views_are_a_function_of_seed_epoch_and_rows():
    img_a, img_b = _image(5), _image(6)
    first = views.make_views(img_a, img_b, views.view_rng(1, 2, 3, 4), CFG)
    again = views.make_views(img_a, img_b, views.view_rng(1, 2, 3, 4), CFG)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    for other in [views.view_rng(1, 3, 3, 4), views.view_rng(2, 2, 3, 4),
                  views.view_rng(1, 2, 3, 5), views.view_rng((1, 0), 2, 3, 4)]:
        assert not np.allclose(views.make_views(img_a, img_b, other, CFG)["global"],
                               first["global"])
    with pytest.raises(ValueError, match=">= 0"):
        views.view_rng(0, -1, 3, 3)


@pytest.mark.parametrize("change, match", [
    (dict(global_size=0), "global_size=0 must be a positive int"),
    (dict(local_size=-4), "local_size=-4 must be a positive int"),
    (dict(n_local=-1), "n_local=-1"),
    (dict(global_scale=(0.0, 1.0)), r"global_scale=\(0.0, 1.0\) must satisfy 0 < lo <= hi <= 1"),
    (dict(local_scale=(0.05, 1.2)), r"local_scale=\(0.05, 1.2\)"),
    (dict(local_scale=(0.4, 0.05)), r"local_scale=\(0.4, 0.05\)"),
    (dict(ratio=(4 / 3, 3 / 4)), "ratio="),
    (dict(intensity_p=1.5), "intensity_p=1.5"),
    (dict(intensity_gamma=-0.1), "intensity_gamma=-0.1 must be a number in"),
    (dict(intensity_shift="0.1"), "intensity_shift='0.1'"),
    (dict(flips=1), "flips=1 must be True or False"),
    (dict(n_local=2.0), "n_local=2.0 must be an int"),
    (dict(global_size=64), "global_size=64 exceeds the image_a size 48x48"),
])
def test_bad_settings_raise_naming_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        views.make_views(_image(0), None, np.random.default_rng(0), CFG._replace(**change))


def test_check_views_config():
    cfg = views.check_views_config({"global_size": 32, "local_size": 16, "n_local": 4}, 48,
                                   patch_size=8)
    assert cfg == CFG
    bad = [({"global_size": 96}, 64, {}, r"cfg.global_size=96 exceeds the image size 64x64"),
           ({"local_size": 100}, (128, 90), {}, r"local_size=100 exceeds the image size 128x90"),
           ({"n_local": 5}, 64, {}, "n_local=5 is odd"),
           ({"global_size": 36}, 64, {"patch_size": 8}, "global_size=36 is not a multiple"),
           ({"global_sise": 36}, 64, {}, "unknown views setting"),
           ({"global_scale": [0.4, 2.0]}, 64, {}, "global_scale")]
    for section, size, kw, match in bad:
        with pytest.raises(ValueError, match=match):
            views.check_views_config(section, size, where="cfg", **kw)
    assert views.check_views_config({"n_local": 5}, 96, paired=False).n_local == 5
    with pytest.raises(ValueError, match="must be a pair"):
        views.check_views_config({"ratio": 1.0}, 64)


def _table(n):
    ctrl = np.arange(n) % 4 == 3
    return schema.SiteTable({
        "source": np.array(["s"] * n), "batch": np.array(["b"] * n),
        "plate": np.array([f"p{i % 2}" for i in range(n)]),
        "well": np.array([f"W{i:02d}" for i in range(n)]), "site": np.zeros(n, np.int64),
        "compound": np.where(ctrl, schema.DMSO, "c"), "moa": np.array([""] * n),
        "label": np.where(ctrl, -1, np.arange(n) % 3), "is_control": ctrl,
    })


def test_view_batches_on_a_tfds_store(tmp_path):
    n = 12
    images = np.random.default_rng(7).integers(0, 256, (n, 40, 40, C), dtype=np.uint8)
    table = _table(n)
    chunks = lambda t: iter([(np.arange(n), images)])
    src, tab, _ = store.ensure_store(str(tmp_path / "st"), lambda: table, chunks,
                                     image_shape=(40, 40, C))
    pairs = np.array([[[0, 5], [1, 1], [2, 9]], [[3, 3], [4, 8], [5, 0]]])
    got = list(views.view_batches(src, tab, pairs, cfg=CFG, seed=3, epoch=1, num_threads=3))
    assert len(got) == 2
    for b, p in zip(got, pairs):
        assert b["global"].shape == (3, 2, 32, 32, C) and b["global"].dtype == np.float32
        assert b["local"].shape == (3, 4, 16, 16, C) and b["local"].dtype == np.float32
        np.testing.assert_array_equal(b["row_a"], p[:, 0])
        np.testing.assert_array_equal(b["row_b"], p[:, 1])
        np.testing.assert_array_equal(b["label"], np.asarray(tab["label"])[p[:, 0]])
        np.testing.assert_array_equal(b["is_control"], np.asarray(tab["is_control"])[p[:, 0]])
        for j, (ra, rb) in enumerate(p):
            ref = views.make_views(images[ra], images[rb], views.view_rng(3, 1, ra, rb), CFG)
            np.testing.assert_array_equal(b["global"][j], ref["global"])
            np.testing.assert_array_equal(b["local"][j], ref["local"])
    # another batch composition, order and thread count: the same pair, the same views
    regrouped = [pairs[1][::-1], np.concatenate([pairs[0][2:], [[11, 11]]])]
    other = list(views.view_batches(src, tab, regrouped, cfg=CFG, seed=3, epoch=1,
                                    num_threads=1))
    np.testing.assert_array_equal(other[0]["global"][2], got[1]["global"][0])
    np.testing.assert_array_equal(other[1]["local"][0], got[0]["local"][2])
    epoch2 = next(views.view_batches(src, tab, pairs[:1], cfg=CFG, seed=3, epoch=2))
    assert not np.allclose(epoch2["global"], got[0]["global"])


def test_view_batches_bad_input():
    n = 6
    images = _image(0)[None].repeat(n, 0)
    table = _table(n)

    class Source:
        def __getitems__(self, keys):
            return [{"image": images[k]} for k in keys]

    src = Source()
    with pytest.raises(ValueError, match=r"pair_batches\[0\] must be an int array \[B, 2\]"):
        views.view_batches(src, table, [np.arange(4)], cfg=CFG, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        views.view_batches(src, table, [[[0, 6]]], cfg=CFG, seed=0, epoch=0)
    with pytest.raises(ValueError, match="n_local=3 is odd"):
        views.view_batches(src, table, [[[0, 1]]], cfg=CFG._replace(n_local=3), seed=0, epoch=0)
    with pytest.raises(ValueError, match="local_scale"):
        views.view_batches(src, table, [[[0, 0]]], cfg=CFG._replace(local_scale=(0, 1)),
                           seed=0, epoch=0)
    it = views.view_batches(src, table, [[[0, 0]]], cfg=CFG._replace(global_size=64), seed=0,
                            epoch=0)
    with pytest.raises(ValueError, match="global_size=64 exceeds"):
        list(it)
    plain = list(views.view_batches(src, table, [[[0, 0], [1, 1]]], seed=0, epoch=0,
                                    cfg=CFG._replace(n_local=3)))
    assert plain[0]["local"].shape == (2, 3, 16, 16, C)


PLAIN = RAW._replace(crop_mode="plain", flips=False)


def _find(window, image):
    """(top, left) where `window` (0-1 float) sits in uint8 `image` exactly, else None."""
    s = window.shape[0]
    target = np.rint(window * 255).astype(np.uint8)
    for top in range(image.shape[0] - s + 1):
        for left in range(image.shape[1] - s + 1):
            if np.array_equal(image[top:top + s, left:left + s], target):
                # exact on the 0-1 scale too, not only after rounding
                np.testing.assert_array_equal(
                    window, image[top:top + s, left:left + s].astype(np.float32) / 255)
                return top, left
    return None


def test_plain_crops_are_exact_sub_arrays_of_the_image():
    img = _image(3)
    out = views.make_views(img, None, views.view_rng(0, 0, 1, 1), PLAIN)
    corners = [_find(v, img) for v in [*out["global"], *out["local"]]]
    assert None not in corners
    assert len(set(corners)) > 1  # random positions, not one fixed window
    # With flips the window is a mirrored sub-array.
    flipped = views.plain_crop(img, 5, 7, 16, flip_h=True, flip_v=True)
    np.testing.assert_array_equal(flipped, img[5:21, 7:23][::-1, ::-1].astype(np.float32) / 255)


def test_centre_crop_keeps_the_centre_before_any_view_is_cut():
    img = _image(4, 60, 52)
    np.testing.assert_array_equal(views.centre_crop(img, 40), img[10:50, 6:46])
    assert views.centre_crop(img, 0) is img
    cfg = PLAIN._replace(centre_crop=40)
    out = views.make_views(img, None, views.view_rng(0, 0, 1, 1), cfg)
    centre = img[10:50, 6:46]
    assert all(_find(v, centre) is not None for v in [*out["global"], *out["local"]])


def test_plain_and_centre_crop_bad_input_names_sizes_and_choices():
    with pytest.raises(ValueError, match=r"centre_crop=64 exceeds the image_a size 48x48"):
        views.make_views(_image(0), None, np.random.default_rng(0), PLAIN._replace(centre_crop=64))
    with pytest.raises(ValueError, match=r"global_size=32 exceeds the centre-cropped image_a "
                                         r"size 24x24"):
        views.make_views(_image(0), None, np.random.default_rng(0), PLAIN._replace(centre_crop=24))
    with pytest.raises(ValueError, match=r"crop_mode='random' is not one of \['resized', 'plain'\]"):
        views.make_views(_image(0), None, np.random.default_rng(0), PLAIN._replace(crop_mode="random"))
    with pytest.raises(ValueError, match=r"config.dino.views.global_size=32 exceeds the "
                                         r"centre-cropped image size 24x24"):
        views.check_views_config({"global_size": 32, "local_size": 16, "centre_crop": 24}, 48,
                                 where="config.dino.views")
    with pytest.raises(ValueError, match=r"centre_crop=96 exceeds the image size 48x48"):
        views.check_views_config({"centre_crop": 96}, 48)
