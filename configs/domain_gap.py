"""Study 1: the domain-gap table of the BatchNorm family (CS-ARM-BN paper, Table 1 shape).

    python experiments/run.py --config configs/domain_gap.py         # CPU size
    python experiments/run.py --config configs/domain_gap.py:gpu     # ResNet-50, 128 px crops

Methods erm, adabn (per test batch), adabn_plate (full-domain AdaBN: exact statistics of
the plate's perturbed images), tent, ben (trained and tested with the statistics of the
plate's DMSO controls alone), arm_bn, cs_arm_bn, cs_arm_bn_plate and tvn (the frozen ERM
network's embeddings, each plate aligned on its controls, TVN, a linear head: the
foundation-embedding baseline); columns in_domain
(held-out wells of training plates), new_batch (held-out batches of the training source),
new_source (leave one source out, both directions); mean +- std over 3 seeds x 2
directions. With --config.eval.retrieval=True (needs pip install -e ".[metrics]"), methods
that expose embeddings (erm, adabn_plate, ben, cs_arm_bn_plate, tvn) also get copairs mAP
rows, map_replicate and map_moa.
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "domain_gap"
    c.methods = ("erm", "adabn", "adabn_plate", "tent", "ben", "arm_bn", "cs_arm_bn", "cs_arm_bn_plate",
                 "tvn")
    c.train_sources = ("source_3", "source_8")
    return defaults.apply_variant(c, variant)
