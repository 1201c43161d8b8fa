"""Checks a whole study config before anything is rendered or trained.

`validate(cfg)` checks every field a study reads -- types, ranges, names, and the
relations between fields (crop_size <= image_size, training sources among the
simulated ones, enough batches for the splits, batch sizes that split over the
processes and devices) -- and raises one `ConfigError` listing every problem, each naming the key,
its value and the fix. `jaxadapt.eval.study` calls it first, so a bad value fails in a
second instead of after minutes of rendering and training.

Checks that live beside the code that needs them are called from here, not restated:
the simulator design (`data.design.check_config`), the split counts
(`data.splits.batch_counts`, `in_domain_fraction`), the training loop's settings
(`train.loop.FitConfig`), the device and process split of a batch
(`train.supervised.check_batch_size`, `train.episodic.check_episodes`), the model and
method names (`models.build_model`, `adapt.registry`). The sweep's checks
live here; `eval.protocol.swept_settings` calls them.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from jaxadapt import config as defaults
from jaxadapt.adapt import registry, tvn_head
from jaxadapt.data import (design, profile_norm, profiles, profiles_config, schema, splits,
                           subsets, views, worlds)
from jaxadapt.eval import jump_checks
from jaxadapt.models import VIT_SIZES, build_model
from jaxadapt.models.mae import MAE_SIZES
from jaxadapt.models.resnet import STEMS
from jaxadapt.train import episodic, supervised
from jaxadapt.train import registry as trainer_registry
from jaxadapt.train.loop import FitConfig

MISSING = object()
#: Methods whose extractor trains on cross-batch pairs (two images split the local views).
CROSS_BATCH_METHODS = ("dino_cb", "dual_cb", "coda")
UNITS = ("plate", "batch", "source")
#: The command-line form of a sweep, quoted in every sweep error.
SWEEP_SYNTAX = """--config.sweep='({"L": 16, "N": 128},)'"""


class ConfigError(ValueError):
    """Every problem of a config: `problems`, one per line of the message."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(float(x))


# Swept keys -> (test, what a valid value is). L, alpha and unit are read by the protocol
# runner (how test units and batches are cut), N by cs_arm_bn.
SWEEP_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "L": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (test batch = context size)"),
    "alpha": (lambda v: (isinstance(v, str) and v == "balanced") or (_is_number(v) and v > 0),
              "a number > 0 or 'balanced' (Dirichlet label shift)"),
    "N": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (controls per test context)"),
    "unit": (lambda v: isinstance(v, str) and v in UNITS, f"one of {UNITS} (adaptation unit)"),
    "adapt_on": (lambda v: not _guarded(subsets.check_adapt_on, v),
                 f"one of {subsets.ADAPT_ON}, 'plate:<name>' or 'batch:<name>' "
                 "(adaptation subset)"),
}

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
    "data.normalization": ("dataset", "per_image"),
    "data.source": tuple(worlds.LOADERS),
    "data.profiles.normalization": profile_norm.METHODS,
    "data.profiles.on_nonfinite": profiles.NONFINITE_POLICIES,
    "data.profiles.on_unlabelled": profiles.UNLABELLED_POLICIES,
    "eval.matrix_diagonal": splits.DIAGONALS,
    "mae.size": tuple(MAE_SIZES),
    "tvn.extractor": tvn_head.EXTRACTORS,
}
_STRINGS = ("study", "checkpoint_dir", "data.cache_dir")
# Episodes per step each episodic trainer splits over processes x local devices (whole
# episodes per process; on one host they fall back to fewer devices).
_EPISODE_SPLIT = {"arm_bn": "arm.episodes_per_step", "cs_arm_bn": "arm.episodes_per_step",
                  "ben": "arm.episodes_per_step"}


def get(cfg: Any, key: str) -> Any:
    """The value at dotted `key` of `cfg`, or `MISSING`."""
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError, IndexError):
            return MISSING
    return node


@functools.lru_cache(maxsize=1)
def _defaults() -> ml_collections.ConfigDict:
    return defaults.get_defaults()


def _example(key: str) -> str:
    """A valid command-line value for `key`: its default."""
    value = get(_defaults(), key)
    return repr(value) if isinstance(value, (str, tuple)) else str(value)


def _bad(key: str, value: Any, rule: str) -> str:
    return f"config.{key}={value!r}: {rule}; set e.g. --config.{key}={_example(key)}"


def _lacks(key: str) -> str:
    return (f"config lacks {key}; start from jaxadapt.config.get_defaults(), which sets "
            "every field a study reads")


def _scalar_problems(cfg: Any) -> list[str]:
    """Types and ranges of the scalar fields (integers, positive numbers, choices, strings)."""
    out = []
    for key, lo in _INTEGERS.items():
        v = get(cfg, key)
        if v is MISSING:
            out.append(_lacks(key))
        elif not ((_is_int(v) and v >= lo) or (v is None and key in _MAY_BE_NONE)):
            out.append(_bad(key, v, f"must be an integer >= {lo}"))
    for key in _POSITIVE:
        v = get(cfg, key)
        if v is MISSING:
            out.append(_lacks(key))
        elif not (_is_number(v) and v > 0):
            out.append(_bad(key, v, "must be a number > 0"))
    for key, choices in _CHOICES.items():
        v = get(cfg, key)
        if v is MISSING:
            out.append(_lacks(key))
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
            out.append(_lacks(key))
        elif not (_is_number(v) and ok(v)):
            out.append(_bad(key, v, f"must be {rule}"))
    for key in _BOOLS:
        v = get(cfg, key)
        if v is MISSING:
            out.append(_lacks(key))
        elif not isinstance(v, bool):
            out.append(_bad(key, v, "must be True or False"))
    v = get(cfg, "eval.adapt_on")
    if v is MISSING:
        out.append(_lacks("eval.adapt_on"))
    elif not isinstance(v, str) or _guarded(subsets.check_adapt_on, v):
        out.append(_bad("eval.adapt_on", v, f"use one of {subsets.ADAPT_ON}, 'plate:<name>' "
                        "or 'batch:<name>'"))
    for key in _STRINGS:
        v = get(cfg, key)
        if v is MISSING:
            out.append(_lacks(key))
        elif not isinstance(v, str) or (key != "checkpoint_dir" and not v):
            out.append(_bad(key, v, "must be a non-empty string"))
    return out


def _names(cfg: Any, key: str, allowed: Any, what: str, rule: str = "",
           adjective: str = "") -> list[str]:
    """A non-empty tuple of distinct values, each in `allowed` (a container or a test)."""
    v = get(cfg, key)
    syntax = f"pass a tuple, e.g. --config.{key}=\"{_example(key)}\""
    if v is MISSING:
        return [_lacks(key)]
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or not v:
        return [f"config.{key}={v!r}: must be a non-empty tuple; {syntax}"]
    ok = allowed if callable(allowed) else (lambda x: isinstance(x, str) and x in allowed)
    bad = [x for x in v if not ok(x)]
    if bad:
        known = f"; {rule}" if rule else f"; use some of {tuple(allowed)}"
        # `--config.methods=erm,tent` arrives as ('erm,tent',): show the tuple syntax.
        hint = f"; {syntax}" if any(isinstance(x, str) and "," in x for x in bad) else ""
        adjective = adjective or ("invalid" if callable(allowed) else "unknown")
        listed = ", ".join(repr(x) for x in bad)
        return [f"config.{key}={tuple(v)!r}: {adjective} {what} {listed}{known}{hint}"]
    if len(set(v)) != len(v):
        return [f"config.{key}={tuple(v)!r} lists a value twice (it would be scored twice); "
                "list each once"]
    return []


def _study_problems(cfg: Any) -> list[str]:
    """seeds, methods, train_sources, eval_splits and how they fit the simulated design."""
    if _profiles(cfg):  # the sources are known once the tables are read (worlds.load_world)
        out = _names(cfg, "seeds", lambda s: _is_int(s) and s >= 0, "seed", "use integers >= 0")
        out += _names(cfg, "methods", registry.available(), "method")
        out += _names(cfg, "train_sources", lambda s: isinstance(s, str) and bool(s), "source",
                      "use the profiles' Metadata_Source names")
        return out + _names(cfg, "eval_splits", _is_split, "split",
                            f"use some of {splits.SPLITS} or source pairs 'source:<a>-><b>'",
                            "unknown")
    key, sources = _source_names(cfg)
    out = _names(cfg, "seeds", lambda s: _is_int(s) and s >= 0, "seed", "use integers >= 0")
    out += _names(cfg, "methods", registry.available(), "method")
    if sources is None:  # real data, no source subset: the names are known once it is read
        out += _names(cfg, "train_sources", lambda s: isinstance(s, str) and s, "source",
                      "use Metadata_Source names, e.g. 'source_3'")
    else:
        out += _names(cfg, "train_sources", sources, "source",
                      f"use some of config.{key}={sources!r}")
    out += _names(cfg, "eval_splits", _is_split, "split",
                  f"use some of {splits.SPLITS} or source pairs 'source:<a>-><b>'", "unknown")
    if sources is None:
        return out
    out += _pair_problems(cfg, sources, key)
    evals, trains = get(cfg, "eval_splits"), get(cfg, "train_sources")
    if isinstance(evals, (tuple, list)) and "new_source" in evals:
        for src in trains if isinstance(trains, (tuple, list)) else ():
            if src in sources and not set(sources) - {src}:
                out.append(f"config.eval_splits={tuple(evals)!r} scores new_source, but "
                           f"config.{key}={sources!r} has no source besides the "
                           f"training source {src!r}; add one (e.g. 'source_8') or drop "
                           "new_source from config.eval_splits")
    return out


def _source_names(cfg: Any) -> tuple[str, tuple | None]:
    """(config key, the study's source names), or (key, None) where unknown before reading."""
    key = "data.jump.sources" if get(cfg, "data.source") == "jump" else "data.sim.sources"
    sources = get(cfg, key)
    sources = tuple(sources) if isinstance(sources, (tuple, list)) else ()
    if key == "data.jump.sources" and not sources:
        return key, None
    return key, sources


def _is_split(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    try:
        return name in splits.SPLITS or splits.parse_pair(name) is not None
    except ValueError:
        return False


def _pair_problems(cfg: Any, sources: tuple, key: str = "data.sim.sources") -> list[str]:
    """Source pairs in eval_splits: both names simulated, the first one trained on."""
    evals, trains = get(cfg, "eval_splits"), get(cfg, "train_sources")
    trains = tuple(trains) if isinstance(trains, (tuple, list)) else ()
    out = []
    for name in evals if isinstance(evals, (tuple, list)) else ():
        pair = splits.parse_pair(name) if _is_split(name) else None
        if pair is None:
            continue
        unknown = [s for s in pair if s not in sources]
        if unknown:
            out.append(f"config.eval_splits: {name!r} names unknown source(s) {unknown}; "
                       f"valid sources: config.{key}={sources!r}")
        elif pair[0] not in trains:
            out.append(f"config.eval_splits: {name!r} scores models trained on {pair[0]!r}, "
                       f"which config.train_sources={trains!r} does not train; add it there "
                       "or drop the pair")
    return out


def _data_problems(cfg: Any) -> list[str]:
    """The simulator design, and the fields that must agree with it."""
    sim = get(cfg, "data.sim")
    if sim is MISSING:
        return [_lacks("data.sim")]
    out = [m if not m.startswith("sim ") else "config.data.sim." + m[4:]  # "sim <field>=..."
           for m in _guarded(design.check_config, sim)]
    if _profiles(cfg):
        return out + _guarded(splits.in_domain_fraction, cfg.splits)
    if get(cfg, "model.name") == "mlp":
        out.append("config.model.name='mlp' takes CellProfiler profiles, not images; set "
                   "--config.data.source=jump_profiles (and data.profiles), or use a resnet/vit")
    if get(cfg, "data.source") == "jump":  # the simulator's design is not what runs
        ok = not jump_checks.key_problems(cfg)  # their own messages come from _CHECKS
        return out + (jump_checks.jump_problems(cfg) if ok else [])
    crop, size = get(cfg, "data.crop_size"), get(sim, "image_size")
    if _is_int(crop) and _is_int(size) and crop > size:
        out.append(f"config.data.crop_size={crop} exceeds config.data.sim.image_size={size}; "
                   f"set crop_size <= {size} or raise image_size")
    preset = get(sim, "preset")
    classes = design.num_classes(preset) if preset in design.PRESETS else 1
    channels = len(schema.CHANNELS)
    k = get(cfg, "model.num_classes")
    if _is_int(k) and k < classes:
        out.append(f"config.model.num_classes={k}: the {get(sim, 'preset')} simulator has "
                   f"{classes} classes; set --config.model.num_classes={classes}")
    c = get(cfg, "model.in_channels")
    if _is_int(c) and c != channels:
        out.append(f"config.model.in_channels={c}: the simulator renders {channels} channels "
                   f"{schema.CHANNELS}; set --config.model.in_channels={channels}")
    trains, n_batches = get(cfg, "train_sources"), get(sim, "batches_per_source")
    for src in trains if isinstance(trains, (tuple, list)) and _is_int(n_batches) else ():
        out += _guarded(splits.batch_counts, cfg.splits, n_batches, src)
    out += _guarded(splits.in_domain_fraction, cfg.splits)
    return out


def _profiles(cfg: Any) -> bool:
    return get(cfg, "data.source") == "jump_profiles"


def _profile_problems(cfg: Any) -> list[str]:
    """The `data.profiles` section (`profiles_config`), and the MLP on 1 x 1 inputs it needs."""
    section = get(cfg, "data.profiles")
    if section is MISSING:
        return [_lacks("data.profiles")]
    out = profiles_config.section_problems(section, reads_profiles=_profiles(cfg))
    if not _profiles(cfg):
        return out
    if get(cfg, "model.name") != "mlp":
        out.append(f"config.model.name={get(cfg, 'model.name')!r}: profiles are feature "
                   "vectors; set --config.model.name=mlp")
    if get(cfg, "data.crop_size") != 1:
        out.append(f"config.data.crop_size={get(cfg, 'data.crop_size')!r}: a profile is a "
                   "1 x 1 record; set --config.data.crop_size=1")
    return out


def _dino_problems(cfg: Any) -> list[str]:
    """The DINO views against the image and the ViT's patch size (only for ViT models)."""
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
    out = _guarded(views.check_views_config, get(cfg, "dino.views"),
                   size if _is_int(size) else None, patch_size=patch, paired=paired,
                   where="config.dino.views")
    dim, heads = get(cfg, "coda.task.embed_dim"), get(cfg, "coda.task.num_heads")
    if _is_int(dim) and _is_int(heads) and heads > 0 and dim % heads:
        out.append(f"config.coda.task.embed_dim={dim} is not divisible by "
                   f"config.coda.task.num_heads={heads}; choose a head count dividing it")
    crop = get(cfg, "data.crop_size")
    if _is_int(crop) and _is_int(patch) and patch > 0 and crop % patch:
        out.append(f"config.data.crop_size={crop} (the evaluation crop) is not divisible by "
                   f"the ViT patch size {patch}; use a multiple of {patch}")
    return out


def _tvn_problems(cfg: Any) -> list[str]:
    """The `tvn` method's extractor against the model and the embedding file (if it runs)."""
    methods, extractor = get(cfg, "methods"), get(cfg, "tvn.extractor")
    path, name = get(cfg, "tvn.embeddings_file"), get(cfg, "model.name")
    out = [] if isinstance(path, str) else [_bad("tvn.embeddings_file", path,
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


def _guarded(check: Callable, *args, **kwargs) -> list[str]:
    try:
        check(*args, **kwargs)
    except ValueError as err:
        return [str(err)]
    return []


def _train_problems(cfg: Any) -> list[str]:
    """The training loop's settings, checked by the loop's own FitConfig."""
    t = cfg.train
    try:
        FitConfig(num_epochs=t.num_epochs, patience=t.patience, log_every_steps=t.log_every_steps,
                  stop_after_epochs=t.stop_after_epochs or None, progress=False)
    except ValueError as err:
        return [str(err).replace("FitConfig.", "config.train.", 1)]
    return []


def _device_problems(cfg: Any) -> list[str]:
    """What needs the built methods: their adaptation subsets, their trainers being
    registered, and the batch sizes and episode counts those trainers split over devices.

    On several processes (hosts) each process reads its own equal share of every batch:
    a batch size must divide by processes x local devices, and so must the episodes
    per step of an episodic trainer (on one host they need not). Builds the model and
    each method (cheap: nothing is initialized or compiled) to learn which trainers the
    study runs; so it runs on an otherwise valid config only.
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
        out += _guarded(supervised.check_batch_size, get(cfg, key), f"config.{key}")
    for key in sorted({_EPISODE_SPLIT[t] for t in names if t in _EPISODE_SPLIT}):
        out += _guarded(episodic.check_episodes, get(cfg, key))
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


def sweep_problems(sweep: Any) -> list[str]:
    """What is wrong with `config.sweep` (a tuple of dicts of known keys); [] if nothing.

    Args:
      sweep: the value of `config.sweep` (None or () for no sweep).

    Returns:
      One message per problem, each naming the setting, the key, the value and the fix.
    """
    if sweep is None or sweep is MISSING:
        return []
    if isinstance(sweep, (str, bytes)):
        return [f"config.sweep={sweep!r} is a string; a sweep is a tuple of dicts, "
                f"e.g. {SWEEP_SYNTAX}"]
    if isinstance(sweep, (Mapping, ml_collections.ConfigDict)):
        return [f"config.sweep={sweep!r} is one dict; a sweep is a tuple of them, "
                f"e.g. {SWEEP_SYNTAX}"]
    if not isinstance(sweep, (tuple, list)):
        return [f"config.sweep={sweep!r}: a sweep is a tuple of dicts, e.g. {SWEEP_SYNTAX}"]
    if sweep and all(isinstance(s, str) and s in SWEEP_KEYS for s in sweep):
        return [f"config.sweep={tuple(sweep)!r} holds key names, not settings: a single dict on "
                f"the command line is read as its keys; wrap it in a tuple (note the trailing "
                f"comma), e.g. {SWEEP_SYNTAX}"]
    out = []
    not_dicts = [s for s in sweep if not isinstance(s, (Mapping, ml_collections.ConfigDict))]
    if not_dicts:  # one message: the same fix holds for every such setting
        out.append(f"config.sweep setting {not_dicts[0]!r} is a {type(not_dicts[0]).__name__}, "
                   f"not a dict; write each setting as a dict of {sorted(SWEEP_KEYS)}, "
                   f"e.g. {SWEEP_SYNTAX}")
    for s in sweep:
        if not isinstance(s, (Mapping, ml_collections.ConfigDict)):
            continue
        for key in s.keys():
            if key not in SWEEP_KEYS:
                known = "; ".join(f"{k}: {what}" for k, (_, what) in SWEEP_KEYS.items())
                out.append(f"config.sweep setting {dict(s)}: unknown key {key!r}; "
                           f"known keys: {known}")
            elif not SWEEP_KEYS[key][0](s[key]):
                out.append(f"config.sweep setting {dict(s)}: {key}={s[key]!r}; "
                           f"use {SWEEP_KEYS[key][1]}")
    return out


_CHECKS = (_scalar_problems, jump_checks.key_problems, _study_problems, _data_problems,
           _profile_problems, _train_problems, _dino_problems, _tvn_problems,
           lambda cfg: _guarded(build_model, cfg.model),
           lambda cfg: sweep_problems(get(cfg, "sweep")))


def problems(cfg: ml_collections.ConfigDict) -> list[str]:
    """Every problem of a study config, each naming the key, its value and the fix.

    Args:
      cfg: the study config (see `jaxadapt.config.get_defaults`).

    Returns:
      The messages, in a fixed order; [] for a valid config.
    """
    out: list[str] = []
    for check in _CHECKS:
        try:
            found = check(cfg)
        except ValueError as err:  # a reused check that raises the first problem
            found = [str(err)]
        except (KeyError, AttributeError, TypeError) as err:
            found = [f"config is malformed near {err}; start from jaxadapt.config.get_defaults()"]
        out += [p for p in found if p not in out]
    if not out:
        out = _device_problems(cfg)
    return out


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` (a ValueError) listing every problem of a study config.

    Args:
      cfg: the study config.

    Raises:
      ConfigError: one line per problem, each naming the key, its value and the fix.
    """
    found = problems(cfg)
    if found:
        raise ConfigError(found)
