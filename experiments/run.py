"""Runs one jaxadapt study.

    python experiments/run.py --config configs/quickstart.py [--config.<key>=<value>] [--workdir DIR]

`--config configs/<study>.py:gpu` selects a study's full-sized variant. The config is
locked: a mistyped key fails and lists the valid ones; the whole config is validated
before anything is rendered or trained. A bad config or bad data ends the run with one
line per problem (`error: ...`, naming the key, the value and the fix) and exit status 2;
`--traceback` shows the full traceback instead. A run cut short by
`--config.train.stop_after_epochs` says `stopped: ...` and exits with status 3; the same
command resumes it. Results land in
`<workdir>/results.{json,md,csv,png}` (default workdir: runs/<study>).
"""

from absl import app, flags
from ml_collections import config_flags

from jaxadapt.eval import cli, study

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<study>).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host GPU/TPU)."
)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On an error, show the full Python traceback instead of one line.")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    cli.report_errors(
        lambda: study.main(_CONFIG.value, workdir=_WORKDIR.value, distributed=_DISTRIBUTED.value),
        traceback=_TRACEBACK.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
