"""The simulated study as a cached TFDS array_record store.

`load_simulated(sim_cfg, data_dir)` renders the study once into
`<data_dir>/sim_<preset>_<hash>` (hash of the sim config + store format version) and
reuses it afterwards; a changed config gets a new directory; a partial or corrupt
store is detected, logged and rebuilt (see `jaxadapt.data.store`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import ml_collections
import numpy as np

from jaxadapt.data import schema, store


#: Config keys that change speed, not pixels; left out of the cache key.
_NON_CONTENT_KEYS = ("chunk_size",)


def config_key(sim_cfg: ml_collections.ConfigDict) -> str:
    """Returns a 16-hex-digit hash of the sim config's content and the store format.

    Args:
      sim_cfg: the `data.sim` config.

    Returns:
      A stable string; equal configs give equal keys in any process.
    """
    content = {k: v for k, v in sim_cfg.to_dict().items() if k not in _NON_CONTENT_KEYS}
    text = json.dumps({"format": store.FORMAT_VERSION, "sim": content}, sort_keys=True,
                      default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def store_dir(sim_cfg: ml_collections.ConfigDict, data_dir: str) -> str:
    """Returns the cache directory of this sim config under `data_dir`."""
    return os.path.join(data_dir, f"sim_{sim_cfg.preset}_{config_key(sim_cfg)}")


def _render_chunks(table: schema.SiteTable, sim_cfg: ml_collections.ConfigDict,
                   chunk_sites: int, latents: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Renders the table in chunks of many sites; appends each chunk's latents."""
    from jaxadapt.data.sim import simulator

    for start in range(0, len(table), chunk_sites):
        rows = np.arange(start, min(start + chunk_sites, len(table)))
        images, lat = simulator.render_sites(table.take(rows), sim_cfg)
        latents.append({k: np.asarray(v) for k, v in lat.items()})
        yield rows, np.asarray(images)


def _stack_latents(latents: list) -> dict[str, np.ndarray]:
    if not latents:
        return {}
    return {k: np.concatenate([c[k] for c in latents]) for k in latents[0]}


def load_simulated(sim_cfg: ml_collections.ConfigDict, data_dir: str, *,
                   chunk_sites: int = 1024):
    """Returns the simulated study's image source and site table, building it if needed.

    Args:
      sim_cfg: the `data.sim` config (see `design.default_sim_config`).
      data_dir: parent directory of the cache.
      chunk_sites: sites rendered per `render_sites` call while building.

    Returns:
      (source, table): `source[i]` -> {"image": uint8 [S, S, 5], "row": i} (a
      `tfds.data_source`), and the SiteTable whose row i describes record i, loaded
      from the side file `table.npz` (no image is decoded).
    """
    from jaxadapt.data.sim import design

    size = int(sim_cfg.image_size)
    latents: list = []
    source, table, _ = store.ensure_store(
        store_dir(sim_cfg, data_dir),
        lambda: design.build_design(sim_cfg),
        lambda t: _render_chunks(t, sim_cfg, chunk_sites, latents),
        image_shape=(size, size, len(schema.CHANNELS)),
        key=config_key(sim_cfg),
        extras=lambda: _stack_latents(latents),
    )
    return source, table


def load_latents(sim_cfg: ml_collections.ConfigDict, data_dir: str) -> dict[str, np.ndarray]:
    """Returns the per-site latents saved when the study was rendered (after load_simulated).

    Args:
      sim_cfg: the `data.sim` config.
      data_dir: parent directory of the cache.

    Returns:
      name -> array with one entry (leading axis) per table row; {} if none were saved.
    """
    return store.load_extras(store_dir(sim_cfg, data_dir))
