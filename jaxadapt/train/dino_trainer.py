"""DINO pretraining of a ViT extractor on a study's training images (labels unused).

The recipe: multi-crop views (`jaxadapt.data.views`) of every training image, or of
cross-batch pairs (CODA: two images of one compound from different plates or batches,
`jaxadapt.data.pairs`), fed to the pure DINO step (`jaxadapt.adapt.dino`) under
``jax.shard_map`` over every device and host, driven by the shared epoch loop
(`jaxadapt.train.loop.fit`: checkpoints, exact resume). Each host reads only its own
slice of every global batch.

After every epoch the teacher's backbone is probed with DINO's weighted kNN: features
of labelled training images form the bank, labelled validation images are classified.
The probe and the collapse monitor (teacher entropy, centre norm, student-teacher KL)
go to the run's logs and ``dino_history.json``; a collapse is warned about with its
numbers. The result is the teacher backbone (DINO evaluates and transfers the teacher).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxadapt.adapt import dino, dino_optim, knn
from jaxadapt.data import pairs as pairs_lib
from jaxadapt.data import samplers, schema, views
from jaxadapt.models import DINOHead, DINOModel, build_model
from jaxadapt.train import parallel
from jaxadapt.train.loop import FitConfig, fit
from jaxadapt.train.supervised import Interrupted, check_batch_size, labelled_rows
from jaxadapt.train.writer import MetricWriter

log = logging.getLogger(__name__)

Variables = dict[str, Any]


def build_dino_model(config: ml_collections.ConfigDict) -> DINOModel:
    """The student/teacher architecture: `config.model`'s ViT + `config.dino`'s head.

    Args:
      config: the study config.

    Returns:
      The (uninitialized) `DINOModel`.
    """
    d = config.dino
    head = DINOHead(out_dim=d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim)
    return DINOModel(backbone=build_model(config.model), head=head)


def views_of(config: ml_collections.ConfigDict) -> views.ViewsConfig:
    """`config.dino.views` as a `ViewsConfig`. Args: config. Returns: the ViewsConfig."""
    return views.views_config(config.dino.views)


def process_share(index_batches: np.ndarray) -> np.ndarray:
    """This process's contiguous slice of every global batch ([steps, B, ...] -> [steps, B/P, ...]).

    Args:
      index_batches: global index batches, identical on every process.

    Returns:
      The rows this process reads; the global batch is the processes' slices in order.

    Raises:
      ValueError: the batch size does not divide by the process count.
    """
    n, pid = jax.process_count(), jax.process_index()
    b = index_batches.shape[1]
    if b % n:
        raise ValueError(f"global batch size {b} does not divide over {n} processes; "
                         f"use a multiple of {n}")
    return index_batches[:, pid * (b // n):(pid + 1) * (b // n)]


def epoch_pairs(table: schema.SiteTable, rows: np.ndarray, batch_size: int, *, level: str,
                seed: int, epoch: int) -> tuple[np.ndarray, dict[str, int]]:
    """The epoch's (row_a, row_b) batches: cross-batch pairs, or each image with itself.

    Args:
      table: the study's SiteTable.
      rows: training rows.
      batch_size: global batch size.
      level: "none" (plain DINO), "plate" or "batch" (partner from another plate/batch).
      seed, epoch: randomness of the draw and the order.

    Returns:
      (int64 [steps, B, 2], fallback counts; empty for plain DINO).
    """
    if level == "none":
        index = samplers.mixed_batches(rows, batch_size, seed=seed, epoch=epoch)
        return np.stack([index, index], axis=-1), {}
    return pairs_lib.epoch_pair_batches(table, rows, batch_size, level=level, seed=seed,
                                        epoch=epoch)


def make_feature_fn(model: DINOModel, mesh) -> Callable[[Any, np.ndarray], jax.Array]:
    """Jitted ``(backbone-owning params, images) -> CLS features``, batch over the mesh.

    Args:
      model: the DINOModel.
      mesh: the data mesh.

    Returns:
      The feature function (images placed with `parallel.shard_batch` by the caller).
    """
    rep, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=DINOModel.features),
                   in_shardings=(rep, data), out_shardings=data)


def extract_features(feature_fn: Callable, params: Any, view, rows: np.ndarray,
                     batch_size: int, mesh) -> np.ndarray:
    """CLS features of `rows` (evaluation transform), in row order.

    Args:
      feature_fn: from `make_feature_fn`.
      params: DINOModel params (teacher or student).
      view: the DataView (its eval transform standardizes per image).
      rows: int rows.
      batch_size: rows per forward pass (a multiple of the local device count).
      mesh: the data mesh.

    Returns:
      float32 [len(rows), D].
    """
    index, mask = samplers.padded_batches(rows, batch_size)
    out = []
    for batch in view.eval_batches(index, mask):
        feats = feature_fn(params, parallel.shard_batch(batch["image"], mesh))
        out.append(np.asarray(jax.device_get(feats))[batch["mask"]])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def knn_accuracy(bank: knn.FeatureBank, queries: np.ndarray, labels: np.ndarray, *,
                 num_classes: int, k: int, temperature: float) -> float:
    """Share of queries whose kNN vote is their label. Returns: accuracy in [0, 1]."""
    votes = knn.knn_votes(jnp.asarray(queries), jnp.asarray(bank.features),
                          jnp.asarray(bank.labels), num_classes=num_classes, k=k,
                          temperature=temperature)
    return float(np.mean(np.asarray(votes).argmax(1) == labels))


def _bank_rows(table: schema.SiteTable, rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Labelled rows for the kNN bank, at most `size` of them (a fixed random subset)."""
    rows = labelled_rows(table, rows)
    if len(rows) > size:
        rows = np.sort(np.random.default_rng([seed, 7]).choice(rows, size, replace=False))
    return rows


def make_knn_probe(feature_fn: Callable, view, rows: dict[str, np.ndarray], config, seed: int,
                   mesh) -> Callable[[Any], dict[str, float]]:
    """``params -> {"knn_accuracy"}``: DINO's kNN probe, training bank vs validation queries.

    Args:
      feature_fn: from `make_feature_fn`.
      view: the DataView.
      rows: the replicate's splits ("train", "validation").
      config: the study config (dino.knn_k, knn_temperature, knn_bank_size, model.num_classes).
      seed: replicate seed (which bank subset).
      mesh: the data mesh.

    Returns:
      The probe.
    """
    d, k_cls = config.dino, config.model.num_classes
    bank_rows = _bank_rows(view.table, rows["train"], d.knn_bank_size, seed)
    query_rows = labelled_rows(view.table, rows["validation"])
    bs = config.train.eval_batch_size

    def probe(params: Any) -> dict[str, float]:
        if len(bank_rows) == 0 or len(query_rows) == 0:
            return {"knn_accuracy": float("nan")}
        feats = extract_features(feature_fn, params, view, bank_rows, bs, mesh)
        bank = knn.make_bank(feats, view.table["label"][bank_rows], k_cls)
        queries = extract_features(feature_fn, params, view, query_rows, bs, mesh)
        acc = knn_accuracy(bank, queries, view.table["label"][query_rows], num_classes=k_cls,
                           k=d.knn_k, temperature=d.knn_temperature)
        return {"knn_accuracy": acc}

    return probe
