"""Models: BatchNorm with explicit statistics, ResNets, ViTs + DINO head, `build_model`."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jaxadapt.models.mlp import MLP
from jaxadapt.models.norm import (BatchNorm, masked_moments, merge_suff, norm_stats_from_suff,
                                  stats_from_suff)
from jaxadapt.models.resnet import ResNet, resnet18, resnet34, resnet50
from jaxadapt.models.vit import DINOHead, DINOModel, VIT_SIZES, ViT, check_vit_config, vit


__all__ = [
    "BatchNorm", "DINOHead", "DINOModel", "MLP", "ResNet", "ViT", "build_model", "check_vit_config",
    "masked_moments", "merge_suff", "norm_stats_from_suff", "resnet18", "resnet34", "resnet50",
    "stats_from_suff", "vit",
]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


#: ViT fields a model config may override on a named size.
_VIT_OVERRIDES = ("patch_size", "img_size", "drop_path_rate", "embed_dim", "depth", "num_heads")


def build_model(model_cfg: Any) -> nn.Module:
    """Build the model described by a config.

    Args:
      model_cfg: the ``model`` sub-config (a ConfigDict or mapping) with fields ``name``
        ("resnet18" | "resnet34" | "resnet50"), ``width``, ``stem``, ``num_classes``,
        ``in_channels``; optional ``zero_init_residual``, ``norm_momentum``,
        ``norm_epsilon``. A whole experiment config (with a ``model`` field and no
        ``name``) is accepted too.

      A ViT name ("vit_tiny" | "vit_small" | "vit_cpu", see `vit.VIT_SIZES`) builds the
      `ViT` backbone (no classifier; any channel count, so ``width``, ``stem``,
      ``num_classes`` and ``in_channels`` are not used); optional ``patch_size``,
      ``img_size``, ``drop_path_rate``, ``embed_dim``, ``depth``, ``num_heads`` override
      the named size.

      "mlp" builds the profile `MLP`: ``in_channels`` = number of features, ``width``
      hidden units, ``mlp_hidden_layers`` blocks (default 2), ``num_classes``; optional
      ``norm_momentum``, ``norm_epsilon``.

    Returns:
      The Flax module (not initialized).
    """
    get = model_cfg.get
    if get("name") is None and get("model") is not None:
        return build_model(model_cfg["model"])
    name = get("name")
    if name in VIT_SIZES:
        kw = {k: model_cfg[k] for k in _VIT_OVERRIDES if get(k) is not None}
        model = vit(name, **kw)
        check_vit_config(model.img_size, model.patch_size)
        return model
    if name == "mlp":
        return _mlp(model_cfg)
    if name not in _BUILDERS:
        raise ValueError(
            f"model.name={name!r} is unknown; set config.model.name to one of "
            f"{sorted(_BUILDERS) + sorted(VIT_SIZES) + ['mlp']}"
        )
    kw = {k: model_cfg[k] for k in ("width", "stem", "num_classes", "in_channels")
          if get(k) is not None}
    if "num_classes" not in kw:
        raise ValueError("model.num_classes is missing; set config.model.num_classes")
    for k in ("zero_init_residual", "norm_momentum", "norm_epsilon"):
        if get(k) is not None:
            kw[k] = model_cfg[k]
    return _BUILDERS[name](**kw)


def _mlp(model_cfg: Any) -> MLP:
    """The profile MLP of a model config (see `build_model`)."""
    get = model_cfg.get
    for k in ("num_classes", "in_channels"):
        if get(k) is None:
            raise ValueError(f"model.{k} is missing; set config.model.{k}")
    kw = {k: model_cfg[k] for k in ("num_classes", "in_channels", "width", "norm_momentum",
                                    "norm_epsilon") if get(k) is not None}
    if get("mlp_hidden_layers") is not None:
        kw["hidden_layers"] = model_cfg["mlp_hidden_layers"]
    return MLP(**kw)
