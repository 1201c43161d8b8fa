"""A prepared accelerator check of CODA at the paper's size: DINO pretraining + one adaptation.

    python experiments/benchmarks/device_coda.py --out /tmp/device_coda.json      # one GPU
    python experiments/benchmarks/device_coda.py --size tiny                      # CPU, seconds

The `gpu` size is CODA's step 1 on DeiT-S/16 (`vit_small`, 5 channels): 2 global crops of
224 px and 6 local of 96 px (plain random crops with flips, per-view standardization),
head 4096, AdamW at lr 1e-4 without batch scaling, weight decay 1e-5 -> 1e-4, global
clip 1.0, teacher momentum 0.996 (cosine to 1), teacher temperature 0.04. It pretrains on simulated TARGET2 sites
of source_3 for `--pretrain-steps` steps, then adapts the teacher online on source_5's
sites (CODA's step 3: the pretrained student and teacher, the centre reset to zero) for
`--adapt-steps` steps. It prints, and writes to `--out` as one JSON, images/s of each
phase (after compilation), the compile time, and the teacher entropy against log K at
the end of each phase. The budget is about 8 minutes on one H200 at the defaults.

Needs only jax, flax, optax and numpy besides jaxadapt's pure modules (no TFDS or grain:
the crops are cut on the device) and ml_collections for the simulator's config; where
that is missing, carry its wheel (`pip download --no-deps ml_collections`). The
simulator renders the sites on the host first (`--sites` per source).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.data.sim.design import build_design, default_sim_config
from jaxadapt.data.sim.simulator import render_sites
from jaxadapt.methods.coda import dino, dino_optim
from jaxadapt.models.vit import DINOHead, DINOModel, vit
from jaxadapt.train import parallel

#: size -> (ViT, image side, global crop, local crop, head out_dim, hidden, bottleneck)
SIZES = {
    "gpu": ("vit_small", 256, 224, 96, 4096, 2048, 256),
    "tiny": ("vit_cpu", 64, 48, 24, 256, 128, 64),
}
N_LOCAL = 6


def render(source: str, n_sites: int, image_size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, S, S, 5] simulated TARGET2 sites of one source (its first n sites)."""
    cfg = default_sim_config("jump_target2")
    cfg.image_size, cfg.seed = image_size, seed
    table = build_design(cfg)
    rows = np.flatnonzero(table["source"] == source)[:n_sites]
    images, _ = render_sites(table.take(rows), cfg)
    return images


def make_crops(global_size: int, local_size: int):
    """Jitted (key, uint8 images [B, S, S, C]) -> DINO views, cut on the device.

    Plain random crops (no resampling) with random horizontal and vertical flips, each
    view standardized per channel (unbiased std), as CODA's recipe.
    """
    def one_view(key, image, size):
        k_top, k_left, k_h, k_v = jax.random.split(key, 4)
        s = image.shape[0]
        top = jax.random.randint(k_top, (), 0, s - size + 1)
        left = jax.random.randint(k_left, (), 0, s - size + 1)
        view = jax.lax.dynamic_slice(image, (top, left, 0), (size, size, image.shape[-1]))
        view = view.astype(jnp.float32) / 255.0
        view = jnp.where(jax.random.bernoulli(k_h), view[:, ::-1], view)
        view = jnp.where(jax.random.bernoulli(k_v), view[::-1], view)
        mean = view.mean((0, 1))
        std = jnp.sqrt(((view - mean) ** 2).sum((0, 1)) / (size * size - 1))
        return (view - mean) / jnp.maximum(std, 1e-6)

    def views_of(key, image):
        keys = jax.random.split(key, 2 + N_LOCAL)
        glob = jnp.stack([one_view(keys[i], image, global_size) for i in range(2)])
        loc = jnp.stack([one_view(keys[2 + i], image, local_size) for i in range(N_LOCAL)])
        return glob, loc

    @jax.jit
    def crops(key, images):
        glob, loc = jax.vmap(views_of)(jax.random.split(key, images.shape[0]), images)
        return {"global": glob, "local": loc}

    return crops


def run_phase(step, state, images, crops, steps: int, batch: int, mesh, seed: int):
    """`steps` DINO steps on random batches of `images`; (state, timings, last metrics)."""
    rng = np.random.default_rng(seed)
    device_images = jax.device_put(images)
    times, metrics = [], None
    for i in range(steps):
        idx = jnp.asarray(rng.choice(len(images), batch, replace=len(images) < batch))
        start = time.perf_counter()
        views = crops(jax.random.PRNGKey(seed * 100_003 + i), device_images[idx])
        state, metrics = step(state, parallel.shard_batch(views, mesh))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return state, times, jax.device_get(metrics)


def summary(times: list[float], batch: int, metrics, log_k: float) -> dict:
    """images/s over the steady steps (the first one compiles), entropy vs log K."""
    steady = times[1:] or times
    median = float(np.median(steady))
    return {"steps": len(times), "first_step_s": round(times[0], 2),
            "median_step_s": round(median, 4), "images_per_s": round(batch / median, 1),
            "teacher_entropy": round(float(metrics["teacher_entropy"]), 4),
            "log_k": round(log_k, 4),
            "entropy_fraction": round(float(metrics["teacher_entropy"]) / log_k, 4)}


def build_step(model, params, steps: int, batch: int, out_dim: int, mesh):
    """CODA's step-1 optimizer and the data-parallel DINO step; (step, initial state)."""
    sched = dino_optim.make_dino_schedules(
        epochs=1, niter_per_ep=steps, batch_size=batch, base_lr=1e-4, scale_lr=False,
        warmup_epochs=0, weight_decay=1e-5, weight_decay_end=1e-4, momentum_teacher=0.996,
        warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        freeze_last_layer=0)
    opt = dino_optim.make_dino_optimizer(sched)
    step = dino.parallel_dino_step(dino.make_dino_step(
        lambda p, crops: model.apply({"params": p}, crops), opt, sched, axis_name="data",
        clip_grad=1.0, global_clip=True), mesh)
    state = dino.create_dino_state(params, opt, jax.random.PRNGKey(1), out_dim)
    return step, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu")
    parser.add_argument("--batch", type=int, default=64, help="global batch (images)")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--adapt-steps", type=int, default=50)
    parser.add_argument("--sites", type=int, default=1024, help="rendered sites per source")
    parser.add_argument("--out", default="", help="write the JSON here too")
    a = parser.parse_args()
    for name in ("batch", "pretrain_steps", "adapt_steps", "sites"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    name, side, g, lo, out_dim, hidden, bottleneck = SIZES[a.size]
    mesh = parallel.make_data_mesh()
    if a.batch % mesh.size:
        parser.error(f"--batch={a.batch} must divide by the {mesh.size} devices")
    t0 = time.perf_counter()
    source, target = render("source_3", a.sites, side), render("source_5", a.sites, side)
    render_s = time.perf_counter() - t0
    model = DINOModel(backbone=vit(name, img_size=g),
                      head=DINOHead(out_dim=out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck))
    crops = make_crops(g, lo)
    sample = crops(jax.random.PRNGKey(0), jnp.asarray(source[:1]))
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 [sample["global"][:, 0], sample["local"][:, 0]])["params"]
    log_k = math.log(out_dim)

    step, state = build_step(model, params, a.pretrain_steps, a.batch, out_dim, mesh)
    state, times, metrics = run_phase(step, parallel.replicate(state, mesh), source, crops,
                                      a.pretrain_steps, a.batch, mesh, seed=0)
    pretrain = summary(times, a.batch, metrics, log_k)

    # CODA's step 3: the pretrained student and teacher, a fresh optimizer, centre zero.
    pretrained = jax.device_get(state)
    step, adapt_state = build_step(model, pretrained.params, a.adapt_steps, a.batch, out_dim,
                                   mesh)
    adapt_state = adapt_state.replace(teacher=pretrained.teacher)
    adapt_state, times, metrics = run_phase(step, parallel.replicate(adapt_state, mesh), target,
                                            crops, a.adapt_steps, a.batch, mesh, seed=1)
    result = {"size": a.size, "model": name, "devices": mesh.size,
              "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
              "batch": a.batch, "crops": f"2x{g} + {N_LOCAL}x{lo}", "render_s": round(render_s, 1),
              "pretrain": pretrain, "adapt": summary(times, a.batch, metrics, log_k)}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
