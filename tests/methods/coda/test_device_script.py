"""The prepared accelerator check (experiments/benchmarks/device_coda.py) runs at tiny size."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(ROOT, "experiments", "benchmarks", "device_coda.py")


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_device_script_pretrains_adapts_and_reports(tmp_path):
    out = tmp_path / "device.json"
    proc = _run("--size", "tiny", "--batch", "4", "--pretrain-steps", "2", "--adapt-steps", "2",
                "--sites", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["crops"] == "2x48 + 6x24" and result["model"] == "vit_cpu"
    for phase in ("pretrain", "adapt"):
        p = result[phase]
        assert p["steps"] == 2 and p["images_per_s"] > 0
        assert 0 < p["teacher_entropy"] <= p["log_k"] + 1e-6


def test_device_script_bad_input():
    proc = _run("--size", "tiny", "--batch", "0")
    assert proc.returncode == 2 and "--batch=0 must be >= 1" in proc.stderr
