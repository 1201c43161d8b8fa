"""Tests of jaxadapt.train.checkpoint: round trips, retention, shardings, damage."""

import os
import shutil

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxadapt.train.checkpoint import Checkpointer, abstract_like, tree_equal


class _State(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple


def _state(seed: int = 0) -> _State:
    rng = np.random.default_rng(seed)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        }
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = tx.init(params)
    # One real update so mu/nu/count are non-trivial.
    grads = jax.tree.map(jnp.ones_like, params)
    # optax's bias correction mixes a Python float and an int32 count, which the
    # test-wide strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        _, opt_state = tx.update(grads, opt_state, params)
    return _State(
        step=jnp.asarray(7, jnp.int32), params=params, batch_stats={}, opt_state=opt_state
    )


def test_round_trip_with_optax_state_and_meta(tmp_path):
    state = _state()
    meta = {"epoch": 3, "best_val_loss": 0.25, "history": [{"val_loss": 0.5}], "best": None}
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, {"state": state, "best": {"params": state.params}}, meta)
    template = {"state": _state(seed=1), "best": {"params": _state(1).params}}
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() == 3
        step, payload, got_meta = ck.restore_latest(template)
        assert ck.restore_meta(3) == meta
    assert step == 3 and got_meta == meta
    assert tree_equal(payload["state"], state)
    assert type(payload["state"].opt_state[1][0]) is type(state.opt_state[1][0])
    assert payload["state"].step.dtype == jnp.int32


def test_max_to_keep_and_empty_dir(tmp_path):
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        assert ck.latest_step() is None
        assert ck.restore_latest({"x": jnp.zeros(2)}) is None
        for s in range(1, 5):
            ck.save(s, {"x": jnp.full((2,), float(s))}, {"s": s})
        ck.wait()
        assert ck.all_steps() == [3, 4]
        _, payload, meta = ck.restore_latest({"x": jnp.zeros(2)})
    assert meta == {"s": 4}
    np.testing.assert_array_equal(payload["x"], [4.0, 4.0])


def test_restore_onto_mesh_and_plain(tmp_path):
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    x = jax.device_put(jnp.arange(4.0 * len(devices)).reshape(-1, 2), sharded)
    w = jax.device_put(jnp.arange(3.0), replicated)
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(1, {"x": x, "w": w}, {})
        # Onto the mesh: same shardings as the template.
        got, _ = ck.restore(1, {"x": jnp.zeros_like(x), "w": jnp.zeros_like(w)})
        got = ck.restore(1, abstract_like({"x": x, "w": w}))[0]
        assert got["x"].sharding == sharded and got["w"].sharding == replicated
        # Plain single-device arrays.
        plain, _ = ck.restore(1, {"x": jnp.zeros(x.shape), "w": jnp.zeros(3)})
    assert len(plain["x"].sharding.device_set) == 1
    np.testing.assert_array_equal(plain["x"], np.asarray(x))
    np.testing.assert_array_equal(got["w"], np.arange(3.0))


def test_killed_save_is_not_a_step(tmp_path):
    """orbax writes `<step>.orbax-checkpoint-tmp-*` and renames when complete."""
    d = tmp_path / "ck"
    with Checkpointer(d, async_save=False) as ck:
        ck.save(1, {"x": jnp.ones(2)}, {"s": 1})
    shutil.copytree(d / "1", d / "2.orbax-checkpoint-tmp-1234")  # a half save
    with Checkpointer(d) as ck:
        assert ck.all_steps() == [1]
        step, _, meta = ck.restore_latest({"x": jnp.zeros(2)})
        assert (step, meta) == (1, {"s": 1})
        ck.save(2, {"x": jnp.ones(2)}, {"s": 2})  # the step number is free again
        ck.wait()
        assert ck.all_steps() == [1, 2]


def _damage(step_dir) -> None:
    for root, _, files in os.walk(step_dir / "payload"):
        for f in files:
            os.remove(os.path.join(root, f))


def test_damaged_latest_falls_back_and_is_set_aside(tmp_path):
    d = tmp_path / "ck"
    with Checkpointer(d, async_save=False) as ck:
        ck.save(1, {"x": jnp.ones(2)}, {"s": 1})
        ck.save(2, {"x": jnp.ones(2)}, {"s": 2})
    _damage(d / "2")
    with Checkpointer(d) as ck:
        step, _, meta = ck.restore_latest({"x": jnp.zeros(2)})
        assert (step, meta) == (1, {"s": 1})
        assert ck.all_steps() == [1]
    assert any(n.startswith("2.unreadable-") for n in os.listdir(d))


def test_wrong_template_raises_and_keeps_steps(tmp_path):
    d = tmp_path / "ck"
    with Checkpointer(d, async_save=False) as ck:
        ck.save(1, {"x": jnp.ones(2)}, {})
    with Checkpointer(d) as ck:
        with pytest.raises(ValueError, match="(?s)ckpt_dir=.*fresh ckpt_dir"):
            ck.restore_latest({"y": {"z": jnp.zeros(5)}})
        assert ck.all_steps() == [1]  # nothing renamed


def test_bad_arguments(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="ckpt_dir=.*existing file.*directory"):
        Checkpointer(f)
    with pytest.raises(ValueError, match="max_to_keep=0.*>= 1"):
        Checkpointer(tmp_path / "ck", max_to_keep=0)


class _OldTrainState(flax.struct.PyTreeNode):
    """TrainState as it was before the `extra` field (BN-family checkpoints on disk)."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple


def _bn_state(cls, seed: int, **extra):
    s = _state(seed)
    return cls(step=s.step, params=s.params, batch_stats={"bn": {"mean": jnp.arange(3.0) + seed}},
               opt_state=s.opt_state, **extra)


def test_checkpoint_without_extra_restores_into_the_new_train_state(tmp_path):
    from jaxadapt.train.state import TrainState

    old = _bn_state(_OldTrainState, 0)
    with Checkpointer(tmp_path / "ck") as ck:  # the layout fit() wrote before `extra`
        ck.save(2, {"state": old, "best": {"params": old.params, "batch_stats": old.batch_stats}},
                {"epoch": 2})
    template = _bn_state(TrainState, 1)
    assert template.extra == {}
    with Checkpointer(tmp_path / "ck") as ck:
        step, payload, meta = ck.restore_latest(
            {"state": template, "best": {"params": template.params,
                                         "batch_stats": template.batch_stats}})
    got = payload["state"]
    assert step == 2 and meta == {"epoch": 2} and isinstance(got, TrainState)
    assert got.extra == {}
    for field in ("step", "params", "batch_stats", "opt_state"):
        assert tree_equal(getattr(got, field), getattr(old, field)), field
    assert type(got.opt_state[1][0]) is type(old.opt_state[1][0])
    assert tree_equal(payload["best"]["batch_stats"], old.batch_stats)


def test_extra_state_round_trips_and_is_not_invented(tmp_path):
    from jaxadapt.train.state import TrainState

    extra = {"teacher": {"w": jnp.ones((2, 3))}, "center": jnp.arange(4.0),
             "key": jax.random.key_data(jax.random.PRNGKey(3))}
    state = _bn_state(TrainState, 0, extra=extra)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, {"state": state}, {})
    template = _bn_state(TrainState, 1, extra=jax.tree.map(jnp.zeros_like, extra))
    with Checkpointer(tmp_path / "ck") as ck:
        _, payload, _ = ck.restore_latest({"state": template})
    assert tree_equal(payload["state"], state)
    # A template whose extra holds arrays cannot restore from a checkpoint without them.
    old = _bn_state(_OldTrainState, 0)
    with Checkpointer(tmp_path / "old") as ck:
        ck.save(1, {"state": old}, {})
    with Checkpointer(tmp_path / "old") as ck, pytest.raises(ValueError, match="no checkpoint step"):
        ck.restore_latest({"state": template})
