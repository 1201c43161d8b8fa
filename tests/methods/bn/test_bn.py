"""BN statistics as data: context / plate statistics and the adabn, adabn_plate, ben methods."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxadapt.methods.base import UnitBatch as Batch
from jaxadapt.methods.bn import adabn, ben, plate_stats as bn_plate, stats as bn
from jaxadapt.models.resnet import resnet18


class FakeUnit:
    """In-memory Unit: perturbed images in padded batches (padding = NaN) + controls."""

    def __init__(self, name, images, controls, batch_size):
        self.name, self.images, self.ctrl, self.bs = name, images, controls, batch_size

    def batches(self):
        for s in range(0, len(self.images), self.bs):
            im = self.images[s:s + self.bs]
            pad = self.bs - len(im)
            mask = np.r_[np.ones(len(im), bool), np.zeros(pad, bool)]
            im = np.concatenate([im, np.full((pad,) + im.shape[1:], np.nan, np.float32)])
            yield Batch(image=im, mask=mask)

    def controls(self, count, seed):
        idx = np.random.default_rng(seed).choice(len(self.ctrl), count)
        return self.ctrl[idx]

    def all_controls(self):
        for s in range(0, len(self.ctrl), self.bs):
            yield self.ctrl[s:s + self.bs]


def _images(n, seed=0, loc=1.0, scale=2.0):
    return (np.random.default_rng(seed).normal(size=(n, 32, 32, 2)) * scale + loc).astype(np.float32)


def _maxdiff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_first_layer_matches_numpy_train_mode_bn(tiny):
    model, v = tiny
    x, mask = _images(9), np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    stats = bn.context_stats(model, v, x, mask)
    kernel = v["params"]["stem_conv"]["kernel"]
    y = np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(x), kernel, (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC")))[mask]
    np.testing.assert_allclose(stats["stem_bn"]["mean"], y.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["stem_bn"]["var"], y.var((0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_context_stats_reproduce_batch_mode_forward(tiny):
    model, v = tiny
    x = _images(8, seed=2)
    mask = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    for m in (None, mask):
        stats = bn.context_stats(model, v, x, m)
        got = bn.apply_with_stats(model, v, stats, x)
        want, _ = model.apply(v, x, norm_mode="batch", stats_mask=m)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert not np.allclose(want, model.apply(v, x, norm_mode="running")[0], atol=1e-2)


def test_masked_rows_never_contribute(tiny):
    model, v = tiny
    x, mask = _images(8, seed=3), np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    y = x.copy()
    y[~mask] = 1e4
    z = x.copy()
    z[~mask] = np.nan  # padding may be junk: not checked, not used
    a, b, c = (bn.context_stats(model, v, im, mask) for im in (x, y, z))
    assert _maxdiff(a, b) == 0.0 and _maxdiff(a, c) == 0.0


def test_apply_with_context_equals_stats_of_the_context(tiny):
    model, v = tiny
    ctx, x = _images(6, seed=4), _images(3, seed=5, loc=-2.0)
    got = bn.apply_with_context(model, v, x, ctx)
    want = bn.apply_with_stats(model, v, bn.context_stats(model, v, ctx), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path,kw", [("carried", {}), ("carried", {"carry": "host"}),
                                     ("recompute", {"carry_budget": 0})])
def test_plate_stats_chunked_equal_one_joint_pass(tiny, path, kw, caplog):
    model, v = tiny
    x = _images(23, seed=6)
    mask = np.ones(23, bool)
    mask[[4, 17]] = False
    joint = bn.context_stats(model, v, x, mask)
    chunks = [(x[:10], mask[:10]), (x[10:], mask[10:])]
    with caplog.at_level("INFO", logger="jaxadapt.methods.bn.plate_stats"):
        plate = bn_plate.plate_stats(model, v, chunks, chunk_size=7, **kw)  # 7 divides neither
    assert f"plate_stats: {path} path" in caplog.text  # the log says which path ran
    assert _maxdiff(joint, plate) < 1e-5
    gen = bn_plate.plate_stats(model, v, ((x[i:i + 5], mask[i:i + 5]) for i in range(0, 23, 5)),
                         chunk_size=7, **kw)  # one-shot iterator
    assert _maxdiff(joint, gen) < 1e-5
    trunc = bn_plate.plate_stats(model, v, lambda: iter(chunks), chunk_size=8, truncate=True, **kw)
    assert _maxdiff(joint, trunc) < 1e-5
    # and differs from the reference's mean of per-chunk variances
    per_chunk = [bn.context_stats(model, v, im, m) for im, m in chunks]
    assert _maxdiff(joint["stage2_block1"]["bn2"], per_chunk[0]["stage2_block1"]["bn2"]) > 1e-3


def test_plate_stats_budget_disk_and_fallback_equal_joint(tiny, tmp_path, caplog):
    model, v = tiny
    x = _images(20, seed=16)
    joint = bn.context_stats(model, v, x)
    reads = []

    def source():  # a re-readable source, e.g. from disk; counts how often it is read
        reads.append(1)
        return [x[i:i + 4] for i in range(0, 20, 4)]

    per_chunk = bn_plate.carry_bytes(model, v, (4, 32, 32, 2))
    spill = tmp_path / "spill"
    spill.mkdir()
    with caplog.at_level("INFO", logger="jaxadapt.methods.bn.plate_stats"):
        disk = bn_plate.plate_stats(model, v, source, spill_dir=str(spill))
        assert "carried path" in caplog.text and "on the disk" in caplog.text
        assert list(spill.iterdir()) == []  # the spill folder is removed
        caplog.clear()
        reads.clear()
        # room for 2.5 chunks of 5: found out while streaming, then recomputed
        short = bn_plate.plate_stats(model, v, source, carry_budget=2.5 * per_chunk)
        assert "recompute path" in caplog.text and "exceed the device budget" in caplog.text
    groups = bn_plate.layer_levels(model, v, (4, 32, 32, 2))
    assert len(reads) == 2 + 1 + len(groups)  # 2 peeks, the aborted stream, one per pass
    assert _maxdiff(joint, disk) < 1e-5 and _maxdiff(joint, short) < 1e-5
    with pytest.raises(ValueError, match="carry_budget=-1"):
        bn_plate.plate_stats(model, v, source, carry_budget=-1)
    with pytest.raises(ValueError, match="carry='gpu'; use one of"):
        bn_plate.plate_stats(model, v, source, carry="gpu")


def test_carried_plan_is_one_forward_pass_and_its_memory_scales_with_the_chunk():
    m = resnet18(width=4, stem="small", num_classes=3, in_channels=2)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 2))))
    plan = bn_plate._carry_plan(m, bn_plate._var_struct(v), (4, 32, 32, 2),
                                 jnp.dtype(jnp.float32), jnp.dtype(bool))[0]
    assert len(plan.stages) == 17
    # every conv of the network (stem + 16 + 3 projections) runs once per chunk in all
    convs = [p for stage in plan.chunk_prims for p in stage if p == "conv_general_dilated"]
    assert len(convs) == 20
    small, large = (bn_plate.carry_bytes(m, v, (b, 32, 32, 2)) for b in (4, 8))
    assert abs(large / 8 - small / 4) < 0.01 * small / 4  # per image, up to a few scalars
    # at least the stem's conv output [16, 16, 4] float32 (read by the stem BN, next stage)
    assert small / 4 >= 16 * 16 * 4 * 4
    # masks pass through to the model as they are (e.g. float row weights trace too); a
    # weight mask is read by every BN level, so stages carry it (and its per-layer counts)
    # beside the activations: bytes per row and stage, not per pixel.
    weighted = bn_plate.carry_bytes(m, v, (4, 32, 32, 2), mask_dtype=jnp.float32)
    assert 0 <= weighted - small < len(plan.stages) * 4 * 8


def test_plate_stats_with_row_weights_match_numpy_two_layer_restatement(two_layer):
    from tests.methods.conftest import two_layer_numpy
    model, v = two_layer
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, size=(11, 2, 2, 2)).astype(np.float32)
    w = rng.uniform(0.1, 3.0, size=11).astype(np.float32)
    w[4] = 0.0
    x[4] = np.nan  # a zero-weight row never contributes
    # Three chunks of uneven size, re-cut to 4 rows: weights travel with their rows.
    chunks = [(x[:3], w[:3]), (x[3:9], w[3:9]), (x[9:], w[9:])]
    stats = bn_plate.plate_stats(model, v, chunks, chunk_size=4)
    want, logits = two_layer_numpy(v, np.nan_to_num(x), w)
    for layer in ("bn1", "bn2"):  # bn2 sees bn1 normalized with the weighted statistics
        np.testing.assert_allclose(stats[layer]["mean"], want[layer][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[layer]["var"], want[layer][1], rtol=1e-4, atol=1e-5)
    got = bn.apply_with_stats(model, v, stats, np.nan_to_num(x))
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4)
    # Uniform weights are a plain union.
    ones = bn_plate.plate_stats(model, v, [(x[:3], np.full(3, 2.5, np.float32))], chunk_size=4)
    plain = bn_plate.plate_stats(model, v, [(x[:3], None)], chunk_size=4)
    assert _maxdiff(ones, plain) < 1e-5


def test_layer_levels_group_parallel_layers():
    m = resnet18(width=4, stem="small", num_classes=3, in_channels=2)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 2))))
    groups = bn_plate.layer_levels(m, v, (4, 32, 32, 2))
    assert len(groups) == 17 and sum(map(len, groups)) == 20
    assert (("stage2_block1", "bn1"), ("stage2_block1", "proj_bn")) in groups


def test_one_image_and_constant_context_no_nan(tiny):
    model, v = tiny
    x = _images(1, seed=7)
    for ctx in (x, np.zeros_like(x)):
        stats = bn.context_stats(model, v, ctx)
        assert all(np.isfinite(a).all() for a in jax.tree.leaves(stats))
        assert np.isfinite(bn.apply_with_stats(model, v, stats, _images(2))).all()
        plate = bn_plate.plate_stats(model, v, [ctx])
        assert all(np.isfinite(a).all() for a in jax.tree.leaves(plate))


def test_non_finite_pixels_raise_with_count_and_rows(tiny):
    model, v = tiny
    x = _images(4, seed=8)
    x[2, 0, 0, 0] = np.nan
    x[2, 1, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite pixel values.*rows \[2\]"):
        bn.context_stats(model, v, x)
    with pytest.raises(ValueError, match=r"context chunk 1 has 2 non-finite.*rows \[0\]"):
        bn_plate.plate_stats(model, v, [x[:2], x[2:]])
    with pytest.raises(ValueError, match="lack 1 BN layer"):
        stats = bn.context_stats(model, v, x[:2])
        del stats["stem_bn"]
        bn.apply_with_stats(model, v, stats, x[:2])


def test_adabn_scores_each_sample_once_with_its_batch_stats(tiny):
    model, v = tiny
    imgs = _images(11, seed=9)
    unit = FakeUnit("plate_a", imgs, _images(5, seed=10), batch_size=4)
    logits = adabn.adabn(model).predict_unit(v, unit)
    assert logits.shape == (11, 3) and np.isfinite(logits).all()
    want = [model.apply(v, imgs[s:s + 4], norm_mode="batch")[0] for s in (0, 4, 8)]
    np.testing.assert_allclose(logits, np.concatenate(want), rtol=1e-4, atol=1e-4)


def test_adabn_plate_uses_all_perturbed_images_and_no_control(tiny):
    model, v = tiny
    imgs, ctrl = _images(11, seed=11), _images(6, seed=12, loc=0.0)
    method = adabn.adabn_plate(model)
    assert method.trainer == "erm"
    logits = method.predict_unit(v, FakeUnit("plate_b", imgs, ctrl, batch_size=4))
    stats = bn.context_stats(model, v, imgs)  # full-domain AdaBN: the perturbed images
    np.testing.assert_allclose(logits, bn.apply_with_stats(model, v, stats, imgs),
                               rtol=1e-4, atol=1e-4)
    other = method.predict_unit(v, FakeUnit("plate_b", imgs, ctrl * 3.0 - 2.0, batch_size=4))
    np.testing.assert_array_equal(other, logits)  # ERM never saw controls: not in the context


def test_ben_uses_only_controls(tiny):
    model, v = tiny
    imgs, ctrl = _images(8, seed=13), _images(7, seed=14, loc=-1.0)
    method = ben.ben(model)
    assert method.trainer == "ben"
    logits = method.predict_unit(v, FakeUnit("plate_c", imgs, ctrl, batch_size=4))
    want = bn.apply_with_stats(model, v, bn.context_stats(model, v, ctrl), imgs)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    other = imgs.copy()
    other[4:] = _images(4, seed=15, loc=5.0)  # change the second batch only
    logits2 = method.predict_unit(v, FakeUnit("plate_c", other, ctrl, batch_size=4))
    np.testing.assert_array_equal(logits[:4], logits2[:4])
    with pytest.raises(ValueError, match=r"unit 'plate_d' has no negative-control"):
        method.predict_unit(v, FakeUnit("plate_d", imgs, ctrl[:0], batch_size=4))
    cfg = ml_collections.ConfigDict({"adapt": {"on_missing_controls": "perturbed_only"}})
    cfg.lock()
    fallback = ben.ben(model, cfg).predict_unit(v, FakeUnit("plate_d", imgs, ctrl[:0], 4))
    want = bn.apply_with_stats(model, v, bn.context_stats(model, v, imgs), imgs)
    np.testing.assert_allclose(fallback, want, rtol=1e-4, atol=1e-4)


class SubsetUnit(FakeUnit):
    """A FakeUnit that adapts on another unit (as the runner's `eval.adapt_on` does)."""

    def __init__(self, scored: FakeUnit, subset: FakeUnit):
        super().__init__(scored.name, scored.images, scored.ctrl, scored.bs)
        self.subset = subset

    def adaptation(self):
        return self.subset


@pytest.mark.parametrize("name", ["adabn_plate", "ben"])
def test_plate_methods_adapt_on_the_subset_and_score_the_whole_unit(tiny, name):
    model, v = tiny
    imgs, ctrl = _images(10, seed=21), _images(6, seed=22, loc=-1.0)
    first = FakeUnit("src@p0", imgs[:4], ctrl[:2], batch_size=4)  # e.g. the first plate
    method = {"adabn_plate": adabn.adabn_plate, "ben": ben.ben}[name](model)
    assert method.adapts_on_subset
    logits = method.predict_unit(v, SubsetUnit(FakeUnit("src", imgs, ctrl, 4), first))
    context = imgs[:4] if name == "adabn_plate" else ctrl[:2]
    want = bn.apply_with_stats(model, v, bn.context_stats(model, v, context), imgs)
    assert logits.shape == (10, 3)  # every sample scored
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    whole = method.predict_unit(v, FakeUnit("src", imgs, ctrl, 4))
    assert np.abs(whole - logits).max() > 1e-3  # the subset's statistics, not the unit's
    assert not adabn.adabn(model).adapts_on_subset  # per-batch statistics: no subset


@pytest.mark.parametrize("name", ["erm", "adabn_plate", "ben"])
def test_embed_unit_gives_the_features_the_head_classifies(tiny, name):
    from jaxadapt.methods.bn import erm

    model, v = tiny
    imgs, ctrl = _images(9, seed=31), _images(5, seed=32, loc=-1.0)
    method = {"erm": lambda m: erm.erm(m), "adabn_plate": adabn.adabn_plate,
              "ben": ben.ben}[name](model)
    unit = FakeUnit("plate_e", imgs, ctrl, batch_size=4)
    emb = method.embed_unit(v, unit)
    assert emb.samples.shape == (9, 8) and emb.controls.shape == (5, 8)
    head = v["params"]["head"]
    np.testing.assert_allclose(emb.samples @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                               method.predict_unit(v, unit), rtol=1e-4, atol=1e-4)
    # The controls go through the same statistics: running ones for erm, the unit's else.
    if name == "erm":
        want = model.apply(v, ctrl, norm_mode="running")[1]
    else:
        stats = bn.context_stats(model, v, imgs if name == "adabn_plate" else ctrl)
        want = bn.features_with_stats(model, v, stats, ctrl)
    np.testing.assert_allclose(emb.controls, want, rtol=1e-4, atol=1e-4)
