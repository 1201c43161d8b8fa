"""Quickstart: a reduced domain-gap study (study 1) on the built-in simulator.

    python experiments/run.py --config configs/quickstart.py

Renders a JUMP-like screen (8 positive-control classes + DMSO wells, two sources, six
batches each), trains a 5-channel ResNet-18 on source_3 three ways (ERM, ARM-BN
episodes, CS-ARM-BN episodes with controls) for one seed and a short schedule, and
prints accuracy and macro-F1 in domain, on new batches and on the new source for
erm, adabn, arm_bn and cs_arm_bn. Under 10 minutes on 2 CPU cores. The full study
with all methods and three seeds is configs/domain_gap.py.
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "quickstart"
    c.methods = ("erm", "adabn", "arm_bn", "cs_arm_bn")
    c.train_sources = ("source_3",)
    c.seeds = (0,)
    c.train.num_epochs = 10  # the full studies allow 30 with early stopping
    c.train.patience = 4
    c.arm.val_episodes = 8
    return defaults.apply_variant(c, variant)
