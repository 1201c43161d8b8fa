"""The built-in Cell Painting simulator: a JUMP-like design rendered with batch effects.

`design` lays out sources, batches, plates, wells and sites (`build_design`,
`default_sim_config`, the presets `jump_poscon` and `jump_target2`); `effects` and
`render` draw each site's cells and its technical variation; `simulator.simulate`
renders a design; `builder.load_simulated` renders it once into a cached TFDS
array_record store. `calibration` measures the simulator against real profiles.
"""

from jaxadapt.data.sim.design import (PRESETS, build_design, check_config, default_sim_config,
                                      num_classes)

__all__ = ["PRESETS", "build_design", "check_config", "default_sim_config", "num_classes"]
