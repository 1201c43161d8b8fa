"""Training and inference throughput of the study model (images per second).

Reproduce (2 CPU cores; on a GPU host drop JAX_PLATFORMS):
    JAX_PLATFORMS=cpu python experiments/benchmarks/bench_train.py
    python experiments/benchmarks/bench_train.py --config configs/erm.py:gpu --steps 50

Times the jitted, data-parallel ERM train step (forward, backward, Adam; BN in batch
mode) and the running-statistics eval step on synthetic batches of the config's shape,
after a warm-up step that compiles. Reports device, JAX version and images/s.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from jaxadapt.eval.cli import load_config_file
from jaxadapt.models import build_model
from jaxadapt.train import parallel, steps
from jaxadapt.train.state import create_train_state


def synthetic_batch(batch_size: int, size: int, channels: int, classes: int, seed: int = 0) -> dict:
    """A random normalized batch of the given shape (pixels do not affect speed)."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch_size, size, size, channels), np.float32),
        "label": rng.integers(0, classes, batch_size).astype(np.int32),
        "mask": np.ones(batch_size, bool),
    }


def time_steps(step, state, batch, n: int) -> tuple[float, object]:
    """Seconds per call of `step` over n calls after one compiling call."""
    state, out = step(state, batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(n):
        state, out = step(state, batch)
    jax.block_until_ready((state, out))
    return (time.perf_counter() - start) / n, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/erm.py", help="study config (path[:variant])")
    parser.add_argument("--batch-size", type=int, default=None, help="default: config.train.batch_size")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cfg = load_config_file(args.config)
    batch_size = args.batch_size or cfg.train.batch_size
    size, channels = cfg.data.crop_size, cfg.model.in_channels
    model = build_model(cfg.model)
    mesh = parallel.make_data_mesh()
    tx = optax.adam(cfg.train.learning_rate)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, size, size, channels))
    state = parallel.replicate(state, mesh)
    batch = parallel.shard_batch(synthetic_batch(batch_size, size, channels, cfg.model.num_classes), mesh)

    train = parallel.parallel_train_step(steps.make_train_step(model, tx), mesh)
    train_s, state = time_steps(train, state, batch, args.steps)
    evaluate = parallel.parallel_eval_step(steps.make_eval_step(model), mesh)
    eval_s, _ = time_steps(lambda s, b: (s, evaluate(s, b)), state, batch, args.steps)

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} | {jax.device_count()} x {dev.platform} ({dev.device_kind})")
    print(f"model {cfg.model.name} width {cfg.model.width} stem {cfg.model.stem} | "
          f"batch {batch_size} x {size}x{size}x{channels}")
    print(f"train step: {train_s * 1e3:8.1f} ms  {batch_size / train_s:9.1f} images/s")
    print(f"eval step:  {eval_s * 1e3:8.1f} ms  {batch_size / eval_s:9.1f} images/s")


if __name__ == "__main__":
    main()
