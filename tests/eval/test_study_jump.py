"""Studies 1-3 end to end on the miniature real gallery (tests/data/jump_mini), by config.

The study files are used as they are; the overrides point the data at the gallery
(`data.*`) and shrink the run to seconds (one seed, one epoch, a width-4 ResNet, small
batches, contexts and sweeps). The gallery has one source with the three batches a
training source needs (source_1) and one more (source_2, the new source), so every study
trains on source_1. The numbers mean nothing; the path is the point.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxadapt.eval import cli
from tests.eval.tiny import set_keys

MINI = "tests/data/jump_mini"
LOAD_DATA = "cpg0016-jump/*/workspace/load_data_csv/*/*/load_data.csv.gz"

#: What a user passes to study real data: the data keys alone.
DATA = {
    "data.source": "jump",
    "data.jump.root": MINI,
    "data.jump.load_data": (LOAD_DATA,),
    "data.jump.well_csv": "metadata/well.csv.gz",
    "data.jump.plate_csv": "metadata/plate.csv.gz",
    "data.jump.labels": "metadata/labels.csv",
    "data.jump.plate_types": ("COMPOUND",),
    "data.jump.stats_sample": 6,
    "data.crop_size": 24,  # sites are 32 px after 2x downsampling
}

#: Seconds, not minutes: sizes only (and the one source that has three batches).
TINY = {
    "seeds": (0,), "train_sources": ("source_1",), "model.width": 4,
    "train.batch_size": 4, "train.eval_batch_size": 4, "train.num_epochs": 1,
    "train.patience": 1, "eval.batch_size": 4, "arm.n_perturbed": 4, "arm.n_controls": 2,
    "arm.episodes_per_step": 2, "arm.val_episodes": 2, "adapt.n_controls": 2,
    "adapt.on_short_controls": "resample", "adapt.plate_chunk_size": 8,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One store for the module: built by the first study, reopened by the others."""
    return str(tmp_path_factory.mktemp("jump_cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Shared trained models: studies 2 and 3 reuse study 1's (same training configs), so
    only the first study to need a recipe compiles and trains it."""
    return str(tmp_path_factory.mktemp("jump_checkpoints"))


def _flag(key: str, value) -> str:
    return f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"


def _run_py(name: str, workdir, values: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd(),
               # The gallery's training split holds 6 labelled images: a batch of 4 on 2
               # devices (the tests' usual 8 would need batches of 8).
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run(
        [sys.executable, "experiments/run.py", f"--config=configs/{name}.py",
         f"--workdir={workdir}", *[_flag(k, v) for k, v in values.items()]],
        capture_output=True, text=True, timeout=600, env=env)


def _run(name: str, workdir, cache_dir: str, checkpoints: str, **changes):
    """experiments/run.py on configs/<name>.py with the data and size flags; its config."""
    values = {**DATA, **TINY, "data.cache_dir": cache_dir, "checkpoint_dir": checkpoints,
              **changes}
    proc = _run_py(name, workdir, values)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert name in proc.stdout and "results in" in proc.stdout
    return set_keys(cli.load_config_file(f"configs/{name}.py"), values)


def _check(workdir, cfg) -> list[dict]:
    with open(os.path.join(workdir, "results.json")) as f:
        rows = json.load(f)["rows"]
    for suffix in ("json", "md", "csv"):
        assert os.path.getsize(os.path.join(workdir, f"results.{suffix}")) > 0
    accuracy = [r for r in rows if r["metric"] == "accuracy"]
    assert {r["method"] for r in accuracy} == set(cfg.methods)
    assert {r["split"] for r in accuracy} == set(cfg.eval_splits)
    assert all(0.0 <= r["mean"] <= 1.0 for r in accuracy)
    with open(os.path.join(workdir, "log.txt")) as f:
        assert "JUMP world: 64 sites, sources ['source_1', 'source_2']" in f.read()
    return accuracy


def test_study_1_domain_gap(tmp_path, cache_dir, checkpoints):
    cfg = _run("domain_gap", tmp_path, cache_dir, checkpoints)
    accuracy = _check(tmp_path, cfg)
    assert len(accuracy) == len(cfg.methods) * len(cfg.eval_splits)


def test_study_2_label_shift(tmp_path, cache_dir, checkpoints):
    sweep = ({"alpha": 0.1, "N": 2}, {"alpha": "balanced", "N": 2})
    cfg = _run("label_shift", tmp_path, cache_dir, checkpoints, sweep=sweep)
    accuracy = _check(tmp_path, cfg)
    swept = {(r["method"], r["setting"].get("alpha"), r["setting"].get("N")) for r in accuracy}
    assert {("cs_arm_bn", 0.1, 2), ("erm", "balanced", None), ("arm_bn", 0.1, None)} <= swept


def test_study_3_context_size(tmp_path, cache_dir, checkpoints):
    sweep = tuple({"L": L, "N": N} for L in (1, 4) for N in (0, 2))
    cfg = _run("context_size", tmp_path, cache_dir, checkpoints, sweep=sweep)
    accuracy = _check(tmp_path, cfg)
    settings = {(r["method"], r["setting"].get("L"), r["setting"].get("N")) for r in accuracy}
    assert {("cs_arm_bn", L, N) for L in (1, 4) for N in (0, 2)} <= settings


@pytest.mark.parametrize("change, line", [
    ({"data.jump.root": "/nonexistent/gallery"},
     "error: config.data.jump.root='/nonexistent/gallery' is not a directory; point it at the "
     "local copy of the Cell Painting Gallery"),
    ({"data.jump.load_data": ("cpg0016-jump/source_9/*/load_data.csv.gz",)},
     "error: config.data.jump.load_data='cpg0016-jump/source_9/*/load_data.csv.gz': no such file"),
    ({"data.jump.compounds": ("JCP2022_025848", "JCP2022_012818", "JCP2022_033924")},
     "error: config.data.jump.compounds lists 1 compound(s) absent from the label table "
     "'metadata/labels.csv', e.g. ['JCP2022_012818']"),
])
def test_a_path_or_table_mistake_is_one_line_naming_the_key(tmp_path, change, line):
    values = {**DATA, **TINY, "data.cache_dir": str(tmp_path / "cache"), **change}
    proc = _run_py("domain_gap", tmp_path / "run", values)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "cache").exists()
