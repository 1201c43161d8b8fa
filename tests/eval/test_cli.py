import pathlib
import subprocess
import sys

import pytest

from jaxadapt.eval import cli, validation

CONFIG = "configs/quickstart.py"


def test_typo_override_lists_valid_keys():
    config = cli.load_config_file(CONFIG)
    with pytest.raises(ValueError) as err:
        cli.check_overrides(["run.py", f"--config={CONFIG}", "--config.train.learning_rat=0.1"], config)
    message = str(err.value)
    assert "train.learning_rat" in message and "Did you mean train.learning_rate" in message
    assert "data.sim.sites_per_well" in message  # the full list of valid keys


def test_valid_overrides_and_sub_configs_pass():
    config = cli.load_config_file(CONFIG)
    cli.check_overrides(["--config.train.learning_rate=0.1", "--config.data.sim.seed=3"], config)


def test_missing_config_file_is_named():
    with pytest.raises(ValueError, match="no such config file"):
        cli.load_config_file("configs/nope.py")


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant"):
        cli.load_config_file(f"{CONFIG}:tpu-pod")


def test_run_py_reports_typo_without_traceback():
    proc = subprocess.run(
        [sys.executable, "experiments/run.py", f"--config={CONFIG}", "--config.seedz=(1,)"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no such config key" in proc.stderr and "Traceback" not in proc.stderr


STUDY_CONFIGS = sorted(p.stem for p in pathlib.Path("configs").glob("*.py"))


def test_the_config_folder_holds_every_study():
    assert {"quickstart", "erm", "domain_gap", "label_shift", "context_size", "dino_pretrain",
            "coda_matrix", "coda_granularity"} <= set(STUDY_CONFIGS)


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_every_study_config_loads_and_validates_in_both_variants(name):
    for variant in ("cpu", "gpu"):
        config = cli.load_config_file(f"configs/{name}.py:{variant}")
        assert config.study == name
        validation.validate(config)


def _run(tmp_path, *args):
    """experiments/run.py on a config nothing may be rendered for (a fresh cache dir)."""
    return subprocess.run(
        [sys.executable, "experiments/run.py", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_run_py_bad_value_is_one_line_exit_2_before_anything_runs(tmp_path):
    proc = _run(tmp_path, "--config.eval.batch_size=0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: config.eval.batch_size=0: must be an integer >= 1; set e.g. --config.eval.batch_size=32"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_run_py_malformed_sweep_shows_the_right_syntax(tmp_path):
    # A single dict (no tuple) reaches the config as its keys, ('L', 'N').
    proc = _run(tmp_path, '--config.sweep={"L": 16, "N": 128}')
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: config.sweep=('L', 'N')")
    assert """--config.sweep='({"L": 16, "N": 128},)'""" in lines[0]
    assert "dictionary update sequence" not in proc.stderr and "Traceback" not in proc.stderr


def test_run_py_traceback_flag_shows_the_traceback(tmp_path):
    proc = _run(tmp_path, "--config.eval.batch_size=0", "--traceback")
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr and "ConfigError: config.eval.batch_size=0" in proc.stderr


def test_run_py_unparsable_flag_names_type_and_example(tmp_path):
    proc = _run(tmp_path, "--config.eval.batch_size=abc")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--config.eval.batch_size=abc" in lines[0]
    assert "config.eval.batch_size is an integer, e.g. --config.eval.batch_size=32" in lines[0]


def test_report_errors_one_line_for_user_errors_only(capsys):
    def bad_data():
        raise ValueError("plate 'p1' has no control wells; add DMSO wells")

    with pytest.raises(SystemExit) as exit_:
        cli.report_errors(bad_data)
    assert exit_.value.code == cli.EXIT_ERROR == 2
    assert capsys.readouterr().err == "error: plate 'p1' has no control wells; add DMSO wells\n"
    with pytest.raises(ValueError, match="no control wells"):
        cli.report_errors(bad_data, traceback=True)

    def bug():
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):  # keeps its traceback
        cli.report_errors(bug)
    assert cli.report_errors(lambda: 7) == 7


def test_report_errors_lists_each_config_problem_and_a_requested_stop(capsys):
    from jaxadapt.eval.validation import ConfigError
    from jaxadapt.train.supervised import Interrupted

    with pytest.raises(SystemExit) as exit_:
        cli.report_errors(lambda: (_ for _ in ()).throw(ConfigError(["a=1: fix a", "b=2: fix b"])))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: a=1: fix a\nerror: b=2: fix b\n"
    with pytest.raises(SystemExit) as exit_:
        cli.report_errors(lambda: (_ for _ in ()).throw(Interrupted("runs/x", 1)))
    assert exit_.value.code == cli.EXIT_STOPPED
    assert capsys.readouterr().err.startswith("stopped: training in runs/x stopped after 1 epoch")
