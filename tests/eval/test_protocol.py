import numpy as np
import pytest

from jaxadapt import config as defaults
from jaxadapt.adapt.base import Method
from jaxadapt.data import schema
from jaxadapt.eval import protocol


def _cfg():
    return defaults.get_defaults()


def test_training_key_tracks_only_what_shapes_the_weights():
    a, b = _cfg(), _cfg()
    b.data.num_threads = 7  # speed only
    b.data.cache_dir = "/elsewhere"
    assert protocol.training_key(a, "erm") == protocol.training_key(b, "erm")
    b.arm.n_controls = 3  # episodes change ARM models, not ERM's
    assert protocol.training_key(a, "erm") == protocol.training_key(b, "erm")
    assert protocol.training_key(a, "cs_arm_bn") != protocol.training_key(b, "cs_arm_bn")
    # ARM-BN episodes hold no controls: a control setting must not retrain it...
    assert protocol.training_key(a, "arm_bn") == protocol.training_key(b, "arm_bn")
    b.arm.n_perturbed = 5  # ...but its episode size must
    assert protocol.training_key(a, "arm_bn") != protocol.training_key(b, "arm_bn")
    b.data.sim.severity.batch = 2.0  # different data: never reuse
    assert protocol.training_key(a, "erm") != protocol.training_key(b, "erm")
    assert protocol.training_key(a, "erm").startswith("erm-")


def test_ben_trains_its_own_model_keyed_by_every_episode_field():
    a = _cfg()
    # Not ERM's (nor CS-ARM-BN's) checkpoint, although all three read the same data.
    keys = {protocol.training_key(a, t) for t in ("erm", "cs_arm_bn", "ben")}
    assert len(keys) == 3 and protocol.training_key(a, "ben").startswith("ben-")
    # BEN's episodes hold L perturbed + N controls: every arm field shapes its weights.
    for field, value in [("n_controls", 3), ("n_perturbed", 5), ("episodes_per_step", 2),
                         ("steps_per_epoch", 7), ("val_episodes", 4),
                         ("on_missing_controls", "skip")]:
        b = _cfg()
        b.arm[field] = value
        assert protocol.training_key(a, "ben") != protocol.training_key(b, "ben"), field


def _fake(name, keys=(), ignores=()):
    return Method(name=name, trainer="erm", predict_unit=lambda v, u: None, setting_keys=keys,
                  ignores=ignores)


def test_method_settings_skip_keys_a_method_ignores():
    sweep = [{"L": L, "N": N} for L in (1, 4) for N in (0, 16)]
    build = {"arm": _fake("arm"), "cs": _fake("cs", ("N",)), "plate": _fake("plate", ignores=("L",))}
    pairs = protocol.method_settings(["arm", "cs", "plate"], lambda n, s: build[n], sweep)
    by = lambda name: [s for s, m in pairs if m.name == name]  # noqa: E731
    assert by("arm") == [{"L": 1}, {"L": 4}]
    assert by("cs") == sweep
    assert by("plate") == [{}]


@pytest.mark.parametrize("bad", [{"alpha": 0}, {"alpha": "skewed"}, {"L": 0}, {"L": 2.5}])
def test_bad_sweep_settings_are_named(bad):
    cfg = _cfg()
    cfg.sweep = (bad,)
    with pytest.raises(ValueError, match="config.sweep setting"):
        protocol.swept_settings(cfg)


def _table():
    n = 48
    plate = np.repeat(["p0", "p1"], n // 2)
    label = np.tile(np.r_[np.arange(4).repeat(4), -np.ones(8, int)], 2)
    cols = {
        "source": np.full(n, "s"), "batch": np.full(n, "b"), "plate": plate,
        "well": np.array([f"w{i}" for i in range(n)]), "site": np.zeros(n, int),
        "compound": np.where(label < 0, schema.DMSO, "c"), "moa": np.full(n, ""),
        "label": label, "is_control": label < 0,
    }
    return schema.SiteTable(cols)


def test_make_units_balanced_and_label_shift():
    cfg, table = _cfg(), _table()
    cfg.model.num_classes = 4
    rows = np.arange(len(table))
    units = protocol.make_units(table, rows, {"L": 5}, cfg)
    assert [u.name for u in units] == ["p0", "p1"]
    scored = np.concatenate([u.rows[u.mask] for u in units])
    assert sorted(scored) == sorted(rows[table["label"] >= 0])  # every sample exactly once
    assert all(len(u.control_rows) == 8 for u in units)
    shifted = protocol.make_units(table, rows, {"L": 8, "alpha": 0.01}, cfg)
    top_share = [np.bincount(table["label"][b], minlength=4).max() / 8 for u in shifted for b in u.rows]
    assert np.mean(top_share) > 0.8  # alpha 0.01: batches are (nearly) one class


def test_score_units_refuses_a_method_that_drops_samples():
    class View:
        table = _table()

        def eval_batches(self, rows, masks):
            for r, m in zip(rows, masks):
                yield {"image": np.zeros((len(r), 1)), "mask": m & (self.table["label"][r] >= 0)}

    units = protocol.make_units(View.table, np.arange(48), {"L": 5}, _cfg())
    perfect = Method("oracle", "erm", lambda v, u: np.eye(4)[u.labels()])
    cm = protocol.score_units(perfect, {}, View(), units, 4)
    assert np.trace(cm) == cm.sum() == 32
    lossy = Method("lossy", "erm", lambda v, u: np.eye(4)[u.labels()][:-1])
    with pytest.raises(RuntimeError, match="must score every sample"):
        protocol.score_units(lossy, {}, View(), units, 4)
