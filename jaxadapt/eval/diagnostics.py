"""How far a test context's class mix moves BatchNorm statistics, against batch effects.

CS-ARM-BN's claim under label shift rests on one quantity: the bias that a skewed class
mix puts into a context's BN statistics, after pooling with N controls, must be small
next to the plate-to-plate shift that adaptation exists to remove. If it is as large,
normalizing with the skewed context is as wrong as not adapting at all. This module
measures both shifts on a trained model, layer by layer, so a study's label-shift result
can be explained rather than only reported (`experiments/diagnose_label_shift.py`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from jaxadapt.data import sampling as samplers, schema
from jaxadapt.methods.bn import stats as bn


Images = Callable[[np.ndarray], Any]  # table rows [n] -> images [n, H, W, C]


def flat_stats(norm_stats: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Returns ``{"a/b/layer": {"mean": [C], "var": [C]}}`` from a nested norm_stats pytree."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, value in traverse_util.flatten_dict(dict(norm_stats)).items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = np.asarray(value, np.float64)
    return out


def stats_shift(a: Mapping[str, Any], b: Mapping[str, Any], eps: float = 1e-5) -> dict[str, float]:
    """Standardized shift of BN means from statistics `b` to statistics `a`, per layer.

    ``sqrt(mean_c((mean_a[c] - mean_b[c])^2 / (var_b[c] + eps)))``: the root mean square
    over channels of the mean difference in units of `b`'s standard deviation.

    Args:
      a: norm_stats (nested, as from `bn.context_stats`).
      b: norm_stats of the same model (the reference).
      eps: added to the variance (a constant channel has variance 0).

    Returns:
      layer path ("stage1_block1/bn1") -> shift.

    Raises:
      ValueError: if the two cover different layers.
    """
    fa, fb = flat_stats(a), flat_stats(b)
    if set(fa) != set(fb):
        raise ValueError(f"stats_shift: the statistics cover different layers "
                         f"({sorted(set(fa) ^ set(fb))[:3]}...); compare statistics of one model")
    return {k: float(np.sqrt(np.mean((fa[k]["mean"] - fb[k]["mean"]) ** 2 / (fb[k]["var"] + eps))))
            for k in sorted(fa)}


def by_stage(shift: Mapping[str, float]) -> dict[str, float]:
    """Averages per-layer shifts over layers of one stage (the path's first word: stem, stage1...)."""
    groups: dict[str, list[float]] = {}
    for path, value in shift.items():
        groups.setdefault(path.split("/")[0].split("_")[0], []).append(value)
    return {g: float(np.mean(v)) for g, v in sorted(groups.items())}


def _labelled(table: schema.SiteTable, rows: np.ndarray) -> np.ndarray:
    return rows[table["label"][rows] != schema.NO_LABEL]


def label_shift_bias(stats_of: Callable[[np.ndarray], Mapping[str, Any]], table: schema.SiteTable,
                     train_rows: np.ndarray, test_rows: np.ndarray, *, n_perturbed: int,
                     n_controls: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Stage-averaged BN-statistic shifts caused by batch effects and by a one-class context.

    Every context is `n_perturbed` perturbed + `n_controls` control images of one plate, as
    a CS-ARM-BN test chunk. Three shifts (see `stats_shift`), averaged per stage:

    - ``plate_to_plate``: between balanced contexts of two training plates (mean over
      pairs): the technical shift meta-training taught the model to remove.
    - ``new_plate``: a balanced context of a test plate against those of the training
      plates (mean over pairs): the shift adaptation must remove at test time.
    - ``one_class``: a context whose perturbed images all come from one class against a
      balanced context of the same plate with the same controls (mean over classes and
      test plates): the bias label shift puts into the statistics.
    - ``noise_floor``: a second balanced context of the same plate (a fresh draw of
      perturbed images, the same controls) against the first: the shift that sampling
      alone causes, below which no other number can be read.

    Args:
      stats_of: rows [n] -> norm_stats of a context of those rows (e.g. `bn.context_stats`
        of a trained model on the rows' images).
      table: the study's SiteTable.
      train_rows: rows of the training split (perturbed and controls).
      test_rows: rows of the test split.
      n_perturbed: perturbed images per context (the test chunk size L).
      n_controls: control images per context (N >= 0).
      seed: seed of the image draws.

    Returns:
      ``{"plate_to_plate" | "new_plate" | "one_class" | "noise_floor": {stage: shift}}``.

    Raises:
      ValueError: if a plate lacks controls while n_controls > 0, fewer than two training
        plates or no test plate hold labelled perturbed images.
    """
    rng = np.random.default_rng(seed)
    train = _plate_contexts(table, train_rows, n_controls)
    if len(train) < 2:
        raise ValueError(f"label_shift_bias needs >= 2 training plates with labelled perturbed "
                         f"images, got {len(train)}")
    test = _plate_contexts(table, test_rows, n_controls)
    if not test:
        raise ValueError("label_shift_bias: no test plate has labelled perturbed images")

    def draw(pool, k):
        return samplers.draw_rows(rng, pool, k)

    train_stats = [stats_of(np.concatenate([draw(p, n_perturbed), draw(c, n_controls)]))
                   for p, c in train.values()]
    plate_pairs = [stats_shift(a, b) for i, a in enumerate(train_stats) for b in train_stats[i + 1:]]
    new_plate, one_class, floor = [], [], []
    for pert, ctrl in test.values():
        ctrl = draw(ctrl, n_controls)  # the same controls in the balanced and one-class contexts
        balanced = stats_of(np.concatenate([draw(pert, n_perturbed), ctrl]))
        again = stats_of(np.concatenate([draw(pert, n_perturbed), ctrl]))
        floor.append(stats_shift(again, balanced))
        new_plate += [stats_shift(balanced, s) for s in train_stats]
        labels = table["label"][pert]
        for label in np.unique(labels):
            one = draw(pert[labels == label], n_perturbed)
            one_class.append(stats_shift(stats_of(np.concatenate([one, ctrl])), balanced))
    return {"plate_to_plate": _mean_by_stage(plate_pairs), "new_plate": _mean_by_stage(new_plate),
            "one_class": _mean_by_stage(one_class), "noise_floor": _mean_by_stage(floor)}


def _plate_contexts(table: schema.SiteTable, rows, n_controls: int) -> dict[str, tuple]:
    """plate -> (labelled perturbed rows, control rows), for plates with labelled perturbed rows."""
    rows = np.asarray(rows)
    pert = samplers.group_rows(table, rows, "plate", False)
    ctrl = samplers.group_rows(table, rows, "plate", True)
    out = {}
    for plate, r in pert.items():
        r = _labelled(table, r)
        if len(r) == 0:
            continue  # a plate without labelled perturbed images has no class mix to skew
        if n_controls and plate not in ctrl:
            raise ValueError(f"plate {plate!r} has no control wells; label_shift_bias needs "
                             "controls when n_controls > 0 (or pass n_controls=0)")
        out[plate] = (r, ctrl.get(plate, rows[:0]))
    return out


def _mean_by_stage(shifts: list[dict[str, float]]) -> dict[str, float]:
    """Per-layer mean over several `stats_shift` results, then averaged per stage."""
    return by_stage({k: float(np.mean([s[k] for s in shifts])) for k in shifts[0]})


def context_stats_fn(model, variables, images_of: Images) -> Callable[[np.ndarray], Mapping[str, Any]]:
    """rows -> `bn.context_stats` of the model on those rows' images (for `label_shift_bias`)."""
    return lambda rows: bn.context_stats(model, variables, images_of(rows))
