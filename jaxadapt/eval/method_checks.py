"""Checks of the method sections: DINO/CODA views, TVN, training, devices, adapt_on.

`dino_problems` checks the self-supervised views (DINO, CODA) against the image and
the ViT; `tvn_problems` the `tvn` extractor against the model; `train_problems` the
training loop; `device_problems` (run on an otherwise valid config) builds the methods
and checks their adaptation subsets (`adapt_on_problem`) and how their trainers split
batches and episodes over processes and devices. Part of `validation.validate`.
"""

from __future__ import annotations

import os
from typing import Any

from jaxadapt.adapt import registry
from jaxadapt.data import views
from jaxadapt.eval import retrieval
from jaxadapt.eval.config_rules import MISSING, bad, get, guarded, is_int
from jaxadapt.models import VIT_SIZES, build_model
from jaxadapt.train import episodic, supervised
from jaxadapt.train import registry as trainer_registry
from jaxadapt.train.loop import FitConfig

#: Methods whose extractor trains on cross-batch pairs (two images split the local views).
CROSS_BATCH_METHODS = ("dino_cb", "dual_cb", "coda")
# Episodes per step each episodic trainer splits over processes x local devices (whole
# episodes per process; on one host they fall back to fewer devices).
_EPISODE_SPLIT = {"arm_bn": "arm.episodes_per_step", "cs_arm_bn": "arm.episodes_per_step",
                  "ben": "arm.episodes_per_step"}


def dino_problems(cfg: Any) -> list[str]:
    """The DINO views against the image and the ViT's patch size (only for ViT models).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    name = get(cfg, "model.name")
    if not (isinstance(name, str) and name in VIT_SIZES):
        return []
    size = get(cfg, "data.sim.image_size")
    if get(cfg, "data.source") == "jump":
        size = get(cfg, "data.jump.image_size") or None  # 0: the images' own size
    patch = get(cfg, "model.patch_size")
    patch = VIT_SIZES[name]["patch_size"] if patch in (MISSING, None) else patch
    methods = get(cfg, "methods")
    paired = isinstance(methods, (tuple, list)) and any(m in CROSS_BATCH_METHODS for m in methods)
    out = guarded(views.check_views_config, get(cfg, "dino.views"),
                   size if is_int(size) else None, patch_size=patch, paired=paired,
                   where="config.dino.views")
    dim, heads = get(cfg, "coda.task.embed_dim"), get(cfg, "coda.task.num_heads")
    if is_int(dim) and is_int(heads) and heads > 0 and dim % heads:
        out.append(f"config.coda.task.embed_dim={dim} is not divisible by "
                   f"config.coda.task.num_heads={heads}; choose a head count dividing it")
    crop = get(cfg, "data.crop_size")
    if is_int(crop) and is_int(patch) and patch > 0 and crop % patch:
        out.append(f"config.data.crop_size={crop} (the evaluation crop) is not divisible by "
                   f"the ViT patch size {patch}; use a multiple of {patch}")
    return out


def tvn_problems(cfg: Any) -> list[str]:
    """The `tvn` method's extractor against the model and the embedding file (if it runs).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    methods, extractor = get(cfg, "methods"), get(cfg, "tvn.extractor")
    path, name = get(cfg, "tvn.embeddings_file"), get(cfg, "model.name")
    out = [] if isinstance(path, str) else [bad("tvn.embeddings_file", path,
                                                 "must be a string (a .npy path, or '')")]
    if not (isinstance(methods, (tuple, list)) and "tvn" in methods) or out:
        return out
    vit = isinstance(name, str) and name in VIT_SIZES
    if extractor == "file" and not (path and os.path.isfile(path)):
        out.append(f"config.tvn.extractor='file' reads config.tvn.embeddings_file={path!r}, "
                   "which is not a file; pass a .npy array with one row per site "
                   "(--config.tvn.embeddings_file=/path/emb.npy)")
    elif extractor == "erm" and vit:
        out.append(f"config.tvn.extractor='erm' embeds with the erm recipe's BatchNorm model, "
                   f"but config.model.name={name!r} is a ViT; use --config.tvn.extractor=dino")
    elif extractor == "dino" and not vit:
        out.append(f"config.tvn.extractor='dino' needs a ViT model, but config.model.name="
                   f"{name!r}; use --config.tvn.extractor=erm or a vit_* model")
    return out


def retrieval_problems(cfg: Any) -> list[str]:
    """`eval.retrieval` needs copairs (and pandas): the optional `metrics` extra.

    Args:
      cfg: the study config.

    Returns:
      One message if retrieval is asked for and its packages are missing, else none.
    """
    missing = retrieval.missing_requirements() if get(cfg, "eval.retrieval") is True else []
    if not missing:
        return []
    return [f"config.eval.retrieval=True scores copairs mAP, but {missing} is not installed; "
            "pip install -e \".[metrics]\" (or set --config.eval.retrieval=False)"]


def train_problems(cfg: Any) -> list[str]:
    """The training loop's settings, checked by the loop's own FitConfig.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    t = cfg.train
    try:
        FitConfig(num_epochs=t.num_epochs, patience=t.patience, log_every_steps=t.log_every_steps,
                  stop_after_epochs=t.stop_after_epochs or None, progress=False)
    except ValueError as err:
        return [str(err).replace("FitConfig.", "config.train.", 1)]
    return []


def device_problems(cfg: Any) -> list[str]:
    """What needs the built methods: their adaptation subsets, their trainers being
    registered, and the batch sizes and episode counts those trainers split over devices.

    On several processes (hosts) each process reads its own equal share of every batch:
    a batch size must divide by processes x local devices, and so must the episodes
    per step of an episodic trainer (on one host they need not). Builds the model and
    each method (cheap: nothing is initialized or compiled) to learn which trainers the
    study runs; so it runs on an otherwise valid config only.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    model = build_model(cfg.model)
    methods = [registry.make_method(n, model, cfg, {}) for n in cfg.methods]
    adapt_problems = _adapt_on_problems(cfg, methods)
    if adapt_problems:
        return adapt_problems
    names = {m.trainer for m in methods}
    unknown = sorted(names - set(trainer_registry.available()))
    if unknown:
        return [f"config.methods={tuple(cfg.methods)!r} need training recipes {unknown}, which "
                f"are not registered; known trainers: {trainer_registry.available()}"]
    fields = {k for n in names for k in trainer_registry.get(n).device_batch_fields}
    out = []
    for key in sorted(fields):
        out += guarded(supervised.check_batch_size, get(cfg, key), f"config.{key}")
    for key in sorted({_EPISODE_SPLIT[t] for t in names if t in _EPISODE_SPLIT}):
        out += guarded(episodic.check_episodes, get(cfg, key))
    return out


def adapt_on_problem(method: Any, adapt_on: str) -> str | None:
    """Why `method` cannot run with adaptation subset `adapt_on`; None if it can.

    Args:
      method: a `jaxadapt.adapt.base.Method`.
      adapt_on: the subset selector (`jaxadapt.data.subsets`).

    Returns:
      The message, or None ("unit", a method that adapts once per unit, or one that
      ignores adaptation).
    """
    if adapt_on == "unit" or method.adapts_on_subset or "adapt_on" in method.ignores:
        return None
    return (f"method {method.name!r} adapts on the very batches it scores, so it cannot adapt "
            f"on adapt_on={adapt_on!r} and score the whole unit; score it with adapt_on='unit' "
            "or use a method that adapts once per unit (e.g. adabn_plate, ben, cs_arm_bn_plate)")


def _adapt_on_problems(cfg: Any, methods: list) -> list[str]:
    """Methods asked (by eval.adapt_on or the sweep) to adapt on a subset they cannot use."""
    sweep = get(cfg, "sweep") or ()
    chosen = {s["adapt_on"] for s in sweep if "adapt_on" in s} | {get(cfg, "eval.adapt_on")}
    found = [adapt_on_problem(m, a) for m in methods for a in sorted(chosen)]
    return [f for f in found if f]

