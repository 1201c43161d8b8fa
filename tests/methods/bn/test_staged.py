"""Staged evaluation of a traced function over chunks (the engine of plate_stats' carried
path), checked against a NumPy restatement of a three-round computation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.methods.bn import staged


B, D = 4, 3


def _f(a, b, x):
    """Three rounds: round 0 sums h(x); round 1 needs a (from round 0), round 2 needs b."""
    h = jnp.tanh(2.0 * x)
    g = jnp.exp(h - a)
    return jnp.sum(h, 0), jnp.sum(g, 0), jnp.sum((g + h) * b, 0), 3.0 * a


def _numpy(x):
    h = np.tanh(2.0 * x)
    a = h.sum(0) / len(x)
    g = np.exp(h - a)
    b = g.sum(0)
    return a, b, ((g + h) * b).sum(0)


def _plan():
    z = jax.ShapeDtypeStruct((D,), jnp.float32)
    closed = jax.make_jaxpr(_f)(z, z, jax.ShapeDtypeStruct((B, D), jnp.float32))
    return staged.plan(closed, ready=[1, 2, 0], per_chunk=[False, False, True],
                       out_stage=[0, 1, 2, 1], out_reduce=["sum", "sum", "sum", "same"])


def _run(plan, x, store, budget=float("inf")):
    inputs, got = [jnp.zeros(D), jnp.zeros(D), None], {}

    def finish(k, outs):
        got.update(outs)
        return {0: outs[0] / len(x)} if k == 0 else {1: outs[1]} if k == 1 else {}

    chunks = ((x[s:s + B],) for s in range(0, len(x), B))
    ok = staged.run(plan, inputs, chunks, store, finish, budget)
    return ok, inputs, got


@pytest.mark.parametrize("kind", staged.KINDS)
def test_stages_equal_numpy_and_compute_each_op_once(tmp_path, kind):
    x = np.random.default_rng(0).normal(size=(3 * B, D)).astype(np.float32)
    plan = _plan()
    assert len(plan.stages) == 3
    prims = [p for stage in plan.chunk_prims for p in stage]
    assert prims.count("tanh") == 1 and prims.count("exp") == 1  # nothing recomputed
    # carried: h [B, D] (stage 0 -> 1) and g + h (1 -> 2: the add runs as soon as g
    # exists); h is freed chunk by chunk as g + h arrives, so one [B, D] at the peak
    assert plan.carry_nbytes == (B * D * 4, B * D * 4)
    assert [(s.carry_in, s.carry_out) for s in plan.stages] == [((), (0,)), ((0,), (1,)),
                                                                ((1,), ())]
    assert plan.peak_nbytes == B * D * 4
    store = staged.CarryStore(kind, str(tmp_path))
    ok, inputs, got = _run(plan, x, store)
    a, b, s2 = _numpy(x)
    assert ok
    np.testing.assert_allclose(inputs[0], a, rtol=1e-6)
    np.testing.assert_allclose(inputs[1], b, rtol=1e-5)
    np.testing.assert_allclose(got[2], s2, rtol=1e-5)
    np.testing.assert_allclose(got[3], 3.0 * a, rtol=1e-6)  # "same": not summed over chunks
    assert store.peak == 3 * plan.peak_nbytes and store.nbytes == 0  # freed as read
    if kind == "disk":
        assert len(os.listdir(tmp_path)) == 1  # the spill folder, empty by now
    store.close()
    assert os.listdir(tmp_path) == []


def test_budget_stops_stage_zero_before_anything_is_finished():
    x = np.random.default_rng(1).normal(size=(3 * B, D)).astype(np.float32)
    plan = _plan()
    store = staged.CarryStore()
    ok, inputs, got = _run(plan, x, store, budget=2.5 * plan.peak_nbytes)
    assert not ok and got == {} and float(jnp.abs(inputs[0]).max()) == 0.0
    store.close()
    with pytest.raises(ValueError, match="kind='gpu'"):
        staged.CarryStore("gpu")


def test_unstageable_outputs_raise():
    z = jax.ShapeDtypeStruct((D,), jnp.float32)
    closed = jax.make_jaxpr(_f)(z, z, jax.ShapeDtypeStruct((B, D), jnp.float32))
    with pytest.raises(ValueError, match="output 1 is needed at stage 0 but depends on "
                                         "inputs ready at stage 1"):
        staged.plan(closed, [1, 2, 0], [False, False, True], [0, 0, 2, 1], ["sum"] * 4)
    with pytest.raises(ValueError, match="output 0 changes from chunk to chunk"):
        staged.plan(closed, [1, 2, 0], [False, False, True], [0, 1, 2, 1], ["same"] * 4)
