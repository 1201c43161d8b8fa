"""Quickstart: a reduced domain-gap study on the built-in simulator, minutes on a laptop CPU.

    python experiments/run.py --config configs/quickstart.py

Renders a small JUMP-like screen (8 positive-control classes, DMSO wells, two sources),
trains a tiny 5-channel ResNet on source_3 and prints accuracy in domain, on new
batches and on the new source.
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "quickstart"
    c.methods = ("erm",)
    c.train_sources = ("source_3",)
    c.seeds = (0, 1, 2)
    return defaults.apply_variant(c, variant)
