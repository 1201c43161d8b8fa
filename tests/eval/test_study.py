"""End to end: config -> simulated store -> ERM training -> scores -> result files; resume."""

import json
import os

import pytest

from jaxadapt.eval import study
from jaxadapt.train.supervised import Interrupted
from tests.eval.tiny import tiny_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


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
