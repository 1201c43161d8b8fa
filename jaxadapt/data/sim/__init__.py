"""The built-in Cell Painting simulator: a JUMP-like design rendered with batch effects.

`design` lays out sources, batches, plates, wells and sites (`build_design`,
`default_sim_config`, the presets `jump_poscon` and `jump_target2`); `effects` and
`render` draw each site's cells and its technical variation; `simulator.simulate`
renders a design; `builder.load_simulated` renders it once into a cached TFDS
array_record store. `calibration` measures the simulator against real profiles.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "PRESETS": "jaxadapt.data.sim.design",
    "build_design": "jaxadapt.data.sim.design",
    "check_config": "jaxadapt.data.sim.design",
    "default_sim_config": "jaxadapt.data.sim.design",
    "num_classes": "jaxadapt.data.sim.design",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
