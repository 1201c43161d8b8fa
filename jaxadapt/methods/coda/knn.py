"""Weighted k-nearest-neighbour classification of frozen features (DINO's kNN probe).

DINO (Caron et al. 2021, `eval_knn.py`) judges a self-supervised extractor without
training anything on top: every query feature votes with its k most cosine-similar
labelled bank features, each vote weighted by exp(similarity / T) (k = 20, T = 0.07).
The per-class vote sums act as logits: their argmax is the prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.methods.base import Method, collect_logits


class FeatureBank(NamedTuple):
    """Labelled reference features for the kNN vote.

    Attributes:
      features: float32 [M, D], L2-normalized rows.
      labels: int32 [M], class indices in [0, num_classes).
    """

    features: np.ndarray
    labels: np.ndarray


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit norm (as torch's F.normalize: divided by max(norm, eps)).

    Args:
      x: [N, D] features.
      eps: lower bound of the norm.

    Returns:
      [N, D] normalized rows.
    """
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def make_bank(features: np.ndarray, labels: np.ndarray, num_classes: int) -> FeatureBank:
    """Normalizes and checks labelled features for `knn_votes`.

    Args:
      features: [M, D] raw features of the labelled reference images.
      labels: [M] their classes.
      num_classes: number of classes K.

    Returns:
      The FeatureBank.

    Raises:
      ValueError: empty bank, mismatched lengths or labels outside [0, K).
    """
    features, labels = np.asarray(features, np.float32), np.asarray(labels)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"kNN bank features must be a non-empty [M, D] array; got shape {features.shape}")
    if labels.shape != (len(features),):
        raise ValueError(f"kNN bank labels shape {labels.shape} does not match {len(features)} features")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"kNN bank labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}); "
            "pass labelled rows only (unlabelled rows carry -1)"
        )
    normed = np.asarray(l2_normalize(jnp.asarray(features)))
    return FeatureBank(normed, labels.astype(np.int32))


def knn_votes(queries: jax.Array, bank_features: jax.Array, bank_labels: jax.Array, *,
              num_classes: int, k: int = 20, temperature: float = 0.07) -> jax.Array:
    """Per-class weighted votes of the k nearest bank features.

    Args:
      queries: [Q, D] raw query features (normalized here).
      bank_features: [M, D] L2-normalized bank features.
      bank_labels: [M] int bank classes.
      num_classes: K.
      k: neighbours per query (capped at M).
      temperature: T of the exp(similarity / T) vote weight.

    Returns:
      float32 [Q, K] vote sums; argmax is the kNN prediction.
    """
    k = min(int(k), bank_features.shape[0])
    sims = l2_normalize(queries) @ bank_features.T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    one_hot = jax.nn.one_hot(bank_labels[top_idx], num_classes, dtype=weights.dtype)
    return jnp.einsum("qk,qkc->qc", weights, one_hot)


def knn_method(name: str, trainer: str):
    """A registry factory for a kNN probe of a frozen extractor (methods `dino`, `random_init`).

    The trainer's variables hold the extractor's params ({"backbone": ..., ...}) and a
    labelled feature bank ({"features", "labels"}, see `jaxadapt.methods.coda.dino_trainer`);
    every test image is classified by its k nearest bank features. Nothing adapts.

    Args:
      name: method name.
      trainer: the recipe that produces the variables (`dino`, `dino_cb`, `random_init`).

    Returns:
      ``(model, cfg, setting) -> Method`` whose rows are named knn_accuracy / knn_macro_f1.
    """
    def factory(model, cfg, setting) -> Method:
        k, t, n_cls = cfg.dino.knn_k, cfg.dino.knn_temperature, cfg.model.num_classes

        @jax.jit
        def votes(params, bank, x):
            feats = model.apply({"params": params["backbone"]}, x)["cls"]
            return knn_votes(feats, bank["features"], bank["labels"], num_classes=n_cls, k=k,
                             temperature=t)

        def predict_unit(variables, unit) -> np.ndarray:
            if "knn_bank" not in variables:
                raise ValueError(f"method {name!r} needs variables with a 'knn_bank' (from the "
                                 f"{trainer!r} trainer); got {sorted(variables)}")
            return collect_logits(lambda x: votes(variables["params"], variables["knn_bank"], x),
                                  unit)

        return Method(name=name, trainer=trainer, predict_unit=predict_unit, ignores=("L",),
                      metric_prefix="knn_")

    return factory
