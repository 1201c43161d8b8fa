"""Study 1 on CellProfiler profiles with the MLP, end to end from config (miniature real set)."""

import json
import os
import pathlib

import pytest

from jaxadapt.data import worlds
from jaxadapt.data.profiles import config as profiles_config, tables as profiles
from jaxadapt.eval import cli, study, validation


CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "domain_gap_profiles.py"
METHODS = ("erm", "adabn", "tent", "ben", "arm_bn", "cs_arm_bn")


def _config(tmp_path, **changes):
    c = cli.load_config_file(str(CONFIG))
    c.seeds = (0,)
    c.methods = METHODS
    c.train_sources = ("lincs_a",)
    c.train.num_epochs = 2
    c.train.patience = 2
    c.data.profiles.report_dir = str(tmp_path / "report")
    for key, value in changes.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def test_study_one_runs_on_profiles_with_the_mlp(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    study.main(_config(tmp_path), workdir=workdir)
    rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
    acc = {(r["method"], r["split"]): r for r in rows if r["metric"] == "accuracy"}
    assert set(acc) == {(m, s) for m in METHODS for s in ("in_domain", "new_batch", "new_source")}
    assert all(0.0 <= r["mean"] <= 1.0 and r["n"] == 1 for r in acc.values())
    assert "| cs_arm_bn |" in capsys.readouterr().out
    # The wells outside the label table were dropped by policy and listed beside the run.
    report = json.load(open(tmp_path / "report" / profiles.REPORT_NAME))
    assert len(report["dropped_unlabelled_wells"]) == 384 - 12 * 7 - 24


def _problems(cfg):
    return "\n".join(validation.problems(cfg))


def test_profile_config_is_validated_before_anything_runs(tmp_path):
    assert validation.problems(_config(tmp_path)) == []
    found = _problems(_config(tmp_path, **{"model.name": "resnet18", "data.crop_size": 48}))
    assert "set --config.model.name=mlp" in found
    assert "set --config.data.crop_size=1" in found
    found = _problems(_config(tmp_path, **{"data.profiles.paths": (), "data.profiles.label_table": ""}))
    assert "needs profile tables" in found and "needs a label table" in found
    found = _problems(_config(tmp_path, **{"data.profiles.paths": ("/nope/a.parquet",)}))
    assert "['/nope/a.parquet'] do not exist" in found
    found = _problems(_config(tmp_path, **{"data.profiles.normalization": "zscore",
                                           "data.profiles.on_nonfinite": "ignore"}))
    assert "config.data.profiles.normalization='zscore'" in found
    assert "config.data.profiles.on_nonfinite='ignore'" in found
    found = _problems(_config(tmp_path, **{"data.profiles.columns.well": ""}))
    assert "config.data.profiles.columns.well=''" in found
    section = {**_config(tmp_path).data.profiles.to_dict(), "paths": "a.parquet",
               "feature_prefixes": (), "report_dir": None}
    found = "\n".join(profiles_config.section_problems(section, reads_profiles=True))
    assert "config.data.profiles.report_dir=None: must be a string" in found
    assert "config.data.profiles.paths='a.parquet': must be a tuple of file paths" in found
    assert "config.data.profiles.feature_prefixes=(): must be a non-empty tuple" in found
    sim_mlp = _config(tmp_path, **{"data.source": "sim", "data.crop_size": 48})
    assert "takes CellProfiler profiles, not images" in _problems(sim_mlp)


def test_feature_count_and_sources_are_checked_against_the_tables(tmp_path):
    with pytest.raises(ValueError, match="in_channels=64 but the profiles have 65 features; "
                                         "set --config.model.in_channels=65"):
        worlds.load_world(_config(tmp_path, **{"model.in_channels": 64}))
    with pytest.raises(ValueError, match=r"train_sources lists \['source_3'\]"):
        worlds.load_world(_config(tmp_path, train_sources=("source_3",)))
