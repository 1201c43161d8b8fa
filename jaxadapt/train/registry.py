"""Training recipes by name, as `jaxadapt.adapt.registry` holds the methods.

A recipe (`Trainer`) declares what defines the weights it produces -- the config
sections it reads besides the shared ones (`COMMON_SECTIONS`) and the fields of those
sections it never reads -- and how it is built. The protocol runner derives the
checkpoint key (`jaxadapt.eval.protocol.training_key`) from that declaration, so a new
recipe with its own section (e.g. `dino`) is keyed by it without touching the runner.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import ml_collections

from jaxadapt.data import worlds
from jaxadapt.train import (dino_trainer, episodic, mae_trainer, online, supervised,
                            task_trainer, tvn_trainer)

#: (data view, rows of each split, checkpoint dir, seed) -> trained variables.
TrainFn = Callable[[Any, dict, str, int], dict]
#: Sections every recipe's weights depend on: the data, how it is split, the architecture.
COMMON_SECTIONS = ("data", "splits", "model")
#: Fields of the common sections that never change weights (speed, paths).
NOT_TRAINING = ("data.num_threads", "data.cache_dir")


class Trainer(NamedTuple):
    """A training recipe as the protocol runner sees it.

    Attributes:
      name: the name methods give as `Method.trainer` (e.g. "erm").
      sections: top-level config sections it reads besides `COMMON_SECTIONS`
        (e.g. ("train", "arm")); they, and only they, enter its checkpoint key.
      build: (model, study config) -> `train(view, rows, run_dir, seed) -> variables`;
        built once per study so its jitted steps compile once.
      ignored: dotted fields inside its sections it never reads (e.g.
        "arm.n_controls" for episodes without controls): changing them neither
        retrains nor re-keys its models.
      device_batch_fields: dotted batch-size fields it splits over the local devices
        (checked by `jaxadapt.eval.validation` before anything runs).
    """

    name: str
    sections: tuple[str, ...]
    build: Callable[[nn.Module, ml_collections.ConfigDict], TrainFn]
    ignored: tuple[str, ...] = ()
    device_batch_fields: tuple[str, ...] = ()

    def reads(self, key: str) -> bool:
        """Whether dotted config `key` can change this recipe's weights.

        Args:
          key: e.g. "arm.n_controls".

        Returns:
          False for keys outside its sections, in `ignored` (or below one) or in
          `NOT_TRAINING`.
        """
        if key.split(".")[0] not in COMMON_SECTIONS + self.sections:
            return False
        return not any(key == i or key.startswith(i + ".") for i in self.ignored + NOT_TRAINING)


_TRAINERS: dict[str, Trainer] = {}


def register(trainer: Trainer) -> Trainer:
    """Adds a recipe to the registry.

    Args:
      trainer: the recipe; its name must be new.

    Returns:
      `trainer` (so a module can register at import time and keep the value).

    Raises:
      ValueError: the name is taken, or a section repeats a common one.
    """
    if trainer.name in _TRAINERS:
        raise ValueError(f"trainer {trainer.name!r} is already registered; pick another name")
    shared = set(trainer.sections) & set(COMMON_SECTIONS)
    if shared:
        raise ValueError(f"trainer {trainer.name!r}: sections {sorted(shared)} are common to "
                         f"every trainer ({COMMON_SECTIONS}); list only its own sections")
    _TRAINERS[trainer.name] = trainer
    return trainer


def available() -> list[str]:
    """Names of the registered recipes."""
    return sorted(_TRAINERS)


def get(name: str) -> Trainer:
    """The recipe `name`.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in _TRAINERS:
        raise ValueError(f"no training recipe {name!r}; known trainers: {available()}")
    return _TRAINERS[name]


def checkpoint_key(cfg: ml_collections.ConfigDict, trainer: str) -> str:
    """A short hash of everything that determines the weights a recipe produces.

    What enters the hash is what the recipe declares: the common sections and its own,
    without its ignored fields and `NOT_TRAINING`. `jaxadapt.eval.protocol.training_key`
    is this function; it lives here so that a recipe built on another one's weights
    (e.g. `tvn` on the `erm` extractor) finds that recipe's checkpoint.

    Args:
      cfg: the (training) config.
      trainer: the recipe's name.

    Returns:
      `<trainer>-<12 hex digits>`.

    Raises:
      ValueError: an unknown recipe, naming the known ones.
    """
    recipe = get(trainer)
    spec = {k: _plain(cfg[k]) for k in COMMON_SECTIONS + recipe.sections if k in cfg}
    for path in NOT_TRAINING + recipe.ignored + unused_data_keys(cfg):
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return f"{trainer}-{digest[:12]}"


def unused_data_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Keys the study's data source and model never read, left out of its training keys.

    The data part is the source's own declaration (`jaxadapt.data.worlds.inert_keys`): a
    simulator study's weights do not depend on the real-data or profile settings, a
    real-data study's not on the simulator's or on how fast its store is built. The model
    part: a ResNet's weights do not depend on the MLP's depth. Leaving them out also keeps
    the training keys, hence the checkpoints, that simulator studies had before real data
    and profiles existed.

    Args:
      cfg: the study config.

    Returns:
      Dotted keys.
    """
    out = worlds.inert_keys(cfg)
    if cfg.get("model", {}).get("name") != "mlp":
        out += ("model.mlp_hidden_layers",)
    return out


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


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
    unknown = sorted(set(names) - set(_TRAINERS))
    if unknown:
        raise ValueError(f"no training recipe for {unknown}; known trainers: {available()}")
    return {name: _TRAINERS[name].build(model, cfg) for name in sorted(names)}


_ERM_BATCHES = ("train.batch_size", "train.eval_batch_size")
# ARM-BN episodes hold no controls: the control fields never reach its weights.
_NO_CONTROLS = ("arm.n_controls", "arm.on_missing_controls")

register(Trainer("erm", ("train",), supervised.make_erm_trainer,
                 device_batch_fields=_ERM_BATCHES))
register(Trainer("arm_bn", ("train", "arm"),
                 lambda m, c: episodic.make_episodic_trainer(m, c, with_controls=False),
                 ignored=_NO_CONTROLS))
register(Trainer("cs_arm_bn", ("train", "arm"),
                 lambda m, c: episodic.make_episodic_trainer(m, c, with_controls=True)))
register(Trainer("ben", ("train", "arm"),
                 lambda m, c: episodic.make_episodic_trainer(m, c, with_controls=True,
                                                             stats="controls")))

# DINO reads only its own section (and the common ones); the kNN settings shape the probe
# and the bank, never the weights. Its batch is split over every device and host.
_KNN = ("dino.knn_k", "dino.knn_temperature", "dino.knn_bank_size", "dino.log_every_steps")
register(Trainer("dino", ("dino",), lambda m, c: dino_trainer.make_dino_trainer(c),
                 ignored=_KNN + ("dino.pair_level",), device_batch_fields=("dino.batch_size",)))
register(Trainer("dino_cb", ("dino",),
                 lambda m, c: dino_trainer.make_dino_trainer(c, pairs=c.dino.pair_level),
                 ignored=_KNN, device_batch_fields=("dino.batch_size",)))
register(Trainer("random_init", ("dino",), lambda m, c: dino_trainer.make_random_init_trainer(c),
                 ignored=_KNN + ("dino.pair_level",)))

# CODA (issue 9): the supervised ViT reads the task recipe only; the dual models read DINO's
# section too (their extractor is pretrained first). Online adaptation settings
# (coda.adapt) never reach trained weights: ODA / CODA apply them at test time.
_ADAPT_ONLY = ("coda.adapt",)
register(Trainer("supervised", ("coda",), lambda m, c: task_trainer.make_supervised_trainer(c),
                 ignored=_ADAPT_ONLY, device_batch_fields=("coda.task.batch_size",
                                                           "coda.task.eval_batch_size")))
register(Trainer("dual_dino", ("dino", "coda"),
                 lambda m, c: task_trainer.make_dual_trainer(c),
                 ignored=_KNN + ("dino.pair_level",) + _ADAPT_ONLY,
                 device_batch_fields=("dino.batch_size", "coda.task.batch_size",
                                      "coda.task.eval_batch_size")))
register(Trainer("dual_cb", ("dino", "coda"),
                 lambda m, c: task_trainer.make_dual_trainer(c, pairs=c.dino.pair_level),
                 ignored=_KNN + _ADAPT_ONLY,
                 device_batch_fields=("dino.batch_size", "coda.task.batch_size",
                                      "coda.task.eval_batch_size")))
register(Trainer("dual_mae", ("mae", "coda"), lambda m, c: mae_trainer.make_dual_mae_trainer(c),
                 ignored=_ADAPT_ONLY + ("mae.ttt_steps", "mae.ttt_lr", "mae.ttt_momentum",
                                        "mae.ttt_copies", "mae.ttt_chunk", "mae.ttt_seed"),
                 device_batch_fields=("mae.batch_size", "coda.task.batch_size",
                                      "coda.task.eval_batch_size")))
# Importing these modules registers the methods oda, coda, supervised, dual_dino, dual_cb,
# dual_mae, ttt_mae and oda_mae.
_METHOD_MODULES = (online, task_trainer, mae_trainer)

# Frozen embeddings -> TVN -> linear head (method `tvn`): the extractor's own recipe (erm or
# dino) is keyed by its sections, which are therefore this recipe's too; its weights come
# from that recipe's checkpoint (`jaxadapt.train.tvn_trainer`).
register(Trainer("tvn", ("train", "dino", "tvn"), tvn_trainer.make_tvn_trainer,
                 ignored=_KNN + ("dino.pair_level",), device_batch_fields=_ERM_BATCHES))
