"""Study 3: context size. Perturbed images per test batch L x appended controls N.

    python experiments/run.py --config configs/context_size.py
    python experiments/run.py --config configs/context_size.py:gpu

L in {1, 4, 16, 64} for arm_bn and cs_arm_bn, N in {0, 16, 128} for cs_arm_bn; plus
`cs_arm_bn_plate`, exact statistics of the whole plate (all its images and its controls
weighted to the training share, computed in chunks). CS-ARM-BN is meta-trained with the
N it is tested with (one model per N; N = 0 is the ARM-BN recipe, so those rows repeat
arm_bn's), on episodes of arm.n_perturbed = 32 perturbed images. The study varies L at a
fixed N, as the paper does: the control share N / (L + N) then differs from training by
design, so it opts in (adapt.allow_share_mismatch) and its cs_arm_bn rows carry
share_mismatch ("context L+N, trained 32+N"). The CPU variant scores the new_batch split
only: L = 1 with N = 128 costs one 129-image forward per test image.
"""

from jaxadapt import config as defaults


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "context_size"
    c.methods = ("arm_bn", "cs_arm_bn", "cs_arm_bn_plate")
    c.train_sources = ("source_3",)
    c.eval_splits = ("new_batch",)
    c.sweep = tuple({"L": L, "N": N} for L in (1, 4, 16, 64) for N in (0, 16, 128))
    # The default CS-ARM-BN model (cs_arm_bn_plate's) has N = 128 controls per episode,
    # as the paper: contexts of a few perturbed images are nearly all controls, and a
    # model meta-trained on 32 + 32 episodes lost 7-9 points at L = 1 against L = 64, one
    # trained on 32 + 128 lost 3.5 (N = 128; 3 seeds each). Swept N train their own.
    c.arm.n_controls = 128
    c.adapt.n_controls = 128
    # L varies at fixed N: the share differs from training by design (rows say so).
    c.adapt.allow_share_mismatch = True
    if variant == "gpu":
        c.eval_splits = ("new_batch", "new_source")
    return defaults.apply_variant(c, variant)
