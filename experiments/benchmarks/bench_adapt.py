"""Cost of BN adaptation: adapted-plate inference vs ERM, and exact whole-plate statistics.

Reproduce (2 CPU cores, about 5 minutes):
    JAX_PLATFORMS=cpu python experiments/benchmarks/bench_adapt.py
Paper-sized on a GPU:
    python experiments/benchmarks/bench_adapt.py --model resnet50 --width 64 \
        --image-size 128 --stem imagenet --plate-size 4096 --batch-size 256

Prints, per model
(a) inference throughput (images/s) of the adapted model (``norm_mode="given"`` with
    statistics from `plate_stats`) and of ERM (running statistics) on the same model and
    batch, and their ratio (target >= 0.9: adapted inference is at ERM cost);
(b) the time of exact whole-plate statistics (`plate_stats`) relative to one forward
    pass (ERM, same chunks, host-to-device copies included):
    - new: the carried path (one stage per BN dependency level, activations carried
      between stages: one forward pass in all), on the whole plate, with the automatic
      store (the device; on a CPU backend that is host RAM without copies) and with
      ``carry="host"`` (NumPy copies to and from host RAM); target about 2x;
    - old: the recompute path (``carry_budget=0``: one full pass per level), on the first
      ``--old-plate-size`` images (it costs tens of passes), against a forward pass over
      those same images;
    - the memory the carried state needs per image at its peak, at this size and at paper size
      (ResNet-50, 128 px, width 64, ImageNet stem; found by tracing, no compute).
Times are best-of-N per call, excluding compilation (a warm-up call runs first; the
carried path's first call, which compiles one program per stage, is printed apart).
Process CPU seconds are printed beside wall seconds: on a machine shared with other jobs
they are the steadier measure of cost.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.methods.bn import plate_stats as bn_plate
from jaxadapt.methods.bn import stats as bn
from jaxadapt.models.resnet import resnet18, resnet50


CTORS = {"resnet18": resnet18, "resnet50": resnet50}


def _time(fns, repeats: int, warm: bool = True) -> list[float]:
    """Best-of-``repeats`` wall seconds per call of each fn, calls interleaved (less noise)."""
    return [w for w, _ in _time_cpu(fns, repeats, warm)]


def _time_cpu(fns, repeats: int, warm: bool = True) -> list[tuple[float, float]]:
    """Best-of-``repeats`` (wall, process CPU) seconds per call of each fn, interleaved.
    CPU seconds (all threads of this process) are robust to other load on the machine."""
    if warm:
        for fn in fns:
            jax.block_until_ready(fn())  # warm-up / compile
    best = [(float("inf"), float("inf"))] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def _kib_per_image(model, shape, channels_dtype=jnp.float32) -> float:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"),
                                                  jnp.zeros((1,) + shape[1:]),
                                                  norm_mode="running"))
    return bn_plate.carry_bytes(model, variables, shape, channels_dtype) / shape[0] / 2**10


def bench(name: str, a: argparse.Namespace) -> None:
    """Print (a) and (b) for one model."""
    model = CTORS[name](width=a.width, stem=a.stem, num_classes=8, in_channels=a.channels)
    shape = (a.batch_size, a.image_size, a.image_size, a.channels)
    variables = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1,) + shape[1:]),
                           norm_mode="running")
    rng = np.random.default_rng(0)
    plate = rng.normal(size=(a.plate_size,) + shape[1:]).astype(np.float32)
    chunks = [plate[s:s + a.batch_size] for s in range(0, a.plate_size, a.batch_size)]
    old_chunks = chunks[:max(1, a.old_plate_size // a.batch_size)]
    x = jnp.asarray(chunks[0])
    print(f"\n== {name}: device={jax.devices()[0].platform} width={a.width} stem={a.stem} "
          f"image={a.image_size}px batch={a.batch_size} plate={a.plate_size}")

    # (a) adapted inference vs ERM
    start = time.perf_counter()
    stats = bn_plate.plate_stats(model, variables, chunks, chunk_size=a.batch_size)
    t_first = time.perf_counter() - start
    erm = jax.jit(lambda v, x: model.apply(v, x, norm_mode="running")[0])
    t_erm, t_ada = _time([lambda: erm(variables, x),
                          lambda: bn.apply_with_stats(model, variables, stats, x)],
                         a.repeats * 4)
    print(f"(a) ERM inference      {a.batch_size / t_erm:10.1f} images/s")
    print(f"    adapted inference  {a.batch_size / t_ada:10.1f} images/s   "
          f"ratio {t_erm / t_ada:.2f}x (target >= 0.9)")

    # (b) exact whole-plate statistics vs one forward pass over the same chunks
    def forward(cs):
        return [erm(variables, jnp.asarray(c)) for c in cs]

    passes = len(bn_plate.layer_levels(model, variables, shape))
    new_path = lambda carry: bn_plate.plate_stats(model, variables, chunks,  # noqa: E731
                                            chunk_size=a.batch_size, carry=carry)
    (fwd, new, host) = _time_cpu([lambda: forward(chunks), lambda: new_path("auto"),
                                  lambda: new_path("host")], a.repeats)
    old_path = lambda cs: bn_plate.plate_stats(model, variables, cs,  # noqa: E731
                                         chunk_size=a.batch_size, carry_budget=0)
    old_path(old_chunks[:1])  # compile (one program for all passes)
    (fwd_old, old) = _time_cpu([lambda: forward(old_chunks), lambda: old_path(old_chunks)],
                               1, warm=False)
    n_old = len(old_chunks) * a.batch_size
    kib = bn_plate.carry_bytes(model, variables, shape) / a.batch_size / 2**10
    print(f"(b) one forward pass over the plate     {fwd[0]:7.3f} s wall {fwd[1]:7.3f} s CPU"
          f"  ({a.plate_size} images)")
    print(f"    new: carried path (auto: device)    {new[0]:7.3f} s wall {new[1]:7.3f} s CPU"
          f"  = {new[0] / fwd[0]:.2f}x one pass (CPU {new[1] / fwd[1]:.2f}x); first call "
          f"incl. {passes} stage compiles {t_first:.1f} s")
    print(f"    new: carried path, host RAM store  {host[0]:7.3f} s wall {host[1]:7.3f} s CPU"
          f"  = {host[0] / fwd[0]:.2f}x one pass (CPU {host[1] / fwd[1]:.2f}x), host copies "
          "included")
    print(f"    old: recompute path, {passes} passes   {old[0]:7.3f} s wall {old[1]:7.3f} s CPU"
          f"  = {old[0] / fwd_old[0]:.2f}x one pass (CPU {old[1] / fwd_old[1]:.2f}x) over "
          f"the same {n_old} images ({fwd_old[0]:.3f} s wall)")
    print(f"    carried state at its peak: {kib:.1f} KiB/image = "
          f"{kib * a.plate_size / 2**10:.1f} MiB for this plate "
          f"({len(bn.layer_paths(variables))} BN layers)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(CTORS), nargs="+",
                   default=["resnet18", "resnet50"])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--stem", choices=("small", "imagenet"), default="small")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--plate-size", type=int, default=2048)
    p.add_argument("--old-plate-size", type=int, default=512,
                   help="images the old (recompute) path is timed on")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    for name in a.model:
        bench(name, a)
    paper = (256, 128, 128, 5)
    print(f"\ncarried state at paper size (ResNet-50, 128 px, width 64, imagenet stem): "
          f"{_kib_per_image(resnet50(width=64, stem='imagenet', num_classes=8), paper):.0f} "
          f"KiB/image; ResNet-18 same size: "
          f"{_kib_per_image(resnet18(width=64, stem='imagenet', num_classes=8), paper):.0f}"
          " KiB/image")


if __name__ == "__main__":
    main()
