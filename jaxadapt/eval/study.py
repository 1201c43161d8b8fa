"""A study from config to result tables: the library side of experiments/run.py."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from jaxadapt.data import pipeline, splits as splits_lib, transforms, worlds
from jaxadapt.data.pipeline import DataView
from jaxadapt.data.schema import SiteTable
from jaxadapt.eval import protocol, reports, validation
from jaxadapt.methods import registry
from jaxadapt.methods.base import Method
from jaxadapt.models import build_model


log = logging.getLogger(__name__)


def make_view(source, table: SiteTable, train_rows, data_cfg: ml_collections.ConfigDict,
              stats_sample: int | None = None) -> DataView:
    """Data access for one replicate: normalization from that replicate's training images.

    Args:
      source: random-access records.
      table: metadata of every record.
      train_rows: rows whose pixels define the per-channel mean and std.
      data_cfg: `config.data` (crop_size, num_threads, normalization: "dataset" statistics
        of `train_rows`, or "per_image" standardization; source "jump_profiles": the
        identity on 1 x 1 records).
      stats_sample: read at most this many training images for the statistics
        (`worlds.stats_sample`); None reads all.

    Returns:
      The DataView.
    """
    if data_cfg.get("source") == "jump_profiles":
        # Profiles are normalized per plate when loaded; a 1 x 1 crop is the identity.
        identity = transforms.Transform(1, None)
        dim = int(np.asarray(source[0]["image"]).shape[-1])
        return DataView(source=source, table=table, eval_transform=identity,
                        train_transform=transforms.Transform(1, None, train=True),
                        num_threads=data_cfg.num_threads, channels=dim)
    if data_cfg.normalization == "per_image":
        evaluate = transforms.per_image_eval_transform(data_cfg.crop_size)
        train = transforms.Transform(data_cfg.crop_size, None, train=True, per_image=True)
    else:
        stats = train_stats(source, train_rows, max_rows=stats_sample)
        evaluate = transforms.eval_transform(data_cfg.crop_size, stats)
        train = transforms.train_transform(data_cfg.crop_size, stats)
    return DataView(source=source, table=table, eval_transform=evaluate, train_transform=train,
                    num_threads=data_cfg.num_threads)


def train_stats(source, train_rows, max_rows: int | None = None) -> transforms.ChannelStats:
    """Per-channel pixel mean/std of the training images, read once over all processes.

    Each process reads a contiguous share of the rows; the exact integer sums are totalled
    over processes, so every process gets the statistics of a one-process read.

    Args:
      source: random-access records.
      train_rows: the rows whose pixels define the statistics.
      max_rows: if set and below len(train_rows), a fixed random sample of that many rows
        (seed 0, sorted: the same rows on every process) is read instead of all.

    Returns:
      ChannelStats (float64).
    """
    n = jax.process_count()
    return pipeline.channel_stats(source, train_rows, max_rows=max_rows, seed=0,
                                  share=(jax.process_index(), n),
                                  combine=exact_sum_over_processes if n > 1 else None)


_LIMB_BITS, _LIMBS = 30, 4


def exact_sum_over_processes(values: list[int]) -> list[int]:
    """Sums non-negative Python ints (< 2**120) over processes, exactly.

    Args:
      values: the same number of ints on every process.

    Returns:
      The totals, as Python ints, on every process.
    """
    if any(v < 0 or v >> (_LIMB_BITS * _LIMBS) for v in values):
        raise ValueError("exact_sum_over_processes takes ints in [0, 2**120)")
    mask = (1 << _LIMB_BITS) - 1
    # 30-bit limbs travel as int32 (x64 may be off); their sums over processes fit int64.
    limbs = np.array([[(v >> (_LIMB_BITS * k)) & mask for k in range(_LIMBS)] for v in values],
                     np.int64)
    total = protocol.sum_over_processes(limbs)
    return [sum(int(t) << (_LIMB_BITS * k) for k, t in enumerate(row)) for row in total]


class StudyPlan(NamedTuple):
    """What a validated study runs, built once: the model, its methods and their trainers.

    Attributes:
      model: the architecture (`config.model`).
      methods: (swept setting, Method) pairs, in table order (`protocol.method_settings`).
      trainers: one training function per distinct recipe and overrides the methods need
        (`protocol.build_trainers`); its checkpoint key is `protocol.training_key` of the
        spec's training config.
    """

    model: Any
    methods: list[tuple[dict, Method]]
    trainers: dict[protocol.TrainerSpec, protocol.TrainFn]


def plan_study(cfg: ml_collections.ConfigDict) -> StudyPlan:
    """Turns a validated study config into its plan: methods x settings x trainer specs.

    Built before the data, so that the methods' own checks, too, fail before any
    rendering; each method and trainer is built once per study so its jitted functions
    compile once.

    Args:
      cfg: the study config, already checked by `validation.validate`.

    Returns:
      The StudyPlan.
    """
    model = build_model(cfg.model)
    methods = protocol.method_settings(model, cfg, protocol.swept_settings(cfg))
    # One per (recipe, training overrides), e.g. a CS-ARM-BN per swept control count.
    return StudyPlan(model, methods, protocol.build_trainers(model, methods, cfg))


def run_study(cfg: ml_collections.ConfigDict, workdir: str) -> list[reports.Row]:
    """Runs every replicate of a study and writes its result tables.

    Args:
      cfg: the study config (see `jaxadapt.config.get_defaults`).
      workdir: run directory for checkpoints, logs and results.

    Returns:
      The aggregated rows (also written to `workdir/results.*`, by process 0 alone).

    Raises:
      ValueError: a `validation.ConfigError` listing every problem of `cfg`, before
        anything is rendered or trained.
    """
    validation.validate(cfg)
    return _run_plan(cfg, plan_study(cfg), workdir)


def _run_plan(cfg: ml_collections.ConfigDict, plan: StudyPlan, workdir: str) -> list[reports.Row]:
    source, table = worlds.load_world(cfg)
    scores = []
    for rep in protocol.replicates(cfg):
        rows = splits_lib.make_splits(table, train_source=rep.train_source, cfg=cfg.splits)
        view = make_view(source, table, rows["train"], cfg.data, worlds.stats_sample(cfg))
        scores += protocol.run_replicate(rep, cfg, view, rows, plan.methods, plan.trainers,
                                         workdir)
    result_rows = reports.aggregate(scores)
    if jax.process_index() == 0:  # every process holds the same rows (summed over processes)
        reports.write_results(workdir, cfg.study, cfg.to_dict(), result_rows)
    return result_rows


def load_replicate(cfg: ml_collections.ConfigDict, trainer: str, rep: protocol.Replicate,
                   workdir: str, overrides: tuple[tuple[str, object], ...] = ()):
    """One replicate's data and trained model, as the study runner sees them.

    Loads the model from its checkpoint (`protocol.checkpoint_path`) or trains it there
    first, so analyses of a study reuse exactly the models the study scored.

    Args:
      cfg: the study config.
      trainer: a training recipe of `jaxadapt.methods.registry` (`erm`, `arm_bn`, ...).
      rep: training source and seed.
      workdir: the study's run directory (checkpoints go below it unless
        `cfg.checkpoint_dir` is set).
      overrides: training-config overrides, as a method declares them (e.g.
        (("arm.n_controls", 128),) for the model a sweep's N = 128 is scored with).

    Returns:
      (model, view, rows of each split, trained variables).

    Raises:
      ValueError: a `validation.ConfigError` for a bad `cfg`, before any rendering.
    """
    validation.validate(cfg)
    model = build_model(cfg.model)
    train_cfg = protocol.training_config(cfg, protocol.TrainerSpec(trainer, tuple(overrides)))
    train = registry.build_trainers(model, train_cfg, {trainer})[trainer]
    source, table = worlds.load_world(cfg)
    rows = splits_lib.make_splits(table, train_source=rep.train_source, cfg=cfg.splits)
    view = make_view(source, table, rows["train"], cfg.data, worlds.stats_sample(cfg))
    variables = train(view, rows, protocol.checkpoint_path(train_cfg, rep, trainer, workdir), rep.seed)
    return model, view, rows, variables


def setup_logging(workdir: str) -> None:
    """jaxadapt's INFO messages to the terminal and `workdir/log.txt`; libraries' warnings only.

    Orbax and TFDS log every checkpoint file operation at INFO through absl, which
    would drown the study's own progress.
    """
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    tfds.disable_progress_bar()  # per-record bars of the store build flood logs
    os.makedirs(workdir, exist_ok=True)
    ours = logging.getLogger("jaxadapt")
    ours.setLevel(logging.INFO)
    ours.propagate = False  # absl's root handler would print it a second time
    fmt = logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr),
                    logging.FileHandler(os.path.join(workdir, "log.txt"))):
        handler.setFormatter(fmt)
        ours.addHandler(handler)


def main(cfg: ml_collections.ConfigDict, *, workdir: str | None = None, distributed: bool = False) -> None:
    """Entry point: set up devices and logging, run the study, print the table.

    Args:
      cfg: the locked study config.
      workdir: output directory; default `runs/<study>`.
      distributed: initialize multi-host JAX first (one process per host).
    """
    if distributed:
        jax.distributed.initialize()  # before validation, which counts the devices
    validation.validate(cfg)  # once, before the workdir and its log exist
    workdir = workdir or os.path.join("runs", cfg.study)
    setup_logging(workdir)
    log.info("jax %s on %d %s device(s), %d process(es)", jax.__version__, jax.device_count(),
                 jax.devices()[0].platform, jax.process_count())
    start = time.time()
    rows = _run_plan(cfg, plan_study(cfg), workdir)
    if jax.process_index() == 0:
        print(reports.markdown_table(rows, title=cfg.study), file=sys.stdout)
        print(f"results in {os.path.abspath(workdir)}/results.{{json,md,csv,png}} "
              f"({time.time() - start:.0f} s)", file=sys.stdout)
