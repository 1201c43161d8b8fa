"""The training engine every method family shares.

Explicit training state (`state`), jitted steps (`steps`), data parallelism over every
device and host (`parallel`), the epoch loop with early stopping and exact resume
(`loop`), orbax checkpoints (`checkpoint`), metric logs (`writer`, `progress`) and the
generic classifier trainer (`supervised`).
"""

from jaxadapt.train.checkpoint import Checkpointer
from jaxadapt.train.loop import FitConfig, FitResult, fit
from jaxadapt.train.parallel import make_data_mesh, replicate, shard_batch
from jaxadapt.train.state import TrainState, create_train_state
from jaxadapt.train.steps import make_eval_step, make_train_step
from jaxadapt.train.supervised import make_classifier_trainer
from jaxadapt.train.writer import MetricWriter

__all__ = ["Checkpointer", "FitConfig", "FitResult", "MetricWriter", "TrainState",
           "create_train_state", "fit", "make_classifier_trainer", "make_data_mesh",
           "make_eval_step", "make_train_step", "replicate", "shard_batch"]
