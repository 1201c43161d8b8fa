"""ODA and CODA: online DINO adaptation of the extractor under a frozen task model.

For each target unit (plate, batch or source; or the subset `eval.adapt_on` names) the
pretraining's DINO state -- student and teacher of the `dual_dino` / `dual_cb`
recipe -- continues training on the unit's unlabelled images with the reference's
step-3 settings (`config.coda.adapt`); the adapted *teacher* backbone then replaces the
dual model's extractor, and the frozen task transformer classifies every scored image
(step 4). `oda` adapts with plain DINO, `coda` with CODA's cross-batch pairs (two images
of one compound from different plates of the unit, `config.dino.pair_level`; counted
fallbacks where a compound has no partner there). Every unit starts again from the
pretrained state (no carry-over between units).

The loop is the pretraining's data-parallel DINO step (`dino_trainer.compiled_step`:
``shard_map`` over every device of every host, gradients and centre averaged across
them); each process builds the views of its own share of every batch of pairs, as in
pretraining. The methods are collectives (`Method.spans_processes`): on several hosts
every process runs every unit, together. As in the reference, the adaptation's AdamW
decays weights at 1e-5 -> 1e-4 and exempts biases and 1-D tensors (the reference's second
parameter group has decay 0), its rate is `coda.adapt.lr` without batch scaling, and the
DINO centre starts at zero (`coda.adapt.centre="zero"`: the reference's step 3 loads only
the encoders; "pretrained" carries the pretraining's centre over). The images of a unit
are its scored samples and its DMSO controls.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxadapt.data import views
from jaxadapt.methods.base import Method, adaptation_unit, collect_logits, unlabelled_images
from jaxadapt.methods.coda import dino, dino_trainer, task_trainer
from jaxadapt.train import parallel


log = logging.getLogger(__name__)

Variables = dict[str, Any]


def adaptation_dino_config(config: ml_collections.ConfigDict,
                           batch_size: int) -> ml_collections.ConfigDict:
    """`config.dino` with the adaptation's schedules (`config.coda.adapt`).

    Args:
      config: the study config.
      batch_size: the adaptation's global batch (a small unit may use fewer images).

    Returns:
      A DINO section for `dino_trainer.compiled_step`; its rate is ``coda.adapt.lr``
      itself, without DINO's batch scaling (the reference's step 3).
    """
    a, d = config.coda.adapt, config.dino.to_dict()
    d.update(epochs=a.epochs, batch_size=batch_size, base_lr=a.lr, lr_scaling="none",
             min_lr=a.min_lr, warmup_epochs=a.warmup_epochs, weight_decay=a.weight_decay,
             weight_decay_end=a.weight_decay_end, momentum_teacher=a.momentum_teacher,
             warmup_teacher_temp=a.warmup_teacher_temp, teacher_temp=a.teacher_temp,
             warmup_teacher_temp_epochs=a.warmup_teacher_temp_epochs,
             freeze_last_layer=a.freeze_last_layer, clip_grad=a.clip_grad,
             global_clip=a.global_clip)
    return ml_collections.ConfigDict(d)


def adaptation_centre(state: Variables, mode: str) -> jax.Array:
    """The DINO centre an adaptation starts from.

    Args:
      state: the pretraining's DINO state ({"student", "teacher", "centre"}).
      mode: `coda.adapt.centre`: "zero" (the reference's step 3 loads only the encoders,
        so its centre starts at zero) or "pretrained" (the pretraining's centre).

    Returns:
      [1, K] float32.

    Raises:
      ValueError: an unknown mode, naming the choices.
    """
    centre = jnp.asarray(state["centre"], jnp.float32)
    if mode == "zero":
        return jnp.zeros_like(centre)
    if mode == "pretrained":
        return centre
    raise ValueError(f"config.coda.adapt.centre={mode!r} is not one of ['zero', 'pretrained']")


def unit_batch_size(n_images: int, batch_size: int, n_devices: int, unit: str) -> int:
    """The adaptation batch of a unit: `batch_size`, or all its images rounded to the devices.

    Args:
      n_images: images of the unit.
      batch_size: `config.coda.adapt.batch_size`.
      n_devices: devices the batch is split over.
      unit: its name, for the error.

    Returns:
      The batch size (a multiple of `n_devices`).

    Raises:
      ValueError: the unit has fewer images than devices.
    """
    size = min(batch_size, n_images) // n_devices * n_devices
    if size < 1:
        raise ValueError(f"unit {unit!r} has {n_images} images, fewer than the {n_devices} "
                         "devices an adaptation batch is split over; adapt on a larger unit "
                         "(config.eval.unit) or with fewer devices")
    return size


def make_online_adapter(config: ml_collections.ConfigDict, *, pairs: str, mesh=None):
    """Builds `adapt(dino_state, images, seed, name) -> teacher params` for ODA or CODA.

    Args:
      config: the study config (`dino`, `model`, `coda.adapt`).
      pairs: "none" (ODA: plain DINO) or "plate" / "batch" (CODA's cross-batch pairs).
      mesh: the data mesh; default every device of every process (then every process
        must call the adapter on the same unit with the same seed, as a collective).

    Returns:
      The adapter; its teacher params are the whole DINOModel's ({"backbone", "head"}).
    """
    model = dino_trainer.build_dino_model(config)
    mesh = parallel.make_data_mesh() if mesh is None else mesh
    vcfg = dino_trainer.views_of(config)
    stochastic = (config.model.get("drop_path_rate") or 0.0) > 0
    a = config.coda.adapt

    def adapt(state: Variables, images, seed: int, name: str = "unit") -> Any:
        if a.epochs == 0:  # no adaptation: the pretrained teacher as it is
            return state["teacher"]
        bs = unit_batch_size(len(images.rows), a.batch_size, mesh.size, name)
        n_iter = len(images.rows) // bs
        d = adaptation_dino_config(config, bs)
        optimizer, step = dino_trainer.compiled_step(
            model, json.dumps(d.to_dict(), sort_keys=True), n_iter, mesh, stochastic)
        s = dino.create_dino_state(state["student"], optimizer, jax.random.PRNGKey(seed),
                                   config.dino.out_dim)
        s = s.replace(teacher=state["teacher"], centre=adaptation_centre(state, a.centre))
        s = parallel.replicate(s, mesh)
        for epoch in range(a.epochs):
            index, counts = dino_trainer.epoch_pairs(images.table, images.rows, bs, level=pairs,
                                                     seed=seed, epoch=epoch)
            if counts:
                log.info("unit %s epoch %d cross-batch pairs (%s): %s", name, epoch + 1, pairs,
                         counts)
            share = dino_trainer.local_pairs(index, mesh)  # this process's views only
            for b in views.view_batches(images.source, images.table, share, cfg=vcfg, seed=seed,
                                        epoch=epoch, num_threads=images.num_threads):
                s, metrics = step(s, parallel.shard_batch(
                    {"global": b["global"], "local": b["local"]}, mesh))
        log.info("unit %s adapted: %d steps, teacher entropy %.3f", name, a.epochs * n_iter,
                 float(metrics["teacher_entropy"]))
        return jax.device_get(s.teacher)

    return adapt


def unit_seed(base: int, name: str) -> int:
    """A seed per (config seed, unit name), stable across runs and processes."""
    return (int(base) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


def online_method(name: str, trainer: str, pairs_of):
    """A registry factory for `oda` / `coda`.

    Args:
      name: method name.
      trainer: the recipe whose variables it adapts (`dual_dino`, `dual_cb`).
      pairs_of: config -> the adaptation's pair level ("none", "plate", "batch").

    Returns:
      ``(model, cfg, setting) -> Method``.
    """
    def factory(model, cfg, setting) -> Method:
        adapt = make_online_adapter(cfg, pairs=pairs_of(cfg))
        dual = task_trainer.dual_model(cfg)
        predict = jax.jit(lambda variables, x: dual.apply(variables, x)[0])
        # Traced on first use, once per method: building a method (e.g. to list its recipe)
        # must not require a ViT config.
        expected = functools.cache(lambda: extractor_shapes(dual, cfg))

        def predict_unit(variables: Variables, unit) -> np.ndarray:
            if "dino" not in variables:
                raise ValueError(f"method {name!r} needs the variables of a dual-model recipe "
                                 f"({trainer!r}) with their DINO state; got {sorted(variables)}")
            check_extractor(variables, expected(), cfg)
            subset = adaptation_unit(unit)
            teacher = adapt(variables["dino"], unlabelled_images(subset),
                            unit_seed(cfg.coda.adapt.seed, subset.name), subset.name)
            adapted = {"params": {**variables["params"], "extractor": teacher["backbone"]}}
            return collect_logits(functools.partial(predict, adapted), unit)

        return Method(name=name, trainer=trainer, predict_unit=predict_unit,
                      ignores=("L",), adapts_on_subset=True, spans_processes=True)

    return factory


def _shapes(tree) -> Any:
    return jax.tree.map(lambda x: tuple(np.shape(x)), tree)


def extractor_shapes(dual, cfg: ml_collections.ConfigDict) -> Any:
    """The parameter shapes of `dual`'s extractor for the study's crops (traced, not run)."""
    crop = cfg.data.crop_size
    x = jax.ShapeDtypeStruct((1, crop, crop, cfg.model.in_channels), jnp.float32)
    return _shapes(jax.eval_shape(dual.init, jax.random.PRNGKey(0), x)["params"]["extractor"])


def check_extractor(variables: Variables, expected: Any, cfg: ml_collections.ConfigDict) -> None:
    """The trained extractor, its DINO state and `config.model` must describe one ViT.

    Args:
      variables: a dual-model recipe's variables.
      expected: `extractor_shapes` of the DualModel the method predicts with.
      cfg: the study config (named in the error).

    Raises:
      ValueError: naming the differing shapes (e.g. a task model trained on another ViT
        size than the one configured for adaptation).
    """
    for what, tree in (("the task model's extractor", variables["params"]["extractor"]),
                       ("the DINO state's teacher backbone", variables["dino"]["teacher"]["backbone"])):
        if _shapes(tree) != expected:
            raise ValueError(
                f"{what} does not match config.model ({cfg.model.name!r}): "
                f"{_summary(_shapes(tree))} vs {_summary(expected)}; adapt with the model "
                "config the dual model was trained with")


def _summary(shapes) -> str:
    leaves = jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return ", ".join(f"{jax.tree_util.keystr(p)}{s}" for p, s in leaves[:3]) + \
        (f" ... ({len(leaves)} arrays)" if len(leaves) > 3 else "")
