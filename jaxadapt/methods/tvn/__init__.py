"""Frozen embeddings + Typical Variation Normalization (TVN, as in EFAAR) + a linear head.

`tvn` holds the transform (`fit_tvn`, `apply_tvn`, `coral`); `head` the method that
aligns each unit on its own controls and classifies with a linear head; `trainer` its
training recipe on another recipe's frozen extractor.
"""

from jaxadapt.methods.tvn.head import TransformConfig, TVNHead, fit_head_pipeline
from jaxadapt.methods.tvn.tvn import TVNState, apply_tvn, coral, fit_tvn

__all__ = ["TVNHead", "TVNState", "TransformConfig", "apply_tvn", "coral", "fit_head_pipeline",
           "fit_tvn"]
