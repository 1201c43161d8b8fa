"""BatchNorm adaptation (Sanchez-Fernandez et al. 2026, CS-ARM-BN) as pure functions.

BatchNorm statistics are data (`stats`, `plate_stats`); the methods built on them:
ERM (`erm`), AdaBN (`adabn`), BEN (`ben`), TENT (`tent`), ARM-BN and CS-ARM-BN (`arm`:
meta-learned episodes whose statistics come from a context of the plate's images plus
its DMSO controls), the plate predictor (`predictor`) and the episodic trainer
(`episodic`). The names below are what research code composes.
"""

from jaxadapt.methods.bn.arm import episode_forward, episode_loss, make_episodic_train_step
from jaxadapt.methods.bn.ben import control_stats_forward
from jaxadapt.methods.bn.plate_stats import plate_stats
from jaxadapt.methods.bn.predictor import PlatePredictor, PlateState
from jaxadapt.methods.bn.stats import (Chunk, NormStats, apply_with_context, apply_with_stats,
                                       context_stats, features_with_stats, running_norm_stats)
from jaxadapt.methods.bn.tent import TentAdapter, tent_adapter

__all__ = ["Chunk", "NormStats", "PlatePredictor", "PlateState", "TentAdapter",
           "apply_with_context", "apply_with_stats", "context_stats", "control_stats_forward",
           "episode_forward", "episode_loss", "features_with_stats", "make_episodic_train_step",
           "plate_stats", "running_norm_stats", "tent_adapter"]
