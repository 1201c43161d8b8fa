"""TENT (Wang et al., 2021): test-time entropy minimization of the BN affine parameters.

Semantics of the reference: only BN scale / bias are trained; BN normalizes with the
test batch's own statistics (never the running ones); one Adam step (lr 1e-3, betas
0.9 / 0.999, eps 1e-8, no weight decay) per test batch on the mean softmax entropy of the
batch; the logits returned for a batch are those of the forward pass *before* that
batch's update; episodic reset per target unit. Padding rows (``mask`` False) enter
neither the BN statistics nor the entropy.

In optax style: `tent_adapter(model, lr)` returns ``TentAdapter(init, step)`` with
``init(variables) -> TentState`` and ``step(state, images, mask) -> (state, logits)``
(jitted); a reset is calling ``init`` again.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxadapt.methods.base import Method, Unit, Variables
from jaxadapt.methods.bn.stats import check_finite, layer_paths


#: Reference optimizer settings (DequanWang/tent, cfg OPTIM: Adam, lr 1e-3, beta 0.9).
DEFAULT_LR = 1e-3


class TentState(NamedTuple):
    """Explicit TENT state.

    Attributes:
      variables: the model variables with the current (adapted) BN scale / bias.
      opt_state: Adam state over the BN affine parameters only.
    """

    variables: Variables
    opt_state: Any


class TentAdapter(NamedTuple):
    """The pair of pure functions of TENT (see module docstring)."""

    init: Callable[[Variables], TentState]
    step: Callable[[TentState, jax.Array, jax.Array], tuple[TentState, jax.Array]]


def bn_affine(variables: Variables) -> dict[tuple[str, ...], jax.Array]:
    """The BN scale / bias leaves of ``variables["params"]``, keyed by flat path.

    Args:
      variables: ``{"params", "batch_stats"}``; BN layers are those with batch_stats.

    Returns:
      ``{path + ("scale"|"bias",): array}``.

    Raises:
      ValueError: the model has no BN affine parameter to adapt.
    """
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    layers = set(layer_paths(variables))
    out = {k: v for k, v in flat.items() if k[:-1] in layers and k[-1] in ("scale", "bias")}
    if not out:
        raise ValueError(
            "TENT found no BatchNorm scale/bias in variables['params']; it needs a model "
            "with affine BN layers (use_scale / use_bias True)")
    return out


def _with_affine(variables: Variables, affine: Mapping[tuple[str, ...], jax.Array]) -> Variables:
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    flat.update(affine)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


def masked_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean softmax entropy over the rows with ``mask`` True.

    Args:
      logits: ``[B, K]``.
      mask: bool ``[B]``.

    Returns:
      Scalar ``mean_b -sum_k p_bk log p_bk`` over selected rows (0 if none).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    w = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, ent, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def tent_adapter(model: nn.Module, learning_rate: float = DEFAULT_LR) -> TentAdapter:
    """Build TENT's ``init`` / ``step`` for a model.

    Args:
      model: a model taking ``norm_mode`` / ``stats_mask`` and returning (logits, features).
      learning_rate: Adam step size (reference: 1e-3).

    Returns:
      ``TentAdapter(init, step)``; ``step`` is jitted (compiled once per batch shape).
    """
    tx = optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)

    def init(variables: Variables) -> TentState:
        with jax.numpy_dtype_promotion("standard"):
            return TentState(variables=variables, opt_state=tx.init(bn_affine(variables)))

    @jax.jit
    def _step(state: TentState, images: jax.Array, mask: jax.Array):
        # Zero the padding rows: their (masked-out) values would still reach the
        # backward pass as NaN * 0 if they held junk.
        sel = mask.reshape((-1,) + (1,) * (images.ndim - 1))
        images = jnp.where(sel, images, jnp.zeros((), images.dtype))

        def loss(affine):
            logits, _ = model.apply(_with_affine(state.variables, affine), images,
                                    norm_mode="batch", stats_mask=mask)
            return masked_entropy(logits, mask), logits

        affine = bn_affine(state.variables)
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(affine)
        # optax's Adam bias correction mixes float and int32 step: standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, state.opt_state, affine)
            affine = optax.apply_updates(affine, updates)
        return TentState(_with_affine(state.variables, affine), opt_state), logits

    def step(state: TentState, images: Any, mask: Any | None = None):
        """One TENT step.

        Args:
          state: from ``init`` or a previous step.
          images: ``[B, H, W, C]``.
          mask: optional bool ``[B]``; False = padding (may hold junk, even NaN).

        Returns:
          ``(new state, logits [B, K] of the forward pass before the update)``; rows of
          padding are meaningless.
        """
        images = jnp.asarray(images)
        mask = np.ones(images.shape[0], bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != (images.shape[0],):
            raise ValueError(
                f"tent step: mask has shape {mask.shape}, expected ({images.shape[0]},); "
                "give one entry per image")
        if not mask.any():
            raise ValueError("tent step: mask selects no image (all padding); skip the batch")
        check_finite(images, mask, what="TENT test batch")
        return _step(state, images, jnp.asarray(mask))

    return TentAdapter(init=init, step=step)


def tent(model: nn.Module, cfg: Any = None, setting: Mapping[str, Any] | None = None) -> Method:
    """The `tent` Method: per unit, reset to the trained weights, then one step per batch.

    Args:
      model: the trained architecture (`erm` recipe).
      cfg: reads ``cfg.adapt.tent_lr`` (default 1e-3).
      setting: unused.

    Returns:
      The Method; logits of each batch come from the forward pass before its update.
    """
    lr = DEFAULT_LR
    sub = cfg.get("adapt", None) if cfg is not None and hasattr(cfg, "get") else None
    if sub is not None:
        lr = float(sub.get("tent_lr", DEFAULT_LR))
    adapter = tent_adapter(model, lr)

    def predict_unit(variables: Variables, unit: Unit) -> np.ndarray:
        state = adapter.init(variables)  # episodic reset
        out = []
        for b in unit.batches():
            mask = np.asarray(b.mask, bool)
            if not mask.any():
                continue
            state, logits = adapter.step(state, b.image, mask)
            out.append(np.asarray(logits)[mask])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return Method(name="tent", trainer="erm", predict_unit=predict_unit)
