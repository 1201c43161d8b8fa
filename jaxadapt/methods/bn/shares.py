"""Control shares of CS-ARM-BN contexts: the trained episode shape, checks, weighted plates.

A CS-ARM-BN model is meta-trained on episodes of L perturbed images + N DMSO controls of
one plate; every BN layer learns to expect statistics pooled with the **control share**

    share = N / (L + N).

A test context (a chunk of L perturbed images + N fresh controls) must have the share
of the training episodes: with another share the pooled statistics sit elsewhere than
the network learned, and accuracy drops (7-9 points measured on this simulator). Here L
is a test chunk's *capacity* (the protocol's batch size): a padded last chunk, or a
label-shift batch short of a class, keeps the share of its full chunk, as in the
reference's test loop. Equal shares with another L (16 + 16 against 32 + 32) are
accepted: the share, not the count, sets where the statistics sit. A sweep over L at a
fixed N (the context-size study) changes the share on purpose and must say so
(``config.adapt.allow_share_mismatch``); its result rows then carry ``share_mismatch``.

The training shape travels with the weights: the episodic trainer returns variables
with an ``"episode"`` collection ``{"n_perturbed": L, "n_controls": N}`` (int32
scalars; models ignore the collection), and writes it to ``episode.json`` beside the
checkpoint. Whole-plate statistics (`plate_unit_stats`) pool every perturbed image
and every control of a unit with per-row weights that give the controls the training
share at every BN layer.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import numpy as np

from jaxadapt.methods.base import Unit, Variables, adaptation_unit, count_event
from jaxadapt.methods.bn.plate_stats import plate_stats
from jaxadapt.methods.bn.stats import Chunk


log = logging.getLogger(__name__)

#: The variables collection holding the training episode shape.
EPISODE = "episode"


class EpisodeShape(NamedTuple):
    """The episodes a (CS-)ARM-BN model was meta-trained on: L perturbed + N controls."""

    n_perturbed: int
    n_controls: int

    @property
    def share(self) -> float:
        """The control share N / (L + N)."""
        return self.n_controls / (self.n_perturbed + self.n_controls)

    def same_share(self, n_perturbed: int, n_controls: int) -> bool:
        """Whether a context of ``n_perturbed + n_controls`` has this share (exact)."""
        return (int(n_controls) * (self.n_perturbed + self.n_controls)
                == self.n_controls * (int(n_perturbed) + int(n_controls)))

    def text(self) -> str:
        return f"{self.n_perturbed}+{self.n_controls}"


def with_episode_shape(variables: Variables, n_perturbed: int, n_controls: int) -> Variables:
    """A copy of ``variables`` that records its training episode shape (L, N).

    Args:
      variables: ``{"params", "batch_stats", ...}``.
      n_perturbed: L perturbed images per training episode (>= 1).
      n_controls: N controls per training episode (0 for ARM-BN).

    Returns:
      The variables plus ``{"episode": {"n_perturbed", "n_controls"}}`` (int32 scalars).
    """
    if int(n_perturbed) < 1 or int(n_controls) < 0:
        raise ValueError(f"episode shape n_perturbed={n_perturbed}, n_controls={n_controls}: "
                         "use n_perturbed >= 1 and n_controls >= 0")
    record = {"n_perturbed": np.asarray(n_perturbed, np.int32),
              "n_controls": np.asarray(n_controls, np.int32)}
    return {**variables, EPISODE: record}


def episode_shape(variables: Variables, *, method: str) -> EpisodeShape:
    """The training episode shape recorded in ``variables``.

    Args:
      variables: trained variables.
      method: the method asking, for the error message.

    Returns:
      The EpisodeShape.

    Raises:
      ValueError: no record; without it no share can be checked.
    """
    record = variables.get(EPISODE) if isinstance(variables, Mapping) else None
    if record is None:
        raise ValueError(
            f"{method}: the variables carry no '{EPISODE}' record of the (L, N) episodes the "
            "model was meta-trained on, so the control share of its test contexts cannot be "
            "checked; use the variables the arm_bn / cs_arm_bn trainer returns, or attach the "
            "shape with jaxadapt.methods.bn.shares.with_episode_shape(variables, L, N)")
    return EpisodeShape(int(np.asarray(record["n_perturbed"])),
                        int(np.asarray(record["n_controls"])))


def check_share(trained: EpisodeShape, n_perturbed: int, n_controls: int, *, allow: bool,
                method: str) -> dict[str, str]:
    """Checks a test context's control share against training.

    Args:
      trained: the model's training episode shape.
      n_perturbed: L of the test context (chunk capacity).
      n_controls: N controls appended to each test chunk.
      allow: ``config.adapt.allow_share_mismatch``: score a mismatch on purpose.
      method: the method's name, for the message.

    Returns:
      ``{}`` when the shares are equal; with ``allow`` and unequal shares,
      ``{"share_mismatch": "context L+N, trained L'+N'"}`` for the results row's setting.

    Raises:
      ValueError: unequal shares without ``allow``, naming both and the keys that fix it.
    """
    if trained.same_share(n_perturbed, n_controls):
        return {}
    test = EpisodeShape(int(n_perturbed), int(n_controls))
    if allow:
        return {"share_mismatch": f"context {test.text()}, trained {trained.text()}"}
    raise ValueError(
        f"{method}: test contexts of L={test.n_perturbed} perturbed + N={test.n_controls} "
        f"controls have control share {test.share:.3f}, but the model was meta-trained on "
        f"episodes of {trained.n_perturbed} + {trained.n_controls} (share {trained.share:.3f}): "
        "its BN statistics would sit where it never learned them. Make the shares equal: at "
        "test config.eval.batch_size (or the sweep's L) and config.adapt.n_controls (or the "
        "sweep's N), in training config.arm.n_perturbed and config.arm.n_controls; or set "
        "config.adapt.allow_share_mismatch=True to score the mismatch on purpose (the result "
        "rows then carry share_mismatch in their setting)")


def share_weights(n_perturbed: int, n_controls: int, trained: EpisodeShape
                  ) -> tuple[float, float]:
    """Per-row weights that give controls the training share of a pooled context.

    With n_p perturbed rows of weight w_p and n_c controls of weight w_c, controls carry
    ``n_c w_c / (n_p w_p + n_c w_c) = N / (L + N)`` of the total weight; the weights are
    scaled so that they sum to ``n_p + n_c`` (the count of a plain union).

    Args:
      n_perturbed: n_p real perturbed rows (>= 1).
      n_controls: n_c control rows (>= 1 unless the trained N is 0).
      trained: the training (L, N).

    Returns:
      ``(w_p, w_c)``.
    """
    total = n_perturbed + n_controls
    if trained.n_controls == 0:
        return total / n_perturbed, 0.0
    w_p = total * trained.n_perturbed / (trained.n_perturbed + trained.n_controls) / n_perturbed
    w_c = total * trained.n_controls / (trained.n_perturbed + trained.n_controls) / n_controls
    return w_p, w_c


def share_weighted_context(unit: Unit, trained: EpisodeShape, *, on_missing_controls: str,
                           method: str) -> list[Chunk]:
    """A unit's whole context (all perturbed images and controls) as weighted chunks.

    Args:
      unit: the target unit.
      trained: the training (L, N); N = 0: perturbed images only.
      on_missing_controls: "raise", or "perturbed_only" (a unit without controls is then
        normalized with its perturbed images, logged and counted as
        ``units_without_controls``).
      method: the method's name, for messages.

    Returns:
      ``(images, float weights)`` chunks for `plate_stats`; padding rows weigh 0.
    """
    pert = [(np.asarray(b.image), np.asarray(b.mask, bool)) for b in unit.batches()]
    ctrl = [np.asarray(c) for c in unit.all_controls() if len(c)] if trained.n_controls else []
    n_p, n_c = sum(int(m.sum()) for _, m in pert), sum(len(c) for c in ctrl)
    if n_p == 0:
        raise ValueError(f"{method}: unit {unit.name!r} has no perturbed image to score")
    if trained.n_controls and n_c == 0:
        trained = EpisodeShape(trained.n_perturbed,
                               missing_controls(unit, on_missing_controls, method=method))
    w_p, w_c = share_weights(n_p, n_c, trained)
    chunks = [(im, np.where(m, w_p, 0.0).astype(np.float32)) for im, m in pert]
    if w_c > 0:
        chunks += [(c, np.full(len(c), w_c, np.float32)) for c in ctrl]
    return chunks


def plate_unit_stats(model: nn.Module, variables: Variables, unit: Unit, *,
                     chunk_size: int | None, on_missing_controls: str = "raise",
                     method: str = "cs_arm_bn_plate"):
    """Whole-unit CS-ARM-BN statistics: all images and controls at the training share.

    Every BN layer normalizes with the weighted statistics of the unit's perturbed images
    (total weight L/(L+N)) and controls (N/(L+N)), L and N from the model's episode
    record; layer l's statistics are those of its input under the weighted statistics
    of the layers before it (`plate_stats` finalizes them level by level).

    Args:
      model: the architecture.
      variables: trained variables with an episode record.
      unit: the target unit (statistics from `adaptation_unit(unit)`, scores of all).
      chunk_size: rows per `plate_stats` pass (None: the unit's batch size).
      on_missing_controls: see `share_weighted_context`.
      method: the method's name, for messages.

    Returns:
      The exact statistics of every BN layer (`plate_stats`).
    """
    trained = episode_shape(variables, method=method)
    # Statistics of the adaptation subset (the unit itself unless the runner sets one).
    context = share_weighted_context(adaptation_unit(unit), trained,
                                     on_missing_controls=on_missing_controls, method=method)
    return plate_stats(model, variables, context, chunk_size=chunk_size)


def known_control_count(unit: Unit) -> int | None:
    """How many controls a unit has, when it tells (`n_controls` or its spec); else None."""
    count = getattr(unit, "n_controls", None)
    if count is not None:
        return int(count)
    rows = getattr(getattr(unit, "spec", None), "control_rows", None)
    return None if rows is None else len(rows)


def check_control_modes(on_missing_controls: str, on_short_controls: str) -> None:
    """Raise ValueError for an unknown config.adapt.on_missing_controls / on_short_controls."""
    if on_missing_controls not in ("raise", "perturbed_only"):
        raise ValueError(f"config.adapt.on_missing_controls={on_missing_controls!r}; use "
                         "'raise' or 'perturbed_only'")
    if on_short_controls not in ("raise", "resample"):
        raise ValueError(f"config.adapt.on_short_controls={on_short_controls!r}; use "
                         "'raise' or 'resample'")


def short_of_controls(unit: Unit, have: int, n: int, mode: str) -> None:
    """Handle a unit with fewer controls than N: raise, or resample (logged, counted)."""
    if mode != "resample":
        raise ValueError(
            f"cs_arm_bn: unit {unit.name!r} has {have} negative-control images, fewer than "
            f"the N={n} each test chunk needs; lower config.adapt.n_controls (or the sweep's "
            f"N) to at most {have}, evaluate units with more DMSO wells, or set "
            "config.adapt.on_short_controls='resample' to draw them with replacement "
            "(counted in the results as units_short_of_controls)")
    log.warning("cs_arm_bn: unit %r has %d controls for N=%d per chunk; drawing with "
                "replacement as config.adapt.on_short_controls='resample' asks", unit.name,
                have, n)
    count_event(unit, "units_short_of_controls")


def missing_controls(unit: Unit, mode: str, err: Exception | None = None, *,
                     method: str = "cs_arm_bn") -> int:
    """Handle a unit without controls: raise, or warn, count and return N = 0."""
    if mode != "perturbed_only":
        raise ValueError(
            f"{method}: unit {unit.name!r} has no negative-control images to add to its "
            "context; evaluate units with DMSO wells, or set "
            "config.adapt.on_missing_controls='perturbed_only' to fall back to perturbed-only "
            "(ARM-BN) statistics on such units (counted as units_without_controls)") from err
    log.warning("%s: unit %r has no controls; using perturbed-only (ARM-BN) statistics as "
                "config.adapt.on_missing_controls='perturbed_only' asks", method, unit.name)
    count_event(unit, "units_without_controls")
    return 0


def adapt_field(cfg: Any, field: str, default: Any) -> Any:
    """``cfg.adapt.<field>``, or ``default`` when the config or the field is absent."""
    sub = cfg.get("adapt", None) if hasattr(cfg, "get") else getattr(cfg, "adapt", None)
    if sub is None:
        return default
    return sub.get(field, default) if hasattr(sub, "get") else getattr(sub, field, default)
