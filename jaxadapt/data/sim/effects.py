"""Biological and technical factors of the simulator, per design unit, as per-site arrays.

Every random factor is drawn from a key derived by `fold_in` of the root key with a level
tag and a stable hash of the unit's name (source, source/batch, plate, plate/well, compound,
site id), so it does not depend on which other units exist or on their order.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from jaxadapt.data.schema import DMSO, SiteTable
from jaxadapt.data.sim import design


#: Phenotype parameters (log-scale shifts from DMSO, except rounding: a logit).
PHENO: tuple[str, ...] = (
    "nuc_size", "nuc_aspect", "cell_size", "cell_aspect", "dna", "er", "rna", "nucleoli",
    "agp", "golgi", "mito", "mito_spread", "ring", "rounding", "density",
)
P = {name: i for i, name in enumerate(PHENO)}

#: Class directions of the 8 JUMP positive controls, written from their known biology
#: and expressed mainly in morphology and compartment distribution, as real phenotypes
#: are (in the LINCS profiles, shape and radial-distribution features of active wells
#: move further from DMSO than whole-cell intensities; see
#: `experiments/calibrate_simulator.py`): e.g. Aurora inhibition -> cytokinesis failure,
#: big polyploid nuclei, some mitotic rounding, fewer cells; NAMPT inhibition -> energy
#: crisis, toxicity and perinuclear clustering of mitochondria. A direction's whole-cell
#: intensity entries are at most 0.15 (log units, times biology.effect_size).
#: A responding cell gets the whole direction; see `biology.penetrance`.
POSCON_DIRECTIONS: dict[str, dict[str, float]] = {
    "JCP2022_037716": {"nuc_size": 0.40, "cell_size": 0.15, "dna": 0.12, "rounding": 2.0,
                       "density": -0.35, "nucleoli": -0.2},
    "JCP2022_046054": {"density": -0.50, "mito_spread": -0.35, "mito": -0.15,
                       "cell_size": -0.12, "rna": -0.10},
    "JCP2022_035095": {"agp": -0.10, "cell_aspect": -0.35, "cell_size": 0.12, "ring": 0.15},
    "JCP2022_025848": {"cell_size": 0.16, "cell_aspect": 0.15, "er": 0.06, "agp": 0.05,
                       "ring": -0.08},
    "JCP2022_064022": {"agp": 0.10, "cell_aspect": 0.40, "ring": -0.15, "golgi": 0.15},
    "JCP2022_050797": {"mito": 0.07, "er": 0.05, "mito_spread": 0.25, "cell_size": 0.06},
    "JCP2022_012818": {"nuc_size": 0.12, "nucleoli": 0.35, "rna": 0.08},
    "JCP2022_085227": {"er": 0.09, "rna": 0.07, "golgi": 0.40, "mito": -0.05},
}

#: MoA directions of jump_target2 written from known biology: the MoAs of positive
#: controls reuse their direction; antimitotics round up; cytotoxic MoAs cut cell count.
#: Every other MoA gets a drawn direction (`moa_direction`).
KNOWN_MOA_DIRECTIONS: dict[str, dict[str, float]] = {
    "Aurora kinase inhibitor": POSCON_DIRECTIONS["JCP2022_037716"],
    "DYRK inhibitor": POSCON_DIRECTIONS["JCP2022_012818"],
    "glucocorticoid receptor agonist": POSCON_DIRECTIONS["JCP2022_025848"],
    "p21 activated kinase inhibitor": POSCON_DIRECTIONS["JCP2022_064022"],
    "sodium channel blocker": POSCON_DIRECTIONS["JCP2022_050797"],
    "tubulin polymerization inhibitor": {"rounding": 2.0, "nuc_size": 0.25, "dna": 0.10,
                                         "density": -0.30, "cell_aspect": -0.20},
    "HDAC inhibitor": {"nuc_size": 0.20, "dna": -0.10, "cell_size": 0.15, "density": -0.20},
    "protein synthesis inhibitor": {"density": -0.45, "rna": -0.12, "nucleoli": -0.30,
                                    "cell_size": -0.15},
    "HSP inhibitor": {"density": -0.30, "cell_size": 0.12, "er": 0.08, "mito_spread": -0.20},
    "CDK inhibitor": {"density": -0.35, "nuc_size": 0.20, "nucleoli": -0.25},
    "DNA synthesis inhibitor": {"nuc_size": 0.25, "cell_size": 0.18, "density": -0.30},
    "ribonucleotide reductase inhibitor": {"nuc_size": 0.22, "cell_size": 0.15, "density": -0.30},
}
_SHAPE = ("nuc_size", "nuc_aspect", "cell_size", "cell_aspect", "nucleoli", "golgi",
          "mito_spread", "ring")
_INTENSITY = ("dna", "er", "rna", "agp", "mito")

# Level tags (>= 2**31 so they never collide with the high word of a site id).
TAG_SOURCE, TAG_BATCH, TAG_PLATE, TAG_WELL, TAG_COMPOUND, TAG_SITE = (
    0xF0000001 + i for i in range(6)
)
N_SOURCE, N_BATCH, N_PLATE, N_SITE = 30, 8, 10, 10  # normals used per unit
UNIT_DIM = 32  # normals drawn per unit (>= every N_*, and len(PHENO))


def site_key(seed: int, site_id: np.ndarray) -> jax.Array:
    """Returns the PRNG key of a site: fold_in of the root key with the 62-bit site id.

    fold_in takes 32-bit data, so the id is folded in as two words (high 31 bits, then low
    31 bits). Works on a scalar or a vector of ids.
    """
    ids = np.asarray(site_id, np.int64)
    hi = (ids >> 31).astype(np.uint32)
    lo = (ids & 0x7FFFFFFF).astype(np.uint32)
    root = jax.random.PRNGKey(seed)
    fold = lambda h, l: jax.random.fold_in(jax.random.fold_in(root, h), l)
    return jax.vmap(fold)(hi.reshape(-1), lo.reshape(-1)).reshape(ids.shape + (2,))


def unit_normals(seed: int, tag: int, names: np.ndarray, dim: int) -> np.ndarray:
    """Returns normals [len(names), dim], row i drawn from fold_in(fold_in(root, tag), hash(name_i))."""
    ids = np.array([design.stable_hash(str(n)) for n in names], np.uint32)
    keys = jax.random.fold_in(jax.random.PRNGKey(seed), tag)
    # one compiled shape for every level: draw UNIT_DIM normals, keep the first `dim`
    return _padded(_tagged_normals, np.asarray(keys), ids, UNIT_DIM)[:, :dim]


def _padded(fn, key, ids: np.ndarray, dim: int) -> np.ndarray:
    """Applies a jitted per-id draw on ids padded to a power of two (few compiled shapes)."""
    n = len(ids)
    if n == 0:
        return np.zeros((0, dim))
    m = 1 << int(np.ceil(np.log2(max(n, 64))))
    out = fn(key, np.concatenate([ids, np.zeros((m - n,) + ids.shape[1:], ids.dtype)]), dim)
    return np.asarray(out, np.float64)[:n]


@functools.partial(jax.jit, static_argnums=2)
def _tagged_normals(key, ids, dim):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (dim,)))(ids)


@functools.partial(jax.jit, static_argnums=2)
def _site_tech_normals(root, hilo, dim):
    def draw(hl):
        k = jax.random.fold_in(jax.random.fold_in(root, hl[0]), hl[1])
        return jax.random.normal(jax.random.fold_in(k, TAG_SITE), (dim,))

    return jax.vmap(draw)(hilo)


def _per_site(seed: int, tag: int, keys: np.ndarray, dim: int) -> np.ndarray:
    """Draws unit normals for the distinct `keys` and gathers them back to sites."""
    uniq, inv = np.unique(keys, return_inverse=True)
    return unit_normals(seed, tag, uniq, dim)[inv]


@functools.lru_cache(maxsize=None)
def moa_direction(name: str) -> np.ndarray:
    """Returns the phenotype direction [len(PHENO)] of an MoA (or of a compound's own name).

    Fixed biology, independent of the seed: known MoAs use KNOWN_MOA_DIRECTIONS; others
    draw, from a generator keyed by the name's stable hash, 3 shape/distribution entries
    (|v| in [0.1, 0.4]) and 1-2 whole-cell intensity entries (|v| in [0.04, 0.15], as the
    positive controls), a cell-count loss with chance 0.3 and mitotic rounding with 0.1.
    """
    d = np.zeros(len(PHENO))
    if name in KNOWN_MOA_DIRECTIONS:
        for k, v in KNOWN_MOA_DIRECTIONS[name].items():
            d[P[k]] = v
        return d
    rng = np.random.default_rng([0x5EED, design.stable_hash(name)])
    sign = lambda n: rng.choice([-1.0, 1.0], n)
    shape = rng.choice(len(_SHAPE), 3, replace=False)
    d[[P[_SHAPE[i]] for i in shape]] = sign(3) * rng.uniform(0.1, 0.4, 3)
    k = int(rng.integers(1, 3))
    inten = rng.choice(len(_INTENSITY), k, replace=False)
    d[[P[_INTENSITY[i]] for i in inten]] = sign(k) * rng.uniform(0.04, 0.15, k)
    if rng.uniform() < 0.3:
        d[P["density"]] = -rng.uniform(0.15, 0.5)
    if rng.uniform() < 0.1:
        d[P["rounding"]] = rng.uniform(1.0, 2.0)
    return d


def _base_direction(compound: str, moa: str | None) -> np.ndarray:
    """The class direction of a compound before its own deviation (0 for DMSO)."""
    if moa is None:  # jump_poscon: the compound is the class
        d = np.zeros(len(PHENO))
        for name, v in POSCON_DIRECTIONS.get(compound, {}).items():
            d[P[name]] = v
        return d
    if compound == DMSO:
        return np.zeros(len(PHENO))
    if not moa:  # no annotation: the compound acts in its own way
        return moa_direction(compound)
    # several MoAs: the mean of their directions (one MoA: its direction)
    return np.mean([moa_direction(m) for m in moa.split("|")], axis=0)


def class_directions(compounds: np.ndarray, cfg: ml_collections.ConfigDict,
                     moas: np.ndarray | None = None) -> np.ndarray:
    """Returns the class direction of each compound [n, len(PHENO)] (0 for DMSO).

    A compound moves its class's direction plus a compound-specific deviation on the same
    parameters (so a class keeps its signature), scaled by ``biology.effect_size``.

    Args:
      compounds: per-site compound ids.
      cfg: the simulator config.
      moas: per-site MoA annotations (jump_target2: compounds of one MoA share its
        direction); None: the compound is the class (the jump_poscon positive controls).
    """
    comp = np.asarray(compounds)
    keys = comp if moas is None else np.char.add(np.char.add(comp, "\x00"), np.asarray(moas))
    direction = np.zeros((len(comp), len(PHENO)))
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    dev = unit_normals(cfg.seed, TAG_COMPOUND, comp[first], len(PHENO))
    for u, i in enumerate(first):
        d = _base_direction(str(comp[i]), None if moas is None else str(moas[i]))
        direction[inv == u] = d + cfg.biology.compound_deviation * np.abs(d) * dev[u]
    return cfg.biology.effect_size * direction


def phenotype(table: SiteTable, cfg: ml_collections.ConfigDict,
              strength: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the biology of each site's well.

    Args:
      table: the sites.
      cfg: the simulator config (`biology` knobs).
      strength: per-site phenotype strength of the batch (technical factor).

    Returns:
      ``base`` [n, len(PHENO)]: the well's phenotype without the compound (well-to-well
      noise: ``well_density_sd`` on cell density, ``well_sd`` on the rest);
      ``class`` [n, len(PHENO)]: the shift of a *responding* cell (class direction x batch
      strength; 0 for DMSO); ``penetrance`` [n]: the well's responding fraction,
      logit-normal around ``biology.penetrance`` (0 for DMSO).
    """
    b = cfg.biology
    wells = np.char.add(np.char.add(np.asarray(table["plate"]), "/"), np.asarray(table["well"]))
    z = _per_site(cfg.seed, TAG_WELL, wells, len(PHENO) + 1)
    scale = np.full(len(PHENO), float(b.well_sd))
    scale[P["density"]] = b.well_density_sd
    moas = table["moa"] if cfg.preset == "jump_target2" else None
    direction = class_directions(table["compound"], cfg, moas)
    treated = np.any(direction != 0, axis=1)
    logit = np.log(b.penetrance / (1.0 - b.penetrance)) if 0 < b.penetrance < 1 else None
    if logit is None:  # 0 or 1: every well alike
        pen = np.full(len(table), float(b.penetrance))
    else:
        pen = 1.0 / (1.0 + np.exp(-(logit + b.penetrance_well_sd * z[:, len(PHENO)])))
    return {
        "base": z[:, :len(PHENO)] * scale,
        "class": strength[:, None] * direction,
        "penetrance": np.where(treated, pen, 0.0),
    }


def _source_facts(src: str, cfg: ml_collections.ConfigDict) -> tuple[float, float, float, float]:
    """Returns (pixel um, blur px, photons, widefield) of a real source, scaled by severity."""
    row = design.microscopes()[src]
    sev, t = cfg.severity.source, cfg.technical
    pixel = float(row["Metadata_Pixel_Size_Microns"]) * cfg.binning
    ref = cfg.reference_pixel_um * cfg.binning
    widefield = row["Metadata_Widefield_vs_Confocal"] == "Widefield"
    blur = t.widefield_blur_px * (1.0 if widefield else 0.5) / float(row["Metadata_Objective_NA"])
    photons = t.photons * (1.0 if row["Metadata_Excitation_Type"] == "Laser" else 0.5)
    neutral_blur = 0.5 * t.widefield_blur_px
    return (
        ref * (pixel / ref) ** sev,
        neutral_blur + sev * (blur - neutral_blur),
        photons,
        float(widefield),
    )


def technical(table: SiteTable, cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Returns per-site technical factors (all neutral when cfg.clean)."""
    n, t, sv = len(table), cfg.technical, cfg.severity
    src = np.asarray(table["source"])
    batch = np.char.add(np.char.add(src, "/"), np.asarray(table["batch"]))
    zs = _per_site(cfg.seed, TAG_SOURCE, src, N_SOURCE) * sv.source
    zb = _per_site(cfg.seed, TAG_BATCH, batch, N_BATCH) * sv.batch
    zp = _per_site(cfg.seed, TAG_PLATE, np.asarray(table["plate"]), N_PLATE) * sv.plate
    zw = np.asarray(_site_normals(cfg.seed, table["site_id"])) * sv.well
    uniq_src, src_inv = np.unique(src, return_inverse=True)
    facts = np.array([_source_facts(s, cfg) for s in uniq_src]).reshape(-1, 4)[src_inv]
    edge = np.asarray(table["is_edge"], np.float64) * sv.plate
    u = lambda z: 0.5 * (1.0 + np.tanh(z))  # smooth map of a normal to (0, 1)
    gain = np.exp(zs[:, 0:5] * t.source_gain_sd + zb[:, 0:5] * t.batch_stain_sd
                  + zp[:, 0:5] * t.plate_gain_sd + zw[:, 0:5] * t.site_intensity_sd)
    gain *= 1.0 + t.edge_intensity * edge[:, None]
    xtalk = np.tile(np.eye(5), (n, 1, 1))
    for k in range(4):  # spectral neighbours bleed into each other (e.g. RNA/AGP share a band)
        xtalk[:, k + 1, k] = t.source_crosstalk * u(zs[:, 5 + k]) * sv.source
        xtalk[:, k, k + 1] = t.source_crosstalk * u(zs[:, 9 + k]) * sv.source
    focus = np.hypot(zb[:, 5] * t.batch_focus_sd, zw[:, 5] * t.site_focus_sd)
    debris_u, empty_u = 0.5 * (1 + _erf(zw[:, 6] / np.sqrt(2))), 0.5 * (1 + _erf(zw[:, 7] / np.sqrt(2)))
    out = {
        "pixel_um": facts[:, 0],
        "blur": np.hypot(facts[:, 1], focus),
        "gain": gain,
        "crosstalk": xtalk,
        "offset": t.source_offset * u(zs[:, 13:18]) * sv.source + t.background * u(zs[:, 18:23]) * sv.source,
        "haze": t.widefield_haze * facts[:, 3] * sv.source,
        "vignetting": t.vignetting * u(zs[:, 23]) * sv.source,
        "gradient": t.plate_gradient * np.tanh(zp[:, 5:7]),
        "gamma": np.exp(zs[:, 24] * t.source_gamma_sd),
        "photons": facts[:, 2],
        "read_noise": np.full(n, t.read_noise) * min(sv.source, 1.0),
        "density": np.exp(zb[:, 6] * t.batch_density_sd + zp[:, 7] * t.plate_density_sd)
                   * (1.0 - t.edge_count * edge),
        "strength": np.exp(zb[:, 7] * t.batch_strength_sd),
        "debris": (debris_u < t.debris_rate * min(sv.well, 1.0)).astype(np.float64),
        "empty": (empty_u < t.empty_rate * min(sv.well, 1.0)).astype(np.float64),
    }
    return neutral(out, cfg) if cfg.clean else out


def neutral(tech: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """Returns the technical factors of a perfect instrument and protocol (clean mode)."""
    n = len(tech["blur"])
    return {
        "pixel_um": np.full(n, cfg.reference_pixel_um * cfg.binning),
        "blur": np.full(n, 0.5 * cfg.technical.widefield_blur_px),
        "gain": np.ones((n, 5)),
        "crosstalk": np.tile(np.eye(5), (n, 1, 1)),
        "offset": np.zeros((n, 5)),
        "haze": np.zeros(n),
        "vignetting": np.zeros(n),
        "gradient": np.zeros((n, 2)),
        "gamma": np.ones(n),
        "photons": np.full(n, np.inf),
        "read_noise": np.zeros(n),
        "density": np.ones(n),
        "strength": np.ones(n),
        "debris": np.zeros(n),
        "empty": np.zeros(n),
    }


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf  # local: scipy is only needed here

    return erf(x)


def _site_normals(seed: int, site_id: np.ndarray) -> np.ndarray:
    """Per-site technical normals, from fold_in(site_key, TAG_SITE) (same key path as site_key)."""
    ids = np.asarray(site_id, np.int64)
    hilo = np.stack([(ids >> 31), ids & 0x7FFFFFFF], axis=1).astype(np.uint32)
    return _padded(_site_tech_normals, np.asarray(jax.random.PRNGKey(seed)), hilo, N_SITE)
