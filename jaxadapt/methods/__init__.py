"""jaxadapt's methods, one folder per method family.

- `jaxadapt.methods.bn`: BatchNorm adaptation (ERM, AdaBN, TENT, BEN, ARM-BN, CS-ARM-BN);
- `jaxadapt.methods.coda`: DINO, the dual model, ODA / CODA, the MAE baselines;
- `jaxadapt.methods.tvn`: frozen embeddings + TVN + a linear head.

A method is a `Method` (`base`): pure functions the protocol runner calls per target
unit. `registry` lists every method and training recipe in two tables; `recipe` defines
a recipe and its checkpoint key. Families never import each other.
"""

from jaxadapt.methods.base import Method, Unit, UnitBatch, UnitEmbeddings, Variables
from jaxadapt.methods.recipe import Trainer
from jaxadapt.methods.registry import (METHODS, TRAINERS, make_method, method_names,
                                       trainer_names)

__all__ = ["METHODS", "Method", "TRAINERS", "Trainer", "Unit", "UnitBatch", "UnitEmbeddings",
           "Variables", "make_method", "method_names", "trainer_names"]
