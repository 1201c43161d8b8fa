"""DINO training-step throughput (source images/s) of jaxadapt's ViT + DINO step.

Reproduce (2 CPU cores, a few minutes; compare with the reference on the same machine):
    JAX_PLATFORMS=cpu python experiments/benchmarks/bench_dino.py
    PEER_SRC=<peer_src> <torch venv>/bin/python ../shared/peerbench/bench_dino_torch.py \
        --crops 96:48 --out-dims 4096,65536
On a GPU (defaults become DeiT-S 224 px global / 96 px local crops, float32 and bfloat16,
cuDNN attention where it applies); a larger batch with --batch:
    python experiments/benchmarks/bench_dino.py --batch 64

The timed step is the training code path: `jaxadapt.methods.coda.dino.make_dino_step` (teacher
on the 2 global crops, student with drop path 0.1 on all crops, DINO loss with centring,
backward, DINO's per-parameter clipping at 3.0, `dino_optim` AdamW with its schedules and
last-layer freeze logic, teacher EMA, centre update) under `parallel_dino_step` over
`jaxadapt.train.parallel.make_data_mesh()`, with the state donated. The state starts at
epoch 1 (the last layer is no longer frozen), as the reference bench's ``epoch=1``.
Crops are random arrays already on the device (no data loading or augmentation), as in
``bench_dino_torch.py``; ``--in-chans`` defaults to 3 like that bench (5 for raw Cell
Painting changes only the patch embedding).

Each configuration runs in a child process (so that peak memory is its own) and prints
one JSON line: median / min / max step seconds over ``--iters`` timed steps after
``--warmup`` steps, images/s = batch / median step, the first call's seconds (compile
+ one step) and ``compile_s`` = first call - median step, peak memory (host RSS; on a
GPU also the device's peak bytes in use), process CPU seconds per step.

Measured 2026-11-29 on the shared 2-core CPU (load average 9-15 from other jobs; ViT-S/16,
2x96 + 6x48 px crops, batch 8, 3 channels, float32), images/s, medians of 5 steps:
  2 threads, alternating runs (reference / ours):  head 4096: 0.27, 0.32, 0.29 / 0.98, 1.45
    (3-5x); head 65536: 0.33, 0.36, 0.25 / 0.81, 0.99 (2.2-4x). Under this load the
    reference's 2-thread pool degrades ~8x (its own README: 6.4 and 5.2 img/s unloaded),
    so these ratios flatter us.
  both pinned to one core (taskset -c 0; reference --threads 1), one pair:
    head 4096: 2.20 / 1.53 (0.69x); head 65536: 1.95 / 1.28 (0.65x). Ours spent 3.2 and
    3.8 CPU s per step. Compile: 65-110 s per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


PRESETS = {  # backend -> (crops, dtypes)
    "cpu": ("96:48", "float32"),
    "gpu": ("224:96", "float32,bfloat16"),
}


def _build(a: argparse.Namespace, g: int, lo: int, out_dim: int, dtype: str):
    """(jitted step, state, batch) for one configuration, all on the mesh."""
    import jax
    import jax.numpy as jnp

    from jaxadapt.methods.coda import dino, dino_optim
    from jaxadapt.models.vit import DINOHead, DINOModel
    from jaxadapt.models import vit
    from jaxadapt.train import parallel

    dt = jnp.dtype(dtype)
    attn = None if a.attn == "none" else a.attn
    if attn == "auto":  # cuDNN fused attention takes only half precision
        attn = "cudnn" if jax.default_backend() == "gpu" and dt != jnp.float32 else None
    head = DINOHead(out_dim=out_dim, dtype=dt)
    student = DINOModel(vit(a.model, dtype=dt, drop_path_rate=0.1, attn_implementation=attn),
                        head)
    teacher = DINOModel(vit(a.model, dtype=dt, attn_implementation=attn), head)

    def apply_fn(params, crops, rng=None):
        if rng is None:  # the teacher (make_dino_step calls it without a key)
            return teacher.apply({"params": params}, crops)
        return student.apply({"params": params}, crops, train=True, rngs={"dropout": rng})

    rng = np.random.default_rng(0)
    c = a.in_chans
    batch = {"global": rng.standard_normal((a.batch, 2, g, g, c), np.float32),
             "local": rng.standard_normal((a.batch, a.n_local, lo, lo, c), np.float32)}
    key = jax.random.key(0)
    params = jax.jit(student.init)(key, [jnp.zeros((1, g, g, c))])["params"]
    niter = 1000
    sched = dino_optim.make_dino_schedules(epochs=100, niter_per_ep=niter, batch_size=a.batch)
    tx = dino_optim.make_dino_optimizer(sched)
    mesh = parallel.make_data_mesh()
    state = dino.create_dino_state(params, tx, key, out_dim).replace(step=jnp.int32(niter))
    step = dino.parallel_dino_step(
        dino.make_dino_step(apply_fn, tx, sched, axis_name=parallel.DATA_AXIS,
                            clip_grad=3.0, stochastic=True),
        mesh, axis_name=parallel.DATA_AXIS, donate_state=True)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return (step, parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh), n_params,
            attn)


def run_one(a: argparse.Namespace, g: int, lo: int, out_dim: int, dtype: str) -> dict:
    """Time one configuration in this process. Returns the JSON record."""
    import jax

    step, state, batch, n_params, attn = _build(a, g, lo, out_dim, dtype)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t0
    times, cpu = [], []
    for i in range(a.warmup + a.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    loss = float(m["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss {loss}")
    med = statistics.median(times)
    dev = jax.devices()[0]
    rec = {"bench": "dino_train_step", "impl": "jaxadapt", "size": f"{g}/{lo}",
           "batch": a.batch, "out_dim": out_dim, "dtype": dtype,
           "img_per_s_median": round(a.batch / med, 3),
           "min": round(a.batch / max(times), 3), "max": round(a.batch / min(times), 3),
           "step_s_median": round(med, 4), "step_s_min": round(min(times), 4),
           "step_s_max": round(max(times), 4), "step_s_all": [round(t, 4) for t in times],
           "cpu_s_per_step_median": round(statistics.median(cpu), 3),
           "first_call_s": round(first, 2), "compile_s": round(first - med, 2),
           "crops": f"2x{g}px + {a.n_local}x{lo}px", "in_chans": a.in_chans,
           "model": a.model, "attn": attn or "einsum", "student_params": n_params,
           "iters": a.iters, "warmup": a.warmup, "devices": jax.device_count(),
           "device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        rec["device_peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    return rec


def _configs(a: argparse.Namespace, backend: str):
    crops = a.crops or PRESETS["gpu" if backend == "gpu" else "cpu"][0]
    dtypes = a.dtypes or PRESETS["gpu" if backend == "gpu" else "cpu"][1]
    for spec in [s.strip() for s in crops.split(",") if s.strip()]:
        g, lo = (int(v) for v in spec.split(":"))
        for od in [int(v) for v in a.out_dims.split(",") if v.strip()]:
            for dt in [d.strip() for d in dtypes.split(",") if d.strip()]:
                yield g, lo, od, dt


def _child_args(a: argparse.Namespace) -> list[str]:
    return ["--batch", str(a.batch), "--in-chans", str(a.in_chans), "--n-local",
            str(a.n_local), "--model", a.model, "--attn", a.attn, "--iters", str(a.iters),
            "--warmup", str(a.warmup)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", default=None,
                   help="global:local pixel sizes, comma-separated (CPU 96:48, GPU 224:96)")
    p.add_argument("--out-dims", default="4096,65536", help="DINO head output sizes")
    p.add_argument("--dtypes", default=None,
                   help="compute dtypes (CPU float32; GPU float32,bfloat16)")
    p.add_argument("--batch", type=int, default=8, help="source images per step")
    p.add_argument("--in-chans", type=int, default=3, help="image channels (reference: 3)")
    p.add_argument("--n-local", type=int, default=6, help="local crops per image")
    p.add_argument("--model", default="vit_small", help="a jaxadapt.models.VIT_SIZES name")
    p.add_argument("--attn", choices=("auto", "none", "xla", "cudnn"), default="auto",
                   help="attention: auto = cuDNN for half precision on a GPU, else einsums")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--in-process", action="store_true",
                   help="run the configurations in this process (no child processes)")
    p.add_argument("--one", nargs=4, metavar=("G", "L", "OUT_DIM", "DTYPE"),
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        g, lo, od, dt = a.one
        print(json.dumps(run_one(a, int(g), int(lo), int(od), dt)), flush=True)
        return
    env = dict(os.environ)  # the children's: this process must not grab the GPU's memory
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    for g, lo, od, dt in _configs(a, jax.default_backend()):
        if a.in_process:
            print(json.dumps(run_one(a, g, lo, od, dt)), flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(g), str(lo), str(od),
               dt] + _child_args(a)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode == 0 and lines:
            print(lines[-1], flush=True)
        else:
            print(json.dumps({"bench": "dino_train_step", "impl": "jaxadapt",
                              "size": f"{g}/{lo}", "batch": a.batch, "out_dim": od,
                              "dtype": dt, "failed": True,
                              "reason": f"child exited {r.returncode}",
                              "stderr_tail": r.stderr[-800:]}), flush=True)


if __name__ == "__main__":
    main()
