"""DINO pretraining of a ViT on the jump_target2 simulator, judged by a kNN probe of MoA.

    python experiments/run.py --config configs/dino_pretrain.py          # CPU size
    python experiments/run.py --config configs/dino_pretrain.py:gpu      # DeiT-S, 224 px

Renders TARGET2 plates (302 compounds, 145 of them in 58 single-MoA classes) of source_3
and source_5, pretrains a ViT with DINO on source_3's training plates (labels unused;
plain DINO `dino`; `dino_cb`, with CODA's cross-batch pairs, on request), and compares the teacher's
features with a randomly initialized ViT's (`random_init`) by DINO's weighted kNN
(k = 20, T = 0.07): bank = labelled images of the training plates, queries = the
held-out batch of source_3 (`new_batch`) and source_5 (`new_source`). Rows: metric
`knn_accuracy` (and `knn_macro_f1`), mean +- std over 3 seeds. Each training run also
writes `dino_history.{json,png}` (teacher entropy and kNN accuracy per epoch) under its
checkpoint folder.
"""

from jaxadapt import config as defaults
from jaxadapt.data.sim import design


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "dino_pretrain"
    c.methods = ("dino", "random_init")  # add "dino_cb" for cross-batch pairs (slower)
    c.train_sources = ("source_3",)
    c.eval_splits = ("new_batch", "new_source")
    c.data.sim = design.default_sim_config("jump_target2")
    c.data.sim.sources = ("source_3", "source_5")
    c.data.sim.batches_per_source = 5  # 3 training plates, 1 validation, 1 new batch
    c.data.sim.sites_per_well = 2
    c.data.normalization = "per_image"  # CODA: each image z-scored per channel
    c.model.name = "vit_cpu"  # 64-dim, 4 blocks, 4 heads, patch 8, 48 px
    c.model.num_classes = design.num_classes("jump_target2")
    c.model.drop_path_rate = 0.1  # the DINO student's stochastic depth
    if variant == "gpu":
        c.data.sim.image_size = 256
        c.data.crop_size = 224
        c.data.num_threads = 16
        c.model.name = "vit_small"  # DeiT-S/16
        c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 4096, 2048, 256  # CODA
        c.dino.epochs, c.dino.batch_size, c.dino.warmup_epochs = 100, 256, 10
        c.dino.warmup_teacher_temp_epochs = 30
        c.dino.views.global_size, c.dino.views.local_size = 224, 96
        c.train.eval_batch_size = 256
        return c
    return defaults.apply_variant(c, variant)
