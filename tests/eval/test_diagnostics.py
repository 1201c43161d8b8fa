"""The label-shift diagnostic: standardized shifts, stage grouping, the L/(L+N) shrinkage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.data import schema
from jaxadapt.eval import diagnostics
from jaxadapt.methods.bn import stats as bn
from jaxadapt.models.resnet import BasicBlock, ResNet


def test_stats_shift_matches_formula():
    rng = np.random.default_rng(0)
    a = {"stem_bn": {"mean": rng.normal(size=4), "var": rng.uniform(1, 2, 4)},
         "stage1_block1": {"bn1": {"mean": rng.normal(size=3), "var": rng.uniform(1, 2, 3)}}}
    b = jax.tree.map(lambda x: x + rng.normal(size=x.shape) ** 2, a)
    got = diagnostics.stats_shift(a, b, eps=0.0)
    for path, (sa, sb) in {"stem_bn": (a["stem_bn"], b["stem_bn"]),
                           "stage1_block1/bn1": (a["stage1_block1"]["bn1"], b["stage1_block1"]["bn1"])}.items():
        want = np.sqrt(np.mean((sa["mean"] - sb["mean"]) ** 2 / sb["var"]))
        np.testing.assert_allclose(got[path], want, rtol=1e-12)
    assert diagnostics.by_stage(got) == pytest.approx({"stem": got["stem_bn"], "stage1": got["stage1_block1/bn1"]})


def test_stats_shift_rejects_statistics_of_different_models():
    a = {"stem_bn": {"mean": np.zeros(2), "var": np.ones(2)}}
    with pytest.raises(ValueError, match="different layers"):
        diagnostics.stats_shift(a, {"other_bn": a["stem_bn"]})


def test_controls_shrink_the_first_layers_class_bias_by_L_over_L_plus_N():
    """The CS-ARM-BN argument, exactly: the stem BN sees a linear function of the pixels."""
    model = ResNet(stage_sizes=(1,), block_cls=BasicBlock, width=4, stem="small", num_classes=3,
                   in_channels=2)
    v = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 2)), norm_mode="running")
    rng = np.random.default_rng(0)
    one_class = rng.normal(2.0, 1.0, (8, 32, 32, 2)).astype(np.float32)
    balanced = rng.normal(0.0, 1.0, (8, 32, 32, 2)).astype(np.float32)
    controls = rng.normal(-1.0, 1.0, (24, 32, 32, 2)).astype(np.float32)

    def stem_mean(images):
        return diagnostics.flat_stats(bn.context_stats(model, v, images))["stem_bn"]["mean"]

    bias_alone = stem_mean(one_class) - stem_mean(balanced)
    for n in (8, 24):
        pooled = stem_mean(np.concatenate([one_class, controls[:n]])) - stem_mean(
            np.concatenate([balanced, controls[:n]]))
        np.testing.assert_allclose(pooled, 8 / (8 + n) * bias_alone, rtol=1e-4, atol=1e-5)


def _toy_table(plates=("p0", "p1", "p2"), classes=3, per_class=4, controls=6):
    cols = {"plate": [], "label": [], "is_control": []}
    for p in plates:
        for c in range(classes):
            cols["plate"] += [p] * per_class
            cols["label"] += [c] * per_class
            cols["is_control"] += [False] * per_class
        cols["plate"] += [p] * controls
        cols["label"] += [schema.NO_LABEL] * controls
        cols["is_control"] += [True] * controls
    return {k: np.asarray(v) for k, v in cols.items()}


def _stats_from_feature(feature):
    """A one-layer 'model' whose BN statistics are the mean / variance of a row feature."""
    def stats_of(rows):
        x = feature[rows]
        return {"stem_bn": {"mean": x.mean(0), "var": x.var(0)}}
    return stats_of


def test_label_shift_bias_separates_plate_and_class_effects():
    table = _toy_table()
    plate_idx = np.searchsorted(["p0", "p1", "p2"], table["plate"])
    noise = np.random.default_rng(0).normal(size=(len(plate_idx), 2))
    train, test = np.flatnonzero(plate_idx < 2), np.flatnonzero(plate_idx == 2)
    kw = dict(n_perturbed=4, seed=0)

    # Class effect only: plates look alike, a one-class context is biased.
    cls = np.where(table["label"] >= 0, table["label"], 0)[:, None] * np.array([3.0, 0.0])
    out0 = diagnostics.label_shift_bias(_stats_from_feature(cls + noise), table, train, test, n_controls=0, **kw)
    out6 = diagnostics.label_shift_bias(_stats_from_feature(cls + noise), table, train, test, n_controls=6, **kw)
    assert out0["one_class"]["stem"] > 2 * out0["plate_to_plate"]["stem"]
    assert out6["one_class"]["stem"] < out0["one_class"]["stem"]  # controls dilute the bias
    # Two balanced draws of 4 images differ by sampling noise (of the class mix) only.
    assert out0["noise_floor"]["stem"] > 0

    # Plate effect only: every one-class context equals a balanced one up to noise.
    plate = plate_idx[:, None] * np.array([5.0, 5.0])
    out = diagnostics.label_shift_bias(_stats_from_feature(plate + 0.01 * noise), table, train, test,
                                       n_controls=6, **kw)
    assert out["plate_to_plate"]["stem"] > 100 * out["one_class"]["stem"]
    # Without a class effect a one-class context is no further than another balanced one.
    assert out["one_class"]["stem"] < 3 * out["noise_floor"]["stem"]
    assert out["new_plate"]["stem"] > out["plate_to_plate"]["stem"]  # plate 2 is further away


def test_label_shift_bias_bad_input():
    table = _toy_table(controls=0)
    feature = np.zeros((len(table["plate"]), 1))
    rows = np.arange(len(feature))
    with pytest.raises(ValueError, match="no control wells"):
        diagnostics.label_shift_bias(_stats_from_feature(feature), table, rows, rows,
                                     n_perturbed=4, n_controls=2)
    one_plate = np.flatnonzero(table["plate"] == "p0")
    with pytest.raises(ValueError, match=">= 2 training plates"):
        diagnostics.label_shift_bias(_stats_from_feature(feature), table, one_plate, rows,
                                     n_perturbed=4, n_controls=0)
