import csv
import json
import os

import numpy as np
import pytest

from jaxadapt.eval import reports


def _scores():
    out = []
    for seed, (a, b) in enumerate([(0.9, 0.5), (0.8, 0.6), (0.7, 0.7)]):
        out.append(reports.Score("erm", "in_domain", "accuracy", a, run=f"seed={seed}"))
        out.append(reports.Score("erm", "new_source", "accuracy", b, run=f"seed={seed}"))
        out.append(reports.Score("cs_arm_bn", "new_source", "accuracy", b + 0.1, {"L": 16, "N": 128}, run=f"seed={seed}"))
    return out


def test_aggregate_mean_and_sample_std():
    rows = reports.aggregate(_scores())
    row = next(r for r in rows if (r.method, r.split) == ("erm", "in_domain"))
    assert row.mean == pytest.approx(0.8)
    assert row.std == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
    assert row.n == 3


def test_duplicate_replicate_is_refused():
    s = reports.Score("erm", "in_domain", "accuracy", 0.5, run="seed=0")
    with pytest.raises(ValueError, match="reported twice"):
        reports.aggregate([s, s])


def test_write_results_files_agree(tmp_path):
    rows = reports.aggregate(_scores())
    paths = reports.write_results(str(tmp_path), "study", {"seeds": [0, 1, 2]}, rows)
    payload = json.load(open(paths["json"]))
    assert set(payload) == {"study", "config", "rows"}
    assert set(payload["rows"][0]) == {"method", "split", "setting", "metric", "mean", "std", "n"}
    assert reports.load_rows(paths["json"]) == rows
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = open(paths["md"]).read()
    assert "L=16, N=128" in md and "0.800 ± 0.100 (3)" in md
    assert os.path.getsize(paths["png"]) > 1000


def test_pair_splits_make_a_source_matrix_heat_map(tmp_path):
    from jaxadapt.eval import reports as matrix_plot

    Row, write_results = reports.Row, reports.write_results
    rows = [Row("oda", "source:source_3->source_3", {}, "accuracy", 0.4, 0.0, 3),
            Row("oda", "source:source_3->source_5", {}, "accuracy", 0.2, 0.0, 3),
            Row("oda", "source:source_5->source_3", {}, "accuracy", 0.1, 0.0, 3),
            Row("oda", "new_batch", {}, "accuracy", 0.9, 0.0, 3),
            Row("oda", "source:source_3->source_5", {}, "macro_f1", 0.7, 0.0, 3)]
    train, target, grids = matrix_plot.matrix_cells(rows)
    assert train == ["source_3", "source_5"] and target == ["source_3", "source_5"]
    np.testing.assert_array_equal(grids["oda"], [[0.4, 0.2], [0.1, np.nan]])
    paths = write_results(str(tmp_path), "m", {}, rows)
    assert os.path.getsize(paths["matrix"]) > 0
    assert "matrix" not in write_results(str(tmp_path / "pooled"), "p", {}, rows[3:4])
