"""MAE pretraining, the dual model on an MAE encoder, TTT-MAE and ODA with MAE.

- `mae` pretraining (`make_mae_pretrainer`): MAE's objective (75 % of patches removed,
  per-patch targets standardized with the unbiased variance, loss on removed patches;
  `jaxadapt.methods.coda.mae`) on the training source's images, labels unused, data-parallel
  over every device and host (`make_mae_step` under ``shard_map``), each host reading its
  share, driven by the shared epoch loop (checkpoints, exact resume). Images come
  through the study's training transform (random crop and flips, per-image z-score);
  MAE's own pipeline uses random-resized crops (scale 0.2-1) instead.
- `dual_mae` (`make_dual_mae_trainer`): the dual model's task transformer
  (`jaxadapt.methods.coda.task_trainer`) on the frozen, unmasked MAE encoder's tokens.
- `ttt_mae`: every test image adapts the encoder alone (reset per image; SGD with
  momentum on copies of the image with fresh masks; `jaxadapt.methods.coda.ttt_mae`), then the
  frozen task transformer classifies it. The images of a batch adapt at once (vmap),
  split over this process's devices (images are independent: units are dealt to
  processes).
- `oda_mae` (study 6): the extractor adapted on the whole unit with the MAE objective
  instead of DINO, decoder frozen, with ODA's budget (`config.coda.adapt`: epochs, batch
  size, learning rate), then classified by the frozen task transformer.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxadapt.data import pipeline, sampling as samplers
from jaxadapt.methods.base import Method, adaptation_unit, collect_logits, unlabelled_images
from jaxadapt.methods.coda import mae as mae_lib, task_trainer, ttt_mae
from jaxadapt.methods.coda.online import unit_batch_size, unit_seed
from jaxadapt.models.dual import DualModel
from jaxadapt.models.mae import MAE, init_mae_params, mae
from jaxadapt.train import parallel
from jaxadapt.train.loop import FitConfig, fit
from jaxadapt.train.supervised import Interrupted, check_batch_size
from jaxadapt.train.writer import MetricWriter


log = logging.getLogger(__name__)

Variables = dict[str, Any]


def build_mae(config: ml_collections.ConfigDict) -> MAE:
    """`config.mae.size` for the study's crops and channels. Returns: the `MAE` module."""
    return mae(config.mae.size, img_size=config.data.crop_size,
               in_channels=config.model.in_channels)


def dual_mae_model(config: ml_collections.ConfigDict) -> DualModel:
    """The MAE encoder (unmasked) under the task transformer. Returns: the `DualModel`."""
    return DualModel(extractor=build_mae(config).encoder_def(), task=task_trainer.task_head(config))


def _optimizer(m: ml_collections.ConfigDict, n_iter: int):
    schedule = lambda lr: mae_lib.mae_lr_schedule(  # noqa: E731
        lr, m.epochs * n_iter, m.warmup_epochs * n_iter, m.min_lr)
    return mae_lib.make_mae_optimizer(m.batch_size, blr=m.blr, weight_decay=m.weight_decay,
                                      schedule=schedule)


def make_mae_pretrainer(config: ml_collections.ConfigDict):
    """Builds the MAE pretraining recipe once per study.

    Args:
      config: the study config (`mae`, `data`, `model.in_channels`, `train`).

    Returns:
      `train(view, rows, run_dir, seed) -> {"params": MAE params}` (the last epoch's).
    """
    m = config.mae
    check_batch_size(m.batch_size, "config.mae.batch_size")
    model, mesh = build_mae(config), parallel.make_data_mesh()

    @functools.lru_cache(maxsize=None)
    def compiled(n_iter: int):
        optimizer = _optimizer(m, n_iter)
        return optimizer, mae_lib.make_mae_step(model, optimizer, mesh, mask_ratio=m.mask_ratio,
                                                norm_pix=m.norm_pix)

    def train(view, rows: dict, run_dir: str, seed: int) -> Variables:
        train_rows = np.asarray(rows["train"])
        n_iter = len(train_rows) // m.batch_size
        if n_iter < 1:
            raise ValueError(f"training split has {len(train_rows)} images, fewer than "
                             f"config.mae.batch_size={m.batch_size}; lower the batch size")
        optimizer, step = compiled(n_iter)
        params = init_mae_params(model, jax.random.fold_in(jax.random.PRNGKey(seed), 0))
        state = parallel.replicate(mae_lib.create_mae_state(params, optimizer), mesh)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)

        def epoch_batches(epoch: int) -> Iterator[dict]:
            index = samplers.mixed_batches(train_rows, m.batch_size, seed=seed, epoch=epoch)
            for b in parallel.process_batches(view.train_batches, index, mesh, seed=(seed, epoch),
                                              field="config.mae.batch_size"):
                yield parallel.shard_batch({"image": b["image"]}, mesh)

        fit_cfg = FitConfig(num_epochs=m.epochs, patience=m.epochs, best_fields=(),
                            ckpt_dir=os.path.join(run_dir, "checkpoints"),
                            log_every_steps=m.log_every_steps, steps_per_epoch=n_iter,
                            stop_after_epochs=config.train.stop_after_epochs or None)
        with MetricWriter(os.path.join(run_dir, "logs")) as writer:
            result = fit(state, fit_cfg, train_step=lambda s, b: step(s, b["image"], key),
                         epoch_batches=epoch_batches,
                         validate=_validator(model, view, rows["validation"], m, mesh, seed),
                         writer=writer)
        if not result.finished:
            raise Interrupted(run_dir, result.epochs_done)
        return {"params": jax.device_get(result.state.params)}

    return train


def _validator(model: MAE, view, rows: np.ndarray, m, mesh, seed: int):
    """`state -> {"loss"}`: the MAE loss of up to 256 validation images, masks fixed."""
    rows = np.asarray(rows)[:256]
    size = max(len(rows) // parallel.local_device_count(mesh), 1) * parallel.local_device_count(mesh)
    n = (model.img_size // model.patch_size) ** 2

    @jax.jit
    def loss(params, images):
        noise = mae_lib.image_noise(jax.random.PRNGKey(seed), jnp.arange(images.shape[0]), n)
        pred, mask = model.apply({"params": params}, images, noise, m.mask_ratio)
        return mae_lib.mae_loss(pred, mae_lib.mae_targets(images, model.patch_size, m.norm_pix),
                                mask)

    def validate(state) -> dict[str, float]:
        if len(rows) == 0:
            return {"loss": float("nan")}
        (batch,) = view.eval_batches(rows[None, :size])
        return {"loss": float(loss(jax.device_get(state.params), batch["image"]))}

    return validate


def make_dual_mae_trainer(config: ml_collections.ConfigDict):
    """The `dual_mae` recipe: MAE pretraining, then the task transformer on its frozen encoder.

    Args:
      config: the study config.

    Returns:
      `train(view, rows, run_dir, seed) -> {"params": {"extractor", "task"},
      "batch_stats": {}, "mae": MAE params}`.
    """
    pretrain = make_mae_pretrainer(config)
    encoder: dict[str, Any] = {}

    def prepare(variables: Variables, *_) -> Variables:
        return {"params": {**variables["params"], "extractor": encoder["params"]}, "batch_stats": {}}

    train_task = task_trainer.make_task_trainer(dual_mae_model(config), config, ("extractor",),
                                                prepare)

    def train(view, rows: dict, run_dir: str, seed: int) -> Variables:
        mae_params = pretrain(view, rows, os.path.join(run_dir, "mae"), seed)["params"]
        encoder["params"] = mae_params["encoder"]
        trained = train_task(view, rows, os.path.join(run_dir, "task"), seed)
        return {**trained, "mae": mae_params}

    return train


def ttt_mae_method(model, cfg: ml_collections.ConfigDict, setting) -> Method:
    """The `ttt_mae` method (trainer `dual_mae`): test-time training per image.

    Returns:
      The Method; a unit's images are adapted in chunks of `mae.ttt_chunk`, each image
      with its own key (config seed, unit, position), so a result does not depend on the
      chunking.
    """
    m = cfg.mae
    mae_model, dual = build_mae(cfg), dual_mae_model(cfg)

    def classify(enc, images, params):
        return dual.apply({"params": {"extractor": enc, "task": params["task"]}}, images)[0]

    predict = ttt_mae.make_ttt_predict(
        mae_model, classify, steps=m.ttt_steps, lr=m.ttt_lr, momentum=m.ttt_momentum,
        copies=m.ttt_copies, mask_ratio=m.mask_ratio, norm_pix=m.norm_pix,
        mesh=parallel.make_data_mesh(jax.local_devices()), chunk_size=m.ttt_chunk)

    def predict_unit(variables: Variables, unit) -> np.ndarray:
        params = {**_mae_params(variables, "ttt_mae"), "task": variables["params"]["task"]}
        key = jax.random.PRNGKey(unit_seed(m.ttt_seed, unit.name))
        out, seen = [], 0
        for b in unit.batches():
            images = np.asarray(b.image)[np.asarray(b.mask)]
            if len(images):
                out.append(np.asarray(predict(params, images, key,
                                              ids=np.arange(seen, seen + len(images)))))
                seen += len(images)
        return np.concatenate(out) if out else np.zeros((0, cfg.model.num_classes), np.float32)

    return Method(name="ttt_mae", trainer="dual_mae", predict_unit=predict_unit,
                  ignores=("L", "adapt_on"))


def _mae_params(variables: Variables, name: str) -> Any:
    if "mae" not in variables:
        raise ValueError(f"method {name!r} needs the variables of the 'dual_mae' recipe (with "
                         f"the pretrained MAE); got {sorted(variables)}")
    return variables["mae"]


def oda_mae_method(model, cfg: ml_collections.ConfigDict, setting) -> Method:
    """The `oda_mae` method (study 6): online adaptation of the MAE encoder on the unit.

    Returns:
      The Method, a collective over every device and host like `oda`.
    """
    a, m = cfg.coda.adapt, cfg.mae
    mae_model, dual = build_mae(cfg), dual_mae_model(cfg)
    mesh = parallel.make_data_mesh()
    predict = jax.jit(lambda variables, x: dual.apply(variables, x)[0])

    @functools.lru_cache(maxsize=None)
    def compiled(batch_size: int):
        optimizer = mae_lib.make_mae_optimizer(batch_size, blr=a.lr * 256.0 / batch_size,
                                               weight_decay=a.weight_decay)
        step = mae_lib.make_mae_step(mae_model, optimizer, mesh, mask_ratio=m.mask_ratio,
                                     norm_pix=m.norm_pix, freeze=("decoder",))
        return optimizer, step

    def adapt(params, images, seed: int, name: str):
        bs = unit_batch_size(len(images.rows), a.batch_size, mesh.size, name)
        optimizer, step = compiled(bs)
        state = parallel.replicate(
            mae_lib.create_mae_state(params, optimizer, freeze=("decoder",)), mesh)
        key = jax.random.PRNGKey(seed)
        for epoch in range(a.epochs):
            index = samplers.mixed_batches(images.rows, bs, seed=seed, epoch=epoch)
            read = functools.partial(_train_reads, images)
            for b in parallel.process_batches(read, index, mesh, seed=(seed, epoch),
                                              field="config.coda.adapt.batch_size"):
                state, _ = step(state, parallel.shard_batch(b["image"], mesh), key)
        return jax.device_get(state.params["encoder"])

    def predict_unit(variables: Variables, unit) -> np.ndarray:
        subset = adaptation_unit(unit)
        encoder = adapt(_mae_params(variables, "oda_mae"), unlabelled_images(subset),
                        unit_seed(a.seed, subset.name), subset.name)
        adapted = {"params": {**variables["params"], "extractor": encoder}}
        return collect_logits(functools.partial(predict, adapted), unit)

    return Method(name="oda_mae", trainer="dual_mae", predict_unit=predict_unit, ignores=("L",),
                  adapts_on_subset=True, spans_processes=True)


def _train_reads(images, index, *, seed, first_column=0):
    """Augmented batches of a unit's raw images (the unit carries its training transform)."""
    if images.train_transform is None:
        raise ValueError("oda_mae needs the unit's training transform (UnlabelledImages."
                         "train_transform); units of the protocol runner carry it")
    return pipeline.batches(images.source, images.table, index, transform=images.train_transform,
                            seed=seed, num_threads=images.num_threads, first_column=first_column)
