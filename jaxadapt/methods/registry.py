"""Every method and every training recipe of jaxadapt, in two tables read top to bottom.

A method (`METHODS`) is a factory ``(model, study config, swept setting) -> Method``
(`jaxadapt.methods.base.Method`); it names the training recipe (`TRAINERS`,
`jaxadapt.methods.recipe.Trainer`) whose weights it adapts and scores. A new paper is
one new folder under `jaxadapt/methods/` plus its rows here. Importing this module
alone knows them all; nothing registers itself on import. Research code can add its own
with `register_method` and `register_trainer`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import ml_collections

from jaxadapt.methods.base import Method
from jaxadapt.methods.bn import adabn, arm, ben, checks as bn_checks, episodic, erm, tent
from jaxadapt.methods.coda import (checks as coda_checks, dino_trainer, knn, mae_trainer, online,
                                   task_trainer)
from jaxadapt.methods.recipe import TrainFn, Trainer, check_sections, recipe_key, unused_data_keys
from jaxadapt.methods.tvn import checks as tvn_checks, head as tvn_head, trainer as tvn_trainer
from jaxadapt.train import supervised


__all__ = ["METHODS", "TRAINERS", "Factory", "TrainFn", "Trainer", "build_trainers",
           "checkpoint_key", "config_problems", "get", "make_method", "method_names",
           "register_method", "register_trainer", "trainer_names", "unused_data_keys"]

#: name -> (model, study config, swept setting) -> Method. A setting holds the values a
#: study sweeps (e.g. {"N": 16}); a method reads what concerns it and ignores the rest.
Factory = Callable[[nn.Module, ml_collections.ConfigDict, Mapping[str, Any]], Method]

METHODS: dict[str, Factory] = {
    # --- BatchNorm adaptation (Sanchez-Fernandez et al.): jaxadapt.methods.bn
    "erm": lambda model, cfg, setting: erm.erm(model),
    "adabn": adabn.adabn,
    "adabn_plate": adabn.adabn_plate,
    "ben": ben.ben,
    "tent": tent.tent,
    "arm_bn": arm.arm_bn,
    "cs_arm_bn": arm.cs_arm_bn,
    "cs_arm_bn_plate": arm.cs_arm_bn_plate,
    # --- Self-supervised online adaptation (Haslum et al., CODA): jaxadapt.methods.coda
    # kNN probes of a frozen ViT extractor (rows knn_accuracy, knn_macro_f1).
    "dino": knn.knn_method("dino", "dino"),
    "dino_cb": knn.knn_method("dino_cb", "dino_cb"),
    "random_init": knn.knn_method("random_init", "random_init"),
    # Task models scored as trained: the supervised ViT, the frozen dual models.
    "supervised": task_trainer.frozen_method("supervised", "supervised",
                                             task_trainer.vit_classifier),
    "dual_dino": task_trainer.frozen_method("dual_dino", "dual_dino", task_trainer.dual_model),
    "dual_cb": task_trainer.frozen_method("dual_cb", "dual_cb", task_trainer.dual_model),
    "dual_mae": task_trainer.frozen_method("dual_mae", "dual_mae", mae_trainer.dual_mae_model),
    # The extractor adapted online on each unlabelled unit: with DINO (ODA; CODA's
    # extractor trained on cross-batch pairs), with MAE's objective, or per image (TTT-MAE).
    "oda": online.online_method("oda", "dual_dino", lambda cfg: "none"),
    "coda": online.online_method("coda", "dual_cb", lambda cfg: cfg.dino.pair_level),
    "oda_mae": mae_trainer.oda_mae_method,
    "ttt_mae": mae_trainer.ttt_mae_method,
    # --- Frozen embeddings -> TVN (each unit aligned on its controls) -> linear head
    "tvn": tvn_head.tvn,
}


def _tvn_trainer(model: nn.Module, cfg: ml_collections.ConfigDict) -> TrainFn:
    """`tvn` on the frozen extractor of another recipe (erm, dino), or on a user's file."""
    name = cfg.tvn.extractor
    if name == "file":
        return tvn_trainer.make_tvn_trainer(model, cfg)
    extractor = (get(name).build(model, cfg), checkpoint_key(cfg, name))
    return tvn_trainer.make_tvn_trainer(model, cfg, extractor=extractor)


_ERM_BATCHES = ("train.batch_size", "train.eval_batch_size")
# ARM-BN episodes hold no controls: the control fields never reach its weights.
_NO_CONTROLS = ("arm.n_controls", "arm.on_missing_controls")
# The kNN settings shape DINO's probe and bank, never the weights.
_KNN = ("dino.knn_k", "dino.knn_temperature", "dino.knn_bank_size", "dino.log_every_steps")
# Online adaptation settings never reach trained weights: ODA / CODA apply them at test time.
_ADAPT_ONLY = ("coda.adapt",)
_TTT_ONLY = ("mae.ttt_steps", "mae.ttt_lr", "mae.ttt_momentum", "mae.ttt_copies",
             "mae.ttt_chunk", "mae.ttt_seed")
_TASK_BATCHES = ("coda.task.batch_size", "coda.task.eval_batch_size")


def _episodic(**kwargs) -> Callable[[nn.Module, ml_collections.ConfigDict], TrainFn]:
    return lambda model, cfg: episodic.make_episodic_trainer(model, cfg, **kwargs)


TRAINERS: dict[str, Trainer] = {t.name: check_sections(t) for t in (
    # --- BatchNorm family: ERM, and the meta-learned episodes of ARM-BN, CS-ARM-BN, BEN.
    Trainer("erm", ("train",), supervised.make_erm_trainer, device_batch_fields=_ERM_BATCHES),
    Trainer("arm_bn", ("train", "arm"), _episodic(with_controls=False), ignored=_NO_CONTROLS,
            device_check=bn_checks.episode_problems),
    Trainer("cs_arm_bn", ("train", "arm"), _episodic(with_controls=True),
            device_check=bn_checks.episode_problems),
    Trainer("ben", ("train", "arm"), _episodic(with_controls=True, stats="controls"),
            device_check=bn_checks.episode_problems),
    # --- CODA family. DINO reads only its own section; its batch is split over every
    # device and host.
    Trainer("dino", ("dino",), lambda m, c: dino_trainer.make_dino_trainer(c),
            ignored=_KNN + ("dino.pair_level",), device_batch_fields=("dino.batch_size",)),
    Trainer("dino_cb", ("dino",),
            lambda m, c: dino_trainer.make_dino_trainer(c, pairs=c.dino.pair_level),
            ignored=_KNN, device_batch_fields=("dino.batch_size",)),
    Trainer("random_init", ("dino",), lambda m, c: dino_trainer.make_random_init_trainer(c),
            ignored=_KNN + ("dino.pair_level",)),
    # The supervised ViT reads the task recipe only; the dual models read their
    # extractor's section too (it is pretrained first).
    Trainer("supervised", ("coda",), lambda m, c: task_trainer.make_supervised_trainer(c),
            ignored=_ADAPT_ONLY, device_batch_fields=_TASK_BATCHES),
    Trainer("dual_dino", ("dino", "coda"), lambda m, c: task_trainer.make_dual_trainer(c),
            ignored=_KNN + ("dino.pair_level",) + _ADAPT_ONLY,
            device_batch_fields=("dino.batch_size",) + _TASK_BATCHES),
    Trainer("dual_cb", ("dino", "coda"),
            lambda m, c: task_trainer.make_dual_trainer(c, pairs=c.dino.pair_level),
            ignored=_KNN + _ADAPT_ONLY, device_batch_fields=("dino.batch_size",) + _TASK_BATCHES),
    Trainer("dual_mae", ("mae", "coda"), lambda m, c: mae_trainer.make_dual_mae_trainer(c),
            ignored=_ADAPT_ONLY + _TTT_ONLY,
            device_batch_fields=("mae.batch_size",) + _TASK_BATCHES),
    # --- TVN: the extractor's own recipe (erm or dino) is keyed by its sections, which
    # are therefore this recipe's too; its weights come from that recipe's checkpoint.
    Trainer("tvn", ("train", "dino", "tvn"), _tvn_trainer, ignored=_KNN + ("dino.pair_level",),
            device_batch_fields=_ERM_BATCHES),
)}

#: Each family's checks of its own config sections (run by `jaxadapt.eval.validation`).
CONFIG_CHECKS: tuple[Callable[[Any], list[str]], ...] = (
    coda_checks.dino_problems, coda_checks.init_problems, tvn_checks.tvn_problems)


def method_names() -> list[str]:
    """Names of the methods this version implements."""
    return sorted(METHODS)


def trainer_names() -> list[str]:
    """Names of the training recipes."""
    return sorted(TRAINERS)


def register_method(name: str, factory: Factory) -> Factory:
    """Adds a method of the caller's own (research code); the built-in ones are `METHODS`.

    Args:
      name: the method name; must be new.
      factory: ``(model, cfg, setting) -> Method``.

    Returns:
      `factory`.

    Raises:
      ValueError: the name is taken.
    """
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered; pick another name")
    METHODS[name] = factory
    return factory


def register_trainer(trainer: Trainer) -> Trainer:
    """Adds a training recipe of the caller's own; the built-in ones are `TRAINERS`.

    Args:
      trainer: the recipe; its name must be new.

    Returns:
      `trainer`.

    Raises:
      ValueError: the name is taken, or a section repeats a common one.
    """
    if trainer.name in TRAINERS:
        raise ValueError(f"trainer {trainer.name!r} is already registered; pick another name")
    TRAINERS[trainer.name] = check_sections(trainer)
    return trainer


def make_method(name: str, model: nn.Module, cfg: ml_collections.ConfigDict,
                setting: Mapping[str, Any] | None = None) -> Method:
    """Builds method `name` for `model`.

    Args:
      name: a method name, e.g. "erm".
      model: the architecture.
      cfg: the study config (methods read their own sub-config from it).
      setting: swept values of this evaluation, e.g. {"L": 16, "N": 128}; default none.

    Returns:
      The Method.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise ValueError(
            f"config.methods names unknown method {name!r}; available: {method_names()}"
        )
    return METHODS[name](model, cfg, setting or {})


def get(name: str) -> Trainer:
    """The training recipe `name`.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in TRAINERS:
        raise ValueError(f"no training recipe {name!r}; known trainers: {trainer_names()}")
    return TRAINERS[name]


def checkpoint_key(cfg: ml_collections.ConfigDict, trainer: str) -> str:
    """A short hash of everything that determines the weights recipe `trainer` produces.

    What enters the hash is what the recipe declares (`jaxadapt.methods.recipe.recipe_key`).
    A recipe built on another one's weights (e.g. `tvn` on the `erm` extractor) finds
    that recipe's checkpoint by this key.

    Args:
      cfg: the (training) config.
      trainer: the recipe's name.

    Returns:
      `<trainer>-<12 hex digits>`.

    Raises:
      ValueError: an unknown recipe, naming the known ones.
    """
    return recipe_key(cfg, get(trainer))


def build_trainers(model: nn.Module, cfg: ml_collections.ConfigDict,
                   names: set[str] | list[str]) -> dict[str, TrainFn]:
    """The training functions of `names`, each built once for `model` and `cfg`.

    Args:
      model: the architecture.
      cfg: the (training) config.
      names: recipe names.

    Returns:
      name -> `train(view, rows, run_dir, seed) -> variables`.

    Raises:
      ValueError: naming unknown recipes and the known ones.
    """
    unknown = sorted(set(names) - set(TRAINERS))
    if unknown:
        raise ValueError(f"no training recipe for {unknown}; known trainers: {trainer_names()}")
    return {name: TRAINERS[name].build(model, cfg) for name in sorted(names)}


def config_problems(cfg: Any) -> list[str]:
    """Every method family's problems with its own config sections.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    return [p for check in CONFIG_CHECKS for p in check(cfg)]
