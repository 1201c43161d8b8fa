"""DINO pretraining of a ViT extractor on a study's training images (labels unused).

The recipe: multi-crop views (`jaxadapt.data.views`) of every training image, or of
cross-batch pairs (CODA: two images of one compound from different plates or batches,
`jaxadapt.data.pairs`), fed to the pure DINO step (`jaxadapt.methods.coda.dino`) under
``jax.shard_map`` over every device and host, driven by the shared epoch loop
(`jaxadapt.train.loop.fit`: checkpoints, exact resume). Each host reads only its own
slice of every global batch.

After every epoch the teacher's backbone is probed with DINO's weighted kNN: features
of labelled training images form the bank, labelled validation images are classified.
The probe and the collapse monitor (teacher entropy, centre norm, student-teacher KL)
go to the run's logs and ``dino_history.json``; a collapse is warned about with its
numbers. The result is the teacher backbone (DINO evaluates and transfers the teacher).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxadapt.data import pairs as pairs_lib, sampling as samplers, schema, views
from jaxadapt.methods.coda import dino, dino_optim
from jaxadapt.methods.coda.dino_probe import knn_variables, make_feature_fn, make_knn_probe
from jaxadapt.models import build_model, pretrained
from jaxadapt.models.vit import DINOHead, DINOModel
from jaxadapt.train import parallel
from jaxadapt.train.loop import FitConfig, fit
from jaxadapt.train.supervised import Interrupted, check_batch_size
from jaxadapt.train.writer import MetricWriter


log = logging.getLogger(__name__)

Variables = dict[str, Any]


def build_dino_model(config: ml_collections.ConfigDict) -> DINOModel:
    """The student/teacher architecture: `config.model`'s ViT + `config.dino`'s head.

    Args:
      config: the study config.

    Returns:
      The (uninitialized) `DINOModel`.
    """
    d = config.dino
    head = DINOHead(out_dim=d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                    norm_last_layer=d.norm_last_layer)
    return DINOModel(backbone=build_model(config.model), head=head)


def views_of(config: ml_collections.ConfigDict) -> views.ViewsConfig:
    """`config.dino.views` as a `ViewsConfig`. Args: config. Returns: the ViewsConfig."""
    return views.views_config(config.dino.views)


def local_pairs(pair_index: np.ndarray, mesh) -> np.ndarray:
    """This process's share of every global batch of (row_a, row_b) pairs.

    Args:
      pair_index: int [steps, B, 2] global pair batches, identical on every process.
      mesh: the data mesh (its local device count).

    Returns:
      int [steps, B / P, 2]: the pairs this process reads (`samplers.process_share`).

    Raises:
      ValueError: B does not split over processes x local devices, naming both.
    """
    share = [samplers.process_share(
        pair_index[..., i], jax.process_index(), jax.process_count(),
        local_devices=parallel.local_device_count(mesh), field="config.dino.batch_size")[0]
        for i in range(2)]
    return np.stack(share, axis=-1)


def epoch_pairs(table: schema.SiteTable, rows: np.ndarray, batch_size: int, *, level: str,
                seed: int, epoch: int) -> tuple[np.ndarray, dict[str, int]]:
    """The epoch's (row_a, row_b) batches: cross-batch pairs, or each image with itself.

    Args:
      table: the study's SiteTable.
      rows: training rows.
      batch_size: global batch size.
      level: "none" (plain DINO), "plate" or "batch" (partner from another plate/batch).
      seed, epoch: randomness of the draw and the order.

    Returns:
      (int64 [steps, B, 2], fallback counts; empty for plain DINO).
    """
    if level == "none":
        index = samplers.mixed_batches(rows, batch_size, seed=seed, epoch=epoch)
        return np.stack([index, index], axis=-1), {}
    return pairs_lib.epoch_pair_batches(table, rows, batch_size, level=level, seed=seed,
                                        epoch=epoch)


def _apply_fn(model: DINOModel) -> Callable:
    """``(params, crops, rng=None) -> outputs``: stochastic (drop path) only with an rng."""
    def apply(params, crops, rng=None):
        if rng is None:
            return model.apply({"params": params}, crops)
        return model.apply({"params": params}, crops, train=True, rngs={"dropout": rng})
    return apply


def init_params(model: DINOModel, config: ml_collections.ConfigDict, seed: int) -> Any:
    """Student parameters initialized from the replicate seed (on the host).

    Args:
      model: the DINOModel.
      config: the study config (dino.views sizes, model.in_channels, model.init: "random"
        or a ViT checkpoint for the backbone).
      seed: replicate seed.

    Returns:
      The params pytree.

    Raises:
      ValueError: `model.init` names no file, or a checkpoint that does not fit the ViT
        (`jaxadapt.models.pretrained`).
    """
    v, c = views_of(config), config.model.in_channels
    crops = [jnp.zeros((1, v.global_size, v.global_size, c)),
             jnp.zeros((1, v.local_size, v.local_size, c))]
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    params = _init_fn(model)(key, crops)
    m = config.model
    if m.init == "random":
        return params
    # The backbone from a pretrained checkpoint (CODA starts from ImageNet DeiT-S); the
    # head keeps its seeded random init.
    path = os.path.expanduser(m.init)
    if not os.path.isfile(path):
        raise ValueError(f"config.model.init={m.init!r} is not a file; download the checkpoint "
                         "(e.g. DeiT-S: deit_small_patch16_224-cd65a155.pth) to that path, or "
                         "set --config.model.init=random")
    backbone = pretrained.load_pretrained_vit(
        path, model.backbone, in_channels=c, channel_rule=m.init_channel_rule,
        channels=tuple(m.init_select_channels) if m.init_channel_rule == "select" else None)
    return {**params, "backbone": backbone}


@functools.lru_cache(maxsize=None)
def _init_fn(model: DINOModel) -> Callable:
    return jax.jit(lambda k, crops: model.init(k, crops)["params"])


def _schedules(d: ml_collections.ConfigDict, n_iter: int) -> dino_optim.DinoSchedules:
    return dino_optim.make_dino_schedules(
        epochs=d.epochs, niter_per_ep=n_iter, batch_size=d.batch_size, base_lr=d.base_lr,
        min_lr=d.min_lr, warmup_epochs=d.warmup_epochs, weight_decay=d.weight_decay,
        weight_decay_end=d.weight_decay_end, momentum_teacher=d.momentum_teacher,
        warmup_teacher_temp=d.warmup_teacher_temp, teacher_temp=d.teacher_temp,
        warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs,
        freeze_last_layer=d.freeze_last_layer, scale_lr=d.lr_scaling == "linear")


@functools.lru_cache(maxsize=None)
def compiled_step(model: DINOModel, dino_json: str, n_iter: int, mesh,
                  stochastic: bool) -> tuple[Any, Callable]:
    """(optimizer, jitted data-parallel DINO step) for a `config.dino` and an epoch length.

    Cached, so trainers of one study with the same DINO settings (plain and cross-batch,
    an interrupted run and its resumption) share one compilation.

    Args:
      model: the DINOModel.
      dino_json: `config.dino` as sorted JSON (hashable).
      n_iter: steps per epoch (the schedules' length).
      mesh: the data mesh.
      stochastic: drop path in the student (needs a PRNG key per step).

    Returns:
      (optimizer, step).
    """
    d = ml_collections.ConfigDict(json.loads(dino_json))
    schedules = _schedules(d, n_iter)
    optimizer = dino_optim.make_dino_optimizer(schedules)
    step = dino.make_dino_step(
        _apply_fn(model), optimizer, schedules, n_global=2, axis_name=parallel.DATA_AXIS,
        student_temp=d.student_temp, centre_momentum=d.centre_momentum, clip_grad=d.clip_grad,
        global_clip=d.global_clip, stochastic=stochastic)
    return optimizer, dino.parallel_dino_step(step, mesh, axis_name=parallel.DATA_AXIS)


def _collapse_check(last: dict, out_dim: int) -> None:
    """Warns (log) when the last step's monitor shows a collapsed or still-uniform teacher."""
    if last:
        msg = dino.collapse_warning({k: float(v) for k, v in jax.device_get(last).items()},
                                    out_dim=out_dim)
        if msg:
            log.warning("%s", msg)


def make_dino_trainer(config: ml_collections.ConfigDict, *, pairs: str = "none"):
    """Builds the DINO pretraining recipe once per study.

    Args:
      config: the study config; reads `dino` (head, schedules, views, kNN probe),
        `model` (the ViT), `train.eval_batch_size`, `model.num_classes`.
      pairs: "none" (plain DINO), "plate" or "batch" (CODA's cross-batch pairs: the
        second image of a pair comes from another plate or batch).

    Returns:
      `train(view, rows, run_dir, seed) -> variables`: the trained teacher's params and a
      kNN bank of labelled training features (`knn_variables`), plus the student's
      params ("student") and the centre ("centre").
    """
    d = config.dino
    level = pairs
    if level not in ("none", "plate", "batch"):
        raise ValueError(f"make_dino_trainer: pairs={pairs!r}; use 'none', 'plate' or 'batch'")
    check_batch_size(d.batch_size, "config.dino.batch_size")
    model, mesh, vcfg = build_dino_model(config), parallel.make_data_mesh(), views_of(config)
    feature_fn = make_feature_fn(model, mesh)
    dino_json = json.dumps(d.to_dict(), sort_keys=True)
    stochastic = (config.model.get("drop_path_rate") or 0.0) > 0

    def step_for(n_iter: int) -> tuple:
        return compiled_step(model, dino_json, n_iter, mesh, stochastic)

    def train(view, rows: dict[str, np.ndarray], run_dir: str, seed: int) -> Variables:
        train_rows = np.asarray(rows["train"])
        n_iter = len(train_rows) // d.batch_size
        if n_iter < 1:
            raise ValueError(f"training split has {len(train_rows)} images, fewer than "
                             f"config.dino.batch_size={d.batch_size}; lower the batch size")
        optimizer, pstep = step_for(n_iter)
        state = dino.create_dino_state(init_params(model, config, seed), optimizer,
                                       jax.random.fold_in(jax.random.PRNGKey(seed), 1), d.out_dim)
        state = parallel.replicate(state, mesh)
        last: dict = {}

        def train_step(s, batch):
            s, metrics = pstep(s, batch)
            last.update(metrics)
            return s, metrics

        def epoch_batches(epoch: int) -> Iterator[dict]:
            pair_index, counts = epoch_pairs(view.table, train_rows, d.batch_size, level=level,
                                             seed=seed, epoch=epoch)
            if counts:
                log.info("epoch %d cross-batch pairs (%s): %s", epoch + 1, level, counts)
            for b in views.view_batches(view.source, view.table, local_pairs(pair_index, mesh),
                                        cfg=vcfg, seed=seed, epoch=epoch,
                                        num_threads=view.num_threads):
                yield parallel.shard_batch({"global": b["global"], "local": b["local"]}, mesh)

        probe = make_knn_probe(feature_fn, view, rows, config, seed, mesh)

        def validate(s) -> dict[str, float]:
            _collapse_check({**last, "step": s.step} if last else last, d.out_dim)
            out = probe(s.teacher)
            acc = out["knn_accuracy"]
            return {"loss": 1.0 - acc if acc == acc else float("nan"), **out}

        fit_cfg = FitConfig(num_epochs=d.epochs, patience=d.epochs, best_fields=(),
                            ckpt_dir=os.path.join(run_dir, "checkpoints"),
                            log_every_steps=d.log_every_steps, steps_per_epoch=n_iter,
                            stop_after_epochs=config.train.stop_after_epochs or None)
        with MetricWriter(os.path.join(run_dir, "logs")) as writer:
            result = fit(state, fit_cfg, train_step=train_step, epoch_batches=epoch_batches,
                         validate=validate, writer=writer)
        if not result.finished:
            raise Interrupted(run_dir, result.epochs_done)
        write_history(run_dir, result.history, d.out_dim)
        out = knn_variables(model, result.state.teacher, view, rows, config, seed, mesh,
                            feature_fn)
        # What continuing DINO on new data (ODA / CODA) starts from, besides the teacher.
        out.update(jax.device_get({"student": result.state.params, "centre": result.state.centre}))
        return out

    return train


def make_random_init_trainer(config: ml_collections.ConfigDict):
    """The untrained baseline: a randomly initialized extractor and its kNN bank.

    Args:
      config: the study config.

    Returns:
      `train(view, rows, run_dir, seed) -> variables` (no training; the seed picks the init).
    """
    model, mesh = build_dino_model(config), parallel.make_data_mesh()
    feature_fn = make_feature_fn(model, mesh)

    def train(view, rows: dict[str, np.ndarray], run_dir: str, seed: int) -> Variables:
        return knn_variables(model, init_params(model, config, seed), view, rows, config, seed,
                             mesh, feature_fn)

    return train


def write_history(run_dir: str, history: list[dict[str, float]],
                  out_dim: int | None = None) -> str | None:
    """`dino_history.json` and a plot of teacher entropy and kNN accuracy per epoch.

    Args:
      run_dir: the training run's directory.
      history: `FitResult.history`.
      out_dim: K of the head; draws log K, the entropy of a uniform (collapsed) teacher.

    Returns:
      The PNG path (None on processes other than 0).
    """
    if jax.process_index() != 0 or not history:
        return None
    with open(os.path.join(run_dir, "dino_history.json"), "w") as f:
        json.dump(history, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(epochs, [h.get("train_teacher_entropy", np.nan) for h in history], marker="o")
    if out_dim:
        a.axhline(np.log(out_dim), color="grey", ls="--", label="uniform: log K")
        a.legend(loc="best")
    a.set(xlabel="epoch", ylabel="teacher entropy (nats)", title="collapse monitor")
    b.plot(epochs, [h.get("val_knn_accuracy", np.nan) for h in history], marker="o")
    b.set(xlabel="epoch", ylabel="kNN accuracy", title="held-out wells")
    fig.tight_layout()
    path = os.path.join(run_dir, "dino_history.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
