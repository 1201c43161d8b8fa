"""DINO pure functions against NumPy float64 restatements of facebookresearch/dino."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.methods.coda import dino, dino_optim
from jaxadapt.train.parallel import make_data_mesh, replicate, shard_batch


KEY = jax.random.key(0, impl="rbg")
K = 12  # head output dimension


# ----------------------------------------------------------------------------- references


def ref_loss(s, t, c, ts, tt, n_global):
    """DINOLoss.forward, restated: loops over (teacher view, student view) pairs."""
    b = t.shape[0] // n_global
    s_chunks = np.split(s / ts, s.shape[0] // b)
    z = (t - c) / tt
    q = np.exp(z - z.max(-1, keepdims=True))
    q = np.split(q / q.sum(-1, keepdims=True), n_global)
    total, n = 0.0, 0
    for iq, qi in enumerate(q):
        for v, sv in enumerate(s_chunks):
            if v == iq:
                continue
            log_p = sv - sv.max(-1, keepdims=True)
            log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
            total += np.mean(np.sum(-qi * log_p, -1))
            n += 1
    return total / n


def ref_cosine(base, final, epochs, niter, warmup_epochs=0, start=0.0):
    """cosine_scheduler, restated entry by entry."""
    n_warm, total = warmup_epochs * niter, epochs * niter
    out = []
    for i in range(total):
        if i < n_warm:
            out.append(start + (base - start) * i / (n_warm - 1) if n_warm > 1 else start)
        else:
            j, n_cos = i - n_warm, total - n_warm
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / n_cos)))
    return np.array(out)


# ----------------------------------------------------------------------------- stand-in model


class WeightNormed(nn.Module):
    """x @ (V / ||V|| per output column), V at ("last_layer", "kernel") as in DINOHead."""

    @nn.compact
    def __call__(self, h):
        v = self.param("kernel", nn.initializers.normal(1.0), (h.shape[-1], K))
        return h @ (v / jnp.linalg.norm(v, axis=0, keepdims=True))


class StandIn(nn.Module):
    """Per-pixel dense, pool, Dense, LayerNorm, bottleneck, L2, weight-normed last layer."""

    @nn.compact
    def __call__(self, crops):
        conv, fc, ln = nn.Dense(4, name="conv"), nn.Dense(8, name="fc"), \
            nn.LayerNorm(name="ln")
        # crop-major: pooled features of every crop (any size), stacked, then the head
        h = jnp.concatenate([nn.relu(conv(x)).mean((1, 2)) for x in crops], 0)
        h = nn.Dense(6, name="bottleneck")(nn.gelu(ln(fc(h)), approximate=False))
        h = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
        return WeightNormed(name="last_layer")(h)


MODEL = StandIn()


def apply_fn(params, crops):
    return MODEL.apply({"params": params}, crops)


@pytest.fixture(scope="module")
def params():
    return jax.jit(MODEL.init)(KEY, [jnp.zeros((1, 8, 8, 3))])["params"]


def _batch(b=8, n_local=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"global": rng.normal(size=(b, 2, 8, 8, 3)).astype(np.float32),
            "local": rng.normal(size=(b, n_local, 4, 4, 3)).astype(np.float32)}


# ----------------------------------------------------------------------------- loss, centre, EMA


@pytest.mark.parametrize("n_global,n_crops", [(2, 6), (2, 2), (1, 3)])
def test_loss_centre_ema_match_reference_float64(n_global, n_crops):
    rng = np.random.default_rng(n_crops)
    b = 5
    s, t = rng.normal(size=(n_crops * b, K)) * 3, rng.normal(size=(n_global * b, K)) * 2
    c = rng.normal(size=(1, K)) * 0.5
    teacher = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    student = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    with jax.enable_x64(True):
        got = dino.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c),
                             student_temp=0.1, teacher_temp=0.04, n_global=n_global)
        assert got.dtype == jnp.float64
        new_c = dino.update_centre(jnp.asarray(c), jnp.asarray(t), 0.9)
        ema = dino.ema_update(jax.tree.map(jnp.asarray, teacher),
                              jax.tree.map(jnp.asarray, student), 0.996)
        # No gradient flows into the teacher outputs or the centre.
        g_t, g_c = jax.grad(lambda t_, c_: dino.dino_loss(
            jnp.asarray(s), t_, c_, student_temp=0.1, teacher_temp=0.04,
            n_global=n_global), argnums=(0, 1))(jnp.asarray(t), jnp.asarray(c))
    want = ref_loss(s, t, c, 0.1, 0.04, n_global)
    np.testing.assert_allclose(float(got), want, rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.asarray(new_c), 0.9 * c + 0.1 * t.mean(0, keepdims=True),
                               rtol=1e-10, atol=1e-12)
    for k in teacher:
        np.testing.assert_allclose(np.asarray(ema[k]), teacher[k] * 0.996 + 0.004 * student[k],
                                   rtol=1e-10, atol=1e-12)
    assert not np.any(np.asarray(g_t)) and not np.any(np.asarray(g_c))


def test_loss_rejects_ragged_rows():
    with pytest.raises(ValueError, match="n_global=2"):
        dino.dino_loss(jnp.zeros((6, K)), jnp.zeros((3, K)), jnp.zeros((1, K)),
                       student_temp=0.1, teacher_temp=0.04)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("warm", [0, 1, 3])
def test_cosine_schedule_matches_reference(warm):
    got = dino_optim.cosine_schedule(2e-3, 1e-6, 5, 7, warmup_epochs=warm, start_warmup_value=0.0)
    want = ref_cosine(2e-3, 1e-6, 5, 7, warm)
    assert got.shape == (35,)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-18)
    if warm:
        assert got[warm * 7 - 1] == 2e-3  # warm-up linspace includes its end point
    assert got[-1] > 1e-6  # the cosine never reaches the final value


def test_dino_schedules():
    s = dino_optim.make_dino_schedules(epochs=40, niter_per_ep=3, batch_size=512)
    np.testing.assert_allclose(s.lr, ref_cosine(5e-4 * 2, 1e-6, 40, 3, 10), rtol=1e-6)
    np.testing.assert_allclose(s.wd, ref_cosine(0.04, 0.4, 40, 3), rtol=1e-6)
    np.testing.assert_allclose(s.momentum, ref_cosine(0.996, 1.0, 40, 3), rtol=1e-7)
    per_epoch = [0.04 + (0.07 - 0.04) * e / 29 if e < 30 else 0.07 for e in range(40)]
    np.testing.assert_allclose(s.teacher_temp, np.repeat(per_epoch, 3), rtol=1e-6)
    assert s.freeze_steps == 3 and s.lr.dtype == jnp.float32
    assert float(dino_optim.at_step(s.lr, jnp.int32(10_000))) == float(s.lr[-1])
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs=30"):
        dino_optim.make_dino_schedules(epochs=10, niter_per_ep=3, batch_size=8)


# ----------------------------------------------------------------------------- clipping


def test_clip_per_parameter_and_global():
    rng = np.random.default_rng(0)
    g = {"big": rng.normal(size=(4, 5)) * 10, "small": rng.normal(size=(3,)) * 1e-2,
         "edge": np.full((4,), 1.5)}  # norm 3.0 exactly: coef = 3/(3+1e-6) < 1 scales
    g32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    got = dino_optim.clip_per_parameter(g32, 3.0)
    for k, x in g.items():
        coef = 3.0 / (np.linalg.norm(x) + 1e-6)
        want = x * coef if coef < 1 else x
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-5)
    assert np.linalg.norm(np.asarray(got["big"])) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(got["small"]), np.asarray(g32["small"]))
    total = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    glob = dino_optim.clip_per_parameter(g32, 1.0, global_norm=True)
    for k, x in g.items():  # torch clip_grad_norm_: one coefficient for every tensor
        np.testing.assert_allclose(np.asarray(glob[k]), x / (total + 1e-6), rtol=1e-5)
    assert dino_optim.clip_per_parameter(g32, 0.0) is g32


# ----------------------------------------------------------------------------- optimizer


def test_decay_and_freeze_masks(params):
    p = params
    dm, fm = dino_optim.decay_mask(p), dino_optim.last_layer_mask(p)
    assert dm["conv"] == {"kernel": True, "bias": False}
    assert dm["ln"] == {"scale": False, "bias": False}  # 1-D tensors
    assert dm["last_layer"] == {"kernel": True} and fm["last_layer"] == {"kernel": True}
    assert sum(jax.tree.leaves(fm)) == 1


def ref_adamw(params, grads_seq, lr, wd, decay, frozen, freeze_steps, b1=0.9, b2=0.999,
              eps=1e-8):
    """torch.optim.AdamW per parameter (own step count, skipped when grad is None)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    st = {k: [0, np.zeros_like(v), np.zeros_like(v)] for k, v in p.items()}
    for it, grads in enumerate(grads_seq):
        for k, g in grads.items():
            if frozen[k] and it < freeze_steps:
                continue  # grad is None: nothing happens to this parameter
            s = st[k]
            s[0] += 1
            p[k] = p[k] * (1 - lr[it] * (wd[it] if decay[k] else 0.0))
            s[1] = b1 * s[1] + (1 - b1) * g
            s[2] = b2 * s[2] + (1 - b2) * g * g
            denom = np.sqrt(s[2]) / np.sqrt(1 - b2 ** s[0]) + eps
            p[k] = p[k] - lr[it] / (1 - b1 ** s[0]) * s[1] / denom
    return p, st


def test_adamw_matches_torch_rule_and_freezes_last_layer():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
              "bias": rng.normal(size=(4,)).astype(np.float32),
              "last_layer": rng.normal(size=(4, 5)).astype(np.float32)}
    decay = {"w": True, "bias": False, "last_layer": True}
    frozen = {"w": False, "bias": False, "last_layer": True}
    lr, wd = np.linspace(0.1, 0.01, 6), np.linspace(0.04, 0.4, 6)
    tx = dino_optim.dino_adamw(lr, wd, decay=decay, frozen=frozen, freeze_steps=3)
    grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
                 for _ in range(6)]
    p = jax.tree.map(jnp.asarray, params)
    st = tx.init(p)
    update = jax.jit(tx.update)
    for it, g in enumerate(grads_seq):
        u, st = update(jax.tree.map(jnp.asarray, g), st, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        if it == 2:  # end of the frozen epoch: last layer, its moments and count untouched
            np.testing.assert_array_equal(np.asarray(p["last_layer"]), params["last_layer"])
            assert not np.any(np.asarray(st.mu["last_layer"]))
            assert not np.any(np.asarray(st.nu["last_layer"]))
            assert int(st.count["last_layer"]) == 0 and int(st.count["w"]) == 3
    want, ref_st = ref_adamw(params, grads_seq, lr, wd, decay, frozen, 3)
    for k in params:
        # float32 Adam vs float64: m / sqrt(v) amplifies rounding by ~lr = 0.1.
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=5e-6)
        np.testing.assert_allclose(np.asarray(st.mu[k]), ref_st[k][1], rtol=2e-5, atol=1e-7)
        assert int(st.count[k]) == ref_st[k][0]
    assert int(st.count["last_layer"]) == 3 and int(st.step) == 6


# ----------------------------------------------------------------------------- monitor


def test_monitor_numbers_and_collapse_warning():
    b, rng = 4, np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4 * b, K)), jnp.float32)
    # Uniform collapse: every teacher output equal -> entropy log K exactly.
    flat = dino.monitor(s, jnp.ones((2 * b, K)), jnp.ones((1, K)), (0.1, 0.04))
    assert float(flat["teacher_entropy"]) == pytest.approx(math.log(K), rel=1e-6)
    assert float(flat["centre_norm"]) == pytest.approx(math.sqrt(K), rel=1e-6)
    ls = jax.nn.log_softmax(s / 0.1).reshape(4, b, K)
    ce = [-(ls[v] / K).sum(-1).mean() for iq in range(2) for v in range(4) if v != iq]
    assert float(flat["kl"]) == pytest.approx(float(np.mean(ce)) - math.log(K), rel=1e-5)
    msg = dino.collapse_warning({**flat, "step": 7}, out_dim=K)
    assert "uniform" in msg and f"{math.log(K):.4g}" in msg and "step=7" in msg
    assert "has not left the uniform regime at step 7" in msg
    # One dimension dominates: the teacher puts all mass on output 3.
    t = np.zeros((2 * b, K), np.float32)
    t[:, 3] = 5.0
    peak = dino.monitor(s, jnp.asarray(t), jnp.zeros((1, K)), (0.1, 0.04))
    assert float(peak["teacher_entropy"]) < 1e-6
    want_kl = np.mean([-np.asarray(ls[v])[:, 3].mean() for iq in range(2) for v in range(4)
                       if v != iq])
    assert float(peak["kl"]) == pytest.approx(want_kl, rel=1e-5)
    assert "one dimension" in dino.collapse_warning(peak, out_dim=K)
    healthy = dino.monitor(s, jnp.asarray(rng.normal(size=(2 * b, K)) * 0.1, jnp.float32),
                           jnp.zeros((1, K)), (0.1, 0.04))
    assert dino.collapse_warning(healthy, out_dim=K) is None


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def setup(params):
    """Schedules (3 epochs x 2 steps, freeze 1 epoch), optimizer, state, jitted step."""
    sched = dino_optim.make_dino_schedules(epochs=3, niter_per_ep=2, batch_size=16,
                                           warmup_epochs=1, warmup_teacher_temp_epochs=2,
                                           base_lr=0.05, momentum_teacher=0.9)
    tx = dino_optim.make_dino_optimizer(sched)
    state = dino.create_dino_state(params, tx, KEY, K)
    # A teacher different from the student and a non-zero centre, so order mistakes show.
    state = state.replace(teacher=jax.tree.map(lambda x: x * 0.9, params),
                          centre=jnp.linspace(-0.1, 0.1, K, dtype=jnp.float32)[None])
    return sched, tx, state, jax.jit(dino.make_dino_step(apply_fn, tx, sched, clip_grad=3.0))


def test_step_composes_the_pure_functions_in_reference_order(params, setup):
    sched, tx, state, step = setup
    b = jax.tree.map(jnp.asarray, _batch(b=16))
    new, m = step(state, b)

    @jax.jit  # the same pure functions by hand, in the reference's order
    def by_hand(state, b):
        crops = [b["global"][:, 0], b["global"][:, 1], b["local"][:, 0], b["local"][:, 1]]
        t_out = apply_fn(state.teacher, crops[:2])
        loss, g = jax.value_and_grad(lambda p: dino.dino_loss(
            apply_fn(p, crops), t_out, state.centre, student_temp=0.1,
            teacher_temp=sched.teacher_temp[0]))(state.params)
        u, _ = tx.update(dino_optim.clip_per_parameter(g, 3.0), state.opt_state, state.params)
        p1 = jax.tree.map(lambda a, d: a + d, state.params, u)
        return loss, {"params": p1,
                      "teacher": dino.ema_update(state.teacher, p1, sched.momentum[0]),
                      "centre": dino.update_centre(state.centre, t_out)}

    loss, want = by_hand(state, b)
    for name, tree in want.items():
        for a, w in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(tree)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-6)
    # Epoch 0: the last layer does not move; step 0 of the lr warm-up is lr 0 exactly.
    assert float(m["lr"]) == 0.0 and int(new.step) == 1
    np.testing.assert_array_equal(np.asarray(new.params["last_layer"]["kernel"]),
                                  np.asarray(params["last_layer"]["kernel"]))
    for k in ("teacher_entropy", "kl", "centre_norm", "grad_norm"):
        assert np.isfinite(float(m[k]))
    with pytest.raises(ValueError, match="n_global=2"):
        step(new, {"global": b["global"][:, :1], "local": b["local"]})


def test_frozen_last_layer_through_the_step(params, setup):
    _, _, state, step = setup  # freeze = 1 epoch = 2 steps
    v0 = np.asarray(params["last_layer"]["kernel"])
    for i in range(3):
        state, _ = step(state, jax.tree.map(jnp.asarray, _batch(b=16, seed=i)))
        ll = np.asarray(state.params["last_layer"]["kernel"])
        mu = np.asarray(state.opt_state.mu["last_layer"]["kernel"])
        if i < 2:
            np.testing.assert_array_equal(ll, v0)
            assert not np.any(mu) and int(state.opt_state.count["last_layer"]["kernel"]) == 0
        else:
            assert np.any(ll != v0) and np.any(mu)
            assert int(state.opt_state.count["last_layer"]["kernel"]) == 1
    assert int(state.opt_state.count["fc"]["kernel"]) == 3


def test_parallel_equals_single_device(setup):
    """8 fake devices, shard_map + explicit pmean == one device on the whole batch."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    mesh = make_data_mesh()
    sched, tx, state, single = setup
    para = dino.parallel_dino_step(
        dino.make_dino_step(apply_fn, tx, sched, axis_name="data"), mesh)
    s1, s8 = state, replicate(state, mesh)  # placed once: one compilation
    for i in range(3):  # crosses the end of the last-layer freeze
        b = _batch(b=16, seed=i)
        s1, m1 = single(s1, jax.tree.map(jnp.asarray, b))
        s8, m8 = para(s8, shard_batch(b, mesh))
        for k in ("loss", "teacher_entropy", "kl", "centre_norm", "grad_norm"):
            np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=2e-5, err_msg=k)
    for name in ("params", "teacher", "centre", "opt_state"):
        for a, b_ in zip(jax.tree.leaves(getattr(s1, name)), jax.tree.leaves(getattr(s8, name))):
            np.testing.assert_allclose(np.asarray(b_), np.asarray(a), rtol=2e-5, atol=1e-6,
                                       err_msg=name)
    assert s8.centre.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="batch size 12 .* 8 devices"):
        para(s8, _batch(b=12))
    with pytest.raises(ValueError, match="axis_name=None"):
        dino.parallel_dino_step(dino.make_dino_step(apply_fn, tx, sched), mesh)


def test_pmean_of_replicated_grads_trap():
    """Why the step casts parameters to device-varying: without it shard_map returns the
    gradient summed over devices, and pmean on top leaves it 8x too large."""
    from jax.sharding import PartitionSpec as P
    mesh = make_data_mesh()
    w, x = jnp.ones(3), jnp.arange(24.0).reshape(8, 3)
    want = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)

    def local(w, x, cast):
        w = dino._to_varying(w, "data") if cast else w
        return jax.lax.pmean(jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w), "data")

    for cast, factor in ((False, 8.0), (True, 1.0)):
        got = jax.jit(jax.shard_map(lambda w, x: local(w, x, cast), mesh=mesh,
                                    in_specs=(P(), P("data")), out_specs=P()))(w, x)
        np.testing.assert_allclose(np.asarray(got), factor * np.asarray(want), rtol=1e-6)


def test_stochastic_student_gets_the_step_key():
    """With stochastic=True the student's apply_fn gets fold_in(state.key, step)."""
    def noisy(p, crops, rng=None):
        h = jnp.concatenate([x.mean((1, 2)) for x in crops], 0) @ p["w"]
        if rng is not None:  # stands in for drop path
            h = h + 0.3 * jax.random.normal(rng, h.shape)
        return h @ p["last_layer"]["kernel"]

    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
         "last_layer": {"kernel": jnp.asarray(rng.normal(size=(5, K)), jnp.float32)}}
    sched = dino_optim.make_dino_schedules(epochs=2, niter_per_ep=2, batch_size=4,
                                           warmup_epochs=1, warmup_teacher_temp_epochs=1)
    tx = dino_optim.make_dino_optimizer(sched)
    state = dino.create_dino_state(p, tx, KEY, K).replace(step=jnp.int32(3))
    step = jax.jit(dino.make_dino_step(noisy, tx, sched, stochastic=True))
    b = jax.tree.map(jnp.asarray, _batch(b=4, n_local=1))
    _, m = step(state, b)
    crops = [b["global"][:, 0], b["global"][:, 1], b["local"][:, 0]]
    want = [dino.dino_loss(noisy(p, crops, jax.random.fold_in(KEY, s)), noisy(p, crops[:2]),
                           state.centre, student_temp=0.1, teacher_temp=sched.teacher_temp[3])
            for s in (3, 4)]
    np.testing.assert_allclose(float(m["loss"]), float(want[0]), rtol=1e-5)
    assert abs(float(want[1]) - float(want[0])) > 1e-4  # another step, another key


def test_pmap_equals_single_device(setup):
    """The same per-device step under jax.pmap (state broadcast, batch split 8 ways)."""
    sched, tx, state, single = setup
    pstep = jax.pmap(dino.make_dino_step(apply_fn, tx, sched, axis_name="data"),
                     axis_name="data", in_axes=(None, 0))
    b = _batch(b=16, seed=5)
    s1, m1 = single(state, jax.tree.map(jnp.asarray, b))
    s8, m8 = pstep(state, jax.tree.map(lambda x: x.reshape((8, 2) + x.shape[1:]), b))
    np.testing.assert_allclose(np.asarray(m8["loss"]), float(m1["loss"]), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(m8["grad_norm"]), float(m1["grad_norm"]), rtol=2e-5)
    for a, c in zip(jax.tree.leaves((s1.params, s1.teacher, s1.centre)),
                    jax.tree.leaves((s8.params, s8.teacher, s8.centre))):
        for d in range(8):
            np.testing.assert_allclose(np.asarray(c[d]), np.asarray(a), rtol=2e-5, atol=1e-6)
