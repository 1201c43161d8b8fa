"""DINO pretraining recipe: trains on views over 8 fake devices, probes with kNN, resumes exactly."""

import json
import os

import jax
import numpy as np
import pytest
from tests.eval.tiny import set_keys, tiny_config

from jaxadapt.data import splits as splits_lib
from jaxadapt.data.sim import builder as tfds_sim
from jaxadapt.eval import study
from jaxadapt.methods.coda import dino_trainer
from jaxadapt.train import parallel
from jaxadapt.train.checkpoint import tree_equal
from jaxadapt.train.supervised import Interrupted


def dino_config(cache_dir, **changes):
    """tiny_config with a 2-block ViT (patch 8, 32 px) and a small DINO head and views."""
    c = tiny_config(cache_dir)
    c.model.name = "vit_cpu"
    for key, value in dict(embed_dim=16, depth=2, num_heads=2, img_size=32, patch_size=8).items():
        c.model[key] = value
    c.data.normalization = "per_image"
    d = c.dino
    d.out_dim, d.hidden_dim, d.bottleneck_dim = 64, 32, 16
    d.epochs, d.batch_size, d.warmup_epochs, d.warmup_teacher_temp_epochs = 2, 16, 1, 1
    d.views.global_size, d.views.local_size, d.views.n_local = 32, 16, 2
    d.knn_bank_size = 64
    return set_keys(c, changes)


@pytest.fixture(scope="module")
def world(sim_cache):
    cfg = dino_config(sim_cache)
    source, table = tfds_sim.load_simulated(cfg.data.sim, cfg.data.cache_dir)
    rows = splits_lib.make_splits(table, train_source="source_3", cfg=cfg.splits)
    rows["train"] = rows["train"][::6]  # a short epoch: the tests are about mechanics
    rows["validation"] = rows["validation"][::4]
    view = study.make_view(source, table, rows["train"], cfg.data)
    return cfg, view, rows


@pytest.fixture(scope="module")
def trainer(world):
    return dino_trainer.make_dino_trainer(world[0])  # one compilation for every test


@pytest.fixture(scope="module")
def full_run(world, trainer, tmp_path_factory):
    cfg, view, rows = world
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, trainer(view, rows, str(run_dir), 0)


def test_trains_probes_and_writes_history(world, full_run):
    cfg, _, _ = world
    run_dir, out = full_run
    assert set(out) == {"params", "knn_bank", "student", "centre"}
    assert out["centre"].shape == (1, cfg.dino.out_dim)
    assert not tree_equal(out["params"], out["student"])  # the teacher lags the student
    hist = json.load(open(run_dir / "dino_history.json"))
    assert [h["epoch"] for h in hist] == [0, 1]
    for h in hist:
        assert 0 < h["train_teacher_entropy"] <= np.log(cfg.dino.out_dim) + 1e-4
        assert 0 <= h["val_knn_accuracy"] <= 1
    assert os.path.getsize(run_dir / "dino_history.png") > 0
    bank = out["knn_bank"]
    assert bank["features"].shape[0] == bank["labels"].shape[0] <= cfg.dino.knn_bank_size
    np.testing.assert_allclose(np.linalg.norm(bank["features"], axis=1), 1, rtol=1e-5)


def test_interrupted_run_resumes_to_the_uninterrupted_result(world, trainer, full_run, tmp_path):
    cfg, view, rows = world
    cut = dino_config(cfg.data.cache_dir, **{"train.stop_after_epochs": 1})
    with pytest.raises(Interrupted):
        dino_trainer.make_dino_trainer(cut)(view, rows, str(tmp_path), 0)
    resumed = trainer(view, rows, str(tmp_path), 0)
    for key in ("params", "student", "centre"):
        assert tree_equal(jax.device_get(full_run[1][key]), jax.device_get(resumed[key])), key


def test_cross_batch_pairs_change_what_is_learned(world, full_run, tmp_path):
    cfg, view, rows = world
    paired = dino_trainer.make_dino_trainer(cfg, pairs="plate")(view, rows, str(tmp_path), 0)
    assert not tree_equal(full_run[1]["student"], paired["student"])


def test_random_init_is_seeded_and_untrained(world, tmp_path):
    cfg, view, rows = world
    train = dino_trainer.make_random_init_trainer(cfg)
    a, b = train(view, rows, str(tmp_path), 0), train(view, rows, str(tmp_path), 1)
    assert not tree_equal(a["params"], b["params"])
    assert tree_equal(a["params"], train(view, rows, str(tmp_path), 0)["params"])


def test_bad_pairs_and_small_split_raise(world, tmp_path):
    cfg, view, rows = world
    with pytest.raises(ValueError, match="pairs="):
        dino_trainer.make_dino_trainer(cfg, pairs="well")
    tiny_rows = dict(rows, train=rows["train"][:8])
    with pytest.raises(ValueError, match="dino.batch_size"):
        dino_trainer.make_dino_trainer(cfg)(view, tiny_rows, str(tmp_path), 0)


def test_local_pairs_on_one_process_are_the_global_batch_and_bad_sizes_raise():
    mesh = parallel.make_data_mesh()
    pairs = np.arange(3 * 16 * 2).reshape(3, 16, 2)
    np.testing.assert_array_equal(dino_trainer.local_pairs(pairs, mesh), pairs)
    with pytest.raises(ValueError, match="config.dino.batch_size=12"):
        dino_trainer.local_pairs(pairs[:, :12], mesh)


FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "models", "fixtures", "vit_tiny.pth")


def test_model_init_imports_the_backbone_and_keeps_a_seeded_head(tmp_path):
    """model.init: the DINO student's backbone is the checkpoint's (CODA starts from DeiT)."""
    from jaxadapt.models import pretrained
    cfg = dino_config(str(tmp_path), **{"model.embed_dim": 32, "model.init": FIXTURE})
    model = dino_trainer.build_dino_model(cfg)
    params = dino_trainer.init_params(model, cfg, seed=0)
    want = pretrained.load_pretrained_vit(FIXTURE, model.backbone, in_channels=5)
    jax.tree.map(np.testing.assert_array_equal, params["backbone"], want)
    cfg.model.init = "random"
    random = dino_trainer.init_params(model, cfg, seed=0)
    jax.tree.map(np.testing.assert_array_equal, params["head"], random["head"])
    assert not np.array_equal(params["backbone"]["pos_embed"], random["backbone"]["pos_embed"])


def test_model_init_bad_input(tmp_path):
    cfg = dino_config(str(tmp_path), **{"model.embed_dim": 32,
                                        "model.init": str(tmp_path / "deit.pth")})
    with pytest.raises(ValueError, match=r"config.model.init='.*deit.pth' is not a file"):
        dino_trainer.init_params(dino_trainer.build_dino_model(cfg), cfg, seed=0)
    cfg.model.init = FIXTURE
    cfg.model.embed_dim = 16  # the checkpoint's width is 32
    with pytest.raises(ValueError, match="shape"):
        dino_trainer.init_params(dino_trainer.build_dino_model(cfg), cfg, seed=0)
    from jaxadapt.eval import validation
    bad = dino_config(str(tmp_path), **{"model.init": FIXTURE, "model.name": "resnet18"})
    assert any("is not a ViT" in p for p in validation.problems(bad))
