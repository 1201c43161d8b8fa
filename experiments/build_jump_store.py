"""Builds the JUMP image store of a study ahead of it (on this machine or on Apache Beam).

    python experiments/build_jump_store.py --config configs/domain_gap.py:gpu \\
        --config.data.source=jump --config.data.jump.root=/data/cellpainting-gallery ...

Takes exactly the flags of `experiments/run.py` and builds the store that the study
with those flags opens (`jaxadapt.data.worlds.load_world`: same tables, subsets and
options, hence the same cache key), then stops; the study run later reuses it. On a
cluster, set the engine and the runner's pipeline options in the config, e.g.

    --config.data.jump.engine=beam --config.data.jump.beam_runner=FlinkRunner \\
    --config.data.jump.beam_options="('--flink_master=flink-jm:8081', '--environment_type=LOOPBACK')"

A local build interrupted midway resumes from its finished shards when re-run.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxadapt.data import worlds
from jaxadapt.eval import cli, validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On an error, show the full Python traceback instead of one line.")
flags.mark_flag_as_required("config")


def build(cfg) -> str:
    """Validates `cfg` and builds (or reopens) its data; returns a one-line summary."""
    validation.validate(cfg)
    if cfg.data.source != "jump":
        raise ValueError(f"config.data.source={cfg.data.source!r}: this script builds JUMP "
                         "image stores; set --config.data.source=jump")
    source, table = worlds.load_world(cfg)
    line = (f"store ready: {len(source)} sites, {len(table.unique('plate'))} plates, "
            f"batches {table.unique('batch').tolist()}")
    print(line, flush=True)
    return line


def main(argv):
    del argv
    cli.report_errors(lambda: build(_CONFIG.value), traceback=_TRACEBACK.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
