"""A TFDS array_record store of site images, built from a SiteTable plus image chunks.

Generic: the simulator feeds it rendered chunks; a real-image reader (e.g. JUMP TIFFs)
can feed it the same way. No TensorFlow: images are `tfds.features.Tensor(uint8,
encoding='bytes')`, the files are array_record, reading goes through
`tfds.data_source`. Record `i` holds row `i` of the table.

Layout of one store directory `root`:

  root/jaxadapt_sites/<version>/...array_record-*   (TFDS files)
  root/table.npz                                    (the SiteTable, no pixels)
  root/extras.npz                                   (optional per-row arrays, e.g. latents)
  root/COMPLETE.json                                (written last: key, counts, file sizes)

A store counts as complete only when COMPLETE.json matches the TFDS files on disk, so a
build killed midway or a truncated/removed record file is detected and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from jaxadapt.data import schema

log = logging.getLogger(__name__)

#: Bump when the on-disk layout changes, so old caches are rebuilt, not misread.
FORMAT_VERSION = 1
BUILDER_NAME = "jaxadapt_sites"
_MARKER = "COMPLETE.json"

Chunks = Iterable[tuple[np.ndarray, np.ndarray]]


def site_features(image_shape: tuple[int, int, int]) -> tfds.features.FeaturesDict:
    """The features of every store record: `image` uint8 [H, W, C] (raw bytes), `row`."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=tuple(image_shape), dtype=np.uint8,
                                      encoding="bytes"),
        "row": np.int64,
    })


class JaxadaptSites(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of one split "train" with features `image` (uint8 HWC) and `row`.

    Not registered: reading goes through the files (`tfds.data_source` falls back to a
    read-only builder), so no constructor arguments are needed to read.
    """

    VERSION = tfds.core.Version("1.0.0")
    # No checksums/metadata files live beside this module; without this TFDS probes the
    # package path and needs the optional `importlib_resources` backport.
    code_path = None

    def __init__(self, *, n_rows: int, image_shape: tuple[int, int, int],
               chunks: Callable[[], Chunks], **kwargs):
        self._n_rows = int(n_rows)
        self._image_shape = tuple(int(s) for s in image_shape)
        self._chunks = chunks
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=site_features(self._image_shape),
            # Keeps record i == table row i (TFDS would otherwise shuffle by key hash).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        expected = 0
        for rows, images in self._chunks():
            rows = np.asarray(rows)
            _check_chunk(rows, images, expected, self._image_shape)
            for r, img in zip(rows, images):
                yield int(r), {"image": img, "row": int(r)}
            expected += len(rows)
        if expected != self._n_rows:
            raise ValueError(f"image chunks covered {expected} rows; the table has {self._n_rows}")


def _check_chunk(rows, images, expected, shape) -> None:
    """Chunks must arrive in row order, contiguous, uint8, of the declared shape."""
    want = np.arange(expected, expected + len(rows))
    if rows.shape != want.shape or not np.array_equal(rows, want):
        raise ValueError(
            f"image chunk rows must continue the table in order: expected rows "
            f"{expected}..{expected + len(rows) - 1}, got {rows[:5]}...; yield chunks in row order")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != shape or len(images) != len(rows):
        raise ValueError(
            f"image chunk at row {expected} has dtype {images.dtype} shape {images.shape}; "
            f"expected uint8 [{len(rows)}, {shape}]; convert with np.clip(...).astype(np.uint8)")
    schema.check_images(images, channels=shape[-1], what=f"images of rows {expected}..")


def _table_to_npz(table: schema.SiteTable) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in table.columns.items()}


def build_store(root: str, table: schema.SiteTable, chunks: Callable[[], Chunks], *,
                image_shape: tuple[int, int, int], key: str = "",
                extras: Callable[[], Mapping[str, np.ndarray]] | None = None) -> None:
    """Builds a complete store at `root` atomically (temp dir, then rename).

    Args:
      root: final directory; must not exist yet (remove a stale one first).
      table: the site metadata; row i becomes record i.
      chunks: callable returning an iterable of (row indices, uint8 images [n, H, W, C]),
        rows in order 0..len(table)-1, many rows per chunk for speed.
      image_shape: (H, W, C).
      key: cache key written to the completion marker (e.g. a config hash).
      extras: optional callable returning per-row arrays to save in extras.npz; called
        after `chunks` is exhausted (so a renderer can collect latents as it goes).
    """
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        builder = JaxadaptSites(n_rows=len(table), image_shape=image_shape, chunks=chunks,
                                data_dir=tmp)
        builder.download_and_prepare(file_format="array_record",
                                     download_dir=os.path.join(tmp, "dl"))
        shutil.rmtree(os.path.join(tmp, "dl"), ignore_errors=True)
        finish_store(tmp, root, table, image_shape=image_shape, key=key,
                     extras=None if extras is None else dict(extras()))
    except OSError:
        if os.path.isdir(root) and store_problem(root, key=key) is None:
            log.info("store %s was completed by another process; using it", root)
            return
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finish_store(tmp: str, root: str, table: schema.SiteTable, *,
                 image_shape: tuple[int, int, int], key: str = "",
                 extras: Mapping[str, np.ndarray] | None = None) -> None:
    """Completes a store whose TFDS files are already in `tmp` and renames it to `root`.

    Writes table.npz, the optional extras.npz and, last, the completion marker, then
    renames `tmp` to `root` atomically (a reader never sees a half-built store). Every
    builder (in-process TFDS, Apache Beam, the resumable JUMP shard writer) ends here,
    so all stores share one layout and one reader (`open_store`).

    Args:
      tmp: directory holding `jaxadapt_sites/<version>/` (dataset_info + record files).
      root: final directory (must not exist).
      table: the site metadata; row i describes record i.
      image_shape: (H, W, C) of every record.
      key: cache key for the marker.
      extras: optional per-row arrays saved in extras.npz.
    """
    np.savez(os.path.join(tmp, "table.npz"), **_table_to_npz(table))
    if extras is not None:
        np.savez(os.path.join(tmp, "extras.npz"), **dict(extras))
    marker = {"key": key, "format_version": FORMAT_VERSION, "n_rows": len(table),
              "image_shape": list(image_shape), "files": _record_files(tmp)}
    with open(os.path.join(tmp, _MARKER), "w") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, root)


def version_dir(root: str) -> str:
    """The TFDS directory `root/jaxadapt_sites/<version>` holding the record files."""
    return _version_dir(root)


def _version_dir(root: str) -> str:
    return os.path.join(root, BUILDER_NAME, str(JaxadaptSites.VERSION))


def _record_files(root: str) -> dict[str, int]:
    vdir = _version_dir(root)
    return {f: os.path.getsize(os.path.join(vdir, f))
                    for f in sorted(os.listdir(vdir)) if ".array_record" in f}


def store_problem(root: str, *, key: str = "") -> str | None:
    """Returns why the store at `root` is unusable, or None when it is complete.

    Checks the completion marker (key, format version), that every record file listed
    there exists with its recorded size, that the TFDS split length equals the table
    length, and that each array_record file reports the expected record count.
    """
    marker_path = os.path.join(root, _MARKER)
    if not os.path.isdir(root):
        return "missing"
    if not os.path.exists(marker_path):
        return "no completion marker (build interrupted?)"
    try:
        with open(marker_path) as f:
            marker = json.load(f)
        if marker.get("key") != key or marker.get("format_version") != FORMAT_VERSION:
            return (f"marker key/version {marker.get('key')}/{marker.get('format_version')}"
                    f" != {key}/{FORMAT_VERSION} (config or format changed)")
        sizes = _record_files(root)
        if sizes != marker["files"]:
            return f"record files changed: on disk {sizes}, expected {marker['files']}"
        with np.load(os.path.join(root, "table.npz")) as z:
            n_table = len(z["plate"])
        if n_table != marker["n_rows"]:
            return f"table.npz has {n_table} rows, marker says {marker['n_rows']}"
        return _count_problem(root, marker["n_rows"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"


def _count_problem(root: str, n_rows: int) -> str | None:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    vdir = _version_dir(root)
    with open(os.path.join(vdir, "dataset_info.json")) as f:
        info = json.load(f)
    lengths = [int(x) for s in info["splits"] for x in s["shardLengths"]]
    if sum(lengths) != n_rows:
        return f"TFDS split holds {sum(lengths)} records, table has {n_rows}"
    files = sorted(f for f in os.listdir(vdir) if ".array_record" in f)
    if len(files) != len(lengths):
        return f"{len(files)} record files on disk, dataset_info lists {len(lengths)} shards"
    for fname, n in zip(files, lengths):
        reader = array_record_module.ArrayRecordReader(os.path.join(vdir, fname))
        try:
            if reader.num_records() != n:
                return f"{fname} holds {reader.num_records()} records, expected {n}"
        finally:
            reader.close()
    return None


def remove_stale_temps(root: str, max_age_s: float = 3600.0) -> None:
    """Removes temp dirs of builds killed over an hour ago (younger ones may be live)."""
    parent, name = os.path.split(os.path.abspath(root))
    if not os.path.isdir(parent):
        return
    now = time.time()
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if entry.startswith(name + ".tmp-") and now - os.path.getmtime(path) > max_age_s:
            log.warning("removing temp dir of an interrupted build: %s", path)
            shutil.rmtree(path, ignore_errors=True)


def open_store(root: str) -> tuple[tfds.core.data_sources.ArrayRecordDataSource, schema.SiteTable]:
    """Opens a complete store: (random-access source, SiteTable from table.npz).

    Args:
      root: a directory written by `build_store`.

    Returns:
      source[i] -> {"image": uint8 [H, W, C], "row": i}, and the table (row i == record i).
    """
    source = tfds.data_source(BUILDER_NAME, data_dir=root, split="train")
    with np.load(os.path.join(root, "table.npz")) as z:
        table = schema.SiteTable({k: z[k] for k in z.files})
    if len(source) != len(table):
        raise ValueError(f"store {root}: {len(source)} records but {len(table)} table rows; "
                         "delete the directory to rebuild it")
    return source, table


def load_extras(root: str) -> dict[str, np.ndarray]:
    """Returns the per-row arrays saved beside the store (empty dict if none)."""
    path = os.path.join(root, "extras.npz")
    if not os.path.exists(path):
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def ensure_store(root: str, table_fn: Callable[[], schema.SiteTable],
                 chunks_fn: Callable[[schema.SiteTable], Chunks], *,
                 image_shape: tuple[int, int, int], key: str = "",
                 extras: Callable[[], Mapping[str, np.ndarray]] | None = None):
    """Opens the store at `root`, (re)building it first when missing or broken.

    Args:
      root: store directory (one per cache key).
      table_fn: returns the SiteTable (only called when a build is needed).
      chunks_fn: table -> iterable of (rows, uint8 images), see `build_store`.
      image_shape: (H, W, C).
      key: cache key that must match the marker.
      extras: see `build_store`.

    Returns:
      (source, table, built) where built says whether this call built the store.
    """
    problem = store_problem(root, key=key)
    built = problem is not None
    if built:
        remove_stale_temps(root)
        if problem != "missing":
            log.warning("image store %s is unusable (%s); rebuilding it", root, problem)
            shutil.rmtree(root, ignore_errors=True)
        table = table_fn()
        log.info("building image store %s (%d sites)", root, len(table))
        build_store(root, table, lambda: chunks_fn(table), image_shape=image_shape, key=key,
                    extras=extras)
    source, table = open_store(root)
    return source, table, built
