"""Simulated Cell Painting screen with hierarchical batch effects (the default data set).

    from jaxadapt.data.sim.design import build_design, default_sim_config
    from jaxadapt.data.sim.simulator import render_sites
    cfg = default_sim_config("jump_poscon")
    table = build_design(cfg)                # SiteTable, one row per site image
    images, latents = render_sites(table, cfg)   # uint8 [n, S, S, 5] (DNA, ER, RNA, AGP, Mito)

Site i is rendered from `site_key(cfg.seed, site_id_i)` (fold_in of the root key with the
site id) plus design-level factors keyed by stable hashes of the source, batch, plate, well
and compound names, so any subset of sites in any order renders identical pixels.
Biology lives in `sim_effects.phenotype`, technical variation in `sim_effects.technical`,
pixels in `sim_render`. Throughput: `python experiments/benchmarks/bench_simulator.py`.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxadapt.data.schema import SiteTable
from jaxadapt.data.sim import design, effects as sim_effects, render as sim_render
from jaxadapt.data.sim.design import build_design
from jaxadapt.data.sim.effects import site_key


__all__ = ["render_sites", "simulate"]


def bio_items(cfg: ml_collections.ConfigDict) -> tuple:
    b = cfg.biology
    return tuple(sorted({
        "cells_per_mm2": float(b.cells_per_mm2), "nucleus_radius_um": float(b.nucleus_radius_um),
        "cell_radius_um": float(b.cell_radius_um), "intensity_sd": float(b.intensity_sd),
        "nucleus_size_sd": float(b.nucleus_size_sd), "cell_size_sd": float(b.cell_size_sd),
    }.items()))


def _chunk_len(n: int, chunk: int) -> int:
    """Padded chunk length: a power of two in [16, chunk], so few shapes get compiled."""
    return min(chunk, 1 << int(np.ceil(np.log2(max(n, 16)))))


def render_sites(table: SiteTable, cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Renders the site images of `table` (rows of `build_design(cfg)` or any subset).

    Args:
      table: SiteTable with SITE_FIELDS, `site_id`, `row`, `col`, `is_edge`.
      cfg: the simulator config (cfg.clean=True: same cells, no technical variation).

    Returns:
      images: uint8 [n, S, S, 5] in channel order DNA, ER, RNA, AGP, Mito.
      latents: per-site arrays: `phenotype` [n, len(PHENO)] (the phenotype of a responding
        cell: well phenotype + class effect), `penetrance` [n] (the well's responding
        fraction; 0 for DMSO), `n_cells` [n], and every technical factor (`pixel_um`, `blur`, `gain` [n, 5],
        `crosstalk` [n, 5, 5], `offset` [n, 5], `haze`, `vignetting`, `gradient` [n, 2],
        `gamma`, `photons`, `read_noise`, `density`, `strength`, `debris`, `empty`).

    Raises:
      ValueError: for a bad config or a table lacking the simulator's columns.
    """
    design.check_config(cfg)
    for field in ("site_id", "is_edge"):
        if field not in table:
            raise ValueError(f"render_sites table lacks column {field!r}; build it with build_design(cfg)")
    unknown = sorted(set(table["source"]) - set(design.microscopes()))
    if unknown:
        raise ValueError(f"render_sites table has unknown sources {unknown}; use sources of microscope_config.csv")
    n, size = len(table), int(cfg.image_size)
    tech = sim_effects.technical(table, cfg)
    pheno = sim_effects.phenotype(table, cfg, tech["strength"])
    keys = np.asarray(site_key(cfg.seed, table["site_id"]))
    kernel = sim_render.make_kernel(size, int(cfg.max_cells), bio_items(cfg))
    chunk = _chunk_len(n, int(cfg.chunk_size))
    images = np.empty((n, size, size, 5), np.uint8)
    n_cells = np.empty(n, np.float32)
    f32 = lambda a: np.asarray(a, np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        pad = lambda a: np.concatenate([a[start:stop], np.repeat(a[stop - 1:stop], chunk - (stop - start), 0)])
        t = {k: f32(pad(v)) for k, v in tech.items()}
        bio = {k: f32(pad(v)) for k, v in pheno.items()}
        img, cnt = kernel(pad(keys), bio, t)
        images[start:stop] = np.asarray(img)[: stop - start]
        n_cells[start:stop] = np.asarray(cnt)[: stop - start]
    latents = {"phenotype": f32(pheno["base"] + pheno["class"]), "penetrance": f32(pheno["penetrance"]),
               "n_cells": n_cells.astype(np.int32)}
    latents.update({k: f32(v) for k, v in tech.items()})
    return images, latents


def simulate(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, SiteTable, dict[str, np.ndarray]]:
    """Builds the design and renders every site.

    Args:
      cfg: the simulator config.

    Returns:
      (images uint8 [n, S, S, 5], SiteTable, latents dict) with row i of each matching.
    """
    table = build_design(cfg)
    images, latents = render_sites(table, cfg)
    return images, table, latents
