"""ERM on the `jump_poscon` simulator: the domain gap without adaptation.

    python experiments/run.py --config configs/erm.py          # CPU size, ~5 min on 2 cores
    python experiments/run.py --config configs/erm.py:gpu      # ResNet-50, 128 px crops

Trains a 5-channel ResNet on one source (both directions: source_3 and source_8 in
turn), three seeds, and reports accuracy and macro-F1 on held-out wells of training
plates (in_domain), held-out batches (new_batch) and the other source (new_source).
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the locked-on-load ConfigDict."""
    c = defaults.get_defaults()
    c.study = "erm"
    c.methods = ("erm",)
    c.train_sources = ("source_3", "source_8")
    return defaults.apply_variant(c, variant)
