"""Frozen embeddings + Typical Variation Normalization (TVN, as in EFAAR) + a linear head.

`tvn` holds the transform (`fit_tvn`, `apply_tvn`, `coral`); `head` the method that
aligns each unit on its own controls and classifies with a linear head; `trainer` its
training recipe on another recipe's frozen extractor.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "TVNHead": "jaxadapt.methods.tvn.head",
    "TVNState": "jaxadapt.methods.tvn.tvn",
    "TransformConfig": "jaxadapt.methods.tvn.head",
    "apply_tvn": "jaxadapt.methods.tvn.tvn",
    "coral": "jaxadapt.methods.tvn.tvn",
    "fit_head_pipeline": "jaxadapt.methods.tvn.head",
    "fit_tvn": "jaxadapt.methods.tvn.tvn",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
