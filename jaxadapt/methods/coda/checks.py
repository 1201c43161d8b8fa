"""The CODA family's config checks: DINO/CODA views against the image and the ViT.

Part of `jaxadapt.eval.validation` through `jaxadapt.methods.registry.CONFIG_CHECKS`.
"""

from __future__ import annotations

from typing import Any

from jaxadapt.config_rules import MISSING, get, guarded, is_int
from jaxadapt.data import views
from jaxadapt.models.vit import VIT_SIZES


#: Methods whose extractor trains on cross-batch pairs (two images split the local views).
CROSS_BATCH_METHODS = ("dino_cb", "dual_cb", "coda")


def init_problems(cfg: Any) -> list[str]:
    """`model.init`: a pretrained checkpoint fits only a ViT (the file is read at training).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    init, name = get(cfg, "model.init"), get(cfg, "model.name")
    if init in (MISSING, "random") or not isinstance(init, str):
        return []
    if not (isinstance(name, str) and name in VIT_SIZES):
        return [f"config.model.init={init!r} imports a ViT checkpoint, but config.model.name="
                f"{name!r} is not a ViT; use --config.model.init=random or a vit_* model"]
    sel = get(cfg, "model.init_select_channels")
    channels = get(cfg, "model.in_channels")
    if get(cfg, "model.init_channel_rule") == "select" and not (
            isinstance(sel, (tuple, list)) and len(sel) == 3 and len(set(sel)) == 3
            and all(is_int(i) and 0 <= i < channels for i in sel)):
        return [f"config.model.init_select_channels={sel!r} must be 3 distinct channel indices "
                f"in [0, {channels}) for init_channel_rule='select'; e.g. (0, 1, 2)"]
    return []


def dino_problems(cfg: Any) -> list[str]:
    """The DINO views against the image and the ViT's patch size (only for ViT models).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
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
    out = guarded(views.check_views_config, get(cfg, "dino.views"),
                   size if is_int(size) else None, patch_size=patch, paired=paired,
                   where="config.dino.views")
    dim, heads = get(cfg, "coda.task.embed_dim"), get(cfg, "coda.task.num_heads")
    if is_int(dim) and is_int(heads) and heads > 0 and dim % heads:
        out.append(f"config.coda.task.embed_dim={dim} is not divisible by "
                   f"config.coda.task.num_heads={heads}; choose a head count dividing it")
    crop = get(cfg, "data.crop_size")
    if is_int(crop) and is_int(patch) and patch > 0 and crop % patch:
        out.append(f"config.data.crop_size={crop} (the evaluation crop) is not divisible by "
                   f"the ViT patch size {patch}; use a multiple of {patch}")
    return out
