"""ARM-BN / CS-ARM-BN: per-episode statistics, controls in the context, predictors."""

import collections
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tests.methods.conftest import EPISODE_MODEL, KEY, S

from jaxadapt.methods import base
from jaxadapt.methods.bn import arm, shares
from jaxadapt.train import parallel
from jaxadapt.train.state import create_train_state


MODEL = EPISODE_MODEL
TX = optax.adam(1e-2)
E, L, N = 8, 4, 3


@pytest.fixture(scope="module")
def state():
    s = create_train_state(MODEL, TX, KEY, (1, S, S, 5))
    # Non-trivial running averages, so a wrong "running" path would show.
    return s.replace(batch_stats=jax.tree.map(lambda v: v + 0.3, s.batch_stats))


def episodes(seed=0, e=E):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(e, L + N, S, S, 5)).astype(np.float32)
    img += rng.normal(size=(e, 1, 1, 1, 5)).astype(np.float32) * 2  # plate effects
    label = rng.integers(0, 3, (e, L + N)).astype(np.int32)
    is_control = np.zeros((e, L + N), bool)
    is_control[:, L:] = True
    label[:, L:] = -1
    img[:, :L, ..., 0] += label[:, :L, None, None]
    return {"image": img, "label": label, "is_control": is_control,
            "mask": ~is_control}


def _logits(state, imgs):
    return np.asarray(arm.episode_forward(MODEL, state.params, state.batch_stats,
                                          jnp.asarray(imgs))[0])


def test_group_invariance_and_episode_independence(state):
    b = episodes()
    base = _logits(state, b["image"])
    perm = np.random.default_rng(1).permutation(L + N)
    img = b["image"].copy()
    img[2] = img[2][perm]
    out = _logits(state, img)
    np.testing.assert_allclose(out[2], base[2][perm], atol=1e-4)
    # Changing episode 5 changes nothing anywhere else.
    img = b["image"].copy()
    img[5] = img[5] * 3.0 + 1.0
    out = _logits(state, img)
    keep = np.arange(E) != 5
    np.testing.assert_allclose(out[keep], base[keep], atol=1e-5)
    assert not np.allclose(out[5], base[5], atol=1e-3)


def _loss(state, b):
    return float(arm.episode_loss(MODEL, state.params, state.batch_stats, b["image"],
                                  b["label"], b["is_control"], b["mask"]))


def test_controls_carry_no_loss_but_shape_statistics(state):
    b = episodes()
    base = _loss(state, b)
    c = dict(b, label=b["label"].copy())
    c["label"][:, L:] = 1  # controls given labels: still no loss (is_control)
    assert _loss(state, c) == pytest.approx(base, abs=1e-6)
    d = dict(b, image=b["image"].copy())
    d["image"][:, L:] += 2.0
    assert abs(_loss(state, d) - base) > 1e-3
    lo, ld = _logits(state, b["image"]), _logits(state, d["image"])
    assert not np.allclose(lo[:, :L], ld[:, :L], atol=1e-3)


def test_episode_loss_matches_restatement(state):
    b = episodes(3)
    b["mask"][1, 0] = False  # e.g. padding
    got = _loss(state, b)
    per = []
    for e in range(E):
        logits, _ = MODEL.apply(state.variables(), jnp.asarray(b["image"][e]),
                                norm_mode="batch")
        lp = np.asarray(jax.nn.log_softmax(logits))
        w = b["mask"][e] & ~b["is_control"][e]
        per.append(-lp[w, b["label"][e][w]].mean())
    assert got == pytest.approx(float(np.mean(per)), rel=1e-5)


def test_running_stats_are_momentum_step_to_mean_episode_stats(state):
    b = episodes(4)
    _, new = arm.episode_forward(MODEL, state.params, state.batch_stats, b["image"])
    # The stem BN sees the stem conv output; recompute per-episode moments.
    stats = []
    for e in range(E):
        _, inter = MODEL.apply(state.variables(), jnp.asarray(b["image"][e]),
                               norm_mode="batch", capture_intermediates=True,
                               mutable=["intermediates"])
        y = np.asarray(inter["intermediates"]["stem_conv"]["__call__"][0], np.float64)
        stats.append((y.mean((0, 1, 2)), y.var((0, 1, 2))))
    ra = state.batch_stats["stem_bn"]
    want_mean = 0.9 * np.asarray(ra["mean"]) + 0.1 * np.mean([s[0] for s in stats], 0)
    want_var = 0.9 * np.asarray(ra["var"]) + 0.1 * np.mean([s[1] for s in stats], 0)
    np.testing.assert_allclose(new["stem_bn"]["mean"], want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["stem_bn"]["var"], want_var, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices")
def test_episodic_step_parallel_equals_single_device(state):
    step = arm.make_episodic_train_step(MODEL, TX)
    single = jax.jit(step)
    mesh = parallel.make_data_mesh()
    para = parallel.parallel_train_step(step, mesh)
    s1, s8 = state, parallel.replicate(state, mesh)
    for k in range(2):
        b = episodes(10 + k)
        s1, m1 = single(s1, b)
        s8, m8 = para(s8, parallel.shard_batch(b, mesh))
        assert float(m1["loss"]) == pytest.approx(float(m8["loss"]), rel=1e-5)
    for a, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-4, atol=2e-5)


def test_train_step_learns(state):
    step = jax.jit(arm.make_episodic_train_step(MODEL, TX))
    b = episodes(20)
    s, losses = state, []
    for _ in range(10):
        s, m = step(s, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] and float(m["count"]) == E * L


class FakeUnit:
    """A unit over in-memory arrays; records the control seeds it was asked for."""

    def __init__(self, images, batch, controls, name="plate_a"):
        self.name, self.images, self.batch, self.ctrl = name, images, batch, controls
        self.seeds = []
        self.events = collections.Counter()
        self.n_controls = len(controls)

    def batches(self):
        n = len(self.images)
        for start in range(0, n, self.batch):
            idx = np.resize(np.arange(start, min(start + self.batch, n)), self.batch)
            mask = np.arange(start, start + self.batch) < n
            yield base.UnitBatch(self.images[idx], mask)

    def controls(self, count, seed):
        self.seeds.append(seed)
        if len(self.ctrl) == 0:
            raise ValueError(f"unit {self.name!r} has no negative-control wells")
        rng = np.random.default_rng(seed)
        return self.ctrl[rng.choice(len(self.ctrl), count, replace=count > len(self.ctrl))]

    def all_controls(self):
        yield self.ctrl


def _unit(n=10, n_ctrl=20, seed=0):
    rng = np.random.default_rng(seed)
    return FakeUnit(rng.normal(size=(n, S, S, 5)).astype(np.float32), L,
                    rng.normal(1.0, 2.0, size=(n_ctrl, S, S, 5)).astype(np.float32))


def _cfg(**adapt):
    c = ml_collections.ConfigDict()
    c.adapt = ml_collections.ConfigDict(adapt)
    return c


def _trained(state, n_perturbed=L, n_controls=N):
    """The state's variables with the episode record a trainer attaches."""
    return shares.with_episode_shape(state.variables(), n_perturbed, n_controls)


def test_cs_arm_bn_predicts_with_chunk_plus_fresh_controls(state):
    unit = _unit()
    method = arm.cs_arm_bn(MODEL, _cfg(n_controls=5), {"N": N})
    assert method.trainer == "cs_arm_bn"
    variables = _trained(state)
    got = method.predict_unit(variables, unit)
    assert got.shape == (10, 3)  # every perturbed sample exactly once, padding dropped
    assert len(unit.seeds) == 3 and len(set(unit.seeds)) == 3  # setting N wins, fresh seeds
    want = []
    for k, tb in enumerate(unit.batches()):
        ctrl = unit.controls(N, arm.chunk_seed(0, unit.name, k))
        x = np.concatenate([tb.image[tb.mask], ctrl])  # padding never in the context
        logits, _ = MODEL.apply(variables, x, norm_mode="batch")
        want.append(np.asarray(logits)[: tb.mask.sum()])
    np.testing.assert_allclose(got, np.concatenate(want), atol=1e-4)
    # Controls matter: ARM-BN (chunk statistics only) differs.
    arm_logits = arm.arm_bn(MODEL).predict_unit(_trained(state, L, 0), unit)
    assert arm_logits.shape == got.shape and not np.allclose(arm_logits, got, atol=1e-3)


def test_fresh_controls_differ_per_chunk_and_ignore_order():
    seeds = [arm.chunk_seed(0, "p1", k) for k in range(4)]
    assert len(set(seeds)) == 4
    assert arm.chunk_seed(0, "p1", 2) == seeds[2]
    assert arm.chunk_seed(0, "p2", 2) != seeds[2] and arm.chunk_seed(1, "p1", 2) != seeds[2]


def test_n_zero_is_arm_bn(state):
    unit = _unit(9)
    v = _trained(state, L, 0)
    a = arm.arm_bn(MODEL).predict_unit(v, unit)
    b = arm.cs_arm_bn(MODEL, _cfg(), {"N": 0}).predict_unit(v, unit)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert unit.seeds == []
    # ARM-BN restatement: each chunk's real rows alone define its statistics.
    want = [np.asarray(MODEL.apply(v, tb.image[tb.mask], norm_mode="batch")[0])
            for tb in unit.batches()]
    np.testing.assert_allclose(a, np.concatenate(want), atol=1e-4)


def test_missing_controls_error_or_explicit_fallback(state, caplog):
    unit = _unit(n_ctrl=0)
    unit.name = "plate_nodmso"
    v = _trained(state)
    with pytest.raises(ValueError, match="plate_nodmso"):
        arm.cs_arm_bn(MODEL, _cfg(), {}).predict_unit(v, unit)
    method = arm.cs_arm_bn(MODEL, _cfg(on_missing_controls="perturbed_only"), {"N": 8})
    assert method.counts == ("units_without_controls",)
    with caplog.at_level(logging.WARNING):
        got = method.predict_unit(v, unit)
    assert "plate_nodmso" in caplog.text and unit.events["units_without_controls"] == 1
    want = arm.arm_bn(MODEL).predict_unit(_trained(state, L, 0), unit)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="on_missing_controls"):
        arm.cs_arm_bn(MODEL, _cfg(on_missing_controls="ignore"), {})


def test_stats_mask_excludes_padding_per_episode(state):
    b = episodes(5, e=2)
    sm = np.ones((2, L + N), bool)
    sm[0, -2:] = False
    got = np.asarray(arm.episode_forward(MODEL, state.params, state.batch_stats,
                                         b["image"], sm)[0])
    want0 = MODEL.apply(state.variables(), jnp.asarray(b["image"][0, :-2]),
                        norm_mode="batch")[0]
    np.testing.assert_allclose(got[0, :-2], np.asarray(want0), atol=1e-4)
    np.testing.assert_allclose(got[1], _logits(state, b["image"])[1], atol=1e-5)


def test_share_mismatch_names_both_shares_and_keys_or_is_reported(state):
    unit = _unit()  # chunks of L = 4
    v = _trained(state, 4, 3)  # trained share 3/7
    method = arm.cs_arm_bn(MODEL, _cfg(n_controls=12), {"L": 4})  # context share 12/16
    with pytest.raises(ValueError) as err:
        method.check(v)
    msg = str(err.value)
    assert "0.750" in msg and "0.429" in msg and "4 + 3" in msg
    for key in ("config.adapt.n_controls", "config.eval.batch_size", "config.arm.n_controls",
                "config.adapt.allow_share_mismatch"):
        assert key in msg
    with pytest.raises(ValueError, match="control share 0.750"):
        method.predict_unit(v, unit)  # a library caller who skips check is stopped too
    # The same share with another L is accepted: 8 + 6 against 4 + 3.
    assert arm.cs_arm_bn(MODEL, _cfg(n_controls=6), {"L": 8}).check(v) == {}
    allowed = arm.cs_arm_bn(MODEL, _cfg(n_controls=12, allow_share_mismatch=True), {"L": 4})
    assert allowed.check(v) == {"share_mismatch": "context 4+12, trained 4+3"}
    assert allowed.predict_unit(v, unit).shape == (10, 3)


def test_variables_without_episode_record_are_refused(state):
    with pytest.raises(ValueError, match="with_episode_shape"):
        arm.cs_arm_bn(MODEL, _cfg(), {"N": N}).predict_unit(state.variables(), _unit())
    with pytest.raises(ValueError, match="no 'episode' record"):
        arm.cs_arm_bn_plate(MODEL, _cfg()).check(state.variables())


def test_unit_short_of_controls_raises_with_counts_or_resamples_counted(state, caplog):
    unit = _unit(n_ctrl=2)
    unit.name = "plate_few"
    v = _trained(state)
    with pytest.raises(ValueError, match="'plate_few' has 2 negative-control images, fewer than "
                                         "the N=3") as err:
        arm.cs_arm_bn(MODEL, _cfg(), {"N": N}).predict_unit(v, unit)
    assert "on_short_controls='resample'" in str(err.value)
    method = arm.cs_arm_bn(MODEL, _cfg(on_short_controls="resample"), {"N": N})
    assert method.counts == ("units_short_of_controls",)
    with caplog.at_level(logging.WARNING):
        got = method.predict_unit(v, unit)
    assert got.shape == (10, 3) and unit.events["units_short_of_controls"] == 1
    assert "plate_few" in caplog.text
    with pytest.raises(ValueError, match="on_short_controls"):
        arm.cs_arm_bn(MODEL, _cfg(on_short_controls="skip"), {})


def test_swept_n_trains_its_own_share():
    cfg = _cfg(n_controls=32)
    assert arm.cs_arm_bn(MODEL, cfg, {}).train_overrides == ()
    m = arm.cs_arm_bn(MODEL, cfg, {"N": 128, "L": 4})
    assert (m.trainer, m.train_overrides) == ("cs_arm_bn", (("arm.n_controls", 128),))
    zero = arm.cs_arm_bn(MODEL, cfg, {"N": 0})  # share 0: the ARM-BN recipe
    assert (zero.trainer, zero.train_overrides) == ("arm_bn", (("arm.n_controls", 0),))


def test_cs_arm_bn_plate_gives_controls_the_training_share(two_layer):
    from tests.methods.conftest import two_layer_numpy
    model, v = two_layer
    rng = np.random.default_rng(4)
    pert = rng.normal(0.0, 1.0, size=(7, 2, 2, 2)).astype(np.float32)
    ctrl = rng.normal(2.0, 1.5, size=(20, 2, 2, 2)).astype(np.float32)
    unit = FakeUnit(pert, 3, ctrl)  # 3 chunks, the last one padded
    for L_, N_ in ((2, 6), (4, 4), (5, 0)):
        got = arm.cs_arm_bn_plate(model, _cfg(plate_chunk_size=4)).predict_unit(
            shares.with_episode_shape(v, L_, N_), unit)
        # Perturbed rows share L/(L+N) of the weight, the controls N/(L+N).
        w = np.r_[np.full(7, L_ / (L_ + N_) / 7), np.full(20, N_ / (L_ + N_) / 20)]
        _, want = two_layer_numpy(v, np.concatenate([pert, ctrl]), w)
        np.testing.assert_allclose(got, want[:7], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="plate_a"):  # no controls, model trained with them
        arm.cs_arm_bn_plate(model, _cfg()).predict_unit(
            shares.with_episode_shape(v, 2, 6), FakeUnit(pert, 3, ctrl[:0]))


def test_cs_arm_bn_plate_embeds_under_its_share_weighted_statistics(two_layer):
    # Retrieval embeddings of cs_arm_bn_plate: features of samples *and* controls under the
    # statistics its predictions use (TwoLayer's logits are its features' spatial mean).
    from tests.methods.conftest import two_layer_numpy
    model, v = two_layer
    rng = np.random.default_rng(5)
    pert = rng.normal(0.0, 1.0, size=(7, 2, 2, 2)).astype(np.float32)
    ctrl = rng.normal(2.0, 1.5, size=(20, 2, 2, 2)).astype(np.float32)
    v = shares.with_episode_shape(v, 2, 6)
    emb = arm.cs_arm_bn_plate(model, _cfg(plate_chunk_size=4)).embed_unit(v, FakeUnit(pert, 3, ctrl))
    w = np.r_[np.full(7, 2 / 8 / 7), np.full(20, 6 / 8 / 20)]
    _, want = two_layer_numpy(v, np.concatenate([pert, ctrl]), w)
    np.testing.assert_allclose(emb.samples.mean((1, 2)), want[:7], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb.controls.mean((1, 2)), want[7:], rtol=1e-4, atol=1e-4)
