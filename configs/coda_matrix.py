"""Study 4: CODA's source x source matrix (train on one source, score on every source).

    python experiments/run.py --config configs/coda_matrix.py          # CPU size
    python experiments/run.py --config configs/coda_matrix.py:gpu      # DeiT-S, 224 px

Renders the `jump_target2` simulator (CODA's four main sources, TARGET2 plates, MoA
classes of the single-MoA compounds), trains on source_3 and scores MoA accuracy on
`source:source_3-><b>` for every main source b. The diagonal scores source_3's held-out
batch (`eval.matrix_diagonal = "new_batch"`): TARGET2 puts each compound in one well per
plate, so held-out wells of the training plates would take compounds out of training.
Units are batches of two plates, so that CODA's cross-batch pairs find partners inside a
unit. Methods, as in CODA's table 2:
  supervised  a ViT trained with cross-entropy;
  dual_dino   DINO extractor (frozen) + task transformer, no adaptation;
  dual_cb     the same on a DINO extractor pretrained with cross-batch pairs;
  oda         dual_dino, its extractor adapted with plain DINO on each target batch;
  coda        dual_cb, adapted with cross-batch DINO on each target batch;
  ttt_mae     an MAE-pretrained ViT under the same task transformer, its encoder adapted
              on each test image alone (20 SGD steps on copies of it, reset per image);
              in the GPU variant only (on CPU add it to --config.methods).
Step 1 (the DINO extractors) runs CODA's own recipe, not DINO's (`coda_step1`:
params/settings/self-supervised-coda-step-1.json and the JUMP_TARGET augmentation
strategy of cfredinh/coda): AdamW lr 1e-4 without batch scaling, weight decay cosine
1e-5 -> 1e-4, global gradient clip 1.0, plain random crops (no resizing) with flips and
CODA's small brightness jitter. `configs/dino_pretrain.py` keeps DINO's recipe.
Add `--config.train_sources='("source_3","source_5","source_8","source_11")'` and
`--config.eval_splits` from `jaxadapt.data.splits.source_matrix` for the full matrix.
"""

from jaxadapt import config as defaults

#: Where the :gpu variant reads CODA's initialization, ImageNet DeiT-S (facebookresearch/deit
#: release deit_small_patch16_224-cd65a155.pth); nothing is downloaded: put the file there or
#: pass --config.model.init=<path> (or =random).
DEIT_S = "~/.cache/jaxadapt/weights/deit_small_patch16_224-cd65a155.pth"
from jaxadapt.data import splits
from jaxadapt.data.sim import design, target2


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    c = defaults.get_defaults()
    c.study = "coda_matrix"
    # ttt_mae adapts every test image alone (20 steps on 16 copies): 0.87 images/s measured
    # on 2 loaded CPU cores, over an hour for this world's ~3,800 test images, so the CPU variant
    # leaves it out (add it with --config.methods); the GPU variant runs it.
    c.methods = ("supervised", "dual_dino", "dual_cb", "oda", "coda")
    c.train_sources = ("source_3",)
    c.eval_splits = splits.source_matrix(c.train_sources, target2.MAIN_SOURCES)
    c.eval.unit = "batch"  # CODA adapts per batch in its main table
    c.eval.matrix_diagonal = "new_batch"
    c.data.sim = design.default_sim_config("jump_target2")
    c.data.sim.batches_per_source = 4  # source_3: 2 training batches, 1 validation, 1 new
    c.data.sim.plates_per_batch = 2  # cross-batch pairs within a batch unit
    c.data.normalization = "per_image"  # CODA: each image z-scored per channel
    c.model.name = "vit_cpu"  # 64-dim, 4 blocks, 4 heads, patch 8, 48 px
    c.model.num_classes = design.num_classes("jump_target2")
    c.model.drop_path_rate = 0.1  # the DINO student's stochastic depth
    coda_step1(c)
    if variant == "gpu":
        gpu_sizes(c)
    return c


def coda_step1(c):
    """CODA's step-1 DINO recipe (the reference's self-supervised-coda-step-1.json).

    AdamW at lr 1e-4 with no batch scaling, weight decay cosine 1e-5 -> 1e-4, the global
    gradient norm clipped at 1.0; plain random crops (RandomCrop, no RandomResizedCrop),
    flips and the small brightness jitter (the `dino.views` defaults). Args: c, in place.
    """
    c.dino.base_lr, c.dino.lr_scaling = 1e-4, "none"
    c.dino.weight_decay, c.dino.weight_decay_end = 1e-5, 1e-4
    c.dino.clip_grad, c.dino.global_clip = 1.0, True
    c.dino.views.crop_mode = "plain"


def gpu_sizes(c):
    """The paper's sizes: DeiT-S/16 at 224 px, CODA's head and schedules. Args: c, in place."""
    c.data.sim.image_size = 256
    c.data.sim.sites_per_well = 9
    c.data.sim.batches_per_source = 23
    c.data.sim.plates_per_batch = 2
    c.data.crop_size = 224
    c.data.num_threads = 16
    c.model.name = "vit_small"
    c.model.init = DEIT_S  # as the reference: every extractor starts from ImageNet DeiT-S
    c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 4096, 2048, 256
    c.dino.epochs, c.dino.batch_size, c.dino.warmup_epochs = 300, 128, 10
    c.dino.warmup_teacher_temp_epochs = 30
    # CODA centre-crops 448 px of the 1080 px field; the simulator's 256 px field is about
    # that centre at half resolution, so the views come from the whole field.
    c.dino.views.global_size, c.dino.views.local_size = 224, 96
    c.coda.task.embed_dim, c.coda.task.depth, c.coda.task.num_heads = 384, 12, 6
    c.coda.task.num_epochs, c.coda.task.patience, c.coda.task.batch_size = 50, 50, 128
    c.coda.task.eval_batch_size = 256
    c.coda.adapt.epochs, c.coda.adapt.batch_size = 300, 128
    c.coda.adapt.warmup_epochs, c.coda.adapt.warmup_teacher_temp_epochs = 10, 30
    c.mae.size, c.mae.epochs, c.mae.batch_size, c.mae.warmup_epochs = "mae_small", 300, 256, 40
    c.mae.ttt_copies, c.mae.ttt_chunk = 128, 8
    c.methods += ("ttt_mae",)
    c.train.eval_batch_size = 256
    c.eval.batch_size = 256
