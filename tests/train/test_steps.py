"""Train / eval steps: loss goes down, masked rows carry no loss but shape BN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxadapt.models.resnet import BasicBlock, ResNet
from jaxadapt.train.state import TrainState, create_train_state
from jaxadapt.train.steps import make_eval_step, make_train_step

# XLA:CPU compiles threefry-based initializers ~7x slower than the "rbg" generator.
KEY = jax.random.key(0, impl="rbg")
MODEL = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=8, stem="small",
               num_classes=3, in_channels=5)
TX = optax.adam(1e-2)


def make_batch(seed=0, n=12):
    """Class-dependent channel means: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 3
    img = rng.normal(size=(n, 32, 32, 5)).astype(np.float32)
    img[..., 0] += 1.5 * label[:, None, None]
    mask = np.ones(n, np.float32)
    mask[-3:] = 0.0  # e.g. controls / padding
    label[-2:] = -1
    return {"image": jnp.asarray(img), "label": jnp.asarray(label, jnp.int32),
            "mask": jnp.asarray(mask)}


@pytest.fixture(scope="module")
def state():
    return create_train_state(MODEL, TX, KEY, (1, 32, 32, 5))


@pytest.fixture(scope="module")
def step():
    return jax.jit(make_train_step(MODEL, TX))


def test_create_train_state(state):
    assert isinstance(state, TrainState) and int(state.step) == 0
    assert set(state.batch_stats) >= {"stem_bn", "stage1_block1"}
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(TX.init(state.params))


def test_train_step_reduces_loss_and_updates_running_stats(state, step):
    batch = make_batch()
    s, losses = state, []
    for _ in range(12):
        s, m = step(s, batch)
        losses.append(float(m["loss"]))
    assert int(s.step) == 12 and float(m["count"]) == 9.0
    assert losses[-1] < 0.5 * losses[0], losses
    assert 0.0 <= float(m["accuracy"]) <= 1.0
    ra0, ra1 = state.batch_stats["stem_bn"]["mean"], s.batch_stats["stem_bn"]["mean"]
    assert not np.allclose(ra0, ra1)


def test_masked_rows_carry_no_loss_but_shape_bn(state, step):
    batch = make_batch()
    s1, m1 = step(state, batch)
    relabel = dict(batch, label=batch["label"].at[-3].set(2).at[-1].set(0))
    s2, m2 = step(state, relabel)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Their pixels shape the BN statistics, hence the loss of the other rows ...
    moved = dict(batch, image=batch["image"].at[-3:].add(5.0))
    _, m3 = step(state, moved)
    assert abs(float(m3["loss"]) - float(m1["loss"])) > 1e-4
    # ... unless stats_mask leaves them out.
    smask = jnp.arange(12) < 9
    _, m4 = step(state, dict(batch, stats_mask=smask))
    _, m5 = step(state, dict(moved, stats_mask=smask))
    np.testing.assert_allclose(m4["loss"], m5["loss"], rtol=1e-5)


def test_eval_step_masked_sums(state):
    batch = make_batch()
    out = jax.jit(make_eval_step(MODEL))(state, batch)
    logits = np.asarray(out["logits"], np.float64)
    assert logits.shape == (12, 3) and out["features"].shape == (12, 16)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lab = np.asarray(batch["label"])
    want = -sum(logp[i, lab[i]] for i in range(9))
    np.testing.assert_allclose(out["loss_sum"], want, rtol=1e-5)
    assert float(out["count"]) == 9.0
    assert float(out["correct"]) == float(np.sum(logits[:9].argmax(-1) == lab[:9]))
    with pytest.raises(ValueError, match="norm_mode='train'"):
        make_eval_step(MODEL, norm_mode="train")
