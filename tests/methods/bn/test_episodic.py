"""The episodic (CS-)ARM-BN trainer end to end on a tiny in-memory study; exact resume."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxadapt import config as defaults
from jaxadapt.data import schema, transforms
from jaxadapt.data.pipeline import DataView
from jaxadapt.methods.bn import episodic, shares
from jaxadapt.models.resnet import BasicBlock, ResNet
from jaxadapt.train.supervised import Interrupted


S, CROP, K = 20, 16, 3
MODEL = ResNet(stage_sizes=(1,), block_cls=BasicBlock, width=4, stem="small",
               num_classes=K, in_channels=5)


class ArraySource:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitems__(self, keys):
        return [{"image": self.images[k], "row": k} for k in keys]


def make_study(plates=4, per_plate=18, ctrl=6, seed=0):
    """Plates p0..p{n-1}; the last plate is the validation split."""
    rng = np.random.default_rng(seed)
    plate, label, is_ctrl = [], [], []
    for p in range(plates):
        plate += [f"p{p}"] * (per_plate + ctrl)
        label += list(np.arange(per_plate) % K) + [-1] * ctrl
        is_ctrl += [False] * per_plate + [True] * ctrl
    n = len(plate)
    label, is_ctrl = np.array(label), np.array(is_ctrl)
    img = rng.normal(100, 20, size=(n, S, S, 5))
    img[..., 0] += 30 * np.maximum(label, 0)[:, None, None]
    img += 15 * np.array([int(p[1:]) for p in plate])[:, None, None, None]  # plate effect
    images = np.clip(img, 0, 255).astype(np.uint8)
    table = schema.SiteTable({
        "source": np.array(["s"] * n), "batch": np.array(["b"] * n), "plate": np.array(plate),
        "well": np.array([f"W{i}" for i in range(n)]), "site": np.zeros(n, np.int64),
        "compound": np.where(is_ctrl, schema.DMSO, "c"), "moa": np.array([""] * n),
        "label": label, "is_control": is_ctrl,
    })
    stats = transforms.channel_stats_of(images)
    view = DataView(ArraySource(images), table, transforms.eval_transform(CROP, stats),
                    transforms.train_transform(CROP, stats), num_threads=1)
    val = np.array(plate) == f"p{plates - 1}"
    rows = {"train": np.flatnonzero(~val), "validation": np.flatnonzero(val)}
    return view, rows


def make_config(**train):
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({"crop_size": CROP})
    c.model = ml_collections.ConfigDict({"in_channels": 5})
    c.train = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, num_epochs=3, patience=10, log_every_steps=1,
        stop_after_epochs=0) | train)
    c.arm = ml_collections.ConfigDict(dict(episodes_per_step=8, n_perturbed=4, n_controls=2,
                                           steps_per_epoch=2, val_episodes=8,
                                           on_missing_controls="raise"))
    return c


def test_settings_come_from_the_config_and_missing_fields_are_named():
    a = episodic.arm_settings(defaults.get_defaults())
    assert set(a) == set(episodic.ARM_FIELDS)
    c = ml_collections.ConfigDict({"arm": {"n_perturbed": 4}})
    with pytest.raises(ValueError, match="config.arm lacks .*episodes_per_step"):
        episodic.arm_settings(c)


RECIPES = {"cs_arm_bn": dict(with_controls=True), "arm_bn": dict(with_controls=False),
           "ben": dict(with_controls=True, stats="controls")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_trainer_runs_and_resumes_exactly(tmp_path, recipe):
    view, rows = make_study()
    full = episodic.make_episodic_trainer(MODEL, make_config(), **RECIPES[recipe])
    v_full = full(view, rows, str(tmp_path / "full"), seed=1)
    assert os.path.isdir(tmp_path / "full" / "logs")
    part = episodic.make_episodic_trainer(MODEL, make_config(stop_after_epochs=1),
                                          **RECIPES[recipe])
    with pytest.raises(Interrupted):
        part(view, rows, str(tmp_path / "part"), seed=1)
    v_resumed = full(view, rows, str(tmp_path / "part"), seed=1)
    for a, b in zip(jax.tree.leaves(v_full), jax.tree.leaves(v_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(v_full) == {"params", "batch_stats", "episode"}
    # The model records the episodes it was meta-trained on, with it and beside it.
    shape = shares.episode_shape(v_full, method="test")
    assert shape == (4, 2 if RECIPES[recipe]["with_controls"] else 0)
    with open(tmp_path / "full" / "episode.json") as f:
        assert json.load(f) == shape._asdict()


def test_checkpoint_dir_of_another_episode_shape_is_refused(tmp_path):
    episodic.record_episode_shape(str(tmp_path), 4, 2)
    episodic.record_episode_shape(str(tmp_path), 4, 2)  # the same shape: fine
    with pytest.raises(ValueError, match="another model"):
        episodic.record_episode_shape(str(tmp_path), 4, 8)


@pytest.mark.parametrize("recipe", ["cs_arm_bn", "ben"])
def test_missing_validation_controls_is_an_error(tmp_path, recipe):
    view, rows = make_study()
    rows = dict(rows, validation=rows["validation"][~view.table["is_control"][rows["validation"]]])
    train = episodic.make_episodic_trainer(MODEL, make_config(), **RECIPES[recipe])
    with pytest.raises(ValueError, match="no control rows"):
        train(view, rows, str(tmp_path / "x"), seed=0)


def test_ben_skips_plates_without_controls_when_asked(tmp_path, caplog):
    view, rows = make_study(plates=5)
    table = view.table
    # Plate p0 loses its controls in the training split.
    train_rows = rows["train"][~(table["is_control"][rows["train"]]
                                 & (table["plate"][rows["train"]] == "p0"))]
    rows = dict(rows, train=train_rows)
    cfg = make_config(num_epochs=1)
    with pytest.raises(ValueError, match="'p0'.*on_missing_controls='skip'"):
        episodic.make_episodic_trainer(MODEL, cfg, **RECIPES["ben"])(
            view, rows, str(tmp_path / "a"), seed=0)
    cfg.arm.on_missing_controls = "skip"
    with caplog.at_level("WARNING"):
        v = episodic.make_episodic_trainer(MODEL, cfg, **RECIPES["ben"])(
            view, rows, str(tmp_path / "b"), seed=0)
    assert "skipping 1 plates without controls" in caplog.text
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(v))


def test_ben_needs_controls_in_its_episodes():
    cfg = make_config()
    cfg.arm.n_controls = 0
    with pytest.raises(ValueError, match="config.arm.n_controls=0"):
        episodic.make_episodic_trainer(MODEL, cfg, **RECIPES["ben"])
    with pytest.raises(ValueError, match="stats='plate'"):
        episodic.make_episodic_trainer(MODEL, make_config(), with_controls=True, stats="plate")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices")
def test_episode_mesh_keeps_episodes_whole():
    assert episodic.episode_mesh(16).devices.size == 8
    assert episodic.episode_mesh(2).devices.size == 2
    assert episodic.episode_mesh(6).devices.size == 2
