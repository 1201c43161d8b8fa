"""Shared defaults of every study: simulator, splits, model, training, evaluation.

Study configs under configs/ call `get_defaults()` and change what they study; nothing
is copied.
The CPU-sized defaults run on a laptop; `gpu_overrides()` gives the paper-sized model.
"""

import os

import ml_collections

from jaxadapt.data import schema
from jaxadapt.data.sim import default_sim_config


def get_defaults() -> ml_collections.ConfigDict:
    """Every knob a study reads, at CPU size.

    Returns:
      A ConfigDict with the study fields and the sub-configs data, splits, model, train,
      eval, arm and adapt.
    """
    c = ml_collections.ConfigDict()
    c.study = "study"
    c.seeds = (0, 1, 2)
    c.methods = ("erm",)
    # Leave-one-source-out folds: each entry trains on that source, the rest is new_source.
    c.train_sources = ("source_3",)
    # Pooled splits (jaxadapt.data.splits.SPLITS) and/or source pairs "source:<a>-><b>"
    # (trained on a, scored on b; a == b: a's in-domain wells); splits.source_matrix builds
    # a whole source x target matrix.
    c.eval_splits = ("in_domain", "new_batch", "new_source")
    # Trained models are kept under <checkpoint_dir>/<source>/seed<k>/<trainer>-<config hash>;
    # "" = <workdir>/checkpoints. Studies sharing a directory reuse identically trained models.
    c.checkpoint_dir = ""
    # Swept settings, one result row each: L (test batch), alpha (label shift), N (controls),
    # unit (adaptation unit), adapt_on (the subset of a unit methods adapt on).
    c.sweep = ()
    c.data, c.splits, c.model = _data(), _splits(), _model()
    c.train, c.eval, c.arm, c.adapt = _train(), _eval(), _arm(), _adapt()
    c.dino = _dino()
    c.coda = _coda()
    c.mae = _mae()
    c.tvn = _tvn()
    return c


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.sim = default_sim_config("jump_poscon")
    d.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "jaxadapt", "tfds")
    d.crop_size = 48  # training: random crop + flips; evaluation: centre crop
    # "dataset": per-channel mean/std of the training images (CS-ARM-BN); "per_image":
    # each crop standardized by its own per-channel mean and unbiased std (CODA, ViTs).
    d.normalization = "dataset"
    d.num_threads = 2  # grain reader threads (no worker processes: cheap on 2 cores)
    # "sim": the simulator (data.sim); "jump": real Cell Painting images (data.jump);
    # "jump_profiles": well-level CellProfiler profiles (data.profiles) fed to
    # model.name="mlp" as 1 x 1 images with in_channels features (set data.crop_size=1 and
    # model.in_channels to the feature count). `jaxadapt.data.worlds.LOADERS` reads each.
    d.source = "sim"
    d.jump = _jump()
    d.profiles = _profiles()
    return d


def _jump() -> ml_collections.ConfigDict:
    """Real JUMP-CP images (`config.data.source = "jump"`, see `jaxadapt.data.worlds`).

    Relative paths are under `root`; every table may be .csv, .csv.gz or .parquet.
    Empty subset tuples keep everything.
    """
    j = ml_collections.ConfigDict()
    j.root = ""  # local copy of the Cell Painting Gallery (or an fsspec URL)
    # PathName_* values under this prefix are read from the same place under root.
    j.remote_prefix = "s3://cellpainting-gallery/"
    j.load_data = ()  # per-plate load_data tables: paths or globs
    j.well_csv = ""  # JUMP's well.csv.gz: Metadata_{Source,Plate,Well,JCP2022}
    j.plate_csv = ""  # JUMP's plate.csv.gz; needed for plate_types
    # compound -> class: a table of Metadata_JCP2022 + label (0..K-1) or moa, or a shipped
    # one: "builtin:jump_poscon" (the 8 positive controls), "builtin:jump_target2" (MoAs).
    j.labels = ""
    j.sources = ()  # subsets: Metadata_Source values, e.g. ("source_3", "source_8")
    j.batches = ()  # Metadata_Batch values
    j.plate_types = ()  # Metadata_PlateType values, e.g. ("COMPOUND",) or ("TARGET2",)
    j.compounds = ()  # JCP2022 ids, controls included (e.g. the 8 positive controls + DMSO)
    j.controls = (schema.DMSO,)  # negative controls: no class, the context of CS-ARM-BN
    j.drop_unlabelled = False  # True: drop sites of compounds without a class (logged)
    j.channels = schema.CHANNELS  # load_data's Orig<ch> channels, in image order
    j.image_size = 0  # > 0: centre-crop/pad every site to this size; 0: keep it
    j.downsample = 2  # block-mean downsampling (CS-ARM-BN: 2x)
    j.upper_percentile = 99.99  # 16 -> 8 bit: clip each channel here ...
    j.lower_percentile = 0.0  # ... and stretch from here
    j.stats_sample = 4096  # at most this many training images for channel statistics; 0: all
    j.num_workers = 4  # threads reading TIFFs while building the store
    # The store builder (`jump_images.build_jump_store`): "local" (threads, resumable shards)
    # or "beam" (Apache Beam through TFDS; pip install -e ".[beam]").
    j.engine = "local"
    j.beam_runner = ""  # engine "beam": "" = DirectRunner, or e.g. "DataflowRunner"
    j.beam_options = ()  # engine "beam": Beam pipeline flags, e.g. ("--project=p",)
    # Bad sites (missing/truncated TIFF, empty channel cell, plate absent from the tables,
    # odd size): "raise" names them; "skip" leaves them out, listed in the store's
    # build_report.json (its path is logged).
    j.on_bad_site = "raise"
    # Illumination correction from load_data's FileName_Illum*/PathName_Illum* columns:
    # "auto" when present, "on" requires them, "off" never.
    j.illum = "auto"
    j.shard_sites = 256  # sites per shard: the unit a restarted build keeps
    j.check_headers = True  # read every TIFF header first (needed for on_bad_site="skip")
    j.progress_every_s = 30.0  # seconds between build progress lines (rate, ETA)
    return j


def _profiles() -> ml_collections.ConfigDict:
    """Well-level JUMP profiles (`jaxadapt.data.profiles.tables.ProfileSpec`)."""
    p = ml_collections.ConfigDict()
    p.paths = ()  # .parquet / .csv / .csv.gz tables, Metadata_* + feature columns
    p.label_table = ""  # CSV compound,label[,moa]; controls are not listed
    p.plate_table = ""  # JUMP plate.csv.gz: source and batch per plate, if the tables lack them
    p.well_table = ""  # JUMP well.csv.gz: compound per well, if the tables lack it
    p.columns = ml_collections.ConfigDict({
        "source": "Metadata_Source", "batch": "Metadata_Batch", "plate": "Metadata_Plate",
        "well": "Metadata_Well", "compound": "Metadata_JCP2022"})
    p.feature_prefixes = ("Cells_", "Cytoplasm_", "Nuclei_")
    p.control_compounds = ("JCP2022_033924",)  # DMSO
    p.normalization = "mad_robustize"  # per plate against its controls (data.profile_norm); "standardize"; "none"
    p.on_nonfinite = "raise"  # NaN/inf features: "drop_features" / "drop_wells", listed in a report
    p.on_unlabelled = "raise"  # compounds neither labelled nor controls: "drop", listed in the report
    p.report_dir = ""  # "" = beside the first profile table
    return p


def _splits() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.val_batches = 0.15  # of the training source's batches (at least 1), as the paper
    s.new_batch_batches = 1  # held-out batches of the training source
    s.in_domain_fraction = 0.25  # wells per (plate, compound) held out of training plates
    s.seed = 0
    return s


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "resnet18"
    m.width = 16
    m.stem = "small"  # 3x3/2 conv, no pool: for 32-64 px inputs
    m.num_classes = 8  # the 8 JUMP positive controls
    m.in_channels = 5  # DNA, ER, RNA, AGP, Mito (profiles: the number of features)
    m.mlp_hidden_layers = 2  # model.name="mlp": Dense-BN-ReLU blocks of `width` units
    # ViT initialization: "random", or a local DeiT/timm/DINO checkpoint (.pth, .safetensors,
    # .npz) imported into the backbone (`jaxadapt.models.pretrained`), its RGB patch filters
    # mapped to the C channels by `init_channel_rule`: "cycle" (the reference's
    # modify_first_layer) or "select" (RGB onto `init_select_channels`, the rest zero).
    m.init = "random"
    m.init_channel_rule = "cycle"
    m.init_select_channels = (0, 1, 2)
    return m


def _train() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.batch_size = 64
    t.eval_batch_size = 64
    t.learning_rate = 1e-3  # Adam, no schedule (paper)
    t.num_epochs = 30
    t.patience = 6  # paper: 20 over 200 epochs
    t.log_every_steps = 20
    t.stop_after_epochs = 0  # > 0: stop early (resume by re-running); 0: run to the end
    return t


def _eval() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.unit = "plate"  # adaptation unit: plate, batch or source
    # Which rows of a unit a method adapts on: "unit" (all of it), "first_plate",
    # "first_batch", "plate:<name>" or "batch:<name>"; scoring always covers the unit.
    e.adapt_on = "unit"
    e.batch_size = 32  # test batch = the context L of batch-statistics methods
    e.seed = 0  # shuffling of test chunks and label-shift draws
    # What the diagonal `source:<a>-><a>` of a source matrix scores: "in_domain" (held-out
    # wells of the training plates) or "new_batch" (held-out batches of source a).
    e.matrix_diagonal = "in_domain"
    # Also score replicate and MoA retrieval (copairs mAP, rows map_replicate and map_moa)
    # on the embeddings of methods that expose them (erm, tvn; `Method.embed_unit`).
    e.retrieval = False
    return e


def _arm() -> ml_collections.ConfigDict:
    """Episodic (ARM-BN / CS-ARM-BN) training: E plates per step, L perturbed + N controls.

    Test chunks must look like training episodes: eval.batch_size == n_perturbed and
    adapt.n_controls == n_controls keep the same share of controls in every context.
    """
    a = ml_collections.ConfigDict()
    a.episodes_per_step = 4  # paper: 8
    a.n_perturbed = 32  # paper: 64 (on 2 CPU cores, more optimizer steps per epoch)
    a.n_controls = 32  # paper: 128 (cs_arm_bn only; arm_bn uses 0)
    a.steps_per_epoch = 0  # 0: about one pass over the training perturbed images
    a.val_episodes = 16
    a.on_missing_controls = "raise"  # or "skip" plates without controls
    return a


def _adapt() -> ml_collections.ConfigDict:
    """Test-time adaptation settings."""
    a = ml_collections.ConfigDict()
    a.n_controls = 32  # cs_arm_bn: fresh controls appended to each test chunk (paper 128)
    a.control_seed = 0
    a.on_missing_controls = "raise"  # or "perturbed_only": fall back, logged and counted
    # cs_arm_bn: a unit with fewer controls than N: "raise", or "resample" (with
    # replacement, logged and counted as units_short_of_controls in the results).
    a.on_short_controls = "raise"
    # A test context's control share N / (L + N) must equal the training episodes'
    # (arm.n_controls / (arm.n_perturbed + arm.n_controls)); True scores a mismatch on
    # purpose and marks the result rows (setting "share_mismatch").
    a.allow_share_mismatch = False
    a.tent_lr = 1e-3
    a.plate_chunk_size = 64  # images per pass of exact whole-plate statistics
    return a


def _dino() -> ml_collections.ConfigDict:
    """DINO pretraining of a ViT (`config.model.name` "vit_*"); CPU-sized, paper values in comments."""
    d = ml_collections.ConfigDict()
    d.out_dim = 1024  # head output K (DINO 65536, CODA 4096)
    d.hidden_dim = 512  # head MLP (2048)
    d.bottleneck_dim = 128  # (256)
    # True: the head's last layer is weight-normalized with g = 1 frozen (DINO's default);
    # False: g is learned (what DINO's authors use for ViT-S; less stable).
    d.norm_last_layer = True
    d.epochs = 10  # (DINO 100, CODA 300)
    d.batch_size = 32  # global batch, over every device and host (DINO 1024)
    d.base_lr = 5e-4  # lr = base_lr * batch_size / 256 (lr_scaling), warm-up then cosine
    d.lr_scaling = "linear"  # DINO's lr = base_lr * B / 256; "none": lr = base_lr (CODA)
    d.min_lr = 1e-6
    d.warmup_epochs = 2  # (10)
    d.weight_decay = 0.04  # cosine to weight_decay_end; not on biases and 1-D tensors
    d.weight_decay_end = 0.4
    d.momentum_teacher = 0.996  # teacher EMA, cosine to 1
    d.warmup_teacher_temp = 0.04  # linear to teacher_temp over warmup_teacher_temp_epochs
    d.teacher_temp = 0.07
    d.warmup_teacher_temp_epochs = 3  # (30)
    d.student_temp = 0.1
    d.centre_momentum = 0.9
    d.freeze_last_layer = 1  # epochs the head's last layer stays fixed
    d.clip_grad = 3.0  # per-parameter norm clip (DINO); 0 disables
    d.global_clip = False  # True: clip the global norm instead (CODA: 1.0)
    d.pair_level = "plate"  # cross-batch trainer (dino_cb): partner from another "plate" or "batch"
    d.log_every_steps = 10
    d.knn_k = 20  # kNN probe of the teacher's features (DINO's eval_knn)
    d.knn_temperature = 0.07
    d.knn_bank_size = 4096  # labelled training images in the bank (a fixed random subset)
    v = ml_collections.ConfigDict()
    v.global_size = 48  # (224; CODA 224 of 448)
    v.local_size = 24  # (96)
    v.n_local = 6  # (CODA 6; DINO 8-10)
    v.global_scale = (0.4, 1.0)
    v.local_scale = (0.05, 0.4)
    v.ratio = (3 / 4, 4 / 3)
    v.flips = True
    v.intensity_p = 0.5
    v.intensity_shift = 0.005
    v.intensity_gamma = 0.005
    v.standardize = True
    v.crop_mode = "resized"  # DINO's RandomResizedCrop; "plain": CODA's RandomCrop
    v.centre_crop = 0  # side of the image's centre the views come from (CODA 448); 0: all
    d.views = v
    return d


def _coda() -> ml_collections.ConfigDict:
    """CODA's task models and online adaptation; CPU-sized, the reference's values in comments.

    `task`: training of the supervised ViT and of the dual model's task transformer (the
    reference's step 2: AdamW lr 1e-4, weight decay 1e-5, linear warm-up 3 epochs then
    constant, global gradient norm 1.0, 50 epochs, batch 128). `adapt`: online DINO
    adaptation of the extractor on a target unit (step 3: AdamW lr 1e-4, no batch scaling,
    warm-up 10 epochs then cosine to 1e-6, weight decay cosine 1e-5 -> 1e-4, global clip
    1.0, teacher momentum 0.996, last layer frozen in the first epoch, 300 epochs).
    """
    c = ml_collections.ConfigDict()
    t = ml_collections.ConfigDict()
    t.embed_dim = 64  # task transformer width (DeiT-S 384)
    t.depth = 2  # (12)
    t.num_heads = 4  # (6)
    t.mlp_ratio = 4.0
    t.learning_rate = 1e-4
    t.weight_decay = 1e-5
    t.warmup_epochs = 3
    t.clip_grad = 1.0  # global norm; 0 disables
    t.num_epochs = 30  # (50)
    t.patience = 30  # the reference keeps the best validation epoch of all
    t.batch_size = 32  # (128)
    t.eval_batch_size = 64
    t.log_every_steps = 20
    c.task = t
    a = ml_collections.ConfigDict()
    a.epochs = 3  # (300)
    a.batch_size = 32  # (128); a unit smaller than one batch adapts on one smaller batch
    a.lr = 1e-4  # used as is (the reference does not scale it with the batch)
    a.min_lr = 1e-6
    a.warmup_epochs = 1  # (10)
    a.weight_decay = 1e-5
    a.weight_decay_end = 1e-4
    a.momentum_teacher = 0.996
    a.warmup_teacher_temp = 0.04
    a.teacher_temp = 0.07
    a.warmup_teacher_temp_epochs = 0  # (30 of 300)
    a.freeze_last_layer = 1
    a.clip_grad = 1.0
    a.global_clip = True
    a.seed = 0  # views and pairs of the adaptation, with the unit's name
    # The DINO centre the adaptation starts from: "zero", as the reference's step 3 (it
    # loads only the encoders); "pretrained" carries the pretraining's centre over.
    a.centre = "zero"
    c.adapt = a
    return c


def _mae() -> ml_collections.ConfigDict:
    """The MAE of TTT-MAE and of study 6 (ODA with MAE); CPU-sized, MAE's values in comments."""
    m = ml_collections.ConfigDict()
    m.size = "mae_cpu"  # jaxadapt.models.mae.MAE_SIZES (mae_small: ViT-S/16 encoder)
    m.epochs = 10  # pretraining (MAE 800)
    m.batch_size = 32  # (4096)
    m.blr = 1.5e-4  # lr = blr * batch / 256, AdamW betas (0.9, 0.95)
    m.weight_decay = 0.05
    m.warmup_epochs = 1  # (40), then half-cycle cosine to min_lr
    m.min_lr = 0.0
    m.mask_ratio = 0.75
    m.norm_pix = True  # per-patch targets standardized with the unbiased variance
    m.log_every_steps = 10
    # TTT-MAE: each test image alone, from the trained MAE, SGD on copies of itself.
    m.ttt_steps = 20
    m.ttt_lr = 5e-3  # (blr 1e-2 x 128 / 256)
    m.ttt_momentum = 0.9
    m.ttt_copies = 16  # (128)
    m.ttt_chunk = 16  # images adapted per compiled call (memory: chunk x copies activations)
    m.ttt_seed = 0
    return m


def _tvn() -> ml_collections.ConfigDict:
    """Method `tvn`: frozen embeddings -> TVN (EFAAR) -> linear head (`jaxadapt.methods.tvn.head`)."""
    t = ml_collections.ConfigDict()
    # "erm": the erm recipe's ResNet, pooled penultimate features (ImageNet-free, trained on
    # the training source); "dino": the dino recipe's ViT CLS token (a vit_* model config);
    # "file": the .npy array at embeddings_file, one row per site of the table.
    t.extractor = "erm"
    t.embeddings_file = ""
    t.per_unit = True  # align each unit (training plate / scored unit) on its own controls
    t.coral = False  # per-unit CORAL after TVN
    t.coral_lam = 0.5  # CORAL ridge (EFAAR: 0.5)
    t.min_variance = 1e-6  # TVN keeps directions with variance > this x the largest
    t.head_steps = 500  # full-batch Adam steps of the logistic-regression head
    t.head_lr = 0.05
    t.head_weight_decay = 1e-4  # L2 on the head's weights
    return t


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
    # in_domain units hold a quarter of a plate's DMSO wells (8 x 9 sites = 72 < 128):
    # their controls are drawn with replacement, logged and counted in the results.
    c.adapt.on_short_controls = "resample"
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
