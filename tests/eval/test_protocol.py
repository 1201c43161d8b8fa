import collections

import numpy as np
import pytest

from jaxadapt import config as defaults
from jaxadapt.data import schema
from jaxadapt.eval import protocol
from jaxadapt.methods.base import Method, adaptation_unit, count_event


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


def test_training_key_reads_only_the_data_source_the_study_uses():
    a, b = _cfg(), _cfg()
    b.data.jump.root = "/data/cpg"  # a simulator study does not read data.jump
    b.data.jump.stats_sample = 7
    assert protocol.training_key(a, "erm") == protocol.training_key(b, "erm")
    # Pinned: the simulator keys of before real data existed (checkpoints keep their names).
    assert protocol.training_key(a, "erm") == "erm-6a5abd712a98"
    a.data.source = b.data.source = "jump"
    assert protocol.training_key(a, "erm") != protocol.training_key(b, "erm")
    b.data.jump.stats_sample = a.data.jump.stats_sample
    b.data.jump.root = a.data.jump.root
    b.data.jump.num_workers = 9  # speed only, as are the builder's engine and shards
    b.data.jump.engine, b.data.jump.shard_sites, b.data.jump.check_headers = "beam", 8, False
    b.data.sim.severity.batch = 2.0  # a real-data study does not read data.sim
    assert protocol.training_key(a, "erm") == protocol.training_key(b, "erm")
    b.data.jump.on_bad_site = "skip"  # other sites: other data
    assert protocol.training_key(a, "erm") != protocol.training_key(b, "erm")
    b.data.jump.on_bad_site = a.data.jump.on_bad_site
    b.data.jump.compounds = ("JCP2022_025848",)
    assert protocol.training_key(a, "erm") != protocol.training_key(b, "erm")


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


def test_method_settings_skip_keys_a_method_ignores(monkeypatch):
    sweep = [{"L": L, "N": N} for L in (1, 4) for N in (0, 16)]
    build = {"arm": _fake("arm"), "cs": _fake("cs", ("N",)), "plate": _fake("plate", ignores=("L",))}
    monkeypatch.setattr(protocol.registry, "make_method", lambda n, model, cfg, s: build[n])
    cfg = _cfg()
    cfg.methods = ("arm", "cs", "plate")
    pairs = protocol.method_settings(None, cfg, sweep)
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
    units = protocol.make_units(table, rows, {"L": 5}, cfg, 0)
    assert [u.name for u in units] == ["p0", "p1"]
    scored = np.concatenate([u.rows[u.mask] for u in units])
    assert sorted(scored) == sorted(rows[table["label"] >= 0])  # every sample exactly once
    assert all(len(u.control_rows) == 8 for u in units)
    shifted = protocol.make_units(table, rows, {"L": 8, "alpha": 0.01}, cfg, 0)
    top_share = [np.bincount(table["label"][b], minlength=4).max() / 8 for u in shifted for b in u.rows]
    assert np.mean(top_share) > 0.8  # alpha 0.01: batches are (nearly) one class


def test_score_units_refuses_a_method_that_drops_samples():
    class View:
        table = _table()

        def eval_batches(self, rows, masks):
            for r, m in zip(rows, masks):
                yield {"image": np.zeros((len(r), 1)), "mask": m & (self.table["label"][r] >= 0)}

    units = protocol.make_units(View.table, np.arange(48), {"L": 5}, _cfg(), 0)
    perfect = Method("oracle", "erm", lambda v, u: np.eye(4)[u.labels()])
    cm = protocol.score_units(perfect, {}, View(), units, 4)
    assert np.trace(cm) == cm.sum() == 32
    lossy = Method("lossy", "erm", lambda v, u: np.eye(4)[u.labels()][:-1])
    with pytest.raises(RuntimeError, match="must score every sample"):
        protocol.score_units(lossy, {}, View(), units, 4)


def test_label_shift_draws_differ_per_replicate():
    cfg, table = _cfg(), _table()
    cfg.model.num_classes = 4
    rows, setting = np.arange(len(table)), {"L": 8, "alpha": 1.0}
    draw = lambda seed: [u.rows for u in protocol.make_units(table, rows, setting, cfg, seed)]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(draw(1), draw(1)))
    assert not all(np.array_equal(a, b) for a, b in zip(draw(1), draw(2)))
    # Balanced chunks stay those of config.eval.seed in every replicate.
    balanced = lambda seed: [u.rows for u in protocol.make_units(table, rows, {"L": 5}, cfg, seed)]  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(balanced(1), balanced(2)))


def _method(trainer="cs_arm_bn", overrides=(), **kw):
    return Method("m", trainer, lambda v, u: None, train_overrides=overrides, **kw)


def test_trainer_spec_is_canonical_and_keys_hash_the_overridden_config():
    cfg = _cfg()  # arm.n_controls = 32
    spec = protocol.trainer_spec(_method(overrides=(("arm.n_controls", 128),)), cfg)
    assert spec == protocol.TrainerSpec("cs_arm_bn", (("arm.n_controls", 128),))
    # An override equal to the config, or one the recipe never reads, is no override.
    assert protocol.trainer_spec(_method(overrides=(("arm.n_controls", 32),)), cfg).overrides == ()
    assert protocol.trainer_spec(_method("arm_bn", (("arm.n_controls", 0),)), cfg) == \
        protocol.TrainerSpec("arm_bn")
    # The overridden model lives where a study whose config trains N = 128 keeps it.
    other = _cfg()
    other.arm.n_controls = 128
    train_cfg = protocol.training_config(cfg, spec)
    assert protocol.training_key(train_cfg, "cs_arm_bn") == protocol.training_key(other, "cs_arm_bn")
    assert cfg.arm.n_controls == 32  # the study config is left alone
    with pytest.raises(ValueError, match="arm.n_control'"):
        protocol.trainer_spec(_method(overrides=(("arm.n_control", 1),)), cfg)


def test_build_trainers_one_per_spec_with_its_config(monkeypatch):
    cfg = _cfg()
    methods = [({}, _method()), ({"N": 32}, _method(overrides=(("arm.n_controls", 32),))),
               ({"N": 128}, _method(overrides=(("arm.n_controls", 128),))),
               ({"N": 0}, _method("arm_bn", (("arm.n_controls", 0),)))]
    built = []

    def make(model, c, names):
        built.append((sorted(names), c.arm.n_controls))
        return {n: (n, c.arm.n_controls) for n in names}

    monkeypatch.setattr(protocol.registry, "build_trainers", make)
    trainers = protocol.build_trainers(None, methods, cfg)
    assert sorted(built) == [(["arm_bn"], 32), (["cs_arm_bn"], 32), (["cs_arm_bn"], 128)]
    assert trainers[protocol.TrainerSpec("cs_arm_bn", (("arm.n_controls", 128),))] == ("cs_arm_bn", 128)


class _View:
    table = _table()

    def eval_batches(self, rows, masks):
        for r, m in zip(rows, masks):
            yield {"image": np.zeros((len(r), 1)), "mask": m}


def test_run_replicate_reports_checks_counts_and_short_label_shift_batches(tmp_path):
    cfg = _cfg()
    cfg.model.num_classes = 4
    cfg.eval_splits = ("new_batch",)
    rows = {"new_batch": np.arange(48)}

    def predict(v, unit):
        if unit.name == "p1":
            count_event(unit, "units_short_of_controls")
        return np.eye(4)[unit.labels()]

    seen = []
    oracle = Method("oracle", "cs_arm_bn", predict, train_overrides=(("arm.n_controls", 8),),
                    check=lambda v: seen.append(v) or {"share_mismatch": "context 8+8, trained 4+8"},
                    counts=("units_short_of_controls", "units_without_controls"))
    trainers = {protocol.TrainerSpec("cs_arm_bn", (("arm.n_controls", 8),)):
                lambda view, rows, run_dir, seed: {"run_dir": run_dir}}
    rep = protocol.Replicate("s", 3)
    # 4 classes of 4 rows per plate, L = 8: a one-class batch takes its class whole.
    scores = protocol.run_replicate(rep, cfg, _View(), rows, [({"L": 8, "alpha": 0.001}, oracle)],
                                    trainers, str(tmp_path))
    by = {s.metric: s for s in scores}
    assert by["accuracy"].value == 1.0
    assert by["accuracy"].setting == {"L": 8, "alpha": 0.001,
                                      "share_mismatch": "context 8+8, trained 4+8"}
    assert by["units_short_of_controls"].value == 1 and by["units_without_controls"].value == 0
    assert by["label_shift_short_batches"].value == 8  # both plates, every batch short
    assert "cs_arm_bn-" in seen[0]["run_dir"]  # the check saw the trained variables
    missing = Method("m2", "erm", predict)
    with pytest.raises(ValueError, match="needs trainer 'erm'"):
        protocol.run_replicate(rep, cfg, _View(), rows, [({}, missing)], trainers, str(tmp_path))


def _recording(seen, subset=True):
    """An oracle that records the rows its adaptation unit offers."""
    def predict(v, unit):
        adapt = adaptation_unit(unit)
        seen.append((adapt.name, adapt.spec.rows[adapt.spec.mask], adapt.spec.control_rows))
        return np.eye(4)[unit.labels()]
    return Method("rec", "erm", predict, adapts_on_subset=subset)


def test_adapt_on_subset_adapts_on_the_first_plate_and_scores_the_whole_unit(tmp_path):
    cfg, table = _cfg(), _table()
    cfg.model.num_classes = 4
    cfg.eval_splits = ("new_source",)
    cfg.eval.unit, cfg.eval.adapt_on = "source", "first_plate"
    rows = {"new_source": np.arange(48)}
    trainers = {protocol.TrainerSpec("erm"): lambda view, rows, run_dir, seed: {}}
    seen = []
    scores = protocol.run_replicate(protocol.Replicate("t", 0), cfg, _View(), rows,
                                    [({}, _recording(seen))], trainers, str(tmp_path))
    (name, adapt_rows, adapt_controls), = seen
    p0 = (table["plate"] == "p0")
    assert name == "s@p0"
    np.testing.assert_array_equal(np.sort(adapt_rows), np.flatnonzero(p0 & ~table["is_control"]))
    np.testing.assert_array_equal(adapt_controls, np.flatnonzero(p0 & table["is_control"]))
    by = {s.metric: s.value for s in scores}
    assert by["accuracy"] == 1.0  # the oracle scored all 32 labelled rows of both plates
    cm_rows = protocol.make_units(table, rows["new_source"], {}, cfg, 0)
    assert sum(int(u.mask.sum()) for u in cm_rows) == 32
    # Default: the unit adapts on itself.
    cfg.eval.adapt_on = "unit"
    seen.clear()
    protocol.run_replicate(protocol.Replicate("t", 0), cfg, _View(), rows,
                           [({}, _recording(seen))], trainers, str(tmp_path))
    assert seen[0][0] == "s" and len(seen[0][1]) == 32
    # A method that adapts on its scored batches cannot take a subset.
    with pytest.raises(ValueError, match="method 'rec' adapts on the very batches it scores"):
        protocol.run_replicate(protocol.Replicate("t", 0), cfg, _View(), rows,
                               [({"adapt_on": "first_plate"}, _recording([], subset=False))],
                               trainers, str(tmp_path))
    with pytest.raises(ValueError, match=r"no plate 'p7'; its plates: \['p0', 'p1'\]"):
        protocol.make_units(table, rows["new_source"], {"adapt_on": "plate:p7"}, cfg, 0)


def test_pair_splits_are_scored_by_their_training_source_only(tmp_path):
    cfg = _cfg()
    cfg.model.num_classes = 4
    cfg.eval_splits = ("source:t->s", "source:s->s")
    table = _table()
    table = schema.SiteTable({**{k: table[k] for k in schema.SITE_FIELDS},
                              "source": np.r_[np.full(24, "t"), np.full(24, "s")]})

    class View(_View):
        pass

    View.table = table
    rows = {"new_source": np.arange(24, 48), "in_domain": np.arange(0, 24, 2)}
    trainers = {protocol.TrainerSpec("erm"): lambda view, rows, run_dir, seed: {}}
    seen = []
    scores = protocol.run_replicate(protocol.Replicate("t", 0), cfg, View(), rows,
                                    [({}, _recording(seen))], trainers, str(tmp_path))
    assert {s.split for s in scores} == {"source:t->s"}  # source:s->s: another replicate's
    assert len(seen) == 1 and (table["source"][seen[0][1]] == "s").all()


def test_units_are_dealt_round_robin_over_processes(monkeypatch):
    # Process 1 of 3 adapts units 1 and 4 only, then sums with the other processes
    # (the real gather runs in tests/train/test_multihost.py).
    import jax

    class View:
        table = _table()

        def eval_batches(self, rows, masks):
            for r, m in zip(rows, masks):
                yield {"image": np.zeros((len(r), 1)), "mask": m & (self.table["label"][r] >= 0)}

    seen, sent = [], []

    def predict(v, u):
        seen.append(u.name)
        u.events["fallback"] += 1
        return np.eye(4)[u.labels()]

    def fake_sum(tree):
        sent.append(tree)
        return tuple(3 * np.asarray(x) for x in tree)  # as if 3 identical processes

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(protocol, "sum_over_processes", fake_sum)
    units = protocol.make_units(View.table, np.arange(48), {"L": 5, "unit": "plate"},
                                _cfg(), 0)
    names = [u.name for u in units]
    method = Method("oracle", "erm", predict, counts=("fallback",))
    events = collections.Counter()
    cm = protocol.score_units(method, {}, View(), units, 4, events)
    assert seen == names[1::3] and len(seen) >= 1
    local_cm, local_counts = sent[0]
    assert local_counts.tolist() == [len(seen)]
    np.testing.assert_array_equal(cm, 3 * local_cm)
    assert events == {"fallback": 3 * len(seen)}
