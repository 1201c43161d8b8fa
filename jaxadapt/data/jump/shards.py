"""The resumable single-machine JUMP writer: shards of consecutive rows, then one store.

Shard g holds rows [g * shard_sites, (g + 1) * shard_sites) of the plan's table, written
under `<root>.parts/` as `part-<g>.array_record` (temp name, then rename) and then
described by `part-<g>.json` (rows, count, bytes, checksum, store key). A shard counts as
finished only when its manifest exists, names this key and row range, and the record file
has the recorded size and checksum: a build killed midway leaves the finished shards, and
the restarted build (same inputs, hence same key and same parts directory) writes only the
others. When every shard exists they are moved into `root` as the TFDS split's shard files,
and the checksums taken when each was written become the store manifest's (so a part
damaged while it waited is rewritten, not sealed into the store, and no shard is read
twice at the end).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import uuid

from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer, naming, splits as splits_lib

from jaxadapt.data import store
from jaxadapt.data.jump import build as jump_build


log = logging.getLogger(__name__)


def _part(parts: str, g: int, ext: str) -> str:
    return os.path.join(parts, f"part-{g:05d}.{ext}")


def _finished(parts: str, g: int, rows: tuple[int, int], key: str) -> str | None:
    """The checksum of shard g when it is finished and intact, else None (rewrite it)."""
    try:
        with open(_part(parts, g, "json")) as f:
            m = json.load(f)
        path = _part(parts, g, "array_record")
        # A part manifest without a checksum (an older build's) cannot be trusted: rewrite.
        if (m["key"] == key and tuple(m["rows"]) == rows and os.path.getsize(path) == m["bytes"]
                and m.get("hash") == store.HASH and store.file_digest(path) == m["checksum"]):
            return m["checksum"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def _write_shard(plan: jump_build.BuildPlan, parts: str, g: int, rows: tuple[int, int],
                 key: str, pool, progress: jump_build.Progress) -> str:
    """Writes shard g (temp file, then rename, then its manifest); returns its checksum."""
    feats = store.site_features(plan.shape)
    serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
    tmp = _part(parts, g, f"array_record.tmp-{uuid.uuid4().hex[:8]}")
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")  # as TFDS writes
    try:
        for r, img in zip(range(*rows), pool.map(lambda i: jump_build.load_site(plan, i),
                                                 range(*rows))):
            writer.write(serializer.serialize_example(
                feats.encode_example({"image": img, "row": r})))
            progress.update(1)
    finally:
        writer.close()
    final = _part(parts, g, "array_record")
    digest = store.file_digest(tmp)
    os.replace(tmp, final)
    manifest = {"key": key, "rows": list(rows), "count": rows[1] - rows[0],
                "bytes": os.path.getsize(final), "hash": store.HASH, "checksum": digest}
    with open(_part(parts, g, "json.tmp"), "w") as f:
        json.dump(manifest, f)
    os.replace(_part(parts, g, "json.tmp"), _part(parts, g, "json"))  # the shard is finished
    return digest


def _assemble(plan: jump_build.BuildPlan, parts: str, root: str, lengths: list[int],
              key: str, report: dict, digests: list[str]) -> None:
    """Moves the finished shards (checksums `digests`) into a TFDS data set at `root`."""
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    vdir = store.version_dir(tmp)
    os.makedirs(vdir)
    try:
        builder = store.JaxadaptSites(n_rows=len(plan.table), image_shape=plan.shape,
                                      chunks=lambda: (), data_dir=tmp,
                                      file_format="array_record")
        template = naming.ShardedFileTemplate(
            data_dir=builder.data_path, dataset_name=builder.name, split="train",
            filetype_suffix="array_record")
        total, known = 0, {}
        for g in range(len(lengths)):
            dest = os.fspath(template.sharded_filepath(shard_index=g, num_shards=len(lengths)))
            total += os.path.getsize(_part(parts, g, "array_record"))
            os.replace(_part(parts, g, "array_record"), dest)  # a rename: same bytes
            known[os.path.relpath(dest, tmp)] = digests[g]
        builder.info.set_splits(splits_lib.SplitDict([splits_lib.SplitInfo(
            name="train", shard_lengths=lengths, num_bytes=total, filename_template=template)]))
        builder.info.write_to_directory(vdir)
        with open(os.path.join(tmp, jump_build.REPORT), "w") as f:
            json.dump(report, f, indent=1)
        store.finish_store(tmp, root, plan.table, image_shape=plan.shape, key=key,
                           digests=known)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(parts, ignore_errors=True)


def build_local(plan: jump_build.BuildPlan, root: str, *, key: str, shard_sites: int = 256,
                num_workers: int = 4, progress_every_s: float = 30.0) -> dict:
    """Writes the plan's records into the store `root`, reusing finished shards.

    Args:
      plan: from `jump_build.plan_build`.
      root: the store directory (must not exist); shards live in `<root>.parts`.
      key: the store key (written to each shard manifest and the completion marker).
      shard_sites: rows per shard (the unit of resumption).
      num_workers: threads reading TIFFs within a shard.
      progress_every_s: seconds between progress log lines.

    Returns:
      The build report (also saved as `root/build_report.json`): shard and site
      counts built / reused in this run, and every skipped site with its reason.
    """
    if int(shard_sites) < 1:
        raise ValueError(f"shard_sites={shard_sites} must be >= 1")
    n = len(plan.table)
    parts = f"{root}.parts"
    os.makedirs(parts, exist_ok=True)
    bounds = [(s, min(s + int(shard_sites), n)) for s in range(0, n, int(shard_sites))]
    progress = jump_build.Progress(n, progress_every_s)
    built = reused = 0
    digests = []
    with concurrent.futures.ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        for g, rows in enumerate(bounds):
            digest = _finished(parts, g, rows, key)
            if digest is not None:
                reused += 1
                progress.update(rows[1] - rows[0], reused=True)
            else:
                digest = _write_shard(plan, parts, g, rows, key, pool, progress)
                built += 1
            digests.append(digest)
    progress.update(0, force=True)
    report = {"engine": "local", "key": key, "sites": n, "shards": len(bounds),
              "shards_built": built, "shards_reused": reused,
              "sites_built": n - progress.reused, "sites_reused": progress.reused,
              "skipped": [b.as_dict() for b in plan.skipped]}
    log.info("JUMP store %s: %d shards built, %d reused (finished by an earlier run), "
             "%d sites skipped", root, built, reused, len(plan.skipped))
    _assemble(plan, parts, root, [b - a for a, b in bounds], key, report, digests)
    return report
