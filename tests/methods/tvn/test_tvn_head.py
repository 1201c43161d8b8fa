"""Method `tvn`: per-unit alignment, TVN fitted on training controls, CORAL, linear head."""

import types

import numpy as np
import pandas as pd
import pytest

from jaxadapt.methods.tvn import head as tvn_head
from jaxadapt.methods.tvn.head import (TransformConfig, fit_head_pipeline, fit_linear_head,
                                       transform_unit)
from jaxadapt.methods.tvn.tvn import apply_tvn, coral, fit_tvn


def _plates(n_plates=3, n_ctrl=40, n_pert=60, d=8, classes=3, seed=0):
    """Plates with their own additive shift and per-feature scale (a diagonal batch effect)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    centres = 3.0 * rng.normal(size=(classes, d))
    x, ctrl, plate, label, clean = [], [], [], [], []
    for p in range(n_plates):
        shift, scale = 5 * rng.normal(size=d), rng.uniform(0.5, 2.0, size=d)
        lab = np.r_[np.full(n_ctrl, -1), rng.integers(0, classes, n_pert)]
        z = rng.normal(size=(len(lab), d)) @ mix + np.where(lab[:, None] >= 0, centres[lab], 0)
        clean.append(z)
        x.append(z * scale + shift)
        ctrl.append(lab < 0)
        plate.append(np.full(len(lab), f"p{p}"))
        label.append(lab)
    return (np.concatenate(x), np.concatenate(ctrl), np.concatenate(plate), np.concatenate(label),
            np.concatenate(clean))


def _cov(y):
    return np.cov(y, rowvar=False, ddof=0)


HEAD = {"steps": 300, "learning_rate": 0.05, "weight_decay": 1e-3}


def test_pipeline_equals_numpy_restatement_and_whitens_training_controls():
    x, ctrl, plate, label, _ = _plates()
    fitted = fit_head_pipeline(x, ctrl, plate, label, TransformConfig(), num_classes=3, head=HEAD)
    # Restated: standardize each plate on its controls, then EFAAR's TVN on the pooled controls.
    z = np.empty_like(x)
    for p in np.unique(plate):
        c = x[(plate == p) & ctrl]
        z[plate == p] = (x[plate == p] - c.mean(0)) / c.std(0)
    ref = apply_tvn(fit_tvn(z, ctrl), z)
    ys = [transform_unit(fitted.tvn, x[plate == p], x[(plate == p) & ctrl], TransformConfig())[0]
          for p in np.unique(plate)]
    y = np.concatenate(ys)  # plates are contiguous, in sorted order
    np.testing.assert_allclose(y, ref, atol=1e-9)
    # The pooled training controls come out white; each plate's controls centred.
    assert np.abs(_cov(y[ctrl]) - np.eye(8)).max() < 1e-8
    for p in np.unique(plate):
        assert np.abs(y[(plate == p) & ctrl].mean(0)).max() < 1e-9


def test_unit_transform_removes_a_diagonal_batch_effect():
    x, ctrl, plate, label, clean = _plates(n_plates=2)
    fitted = fit_head_pipeline(x, ctrl, plate, label, TransformConfig(), num_classes=3, head=HEAD)
    rows = plate == "p1"
    y, _ = transform_unit(fitted.tvn, x[rows], x[rows & ctrl], TransformConfig())
    y_clean, _ = transform_unit(fitted.tvn, clean[rows], clean[rows & ctrl], TransformConfig())
    np.testing.assert_allclose(y, y_clean, atol=1e-9)  # the plate's shift and scale are gone
    # Without per-unit alignment the plate's effect stays.
    glob = TransformConfig(per_unit=False)
    g = fit_head_pipeline(x, ctrl, plate, label, glob, num_classes=3, head=HEAD)
    a = transform_unit(g.tvn, x[rows], x[rows & ctrl], glob)[0]
    b = transform_unit(g.tvn, clean[rows], clean[rows & ctrl], glob)[0]
    assert np.abs(a - b).max() > 1.0


def test_coral_step_is_efaar_coral_of_the_unit():
    x, ctrl, plate, label, _ = _plates(n_plates=2, seed=1)
    cfg = TransformConfig(per_unit=True, coral=True, coral_lam=0.5)
    fitted = fit_head_pipeline(x, ctrl, plate, label, cfg, num_classes=3, head=HEAD)
    rows = plate == "p0"
    y, yc = transform_unit(fitted.tvn, x[rows], x[rows & ctrl], cfg)
    no_coral, _ = transform_unit(fitted.tvn, x[rows], x[rows & ctrl], TransformConfig())
    expected = coral(no_coral, ctrl[rows], np.zeros(rows.sum()), lam=0.5)
    np.testing.assert_allclose(y, expected, atol=1e-10)
    np.testing.assert_allclose(yc, y[ctrl[rows]], atol=1e-10)


def test_fewer_controls_than_dimensions_stays_finite():
    x, ctrl, plate, label, _ = _plates(n_plates=2, n_ctrl=5, d=30, seed=2)
    fitted = fit_head_pipeline(x, ctrl, plate, label, TransformConfig(coral=True), num_classes=3,
                               head=HEAD)
    # 2 plates x 5 controls, each plate's centred: 8 directions at most.
    assert fitted.tvn.out_dim <= 8
    y, _ = transform_unit(fitted.tvn, x, x[ctrl], TransformConfig(coral=True))
    assert np.isfinite(y).all() and np.abs(y).max() < 1e3


def test_linear_head_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 4))
    labels = np.argmax(x[:, :3] + 0.5 * rng.normal(size=(120, 3)), axis=1)
    wd = 0.05
    w, b = fit_linear_head(x, labels, 3, steps=3000, learning_rate=0.02, weight_decay=wd)
    w2, b2 = fit_linear_head(x, labels, 3, steps=3000, learning_rate=0.02, weight_decay=wd)
    np.testing.assert_array_equal(w, w2)  # deterministic
    # sklearn: 1/2 ||W||^2 + C * sum CE  ==  n C (mean CE + 1/(2 n C) ||W||^2): C = 1/(n wd).
    ref = LogisticRegression(C=1 / (len(x) * wd), tol=1e-10, max_iter=10000).fit(x, labels)
    # Both parametrizations are defined up to a constant per row of logits: compare centred.
    ref_w = ref.coef_.T
    np.testing.assert_allclose(w - w.mean(1, keepdims=True), ref_w - ref_w.mean(1, keepdims=True),
                               atol=5e-3)
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=5e-3)


def _unit(x_rows, ctrl_rows, table):
    """A fake unit backed by a table ('file' extractor: rows, not images)."""
    rows = np.r_[x_rows, ctrl_rows]
    images = types.SimpleNamespace(rows=rows, table=table)
    return types.SimpleNamespace(name="u0", unlabelled=lambda: images)


def test_method_with_an_embedding_file(tmp_path):
    x, ctrl, plate, label, _ = _plates(n_plates=2, seed=4)
    path = str(tmp_path / "emb.npy")
    np.save(path, x)
    cfg = types.SimpleNamespace(tvn=types.SimpleNamespace(
        extractor="file", embeddings_file=path, per_unit=True, coral=False, coral_lam=0.5))
    train = plate == "p0"
    fitted = fit_head_pipeline(x[train], ctrl[train], plate[train], label[train], TransformConfig(),
                               num_classes=3, head={**HEAD, "steps": 500})
    variables = tvn_head.head_variables(fitted)
    method = tvn_head.tvn(None, cfg)
    test = np.flatnonzero(plate == "p1")
    unit = _unit(test[~ctrl[test]], test[ctrl[test]], pd.DataFrame({"is_control": ctrl}))
    emb = method.embed_unit(variables, unit)
    y, yc = transform_unit(fitted.tvn, x[test[~ctrl[test]]], x[test[ctrl[test]]], TransformConfig())
    np.testing.assert_allclose(emb.samples, y, atol=1e-9)
    np.testing.assert_allclose(emb.controls, yc, atol=1e-9)
    logits = method.predict_unit(variables, unit)
    np.testing.assert_allclose(logits, y @ fitted.weights + fitted.bias, rtol=1e-5, atol=1e-5)
    # The head transfers to the other plate despite its own shift and scale.
    assert (logits.argmax(1) == label[test[~ctrl[test]]]).mean() > 0.8
    assert method.ignores == ("L",) and method.adapts_on_subset and method.trainer == "tvn"


@pytest.mark.parametrize("shape, match", [((5, 3), r"need a real \[7, D\]"), ((7,), "shape")])
def test_embedding_file_shape_is_checked(tmp_path, shape, match):
    path = str(tmp_path / f"bad{len(shape)}.npy")
    np.save(path, np.zeros(shape))
    with pytest.raises(ValueError, match=match):
        tvn_head.load_embedding_file(path, 7)
    with pytest.raises(ValueError, match="cannot be read"):
        tvn_head.load_embedding_file(str(tmp_path / "missing.npy"), 7)


def test_unit_without_enough_controls_raises():
    x, ctrl, plate, label, _ = _plates(n_plates=1)
    fitted = fit_head_pipeline(x, ctrl, plate, label, TransformConfig(), num_classes=3, head=HEAD)
    with pytest.raises(ValueError, match="unit 'p9' has 1 negative-control rows"):
        transform_unit(fitted.tvn, x, x[:1], TransformConfig(), "p9")
    with pytest.raises(ValueError, match="labelled rows with classes in"):
        fit_linear_head(x[:3], np.array([0, 5, 1]), 3, steps=1, learning_rate=0.1, weight_decay=0)
