"""MAE recipes in the study: dual model on an MAE encoder, TTT-MAE and ODA with MAE."""

import numpy as np
import pytest
from tests.eval.tiny import set_keys
from tests.methods.coda.conftest import coda_config
from tests.methods.coda.test_coda import _unit

from jaxadapt.methods import registry
from jaxadapt.methods.coda import mae_trainer
from jaxadapt.models import mae as mae_models
from jaxadapt.train.checkpoint import tree_equal


TINY = dict(patch_size=8, embed_dim=16, depth=1, num_heads=2, img_size=32, decoder_dim=16,
            decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="module", autouse=True)
def tiny_mae_size():
    mae_models.MAE_SIZES["mae_test"] = TINY
    yield
    del mae_models.MAE_SIZES["mae_test"]


def mae_config(cache_dir, **changes):
    c = coda_config(cache_dir)
    c.mae.size, c.mae.epochs, c.mae.batch_size, c.mae.warmup_epochs = "mae_test", 1, 8, 0
    c.mae.ttt_steps, c.mae.ttt_copies, c.mae.ttt_chunk = 3, 4, 8
    return set_keys(c, changes)


@pytest.fixture(scope="module")
def world(coda_world):
    return coda_world


@pytest.fixture(scope="module")
def mae_vars(world, tmp_path_factory):
    cfg, view, rows = world
    cfg = mae_config(cfg.data.cache_dir)
    return mae_trainer.make_dual_mae_trainer(cfg)(view, rows, str(tmp_path_factory.mktemp("m")), 0)


def test_dual_mae_freezes_the_pretrained_encoder_under_its_task_model(mae_vars):
    assert set(mae_vars["mae"]) == {"encoder", "mask_token", "decoder"}
    assert tree_equal(mae_vars["params"]["extractor"], mae_vars["mae"]["encoder"])
    assert set(mae_vars["params"]) == {"extractor", "task"}


def test_ttt_mae_without_steps_is_the_frozen_dual_model_and_adapts_with_them(world, mae_vars):
    cfg, view, rows = world
    unit = _unit(cfg, view, rows["new_batch"])
    frozen = registry.make_method("dual_mae", None, mae_config(cfg.data.cache_dir)).predict_unit(
        mae_vars, unit)
    still = registry.make_method("ttt_mae", None, mae_config(
        cfg.data.cache_dir, **{"mae.ttt_lr": 0.0})).predict_unit(mae_vars, unit)
    np.testing.assert_allclose(still, frozen, rtol=1e-4, atol=1e-5)
    moved = registry.make_method("ttt_mae", None, mae_config(
        cfg.data.cache_dir, **{"mae.ttt_lr": 0.05})).predict_unit(mae_vars, unit)
    assert moved.shape == frozen.shape and np.abs(moved - frozen).max() > 1e-5


def test_oda_mae_adapts_the_encoder_on_the_unit(world, mae_vars):
    cfg, view, rows = world
    unit = _unit(cfg, view, rows["new_batch"])
    base = mae_config(cfg.data.cache_dir)
    frozen = registry.make_method("dual_mae", None, base).predict_unit(mae_vars, unit)
    none = registry.make_method("oda_mae", None, mae_config(
        cfg.data.cache_dir, **{"coda.adapt.epochs": 0})).predict_unit(mae_vars, unit)
    np.testing.assert_allclose(none, frozen, rtol=1e-5, atol=1e-5)
    adapted = registry.make_method("oda_mae", None, mae_config(
        cfg.data.cache_dir, **{"coda.adapt.lr": 1e-2})).predict_unit(mae_vars, unit)
    assert np.abs(adapted - frozen).max() > 1e-5


def test_mae_methods_refuse_variables_without_an_mae(world):
    cfg, view, rows = world
    unit = _unit(cfg, view, rows["new_batch"])
    with pytest.raises(ValueError, match="needs the variables of the 'dual_mae' recipe"):
        registry.make_method("ttt_mae", None, mae_config(cfg.data.cache_dir)).predict_unit(
            {"params": {}}, unit)
