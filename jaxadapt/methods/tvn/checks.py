"""The TVN method's config checks: its extractor against the model and the embedding file.

Part of `jaxadapt.eval.validation` through `jaxadapt.methods.registry.CONFIG_CHECKS`.
"""

from __future__ import annotations

import os
from typing import Any

from jaxadapt.config_rules import bad, get
from jaxadapt.models.vit import VIT_SIZES


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
