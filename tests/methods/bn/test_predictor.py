"""PlatePredictor: whole-plate statistics once, ensemble mean softmax + entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.methods.bn import stats as bn
from jaxadapt.methods.bn.predictor import PlatePredictor, entropy
from jaxadapt.models.resnet import BasicBlock, ResNet


@pytest.fixture(scope="module")
def members():
    model = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=4, stem="small",
                   num_classes=3, in_channels=2, zero_init_residual=False)
    out = []
    for seed in (0, 1):
        v = model.init(jax.random.key(seed, impl="rbg"), jnp.zeros((1, 32, 32, 2)),
                       norm_mode="running")
        rng = np.random.default_rng(seed)
        v = jax.tree.map(lambda a: jnp.asarray(a + 0.3 * rng.normal(size=a.shape), a.dtype), v)
        v["batch_stats"] = jax.tree.map(jnp.abs, v["batch_stats"])
        out.append(v)
    return model, out


def _images(n, seed, loc=1.0):
    return (np.random.default_rng(seed).normal(size=(n, 32, 32, 2)) * 2 + loc).astype(np.float32)


def test_single_member_equals_apply_with_stats(members):
    model, (v, _) = members
    plate, ctrl = _images(9, 1), _images(5, 2, loc=0.0)
    pred = PlatePredictor(model, v, context="both", batch_size=4)
    state = pred.adapt([plate[:6], plate[6:]], ctrl)
    stats = bn.context_stats(model, v, np.concatenate([plate, ctrl]))
    probs, unc = pred.predict(state, plate)  # 9 images in padded chunks of 4
    want = jax.nn.softmax(bn.apply_with_stats(model, v, stats, plate))
    np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(unc, -np.sum(want * np.log(want), -1), rtol=1e-4, atol=1e-5)
    # controls-only and images-only contexts use just those images
    st_c = PlatePredictor(model, v, context="controls", batch_size=4).adapt(None, ctrl)
    want_c = bn.context_stats(model, v, ctrl)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                            st_c.norm_stats[0], want_c))) < 1e-5


def test_ensemble_is_mean_softmax_and_entropy_of_mean(members):
    model, vs = members
    plate, ctrl = _images(6, 3), _images(4, 4, loc=0.0)
    pred = PlatePredictor(model, vs, context="images", batch_size=8)
    state = pred.adapt(plate, ctrl)
    probs, unc = pred.predict(state, plate)
    each = [np.asarray(jax.nn.softmax(bn.apply_with_stats(
        model, v, bn.context_stats(model, v, plate), plate))) for v in vs]
    assert not np.allclose(each[0], each[1], atol=1e-3)
    mean = (each[0] + each[1]) / 2
    np.testing.assert_allclose(probs, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(unc, -np.sum(mean * np.log(mean), -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_entropy_formula_handles_zeros():
    p = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(entropy(p), [0.0, np.log(2), np.log(3)], rtol=1e-6)


def test_errors_name_the_fix(members):
    model, (v, _) = members
    with pytest.raises(ValueError, match="needs the plate's negative controls.*context='images'"):
        PlatePredictor(model, v, context="both").adapt(_images(3, 5), None)
    with pytest.raises(ValueError, match="needs the plate's negative controls"):
        PlatePredictor(model, v, context="controls").adapt(_images(3, 5), [])
    with pytest.raises(ValueError, match="context='wells'"):
        PlatePredictor(model, v, context="wells")
    bad = _images(3, 6)
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite pixel values.*rows \[1\]"):
        PlatePredictor(model, v, context="images").adapt(bad)
