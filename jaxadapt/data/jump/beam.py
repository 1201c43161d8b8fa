"""The JUMP image store built on Apache Beam through TFDS's Beam support.

`JumpBeamSites` is the store's TFDS builder (`store.JaxadaptSites`: same name, features
and array_record layout) whose `_generate_examples` returns a Beam PTransform: the rows
are cut into groups of `shard_sites`, the groups are redistributed across workers
(`Reshuffle`), and each worker turns its rows into records with `jump_build.load_site`.
TFDS then sorts by row (`disable_shuffling`) and writes the shards, so record i is row i
and the records equal the local engine's. The same pipeline runs on the DirectRunner
here and unchanged on Dataflow, Flink or Spark: pass `beam_runner` / `beam_options`.
`apache_beam` is imported only inside the Beam path, so the package imports without it.

Resumption: a Beam job is retried by its runner (failed bundles are redone by the
runner itself, finished ones are kept), but a killed and restarted job starts over:
TFDS's Beam writer keeps no finished shards across jobs. For a resumable cluster build,
build one store per plate or batch (each is cached by its own key and reused).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from jaxadapt.data import store
from jaxadapt.data.jump import build as jump_build


log = logging.getLogger(__name__)


def _group_examples(start: int, plan: jump_build.BuildPlan, shard_sites: int,
                    every_s: float) -> Iterator[tuple[int, dict]]:
    """Records of rows [start, start + shard_sites), with a per-worker progress log."""
    from apache_beam import metrics  # pylint: disable=g-import-not-at-top
    done = metrics.Metrics.counter("jaxadapt", "sites_built")
    end = min(start + shard_sites, len(plan.table))
    t0 = time.monotonic()
    for i in range(start, end):
        yield i, {"image": jump_build.load_site(plan, i), "row": i}
        done.inc()
    rate = (end - start) / max(time.monotonic() - t0, 1e-9)
    if every_s >= 0:
        # A worker sees only its groups: the rate is this worker's, the ETA assumes it
        # does every remaining group alone (an upper bound); the runner's UI shows the
        # `jaxadapt/sites_built` counter over all workers.
        log.info("JUMP Beam worker: rows %d..%d done, %.1f sites/s, ETA <= %.0f s for the "
                 "%d rows after them", start, end - 1, rate, (len(plan.table) - end) / rate,
                 len(plan.table) - end)


class JumpBeamSites(store.JaxadaptSites, skip_registration=True):
    """The store builder whose examples come from a Beam pipeline (see module doc)."""

    name = store.BUILDER_NAME  # the same on-disk name, so `store.open_store` reads it

    def __init__(self, *, plan: jump_build.BuildPlan, shard_sites: int = 64,
                 progress_every_s: float = 0.0, **kwargs):
        self._plan, self._shard_sites = plan, int(shard_sites)
        self._every_s = float(progress_every_s)
        super().__init__(n_rows=len(plan.table), image_shape=plan.shape,
                         chunks=lambda: (), **kwargs)

    def _generate_examples(self) -> Any:
        import apache_beam as beam  # pylint: disable=g-import-not-at-top
        starts = list(range(0, len(self._plan.table), self._shard_sites))
        return (beam.Create(starts)
                | "Spread" >> beam.Reshuffle()
                | "ReadSites" >> beam.FlatMap(_group_examples, plan=self._plan,
                                              shard_sites=self._shard_sites,
                                              every_s=self._every_s))


def build_beam(plan: jump_build.BuildPlan, root: str, *, key: str, beam_runner: Any = None,
               beam_options: Any = None, shard_sites: int = 64,
               progress_every_s: float = 0.0) -> dict:
    """Builds the store `root` on Apache Beam (TFDS's Beam support).

    Args:
      plan: from `jump_build.plan_build`.
      root: the store directory (must not exist).
      key: the store key for the completion marker.
      beam_runner: a Beam runner or its name (e.g. "DirectRunner", "DataflowRunner");
        None = the DirectRunner's in-process engine (FnApiRunner) unless
        `beam_options` names a runner (e.g. `--runner=DataflowRunner`).
      beam_options: `apache_beam.options.pipeline_options.PipelineOptions` (or None),
        passed unchanged to the pipeline (project, region, temp_location, ...).
      shard_sites: rows per work item handed to a worker.
      progress_every_s: < 0 silences the per-worker progress lines.

    Returns:
      The build report (also saved as `root/build_report.json`).
    """
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    if beam_options is None:  # else Beam parses the calling program's sys.argv as options
        beam_options = beam.options.pipeline_options.PipelineOptions([])
    if beam_runner is None and (beam_options is None or not beam_options.view_as(
            beam.options.pipeline_options.StandardOptions).runner):
        # The DirectRunner's own in-process batch engine. Beam 2.77's "DirectRunner" first
        # tries to download the Prism runner binary, which fails (slowly) offline.
        # pylint: disable-next=g-import-not-at-top
        from apache_beam.runners.portability import fn_api_runner
        beam_runner = fn_api_runner.FnApiRunner()
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    t0 = time.monotonic()
    try:
        builder = JumpBeamSites(plan=plan, shard_sites=shard_sites,
                                progress_every_s=progress_every_s, data_dir=tmp)
        builder.download_and_prepare(
            file_format="array_record", download_dir=os.path.join(tmp, "dl"),
            download_config=tfds.download.DownloadConfig(beam_runner=beam_runner,
                                                         beam_options=beam_options))
        shutil.rmtree(os.path.join(tmp, "dl"), ignore_errors=True)
        n = len(plan.table)
        seconds = time.monotonic() - t0
        log.info("JUMP store %s on Beam: %d sites in %.1f s (%.1f sites/s)", root, n, seconds,
                 n / max(seconds, 1e-9))
        report = {"engine": "beam", "key": key, "sites": n, "sites_built": n,
                  "sites_reused": 0, "skipped": [b.as_dict() for b in plan.skipped]}
        with open(os.path.join(tmp, jump_build.REPORT), "w") as f:
            json.dump(report, f, indent=1)
        store.finish_store(tmp, root, plan.table, image_shape=plan.shape, key=key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
