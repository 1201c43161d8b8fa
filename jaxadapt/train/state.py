"""Training state as a plain pytree: step, parameters, BN running statistics, optimizer
state, and whatever else a recipe carries (``extra``: e.g. DINO's teacher and centre).

The model and the optimizer are not stored in the state (unlike flax.training's
TrainState with its ``apply_fn``/``tx``): the step factories close over them, so the
state is pure data that checkpoints, shards and crosses ``jit`` boundaries as is.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and returns.

    Attributes:
      step: int32 scalar, number of optimizer updates applied.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (BN running averages; {} if none).
      opt_state: the optax optimizer state.
      extra: a dict pytree of recipe-specific state stepped with the rest, e.g. DINO's
        {"teacher": params, "center": [D], "key": PRNG key}; {} for the BN family.
        Checkpoints written before this field existed restore with ``extra={}``
        (`jaxadapt.train.checkpoint.Checkpointer.restore`).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extra: Any = flax.struct.field(default_factory=dict)

    def variables(self) -> dict[str, Any]:
        """The Flax variables dict for ``model.apply``. Returns: {"params", "batch_stats"}."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    sample_shape: Sequence[int],
    extra: Any = None,
) -> TrainState:
    """Initialize parameters, running statistics and optimizer state.

    Args:
      model: a module called ``model(x, norm_mode=...)`` (e.g. `jaxadapt.models.ResNet`).
      tx: the optax optimizer (built by the caller).
      key: PRNG key for parameter initialization.
      sample_shape: input shape used to trace the model, e.g. ``(1, 48, 48, 5)``.
      extra: optional recipe state (`TrainState.extra`); None for {}.

    Returns:
      A `TrainState` with step 0.
    """
    x = jnp.zeros(tuple(sample_shape), jnp.float32)
    # jit: an un-jitted init of a ResNet-50 dispatches thousands of small ops.
    variables = jax.jit(lambda k: model.init(k, x, norm_mode="running"))(key)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=init_opt_state(tx, params),
        extra={} if extra is None else dict(extra),
    )


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)` under standard dtype promotion (optax's internals rely on it).

    Args:
      tx: the optimizer.
      params: the parameters it will update.

    Returns:
      The optimizer state.
    """
    with jax.numpy_dtype_promotion("standard"):
        return tx.init(params)
