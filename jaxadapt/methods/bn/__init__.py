"""BatchNorm adaptation (Sanchez-Fernandez et al. 2026, CS-ARM-BN) as pure functions.

BatchNorm statistics are data (`stats`, `plate_stats`); the methods built on them:
ERM (`erm`), AdaBN (`adabn`), BEN (`ben`), TENT (`tent`), ARM-BN and CS-ARM-BN (`arm`:
meta-learned episodes whose statistics come from a context of the plate's images plus
its DMSO controls), the plate predictor (`predictor`) and the episodic trainer
(`episodic`). The names below are what research code composes.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "Chunk": "jaxadapt.methods.bn.stats",
    "NormStats": "jaxadapt.methods.bn.stats",
    "PlatePredictor": "jaxadapt.methods.bn.predictor",
    "PlateState": "jaxadapt.methods.bn.predictor",
    "TentAdapter": "jaxadapt.methods.bn.tent",
    "apply_with_context": "jaxadapt.methods.bn.stats",
    "apply_with_stats": "jaxadapt.methods.bn.stats",
    "context_stats": "jaxadapt.methods.bn.stats",
    "control_stats_forward": "jaxadapt.methods.bn.ben",
    "episode_forward": "jaxadapt.methods.bn.arm",
    "episode_loss": "jaxadapt.methods.bn.arm",
    "features_with_stats": "jaxadapt.methods.bn.stats",
    "make_episodic_train_step": "jaxadapt.methods.bn.arm",
    "plate_stats": "jaxadapt.methods.bn.plate_stats",
    "running_norm_stats": "jaxadapt.methods.bn.stats",
    "tent_adapter": "jaxadapt.methods.bn.tent",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
