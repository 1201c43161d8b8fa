"""CODA's recipes: task optimizer, dual model with a frozen extractor, ODA / CODA adaptation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tests.methods.coda.conftest import coda_config

from jaxadapt.data import sampling as samplers
from jaxadapt.eval.units import PipelineUnit
from jaxadapt.methods import registry
from jaxadapt.methods.base import UnitBatch, UnlabelledImages
from jaxadapt.methods.coda import online, task_trainer
from jaxadapt.models import vit
from jaxadapt.models.dual import DualModel, TaskHead, tokens
from jaxadapt.train import steps
from jaxadapt.train.checkpoint import tree_equal
from jaxadapt.train.state import create_train_state


@pytest.fixture(scope="module")
def world(coda_world):
    return coda_world


@pytest.fixture(scope="module")
def dual_vars(world, tmp_path_factory):
    cfg, view, rows = world
    return task_trainer.make_dual_trainer(cfg)(view, rows, str(tmp_path_factory.mktemp("dual")), 0)


def _unit(cfg, view, table_rows) -> PipelineUnit:
    """The rows as one source unit (both plates of the held-out batch)."""
    (spec,) = samplers.eval_units(view.table, table_rows, unit="source", batch_size=16)
    return PipelineUnit(view, spec, 16)


def test_task_optimizer_warms_up_linearly_from_the_first_step():
    t = ml_collections.ConfigDict(dict(learning_rate=1e-2, weight_decay=0.0, warmup_epochs=2,
                                       clip_grad=0.0))
    tx = task_trainer.task_optimizer(t, steps_per_epoch=5)  # warm-up over 10 steps
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    deltas = []
    with jax.numpy_dtype_promotion("standard"):  # as the train step runs optax
        for _ in range(3):
            updates, state = tx.update(grads, state, params)
            deltas.append(np.asarray(updates["w"]))
    # Adam's normalized step is sign(g) for a constant gradient; the rate is lr (k+1)/10.
    for k, d in enumerate(deltas):
        np.testing.assert_allclose(d, -1e-2 * (k + 1) / 10 * np.sign(grads["w"]), rtol=1e-4)


def test_task_optimizer_clips_the_global_norm_and_freezes_named_subtrees():
    t = ml_collections.ConfigDict(dict(learning_rate=1.0, weight_decay=0.1, warmup_epochs=0,
                                       clip_grad=1.0))
    tx = task_trainer.task_optimizer(t, 1, frozen=("extractor",))
    params = {"extractor": {"k": jnp.ones(2)}, "task": {"k": jnp.ones(2)}}
    grads = {"extractor": {"k": jnp.array([3.0, 4.0])}, "task": {"k": jnp.array([3.0, 4.0])}}
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["extractor"]["k"], 0.0)
    assert np.all(np.asarray(updates["task"]["k"]) != 0)


def test_dual_model_reads_every_extractor_token_and_stops_its_gradient():
    extractor = vit("vit_cpu", embed_dim=16, depth=1, num_heads=2, img_size=32)
    head = TaskHead(num_classes=5, embed_dim=8, depth=1, num_heads=2)
    model = DualModel(extractor, head)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 5))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    logits, _ = jax.jit(model.apply)(v, x)
    toks = tokens(jax.jit(extractor.apply)({"params": v["params"]["extractor"]}, x))
    assert toks.shape == (2, 1 + 16, 16)  # CLS + a 4x4 grid of patches
    direct, _ = jax.jit(head.apply)({"params": v["params"]["task"]}, toks)
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x)[0].sum()))(v["params"])
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["extractor"]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["task"]))


def test_training_steps_never_move_the_extractor():
    t = ml_collections.ConfigDict(dict(learning_rate=1e-2, weight_decay=0.05, warmup_epochs=0,
                                       clip_grad=1.0))
    model = DualModel(vit("vit_cpu", embed_dim=16, depth=1, num_heads=2, img_size=32),
                      TaskHead(num_classes=3, embed_dim=8, depth=1, num_heads=2))
    tx = task_trainer.task_optimizer(t, 1, frozen=("extractor",))
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 32, 32, 5))
    step = jax.jit(steps.make_train_step(model, tx))
    batch = {"image": jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 5)),
             "label": jnp.array([0, 1, 2, 1]), "mask": jnp.ones(4)}
    new = state
    for _ in range(3):
        new, metrics = step(new, batch)
    assert tree_equal(new.params["extractor"], state.params["extractor"])
    assert not tree_equal(new.params["task"], state.params["task"])
    assert np.isfinite(float(metrics["loss"]))


def test_dual_trainer_puts_the_dino_teacher_under_a_trained_task_model(world, dual_vars):
    assert set(dual_vars) >= {"params", "dino"}
    assert set(dual_vars["dino"]) == {"teacher", "student", "centre"}
    assert tree_equal(dual_vars["params"]["extractor"], dual_vars["dino"]["teacher"]["backbone"])


def test_oda_with_no_adaptation_epochs_equals_the_frozen_dual_model(world, dual_vars):
    cfg, view, rows = world
    unit = _unit(cfg, view, rows["new_batch"])
    frozen = registry.make_method("dual_dino", None, cfg).predict_unit(dual_vars, unit)
    none = coda_config(cfg.data.cache_dir, **{"coda.adapt.epochs": 0})
    unadapted = registry.make_method("oda", None, none).predict_unit(dual_vars, unit)
    np.testing.assert_allclose(unadapted, frozen, rtol=1e-5, atol=1e-5)
    adapted = registry.make_method("oda", None, cfg).predict_unit(dual_vars, unit)
    assert adapted.shape == frozen.shape
    assert np.abs(adapted - frozen).max() > 1e-6  # one epoch on the unit moved the teacher


def test_adaptation_starts_from_the_pretrained_state_and_leaves_it_intact(world, dual_vars):
    cfg, view, rows = world
    unit = _unit(cfg, view, rows["new_batch"])
    before = jax.tree.map(np.array, dual_vars["dino"])
    adapt = online.make_online_adapter(cfg, pairs="plate")
    images = unit.unlabelled()
    teacher = adapt(dual_vars["dino"], images, seed=3, name=unit.name)
    assert tree_equal(dual_vars["dino"], before)  # pure: the pretrained state is unchanged
    assert not tree_equal(teacher["backbone"], before["teacher"]["backbone"])
    again = adapt(dual_vars["dino"], images, seed=3, name=unit.name)
    assert tree_equal(teacher, again)  # deterministic per (state, unit, seed)


def test_unit_images_hide_labels_and_cover_samples_and_controls(world):
    cfg, view, rows = world
    unit = _unit(cfg, view, rows["new_batch"])
    images = unit.unlabelled()
    assert isinstance(images, UnlabelledImages)
    expected = np.sort(np.concatenate([unit.spec.rows[unit.spec.mask], unit.spec.control_rows]))
    np.testing.assert_array_equal(np.sort(images.rows), expected)
    assert np.all(images.table["label"] == -1) and np.all(images.table["moa"] == "")
    np.testing.assert_array_equal(images.table["compound"], view.table["compound"])


def test_small_units_adapt_on_one_smaller_batch_and_tiny_ones_fail_clearly():
    assert online.unit_batch_size(10, 32, 1, "p") == 10
    assert online.unit_batch_size(10, 32, 8, "p") == 8
    assert online.unit_batch_size(100, 32, 8, "p") == 32
    with pytest.raises(ValueError, match="unit 'p' has 3 images, fewer than the 8 devices"):
        online.unit_batch_size(3, 32, 8, "p")


def test_a_task_model_for_another_extractor_is_refused_naming_both(world, dual_vars):
    cfg, view, rows = world
    other = coda_config(cfg.data.cache_dir, **{"model.embed_dim": 32})
    unit = _unit(cfg, view, rows["new_batch"])
    with pytest.raises(ValueError, match=r"does not match config.model .*vs"):
        registry.make_method("coda", None, other).predict_unit(dual_vars, unit)


def test_online_methods_need_a_unit_with_raw_images(world, dual_vars):
    cfg, _, _ = world

    class ImagesOnly:
        name = "u"

        def batches(self):
            yield UnitBatch(np.zeros((2, 32, 32, 5), np.float32), np.ones(2, bool))

    with pytest.raises(ValueError, match="exposes no raw images"):
        registry.make_method("oda", None, cfg).predict_unit(dual_vars, ImagesOnly())


def test_supervised_vit_trains_end_to_end_and_scores_through_its_method(world, tmp_path):
    cfg, view, rows = world
    out = task_trainer.make_supervised_trainer(cfg)(view, rows, str(tmp_path), 0)
    assert set(out["params"]) == {"backbone", "fc"}
    unit = _unit(cfg, view, rows["new_batch"])
    logits = registry.make_method("supervised", None, cfg).predict_unit(out, unit)
    assert logits.shape == (int(unit.spec.mask.sum()), cfg.model.num_classes)
    assert np.all(np.isfinite(logits))
