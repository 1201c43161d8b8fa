"""What every adaptation method provides to the protocol runner.

A method is a small factory of pure functions (in the style of optax's
`GradientTransformation`): `init` resets the state at the start of a target unit
(episodic reset), `adapt` consumes unlabelled context, `predict` maps images to
logits. The protocol runner only calls `predict_unit`, which a method builds from
those pieces and which decides what context each test batch gets (none for ERM, the
batch itself for AdaBN, batch + fresh controls for CS-ARM-BN, ...).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol

import jax
import numpy as np


Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}


class UnitBatch(NamedTuple):
    """One padded batch of a target unit's labelled (perturbed) samples.

    Attributes:
      image: float32 [B, h, w, C], normalized.
      mask: bool [B]; False marks padding, which must never be scored.
    """

    image: np.ndarray
    mask: np.ndarray


class Unit(Protocol):
    """A target unit (plate, batch or source) as the adapters see it: images, no labels."""

    name: str

    def batches(self) -> Iterator[UnitBatch]:
        """The unit's perturbed samples in padded batches, in a fixed order."""

    def controls(self, count: int, seed: int) -> np.ndarray:
        """`count` of the unit's negative-control images, drawn with `seed` (float32 NHWC)."""

    def all_controls(self) -> Iterator[np.ndarray]:
        """Every negative-control image of the unit, in batches."""


class UnitEmbeddings(NamedTuple):
    """A unit's embeddings as a method sees them, for retrieval metrics (mAP).

    Attributes:
      samples: float [n, D], one row per scored sample, in the order of `unit.batches()`
        (padding dropped), like `Method.predict_unit`'s logits.
      controls: float [m, D], one row per negative-control image of the unit, in the
        order of `unit.all_controls()`.
    """

    samples: np.ndarray
    controls: np.ndarray


class Method(NamedTuple):
    """A method as the protocol runner drives it.

    Attributes:
      name: method name, a key of `jaxadapt.methods.registry.METHODS` (`erm`, `adabn`, ...).
      trainer: which training recipe produces its weights (`erm`, `arm_bn`, ...);
        methods sharing a trainer share the trained model within a replicate.
      predict_unit: (variables, unit) -> logits [n, K] for the unit's samples in the order
        of `unit.batches()`, padding dropped.
      setting_keys: swept keys the method itself reads (e.g. ("N",) for cs_arm_bn);
        the runner does not repeat a method over values of keys it ignores.
      ignores: runner keys whose value cannot change the method's predictions, e.g.
        ("L",) for methods that never use a test batch's statistics (ERM, whole-plate
        statistics), so a context-size sweep scores them once.
      train_overrides: training-config changes its weights need, as sorted
        ((dotted key, value), ...) pairs, e.g. (("arm.n_controls", 128),) for cs_arm_bn
        scored with 128 controls per chunk: the runner trains (and caches) one model per
        distinct (trainer, overrides).
      check: optional (trained variables) -> setting notes, called by the runner once per
        trained model before scoring: raises ValueError when the model does not fit the
        method's test protocol, and returns entries the results row's ``setting`` must
        carry (e.g. a control-share mismatch the config explicitly allows).
      counts: names of event counters its predict_unit may raise on a unit with
        `count_event` (e.g. "units_short_of_controls" when a fallback is configured);
        the runner writes each as a result metric per split, 0 when it never happened.
      metric_prefix: prepended to the scored metrics' names (e.g. "knn_" gives
        knn_accuracy for a kNN probe of a frozen extractor).
      adapts_on_subset: its predict_unit adapts on `adaptation_unit(unit)` and
        scores every batch of `unit`, so the runner may give it an adaptation subset
        (`eval.adapt_on` other than "unit"); methods whose context is the scored batch
        itself (AdaBN, TENT, CS-ARM-BN chunks) leave it False.
      spans_processes: its predict_unit is a collective over every process (e.g. online
        DINO adaptation, data-parallel over every device and host): on several
        processes the runner gives every unit to every process, in the same order,
        instead of dealing units out, and counts each unit once.
      embed_unit: optional (variables, unit) -> `UnitEmbeddings`, the representation the
        method classifies (e.g. ERM's penultimate features, TVN's normalized embeddings);
        when set and `eval.retrieval` is on, the runner also scores replicate and MoA
        retrieval (mean average precision, `jaxadapt.eval.retrieval`) on it.
    """

    name: str
    trainer: str
    predict_unit: Callable[[Variables, Unit], np.ndarray]
    setting_keys: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    train_overrides: tuple[tuple[str, Any], ...] = ()
    check: Callable[[Variables], Mapping[str, Any]] | None = None
    counts: tuple[str, ...] = ()
    metric_prefix: str = ""
    adapts_on_subset: bool = False
    spans_processes: bool = False
    embed_unit: Callable[[Variables, Unit], UnitEmbeddings] | None = None


class UnlabelledImages(NamedTuple):
    """A unit's raw images for methods that train on them (online DINO adaptation).

    Attributes:
      source: random-access records (record i -> {"image": uint8 [H, W, C]}).
      table: the SiteTable of `source` with every label and MoA blanked (plate, batch,
        well and compound stay: they are the plate map, known before any result).
      rows: int64 row indices of the unit's images: its scored samples and its controls.
      num_threads: reader threads.
      train_transform: the study's training transform (random crop, flips, normalization)
        for methods that train on the images directly (e.g. MAE adaptation); DINO builds
        its own multi-crop views.
    """

    source: Any
    table: Any
    rows: np.ndarray
    num_threads: int = 2
    train_transform: Any = None


def unlabelled_images(unit: Unit) -> UnlabelledImages:
    """The raw images of `unit` (`unit.unlabelled()`), for methods that train on them.

    Args:
      unit: a unit backed by an image store (e.g. `jaxadapt.eval.units.PipelineUnit`).

    Returns:
      `UnlabelledImages`.

    Raises:
      ValueError: the unit exposes only transformed batches.
    """
    get = getattr(unit, "unlabelled", None)
    if not callable(get):
        raise ValueError(f"unit {getattr(unit, 'name', unit)!r} exposes no raw images "
                         "(.unlabelled()); online adaptation (oda, coda) needs a unit "
                         "backed by an image store, such as the protocol runner's")
    return get()


def adaptation_unit(unit: Unit) -> Unit:
    """The unit whose images a method adapts on (its statistics, its optimizer steps).

    The protocol runner's units may adapt on a subset of what they score (config
    `eval.adapt_on`, e.g. the first plate of a source): they expose it as
    ``unit.adaptation()``. Other units adapt on themselves.

    Args:
      unit: the scored unit.

    Returns:
      ``unit.adaptation()`` when the unit has it, else `unit`.
    """
    subset = getattr(unit, "adaptation", None)
    return subset() if callable(subset) else unit


def count_event(unit: Unit, name: str) -> None:
    """Counts one event (e.g. a configured fallback) on a unit that keeps counters.

    Units built by the protocol runner (`jaxadapt.eval.units.PipelineUnit`) have an
    ``events`` counter that the runner turns into result metrics; other units ignore it.

    Args:
      unit: the target unit.
      name: the counter, one of the method's `Method.counts`.
    """
    events = getattr(unit, "events", None)
    if events is not None:
        events[name] += 1


def collect_controls(fn: Callable[[jax.Array], jax.Array], unit: Unit) -> np.ndarray:
    """`fn` over every control image of a unit (`unit.all_controls()`), concatenated.

    Args:
      fn: image batch -> [B, D] array.
      unit: the target unit.

    Returns:
      [m, D]; [0, 0] when the unit has no controls.
    """
    out = [np.asarray(fn(c)) for c in unit.all_controls() if len(c)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def collect_logits(predict: Callable[[jax.Array], jax.Array], unit: Unit) -> np.ndarray:
    """Runs `predict` over a unit's batches and keeps the rows that are not padding.

    Args:
      predict: image batch -> logits batch.
      unit: the target unit.

    Returns:
      float32 [n, K] logits of the unit's real samples, in batch order.
    """
    out = [np.asarray(predict(b.image))[np.asarray(b.mask)] for b in unit.batches()]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
