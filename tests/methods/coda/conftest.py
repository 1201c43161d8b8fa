"""The tiny ViT world the CODA and MAE recipe tests share (built once per run)."""

import pytest
from tests.eval.tiny import set_keys
from tests.methods.coda.test_dino_trainer import dino_config

from jaxadapt.data import splits as splits_lib
from jaxadapt.data.sim import builder as tfds_sim
from jaxadapt.eval import study


def coda_config(cache_dir, **changes):
    """dino_config with a 1-block task transformer and one short epoch of everything."""
    c = dino_config(cache_dir)
    c.dino.epochs, c.dino.warmup_epochs, c.dino.warmup_teacher_temp_epochs = 1, 0, 0
    t = c.coda.task
    t.embed_dim, t.depth, t.num_heads, t.num_epochs, t.patience = 16, 1, 2, 1, 1
    t.batch_size, t.eval_batch_size, t.warmup_epochs = 8, 8, 0  # few labelled training images
    c.coda.adapt.epochs, c.coda.adapt.batch_size, c.coda.adapt.warmup_epochs = 1, 16, 0
    return set_keys(c, changes)


@pytest.fixture(scope="session")
def coda_world(sim_cache):
    """(config, view, rows) of the tiny jump_poscon world with short training splits."""
    cfg = coda_config(sim_cache)
    source, table = tfds_sim.load_simulated(cfg.data.sim, cfg.data.cache_dir)
    rows = splits_lib.make_splits(table, train_source="source_3", cfg=cfg.splits)
    rows["train"] = rows["train"][::6]  # short epochs: these tests are about mechanics
    rows["validation"] = rows["validation"][::4]
    view = study.make_view(source, table, rows["train"], cfg.data)
    return cfg, view, rows
