"""Method names (as in PROTOCOLS.md) -> method factories."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import ml_collections

from jaxadapt.adapt import adabn, arm, ben, knn, tent, tvn_head
from jaxadapt.adapt import erm as erm_lib
from jaxadapt.adapt.base import Method

# name -> (model, study config, swept setting) -> Method. A setting holds the values a
# study sweeps (e.g. {"N": 16}); a method reads what concerns it and ignores the rest.
Factory = Callable[[nn.Module, ml_collections.ConfigDict, Mapping[str, Any]], Method]
_FACTORIES: dict[str, Factory] = {
    "erm": lambda model, cfg, setting: erm_lib.erm(model),
    "adabn": adabn.adabn,
    "adabn_plate": adabn.adabn_plate,
    "ben": ben.ben,
    "tent": tent.tent,
    "arm_bn": arm.arm_bn,
    "cs_arm_bn": arm.cs_arm_bn,
    "cs_arm_bn_plate": arm.cs_arm_bn_plate,
    # kNN probes of a frozen ViT extractor (rows knn_accuracy, knn_macro_f1).
    "dino": knn.knn_method("dino", "dino"),
    "dino_cb": knn.knn_method("dino_cb", "dino_cb"),
    "random_init": knn.knn_method("random_init", "random_init"),
    # Frozen embeddings -> TVN (each unit aligned on its own controls) -> linear head.
    "tvn": tvn_head.tvn,
}


def register(name: str, factory: Factory) -> Factory:
    """Adds a method implemented above this layer (e.g. online adaptation in `jaxadapt.train`).

    Args:
      name: the method name; must be new.
      factory: ``(model, cfg, setting) -> Method``.

    Returns:
      `factory`.

    Raises:
      ValueError: the name is taken.
    """
    if name in _FACTORIES:
        raise ValueError(f"method {name!r} is already registered; pick another name")
    _FACTORIES[name] = factory
    return factory


def available() -> list[str]:
    """Names of the methods this version implements."""
    return sorted(_FACTORIES)


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
    if name not in _FACTORIES:
        raise ValueError(
            f"config.methods names unknown method {name!r}; available: {available()}"
        )
    return _FACTORIES[name](model, cfg, setting or {})
