"""Study level: `tvn` and `erm` give accuracy and retrieval (copairs mAP) rows."""

import json
import os

import numpy as np
from tests.eval.tiny import tiny_config

from jaxadapt.eval import protocol, study


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


def test_tvn_on_a_user_embedding_file(tmp_path, sim_cache):
    """Embeddings from a file: class signal plus a strong per-plate shift and scale."""
    from jaxadapt.data.sim import builder as tfds_sim

    cfg = tiny_config(sim_cache, **{"methods": ("tvn",), "eval.retrieval": True,
                                    "tvn.extractor": "file", "tvn.head_steps": 200,
                                    "checkpoint_dir": str(tmp_path / "ckpt")})
    _, table = tfds_sim.load_simulated(cfg.data.sim, cfg.data.cache_dir)
    rng = np.random.default_rng(0)
    d = 12
    plates = {p: (10 * rng.normal(size=d), rng.uniform(0.3, 3.0, size=d))
              for p in table.unique("plate")}
    signal = np.where(table["label"][:, None] >= 0,
                      2.0 * np.eye(d)[np.maximum(table["label"], 0)], 0.0)
    emb = np.stack([(signal[i] + 0.3 * rng.normal(size=d)) * plates[p][1] + plates[p][0]
                    for i, p in enumerate(table["plate"])])
    path = str(tmp_path / "emb.npy")
    np.save(path, emb)
    cfg.tvn.embeddings_file = path
    study.run_study(cfg, str(tmp_path / "run"))
    rows = _rows(str(tmp_path / "run"))
    # Each plate aligned on its own DMSO wells: the plate effects are gone.
    assert rows[("tvn", "new_source", "accuracy")] > 0.95
    assert rows[("tvn", "new_source", "map_replicate")] > 0.9
    assert rows[("tvn", "new_source", "map_moa")] > 0.9
    # Without the per-plate alignment, the frozen training TVN does not remove them.
    cfg.tvn.per_unit = False
    study.run_study(cfg, str(tmp_path / "global"))
    assert _rows(str(tmp_path / "global"))[("tvn", "new_source", "accuracy")] < 0.7
