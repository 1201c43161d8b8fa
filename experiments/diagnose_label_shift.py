"""Explains a label-shift result: the bias a one-class context puts into BN statistics.

    python experiments/diagnose_label_shift.py --config configs/label_shift.py \\
        --config.checkpoint_dir=runs/shared_ckpt [--seed 0] [--controls 0,32,128]

Loads (or trains) the study's model for one seed, then prints per network stage the
standardized shift of BN means (`jaxadapt.eval.diagnostics`): between training plates
(the batch effect that meta-training removes), from a new batch's plate to the training
plates, and from a balanced to a one-class context of the same plate with N controls
(the label-shift bias). CS-ARM-BN keeps its accuracy under label shift only where the
last is small next to the first two.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxadapt.data.pipeline import DataView
from jaxadapt.eval import cli, diagnostics, protocol, study


_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The study's run directory (default: runs/<study>).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the replicate to analyse.")
_TRAINER = flags.DEFINE_string("trainer", "cs_arm_bn", "Which trained model: erm, arm_bn or cs_arm_bn.")
_SPLIT = flags.DEFINE_string("split", "new_batch", "Test split whose plates get one-class contexts.")
_CONTROLS = flags.DEFINE_list("controls", ["0", "32", "128"], "Controls N per context.")
_TRAIN_CONTROLS = flags.DEFINE_integer(
    "train_controls", None, "Load the CS-ARM-BN model meta-trained with this many controls "
    "per episode (as a study sweeping N scores it); default: config.arm.n_controls.")
flags.mark_flag_as_required("config")


def images_of(view: DataView):
    """rows -> evaluation images of those rows, in one batch."""
    def read(rows):
        (batch,) = view.eval_batches(rows[None])
        return batch["image"]
    return read


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or f"runs/{cfg.study}"
    rep = protocol.Replicate(cfg.train_sources[0], _SEED.value)
    overrides = () if _TRAIN_CONTROLS.value is None else (("arm.n_controls", _TRAIN_CONTROLS.value),)
    model, view, rows, variables = study.load_replicate(cfg, _TRAINER.value, rep, workdir, overrides)
    stats_of = diagnostics.context_stats_fn(model, variables, images_of(view))
    L = int(cfg.eval.batch_size)
    print(f"{_TRAINER.value}, {rep.run_id}; standardized shift of BN means, mean per stage; "
          f"contexts of L={L} perturbed + N controls of one plate")
    for n in map(int, _CONTROLS.value):
        out = diagnostics.label_shift_bias(stats_of, view.table, rows["train"], rows[_SPLIT.value],
                                           n_perturbed=L, n_controls=n, seed=_SEED.value)
        print(f"\nN={n}\n| stage | balanced vs balanced, same plate (noise floor) "
              f"| train plate vs train plate | {_SPLIT.value} plate vs train plate "
              f"| one class vs balanced | ratio one class / plate-to-plate |\n|---|---|---|---|---|---|")
        for stage, p2p in out["plate_to_plate"].items():
            one = out["one_class"][stage]
            print(f"| {stage} | {out['noise_floor'][stage]:.3f} | {p2p:.3f} | "
                  f"{out['new_plate'][stage]:.3f} | {one:.3f} | {one / p2p:.2f} |")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
