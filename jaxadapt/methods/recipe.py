"""Training recipes as the protocol runner sees them, and the checkpoint key they define.

A recipe (`Trainer`) declares what defines the weights it produces -- the config
sections it reads besides the shared ones (`COMMON_SECTIONS`) and the fields of those
sections it never reads -- and how it is built. The checkpoint key (`checkpoint_key`)
is derived from that declaration, so a new recipe with its own section (e.g. `dino`) is
keyed by it without touching the runner. The recipes themselves are listed in
`jaxadapt.methods.registry`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import ml_collections

from jaxadapt.data import worlds


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
      device_check: (study config) -> problems of how it splits other work (e.g. whole
        episodes) over processes and devices; None if it splits nothing else.
    """

    name: str
    sections: tuple[str, ...]
    build: Callable[[nn.Module, ml_collections.ConfigDict], TrainFn]
    ignored: tuple[str, ...] = ()
    device_batch_fields: tuple[str, ...] = ()
    device_check: Callable[[ml_collections.ConfigDict], list[str]] | None = None

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


def check_sections(trainer: Trainer) -> Trainer:
    """`trainer`, if it lists only its own sections.

    Raises:
      ValueError: a section repeats a common one.
    """
    shared = set(trainer.sections) & set(COMMON_SECTIONS)
    if shared:
        raise ValueError(f"trainer {trainer.name!r}: sections {sorted(shared)} are common to "
                         f"every trainer ({COMMON_SECTIONS}); list only its own sections")
    return trainer


def recipe_key(cfg: ml_collections.ConfigDict, recipe: Trainer) -> str:
    """A short hash of everything that determines the weights `recipe` produces.

    What enters the hash is what the recipe declares: the common sections and its own,
    without its ignored fields and `NOT_TRAINING`.

    Args:
      cfg: the (training) config.
      recipe: the recipe.

    Returns:
      `<trainer>-<12 hex digits>`.
    """
    spec = {k: _plain(cfg[k]) for k in COMMON_SECTIONS + recipe.sections if k in cfg}
    for path in NOT_TRAINING + recipe.ignored + unused_data_keys(cfg):
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return f"{recipe.name}-{digest[:12]}"


def unused_data_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Keys the study's data source and model never read, left out of its training keys.

    The data part is the source's own declaration (`jaxadapt.data.worlds.inert_keys`): a
    simulator study's weights do not depend on the real-data or profile settings, a
    real-data study's not on the simulator's or on how fast its store is built. The model
    part: a ResNet's weights do not depend on the MLP's depth. Leaving them out also keeps
    the training keys, hence the checkpoints, that simulator studies had before real data
    and profiles existed; likewise a randomly initialized model's keys leave out the
    pretrained-import settings.

    Args:
      cfg: the study config.

    Returns:
      Dotted keys.
    """
    out = worlds.inert_keys(cfg)
    model = cfg.get("model", {})
    if model.get("name") != "mlp":
        out += ("model.mlp_hidden_layers",)
    if model.get("init", "random") == "random":  # keys of randomly initialized models stay
        out += ("model.init", "model.init_channel_rule", "model.init_select_channels")
    return out


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
