import subprocess
import sys

import pytest

from jaxadapt.eval import cli

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


@pytest.mark.parametrize("name", ["quickstart", "erm", "domain_gap", "label_shift", "context_size"])
def test_every_study_config_loads_in_both_variants(name):
    for variant in ("cpu", "gpu"):
        config = cli.load_config_file(f"configs/{name}.py:{variant}")
        assert config.study == name
