"""Study level: `tvn` and `erm` give accuracy and retrieval (copairs mAP) rows."""

import json
import os

from jaxadapt.eval import protocol, study
from tests.eval.tiny import tiny_config


def _rows(workdir):
    rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
    return {(r["method"], r["split"], r["metric"]): r["mean"] for r in rows}


def _mtimes(root):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def test_tvn_row_with_map_beside_accuracy(tmp_path, sim_cache, capsys):
    ckpt = str(tmp_path / "ckpt")
    cfg = tiny_config(sim_cache, **{"methods": ("erm", "tvn"), "eval.retrieval": True,
                                    "checkpoint_dir": ckpt, "tvn.head_steps": 100})
    study.main(cfg, workdir=str(tmp_path / "run"))
    rows = _rows(str(tmp_path / "run"))
    for method in ("erm", "tvn"):
        for metric in ("accuracy", "macro_f1", "map_replicate", "map_moa"):
            value = rows[(method, "new_source", metric)]
            assert 0.0 <= value <= 1.0, (method, metric, value)
    assert "new_source map_replicate" in capsys.readouterr().out  # the printed table
    # new_batch is a single plate: no well has a replicate on another plate, so no mAP row.
    assert ("tvn", "new_batch", "accuracy") in rows and ("tvn", "new_batch", "map_moa") not in rows

    # One ERM model serves both methods: tvn's extractor is the erm recipe's checkpoint.
    rep = protocol.Replicate(cfg.train_sources[0], cfg.seeds[0])
    seed_dir = os.path.dirname(protocol.checkpoint_path(cfg, rep, "erm", ""))
    assert sorted(d.split("-")[0] for d in os.listdir(seed_dir)) == ["erm", "tvn"]

    # A re-run restores everything (no file rewritten); without retrieval it writes the
    # same accuracy rows and no mAP row (retrieval never touches a prediction).
    before = _mtimes(ckpt)
    plain = tiny_config(sim_cache, **{"methods": ("erm", "tvn"), "checkpoint_dir": ckpt,
                                      "tvn.head_steps": 100})
    study.run_study(plain, str(tmp_path / "plain"))
    assert _mtimes(ckpt) == before
    again = _rows(str(tmp_path / "plain"))
    assert again == {k: v for k, v in rows.items() if not k[2].startswith("map_")}
