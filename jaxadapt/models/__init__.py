"""Models: BatchNorm with explicit statistics, ResNets, and `build_model` from a config."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jaxadapt.models.norm import (
    BatchNorm,
    masked_moments,
    merge_suff,
    norm_stats_from_suff,
    stats_from_suff,
)
from jaxadapt.models.resnet import ResNet, resnet18, resnet34, resnet50

__all__ = [
    "BatchNorm", "ResNet", "build_model", "masked_moments", "merge_suff",
    "norm_stats_from_suff", "resnet18", "resnet34", "resnet50", "stats_from_suff",
]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build_model(model_cfg: Any) -> nn.Module:
    """Build the model described by a config.

    Args:
      model_cfg: the ``model`` sub-config (a ConfigDict or mapping) with fields ``name``
        ("resnet18" | "resnet34" | "resnet50"), ``width``, ``stem``, ``num_classes``,
        ``in_channels``; optional ``zero_init_residual``, ``norm_momentum``,
        ``norm_epsilon``. A whole experiment config (with a ``model`` field and no
        ``name``) is accepted too.

    Returns:
      The Flax module (not initialized).
    """
    get = model_cfg.get
    if get("name") is None and get("model") is not None:
        return build_model(model_cfg["model"])
    name = get("name")
    if name not in _BUILDERS:
        raise ValueError(
            f"model.name={name!r} is unknown; set config.model.name to one of "
            f"{sorted(_BUILDERS)}"
        )
    kw = {k: model_cfg[k] for k in ("width", "stem", "num_classes", "in_channels")
          if get(k) is not None}
    if "num_classes" not in kw:
        raise ValueError("model.num_classes is missing; set config.model.num_classes")
    for k in ("zero_init_residual", "norm_momentum", "norm_epsilon"):
        if get(k) is not None:
            kw[k] = model_cfg[k]
    return _BUILDERS[name](**kw)
