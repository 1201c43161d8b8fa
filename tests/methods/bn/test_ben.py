"""BEN as the reference trains it: episodes normalized with constant control statistics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tests.methods.conftest import EPISODE_MODEL, KEY, S

from jaxadapt.methods import registry
from jaxadapt.methods.bn import arm, ben, stats as bn
from jaxadapt.train import parallel
from jaxadapt.train.state import create_train_state


MODEL = EPISODE_MODEL
TX = optax.adam(1e-2)
E, L, N = 4, 4, 3


@pytest.fixture(scope="module")
def state():
    s = create_train_state(MODEL, TX, KEY, (1, S, S, 5))
    # Non-trivial running averages and affine parameters, so a wrong path would show.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: a + 0.2 * rng.normal(size=a.shape).astype(a.dtype),
                          s.params)
    return s.replace(params=params,
                     batch_stats=jax.tree.map(lambda v: v + 0.3, s.batch_stats))


def episodes(seed=0, e=E):
    """Perturbed rows first, then controls (the sampler's layout); plate effects."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(e, L + N, S, S, 5)).astype(np.float32)
    img += rng.normal(size=(e, 1, 1, 1, 5)).astype(np.float32) * 2
    label = rng.integers(0, 3, (e, L + N)).astype(np.int32)
    is_control = np.zeros((e, L + N), bool)
    is_control[:, L:] = True
    label[:, L:] = -1
    img[:, :L, ..., 0] += label[:, :L, None, None]
    img[:, L:] += 0.7  # controls distributed differently from the perturbed images
    return {"image": img, "label": label, "is_control": is_control,
            "mask": np.ones((e, L + N), bool)}


@jax.jit
def _masked_apply(variables, images, stats_mask):
    """One batch-mode pass whose statistics rows are ``stats_mask`` (gradients through)."""
    return MODEL.apply(variables, images, norm_mode="batch", stats_mask=stats_mask)[0]


def _forward(state, images):
    logits, new = ben.control_stats_forward(MODEL, state.params, state.batch_stats,
                                            jnp.asarray(images), L)
    return np.asarray(logits), new


def test_forward_normalizes_with_the_controls_alone(state):
    b = episodes()
    got, _ = _forward(state, b["image"])
    assert got.shape == (E, L, 3)
    for e in range(E):  # one masked batch-mode pass: statistics rows = the controls
        want = _masked_apply(state.variables(), b["image"][e], b["is_control"][e])
        np.testing.assert_allclose(got[e], np.asarray(want)[:L], rtol=1e-4, atol=1e-4)
    # Not the statistics of the whole episode (CS-ARM-BN) nor of the perturbed (ARM-BN).
    cs, _ = arm.episode_forward(MODEL, state.params, state.batch_stats, b["image"])
    assert not np.allclose(got, np.asarray(cs)[:, :L], atol=1e-3)


def test_perturbed_images_do_not_influence_the_statistics(state):
    b = episodes(1)
    base, new = _forward(state, b["image"])
    img = b["image"].copy()
    img[:, 1:L] = img[:, 1:L] * 4.0 + 3.0  # every perturbed row but the first
    out, new2 = _forward(state, img)
    np.testing.assert_allclose(out[:, 0], base[:, 0], rtol=1e-5, atol=1e-5)
    for a, c in zip(jax.tree.leaves(new), jax.tree.leaves(new2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    img = b["image"].copy()
    img[:, L:] += 1.0  # the controls do shape them
    out, _ = _forward(state, img)
    assert not np.allclose(out[:, 0], base[:, 0], atol=1e-3)


def test_running_averages_step_towards_the_control_statistics(state):
    b = episodes(2)
    _, new = _forward(state, b["image"])
    _, want = arm.episode_forward(MODEL, state.params, state.batch_stats, b["image"][:, L:])
    for a, c in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)


def _mean_ce(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def test_gradient_treats_the_control_statistics_as_constants(state):
    e = 2
    b = episodes(3, e=e)
    loss = lambda p: arm.episode_loss(MODEL, p, state.batch_stats, b["image"],  # noqa: E731
                                      b["label"], b["is_control"], controls_from=L)
    value, grad = jax.jit(jax.value_and_grad(loss))(state.params)
    # The same loss with each episode's control statistics computed apart, frozen as
    # NumPy data and stacked over episodes.
    stats = [jax.tree.map(np.asarray, bn.context_stats(MODEL, state.variables(),
                                                       b["image"][k, L:])) for k in range(e)]
    stats = jax.tree.map(lambda *a: np.stack(a), *stats)

    @jax.jit
    def fixed(params):
        def one(x, y, st):
            v = {"params": params, "batch_stats": state.batch_stats, "norm_stats": st}
            return _mean_ce(MODEL.apply(v, x, norm_mode="given")[0], y)
        return jnp.mean(jax.vmap(one)(b["image"][:, :L], b["label"][:, :L], stats))

    want_value, want = jax.value_and_grad(fixed)(state.params)
    assert float(value) == pytest.approx(float(want_value), rel=1e-5)
    for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want)):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-3, atol=1e-5)
    # Finite differences of the frozen-statistics loss agree with that gradient...
    rng = np.random.default_rng(0)
    d = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), state.params)
    norm = np.sqrt(sum(float(jnp.vdot(v, v)) for v in jax.tree.leaves(d)))
    d = jax.tree.map(lambda v: v / norm, d)  # a unit direction: FD stays in the linear range
    eps = 1e-2
    shifted = lambda s: jax.tree.map(lambda p, v: p + s * v, state.params, d)  # noqa: E731
    fd = (float(fixed(shifted(eps))) - float(fixed(shifted(-eps)))) / (2 * eps)
    dot = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
    assert dot == pytest.approx(fd, rel=2e-2, abs=1e-4)

    # ...and differ from the gradient through the statistics (what stop_gradient removes).
    @jax.grad
    def through(params):
        v = {"params": params, "batch_stats": state.batch_stats}
        logits = jax.vmap(lambda x, m: _masked_apply(v, x, m))(b["image"], b["is_control"])
        return jnp.mean(jax.vmap(_mean_ce)(logits[:, :L], b["label"][:, :L]))

    other = jax.jit(through)(state.params)
    assert max(float(jnp.max(jnp.abs(g - o))) for g, o in
               zip(jax.tree.leaves(grad), jax.tree.leaves(other))) > 1e-3


def test_train_step_learns_and_scores_only_the_perturbed(state):
    step = jax.jit(arm.make_episodic_train_step(MODEL, TX, controls_from=L))
    b = episodes(4)
    s, losses = state, []
    for _ in range(10):
        s, m = step(s, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] and float(m["count"]) == E * L
    ev = jax.jit(arm.make_episodic_eval_step(MODEL, controls_from=L))(s, b)
    assert ev["loss_per_episode"].shape == (E,) and np.isfinite(float(ev["loss"]))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices")
def test_ben_step_parallel_equals_single_device(state):
    step = arm.make_episodic_train_step(MODEL, TX, controls_from=L)
    mesh = parallel.make_data_mesh()
    single, para = jax.jit(step), parallel.parallel_train_step(step, mesh)
    s1, s8 = state, parallel.replicate(state, mesh)
    b = episodes(10, e=8)
    s1, m1 = single(s1, b)
    s8, m8 = para(s8, parallel.shard_batch(b, mesh))
    assert float(m1["loss"]) == pytest.approx(float(m8["loss"]), rel=1e-5)
    for a, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-4, atol=2e-5)


def test_episodes_without_controls_are_refused(state):
    b = episodes(5)
    with pytest.raises(ValueError, match="n_controls >= 1"):
        ben.control_stats_forward(MODEL, state.params, state.batch_stats,
                                  jnp.asarray(b["image"][:, :L]), L)


def test_registry_ben_is_trained_by_its_own_recipe():
    # Test-time behaviour (pooled statistics of all the unit's controls, the fallback
    # without controls) is tested in test_bn.py::test_ben_uses_only_controls.
    method = registry.make_method("ben", MODEL, ml_collections.ConfigDict())
    assert method.trainer == "ben" and "L" in method.ignores
