"""Study 2: label shift. Test batches with per-batch Dirichlet(alpha) class mixes.

    python experiments/run.py --config configs/label_shift.py
    python experiments/run.py --config configs/label_shift.py:gpu

Each plate's test batches are drawn as in the CS-ARM-BN paper: p ~ Dirichlet(alpha 1_K),
counts ~ Multinomial(L, p), rotated by one class per batch, so the plate is balanced but
each batch is skewed; a class with fewer sites than its count is taken whole, so such a
batch is short of L (counted as label_shift_short_batches). Draws differ per seed.
Batch-statistics methods that normalize with the batch alone (adabn, arm_bn) absorb the
class signal into the statistics; the controls appended by cs_arm_bn dilute that bias
by L / (L + N). CS-ARM-BN is meta-trained with the share it is tested with: one model
per swept N (arm.n_controls = N, episodes of arm.n_perturbed = eval.batch_size = 32).
The CPU variant scores new batches of the training source; the GPU variant adds the
new source and both training directions.
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "label_shift"
    c.methods = ("erm", "adabn", "arm_bn", "cs_arm_bn")
    c.train_sources = ("source_3",)
    c.eval_splits = ("new_batch",)
    # N (controls per test chunk) is read by cs_arm_bn only, which trains a model per N
    # (N = 32 is the default model, shared with domain_gap through checkpoint_dir; N = 128
    # the one context_size trains). The label-shift bias of its statistics shrinks by
    # L / (L + N): 1/2 at N = 32, 1/5 at N = 128 (L = 32).
    c.sweep = tuple({"alpha": a, "N": n} for a in (0.01, 0.1, 1.0, 10.0, "balanced") for n in (32, 128))
    if variant == "gpu":
        c.train_sources = ("source_3", "source_8")
        c.eval_splits = ("new_batch", "new_source")
    return defaults.apply_variant(c, variant)
