"""experiments/merge_results.py: single-seed results files merge into mean +- std rows."""

import json
import os
import subprocess
import sys

from jaxadapt.eval import reports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(dirpath, study, seed, value, n=1):
    row = reports.Row("erm", "new_batch", {}, "accuracy", value, 0.0, n)
    reports.write_results(str(dirpath), study, {"seeds": [seed], "train_sources": ["s3"]}, [row])
    return str(dirpath / "results.json")


def _merge(paths, out):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "merge_results.py"),
                           "--out", str(out), *paths], capture_output=True, text=True, cwd=ROOT)


def test_merge_gives_mean_and_sample_std_over_seeds(tmp_path):
    paths = [_write(tmp_path / f"s{k}", "study", k, v) for k, v in enumerate((0.7, 0.8, 0.9))]
    proc = _merge(paths, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    payload = json.load(open(tmp_path / "out" / "results.json"))
    (row,) = payload["rows"]
    assert row["n"] == 3 and abs(row["mean"] - 0.8) < 1e-12 and abs(row["std"] - 0.1) < 1e-12
    assert payload["config"]["seeds"] == [0, 1, 2]


def test_merge_refuses_aggregated_rows_and_mixed_studies(tmp_path):
    a = _write(tmp_path / "a", "study", 0, 0.7, n=3)
    assert "single-replicate" in _merge([a], tmp_path / "o1").stderr
    b, c = _write(tmp_path / "b", "one", 0, 0.7), _write(tmp_path / "c", "two", 1, 0.8)
    assert "different studies" in _merge([b, c], tmp_path / "o2").stderr
