"""End to end: config -> simulated store -> ERM training -> scores -> result files; resume."""

import json
import os

import numpy as np
import pytest
from tests.eval.tiny import tiny_config

from jaxadapt.eval import metrics, protocol, study
from jaxadapt.methods import registry
from jaxadapt.models import build_model
from jaxadapt.train.supervised import Interrupted


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _mtimes(root):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def _accuracies(path):
    rows = json.load(open(path))["rows"]
    return {(r["split"], r["metric"]): r["mean"] for r in rows}


def test_erm_study_writes_tables_and_resumes_to_the_same_result(tmp_path, cache_dir):
    full = str(tmp_path / "full")
    study.run_study(tiny_config(cache_dir), full)
    payload = json.load(open(os.path.join(full, "results.json")))
    assert payload["study"] == "tiny"
    splits = {r["split"] for r in payload["rows"]}
    assert splits == {"in_domain", "new_batch", "new_source"}
    for ext in ("md", "csv", "png"):
        assert os.path.getsize(os.path.join(full, f"results.{ext}")) > 0

    # Analyses (experiments/diagnose_label_shift.py) load the very models the study
    # scored: no retraining, and the same score from the loaded variables.
    cfg = tiny_config(cache_dir)
    rep = protocol.Replicate(cfg.train_sources[0], cfg.seeds[0])
    ckpt = protocol.checkpoint_path(cfg, rep, "erm", full)
    before = _mtimes(ckpt)
    model, view, rows, variables = study.load_replicate(cfg, "erm", rep, full)
    assert _mtimes(ckpt) == before
    units = protocol.make_units(view.table, rows["in_domain"], {}, cfg, rep.seed)
    cm = protocol.score_units(registry.make_method("erm", model, cfg, {}), variables, view, units,
                              cfg.model.num_classes)
    assert metrics.accuracy(cm) == pytest.approx(_accuracies(os.path.join(full, "results.json"))[
        ("in_domain", "accuracy")], abs=1e-12)

    # Interrupt after one epoch, then re-run the same command: it resumes and ends equal.
    resumed = str(tmp_path / "resumed")
    with pytest.raises(Interrupted, match="re-run the same command"):
        study.run_study(tiny_config(cache_dir, **{"train.stop_after_epochs": 1}), resumed)
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    study.run_study(tiny_config(cache_dir), resumed)
    assert _accuracies(os.path.join(resumed, "results.json")) == _accuracies(
        os.path.join(full, "results.json"))


def test_unknown_method_is_named(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="unknown method 'ermm'"):
        study.run_study(tiny_config(cache_dir, methods=("ermm",)), str(tmp_path))


def test_batch_size_not_divisible_by_devices(tmp_path, cache_dir):
    # conftest fakes 8 devices: a batch of 12 cannot be split evenly.
    with pytest.raises(ValueError, match="multiple of the 8 local devices"):
        study.run_study(tiny_config(cache_dir, **{"train.batch_size": 12}), str(tmp_path))


def test_swept_controls_train_their_share_and_mismatch_fails_or_is_reported(tmp_path, cache_dir):
    ckpt = str(tmp_path / "ckpt")
    base = {"methods": ("cs_arm_bn",), "eval_splits": ("new_batch",),
            "arm.n_perturbed": 16, "arm.n_controls": 4, "adapt.n_controls": 4,
            "arm.val_episodes": 4, "train.num_epochs": 1, "checkpoint_dir": ckpt,
            "sweep": ({"alpha": 1.0, "N": 4}, {"alpha": 1.0, "N": 8})}
    study.run_study(tiny_config(cache_dir, **base), str(tmp_path / "a"))
    models = sorted(os.listdir(os.path.join(ckpt, "source_3", "seed0")))
    # cs_arm_bn with N = 4 (= arm.n_controls: the default model) and N = 8: one per share.
    assert [m.split("-")[0] for m in models] == ["cs_arm_bn", "cs_arm_bn"]
    shapes = sorted(json.load(open(os.path.join(ckpt, "source_3", "seed0", m, "episode.json")))
                    ["n_controls"] for m in models)
    assert shapes == [4, 8]
    rows = json.load(open(tmp_path / "a" / "results.json"))["rows"]
    cs = {r["setting"]["N"] for r in rows if r["method"] == "cs_arm_bn"}
    assert cs == {4, 8} and not any("share_mismatch" in r["setting"] for r in rows)
    assert {r["metric"] for r in rows} >= {"accuracy", "label_shift_short_batches"}
    # Test chunks of 8 against episodes of 16: the share differs, an error names it ...
    base["eval.batch_size"] = 8
    with pytest.raises(ValueError, match="control share 0.333.*share 0.200"):
        study.run_study(tiny_config(cache_dir, **base), str(tmp_path / "b"))
    # ... unless the config asks for it; then the rows say so (no retraining).
    before = sorted(os.listdir(os.path.join(ckpt, "source_3", "seed0")))
    study.run_study(tiny_config(cache_dir, **base, **{"adapt.allow_share_mismatch": True}),
                    str(tmp_path / "c"))
    assert sorted(os.listdir(os.path.join(ckpt, "source_3", "seed0"))) == before
    rows = json.load(open(tmp_path / "c" / "results.json"))["rows"]
    notes = {r["setting"].get("share_mismatch") for r in rows if r["method"] == "cs_arm_bn"}
    assert notes == {"context 8+4, trained 16+4", "context 8+8, trained 16+8"}


def test_every_method_has_its_training_recipe(tmp_path):
    # e.g. ben trains its own model (controls-only statistics), not ERM's.
    cfg = tiny_config(str(tmp_path))
    model = build_model(cfg.model)
    methods = {n: registry.make_method(n, model, cfg) for n in registry.method_names()}
    assert methods["ben"].trainer == "ben" and methods["adabn_plate"].trainer == "erm"
    trainers = registry.build_trainers(model, cfg, {m.trainer for m in methods.values()})
    assert all(callable(t) for t in trainers.values())


def test_exact_sum_over_processes_keeps_big_ints_exact(monkeypatch):
    # One process: the identity, through the 30-bit limbs and back, for ints beyond int64.
    values = [0, 1, 2**31 + 5, 2**70 + 3 * 2**40 + 7, 2**120 - 1]
    assert study.exact_sum_over_processes(values) == values
    # Three (faked) identical processes: exact triples.
    monkeypatch.setattr(protocol, "sum_over_processes", lambda x: 3 * np.asarray(x))
    assert study.exact_sum_over_processes(values) == [3 * v for v in values]
    with pytest.raises(ValueError, match=r"\[0, 2\*\*120\)"):
        study.exact_sum_over_processes([2**120])
