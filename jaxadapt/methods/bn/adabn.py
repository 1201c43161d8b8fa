"""Methods that swap a trained model's BatchNorm statistics for test-time ones.

Each is a ``(model, cfg, setting) -> Method`` factory for the protocol runner:
`adabn` (each test batch's own statistics), `adabn_plate` (exact whole-plate
statistics of the unit's perturbed images once per unit, then ERM-cost prediction),
and `plate_method`, the shared whole-context recipe (also behind `ben` and
`cs_arm_bn_plate`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.methods.base import (Method, Unit, UnitEmbeddings, Variables, adaptation_unit,
                                   collect_controls, collect_logits)
from jaxadapt.methods.bn.plate_stats import plate_stats
from jaxadapt.methods.bn.stats import Chunk, apply_with_stats, check_finite, features_with_stats


log = logging.getLogger(__name__)


def _adapt_field(cfg: Any, field: str, default: Any) -> Any:
    sub = cfg.get("adapt", None) if hasattr(cfg, "get") else getattr(cfg, "adapt", None)
    if sub is None:
        return default
    return sub.get(field, default) if hasattr(sub, "get") else getattr(sub, field, default)


def _unit_chunks(unit: Unit, *, images: bool, controls: bool) -> list[Chunk]:
    """A unit's context, read once into host memory (plate_stats reads it per pass)."""
    out: list[Chunk] = []
    if images:
        out += [(np.asarray(b.image), np.asarray(b.mask, bool)) for b in unit.batches()]
    if controls:
        out += [(np.asarray(c), None) for c in unit.all_controls() if len(c)]
    return out


def adabn(model: nn.Module, cfg: Any = None, setting: Mapping[str, Any] | None = None) -> Method:
    """AdaBN: each test batch is normalized with its own statistics (padding excluded).

    Args:
      model: the trained architecture (trained by the `erm` recipe).
      cfg, setting: unused (accepted for the registry signature).

    Returns:
      The `adabn` Method.
    """

    @jax.jit
    def predict(variables, images, mask):
        logits, _ = model.apply(variables, images, norm_mode="batch", stats_mask=mask)
        return logits

    def predict_unit(variables: Variables, unit: Unit) -> np.ndarray:
        out = []
        for b in unit.batches():
            mask = np.asarray(b.mask, bool)
            check_finite(b.image, mask, what=f"unit {unit.name!r} test batch")
            out.append(np.asarray(predict(variables, jnp.asarray(b.image), jnp.asarray(mask)))[mask])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return Method(name="adabn", trainer="erm", predict_unit=predict_unit)


def whole_unit_functions(model: nn.Module, unit_stats: Callable[[Variables, Unit], Any]):
    """`predict_unit` and `embed_unit` of a method that normalizes with one unit's statistics.

    Args:
      model: the trained architecture.
      unit_stats: (variables, unit) -> the BN statistics every image of the unit uses.

    Returns:
      (predict_unit -> logits, embed_unit -> `UnitEmbeddings` of the penultimate features
      of samples and controls under the same statistics, for retrieval).
    """
    def predict_unit(variables: Variables, unit: Unit) -> np.ndarray:
        stats = unit_stats(variables, unit)
        return collect_logits(functools.partial(apply_with_stats, model, variables, stats), unit)

    def embed_unit(variables: Variables, unit: Unit) -> UnitEmbeddings:
        fn = functools.partial(features_with_stats, model, variables, unit_stats(variables, unit))
        return UnitEmbeddings(collect_logits(fn, unit), collect_controls(fn, unit))

    return predict_unit, embed_unit


def plate_method(name: str, model: nn.Module, cfg: Any, *, images: bool,
                 controls: bool, trainer: str = "erm") -> Method:
    """A method that normalizes every unit with exact statistics of its whole context.

    Args:
      name: the method's name in result tables.
      model: the trained architecture.
      cfg: reads ``cfg.adapt.plate_chunk_size`` and ``cfg.adapt.on_missing_controls``.
      images: the unit's perturbed images belong to the context.
      controls: the unit's negative controls belong to the context.
      trainer: the recipe whose weights it adapts (e.g. "cs_arm_bn" for the whole-plate
        variant of CS-ARM-BN).

    Returns:
      The Method; statistics are computed once per unit (on its adaptation subset,
      `adaptation_unit`, when the runner sets one), predictions at ERM cost.
    """
    chunk = _adapt_field(cfg, "plate_chunk_size", None)
    on_missing = _adapt_field(cfg, "on_missing_controls", "raise")

    def unit_stats(variables: Variables, unit: Unit):
        unit = adaptation_unit(unit)  # statistics of the subset, scores of all
        context = _unit_chunks(unit, images=images, controls=controls)
        if controls and not images and not context:
            if on_missing != "perturbed_only":
                raise ValueError(
                    f"unit {unit.name!r} has no negative-control wells; method {name!r} "
                    "normalizes with controls-only statistics: evaluate it on units with "
                    "DMSO wells, or set adapt.on_missing_controls='perturbed_only'")
            log.warning("unit %s has no controls: %s falls back to the unit's perturbed "
                        "images (adapt.on_missing_controls='perturbed_only')", unit.name, name)
            context = _unit_chunks(unit, images=True, controls=False)
        return plate_stats(model, variables, context, chunk_size=chunk)

    predict_unit, embed_unit = whole_unit_functions(model, unit_stats)
    # Whole-unit statistics: the test batch size cannot change a prediction.
    return Method(name=name, trainer=trainer, predict_unit=predict_unit, ignores=("L",),
                  adapts_on_subset=True, embed_unit=embed_unit)


def adabn_plate(model: nn.Module, cfg: Any = None,
                setting: Mapping[str, Any] | None = None) -> Method:
    """Full-domain AdaBN: exact statistics of all the unit's perturbed images.

    The reference's full-domain AdaBN (``update_bn_with_full_domain``) pools the
    plate's test images, i.e. its perturbed images (controls only if its data module is
    asked to add them, which is off by default); the ERM weights it adapts never saw a
    control, so controls stay out here too. Unlike the reference, which averages
    per-batch variances, the statistics are pooled and exact (`plate_stats`), computed
    once per unit; every batch is then predicted at ERM cost.

    Args:
      model: the trained architecture (`erm` recipe).
      cfg: reads ``cfg.adapt.plate_chunk_size`` (default None = the unit's batch size).
      setting: unused.

    Returns:
      The `adabn_plate` Method.
    """
    return plate_method("adabn_plate", model, cfg, images=True, controls=False)
