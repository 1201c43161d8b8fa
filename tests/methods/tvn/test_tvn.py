"""TVN and per-batch CORAL against NumPy restatements of the EFAAR procedure."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.methods.tvn.tvn import apply_tvn, coral, fit_tvn, tvn


def _data(n_ctrl, n_pert, d, seed=0):
    """Anisotropic controls (distinct variances) and shifted, rescaled perturbations."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(0.2, 3.0, d)
    ctrl = rng.normal(size=(n_ctrl, d)) @ mix + 5.0
    pert = 2.0 * rng.normal(size=(n_pert, d)) @ mix + 3.0
    x = np.concatenate([ctrl, pert])
    is_ctrl = np.arange(len(x)) < n_ctrl
    perm = rng.permutation(len(x))
    return x[perm], is_ctrl[perm]


def _efaar_tvn(x, is_ctrl, k=None):
    """The 3 EFAAR steps restated: scaler, PCA by eigh of the covariance, scaler."""
    c = x[is_ctrl]
    sd = c.std(axis=0)
    # Constant features stay unscaled, as in sklearn's StandardScaler (whose zero test is
    # also a tolerance: the std of equal floats is rounding noise, not exactly 0).
    sd[sd < 1e-8] = 1.0
    z = (x - c.mean(axis=0)) / sd
    zc = z[is_ctrl]
    w, v = np.linalg.eigh(np.cov(zc, rowvar=False, ddof=0))
    v = v[:, np.argsort(w)[::-1][:k]]
    p = (z - zc.mean(axis=0)) @ v
    pc = p[is_ctrl]
    return (p - pc.mean(axis=0)) / pc.std(axis=0)


def _align_signs(a, ref):
    return a * np.sign(np.sum(a * ref, axis=0))


def _white(y):
    return np.abs(np.cov(y, rowvar=False, ddof=0) - np.eye(y.shape[1])).max()


def test_controls_come_out_white():
    x, is_ctrl = _data(200, 80, 12)
    state = fit_tvn(x, is_ctrl)
    y = apply_tvn(state, x)
    assert state.out_dim == 12 and y.shape == (280, 12) and y.dtype == np.float64
    assert _white(y[is_ctrl]) < 1e-6
    assert np.abs(y[is_ctrl].mean(axis=0)).max() < 1e-6
    # The perturbations are not white: TVN is fitted on the controls only.
    assert _white(y[~is_ctrl]) > 0.5
    # Deterministic column signs: each direction's largest-magnitude entry is positive.
    comps = state.components
    assert (comps[np.abs(comps).argmax(axis=0), np.arange(12)] > 0).all()


def test_equals_efaar_restatement_up_to_column_signs():
    x, is_ctrl = _data(150, 60, 10, seed=1)
    y = apply_tvn(fit_tvn(x, is_ctrl), x)
    ref = _efaar_tvn(x, is_ctrl)
    np.testing.assert_allclose(_align_signs(y, ref), ref, atol=1e-8)
    # JAX input and the one-call form give the same map.
    np.testing.assert_allclose(tvn(jnp.asarray(x, jnp.float32), is_ctrl),
                               apply_tvn(fit_tvn(x.astype(np.float32), is_ctrl), x.astype(np.float32)))


def test_fewer_controls_than_dims_and_a_constant_feature():
    x, is_ctrl = _data(10, 30, 50, seed=2)
    x[is_ctrl, 7] = 4.2  # constant among the controls, varies among the perturbations
    state = fit_tvn(x, is_ctrl)
    y = apply_tvn(state, x)
    # 10 centred controls span 9 directions: 9 output dimensions, all finite.
    assert state.out_dim == 9 and y.shape == (40, 9)
    assert np.isfinite(y).all() and np.abs(y).max() < 1e3
    assert _white(y[is_ctrl]) < 1e-6
    ref = _efaar_tvn(x, is_ctrl, k=9)
    np.testing.assert_allclose(_align_signs(y, ref), ref, atol=1e-6)
    # The original keeps all 50 directions and divides by the ~0 std of the 41 the
    # controls do not span: it explodes (about 1e16 here) where TVN stays bounded.
    with np.errstate(all="ignore"):
        assert not np.abs(_efaar_tvn(x, is_ctrl)).max() < 1e6
    # The constant feature is centred, not divided by ~0.
    assert state.scale[7] == 1.0 and state.mean[7] == pytest.approx(4.2)


def test_collinear_feature_direction_is_dropped():
    x, is_ctrl = _data(100, 20, 6, seed=3)
    x = np.concatenate([x, 2.0 * x[:, :1] - 1.0], axis=1)  # feature 6 = 2 * feature 0 - 1
    state = fit_tvn(x, is_ctrl)
    y = apply_tvn(state, x)
    assert state.out_dim == 6 and np.isfinite(y).all()
    assert _white(y[is_ctrl]) < 1e-6
    assert fit_tvn(x, is_ctrl, min_variance=0.0).out_dim == 7  # kept without the threshold


def test_coral_per_batch():
    rng = np.random.default_rng(4)
    d, lam = 5, 0.5
    x = rng.normal(size=(90, d)) @ rng.normal(size=(d, d))
    is_ctrl = rng.random(90) < 0.5
    batch = np.array(["b0", "b1", "b2"])[np.arange(90) % 3]
    out = coral(x, is_ctrl, batch, lam=lam)
    for b in ("b0", "b1", "b2"):
        rows = batch == b
        cov = np.cov(x[rows & is_ctrl], rowvar=False, ddof=1)
        u, s, _ = np.linalg.svd(cov + lam * np.eye(d))
        m = (u / np.sqrt(s)) @ u.T  # (C + lam I)^(-1/2) of an SPD matrix by SVD
        np.testing.assert_allclose(out[rows], x[rows] @ m, atol=1e-10)
        w, v = np.linalg.eigh(cov)
        expected = (v * (w / (w + lam))) @ v.T  # (C+lam I)^-1/2 C (C+lam I)^-1/2
        np.testing.assert_allclose(np.cov(out[rows & is_ctrl], rowvar=False, ddof=1), expected,
                                   atol=1e-10)
    # The one-call form: TVN then CORAL.
    np.testing.assert_allclose(tvn(x, is_ctrl, batch, lam=lam),
                               coral(apply_tvn(fit_tvn(x, is_ctrl), x), is_ctrl, batch, lam=lam))


@pytest.mark.parametrize("call, match", [
    (lambda x, c: fit_tvn(x, np.zeros(len(x), bool)), "got 0 of 20"),
    (lambda x, c: fit_tvn(x, c[:-1]), "is_control has shape"),
    (lambda x, c: fit_tvn(np.where(np.arange(20)[:, None] == 3, np.nan, x), c), "NaN/inf .*first row 3"),
    (lambda x, c: fit_tvn(x[:, 0], c), "2-D"),
    (lambda x, c: fit_tvn(x, np.full(20, 2)), "booleans"),
    (lambda x, c: fit_tvn(np.ones_like(x), c), "do not vary"),
    (lambda x, c: apply_tvn(fit_tvn(x, c), x[:, :3]), "have 3 features but the TVN was fitted on 4"),
    (lambda x, c: apply_tvn(fit_tvn(x, c), np.full((2, 4), np.inf)), "NaN/inf"),
    (lambda x, c: coral(x, c, np.where(np.arange(20) == 0, 5, np.arange(20) // 10)), "batch 5 has 1 control"),
    (lambda x, c: coral(x, c, np.zeros(19)), "batch_ids has shape"),
    (lambda x, c: coral(x, c, np.zeros(20), lam=0.0), "lam must be > 0"),
])
def test_bad_input_raises(call, match):
    rng = np.random.default_rng(5)
    x, c = rng.normal(size=(20, 4)), np.arange(20) % 2 == 0
    with pytest.raises(ValueError, match=match):
        call(x, c)
