"""One process of a multi-process run on CPU (launched by test_multihost.py).

    python tests/train/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT RUN

Joins a ``jax.distributed`` job with a localhost coordinator and gloo CPU collectives
(NUM_PROCESSES=1: no job, the one-process reference), then on a tiny in-memory study
computes the training images' channel statistics, trains ERM and CS-ARM-BN a few steps,
scores AdaBN on every plate and pretrains DINO with cross-plate pairs (a tiny ViT, one
epoch and its kNN probe), exactly as the study runner would. Writes
``OUT/process<id>.npz``: the statistics, the trained parameters and batch statistics,
the confusion matrix, DINO's student, teacher, centre and kNN bank with the epoch's
global pair batches, and every row this process read in each phase.
RUN is the run directory (the same for every process of a job: orbax checkpoints).
"""

import os
import sys
import time
import types

PID, NPROC, PORT, NDEV = (int(a) for a in sys.argv[1:5])
OUT, RUN = sys.argv[5], sys.argv[6]
os.environ["JAX_PLATFORMS"] = "cpu"
# LLVM optimization level 0 halves the compilation of the DINO step (the test's main cost);
# every process of both runs compiles alike, so the comparison is unaffected.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={NDEV} "
                           "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")  # as tests/conftest.py
if NPROC > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{PORT}", num_processes=NPROC,
                               process_id=PID)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxadapt import config as defaults
from jaxadapt.methods import registry
from jaxadapt.data import sampling as samplers, schema, transforms
from jaxadapt.eval import protocol, study
from jaxadapt.data.pipeline import DataView
from jaxadapt.models.resnet import BasicBlock, ResNet
from jaxadapt.methods.base import UnlabelledImages
from jaxadapt.methods.coda import dino_trainer, online
from jaxadapt.methods.bn import episodic
from jaxadapt.train import supervised

S, CROP, K = 20, 16, 3
MODEL = ResNet(stage_sizes=(1,), block_cls=BasicBlock, width=4, stem="small", num_classes=K,
               in_channels=5)


class LoggedSource:
    """In-memory records that log every row read (the test checks each process's share)."""

    def __init__(self, images):
        self.images, self.log, self.calls = images, [], []

    def __len__(self):
        return len(self.images)

    def __getitems__(self, keys):
        self.log.extend(int(k) for k in keys)
        self.calls.append(len(keys))  # rows per call
        return [{"image": self.images[k]} for k in keys]

    def take_log(self) -> np.ndarray:
        out, self.log, self.calls = np.array(self.log, np.int64), [], []
        return out


def make_study(plates=4, per_plate=18, ctrl=6, seed=0, size=S):
    """Plates p0..p3 with a plate effect; p3 is the validation split. Images size x size."""
    rng = np.random.default_rng(seed)
    n = plates * (per_plate + ctrl)
    plate = np.repeat([f"p{p}" for p in range(plates)], per_plate + ctrl)
    label = np.tile(np.r_[np.arange(per_plate) % K, -np.ones(ctrl, int)], plates)
    is_ctrl = label < 0
    img = rng.normal(100, 20, size=(n, size, size, 5))
    img[..., 0] += 30 * np.maximum(label, 0)[:, None, None]
    img += 15 * np.repeat(np.arange(plates), per_plate + ctrl)[:, None, None, None]
    images = np.clip(img, 0, 255).astype(np.uint8)
    table = schema.SiteTable({
        "source": np.array(["s"] * n), "batch": np.array(["b"] * n), "plate": plate,
        "well": np.array([f"W{i}" for i in range(n)]), "site": np.zeros(n, np.int64),
        "compound": np.where(is_ctrl, schema.DMSO, "c"), "moa": np.array([""] * n),
        "label": label, "is_control": is_ctrl,
    })
    stats = transforms.channel_stats_of(images)
    source = LoggedSource(images)
    view = DataView(source, table, transforms.eval_transform(CROP, stats),
                    transforms.train_transform(CROP, stats), num_threads=1)
    val = plate == f"p{plates - 1}"
    return source, view, {"train": np.flatnonzero(~val), "validation": np.flatnonzero(val)}


def make_config():
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({"crop_size": CROP})
    c.model = ml_collections.ConfigDict({"in_channels": 5})
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, eval_batch_size=8, learning_rate=1e-2, num_epochs=2, patience=10,
        log_every_steps=100, stop_after_epochs=0))
    c.arm = ml_collections.ConfigDict(dict(episodes_per_step=4, n_perturbed=4, n_controls=2,
                                           steps_per_epoch=3, val_episodes=4,
                                           on_missing_controls="raise"))
    return c


def make_dino_config():
    """A 2-block ViT (patch 8, 32 px views of 40 px images), one epoch of 2 steps of 8 pairs."""
    c = defaults.get_defaults()
    c.model.name, c.model.num_classes, c.model.drop_path_rate = "vit_cpu", K, 0.1
    c.model.update(dict(embed_dim=16, depth=2, num_heads=2, img_size=32, patch_size=8))
    c.data.normalization, c.data.crop_size = "per_image", 32
    c.train.eval_batch_size, c.train.stop_after_epochs = 8, 0
    d = c.dino
    d.out_dim, d.hidden_dim, d.bottleneck_dim = 64, 32, 16
    d.epochs, d.batch_size, d.warmup_epochs, d.warmup_teacher_temp_epochs = 1, 8, 0, 0
    # No warm-up, a large rate and a trained last layer: both steps move every weight
    # far beyond the test's tolerance.
    d.base_lr, d.freeze_last_layer = 0.3, 0
    d.views.global_size, d.views.local_size, d.views.n_local = 32, 16, 2
    d.knn_bank_size, d.knn_k, d.log_every_steps = 12, 5, 1
    return c


def dino_study():
    """(view, rows, eval source) for DINO: 40 px images, cross-plate pairs of 18 images.

    The views of the training pairs are read from ``view.source``, the kNN probe's
    images through ``view.eval_batches`` from a second LoggedSource, so that the test
    sees each phase's reads apart.
    """
    views_source, view, rows = make_study(size=40)
    eval_source = LoggedSource(views_source.images)
    evaluate = DataView(eval_source, view.table, transforms.per_image_eval_transform(32), None,
                        num_threads=1)
    dino_view = types.SimpleNamespace(source=views_source, table=view.table, num_threads=1,
                                      eval_batches=evaluate.eval_batches)
    # 18 of the 72 training images (6 per plate, every class): an epoch of 2 batches of 8.
    return dino_view, {"train": rows["train"][::4], "validation": rows["validation"][::2]}, \
        eval_source


def run_dino(run_dir: str) -> dict:
    """DINO with cross-plate pairs: trained variables, the epoch's pairs, each phase's reads."""
    cfg, (view, rows, eval_source) = make_dino_config(), dino_study()
    out = dino_trainer.make_dino_trainer(cfg, pairs="plate")(view, rows, run_dir, 0)
    result = {f"dino_{k}{p}": v for k in ("student", "params", "centre", "knn_bank")
              for p, v in _leaves(out[k]).items()}
    pairs, _ = dino_trainer.epoch_pairs(view.table, rows["train"], cfg.dino.batch_size,
                                        level="plate", seed=0, epoch=0)
    # One read call per batch of views (its distinct rows): the test splits the log by call.
    result.update(dino_pairs=pairs, dino_call_sizes=np.array(view.source.calls),
                  dino_view_reads=view.source.take_log(), dino_eval_reads=eval_source.take_log())
    return {**result, **run_oda(view, out)}  # after the pretraining's reads are taken


def run_oda(view, dino_out) -> dict:
    """CODA's online adaptation (cross-plate pairs) of the pretrained state on plates p2, p3.

    Every process calls the adapter on the same unit (a collective over the global mesh);
    the teacher follows the student closely (momentum 0.5) so that it moves measurably.
    """
    cfg = make_dino_config()
    a = cfg.coda.adapt
    a.epochs, a.batch_size, a.warmup_epochs, a.freeze_last_layer = 1, 8, 0, 0
    a.lr, a.momentum_teacher = 0.01, 0.5
    rows = np.flatnonzero(np.isin(view.table["plate"], ["p2", "p3"]))  # 48 images: 6 steps
    state = {"teacher": dino_out["params"], "student": dino_out["student"],
             "centre": dino_out["centre"]}
    teacher = online.make_online_adapter(cfg, pairs="plate")(
        state, UnlabelledImages(view.source, view.table, rows, 1), seed=5, name="p2+p3")
    result = {f"oda_teacher{p}": v for p, v in _leaves(teacher).items()}
    result["oda_reads"] = view.source.take_log()
    return result


def _leaves(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def flat(variables) -> dict:
    return _leaves({k: variables[k] for k in ("params", "batch_stats")})


def _phase(name: str, start: float) -> float:
    print(f"phase {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return time.perf_counter()


def main():
    t = time.perf_counter()
    source, view, rows = make_study()
    cfg, out = make_config(), {}
    # Normalization statistics of the training images, as the study runner computes them.
    stats = study.train_stats(source, rows["train"])
    out.update(stats_mean=stats.mean, stats_std=stats.std, stats_reads=source.take_log())
    erm = supervised.make_erm_trainer(MODEL, cfg)(view, rows, os.path.join(RUN, "erm"), 1)
    out.update({f"erm{k}": v for k, v in flat(erm).items()}, erm_reads=source.take_log())
    t = _phase("erm", t)
    cs = episodic.make_episodic_trainer(MODEL, cfg, with_controls=True)(
        view, rows, os.path.join(RUN, "cs_arm_bn"), 1)
    out.update({f"cs{k}": v for k, v in flat(cs).items()}, cs_reads=source.take_log())
    t = _phase("cs_arm_bn", t)
    # Evaluation as the protocol runs it: AdaBN adapts per plate, units dealt to processes.
    study_cfg = defaults.get_defaults()
    study_cfg.model.num_classes = K
    units = samplers.eval_units(view.table, np.arange(len(source)), batch_size=8, seed=0)
    method = registry.make_method("adabn", MODEL, study_cfg, {})
    out["cm"] = protocol.score_units(method, erm, view, units, K)
    out["eval_reads"] = source.take_log()
    t = _phase("eval", t)
    out.update(run_dino(os.path.join(RUN, "dino")))
    _phase("dino", t)
    os.makedirs(OUT, exist_ok=True)
    np.savez(os.path.join(OUT, f"process{PID}.npz"), **out)


if __name__ == "__main__":
    main()
