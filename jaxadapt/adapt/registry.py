"""Method names (as in PROTOCOLS.md) -> method factories."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import ml_collections

from jaxadapt.adapt import erm as erm_lib
from jaxadapt.adapt.base import Method

# name -> (model, study config) -> Method
_FACTORIES: dict[str, Callable[[nn.Module, ml_collections.ConfigDict], Method]] = {
    "erm": lambda model, cfg: erm_lib.erm(model),
}


def available() -> list[str]:
    """Names of the methods this version implements."""
    return sorted(_FACTORIES)


def make_method(name: str, model: nn.Module, cfg: ml_collections.ConfigDict) -> Method:
    """Builds method `name` for `model`.

    Args:
      name: a method name, e.g. "erm".
      model: the architecture.
      cfg: the study config (methods read their own sub-config from it).

    Returns:
      The Method.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in _FACTORIES:
        raise ValueError(
            f"config.methods names unknown method {name!r}; available: {available()}"
        )
    return _FACTORIES[name](model, cfg)
