"""BatchNorm with explicit statistics: NumPy restatements of train-mode BN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.models.norm import (BatchNorm, masked_moments, merge_suff, norm_stats_from_suff,
                                  stats_from_suff)


EPS = 1e-5


def np_bn(x, mask, scale, bias, eps=EPS):
    """Train-mode BN in float64: masked rows define mean and biased variance."""
    x = np.asarray(x, np.float64)
    sel = x[np.asarray(mask, bool)].reshape(-1, x.shape[-1])
    mean = sel.mean(0)
    var = ((sel - mean) ** 2).mean(0)
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def _vars(c, rng, mean=None, var=None):
    return {
        "params": {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=c), jnp.float32)},
        "batch_stats": {"mean": jnp.asarray(rng.normal(size=c) if mean is None else mean,
                                            jnp.float32),
                        "var": jnp.asarray(rng.uniform(0.5, 2, c) if var is None else var,
                                           jnp.float32)},
    }


def test_batch_mode_matches_numpy_and_updates_running_stats():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (6, 4, 4, 3)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    v = _vars(3, rng)
    y, upd = BatchNorm().apply(v, jnp.asarray(x), mode="batch", mask=jnp.asarray(mask),
                               mutable=["batch_stats"])
    want, mean, var = np_bn(x, mask, v["params"]["scale"], v["params"]["bias"])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    ra = v["batch_stats"]
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * ra["mean"] + 0.1 * mean,
                               rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * ra["var"] + 0.1 * var,
                               rtol=1e-5)
    # Not mutable -> nothing updated, same output.
    y2 = BatchNorm().apply(v, jnp.asarray(x), mode="batch", mask=jnp.asarray(mask))
    np.testing.assert_allclose(y2, y, rtol=1e-6)


def _pure_bn(x, mask, scale, bias):
    sel = mask[:, None]
    n = jnp.sum(mask.astype(jnp.float32))
    mean = jnp.sum(jnp.where(sel, x, 0.0), 0) / n
    var = jnp.sum(jnp.where(sel, (x - mean) ** 2, 0.0), 0) / n
    return (x - mean) / jnp.sqrt(var + EPS) * scale + bias


def test_gradient_flows_through_statistics():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
    mask = jnp.asarray([1, 0, 1, 1, 1], bool)
    v = _vars(2, rng)
    scale, bias = v["params"]["scale"], v["params"]["bias"]

    def loss(x):
        return jnp.sum(w * BatchNorm().apply(v, x, mode="batch", mask=mask) ** 2)

    g = jax.grad(loss)(x)
    g_ref = jax.grad(lambda x: jnp.sum(w * _pure_bn(x, mask, scale, bias) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    # Central finite differences on a few entries (float32: loose tolerance).
    for idx in [(0, 0), (1, 1), (3, 0)]:
        e = jnp.zeros_like(x).at[idx].set(1e-2)
        fd = (loss(x + e) - loss(x - e)) / 2e-2
        np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-3)
    # The statistics really carry gradient: stopping it changes the selected rows' grads,
    # while row 1 (outside the mask) only sees the plain affine normalization.
    stop = jax.grad(lambda x: jnp.sum(w * _pure_bn_stopped(x, mask, scale, bias) ** 2))(x)
    assert not np.allclose(g[0], stop[0], atol=1e-3)
    np.testing.assert_allclose(g[1], stop[1], rtol=1e-4, atol=1e-5)


def _pure_bn_stopped(x, mask, scale, bias):
    sel = mask[:, None]
    n = jnp.sum(mask.astype(jnp.float32))
    xs = jax.lax.stop_gradient(x)
    mean = jnp.sum(jnp.where(sel, xs, 0.0), 0) / n
    var = jnp.sum(jnp.where(sel, (xs - mean) ** 2, 0.0), 0) / n
    return (x - mean) / jnp.sqrt(var + EPS) * scale + bias


def test_running_mode_uses_running_stats():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    v = _vars(2, rng)
    y, upd = BatchNorm().apply(v, jnp.asarray(x), mode="running", mutable=["batch_stats"])
    bs, p = v["batch_stats"], v["params"]
    want = (x - bs["mean"]) / np.sqrt(np.asarray(bs["var"]) + EPS) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(upd["batch_stats"]["mean"], bs["mean"])


class TwoBN(nn.Module):
    @nn.compact
    def __call__(self, x, *, mode, mask=None):
        x = BatchNorm(name="bn0")(x, mode=mode, mask=mask)
        return BatchNorm(name="bn1")(2.0 * x + 1.0, mode=mode, mask=mask)


def test_given_mode_uses_given_stats_and_falls_back_per_layer():
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 2.0, (6, 2, 2, 3)).astype(np.float32)
    mask = np.array([1, 1, 1, 0, 1, 0], bool)
    v = TwoBN().init(jax.random.key(0), jnp.asarray(x), mode="running")
    given = {"mean": jnp.asarray([1.0, 2.0, 3.0]), "var": jnp.asarray([4.0, 1.0, 0.25])}
    y = TwoBN().apply({**v, "norm_stats": {"bn0": given}}, jnp.asarray(x), mode="given",
                      mask=jnp.asarray(mask))
    h = (x - np.asarray(given["mean"])) / np.sqrt(np.asarray(given["var"]) + EPS)
    want, _, _ = np_bn(2.0 * h + 1.0, mask, 1.0, 0.0)  # bn1: batch statistics
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    # Nothing given at all: identical to batch mode.
    yb = TwoBN().apply(v, jnp.asarray(x), mode="batch", mask=jnp.asarray(mask))
    yg = TwoBN().apply(v, jnp.asarray(x), mode="given", mask=jnp.asarray(mask))
    np.testing.assert_allclose(yg, yb, rtol=1e-6)


def test_suff_stats_merge_equals_joint_batch_at_large_mean():
    rng = np.random.default_rng(4)
    x = rng.normal(1000.0, 1.0, (10, 4, 4, 3)).astype(np.float32)
    mask = rng.uniform(size=10) < 0.7
    mask[0] = True
    v = _vars(3, rng, mean=np.full(3, 1000.0), var=np.ones(3))  # a trained layer

    def suff(xs, ms):
        _, out = BatchNorm().apply(v, jnp.asarray(xs), mode="running",
                                   mask=jnp.asarray(ms), mutable=["suff_stats"])
        return out["suff_stats"]

    a, b = suff(x[:6], mask[:6]), suff(x[6:], mask[6:])
    mean, var = stats_from_suff(merge_suff(a, b))
    _, want_mean, want_var = np_bn(x, mask, 1.0, 0.0)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-3)
    # Different shifts merge exactly too (re-centred), and the tree helper agrees.
    b2 = dict(b, shift=b["shift"] - 3.0, sum=b["sum"] + 3.0 * b["count"].astype(jnp.float32),
              sumsq=b["sumsq"] + 6.0 * b["sum"] + 9.0 * b["count"].astype(jnp.float32))
    ns = norm_stats_from_suff({"layer": merge_suff(a, b2)})["layer"]
    np.testing.assert_allclose(ns["var"], want_var, rtol=1e-2)
    # Two-pass batch statistics are accurate at mean 1000; the fast formula is not.
    _, var2, _ = masked_moments(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(var2, want_var, rtol=1e-3)
    sel = jnp.asarray(x[mask].reshape(-1, 3))
    fast = jnp.mean(sel**2, 0) - jnp.mean(sel, 0) ** 2
    assert np.max(np.abs(np.asarray(fast) / want_var - 1)) > 0.05


def test_no_nan_for_one_image_and_constant_input():
    v = _vars(3, np.random.default_rng(5))
    for x in [jnp.ones((1, 1, 1, 3)), jnp.full((4, 2, 2, 3), 7.0)]:
        y = BatchNorm().apply(v, x, mode="batch")
        g = jax.grad(lambda x: jnp.sum(BatchNorm().apply(v, x, mode="batch") ** 2))(x)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
        np.testing.assert_allclose(y, jnp.broadcast_to(v["params"]["bias"], x.shape), atol=1e-5)


def test_empty_mask_error_or_running_fallback_under_jit():
    v = _vars(2, np.random.default_rng(6))
    x = jnp.ones((3, 2))
    none = jnp.zeros(3, bool)
    with pytest.raises(ValueError, match="selects no row"):
        BatchNorm().apply(v, x, mode="batch", mask=none)
    f = jax.jit(lambda x, m: BatchNorm().apply(v, x, mode="batch", mask=m,
                                                mutable=["batch_stats"]))
    y, upd = f(x, none)
    want = BatchNorm().apply(v, x, mode="running")
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], v["batch_stats"]["var"], rtol=1e-6)


def test_bad_mode_and_mask_shape():
    v = _vars(2, np.random.default_rng(7))
    with pytest.raises(ValueError, match="mode='train'"):
        BatchNorm().apply(v, jnp.ones((3, 2)), mode="train")
    with pytest.raises(ValueError, match=r"shape \(4,\), expected \(3,\)"):
        BatchNorm().apply(v, jnp.ones((3, 2)), mode="batch", mask=jnp.ones(4, bool))


def test_float_mask_is_row_weights_matching_numpy_weighted_moments():
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, size=(6, 2, 3, 4)).astype(np.float32)
    w = np.array([0.5, 2.0, 0.0, 1.0, 3.0, 0.25], np.float32)
    x[2] = np.nan  # weight 0 must act as mask False: nothing leaks
    mean, var, count = masked_moments(jnp.asarray(x), jnp.asarray(w))
    keep = w > 0
    xs, ws = x[keep].astype(np.float64), np.repeat(w[keep], 6).astype(np.float64)
    flat = xs.reshape(-1, 4)
    want_mean = (ws[:, None] * flat).sum(0) / ws.sum()
    want_var = (ws[:, None] * (flat - want_mean) ** 2).sum(0) / ws.sum()
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(var, want_var, rtol=1e-4)
    assert float(count) == pytest.approx(ws.sum())
    # Integer weights equal repeating rows; total weight below 1 is no special case.
    rep = np.repeat(x[keep], [2, 8, 4, 12, 1], axis=0)  # w[keep] = [2, 8, 4, 12, 1] / 4
    m2, v2, _ = masked_moments(jnp.asarray(x), jnp.asarray(w / 1000))
    np.testing.assert_allclose(m2, rep.reshape(-1, 4).mean(0), rtol=1e-5)
    np.testing.assert_allclose(v2, rep.reshape(-1, 4).var(0), rtol=1e-4)
    # Sufficient statistics carry the float total weight and merge exactly.
    bn = BatchNorm()
    v = bn.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), mode="running")
    _, upd = bn.apply(v, jnp.asarray(x), mode="batch", mask=jnp.asarray(w), mutable=["suff_stats"])
    m3, v3 = stats_from_suff(upd["suff_stats"])
    np.testing.assert_allclose(m3, want_mean, rtol=1e-5)
    np.testing.assert_allclose(v3, want_var, rtol=1e-4)


@pytest.mark.parametrize("w", [[1.0, -0.5, 1.0], [1.0, np.nan, 1.0], [0.0, 0.0, 0.0]])
def test_bad_row_weights_are_named(w):
    x = jnp.ones((3, 2, 2, 1))
    bn = BatchNorm()
    v = bn.init(jax.random.PRNGKey(0), x, mode="running")
    with pytest.raises(ValueError, match="weights|selects no row"):
        bn.apply(v, x, mode="batch", mask=np.asarray(w, np.float32))
