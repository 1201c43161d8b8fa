"""ARM-BN and CS-ARM-BN: episodic meta-learning of BatchNorm context, and its predictors.

Training (Zhang et al. 2021; Sanchez-Fernandez et al. 2026): each episode, one plate's
context of L perturbed images (+ N DMSO controls for CS-ARM-BN), is normalized with its
own statistics and scored on its perturbed images (`episode_forward`, `episode_loss`,
`make_episodic_train_step`, `make_episodic_eval_step`; the trainer that drives them is
`jaxadapt.methods.bn.episodic`).

Test time: no weight changes. ARM-BN normalizes each test chunk of L
perturbed images with its own statistics; CS-ARM-BN appends N fresh random controls of the
same unit to each chunk, forwards the L + N together and scores the L perturbed images.
The control share N / (L + N) of a test context must equal the training episodes' (see
`jaxadapt.methods.bn.shares`): the trained variables record their episode shape, and a
prediction with another share is a ValueError unless the config allows it explicitly.

Running BN averages are not used by these predictions.
"""

from __future__ import annotations

import functools
import logging
import zlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadapt.methods.base import Method, Unit, Variables
from jaxadapt.methods.bn import adabn, ben, shares


__all__ = [
    "DEFAULT_N_CONTROLS", "arm_bn", "chunk_seed", "context_predictor", "cs_arm_bn",
    "cs_arm_bn_plate", "cs_arm_bn_predict_unit", "episode_forward", "episode_loss",
    "make_episodic_eval_step", "make_episodic_train_step",
]

log = logging.getLogger(__name__)

#: Paper defaults (CS-ARM-BN): 128 controls per test chunk.
DEFAULT_N_CONTROLS = 128


def context_predictor(model: nn.Module) -> Callable[[Variables, jax.Array, jax.Array], jax.Array]:
    """A jitted ``(variables, images [B, ...], stats_mask [B]) -> logits [B, K]``.

    Every BN layer normalizes with the statistics of the ``stats_mask`` rows (gradient
    free, running averages untouched). Compiled once per shape.
    """

    @jax.jit
    def predict(variables: Variables, images: jax.Array, stats_mask: jax.Array) -> jax.Array:
        logits, _ = model.apply({"params": variables["params"],
                                 "batch_stats": variables["batch_stats"]},
                                images, norm_mode="batch", stats_mask=stats_mask)
        return logits

    return predict


def chunk_seed(base: int, unit_name: str, chunk: int) -> int:
    """Seed of the controls drawn for chunk ``chunk`` of unit ``unit_name``.

    A hash of (base, unit name, chunk index), so the controls a chunk gets do not depend
    on the order in which units or chunks are evaluated.
    """
    words = [int(base) & 0xFFFFFFFF, zlib.crc32(unit_name.encode()), int(chunk)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0])


def _adapt_cfg(cfg: Any) -> Mapping[str, Any]:
    sub = cfg.get("adapt") if cfg is not None else None
    return {} if sub is None else sub


def cs_arm_bn_predict_unit(predict: Callable, variables: Variables, unit: Unit, *,
                           n_controls: int, seed: int = 0,
                           on_missing_controls: str = "raise",
                           on_short_controls: str = "raise",
                           allow_share_mismatch: bool = False,
                           method: str = "cs_arm_bn") -> np.ndarray:
    """CS-ARM-BN prediction on one unit (ARM-BN when ``n_controls == 0``).

    Args:
      predict: from `context_predictor`.
      variables: trained variables with their episode record (`shares.episode_shape`).
      unit: the target unit; each of its batches is one chunk of L perturbed images.
      n_controls: N fresh controls appended to every chunk (drawn with
        ``unit.controls(N, chunk_seed(seed, unit.name, k))``); 0: chunk statistics only.
      seed: base of the control seeds.
      on_missing_controls: "raise" (default): a unit without controls is a ValueError;
        "perturbed_only": fall back to the chunk's own statistics, with a warning, counted
        as ``units_without_controls``.
      on_short_controls: "raise" (default): a unit with fewer than N controls is a
        ValueError naming it and both counts; "resample": draw N with replacement, with a
        warning, counted as ``units_short_of_controls``.
      allow_share_mismatch: score chunks whose control share N / (L + N) (L = the chunk's
        capacity) differs from training instead of raising.
      method: the method's name, for messages.

    Returns:
      float32 ``[n, K]`` logits of the unit's real samples in batch order; padding
      rows are neither scored nor part of any statistics.
    """
    shares.check_control_modes(on_missing_controls, on_short_controls)
    n = int(n_controls)
    if n < 0:
        raise ValueError(f"n_controls={n}; use 0 (ARM-BN) or a positive count")
    trained = shares.episode_shape(variables, method=method)
    have = shares.known_control_count(unit)
    if n > 0 and have == 0:
        n = shares.missing_controls(unit, on_missing_controls, None)
    elif n > 0 and have is not None and have < n:
        shares.short_of_controls(unit, have, n, on_short_controls)
    out = []
    for k, batch in enumerate(unit.batches()):
        images, mask = np.asarray(batch.image), np.asarray(batch.mask, bool)
        # Every chunk has the same capacity L; a configured missing-controls fallback
        # (n dropped to 0) is counted, not a share error.
        if k == 0 and (n > 0 or int(n_controls) == 0):
            shares.check_share(trained, len(mask), n, allow=allow_share_mismatch, method=method)
        if n > 0:
            try:
                ctrl = np.asarray(unit.controls(n, chunk_seed(seed, unit.name, k)))
            except ValueError as err:  # a unit that only finds out when asked
                n = shares.missing_controls(unit, on_missing_controls, err)
        if n > 0:
            images = np.concatenate([images, ctrl.astype(images.dtype)])
            stats_mask = np.concatenate([mask, np.ones(len(ctrl), bool)])
        else:
            stats_mask = mask
        logits = np.asarray(predict(variables, images, stats_mask))[: len(mask)]
        out.append(logits[mask])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def arm_bn(model: nn.Module, cfg: Any = None, setting: Mapping[str, Any] | None = None
           ) -> Method:
    """ARM-BN: each test chunk (the unit's batches) normalized with its own statistics.

    Its contexts hold no controls (share 0), as its training episodes do; the variables
    must carry their episode record (`shares.episode_shape`).

    Args:
      model: the architecture.
      cfg: study config (not read; the chunk size is the protocol's batch size).
      setting: swept values (not read).

    Returns:
      The ``arm_bn`` method, trained by the ``arm_bn`` trainer.
    """
    predict = context_predictor(model)

    predict_unit = functools.partial(cs_arm_bn_predict_unit, predict, n_controls=0,
                                     method="arm_bn")
    return Method(name="arm_bn", trainer="arm_bn", predict_unit=predict_unit)


def _test_chunk(cfg: Any, setting: Mapping[str, Any]) -> int | None:
    """The protocol's test chunk L: the setting's L, else config.eval.batch_size."""
    if "L" in setting:
        return int(setting["L"])
    ev = cfg.get("eval") if cfg is not None else None
    return None if ev is None or "batch_size" not in ev else int(ev["batch_size"])


def cs_arm_bn(model: nn.Module, cfg: Any = None, setting: Mapping[str, Any] | None = None
              ) -> Method:
    """CS-ARM-BN: each test chunk + N fresh controls of its unit define the statistics.

    Reads (defaults in brackets):
      ``setting["N"]`` [``cfg.adapt.n_controls``, else 128]: controls per chunk. A swept
        N also sets the training episodes' N (``arm.n_controls``), so each swept share
        gets a model meta-trained with it (N = 0: the ARM-BN recipe and model).
      ``cfg.adapt.control_seed`` [0]: base of the per-chunk control seeds.
      ``cfg.adapt.on_missing_controls`` ["raise"]: or "perturbed_only";
      ``cfg.adapt.on_short_controls`` ["raise"]: or "resample" (see
        `cs_arm_bn_predict_unit`); a configured fallback is counted in the results.
      ``cfg.adapt.allow_share_mismatch`` [False]: score contexts whose control share
        N / (L + N) differs from training (the result rows say so) instead of raising.

    Args:
      model: the architecture.
      cfg: the study config (or None: all defaults).
      setting: swept values, e.g. ``{"L": 16, "N": 128}``; L is the protocol's batch size.

    Returns:
      The ``cs_arm_bn`` method; its ``check`` tests the trained share before scoring.
    """
    adapt = _adapt_cfg(cfg)
    setting = setting or {}
    n_controls = int(setting.get("N", adapt.get("n_controls", DEFAULT_N_CONTROLS)))
    on_missing = adapt.get("on_missing_controls", "raise")
    on_short = adapt.get("on_short_controls", "raise")
    allow = bool(adapt.get("allow_share_mismatch", False))
    shares.check_control_modes(on_missing, on_short)  # now rather than on the first unit
    predict_unit = functools.partial(
        cs_arm_bn_predict_unit, context_predictor(model), n_controls=n_controls,
        seed=int(adapt.get("control_seed", 0)), on_missing_controls=on_missing,
        on_short_controls=on_short, allow_share_mismatch=allow)
    chunk = _test_chunk(cfg, setting)

    def check(variables: Variables) -> Mapping[str, Any]:
        trained = shares.episode_shape(variables, method="cs_arm_bn")
        if chunk is None:
            return {}
        notes = shares.check_share(trained, chunk, n_controls, allow=allow, method="cs_arm_bn")
        if notes:
            log.warning("cs_arm_bn: control share mismatch scored on purpose "
                        "(config.adapt.allow_share_mismatch): %s", notes["share_mismatch"])
        return notes

    trainer, overrides = "cs_arm_bn", ()
    if "N" in setting:
        trainer = "arm_bn" if n_controls == 0 else "cs_arm_bn"
        overrides = (("arm.n_controls", n_controls),)
    counts = (("units_without_controls",) if on_missing == "perturbed_only" else ()) + (
        ("units_short_of_controls",) if on_short == "resample" else ())
    return Method(name="cs_arm_bn", trainer=trainer, predict_unit=predict_unit,
                  setting_keys=("N",), train_overrides=overrides, check=check, counts=counts)


def cs_arm_bn_plate(model: nn.Module, cfg: Any = None,
                    setting: Mapping[str, Any] | None = None) -> Method:
    """CS-ARM-BN with exact whole-plate statistics of every perturbed image and control.

    The unit's statistics are computed once (exact, in chunks) and every image is then
    classified at ERM cost. All perturbed images and all controls enter the pooled
    statistics with per-row weights that give the controls the training share N / (L + N)
    of the total weight at every BN layer (`shares.plate_unit_stats`), whatever the
    plate's number of controls: the whole-plate analogue of a training episode.

    Args:
      model: the architecture trained by the ``cs_arm_bn`` recipe.
      cfg: reads ``cfg.adapt.plate_chunk_size`` and ``cfg.adapt.on_missing_controls``.
      setting: unused.

    Returns:
      The ``cs_arm_bn_plate`` method (its ``check`` requires the episode record).
    """
    on_missing = shares.adapt_field(cfg, "on_missing_controls", "raise")
    shares.check_control_modes(on_missing, "raise")
    unit_stats = functools.partial(
        shares.plate_unit_stats, model, chunk_size=shares.adapt_field(cfg, "plate_chunk_size", None),
        on_missing_controls=on_missing)

    predict_unit, embed_unit = adabn.whole_unit_functions(model, unit_stats)

    def check(variables: Variables) -> Mapping[str, Any]:
        shares.episode_shape(variables, method="cs_arm_bn_plate")
        return {}

    counts = ("units_without_controls",) if on_missing == "perturbed_only" else ()
    # Whole-unit statistics: the test batch size cannot change a prediction.
    return Method(name="cs_arm_bn_plate", trainer="cs_arm_bn", predict_unit=predict_unit,
                  ignores=("L",), check=check, counts=counts, adapts_on_subset=True,
                  embed_unit=embed_unit)


Batch = Mapping[str, jax.Array]
# A `jaxadapt.train.state.TrainState` (not imported: adapt must not depend on train).
TrainState = Any


def episode_forward(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array,
                    stats_mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Forward E episodes, each normalized with its own context statistics.

    Args:
      model: module called ``model(x, norm_mode=, stats_mask=) -> (logits, features)``.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (running averages).
      images: float ``[E, L + N, H, W, C]``.
      stats_mask: optional bool ``[E, L + N]``: rows of each episode that define its
        statistics (default: all of them; pass it when episodes are padded).

    Returns:
      ``(logits [E, L + N, K], new_batch_stats)``. ``new_batch_stats`` is the mean over
      episodes of the per-episode updated running averages, i.e. one momentum step
      ``m * ra + (1 - m) * mean_e(stat_e)`` towards the mean of the E episodes' batch
      mean and (biased) variance.
    """
    if images.ndim != 5:
        raise ValueError(f"episode images have shape {images.shape}; expected "
                         "[episodes, L + N, H, W, C]")

    def one(x, m):
        (logits, _), new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, norm_mode="batch",
            stats_mask=m, mutable=["batch_stats"])
        return logits, new.get("batch_stats", {})

    if stats_mask is None:
        logits, stats = jax.vmap(lambda x: one(x, None))(images)
    else:
        logits, stats = jax.vmap(one)(images, jnp.asarray(stats_mask).astype(bool))
    return logits, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def _episode_ce(logits: jax.Array, labels: jax.Array, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-episode mean CE over weighted rows; returns (ce_mean [E], count [E], hits [E])."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    valid = labels >= 0
    w = weights.astype(jnp.float32) * valid.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    count = jnp.sum(w, axis=-1)
    hits = jnp.sum(w * (jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis=-1)
    return jnp.sum(w * ce, axis=-1) / jnp.maximum(count, 1.0), count, hits


def _loss_weights(is_control: jax.Array, mask: jax.Array | None) -> jax.Array:
    w = ~jnp.asarray(is_control).astype(bool)
    if mask is not None:
        w = w & jnp.asarray(mask).astype(bool)
    return w.astype(jnp.float32)


def _mean_over_episodes(per_episode: jax.Array, count: jax.Array) -> jax.Array:
    """Mean over episodes that have at least one scored row (0 if none has)."""
    has = (count > 0).astype(jnp.float32)
    return jnp.sum(per_episode * has) / jnp.maximum(jnp.sum(has), 1.0)


def _scored_forward(model: nn.Module, params: Any, batch_stats: Any, batch: Batch,
                    controls_from: int | None) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """(logits, new running stats, labels, loss weights) of the rows a step scores.

    ``controls_from=None``: (CS-)ARM-BN, every episode normalized with the statistics of
    its ``stats_mask`` rows (default all), gradients through them. An int L: BEN, the
    first L rows normalized with constant statistics of the rows from L on (the
    controls; ``stats_mask[:, L:]`` selects among them), only the first L rows scored.
    """
    mask = batch.get("mask")
    if controls_from is None:
        logits, new = episode_forward(model, params, batch_stats, batch["image"],
                                      batch.get("stats_mask"))
        return logits, new, batch["label"], _loss_weights(batch["is_control"], mask)
    L = int(controls_from)
    stats_mask = batch.get("stats_mask")
    logits, new = ben.control_stats_forward(
        model, params, batch_stats, batch["image"], L,
        None if stats_mask is None else jnp.asarray(stats_mask)[:, L:])
    w = _loss_weights(jnp.asarray(batch["is_control"])[:, :L],
                      None if mask is None else jnp.asarray(mask)[:, :L])
    return logits, new, jnp.asarray(batch["label"])[:, :L], w


def episode_loss(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array,
                 labels: jax.Array, is_control: jax.Array, mask: jax.Array | None = None,
                 stats_mask: jax.Array | None = None, controls_from: int | None = None
                 ) -> jax.Array:
    """The (CS-)ARM-BN episodic loss (or BEN's, with ``controls_from``).

    Args:
      model, params, batch_stats: as in `episode_forward`.
      images: ``[E, L + N, H, W, C]``, each episode one plate's context.
      labels: int ``[E, L + N]``; negative (controls) never scored.
      is_control: bool ``[E, L + N]``; controls shape the statistics, carry no loss.
      mask: optional ``[E, L + N]`` loss mask (False: not scored, e.g. padding).
      stats_mask: optional bool ``[E, L + N]`` rows defining the statistics.
      controls_from: None: (CS-)ARM-BN. L: BEN, rows ``[:L]`` of each episode
        normalized with the statistics of rows ``[L:]`` (its controls), held constant
        in the gradient (`jaxadapt.methods.bn.ben.control_stats_forward`).

    Returns:
      Scalar: mean over episodes of the mean cross-entropy of each episode's scored
      (perturbed, valid, labelled) images; episodes without any scored image are left
      out of the mean.
    """
    batch = {"image": images, "label": labels, "is_control": is_control, "mask": mask,
             "stats_mask": stats_mask}
    logits, _, labels, w = _scored_forward(model, params, batch_stats, batch, controls_from)
    ce, count, _ = _episode_ce(logits, labels, w)
    return _mean_over_episodes(ce, count)


def make_episodic_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                             controls_from: int | None = None
                             ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build ``(state, batch) -> (state, metrics)`` for episodic (CS-)ARM-BN training.

    Args:
      model: the architecture.
      tx: optax optimizer whose state is ``state.opt_state``.
      controls_from: None for (CS-)ARM-BN; L for BEN: rows ``[:L]`` of each episode are
        the perturbed images, normalized with constant statistics of its controls, rows
        ``[L:]`` (see `episode_loss`).

    Returns:
      The step (not jitted; use `jaxadapt.train.parallel.parallel_train_step`, which
      shards the episodes along E over the devices: each episode's statistics stay on
      one device and the mean over episodes is global). Batch fields: ``image``
      ``[E, L+N, H, W, C]``, ``label`` ``[E, L+N]``, ``is_control`` ``[E, L+N]``,
      optional ``mask`` (loss mask) and ``stats_mask``. Metrics: ``loss`` (episodic
      loss), ``accuracy`` (over scored images) and ``count`` (scored images).
    """

    def loss_fn(params, batch_stats, batch):
        logits, new_stats, labels, w = _scored_forward(model, params, batch_stats, batch,
                                                       controls_from)
        ce, count, hits = _episode_ce(logits, labels, w)
        return _mean_over_episodes(ce, count), (new_stats, jnp.sum(count), jnp.sum(hits))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        (loss, (new_stats, count, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax internals, see steps.py
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1,
                                  params=optax.apply_updates(state.params, updates),
                                  batch_stats=new_stats, opt_state=opt_state)
        return new_state, {"loss": loss, "accuracy": hits / jnp.maximum(count, 1.0),
                           "count": count}

    return train_step


def make_episodic_eval_step(model: nn.Module, *, controls_from: int | None = None
                            ) -> Callable[[TrainState, Batch], dict]:
    """``(state, batch) -> {"loss", "loss_per_episode", "count", "correct"}`` without updates.

    Args:
      model: the architecture.
      controls_from: as in `make_episodic_train_step` (None, or L for BEN).

    Returns:
      The step (not jitted). ``loss`` is `episode_loss`; ``loss_per_episode`` [E] and
      ``count`` [E] let a caller average over several batches of episodes exactly.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict:
        logits, _, labels, w = _scored_forward(model, state.params, state.batch_stats, batch,
                                               controls_from)
        ce, count, hits = _episode_ce(logits, labels, w)
        return {"loss": _mean_over_episodes(ce, count), "loss_per_episode": ce,
                "count": count, "correct": jnp.sum(hits)}

    return eval_step
