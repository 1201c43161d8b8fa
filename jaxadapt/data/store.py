"""A TFDS array_record store of site images, built from a SiteTable plus image chunks.

Generic: the simulator feeds it rendered chunks; a real-image reader (e.g. JUMP TIFFs)
can feed it the same way. No TensorFlow: images are `tfds.features.Tensor(uint8,
encoding='bytes')`, the files are array_record, reading goes through
`tfds.data_source`. Record `i` holds row `i` of the table.

Layout of one store directory `root`:

  root/jaxadapt_sites/<version>/...array_record-*   (TFDS files)
  root/table.npz                                    (the SiteTable, no pixels)
  root/extras.npz                                   (optional per-row arrays, e.g. latents)
  root/COMPLETE.json                                (written last: the manifest)

The manifest holds the cache key, the record count, every record file's size and a sha256
of every file of the store. A store counts as complete only when the manifest matches the
files on disk (`check_store`): a build killed midway, a truncated or removed file, and
bytes flipped in place (same size, even with the mtime restored) are found and named
before any record is read, instead of ending a run in array_record's raw "Corrupted
Riegeli/records file" error. Each file is hashed once per process (`verify_files`). The
simulator's `ensure_store` then rebuilds the store; a real-data builder may refuse instead
(`jaxadapt.data.jump.images`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
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
#: Version of the manifest COMPLETE.json. Unlike FORMAT_VERSION it is not part of the
#: cache keys, so a store written by an older jaxadapt keeps its directory and is found,
#: named and rebuilt (or refused) rather than silently left behind. 2 added a checksum of
#: every file; a store without one (version 1 or none) cannot be verified.
MANIFEST_VERSION = 2
#: The checksum of every store file. sha256 (OpenSSL, with the CPU's SHA extensions) hashed
#: a cached 100 MB file at 1.3-1.8 GB/s here (2 shared cores) against 0.9-1.3 GB/s for
#: blake2b, and `sha256sum` checks it by hand.
HASH = "sha256"
BUILDER_NAME = "jaxadapt_sites"
_MARKER = "COMPLETE.json"
_CHUNK = 1 << 20  # bytes per read while hashing
_HASH_THREADS = 4  # hashlib releases the GIL: shards hash in parallel
#: (absolute path, size, mtime in ns, checksum) of every file verified (or written) in this
#: process: a store opened many times is hashed once, and a file whose size or mtime changed
#: since is hashed again. Bytes flipped with the mtime restored are found by the next process.
_VERIFIED: set[tuple[str, int, int, str]] = set()

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
                 extras: Mapping[str, np.ndarray] | None = None,
                 digests: Mapping[str, str] | None = None) -> None:
    """Completes a store whose TFDS files are already in `tmp` and renames it to `root`.

    Writes table.npz, the optional extras.npz and, last, the manifest (key, counts, the
    size of every record file and the checksum of every file), then renames `tmp` to
    `root` atomically (a reader never sees a half-built store). Every builder (in-process
    TFDS, Apache Beam, the resumable JUMP shard writer) ends here, so all stores share one
    layout, one check (`check_store`) and one reader (`open_store`).

    Args:
      tmp: directory holding `jaxadapt_sites/<version>/` (dataset_info + record files).
      root: final directory (must not exist).
      table: the site metadata; row i describes record i.
      image_shape: (H, W, C) of every record.
      key: cache key for the marker.
      extras: optional per-row arrays saved in extras.npz.
      digests: checksums (`file_digest`) already known, by path relative to `tmp` (e.g.
        of shards hashed when they were written), so those files are not read again.
    """
    np.savez(os.path.join(tmp, "table.npz"), **_table_to_npz(table))
    if extras is not None:
        np.savez(os.path.join(tmp, "extras.npz"), **dict(extras))
    known = dict(digests or {})
    files = _store_files(tmp)
    todo = [rel for rel in files if rel not in known]
    known.update(zip(todo, _hash_all([os.path.join(tmp, rel) for rel in todo])))
    marker = {"key": key, "format_version": FORMAT_VERSION,
              "manifest_version": MANIFEST_VERSION, "n_rows": len(table),
              "image_shape": list(image_shape), "files": _record_files(tmp),
              "hash": HASH, "checksums": {rel: known[rel] for rel in files}}
    with open(os.path.join(tmp, _MARKER), "w") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, root)
    for rel in files:  # just hashed from these very bytes: no need to read them again
        _remember(os.path.join(root, rel), known[rel])


def version_dir(root: str) -> str:
    """The TFDS directory `root/jaxadapt_sites/<version>` holding the record files."""
    return _version_dir(root)


def _version_dir(root: str) -> str:
    return os.path.join(root, BUILDER_NAME, str(JaxadaptSites.VERSION))


def _record_files(root: str) -> dict[str, int]:
    vdir = _version_dir(root)
    if not os.path.isdir(vdir):
        return {}
    return {f: os.path.getsize(os.path.join(vdir, f))
                    for f in sorted(os.listdir(vdir)) if ".array_record" in f}


def _store_files(root: str) -> list[str]:
    """Every file of the store but its manifest, relative to `root`, sorted."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(f for f in out if f != _MARKER)


def file_digest(path: str) -> str:
    """Returns the `HASH` checksum (hex) of the file at `path`, read in 1 MiB chunks.

    Args:
      path: a local file.

    Returns:
      The hex digest, e.g. as `sha256sum` prints it.
    """
    digest = hashlib.new(HASH)
    buf = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(buf[:n])
    return digest.hexdigest()


def _hash_all(paths: list[str]) -> list[str]:
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(_HASH_THREADS, len(paths))) as pool:
        return list(pool.map(file_digest, paths))


def _stamp(path: str, digest: str) -> tuple[str, int, int, str]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, digest


def _remember(path: str, digest: str) -> None:
    _VERIFIED.add(_stamp(path, digest))


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a store is unusable (`check_store`).

    Attributes:
      kind: "missing" (no directory), "no_manifest" (no COMPLETE.json), "old_manifest"
        (written by an older jaxadapt, without checksums: cannot be verified), "stale"
        (the cache key or record format differ) or "damaged" (a file's size, checksum or
        record count differs from the manifest, or it cannot be read).
      detail: one line saying what is wrong, naming the file.
      file: the file at fault, relative to the store; None when it is not one file.
    """

    kind: str
    detail: str
    file: str | None = None

    def __str__(self) -> str:
        return self.detail


def verify_files(root: str, checksums: Mapping[str, str]) -> Problem | None:
    """Checks files of the store `root` against their manifest checksums, once per process.

    A file already verified (or written) in this process with the same size and mtime is
    not read again; the others are hashed (in parallel) and remembered when they match.

    Args:
      root: the store directory.
      checksums: path relative to `root` -> expected `file_digest`.

    Returns:
      None when every file matches, else a "damaged" Problem naming the first bad file.
    """
    todo = []
    for rel, want in sorted(checksums.items()):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return Problem("damaged", f"{rel} is missing (the manifest lists it)", rel)
        stamp = _stamp(path, want)
        if stamp not in _VERIFIED:
            todo.append((rel, stamp))
    got = _hash_all([stamp[0] for _, stamp in todo])
    for (rel, stamp), digest in zip(todo, got):
        if digest != stamp[3]:
            return Problem("damaged", f"{rel}: {HASH} {digest[:12]}... differs from the "
                           f"manifest's {stamp[3][:12]}... (its bytes changed on disk)", rel)
        _VERIFIED.add(stamp)
    return None


def _read_manifest(root: str) -> dict | Problem:
    path = os.path.join(root, _MARKER)
    if not os.path.exists(path):
        return Problem("no_manifest", f"no manifest {_MARKER} (a build was interrupted, or "
                       "the file was removed)", _MARKER)
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        return Problem("damaged", f"{_MARKER} unreadable ({type(e).__name__}: {e})", _MARKER)
    if not isinstance(marker, dict):
        return Problem("damaged", f"{_MARKER} holds a {type(marker).__name__}, not an "
                       "object", _MARKER)
    return marker


def _integrity_problem(root: str, marker: dict) -> Problem | None:
    """The manifest's version, then record file sizes (cheap), then every checksum."""
    version = marker.get("manifest_version", 1)
    if (version != MANIFEST_VERSION or marker.get("hash") != HASH
            or not isinstance(marker.get("checksums"), dict)):
        return Problem("old_manifest", f"{_MARKER} is manifest version {version}, not "
                       f"{MANIFEST_VERSION} (a {HASH} per file): the store was written by "
                       "another (older) jaxadapt, its files cannot be verified, and it "
                       "needs a rebuild", _MARKER)
    sizes, want = _record_files(root), marker.get("files", {})
    for name in sorted(set(sizes) | set(want)):
        if sizes.get(name) != want.get(name):
            rel = os.path.relpath(os.path.join(_version_dir(root), name), root)
            return Problem("damaged", f"{rel}: {sizes.get(name, 'absent')} bytes on disk, "
                           f"the manifest says {want.get(name, 'absent')}", rel)
    return verify_files(root, marker["checksums"])


def check_store(root: str, *, key: str | None = "") -> Problem | None:
    """Returns why the store at `root` is unusable, or None when it is complete.

    Checks the manifest (present, key, record format, manifest version), that every
    record file exists with its recorded size, every file's checksum (hashed once per
    process: `verify_files`), that the TFDS split length equals the table length, and
    that each array_record file reports the expected record count; no record is read,
    so a damaged file is named here, not by array_record mid-run.

    Args:
      root: the store directory.
      key: the cache key the manifest must hold; None skips that check.

    Returns:
      A `Problem` (kind, one-line detail, file at fault) or None.
    """
    if not os.path.isdir(root):
        return Problem("missing", "missing")
    marker = _read_manifest(root)
    if isinstance(marker, Problem):
        return marker
    if key is not None and (marker.get("key") != key
                            or marker.get("format_version") != FORMAT_VERSION):
        return Problem("stale", f"manifest key/format {marker.get('key')}/"
                       f"{marker.get('format_version')} != {key}/{FORMAT_VERSION} (config or "
                       "format changed)", _MARKER)
    try:
        problem = _integrity_problem(root, marker)
        if problem is not None:
            return problem
        with np.load(os.path.join(root, "table.npz")) as z:
            n_table = len(z["plate"])
        if n_table != marker["n_rows"]:
            return Problem("damaged", f"table.npz has {n_table} rows, the manifest says "
                           f"{marker['n_rows']}", "table.npz")
        return _count_problem(root, marker["n_rows"])
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: array_record
        return Problem("damaged", f"unreadable ({type(e).__name__}: {e})")


def store_problem(root: str, *, key: str = "") -> str | None:
    """Returns why the store at `root` is unusable (one line), or None when it is complete.

    The text of `check_store` ("missing" when there is no directory); see there.
    """
    problem = check_store(root, key=key)
    return None if problem is None else str(problem)


def _count_problem(root: str, n_rows: int) -> Problem | None:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    vdir = _version_dir(root)
    info_rel = os.path.relpath(os.path.join(vdir, "dataset_info.json"), root)
    with open(os.path.join(vdir, "dataset_info.json")) as f:
        info = json.load(f)
    lengths = [int(x) for s in info["splits"] for x in s["shardLengths"]]
    if sum(lengths) != n_rows:
        return Problem("damaged", f"TFDS split holds {sum(lengths)} records, table has "
                       f"{n_rows}", info_rel)
    files = sorted(f for f in os.listdir(vdir) if ".array_record" in f)
    if len(files) != len(lengths):
        return Problem("damaged", f"{len(files)} record files on disk, dataset_info lists "
                       f"{len(lengths)} shards", info_rel)
    for fname, n in zip(files, lengths):
        reader = array_record_module.ArrayRecordReader(os.path.join(vdir, fname))
        try:
            if reader.num_records() != n:
                rel = os.path.relpath(os.path.join(vdir, fname), root)
                return Problem("damaged", f"{rel} holds {reader.num_records()} records, "
                               f"expected {n}", rel)
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

    Verifies the store's files against its manifest first (each file once per process,
    so after `check_store` this reads nothing again).

    Args:
      root: a directory written by `build_store` (or any builder ending in `finish_store`).

    Returns:
      source[i] -> {"image": uint8 [H, W, C], "row": i}, and the table (row i == record i).

    Raises:
      ValueError: the store is incomplete, from an older jaxadapt or damaged (one line
        naming the store and the file; rebuild it).
    """
    marker = _read_manifest(root)
    problem = marker if isinstance(marker, Problem) else _integrity_problem(root, marker)
    if problem is not None:
        raise ValueError(f"image store {root} is unusable: {problem}; delete the directory "
                         "and rebuild it")
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
    """Opens the store at `root`, (re)building it first when missing or unusable.

    Any `check_store` problem (no or an older manifest, a changed key, a damaged file)
    rebuilds it, with a warning naming the store and the file: the right policy for
    stores that are cheap to render again (the simulator's).

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
    problem = check_store(root, key=key)
    built = problem is not None
    if built:
        remove_stale_temps(root)
        if problem.kind != "missing":  # rendered data: re-rendering is the fix
            log.warning("image store %s is unusable (%s); rebuilding it", root, problem)
            shutil.rmtree(root, ignore_errors=True)
        table = table_fn()
        log.info("building image store %s (%d sites)", root, len(table))
        build_store(root, table, lambda: chunks_fn(table), image_shape=image_shape, key=key,
                    extras=extras)
    source, table = open_store(root)
    return source, table, built
