"""Study 2: label shift. Test batches with per-batch Dirichlet(alpha) class mixes.

    python experiments/run.py --config configs/label_shift.py
    python experiments/run.py --config configs/label_shift.py:gpu

Each plate's test batches are drawn as in the CS-ARM-BN paper: p ~ Dirichlet(alpha 1_K),
counts ~ Multinomial(L, p), rotated by one class per batch, so the plate is balanced but
each batch is skewed. Batch-statistics methods that normalize with the batch alone
(adabn, arm_bn) absorb the class signal into the statistics; the controls appended by
cs_arm_bn dilute that bias by L / (L + N).
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "label_shift"
    c.methods = ("erm", "adabn", "arm_bn", "cs_arm_bn")
    c.train_sources = ("source_3",)
    c.eval_splits = ("new_batch", "new_source")
    c.sweep = tuple({"alpha": a} for a in (0.01, 0.1, 1.0, 10.0, "balanced"))
    if variant == "gpu":
        c.train_sources = ("source_3", "source_8")
    return defaults.apply_variant(c, variant)
