"""Cost of BN adaptation: adapted-plate inference vs ERM, and exact whole-plate statistics.

Reproduce (2 CPU cores, < 2 minutes):
    JAX_PLATFORMS=cpu python experiments/benchmarks/bench_adapt.py
Paper-sized on a GPU:
    python experiments/benchmarks/bench_adapt.py --model resnet50 --width 64 \
        --image-size 128 --stem imagenet --plate-size 4096 --batch-size 256

Prints
(a) inference throughput (images/s) of the adapted model (``norm_mode="given"`` with
    statistics from `plate_stats`) and of ERM (running statistics) on the same model and
    batch, and their ratio (target >= 0.9: adapted inference is at ERM cost);
(b) the time of exact whole-plate statistics (`plate_stats`) relative to one forward
    pass over the plate, with the number of passes it makes (one per BN dependency level).
Times are best-of-N per call, excluding compilation (a warm-up call runs first).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapt import bn
from jaxadapt.models.resnet import resnet18, resnet50


def _time(fns, repeats: int) -> list[float]:
    """Best-of-``repeats`` seconds per call of each fn, calls interleaved (less noise)."""
    for fn in fns:
        jax.block_until_ready(fn())  # warm-up / compile
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--stem", choices=("small", "imagenet"), default="small")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--plate-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    ctor = {"resnet18": resnet18, "resnet50": resnet50}[a.model]
    model = ctor(width=a.width, stem=a.stem, num_classes=8, in_channels=a.channels)
    shape = (a.batch_size, a.image_size, a.image_size, a.channels)
    variables = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1,) + shape[1:]),
                           norm_mode="running")
    rng = np.random.default_rng(0)
    plate = rng.normal(size=(a.plate_size,) + shape[1:]).astype(np.float32)
    chunks = [plate[s:s + a.batch_size] for s in range(0, a.plate_size, a.batch_size)]
    x = jnp.asarray(chunks[0])
    print(f"device={jax.devices()[0].platform} model={a.model} width={a.width} "
          f"image={a.image_size}px batch={a.batch_size} plate={a.plate_size}")

    # (a) adapted inference vs ERM
    stats = bn.plate_stats(model, variables, chunks, chunk_size=a.batch_size)
    erm = jax.jit(lambda v, x: model.apply(v, x, norm_mode="running")[0])
    t_erm, t_ada = _time([lambda: erm(variables, x),
                          lambda: bn.apply_with_stats(model, variables, stats, x)],
                         a.repeats * 4)
    print(f"(a) ERM inference      {a.batch_size / t_erm:10.1f} images/s")
    print(f"    adapted inference  {a.batch_size / t_ada:10.1f} images/s   "
          f"ratio {t_erm / t_ada:.2f}x (target >= 0.9)")

    # (b) exact whole-plate statistics vs one forward pass over the plate
    passes = len(bn.layer_levels(model, variables, shape))
    (t_fwd,) = _time([lambda: [erm(variables, jnp.asarray(c)) for c in chunks]], a.repeats)
    (t_plate,) = _time([lambda: bn.plate_stats(model, variables, chunks,
                                               chunk_size=a.batch_size)], 1)
    plate_t = lambda: bn.plate_stats(model, variables, chunks,  # noqa: E731
                                     chunk_size=a.batch_size, truncate=True)
    start = time.perf_counter()
    plate_t()
    t_compile = time.perf_counter() - start
    (t_trunc,) = _time([plate_t], 1)
    print(f"(b) one forward pass over the plate   {t_fwd:8.3f} s")
    print(f"    exact plate statistics            {t_plate:8.3f} s   "
          f"= {t_plate / t_fwd:.1f}x one pass; {passes} passes "
          f"({len(bn.layer_paths(variables))} BN layers)")
    print(f"    truncated passes (truncate=True)  {t_trunc:8.3f} s   "
          f"= {t_trunc / t_fwd:.1f}x one pass; first call incl. {passes} compiles "
          f"{t_compile:.1f} s")


if __name__ == "__main__":
    main()
