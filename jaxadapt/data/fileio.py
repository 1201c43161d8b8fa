"""Local paths and fsspec URLs read alike: tables, TIFF bytes, globs and file stamps.

A path with a protocol (`s3://`, `gs://`, `memory://`, `file://`...) goes through fsspec
(`s3://` needs `s3fs` installed and credentials, or anonymous access configured through
fsspec); a plain path through the OS, unchanged from before (so local stores keep their
keys). The Cell Painting Gallery is public: a user with access reads
`s3://cellpainting-gallery/...` directly, without a local copy.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import IO

_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """Whether `path` names a protocol (`s3://...`), i.e. is read through fsspec."""
    return bool(_PROTOCOL.match(str(path)))


def join(base: str, *parts: str) -> str:
    """Joins path parts: POSIX-style (no normalization of `//`) for a URL, os.path otherwise."""
    if is_url(base):
        out = base
        for p in parts:
            out = p if is_url(p) else (out.rstrip("/") + "/" + p.lstrip("/") if p else out)
        return out
    return os.path.normpath(os.path.join(base, *parts))


def _fs(path: str):
    import fsspec  # pylint: disable=g-import-not-at-top

    fs, _, _ = fsspec.core.get_fs_token_paths(path)
    return fs


def open_binary(path: str) -> IO[bytes]:
    """Opens a local path or a URL for binary reading (seekable, as tifffile needs)."""
    if not is_url(path):
        return open(path, "rb")
    import fsspec  # pylint: disable=g-import-not-at-top

    return fsspec.open(path, "rb").open()


def exists(path: str) -> bool:
    """Whether a file exists at a local path or URL."""
    return os.path.isfile(path) if not is_url(path) else bool(_fs(path).isfile(path))


def expand(pattern: str) -> list[str]:
    """The files a path or glob pattern names, sorted; [] when none.

    Args:
      pattern: a local path or URL, with `*`, `?` or `[...]` wildcards if wanted.

    Returns:
      Matching file paths (URLs keep their protocol).
    """
    if not any(ch in pattern for ch in "*?["):
        return [pattern] if exists(pattern) else []
    if not is_url(pattern):
        return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    fs = _fs(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern) if fs.isfile(p))


def read_table(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Reads a `.csv`, `.csv.gz` or `.parquet` table into its header and rows of strings.

    Every cell is a string, as `csv` reads it (parquet values are formatted; missing
    values become ""), so identifiers such as plate barcodes keep their exact spelling.

    Args:
      path: local path or URL.

    Returns:
      (column names, rows as dicts column -> string).

    Raises:
      ValueError: for another suffix, naming the path and the supported ones.
    """
    name = str(path).lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return _read_parquet(path)
    if not (name.endswith(".csv") or name.endswith(".csv.gz") or name.endswith(".txt")):
        raise ValueError(f"{path}: unsupported table format; use .csv, .csv.gz or .parquet")
    with open_binary(path) as raw:
        data = raw.read()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    return list(reader.fieldnames or []), list(reader)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_parquet(path: str) -> tuple[list[str], list[dict[str, str]]]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    with open_binary(path) as f:
        table = pq.read_table(f)
    columns = table.column_names
    data = {c: table.column(c).to_pylist() for c in columns}
    rows = [{c: _cell(data[c][i]) for c in columns} for i in range(table.num_rows)]
    return list(columns), rows


def stamps(paths: Iterable[str]) -> dict[str, list | None]:
    """Identity of each file for cache keys: [path, size, version]; None where missing.

    Local files give (absolute path, size, mtime in ns), as the store key always used;
    URLs (size, ETag or modification time from fsspec), listing each directory once
    instead of one request per file.

    Args:
      paths: local paths and/or URLs.

    Returns:
      path -> stamp, or None for a file that does not exist.
    """
    out: dict[str, list | None] = {}
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        if is_url(p):
            by_dir.setdefault(posixpath.dirname(p), []).append(p)
        elif os.path.isfile(p):
            st = os.stat(p)
            out[p] = [os.path.abspath(p), st.st_size, st.st_mtime_ns]
        else:
            out[p] = None
    for directory, files in by_dir.items():
        listing = _listing(directory)
        for p in files:
            info = listing.get(posixpath.basename(p))
            out[p] = None if info is None else [p, info.get("size"), _version(info)]
    return out


def _listing(directory: str) -> dict[str, dict]:
    fs = _fs(directory)
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e for e in entries
            if e.get("type", "file") == "file"}


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "created", "modified"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def missing(paths: Sequence[str]) -> list[str]:
    """The paths of `paths` (deduplicated, sorted) that name no file."""
    return sorted(p for p, s in stamps(sorted(set(paths))).items() if s is None)
