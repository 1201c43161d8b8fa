"""The kNN probe of a ViT extractor: features of table rows, a labelled bank, accuracy.

DINO (Caron et al. 2021) judges features without training on top of them: labelled
training images form a bank, each query votes with its k nearest bank features
(`jaxadapt.methods.coda.knn`). Here the features are computed data-parallel over the mesh, each
process reading its share of every batch and the features gathered back, so the probe
runs unchanged on several hosts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxadapt.data import sampling as samplers, schema
from jaxadapt.methods.coda import knn
from jaxadapt.models.vit import DINOModel
from jaxadapt.train import parallel
from jaxadapt.train.supervised import labelled_rows


Variables = dict[str, Any]


@functools.lru_cache(maxsize=None)
def make_feature_fn(model: DINOModel, mesh) -> Callable[[Any, np.ndarray], jax.Array]:
    """Jitted ``(backbone-owning params, images) -> CLS features``, batch over the mesh.

    Cached per (model, mesh): every trainer of a study shares one compilation.

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
    """CLS features of `rows` (evaluation transform), in row order, on every process.

    Each process reads its share of every batch; the features are gathered back.

    Args:
      feature_fn: from `make_feature_fn`.
      params: DINOModel params (teacher or student), replicated on the mesh.
      view: the DataView (its eval transform standardizes per image).
      rows: int rows.
      batch_size: rows per forward pass (global; splits over processes x devices).
      mesh: the data mesh.

    Returns:
      float32 [len(rows), D].
    """
    index, mask = samplers.padded_batches(rows, batch_size)
    batches = parallel.process_batches(view.eval_batches, index, mesh, masks=mask,
                                       field="config.train.eval_batch_size")
    out = []
    for k, batch in enumerate(batches):
        feats = feature_fn(params, parallel.shard_batch(batch["image"], mesh))
        out.append(np.asarray(multihost_utils.process_allgather(feats, tiled=True))[mask[k]])
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


def knn_variables(model: DINOModel, params: Any, view, rows: dict[str, np.ndarray], config,
                  seed: int, mesh, feature_fn: Callable | None = None) -> Variables:
    """The extractor's variables for the kNN methods: params + a labelled feature bank.

    Args:
      model: the DINOModel.
      params: its parameters (a trained teacher, or a random initialization).
      view: the DataView.
      rows: the replicate's splits; the bank holds labelled "train" rows.
      config: the study config.
      seed: replicate seed.
      mesh: the data mesh.
      feature_fn: from `make_feature_fn` (built here if None).

    Returns:
      {"params": params, "knn_bank": {"features", "labels"}} on the host.
    """
    bank_rows = _bank_rows(view.table, rows["train"], config.dino.knn_bank_size, seed)
    if len(bank_rows) == 0:
        raise ValueError("the training split has no labelled image for the kNN bank; "
                         "choose a preset/compounds with class labels")
    feature_fn = feature_fn or make_feature_fn(model, mesh)
    feats = extract_features(feature_fn, parallel.replicate(params, mesh),
                             view, bank_rows, config.train.eval_batch_size, mesh)
    bank = knn.make_bank(feats, view.table["label"][bank_rows], config.model.num_classes)
    return {"params": jax.device_get(params),
            "knn_bank": {"features": bank.features, "labels": bank.labels}}
