"""ViT, DINO head and multi-crop wrapper against NumPy restatements of DINO's formulas."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxadapt.models import build_model
from jaxadapt.models.pos_embed import bicubic_matrix, interpolate_pos_embed
from jaxadapt.models.vit import (DINOHead, DINOModel, Mlp, ViT, WeightNormDense, check_vit_config,
                                 crop_groups, vit)


# XLA:CPU compiles threefry-based initializers ~7x slower than the "rbg" generator.
KEY = jax.random.key(0, impl="rbg")
TINY = dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, img_size=32)
DINO = DINOModel(backbone=ViT(**TINY), head=DINOHead(out_dim=12, hidden_dim=16, bottleneck_dim=8))


def _crops(seed=3):
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), 4)
    return [jax.random.normal(keys[i], (2,) + ((32, 32) if i < 2 else (16, 16)) + (5,))
            for i in range(4)]


@pytest.fixture(scope="module")
def dino_vars():
    """The tiny DINO model initialized once (jitted: one compile instead of one per op)."""
    return jax.jit(DINO.init)(KEY, _crops())


@pytest.fixture(scope="module")
def vit_vars(dino_vars):
    return {"params": dino_vars["params"]["backbone"]}


def _erf_gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _torch_bicubic_2d(img, out_h, out_w, sh, sw):
    """torch interpolate(mode="bicubic", scale_factor=(sh, sw)), one output pixel at a time.

    img (H, W, D); source coordinate (o + 0.5) / s - 0.5; Keys kernel A = -0.75 on the
    distance to each of the 16 taps; taps read with indices clamped to the border.
    """
    a = -0.75

    def kern(dist):
        d = abs(dist)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        if d < 2:
            return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
        return 0.0

    h, w, _ = img.shape
    out = np.zeros((out_h, out_w, img.shape[2]))
    for oy in range(out_h):
        for ox in range(out_w):
            sy, sx = (oy + 0.5) / sh - 0.5, (ox + 0.5) / sw - 0.5
            for iy in range(math.floor(sy) - 1, math.floor(sy) + 3):
                for ix in range(math.floor(sx) - 1, math.floor(sx) + 3):
                    pix = img[min(max(iy, 0), h - 1), min(max(ix, 0), w - 1)]
                    out[oy, ox] += kern(sy - iy) * kern(sx - ix) * pix
    return out


def test_shapes_any_channels_and_other_sizes():
    m = ViT(**TINY)
    for shape, n in [((2, 32, 32, 5), 16), ((3, 16, 24, 1), 6), ((1, 48, 48, 7), 36)]:
        out = jax.eval_shape(lambda x: m.init_with_output(KEY, x)[0], jnp.zeros(shape))
        assert out["cls"].shape == (shape[0], 16) and out["patches"].shape == (shape[0], n, 16)
    v = jax.eval_shape(lambda x: m.init(KEY, x), jnp.zeros((1, 16, 16, 5)))["params"]
    assert v["pos_embed"].shape == (1, 1 + 16, 16)  # the grid of img_size, not of the input
    assert v["patch_embed"]["kernel"].shape == (8, 8, 5, 16)


def test_bfloat16_compute_stays_close_to_float32(vit_vars):
    x, v = jax.random.normal(KEY, (2, 32, 32, 5)), vit_vars
    ref = jax.jit(ViT(**TINY).apply)(v, x)["cls"]
    got = jax.jit(ViT(**TINY, dtype=jnp.bfloat16).apply)(v, x)["cls"]
    assert got.dtype == jnp.float32 and v["params"]["pos_embed"].dtype == jnp.float32
    err = np.abs(np.asarray(got) - np.asarray(ref)).max()
    assert 0 < err < 0.1  # bf16 matmuls: not bit-equal, but close (tokens are LayerNormed)


def test_bad_patch_size_raises_naming_both_numbers():
    m = ViT(**TINY)
    with pytest.raises(ValueError, match=r"44x32.*patch_size=8.*multiple of 8"):
        m.init(KEY, jnp.zeros((1, 44, 32, 3)))
    with pytest.raises(ValueError, match=r"img_size=30 .*patch_size=8"):
        ViT(**{**TINY, "img_size": 30}).init(KEY, jnp.zeros((1, 32, 32, 3)))
    check_vit_config(224, 16, 224, 96)
    with pytest.raises(ValueError, match=r"crop size=20 is not divisible by patch_size=8.*16 or 2"):
        check_vit_config(48, 8, 48, 20)
    with pytest.raises(ValueError, match=r"dino.local_size=36 is not divisible by patch_size=16"):
        check_vit_config(224, 16, **{"dino.global_size": 224, "dino.local_size": 36})
    with pytest.raises(ValueError, match="patch_size=0"):
        check_vit_config(48, 0)


def test_bicubic_matrix_is_torchs_interpolation():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 6, 3))
    assert np.array_equal(bicubic_matrix(6, 6, 1.0), np.eye(6))
    for gh, gw in [(3, 4), (8, 5)]:  # shrink (local crops) and grow, DINO's +0.1 scale
        sh, sw = (gh + 0.1) / 6, (gw + 0.1) / 6
        ref = _torch_bicubic_2d(img, gh, gw, sh, sw)
        got = np.einsum("ai,bj,ijd->abd", bicubic_matrix(6, gh, sh), bicubic_matrix(6, gw, sw),
                        img)
        np.testing.assert_allclose(got, ref, atol=1e-12)


def test_interpolate_pos_embed_identity_and_restatement():
    rng = np.random.default_rng(1)
    pos = jnp.asarray(rng.normal(size=(1, 1 + 36, 4)), jnp.float32)
    assert interpolate_pos_embed(pos, (6, 6), 6) is pos
    out = np.asarray(interpolate_pos_embed(pos, (3, 4), 6))
    assert out.shape == (1, 1 + 12, 4)
    np.testing.assert_array_equal(out[0, 0], np.asarray(pos)[0, 0])  # CLS kept
    ref = _torch_bicubic_2d(np.asarray(pos, np.float64)[0, 1:].reshape(6, 6, 4), 3, 4,
                            3.1 / 6, 4.1 / 6)
    np.testing.assert_allclose(out[0, 1:], ref.reshape(12, 4), atol=1e-5)


def test_vit_uses_the_interpolated_positions_for_other_sizes(vit_vars):
    x = jax.random.normal(jax.random.key(2, impl="rbg"), (2, 16, 16, 5))
    big, v = ViT(**TINY), vit_vars  # a 4x4 grid; the input's is 2x2
    params = dict(v["params"])
    params["pos_embed"] = interpolate_pos_embed(params["pos_embed"], (2, 2), 4)
    small = ViT(**{**TINY, "img_size": 16})  # made for 16 px: uses its embedding as is
    got, ref = big.apply(v, x), small.apply({"params": params}, x)
    for k in ("cls", "patches"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), atol=1e-6)


def test_mlp_uses_exact_gelu():
    x = jax.random.normal(KEY, (5, 8)) * 3.0
    mlp = Mlp(hidden=32)
    v = jax.jit(mlp.init)(KEY, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    # Large weights so the pre-activations span [-4, 4], where tanh-GELU errs by ~1e-3.
    w1, b1 = p["fc1"]["kernel"] * 50.0, p["fc1"]["bias"]
    p2 = {"fc1": {"kernel": w1, "bias": b1}, "fc2": p["fc2"]}
    ref = _erf_gelu(np.asarray(x, np.float64) @ w1 + b1) @ p2["fc2"]["kernel"] + p2["fc2"]["bias"]
    got = mlp.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p2)}, x)
    pre = np.asarray(x, np.float64) @ w1 + b1
    assert np.abs(pre).max() > 2.0
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6, rtol=1e-5)


def _np_head(p, x):
    """DINO head in float64: Linear-GELU-Linear-GELU-Linear, normalize, x @ V/||V||_col."""
    for i in range(3):
        x = x @ p[f"mlp{i}"]["kernel"] + p[f"mlp{i}"]["bias"]
        x = _erf_gelu(x) if i < 2 else x
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = p["last_layer"]["kernel"]
    return x @ (v / np.linalg.norm(v, axis=0, keepdims=True))


def test_dino_head_matches_numpy_and_last_layer_columns_have_norm_one():
    head = DINOHead(out_dim=24, hidden_dim=32, bottleneck_dim=8)
    x = jax.random.normal(KEY, (6, 16))
    v = jax.jit(head.init)(KEY, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    assert set(p) == {"mlp0", "mlp1", "mlp2", "last_layer"}
    assert set(p["last_layer"]) == {"kernel"} and p["last_layer"]["kernel"].shape == (8, 24)
    # The stored V is not normalized; g = 1 is implicit (nothing to train but V).
    assert not np.allclose(np.linalg.norm(p["last_layer"]["kernel"], axis=0), 1.0)
    np.testing.assert_allclose(np.asarray(head.apply(v, x)), _np_head(p, np.asarray(x, np.float64)),
                               atol=1e-6)
    wn = WeightNormDense(24)
    w_eff = np.asarray(wn.apply({"params": v["params"]["last_layer"]}, jnp.eye(8)))
    np.testing.assert_allclose(np.linalg.norm(w_eff, axis=0), 1.0, atol=1e-6)
    # Scaling V changes nothing: the effective weight is V / ||V||.
    scaled = {"kernel": v["params"]["last_layer"]["kernel"] * 7.0}
    np.testing.assert_allclose(np.asarray(wn.apply({"params": scaled}, jnp.eye(8))), w_eff,
                               atol=1e-6)
    # Init as the reference: trunc-normal(.02) MLP with zero bias; V torch-default uniform.
    assert all(np.all(p[f"mlp{i}"]["bias"] == 0) for i in range(3))
    assert np.abs(p["last_layer"]["kernel"]).max() <= 1 / math.sqrt(8)


def test_crop_groups_are_runs_of_equal_size():
    s = lambda h, w=None: (2, h, w or h, 3)  # noqa: E731
    assert crop_groups([s(32), s(32), s(16), s(16), s(16)]) == [(0, 2), (2, 5)]
    assert crop_groups([s(32), s(16), s(32)]) == [(0, 1), (1, 2), (2, 3)]
    assert crop_groups([s(16, 24), s(16, 16)]) == [(0, 1), (1, 2)]


def test_multicrop_equals_each_crop_separately_crop_major(dino_vars):
    crops, v = _crops(), dino_vars
    assert v["params"]["head"]["last_layer"]["kernel"].shape == (8, 12)

    @jax.jit  # one compile for all the passes (eager ops compile one by one)
    def run(v, crops):
        out, inter = DINO.apply(v, crops, capture_intermediates=True, mutable=["intermediates"])
        calls = [c["cls"].shape[0] for c in inter["intermediates"]["backbone"]["__call__"]]
        sep = jnp.concatenate([DINO.apply(v, [c]) for c in crops])
        feats = DINO.apply(v, crops[2], method="features")
        ref = ViT(**TINY).apply({"params": v["params"]["backbone"]}, crops[2])["cls"]
        return out, jnp.asarray(calls), sep, feats, ref

    out, calls, sep, feats, ref = run(v, crops)
    assert out.shape == (8, 12)
    # One backbone pass per run of equal-size crops: 2 globals together, 2 locals together.
    assert calls.tolist() == [4, 4]
    np.testing.assert_allclose(np.asarray(out), np.asarray(sep), atol=1e-5)
    np.testing.assert_allclose(np.asarray(feats), np.asarray(ref), atol=1e-6)
    with pytest.raises(ValueError, match="batch sizes"):
        DINO.apply(v, [crops[0], crops[1][:1]])


def test_drop_path_only_in_training(vit_vars):
    x, v = jax.random.normal(KEY, (4, 32, 32, 5)), vit_vars
    m0, m1 = ViT(**TINY), ViT(**TINY, drop_path_rate=0.5)
    eval_out = m1.apply(v, x)["cls"]
    np.testing.assert_array_equal(np.asarray(eval_out), np.asarray(m0.apply(v, x)["cls"]))
    train_out = m1.apply(v, x, train=True, rngs={"dropout": jax.random.key(4, impl="rbg")})
    assert not np.allclose(np.asarray(train_out["cls"]), np.asarray(eval_out))


def _n_params(model, channels, size):
    v = jax.eval_shape(lambda x: model.init(KEY, x), jnp.zeros((1, size, size, channels)))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))


def test_deit_s_parameter_count():
    m = vit("vit_small")
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size) == (384, 12, 6, 16, 224)
    # DINO's vit_small (3 channels, no classifier) has 21,665,664 parameters.
    assert _n_params(m, 3, 224) == 21_665_664
    # 5 channels add 2 * 16 * 16 * 384 patch-embedding weights.
    assert _n_params(m, 5, 224) == 21_665_664 + 2 * 16 * 16 * 384 == 21_862_272


def test_build_model_vit_names():
    cfg = ml_collections.ConfigDict(dict(name="vit_small", width=16, stem="small",
                                         num_classes=8, in_channels=5))
    m = build_model(cfg)
    assert isinstance(m, ViT) and m.embed_dim == 384 and m.patch_size == 16
    cfg.name, cfg.patch_size, cfg.img_size = "vit_cpu", 4, 32
    m = build_model(cfg)
    assert (m.embed_dim, m.patch_size, m.img_size) == (64, 4, 32)
    cfg.img_size = 30
    with pytest.raises(ValueError, match="img_size=30 is not divisible by patch_size=4"):
        build_model(cfg)
    with pytest.raises(ValueError, match="vit_cpu.*vit_small"):
        build_model(ml_collections.ConfigDict(dict(name="vit_huge", num_classes=2)))


def test_learned_scale_last_layer_starts_as_the_column_norms_and_scales_outputs():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxadapt.models.vit import DINOHead

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    fixed, learned = DINOHead(16, 8, 4), DINOHead(16, 8, 4, norm_last_layer=False)
    pf = fixed.init(jax.random.PRNGKey(1), x)["params"]
    pl = learned.init(jax.random.PRNGKey(1), x)["params"]
    assert "scale" not in pf["last_layer"]
    v = np.asarray(pl["last_layer"]["kernel"])
    np.testing.assert_allclose(pl["last_layer"]["scale"], np.linalg.norm(v, axis=0), rtol=1e-6)
    g = jnp.arange(1, 17, dtype=jnp.float32)
    pl = {**pl, "last_layer": {**pl["last_layer"], "scale": g}}
    np.testing.assert_allclose(learned.apply({"params": pl}, x),
                               fixed.apply({"params": pf}, x) * np.asarray(g), rtol=1e-5)
