"""ERM: the trained model as it is, normalizing with its running BatchNorm statistics."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from jaxadapt.methods.base import (Method, Unit, UnitEmbeddings, Variables, collect_controls,
                                   collect_logits)


def running_stats_predictor(model: nn.Module):
    """A jitted `(variables, images) -> logits` that uses the running BN statistics.

    Args:
      model: a model returning `(logits, features)`.

    Returns:
      The predictor; compiled once per input shape.
    """

    @jax.jit
    def predict(variables: Variables, images: jax.Array) -> jax.Array:
        logits, _ = model.apply(variables, images, norm_mode="running")
        return logits

    return predict


def running_stats_features(model: nn.Module):
    """A jitted `(variables, images) -> features` (penultimate, pooled) with running BN statistics.

    Args:
      model: a model returning `(logits, features)`.

    Returns:
      The feature function; compiled once per input shape.
    """

    @jax.jit
    def features(variables: Variables, images: jax.Array) -> jax.Array:
        _, feats = model.apply(variables, images, norm_mode="running")
        return feats

    return features


def erm(model: nn.Module) -> Method:
    """Empirical risk minimization without test-time adaptation.

    Args:
      model: the trained architecture.

    Returns:
      The `erm` method (trained by the `erm` recipe).
    """
    predict = running_stats_predictor(model)

    features = running_stats_features(model)

    def predict_unit(variables: Variables, unit: Unit):
        return collect_logits(functools.partial(predict, variables), unit)

    def embed_unit(variables: Variables, unit: Unit) -> UnitEmbeddings:
        fn = functools.partial(features, variables)
        return UnitEmbeddings(collect_logits(fn, unit), collect_controls(fn, unit))

    # Running statistics: neither the test batch size nor an adaptation subset can
    # change a prediction.
    # Retrieval is scored on the raw penultimate features (no batch correction at all).
    return Method(name="erm", trainer="erm", predict_unit=predict_unit, ignores=("L", "adapt_on"),
                  embed_unit=embed_unit)
