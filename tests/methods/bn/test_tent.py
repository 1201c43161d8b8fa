"""TENT against a hand restatement of the reference (entropy grads + Adam by hand)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxadapt.methods.base import UnitBatch as Batch
from jaxadapt.methods.bn import tent as tent_lib


def _images(n, seed):
    return (np.random.default_rng(seed).normal(size=(n, 32, 32, 2)) * 2 + 1).astype(np.float32)


def _restated_loss(model, params, batch_stats, x, mask):
    """Reference: BN on batch statistics (real rows), mean softmax entropy of real rows."""
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x,
                            norm_mode="batch", stats_mask=mask)
    p = jax.nn.softmax(logits)
    ent = -jnp.sum(p * jnp.log(p), -1)
    return jnp.sum(ent * mask.astype(jnp.float32)) / jnp.sum(mask.astype(jnp.float32)), logits


def test_two_steps_match_hand_adam_on_bn_affine(tiny):
    model, v = tiny
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    adapter = tent_lib.tent_adapter(model, lr)
    state = adapter.init(v)
    params = traverse_util.flatten_dict(jax.tree.map(np.asarray, v["params"]))
    bn_keys = [k for k in params if k[-1] in ("scale", "bias") and "bn" in k[-2]]
    assert len(bn_keys) == 12  # 6 BN layers x (scale, bias)
    m = {k: 0.0 for k in bn_keys}
    s = {k: 0.0 for k in bn_keys}
    batches = [(_images(6, 2), np.array([1, 1, 1, 1, 0, 0], bool)),
               (_images(6, 3), np.ones(6, bool))]
    for t, (x, mask) in enumerate(batches, start=1):
        state, logits = adapter.step(state, x, mask)
        (_, want_logits), g = jax.value_and_grad(
            lambda p: _restated_loss(model, p, v["batch_stats"], jnp.asarray(x), jnp.asarray(mask)),
            has_aux=True)(traverse_util.unflatten_dict(params))
        np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(want_logits)[mask],
                                   rtol=1e-5, atol=1e-5)  # pre-update forward, real rows
        g = traverse_util.flatten_dict(jax.tree.map(np.asarray, g))
        for k in bn_keys:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            s[k] = b2 * s[k] + (1 - b2) * g[k] ** 2
            params[k] = params[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(s[k] / (1 - b2**t)) + eps)
    got = traverse_util.flatten_dict(state.variables["params"])
    for k, want in params.items():
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-6, err_msg=str(k))
        if k not in bn_keys:  # conv kernels and head untouched, bit for bit
            np.testing.assert_array_equal(got[k], traverse_util.flatten_dict(v["params"])[k])
    moved = [k for k in bn_keys if not np.allclose(got[k], traverse_util.flatten_dict(v["params"])[k])]
    assert len(moved) == len(bn_keys)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                     state.variables["batch_stats"], v["batch_stats"]))


def test_padding_rows_do_not_matter(tiny):
    model, v = tiny
    adapter = tent_lib.tent_adapter(model)
    x, mask = _images(5, 4), np.array([1, 1, 1, 0, 0], bool)
    y = x.copy()
    y[~mask] = np.nan
    sa, la = adapter.step(adapter.init(v), x, mask)
    sb, lb = adapter.step(adapter.init(v), y, mask)
    np.testing.assert_array_equal(np.asarray(la)[mask], np.asarray(lb)[mask])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), sa.variables, sb.variables))


class _Unit:
    def __init__(self, name, images, bs):
        self.name, self.images, self.bs = name, images, bs

    def batches(self):
        for s in range(0, len(self.images), self.bs):
            im = self.images[s:s + self.bs]
            pad = self.bs - len(im)
            yield Batch(np.concatenate([im, np.zeros((pad,) + im.shape[1:], np.float32)]),
                        np.r_[np.ones(len(im), bool), np.zeros(pad, bool)])


def test_method_resets_per_unit_and_scores_each_sample_once(tiny):
    model, v = tiny
    method = tent_lib.tent(model)
    unit = _Unit("plate_a", _images(7, 5), 4)
    first = method.predict_unit(v, unit)
    assert first.shape == (7, 3)
    # first batch: forward before any update = plain batch-statistics forward
    want0 = model.apply(v, unit.images[:4], norm_mode="batch")[0]
    np.testing.assert_allclose(first[:4], want0, rtol=1e-5, atol=1e-5)
    # episodic: a second run on the same unit starts from the trained weights again
    np.testing.assert_allclose(method.predict_unit(v, unit), first, rtol=1e-6, atol=1e-6)
    # the second batch sees adapted parameters (differs from a fresh batch-stat forward)
    adapter = tent_lib.tent_adapter(model)
    st, _ = adapter.step(adapter.init(v), unit.images[:4], None)
    b2 = list(unit.batches())[1]
    _, l2 = adapter.step(st, b2.image, b2.mask)
    np.testing.assert_allclose(first[4:], np.asarray(l2)[:3], rtol=1e-5, atol=1e-5)
    unadapted = model.apply(v, b2.image, norm_mode="batch", stats_mask=b2.mask)[0]
    assert not np.allclose(first[4:], np.asarray(unadapted)[:3], atol=1e-6)


def test_bad_mask_errors(tiny):
    model, v = tiny
    adapter = tent_lib.tent_adapter(model)
    with pytest.raises(ValueError, match="mask selects no image"):
        adapter.step(adapter.init(v), _images(2, 6), np.zeros(2, bool))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        adapter.step(adapter.init(v), _images(2, 6), np.ones(3, bool))
