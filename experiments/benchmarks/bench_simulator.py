"""Throughput of the Cell Painting simulator, and cheap proxies of its domain shifts.

Reproduce (2 CPU cores):
    JAX_PLATFORMS=cpu python experiments/benchmarks/bench_simulator.py
    JAX_PLATFORMS=cpu python experiments/benchmarks/bench_simulator.py --proxy

The first prints site images per second at 64x64x5 after a warm-up (compile) call. The
second renders the default jump_poscon study and reports, for a logistic regression on
simple per-image features (per-channel mean, std and percentiles): accuracy in domain
(held-out plates of the training batches of source_3), on a new batch of source_3 and on
source_8, without and with per-plate z-scoring of the features; plus batch-effect checks.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxadapt.data.sim.design import build_design, default_sim_config
from jaxadapt.data.sim.simulator import render_sites


def throughput(n_sites: int, image_size: int, repeats: int) -> float:
    """Returns rendered sites per second (after a warm-up call that compiles)."""
    cfg = default_sim_config()
    cfg.image_size = image_size
    table = build_design(cfg).take(np.arange(n_sites))
    render_sites(table, cfg)  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        render_sites(table, cfg)
    return repeats * n_sites / (time.perf_counter() - start)


def features(images: np.ndarray) -> np.ndarray:
    """Per-image features: per channel mean, std, 10/50/90/99th percentiles (float64)."""
    x = images.reshape(len(images), -1, images.shape[-1]).astype(np.float64)
    pct = np.percentile(x, [10, 50, 90, 99], axis=1).transpose(1, 0, 2)
    return np.concatenate([x.mean(1), x.std(1), pct.reshape(len(x), -1)], axis=1)


def plate_zscore(feats: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Z-scores features within each plate (all its sites, controls included)."""
    out = np.empty_like(feats)
    for p in np.unique(plates):
        m = plates == p
        out[m] = (feats[m] - feats[m].mean(0)) / (feats[m].std(0) + 1e-6)
    return out


def logistic_regression(x: np.ndarray, y: np.ndarray, k: int, l2: float = 1e-3, steps: int = 3000):
    """Multinomial logistic regression by full-batch gradient descent; returns a predictor."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w, b = np.zeros((z.shape[1], k)), np.zeros(k)
    onehot = np.eye(k)[y]
    for _ in range(steps):
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(z)
        w -= 0.5 * (z.T @ g + l2 * w)
        b -= 0.5 * g.sum(0)
    return lambda xt: np.argmax(((xt - mu) / sd) @ w + b, axis=1)


def proxy_report() -> None:
    """Prints proxy-classifier accuracies and batch-effect statistics of the default study."""
    cfg = default_sim_config()
    table = build_design(cfg)
    images, _ = render_sites(table, cfg)
    feats = features(images)
    src, batch, plate = (np.asarray(table[f]) for f in ("source", "batch", "plate"))
    label, ctrl = np.asarray(table["label"]), np.asarray(table["is_control"])
    a_batches = [b for b in dict.fromkeys(batch[src == cfg.sources[0]])]
    first_plates = {b: plate[batch == b][0] for b in a_batches}
    is_first = np.array([first_plates.get(b) == p for b, p in zip(batch, plate)])
    train_b = np.isin(batch, a_batches[:-1])
    splits = {
        "train": train_b & is_first & ~ctrl,
        "in_domain": train_b & ~is_first & ~ctrl,
        "new_batch": (batch == a_batches[-1]) & ~ctrl,
        "new_source": (src != cfg.sources[0]) & ~ctrl,
    }
    for name, f in (("raw features", feats), ("per-plate z-scored", plate_zscore(feats, plate))):
        predict = logistic_regression(f[splits["train"]], label[splits["train"]], 8)
        accs = {k: float(np.mean(predict(f[m]) == label[m])) for k, m in splits.items()}
        print(f"{name:20s} " + "  ".join(f"{k}={v:.3f}" for k, v in accs.items()))
    means = images.reshape(len(images), -1, 5).mean(1)
    ctrl_means = {b: means[ctrl & (batch == b)].mean(0) for b in np.unique(batch)}
    print("DMSO per-channel mean by batch:")
    for b, m in ctrl_means.items():
        print(f"  {b:20s} " + " ".join(f"{v:6.2f}" for v in m))
    well_key = np.char.add(plate, np.asarray(table["well"]))
    wm = {w: means[well_key == w].mean(0) for w in np.unique(well_key[ctrl])}
    by_plate = {}
    for w, m in wm.items():
        by_plate.setdefault(w[: -3], []).append(m)
    within = np.mean([np.abs(np.diff(np.array(v)[:2], axis=0)).mean() for v in by_plate.values()])
    plates_a = [p for p in by_plate if src[plate == p][0] == cfg.sources[0]]
    across = np.mean([np.abs(np.mean(by_plate[p], 0) - np.mean(by_plate[q], 0)).mean()
                      for p in plates_a for q in plates_a if batch[plate == p][0] != batch[plate == q][0]])
    print(f"DMSO well mean |diff|: within plate {within:.2f}, across batches (plate means) {across:.2f}")
    weak = ["JCP2022_025848", "JCP2022_050797"]  # dexamethasone, quinidine
    p0 = plate[0]
    d_weak = np.abs(means[(plate == p0) & (table["compound"] == weak[0])].mean(0)
                    - means[(plate == p0) & (table["compound"] == weak[1])].mean(0)).mean()
    b0, b1 = a_batches[:2]
    d_batch = np.abs(ctrl_means[b0] - ctrl_means[b1]).mean()
    print(f"weak compounds on one plate |diff| {d_weak:.2f}  vs  DMSO of two batches |diff| {d_batch:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2048)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proxy", action="store_true", help="report proxy-classifier numbers")
    args = parser.parse_args()
    if args.proxy:
        proxy_report()
        return
    rate = throughput(args.sites, args.size, args.repeats)
    print(f"simulator: {rate:,.0f} sites/s at {args.size}x{args.size}x5 ({args.sites} sites x {args.repeats})")


if __name__ == "__main__":
    main()
