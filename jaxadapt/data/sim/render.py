"""The jitted pixel kernel of the simulator: cells as sums of axis-aligned Gaussian blobs.

A sum of separable blobs is a small matmul per channel, img = (Gy * a)^T Gx, so a site of
~50 cells x 16 blobs costs a few MFLOP and no per-pixel-per-cell loop. Optical blur of a
Gaussian is a Gaussian, so blur is folded into the blob widths (sigma^2 + blur^2) with the
integral kept, which is exact for the blobs and free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxadapt.data.sim.effects import P


#: Brightness of each compartment at the DMSO phenotype (fraction of full scale).
BASE_AMP = {"dna": 0.55, "chromatin": 0.2, "er": 0.28, "rna": 0.12, "nucleoli": 0.35,
            "agp": 0.35, "golgi": 0.3, "mito": 0.35}
N_MITO = 6


def _blobs(y, x, sy, sx, amp, blur, size):
    """Renders sum_b amp_b G(y_b, x_b, sy_b, sx_b) blurred by `blur`, as one matmul."""
    y, x, sy, sx, amp = (jnp.ravel(v) for v in (y, x, sy, sx, amp))
    sy2, sx2 = jnp.sqrt(sy**2 + blur**2), jnp.sqrt(sx**2 + blur**2)
    amp = amp * (sy * sx) / (sy2 * sx2)  # keep the integral: blur spreads, never adds light
    grid = jnp.arange(size, dtype=jnp.float32) + 0.5
    gy = jnp.exp(-0.5 * ((grid[None, :] - y[:, None]) / sy2[:, None]) ** 2)
    gx = jnp.exp(-0.5 * ((grid[None, :] - x[:, None]) / sx2[:, None]) ** 2)
    return (gy * amp[:, None]).T @ gx


def cell_params(key, ph_base, ph_class, penetrance, px_um, density, empty, *, size, max_cells, bio):
    """Draws the cells of a site as per-cell parameters (no pixels).

    Partial penetrance: each cell responds to the compound with probability `penetrance`
    (the well's responding fraction); a responder's phenotype is ``ph_base + ph_class``, a
    non-responder's ``ph_base``. Toxicity acts on the well: the cell count is scaled by
    ``(1 - p) + p * exp(density effect)``, i.e. the responding share dies off.

    Args:
      key: PRNG key of the site's cells.
      ph_base: [len(PHENO)] well phenotype without the class effect (well noise).
      ph_class: [len(PHENO)] the class effect of a responding cell (0 for DMSO).
      penetrance: scalar in [0, 1], the well's responding fraction.
      px_um: pixel size (um); density: technical density factor; empty: 1 for an empty site.
      size, max_cells, bio: static image size, cell cap and biology knobs.

    Returns:
      dict of per-cell arrays [max_cells] (geometry, amplitudes, `on` (cell exists),
      `responder`) and `n` (the number of cells).
    """
    kz, ku, kn = jax.random.split(key, 3)
    z = jax.random.normal(kz, (max_cells, 16))
    u = jax.random.uniform(ku, (max_cells, 24))
    area_mm2 = (size * px_um / 1000.0) ** 2
    tox = (1.0 - penetrance) + penetrance * jnp.exp(ph_class[P["density"]])
    lam = bio["cells_per_mm2"] * area_mm2 * density * jnp.exp(ph_base[P["density"]]) * tox
    n = jnp.round(lam + jnp.sqrt(lam) * jax.random.normal(kn, ()))
    n = jnp.clip(n, 0, max_cells) * (1.0 - empty)
    on = (jnp.arange(max_cells, dtype=jnp.float32) < n).astype(jnp.float32)
    responder = (u[:, 22] < penetrance).astype(jnp.float32)
    ph = ph_base[None, :] + responder[:, None] * ph_class[None, :]  # [cells, PHENO]
    q = lambda name: ph[:, P[name]]
    cy, cx = u[:, 0] * size, u[:, 1] * size
    rn = bio["nucleus_radius_um"] / px_um * jnp.exp(q("nuc_size") + bio["nucleus_size_sd"] * z[:, 0])
    rc = bio["cell_radius_um"] / px_um * jnp.exp(q("cell_size") + bio["cell_size_sd"] * z[:, 2])
    rnd = jax.nn.sigmoid(q("rounding") - 3.0 + z[:, 11])  # mostly flat; arrest rounds up
    rc = rc + (1.2 * rn - rc) * rnd * 0.8
    flip = jnp.where(u[:, 2] < 0.5, 1.0, -1.0)  # elongated along y or x
    an = flip * (0.15 + q("nuc_aspect") + 0.1 * z[:, 1])
    ac = flip * (0.35 + q("cell_aspect") + 0.15 * z[:, 3]) * (1.0 - rnd)
    isd = bio["intensity_sd"]
    amp = lambda name, k: BASE_AMP[name] * on * jnp.exp(q(name) + isd * z[:, k])
    return {
        "n": n, "on": on, "responder": responder * on, "u": u, "z": z,
        "cy": cy, "cx": cx, "rn": rn, "rc": rc, "rnd": rnd,
        "sny": 0.6 * rn * jnp.exp(an / 2), "snx": 0.6 * rn * jnp.exp(-an / 2),
        "scy": 0.6 * rc * jnp.exp(ac / 2), "scx": 0.6 * rc * jnp.exp(-ac / 2),
        "dna": amp("dna", 4) * (1.0 + 0.6 * rnd),  # condensed chromatin of a rounded cell
        "er": amp("er", 5), "rna": amp("rna", 6), "nucleoli": amp("nucleoli", 7),
        "agp": amp("agp", 8), "golgi": amp("golgi", 9), "mito": amp("mito", 10),
        "ring": jnp.clip(0.75 * jnp.exp(q("ring")), 0.5, 0.9),
        "spread": jnp.clip(0.55 * jnp.exp(q("mito_spread")), 0.2, 1.0),
    }


def _channels(c, max_cells):
    """Per-channel blob lists (y, x, sy, sx, amp) of the cells drawn by `cell_params`."""
    u, z, rn, rc = c["u"], c["z"], c["rn"], c["rc"]
    cy, cx, sny, snx, scy, scx = c["cy"], c["cx"], c["sny"], c["snx"], c["scy"], c["scx"]
    dna, er = c["dna"], c["er"]
    ang = 2 * jnp.pi * u[:, 3]
    golgi_y, golgi_x = cy + 1.1 * rn * jnp.sin(ang), cx + 1.1 * rn * jnp.cos(ang)
    nuc_y, nuc_x = cy + 0.3 * rn * (u[:, 4] - 0.5), cx + 0.3 * rn * (u[:, 5] - 0.5)
    er_sy, er_sx = jnp.sqrt(sny**2 + (0.45 * scy) ** 2), jnp.sqrt(snx**2 + (0.45 * scx) ** 2)
    # nucleoli: two spots inside the nucleus
    noy = nuc_y[:, None] + 0.8 * sny[:, None] * (u[:, 6:8] - 0.5) * 2
    nox = nuc_x[:, None] + 0.8 * snx[:, None] * (u[:, 8:10] - 0.5) * 2
    nuc_amp = c["nucleoli"][:, None] * jnp.ones((1, 2))
    # mitochondria: granules between nucleus and cell edge
    mang = 2 * jnp.pi * u[:, 10:10 + N_MITO]
    mrad = rn[:, None] + (rc - rn)[:, None] * c["spread"][:, None] * u[:, 16:16 + N_MITO]
    my, mx = cy[:, None] + mrad * jnp.sin(mang), cx[:, None] + mrad * jnp.cos(mang)
    mamp = c["mito"][:, None] * jnp.exp(0.3 * z[:, 12:12 + 1]) * jnp.ones((1, N_MITO))
    ms = jnp.broadcast_to(0.3 * rn[:, None], (max_cells, N_MITO))
    ring, agp = c["ring"], c["agp"]
    cat = lambda *a: jnp.concatenate([jnp.ravel(v) for v in a])
    return (
        (cat(nuc_y, nuc_y + 0.3 * sny * z[:, 13]), cat(nuc_x, nuc_x + 0.3 * snx * z[:, 14]),
         cat(sny, 0.5 * sny), cat(snx, 0.5 * snx), cat(dna, BASE_AMP["chromatin"] / BASE_AMP["dna"] * dna)),
        (cat(nuc_y, nuc_y), cat(nuc_x, nuc_x), cat(er_sy, sny), cat(er_sx, snx), cat(er, -0.9 * er)),
        (cat(cy, noy), cat(cx, nox), cat(0.8 * scy, 0.25 * sny[:, None] * jnp.ones((1, 2))),
         cat(0.8 * scx, 0.25 * snx[:, None] * jnp.ones((1, 2))), cat(c["rna"], nuc_amp)),
        (cat(cy, cy, golgi_y), cat(cx, cx, golgi_x), cat(scy, ring * scy, 0.4 * rn),
         cat(scx, ring * scx, 0.4 * rn), cat(agp, -0.95 * agp, c["golgi"])),
        (my, mx, ms, ms, mamp),
    )


def _normal16(key, shape):
    """Standard normals by Box-Muller on 16-bit uniforms: one 32-bit draw gives two normals.

    Threefry bits dominate the kernel's cost; pixel noise that is quantized to 8 bits does
    not need more than 16 bits of randomness per value.
    """
    half = shape[:-1] + (shape[-1] // 2,)
    bits = jax.random.bits(key, half, jnp.uint32)
    u1 = ((bits >> 16).astype(jnp.float32) + 0.5) / 65536.0
    u2 = ((bits & 0xFFFF).astype(jnp.float32) + 0.5) / 65536.0
    r = jnp.sqrt(-2.0 * jnp.log(u1))
    return jnp.concatenate([r * jnp.cos(2 * jnp.pi * u2), r * jnp.sin(2 * jnp.pi * u2)], axis=-1)


@functools.lru_cache(maxsize=16)
def make_kernel(size: int, max_cells: int, bio_items: tuple) -> callable:
    """Returns a jitted, vmapped site renderer for a static image size, cell cap and biology.

    Cached by its static arguments so repeated calls reuse one compilation.
    """
    bio = dict(bio_items)

    def one(key, bio_in, tech):
        k_cells, k_noise, k_debris = (jax.random.fold_in(key, i) for i in range(3))
        cells = cell_params(k_cells, bio_in["base"], bio_in["class"], bio_in["penetrance"],
                            tech["pixel_um"], tech["density"], tech["empty"],
                            size=size, max_cells=max_cells, bio=bio)
        chans, n = _channels(cells, max_cells), cells["n"]
        raw = jnp.stack([_blobs(*c, tech["blur"], size) for c in chans])
        raw = jnp.maximum(raw, 0.0)
        d = jax.random.uniform(k_debris, (3,))
        deb = _blobs(d[:1] * size, d[1:2] * size, 1.5 + 2 * d[2:3], 1.5 + 2 * d[2:3],
                     tech["debris"][None] * 1.2, tech["blur"], size)
        raw = raw + deb[None] * jnp.array([0.6, 1.0, 0.8, 1.0, 0.7])[:, None, None]
        mixed = jnp.einsum("ck,kyx->cyx", tech["crosstalk"], raw)
        mixed = mixed + tech["haze"] * mixed.mean(axis=(1, 2), keepdims=True)
        g = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5
        r2 = 2.0 * (g[:, None] ** 2 + g[None, :] ** 2)  # 1 at the field corners
        field = (1.0 - tech["vignetting"] * r2) * (
            1.0 + tech["gradient"][0] * g[:, None] + tech["gradient"][1] * g[None, :])
        sig = tech["gain"][:, None, None] * field[None] * mixed + tech["offset"][:, None, None]
        sd = jnp.sqrt(jnp.maximum(sig, 0.0) / tech["photons"] + tech["read_noise"] ** 2)
        sig = sig + sd * _normal16(k_noise, sig.shape)
        sig = jnp.maximum(sig, 0.0) ** tech["gamma"]
        img = jnp.clip(jnp.round(255.0 * sig), 0, 255).astype(jnp.uint8)
        return jnp.transpose(img, (1, 2, 0)), n

    return jax.jit(jax.vmap(one))


#: Per-cell measurements `make_feature_kernel` returns (log scale), named after the
#: CellProfiler features they stand for.
CELL_FEATURES: tuple[str, ...] = (
    "Nuclei_Area", "Cells_Area", "Nuclei_Eccentricity", "Cells_Eccentricity",
    "MeanIntensity_DNA", "MeanIntensity_ER", "MeanIntensity_RNA", "MeanIntensity_AGP",
    "MeanIntensity_Mito", "Nucleoli_Intensity", "Golgi_Intensity", "AGP_RingFraction",
    "Mito_RadialSpread",
)


@functools.lru_cache(maxsize=16)
def make_feature_kernel(size: int, max_cells: int, bio_items: tuple) -> callable:
    """Returns a jitted, vmapped per-cell measurement of sites, without rendering pixels.

    Draws exactly the cells `make_kernel` renders for the same key and inputs and
    measures them (areas from the blob widths, mean intensities from the amplitudes
    times the site's channel gain), for calibrating the simulator against CellProfiler
    tables. Returns ``(features [sites, max_cells, len(CELL_FEATURES)], on [sites,
    max_cells], responder [sites, max_cells])``.
    """
    bio = dict(bio_items)

    def one(key, bio_in, tech):
        c = cell_params(jax.random.fold_in(key, 0), bio_in["base"], bio_in["class"],
                        bio_in["penetrance"], tech["pixel_um"], tech["density"], tech["empty"],
                        size=size, max_cells=max_cells, bio=bio)
        um2 = tech["pixel_um"] ** 2
        ecc = lambda a, b: jnp.log(jnp.maximum(a, b) / jnp.minimum(a, b))
        g = tech["gain"]
        safe = lambda v: jnp.log(jnp.maximum(v, 1e-9))
        feats = jnp.stack([
            safe(c["sny"] * c["snx"] * um2), safe(c["scy"] * c["scx"] * um2),
            ecc(c["sny"], c["snx"]), ecc(c["scy"], c["scx"]),
            safe(c["dna"] * g[0]), safe(c["er"] * g[1]), safe(c["rna"] * g[2]),
            safe(c["agp"] * g[3]), safe(c["mito"] * g[4]),
            safe(c["nucleoli"] * g[2]), safe(c["golgi"] * g[3]),
            safe(c["ring"]), safe(c["spread"]),
        ], axis=-1)
        return feats, c["on"], c["responder"]

    return jax.jit(jax.vmap(one))
