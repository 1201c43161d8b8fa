"""Frozen embeddings -> TVN -> linear head: the foundation-embedding baseline (method `tvn`).

The CS-ARM-BN paper's study 1 compares the BatchNorm family with "foundation model
embeddings + TVN + linear head". Here the embeddings come from a frozen extractor
(`tvn.extractor`: the `erm` ResNet's pooled penultimate features, the `dino` ViT's CLS
token, or a user's array, one row per site of the table), and every *unit* (a group of
sites sharing negative controls: a training plate when fitting, the scored unit at test
time) is transformed with its own controls, as EFAAR transforms each batch:

1. align (``tvn.per_unit``, EFAAR's ``centerscale_on_controls`` by batch): standardize
   the unit's rows with the mean and std (ddof 0) of its control rows; a feature
   constant among them is centred only;
2. TVN (`jaxadapt.methods.tvn.tvn.fit_tvn`): the PCA whitening of the controls, fitted once
   on the aligned controls of every training plate pooled, applied to every unit;
3. optional per-unit CORAL (``tvn.coral``): the unit's rows times
   (cov_ddof1(its transformed controls) + lam I)^(-1/2);
4. a multinomial logistic-regression head, trained (full batch, deterministic) on the
   transformed labelled training rows.

After steps 1-2 a unit's controls have zero mean; their covariance is I when the unit's
controls vary like the training controls (exactly I for the pooled training controls).
Everything after the extractor is float64 NumPy except the head's optimizer.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadapt.methods.base import (Method, Unit, UnitEmbeddings, Variables, adaptation_unit,
                                   collect_controls, collect_logits, unlabelled_images)
from jaxadapt.methods.tvn.tvn import TVNState, apply_tvn, fit_tvn, inverse_sqrt


#: Where the embeddings come from: a recipe's frozen model, or a user's array.
EXTRACTORS = ("erm", "dino", "file")


class TVNHead(NamedTuple):
    """Everything after the extractor: the TVN map and the linear head.

    Attributes:
      tvn: the fitted `TVNState` (K output dimensions).
      weights: float32 [K, C] head weights.
      bias: float32 [C] head bias.
    """

    tvn: TVNState
    weights: np.ndarray
    bias: np.ndarray


class TransformConfig(NamedTuple):
    """How a unit is transformed (config section `tvn`).

    Attributes:
      per_unit: step 1, align each unit on its own controls.
      coral: step 3, per-unit CORAL.
      coral_lam: CORAL's ridge lam (> 0).
    """

    per_unit: bool = True
    coral: bool = False
    coral_lam: float = 0.5


def _check_controls(controls: np.ndarray, unit: str, need: int = 2) -> None:
    if len(controls) < need:
        raise ValueError(f"unit {unit!r} has {len(controls)} negative-control rows; TVN "
                         f"aligns every unit on its own controls and needs >= {need}: score "
                         "units with DMSO wells, or set tvn.per_unit=False and tvn.coral=False")


def standardize_on(x: np.ndarray, controls: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Step 1: rows of `x` standardized with the mean and std (ddof 0) of `controls`.

    Args:
      x: [n, D] rows.
      controls: [m, D] control rows (m >= 1).
      eps: a feature whose controls' std is <= eps is centred, not scaled.

    Returns:
      float64 [n, D].
    """
    c = np.asarray(controls, np.float64)
    std = c.std(axis=0)
    return (np.asarray(x, np.float64) - c.mean(axis=0)) / np.where(std > eps, std, 1.0)


def transform_unit(state: TVNState, x: np.ndarray, controls: np.ndarray,
                   cfg: TransformConfig, unit: str = "unit") -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 for one unit: align on its controls, TVN, optional CORAL.

    Args:
      state: the TVN fitted on the training controls (`fit_head_pipeline`).
      x: [n, D] embeddings of the unit's samples.
      controls: [m, D] embeddings of the unit's controls (the statistics' source).
      cfg: the transform settings.
      unit: the unit's name, for errors.

    Returns:
      (float64 [n, K] transformed samples, float64 [m, K] transformed controls).

    Raises:
      ValueError: fewer than 2 controls when a step needs them.
    """
    if cfg.per_unit or cfg.coral:
        _check_controls(controls, unit)
    if cfg.per_unit:
        x, controls = standardize_on(x, controls), standardize_on(controls, controls)
    y, yc = apply_tvn(state, x), apply_tvn(state, controls)
    if cfg.coral:
        m = inverse_sqrt(np.atleast_2d(np.cov(yc, rowvar=False, ddof=1)), cfg.coral_lam)
        y, yc = y @ m, yc @ m
    return y, yc


def fit_linear_head(x: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int,
                    learning_rate: float, weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch Adam from zeros (deterministic).

    Minimizes mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not decayed).

    Args:
      x: [n, K] features.
      labels: [n] ints in [0, num_classes).
      num_classes: C.
      steps: Adam steps (>= 1).
      learning_rate: Adam's step size.
      weight_decay: L2 strength (>= 0).

    Returns:
      (float32 weights [K, C], float32 bias [C]).

    Raises:
      ValueError: no rows, or labels outside [0, C).
    """
    labels = np.asarray(labels)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"the linear head needs labelled rows with classes in [0, {num_classes});"
                         f" got {len(labels)} rows" + (f" spanning [{labels.min()}, "
                                                       f"{labels.max()}]" if len(labels) else ""))
    tx = optax.adam(learning_rate)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32)

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(xs @ p["w"] + p["b"], ys).mean()
        return ce + 0.5 * weight_decay * jnp.sum(jnp.square(p["w"]))

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            # optax's bias correction (float ** int32 step) needs standard promotion,
            # also when a caller (our tests) turns on strict mode.
            with jax.numpy_dtype_promotion("standard"):
                updates, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return p

    p = jax.device_get(run(params))
    return np.asarray(p["w"], np.float32), np.asarray(p["b"], np.float32)


def fit_head_pipeline(embeddings: np.ndarray, is_control: np.ndarray, units: np.ndarray,
                      labels: np.ndarray, cfg: TransformConfig, *, num_classes: int,
                      head: Mapping[str, Any], min_variance: float = 1e-6) -> TVNHead:
    """Fits steps 2 and 4 on the training rows (step 1 and 3 use each unit's controls).

    Args:
      embeddings: [N, D] training embeddings (perturbed and control rows).
      is_control: [N] bools.
      units: [N] unit (plate) of each row.
      labels: [N] class of each row; < 0 for unlabelled rows (controls), not fitted.
      cfg: the transform settings.
      num_classes: C.
      head: {"steps", "learning_rate", "weight_decay"} of `fit_linear_head`.
      min_variance: as in `fit_tvn`.

    Returns:
      The TVNHead.
    """
    x, ctrl = np.asarray(embeddings, np.float64), np.asarray(is_control, bool)
    units = np.asarray(units)
    names = np.unique(units)
    z = x.copy()
    if cfg.per_unit:
        for u in names:
            rows = units == u
            _check_controls(x[rows & ctrl], str(u))
            z[rows] = standardize_on(x[rows], x[rows & ctrl])
    state = fit_tvn(z, ctrl, min_variance=min_variance)
    y = np.empty((len(x), state.out_dim))
    for u in names:
        rows = units == u
        y[rows], _ = transform_unit(state, x[rows], x[rows & ctrl], cfg, str(u))
    keep = np.asarray(labels) >= 0
    w, b = fit_linear_head(y[keep], np.asarray(labels)[keep], num_classes, **dict(head))
    return TVNHead(state, w, b)


def head_from_variables(variables: Variables) -> TVNHead:
    """The TVNHead stored in a `tvn` recipe's variables ({"tvn": {...}, "head": {...}})."""
    if "tvn" not in variables or "head" not in variables:
        raise ValueError(f"method 'tvn' needs variables from the 'tvn' trainer (keys 'tvn', "
                         f"'head'); got {sorted(variables)}")
    t, h = variables["tvn"], variables["head"]
    state = TVNState(*(np.asarray(t[k], np.float64) for k in TVNState._fields))
    return TVNHead(state, np.asarray(h["weights"]), np.asarray(h["bias"]))


def head_variables(head: TVNHead) -> dict[str, dict[str, np.ndarray]]:
    """The pytree a `tvn` recipe returns and checkpoints (inverse of `head_from_variables`)."""
    return {"tvn": dict(head.tvn._asdict()),
            "head": {"weights": head.weights, "bias": head.bias}}


def make_embedder(model: nn.Module, extractor: str) -> Callable[[Variables, Any], jax.Array]:
    """A jitted `(extractor variables, images) -> [B, D]` frozen embedding.

    Args:
      model: the study's architecture (`build_model(cfg.model)`).
      extractor: "erm" (pooled penultimate features, running BN statistics) or "dino"
        (the ViT's CLS token; variables of the `dino` recipe).

    Returns:
      The jitted function.
    """
    if extractor == "erm":
        return jax.jit(lambda v, x: model.apply(v, x, norm_mode="running")[1])
    if extractor == "dino":
        return jax.jit(lambda v, x: model.apply({"params": v["params"]["backbone"]}, x)["cls"])
    raise ValueError(f"tvn.extractor={extractor!r} has no model embedder; use one of {EXTRACTORS}")


@functools.lru_cache(maxsize=4)
def load_embedding_file(path: str, n_rows: int) -> np.ndarray:
    """The user's embedding array: a .npy of shape [n_rows, D], one row per table row.

    Args:
      path: `tvn.embeddings_file`.
      n_rows: the number of sites (rows) of the study's table.

    Returns:
      The array, memory-mapped.

    Raises:
      ValueError: missing file, wrong shape, or not a real number array.
    """
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ValueError(f"tvn.embeddings_file={path!r} cannot be read as a .npy array "
                         f"({err}); save one row per site with numpy.save") from err
    if arr.ndim != 2 or arr.shape[0] != n_rows or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"tvn.embeddings_file={path!r} holds a {arr.dtype} array of shape "
                         f"{arr.shape}; need a real [{n_rows}, D] array: one row per site of "
                         "the table, in table order")
    return arr


def _file_rows(unit: Unit) -> tuple[np.ndarray, np.ndarray, int]:
    images = unlabelled_images(unit)
    ctrl = np.asarray(images.table["is_control"], bool)[images.rows]
    return images.rows[~ctrl], images.rows[ctrl], len(images.table)


def tvn(model: nn.Module, cfg: Any, setting: Mapping[str, Any] | None = None) -> Method:
    """Method `tvn`: frozen embeddings, each unit transformed with its controls, linear head.

    Statistics come from the unit's adaptation subset (`adaptation_unit`); every scored
    sample is transformed with them. `embed_unit` returns the transformed (TVN'd)
    embeddings, on which the runner scores retrieval.

    Args:
      model: the study's architecture (used by the "erm" and "dino" extractors).
      cfg: reads `cfg.tvn` (extractor, embeddings_file, per_unit, coral, coral_lam).
      setting: unused.

    Returns:
      The Method (trainer "tvn").
    """
    t = cfg.tvn
    tcfg = TransformConfig(bool(t.per_unit), bool(t.coral), float(t.coral_lam))
    embed = None if t.extractor == "file" else make_embedder(model, t.extractor)

    def raw(variables: Variables, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        if embed is None:
            samples, controls, n = _file_rows(unit)
            arr = load_embedding_file(t.embeddings_file, n)
            return np.asarray(arr[samples], np.float64), np.asarray(arr[controls], np.float64)
        fn = functools.partial(embed, variables["extractor"])
        samples, controls = collect_logits(fn, unit), collect_controls(fn, unit)
        if not len(controls):  # [0, 0] from a unit without controls
            controls = np.zeros((0, samples.shape[1]), samples.dtype)
        return samples, controls

    def embed_unit(variables: Variables, unit: Unit) -> UnitEmbeddings:
        head = head_from_variables(variables)
        stats_unit = adaptation_unit(unit)
        samples, controls = raw(variables, unit)
        stats_controls = controls if stats_unit is unit else raw(variables, stats_unit)[1]
        y, _ = transform_unit(head.tvn, np.concatenate([samples, controls]), stats_controls,
                              tcfg, unit.name)
        return UnitEmbeddings(y[:len(samples)], y[len(samples):])

    def predict_unit(variables: Variables, unit: Unit) -> np.ndarray:
        head = head_from_variables(variables)
        y = embed_unit(variables, unit).samples
        return (y @ head.weights.astype(np.float64) + head.bias).astype(np.float32)

    # Whole-unit statistics: the test batch size cannot change a prediction.
    return Method(name="tvn", trainer="tvn", predict_unit=predict_unit, ignores=("L",),
                  adapts_on_subset=True, embed_unit=embed_unit)
