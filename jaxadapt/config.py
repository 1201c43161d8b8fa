"""Shared defaults of every study: simulator, splits, model, training, evaluation.

Study configs under configs/ call `get_defaults()` and change what they study; nothing
is copied.
The CPU-sized defaults run on a laptop; `gpu_overrides()` gives the paper-sized model.
"""

import os

import ml_collections

from jaxadapt.data.design import default_sim_config


def get_defaults() -> ml_collections.ConfigDict:
    """Every knob a study reads, at CPU size."""
    c = ml_collections.ConfigDict()
    c.study = "study"
    c.seeds = (0, 1, 2)
    c.methods = ("erm",)
    # Leave-one-source-out folds: each entry trains on that source, the rest is new_source.
    c.train_sources = ("source_3",)
    c.eval_splits = ("in_domain", "new_batch", "new_source")
    # Trained models are kept under <checkpoint_dir>/<source>/seed<k>/<trainer>-<config hash>;
    # "" = <workdir>/checkpoints. Studies sharing a directory reuse identically trained models.
    c.checkpoint_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.sim = default_sim_config("jump_poscon")
    c.data.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "jaxadapt", "tfds")
    c.data.crop_size = 48  # training: random crop + flips; evaluation: centre crop
    c.data.num_threads = 2  # grain reader threads (no worker processes: cheap on 2 cores)

    c.splits = ml_collections.ConfigDict()
    c.splits.val_batches = 0.15  # of the training source's batches (at least 1), as the paper
    c.splits.new_batch_batches = 1  # held-out batches of the training source
    c.splits.in_domain_fraction = 0.25  # wells per (plate, compound) held out of training plates
    c.splits.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.width = 16
    c.model.stem = "small"  # 3x3/2 conv, no pool: for 32-64 px inputs
    c.model.num_classes = 8  # the 8 JUMP positive controls
    c.model.in_channels = 5  # DNA, ER, RNA, AGP, Mito

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    c.train.eval_batch_size = 64
    c.train.learning_rate = 1e-3  # Adam, no schedule (paper)
    c.train.num_epochs = 30
    c.train.patience = 6  # paper: 20 over 200 epochs
    c.train.log_every_steps = 20
    c.train.stop_after_epochs = 0  # > 0: stop early (resume by re-running); 0: run to the end

    c.eval = ml_collections.ConfigDict()
    c.eval.unit = "plate"  # adaptation unit: plate, batch or source
    c.eval.batch_size = 32  # test batch = the context L of batch-statistics methods
    c.eval.seed = 0  # shuffling of test chunks and label-shift draws

    # Swept settings, one result row each: L (test batch), alpha (label shift), N (controls).
    c.sweep = ()

    # Episodic (ARM-BN / CS-ARM-BN) training: E plates per step, L perturbed + N controls each.
    c.arm = ml_collections.ConfigDict()
    # Test chunks must look like training episodes: eval.batch_size == n_perturbed and
    # adapt.n_controls == n_controls keep the same share of controls in every context.
    c.arm.episodes_per_step = 4  # paper: 8
    c.arm.n_perturbed = 32  # paper: 64 (on 2 CPU cores, more optimizer steps per epoch)
    c.arm.n_controls = 32  # paper: 128 (cs_arm_bn only; arm_bn uses 0)
    c.arm.steps_per_epoch = 0  # 0: about one pass over the training perturbed images
    c.arm.val_episodes = 16
    c.arm.on_missing_controls = "raise"  # or "skip" plates without controls

    # Test-time adaptation.
    c.adapt = ml_collections.ConfigDict()
    c.adapt.n_controls = 32  # cs_arm_bn: fresh controls appended to each test chunk (paper 128)
    c.adapt.control_seed = 0
    c.adapt.on_missing_controls = "raise"  # or "perturbed_only": fall back, with a warning
    c.adapt.tent_lr = 1e-3
    c.adapt.plate_chunk_size = 64  # images per pass of exact whole-plate statistics
    return c


def gpu_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Paper-sized model and data for a GPU/TPU host (ResNet-50, 128 px crops, 9 sites)."""
    c.data.sim.image_size = 160
    c.data.sim.sites_per_well = 9
    c.data.sim.plates_per_batch = 4
    c.data.crop_size = 128
    c.data.num_threads = 16
    c.model.name = "resnet50"
    c.model.width = 64
    c.model.stem = "imagenet"
    c.train.batch_size = 128
    c.train.eval_batch_size = 256
    c.train.num_epochs = 200
    c.train.patience = 20
    c.eval.batch_size = 64
    c.arm.episodes_per_step = 8
    c.arm.n_perturbed = 64
    c.arm.n_controls = 128
    c.adapt.n_controls = 128
    return c


VARIANTS = ("cpu", "gpu")


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Applies a config-file variant (`configs/<study>.py:<variant>`).

    Args:
      c: the study config.
      variant: "cpu" (defaults, laptop-sized) or "gpu" (`gpu_overrides`).

    Returns:
      `c`, changed in place.

    Raises:
      ValueError: for an unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"configs/{c.study}.py:{variant}: unknown variant; use one of {VARIANTS}")
    return gpu_overrides(c) if variant == "gpu" else c
