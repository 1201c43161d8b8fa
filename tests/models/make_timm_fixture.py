"""Write the timm fixtures of tests/models/test_pretrained.py (needs torch and timm).

Not a test and not imported by jaxadapt: it runs in a separate environment with torch,
so that the import test itself needs no torch. To regenerate (outputs under
tests/models/fixtures/)::

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch torchvision timm numpy safetensors
    /tmp/tvenv/bin/python tests/models/make_timm_fixture.py

The fixtures were made with torch 2.14.1 and timm 1.0.31 (the versions are stored in
timm_outputs.npz): torch 2.13.0's CPU wheel installs, but timm imports torchvision, and
the torchvision 0.28 on PyPI is built against the CUDA torch 2.13.0, so it fails to load
next to the CPU one; torch 2.14.1 with torchvision 0.29.1 works (on CPU). What is written:

- ``vit_tiny.pth``: ``torch.save(model.state_dict())`` of a DeiT-like timm
  `VisionTransformer` (patch 8, embed 32, depth 2, heads 2, 3 input channels, 32 px, a CLS
  token, no distillation, a 10-class head), seeded random weights; float32.
- ``vit_tiny.safetensors``: the same state dict in float16. Every weight was rounded to a
  float16 value beforehand, so both files hold the same numbers (and the float16 reader
  is exercised).
- ``timm_outputs.npz``: the inputs (NCHW, float16 values) and timm's outputs:
  ``tokens32`` = ``forward_features(x32)`` (all tokens after the final norm),
  ``cls32`` = ``forward_head(..., pre_logits=True)`` (the CLS feature); at 48 px
  ``tokens48_dino`` (pos_embed resized as DINO's ``interpolate_pos_encoding``: torch
  bicubic, scale (6 + 0.1) / 4, which our ViT does) and ``tokens48_timm`` (timm's own
  ``dynamic_img_size=True`` path: ``resample_abs_pos_embed``, bicubic to size 6 with
  antialias, which differs) with ``pos_embed_timm48``, the embedding timm's path used.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SIZE = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, in_chans=3,
            num_classes=10, qkv_bias=True, class_token=True, global_pool="token")


def build_timm_vit(img_size: int = 32, seed: int = 0, **kw) -> VisionTransformer:
    """The fixture's timm ViT: timm's init plus seeded noise on every parameter.

    The noise makes LayerNorm scales and biases, the CLS token and the position embedding
    non-trivial (timm initializes them to 1, 0, ~0), so a swapped mapping shows.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, **SIZE, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())  # float16-exact, so the float16 file is the same
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 3, 32, 32) and (1, 3, 48, 48) seeded normal images with float16 values."""
    g = torch.Generator().manual_seed(seed)
    x32 = torch.randn(2, 3, 32, 32, generator=g).half().float()
    x48 = torch.randn(1, 3, 48, 48, generator=g).half().float()
    return x32, x48


def dino_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding: bicubic with scale (grid + 0.1) / stored grid."""
    n = pos_embed.shape[1] - 1
    src = int(round(n ** 0.5))
    d = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, src, src, d).permute(0, 3, 1, 2)
    s = (grid + 0.1) / src
    patches = F.interpolate(patches, scale_factor=(s, s), mode="bicubic",
                            align_corners=False)
    assert patches.shape[-2:] == (grid, grid)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)


@torch.no_grad()
def timm_outputs(model: VisionTransformer, x32: torch.Tensor,
                 x48: torch.Tensor) -> dict[str, np.ndarray]:
    """timm's outputs of `model` (built at 32 px) at 32 px and, two ways, at 48 px."""
    state = model.state_dict()
    feats = model.forward_features(x32)
    out = {"tokens32": feats, "cls32": model.forward_head(feats, pre_logits=True)}
    m48 = VisionTransformer(img_size=48, **SIZE).eval()
    m48.load_state_dict({**state, "pos_embed": dino_pos_embed(state["pos_embed"], 6)})
    out["tokens48_dino"] = m48.forward_features(x48)
    dyn = VisionTransformer(img_size=32, dynamic_img_size=True, **SIZE).eval()
    dyn.load_state_dict(state)
    out["tokens48_timm"] = dyn.forward_features(x48)
    out["pos_embed_timm48"] = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6],
                                                     old_size=[4, 4], num_prefix_tokens=1)
    return {k: v.numpy().astype(np.float32) for k, v in out.items()}


def main() -> None:
    import safetensors.torch
    import timm

    os.makedirs(HERE, exist_ok=True)
    model = build_timm_vit()
    state = model.state_dict()
    torch.save(state, os.path.join(HERE, "vit_tiny.pth"))
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in state.items()},
                                os.path.join(HERE, "vit_tiny.safetensors"))
    x32, x48 = inputs()
    np.savez_compressed(
        os.path.join(HERE, "timm_outputs.npz"), x32=x32.numpy().astype(np.float16),
        x48=x48.numpy().astype(np.float16), torch_version=np.array(torch.__version__),
        timm_version=np.array(timm.__version__), **timm_outputs(model, x32, x48))
    for name in sorted(os.listdir(HERE)):
        print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")


if __name__ == "__main__":
    main()
