"""The training engine every method family shares.

Explicit training state (`state`), jitted steps (`steps`), data parallelism over every
device and host (`parallel`), the epoch loop with early stopping and exact resume
(`loop`), orbax checkpoints (`checkpoint`), metric logs (`writer`, `progress`) and the
generic classifier trainer (`supervised`).
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "Checkpointer": "jaxadapt.train.checkpoint",
    "FitConfig": "jaxadapt.train.loop",
    "FitResult": "jaxadapt.train.loop",
    "MetricWriter": "jaxadapt.train.writer",
    "TrainState": "jaxadapt.train.state",
    "create_train_state": "jaxadapt.train.state",
    "fit": "jaxadapt.train.loop",
    "make_classifier_trainer": "jaxadapt.train.supervised",
    "make_data_mesh": "jaxadapt.train.parallel",
    "make_eval_step": "jaxadapt.train.steps",
    "make_train_step": "jaxadapt.train.steps",
    "replicate": "jaxadapt.train.parallel",
    "shard_batch": "jaxadapt.train.parallel",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
