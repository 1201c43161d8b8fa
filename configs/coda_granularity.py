"""Study 5: how much data online adaptation needs -- per plate, per batch, per source, or
one plate applied to the whole source (CODA's granularity table).

    python experiments/run.py --config configs/coda_granularity.py
    python experiments/run.py --config configs/coda_granularity.py:gpu

Same world and models as `configs/coda_matrix.py` (trained on source_3, so the trained
models are shared through `checkpoint_dir`); scored on the other main sources. The
sweep sets the adaptation unit of oda / coda: `plate`, `batch` (two plates) or the
whole `source`, and `{"unit": "source", "adapt_on": "first_plate"}` (adapt on the
source's first plate, score every image of the source). `dual_cb` is the same model
without adaptation (scored once: the unit cannot change it).
"""

import pathlib

from jaxadapt.data import splits
from jaxadapt.data.sim import target2
from jaxadapt.eval import cli


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    # The same world and models as study 4 (configs are loaded by path, as the runner does).
    c = cli.load_config_file(f"{pathlib.Path(__file__).with_name('coda_matrix.py')}:{variant}")
    c.study = "coda_granularity"
    c.methods = ("dual_cb", "oda", "coda")
    targets = tuple(s for s in target2.MAIN_SOURCES if s not in c.train_sources)
    c.eval_splits = splits.source_matrix(c.train_sources, targets)
    c.sweep = ({"unit": "plate"}, {"unit": "batch"}, {"unit": "source"},
               {"unit": "source", "adapt_on": "first_plate"})
    return c
