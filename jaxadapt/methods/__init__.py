"""jaxadapt's methods, one folder per method family.

- `jaxadapt.methods.bn`: BatchNorm adaptation (ERM, AdaBN, TENT, BEN, ARM-BN, CS-ARM-BN);
- `jaxadapt.methods.coda`: DINO, the dual model, ODA / CODA, the MAE baselines;
- `jaxadapt.methods.tvn`: frozen embeddings + TVN + a linear head.

A method is a `Method` (`base`): pure functions the protocol runner calls per target
unit. `registry` lists every method and training recipe in two tables; `recipe` defines
a recipe and its checkpoint key. Families never import each other.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "METHODS": "jaxadapt.methods.registry",
    "Method": "jaxadapt.methods.base",
    "TRAINERS": "jaxadapt.methods.registry",
    "Trainer": "jaxadapt.methods.recipe",
    "Unit": "jaxadapt.methods.base",
    "UnitBatch": "jaxadapt.methods.base",
    "UnitEmbeddings": "jaxadapt.methods.base",
    "Variables": "jaxadapt.methods.base",
    "make_method": "jaxadapt.methods.registry",
    "method_names": "jaxadapt.methods.registry",
    "trainer_names": "jaxadapt.methods.registry",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
