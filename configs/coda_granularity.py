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

import importlib.util
import pathlib

from jaxadapt.data import splits, target2


def _sibling(name: str):
    """A config module next to this file (configs are loaded by path, not as a package)."""
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_jaxadapt_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = _sibling("coda_matrix").get_config(variant)
    c.study = "coda_granularity"
    c.methods = ("dual_cb", "oda", "coda")
    targets = tuple(s for s in target2.MAIN_SOURCES if s not in c.train_sources)
    c.eval_splits = splits.source_matrix(c.train_sources, targets)
    c.sweep = ({"unit": "plate"}, {"unit": "batch"}, {"unit": "source"},
               {"unit": "source", "adapt_on": "first_plate"})
    return c
