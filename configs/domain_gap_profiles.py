"""Study 1 on CellProfiler profiles: the BatchNorm family on the "CellProfiler features + MLP" baseline.

    python experiments/run.py --config configs/domain_gap_profiles.py \\
        --config.data.profiles.paths="('source_3.parquet', 'source_8.parquet')" \\
        --config.data.profiles.label_table=labels.csv --config.model.in_channels=<features> \\
        --config.train_sources="('source_3', 'source_8')"

Study 1 (`configs/domain_gap.py`) with `data.source="jump_profiles"`: well-level JUMP
profiles (Metadata_* + Cells_/Cytoplasm_/Nuclei_ features; source and batch from JUMP's
plate.csv.gz via data.profiles.plate_table if the tables lack them) normalized per plate
against DMSO (mad_robustize, pycytominer's formula), fed to a BatchNorm MLP (`model.name="mlp"`) as
1 x 1 records with `in_channels` features; every BN-family method runs on it unchanged.

Without overrides it runs on the miniature test set shipped in tests/data/profiles/mini
(the real LINCS plate SQ00015054 re-tiled into 2 pseudo sources x 3 batches: its numbers
mean nothing, it shows the path). Real JUMP plates hold 16 (TARGET2: 64) DMSO wells per
plate; the control counts below are sized for the miniature's 4.
"""

import pathlib

from jaxadapt.eval import cli

MINI = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "profiles" / "mini"


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu" (the gpu variant changes only batch and model sizes).

    Returns: the ConfigDict."""
    # Study 1's settings, loaded by path as the runner does (configs/ is no package).
    c = cli.load_config_file(f"{pathlib.Path(__file__).with_name('domain_gap.py')}:{variant}")
    c.study = "domain_gap_profiles"
    c.methods = ("erm", "adabn", "adabn_plate", "tent", "ben", "arm_bn", "cs_arm_bn",
                 "cs_arm_bn_plate")
    c.train_sources = ("lincs_a", "lincs_b")
    c.data.source = "jump_profiles"
    c.data.crop_size = 1  # a profile is a 1 x 1 record with in_channels features
    p = c.data.profiles
    p.paths = (str(MINI / "lincs_a.parquet"), str(MINI / "lincs_b.csv.gz"))
    p.label_table = str(MINI / "labels.csv")
    p.columns.compound = "Metadata_broad_sample"  # LINCS names; JUMP: Metadata_JCP2022
    p.control_compounds = ("DMSO",)
    p.on_unlabelled = "drop"  # compounds outside the label table: dropped, listed in the report
    c.model.name = "mlp"
    c.model.in_channels = 65
    c.model.num_classes = 7
    c.model.width = 64
    c.train.batch_size = 8  # the miniature's training plate holds 12 labelled wells
    c.train.eval_batch_size = 8
    c.eval.batch_size = 8
    c.arm.n_perturbed = 8
    c.arm.n_controls = 4
    c.adapt.n_controls = 4
    c.adapt.on_short_controls = "resample"
    c.adapt.plate_chunk_size = 16
    return c
