"""Prints the simulator's biology beside real Cell Painting measurements.

    python experiments/calibrate_simulator.py [--config.<sim key>=<value> ...]

Real: LINCS cell counts (136 plates, 5 batches), one LINCS plate of CellProfiler profiles,
two JUMP TARGET2 wells of single cells (jaxadapt/data/sim/resources/calibration). Simulator:
the default `jump_poscon` design, every cell measured without rendering pixels.
"""

from absl import app
from ml_collections import config_flags

from jaxadapt.data.sim import calibration
from jaxadapt.data.sim.design import default_sim_config


_CONFIG = config_flags.DEFINE_config_dict("config", default_sim_config(), lock_config=True)


def main(argv):
    del argv
    print(calibration.markdown(calibration.calibration_table(_CONFIG.value)))


if __name__ == "__main__":
    app.run(main)
