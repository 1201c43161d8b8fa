"""Two real JAX processes (localhost coordinator, gloo CPU collectives) == one process.

Each process of the 2-process job has 2 CPU devices; the reference is one process with
4, so both runs split the same global batches over 4 devices. ERM and CS-ARM-BN must end
with the same weights, each process must read only its half of every batch, the
training images' channel statistics must be bit-identical with each image read once, and
the evaluation (AdaBN per plate) must give the same confusion matrix with each plate read by
one process only. See multiprocess_worker.py.
"""

import collections
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(pid, nproc, port, ndev, out, run, log):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return subprocess.Popen(
        [sys.executable, WORKER, str(pid), str(nproc), str(port), str(ndev), out, run],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _run_all(tmp_path):
    """Starts the 2-process job and the 1-process reference together; waits for all."""
    port, procs = _free_port(), []
    jobs = [(0, 2, 2, "two"), (1, 2, 2, "two"), (0, 1, 4, "ref")]
    for pid, nproc, ndev, name in jobs:
        log = open(tmp_path / f"{name}{pid}.log", "w")
        procs.append((_launch(pid, nproc, port, ndev, str(tmp_path / name),
                              str(tmp_path / f"{name}_run"), log), log))
    for p, log in procs:
        try:
            p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    for (p, _), (pid, _, _, name) in zip(procs, jobs):
        text = (tmp_path / f"{name}{pid}.log").read_text()
        assert p.returncode == 0, f"{name} process {pid} failed:\n{text[-3000:]}"
    return [dict(np.load(tmp_path / name / f"process{pid}.npz")) for pid, _, _, name in jobs]


def _weights(out: dict) -> dict:
    return {k: v for k, v in out.items()
            if not k.endswith("reads") and k != "cm" and not k.startswith("stats")}


def test_two_processes_train_and_score_as_one(tmp_path):
    p0, p1, ref = _run_all(tmp_path)
    run = tmp_path / "two_run" / "cs_arm_bn"
    assert sorted(os.listdir(run)) == ["checkpoints", "episode.json", "logs"]  # one writer

    weights = _weights(ref)
    assert any(k.startswith("erm") for k in weights) and any(k.startswith("cs") for k in weights)
    assert set(_weights(p0)) == set(weights) == set(_weights(p1))
    for k, v in weights.items():
        # Replicated state: both processes hold the very same weights ...
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
        # ... equal to one process's up to float32 reduction order.
        np.testing.assert_allclose(p0[k], v, rtol=1e-5, atol=1e-5, err_msg=k)

    # Channel statistics: exact integer sums totalled over processes, bit-identical.
    for k in ("stats_mean", "stats_std"):
        np.testing.assert_array_equal(p0[k], ref[k])
        np.testing.assert_array_equal(p1[k], ref[k])

    for phase in ("stats_reads", "erm_reads", "cs_reads", "eval_reads"):
        a, b, r = p0[phase], p1[phase], ref[phase]
        assert len(r) > 0
        # Each process reads half of what one process reads, and together exactly that.
        assert len(a) == len(b) == len(r) // 2, (phase, len(a), len(b), len(r))
        assert collections.Counter(a.tolist()) + collections.Counter(b.tolist()) == \
            collections.Counter(r.tolist()), phase

    # Statistics and evaluation: no image read by both processes (units dealt out whole),
    # totals summed over processes.
    for phase in ("stats_reads", "eval_reads"):
        assert not set(p0[phase].tolist()) & set(p1[phase].tolist()), phase
    np.testing.assert_array_equal(p0["cm"], ref["cm"])
    np.testing.assert_array_equal(p1["cm"], ref["cm"])
    assert ref["cm"].sum() == 4 * 18  # every perturbed image of the 4 plates scored once
