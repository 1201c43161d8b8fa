"""CODA's studies run the reference's recipe (issue 18): step-1 optimisation, plain crops,
the adaptation's centre, and the task model's weight-decay groups."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxadapt.eval import cli, validation
from jaxadapt.methods.coda import dino_trainer, online, task_trainer

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("study", ["coda_matrix", "coda_granularity", "dino_vs_mae"])
def test_coda_studies_resolve_to_the_reference_step1_recipe(study, variant):
    c = cli.load_config_file(f"{CONFIGS / (study + '.py')}:{variant}")
    d = c.dino
    # params/settings/self-supervised-coda-step-1.json: AdamW lr 1e-4 (no batch scaling),
    # weight decay 1e-5 -> 1e-4, global gradient clip 1.0; RandomCrop views.
    assert (d.base_lr, d.lr_scaling, d.weight_decay, d.weight_decay_end) == (1e-4, "none", 1e-5,
                                                                            1e-4)
    assert (d.clip_grad, d.global_clip, d.views.crop_mode) == (1.0, True, "plain")
    sched = dino_trainer._schedules(d, 50)  # the schedules the trainer builds from it
    assert float(np.max(sched.lr)) == pytest.approx(1e-4, rel=1e-6)  # peak after warm-up
    # per-iteration cosine in float32: the last iteration sits just short of the end value
    assert float(sched.wd[0]) == pytest.approx(1e-5, rel=1e-6)
    assert float(sched.wd[-1]) == pytest.approx(1e-4, rel=1e-3)
    assert c.coda.adapt.centre == "zero"
    validation.validate(c)


def test_dino_pretraining_keeps_dinos_recipe():
    c = cli.load_config_file(str(CONFIGS / "dino_pretrain.py"))
    assert (c.dino.lr_scaling, c.dino.views.crop_mode) == ("linear", "resized")
    sched = dino_trainer._schedules(c.dino, 50)
    assert float(np.max(sched.lr)) == pytest.approx(c.dino.base_lr * c.dino.batch_size / 256)


def test_adaptation_rate_is_the_configured_one_without_batch_scaling():
    c = cli.load_config_file(str(CONFIGS / "coda_matrix.py"))
    for batch in (8, 16):
        d = online.adaptation_dino_config(c, batch)
        sched = dino_trainer._schedules(d, 20)
        assert float(np.max(sched.lr)) == pytest.approx(c.coda.adapt.lr, rel=1e-6)


def test_adaptation_centre_starts_as_chosen():
    state = {"centre": np.full((1, 6), 0.5, np.float32)}
    np.testing.assert_array_equal(online.adaptation_centre(state, "zero"), np.zeros((1, 6)))
    np.testing.assert_array_equal(online.adaptation_centre(state, "pretrained"), state["centre"])
    with pytest.raises(ValueError, match=r"coda.adapt.centre='mean' is not one of"):
        online.adaptation_centre(state, "mean")


def test_bad_mode_names_are_config_errors_naming_the_choices():
    c = cli.load_config_file(str(CONFIGS / "coda_matrix.py"))
    c.coda.adapt.centre, c.dino.lr_scaling, c.dino.views.crop_mode = "mean", "sqrt", "random"
    with pytest.raises(validation.ConfigError) as err:
        validation.validate(c)
    text = str(err.value)
    assert "config.coda.adapt.centre='mean'" in text and "'pretrained'" in text
    assert "config.dino.lr_scaling='sqrt'" in text and "'none'" in text
    assert "crop_mode='random' is not one of ['resized', 'plain']" in text


def test_task_model_leaves_biases_and_layernorm_undecayed():
    t = ml_collections.ConfigDict({"learning_rate": 0.1, "weight_decay": 0.5,
                                   "warmup_epochs": 0, "clip_grad": 1.0})
    params = {"block": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
                        "norm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}},
              "pos_embed": jnp.ones((1, 5, 4))}
    tx = task_trainer.task_optimizer(t, steps_per_epoch=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):  # as the train step runs optax
        updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    decayed = 1.0 - 0.1 * 0.5  # AdamW's decoupled decay with a zero gradient
    np.testing.assert_allclose(new["block"]["Dense_0"]["kernel"], decayed, rtol=1e-6)
    np.testing.assert_allclose(new["pos_embed"], decayed, rtol=1e-6)
    for leaf in (new["block"]["Dense_0"]["bias"], new["block"]["norm"]["scale"],
                 new["block"]["norm"]["bias"]):
        np.testing.assert_array_equal(leaf, 1.0)
