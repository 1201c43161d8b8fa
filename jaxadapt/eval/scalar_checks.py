"""The scalar fields of the study config: their types and ranges, and their check.

The tables name every scalar field with its type and range; `scalar_problems` checks
them with the shared rules of `jaxadapt.config_rules`.
"""

from __future__ import annotations

from typing import Any

from jaxadapt.config_rules import MISSING, UNITS, bad, get, guarded, is_int, is_number, lacks
from jaxadapt.data import splits, subsets, worlds
from jaxadapt.data import profiles
from jaxadapt.methods.tvn import head as tvn_head
from jaxadapt.models import pretrained
from jaxadapt.models.mae import MAE_SIZES
from jaxadapt.models.resnet import STEMS


# Integer fields -> smallest valid value (None allowed where marked in _MAY_BE_NONE).
_INTEGERS = {
    "data.crop_size": 1, "data.num_threads": 1, "data.sim.seed": 0,
    "splits.seed": 0, "eval.batch_size": 1, "eval.seed": 0,
    "model.width": 1, "model.num_classes": 1, "model.in_channels": 1,
    "model.mlp_hidden_layers": 1,
    "train.batch_size": 1, "train.eval_batch_size": 1,
    "arm.episodes_per_step": 1, "arm.n_perturbed": 1, "arm.n_controls": 0,
    "arm.steps_per_epoch": 0, "arm.val_episodes": 1,
    "adapt.n_controls": 0, "adapt.control_seed": 0, "adapt.plate_chunk_size": 1,
    "dino.out_dim": 1, "dino.hidden_dim": 1, "dino.bottleneck_dim": 1, "dino.epochs": 1,
    "dino.batch_size": 1, "dino.warmup_epochs": 0, "dino.warmup_teacher_temp_epochs": 0,
    "dino.freeze_last_layer": 0, "dino.log_every_steps": 1, "dino.knn_k": 1,
    "dino.knn_bank_size": 1,
    "coda.task.embed_dim": 1, "coda.task.depth": 1, "coda.task.num_heads": 1,
    "coda.task.warmup_epochs": 0, "coda.task.num_epochs": 1, "coda.task.patience": 1,
    "coda.task.batch_size": 1, "coda.task.eval_batch_size": 1, "coda.task.log_every_steps": 1,
    "coda.adapt.epochs": 0, "coda.adapt.batch_size": 1, "coda.adapt.warmup_epochs": 0,
    "coda.adapt.warmup_teacher_temp_epochs": 0, "coda.adapt.freeze_last_layer": 0,
    "coda.adapt.seed": 0,
    "mae.epochs": 1, "mae.batch_size": 1, "mae.warmup_epochs": 0, "mae.log_every_steps": 1,
    "mae.ttt_steps": 1, "mae.ttt_copies": 1, "mae.ttt_chunk": 1, "mae.ttt_seed": 0,
    "tvn.head_steps": 1,
}
_MAY_BE_NONE = ("adapt.plate_chunk_size",)  # None: the unit's own batch size
_POSITIVE = ("train.learning_rate", "adapt.tent_lr", "dino.base_lr", "dino.min_lr",
             "dino.warmup_teacher_temp", "dino.teacher_temp", "dino.student_temp",
             "dino.knn_temperature", "coda.task.learning_rate", "coda.task.mlp_ratio",
             "coda.adapt.lr", "coda.adapt.min_lr", "coda.adapt.warmup_teacher_temp",
             "coda.adapt.teacher_temp", "mae.blr", "tvn.coral_lam", "tvn.head_lr")
# Numbers in [0, 1] (momenta, weight decays) and >= 0 (clip threshold; 0 = off).
_UNIT_INTERVAL = ("dino.momentum_teacher", "dino.centre_momentum", "dino.weight_decay",
                  "dino.weight_decay_end", "coda.task.weight_decay", "coda.adapt.weight_decay",
                  "coda.adapt.weight_decay_end", "coda.adapt.momentum_teacher",
                  "mae.weight_decay", "mae.ttt_momentum")
# Numbers strictly inside (0, 1).
_OPEN_UNIT_INTERVAL = ("mae.mask_ratio",)
_NON_NEGATIVE = ("dino.clip_grad", "coda.task.clip_grad", "coda.adapt.clip_grad", "mae.min_lr",
                 "mae.ttt_lr", "tvn.head_weight_decay")
# Numbers in [0, 1).
_HALF_OPEN_UNIT_INTERVAL = ("tvn.min_variance",)
_BOOLS = ("dino.global_clip", "dino.norm_last_layer", "coda.adapt.global_clip", "mae.norm_pix",
          "eval.retrieval", "tvn.per_unit", "tvn.coral")
_CHOICES = {
    "eval.unit": UNITS,
    "model.stem": STEMS,
    "arm.on_missing_controls": ("raise", "skip"),
    "adapt.on_missing_controls": ("raise", "perturbed_only"),
    "adapt.on_short_controls": ("raise", "resample"),
    "dino.pair_level": ("plate", "batch"),
    "dino.lr_scaling": ("linear", "none"),
    "coda.adapt.centre": ("zero", "pretrained"),
    "data.normalization": ("dataset", "per_image"),
    "data.source": tuple(worlds.LOADERS),
    "data.profiles.normalization": profiles.NORMALIZATIONS,
    "data.profiles.on_nonfinite": profiles.NONFINITE_POLICIES,
    "data.profiles.on_unlabelled": profiles.UNLABELLED_POLICIES,
    "eval.matrix_diagonal": splits.DIAGONALS,
    "mae.size": tuple(MAE_SIZES),
    "tvn.extractor": tvn_head.EXTRACTORS,
    "model.init_channel_rule": pretrained.CHANNEL_RULES,
}
_STRINGS = ("study", "checkpoint_dir", "data.cache_dir", "model.init")


def scalar_problems(cfg: Any) -> list[str]:
    """Types and ranges of the scalar fields (integers, positive numbers, choices, strings).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    out = []
    for key, lo in _INTEGERS.items():
        v = get(cfg, key)
        if v is MISSING:
            out.append(lacks(key))
        elif not ((is_int(v) and v >= lo) or (v is None and key in _MAY_BE_NONE)):
            out.append(bad(key, v, f"must be an integer >= {lo}"))
    for key in _POSITIVE:
        v = get(cfg, key)
        if v is MISSING:
            out.append(lacks(key))
        elif not (is_number(v) and v > 0):
            out.append(bad(key, v, "must be a number > 0"))
    for key, choices in _CHOICES.items():
        v = get(cfg, key)
        if v is MISSING:
            out.append(lacks(key))
        elif not (isinstance(v, str) and v in choices):
            out.append(f"config.{key}={v!r}: use one of {choices}")
    for key, ok, rule in ([(k, lambda v: 0 <= v <= 1, "a number in [0, 1]") for k in _UNIT_INTERVAL]
                          + [(k, lambda v: 0 < v < 1, "a number in (0, 1)")
                             for k in _OPEN_UNIT_INTERVAL]
                          + [(k, lambda v: 0 <= v < 1, "a number in [0, 1)")
                             for k in _HALF_OPEN_UNIT_INTERVAL]
                          + [(k, lambda v: v >= 0, "a number >= 0") for k in _NON_NEGATIVE]):
        v = get(cfg, key)
        if v is MISSING:
            out.append(lacks(key))
        elif not (is_number(v) and ok(v)):
            out.append(bad(key, v, f"must be {rule}"))
    for key in _BOOLS:
        v = get(cfg, key)
        if v is MISSING:
            out.append(lacks(key))
        elif not isinstance(v, bool):
            out.append(bad(key, v, "must be True or False"))
    v = get(cfg, "eval.adapt_on")
    if v is MISSING:
        out.append(lacks("eval.adapt_on"))
    elif not isinstance(v, str) or guarded(subsets.check_adapt_on, v):
        out.append(bad("eval.adapt_on", v, f"use one of {subsets.ADAPT_ON}, 'plate:<name>' "
                        "or 'batch:<name>'"))
    for key in _STRINGS:
        v = get(cfg, key)
        if v is MISSING:
            out.append(lacks(key))
        elif not isinstance(v, str) or (key != "checkpoint_dir" and not v):
            out.append(bad(key, v, "must be a non-empty string"))
    return out
