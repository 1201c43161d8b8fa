"""DINO's schedules, gradient clipping and optimizer (facebookresearch/dino semantics).

Everything here restates the PyTorch reference exactly rather than reaching for the
nearest optax built-in, because the built-ins differ in small, measurable ways:

- DINO's cosine schedule is a per-iteration NumPy array whose linear warm-up includes
  its end point and whose cosine part never reaches the final value; optax's schedules
  do neither. `cosine_schedule` builds the reference array.
- The reference clips each parameter's gradient to its own norm, not the global norm.
- ``torch.optim.AdamW`` keeps one step count *per parameter* and skips a parameter whose
  gradient is ``None`` entirely (no moment update, no decay, no step). DINO sets the
  last layer's gradient to ``None`` during the first epochs, so after the freeze that
  layer's Adam bias correction restarts from step 1. optax's ``adamw`` has one global
  count, so `dino_adamw` keeps a count per leaf.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ----------------------------------------------------------------------------- schedules


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """The reference's ``cosine_scheduler``: one value per training iteration.

    Args:
      base_value: value at the end of the warm-up (the cosine's start).
      final_value: value the cosine tends to (never reached: the last entry is above it).
      epochs: number of epochs.
      niter_per_ep: iterations per epoch.
      warmup_epochs: epochs of linear warm-up from ``start_warmup_value``; the warm-up
        is ``np.linspace`` *including* ``base_value`` as its last entry.
      start_warmup_value: first warm-up value.

    Returns:
      float64 array of length ``epochs * niter_per_ep``.

    Raises:
      ValueError: non-positive epochs/niter_per_ep or warm-up longer than training.
    """
    if epochs <= 0 or niter_per_ep <= 0:
        raise ValueError(f"cosine_schedule: epochs={epochs}, niter_per_ep={niter_per_ep}; "
                         "both must be positive")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"cosine_schedule: warmup_epochs={warmup_epochs} must lie in "
                         f"[0, epochs={epochs}]")
    n_warm = warmup_epochs * niter_per_ep
    warm = np.linspace(start_warmup_value, base_value, n_warm) if warmup_epochs > 0 \
        else np.array([])
    n_cos = epochs * niter_per_ep - n_warm
    it = np.arange(n_cos)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * it / max(n_cos, 1)))
    return np.concatenate((warm, cos))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int,
                          epochs: int) -> np.ndarray:
    """The reference's per-*epoch* teacher temperature: linspace warm-up, then constant.

    Args:
      warmup_temp: temperature of epoch 0 (DINO: 0.04).
      temp: temperature from epoch ``warmup_epochs - 1`` on (DINO/CODA: 0.04-0.07).
      warmup_epochs: epochs of warm-up (the linspace includes ``temp`` as its last entry).
      epochs: number of epochs.

    Returns:
      float64 array of length ``epochs``.

    Raises:
      ValueError: warm-up longer than training.
    """
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"teacher_temp_schedule: warmup_epochs={warmup_epochs} must lie in "
                         f"[0, epochs={epochs}]")
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                           np.ones(epochs - warmup_epochs) * temp))


class DinoSchedules(NamedTuple):
    """Per-iteration schedules, indexed by the global step inside ``jit``.

    Attributes:
      lr, wd, momentum, teacher_temp: float32 arrays of length ``epochs * niter_per_ep``
        (``teacher_temp`` is the per-epoch reference array repeated per iteration).
      freeze_steps: the last layer is frozen while ``step < freeze_steps``.
    """

    lr: jax.Array
    wd: jax.Array
    momentum: jax.Array
    teacher_temp: jax.Array
    freeze_steps: int


def make_dino_schedules(
    *,
    epochs: int,
    niter_per_ep: int,
    batch_size: int,
    base_lr: float = 5e-4,
    min_lr: float = 1e-6,
    warmup_epochs: int = 10,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.996,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.07,
    warmup_teacher_temp_epochs: int = 30,
    freeze_last_layer: int = 1,
    scale_lr: bool = True,
) -> DinoSchedules:
    """All DINO schedules as the reference builds them (defaults: the DINO paper's).

    Args:
      epochs, niter_per_ep: training length.
      batch_size: global batch size (all devices and hosts); lr = base_lr * batch / 256
        when `scale_lr` (DINO), else lr = base_lr (CODA's step 1 and step 3).
      base_lr, min_lr, warmup_epochs: lr warm-up from 0, then cosine to ``min_lr``.
      weight_decay, weight_decay_end: cosine weight-decay schedule.
      momentum_teacher: teacher EMA momentum, cosine to 1.
      warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: teacher temperature.
      freeze_last_layer: epochs during which the last layer does not move.
      scale_lr: scale the peak rate by batch / 256 (DINO's linear scaling rule).

    Returns:
      `DinoSchedules`.

    Raises:
      ValueError: a warm-up longer than training.
    """
    if not 0 <= warmup_teacher_temp_epochs <= epochs:
        raise ValueError(f"make_dino_schedules: warmup_teacher_temp_epochs="
                         f"{warmup_teacher_temp_epochs} must lie in [0, epochs={epochs}]")
    peak = base_lr * batch_size / 256.0 if scale_lr else base_lr
    lr = cosine_schedule(peak, min_lr, epochs, niter_per_ep,
                         warmup_epochs=warmup_epochs)
    wd = cosine_schedule(weight_decay, weight_decay_end, epochs, niter_per_ep)
    mom = cosine_schedule(momentum_teacher, 1.0, epochs, niter_per_ep)
    temp = np.repeat(teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                           warmup_teacher_temp_epochs, epochs), niter_per_ep)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return DinoSchedules(f32(lr), f32(wd), f32(mom), f32(temp),
                         int(freeze_last_layer) * int(niter_per_ep))


def at_step(schedule: jax.Array, step: jax.Array) -> jax.Array:
    """``schedule[step]``, holding the last value past the end (jit-safe).

    Args:
      schedule: 1-D array.
      step: int scalar.

    Returns:
      Scalar.
    """
    return schedule[jnp.clip(step, 0, schedule.shape[0] - 1)]


# ----------------------------------------------------------------------------- clipping


def _norm(g: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))


def clip_per_parameter(grads: Any, max_norm: float, *, global_norm: bool = False) -> Any:
    """Clip gradients as DINO (per tensor) or as ``clip_grad_norm_`` (global, CODA).

    Per tensor: ``coef = max_norm / (||g|| + 1e-6)``; ``g *= coef`` only where
    ``coef < 1``. Global: the same rule with the norm of all tensors together, i.e.
    ``torch.nn.utils.clip_grad_norm_``.

    Args:
      grads: gradient pytree.
      max_norm: the clip threshold (DINO 3.0, CODA 1.0 global); 0 or less: no clipping
        (the reference's ``clip_grad=0``).
      global_norm: use one norm over the whole tree.

    Returns:
      Clipped gradients, same structure.
    """
    if max_norm <= 0:
        return grads

    def scale(g, norm):
        coef = max_norm / (norm + 1e-6)
        return jnp.where(coef < 1, g * coef.astype(g.dtype), g)

    if global_norm:
        total = jnp.sqrt(sum(jnp.square(_norm(g)) for g in jax.tree.leaves(grads)))
        return jax.tree.map(lambda g: scale(g, total), grads)
    return jax.tree.map(lambda g: scale(g, _norm(g)), grads)


# ----------------------------------------------------------------------------- masks


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params: Any) -> Any:
    """True where DINO applies weight decay: not biases, not 1-D (or 0-D) tensors.

    Args:
      params: parameter pytree (Flax names: a bias leaf is called "bias").

    Returns:
      Pytree of Python bools.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, x: not (_path_names(p)[-1:] == ["bias"] or np.ndim(x) <= 1), params)


def last_layer_mask(params: Any, name: str = "last_layer") -> Any:
    """True for the leaves DINO freezes early: any path component named ``name``.

    (The reference freezes every parameter with "last_layer" in its name, i.e. the
    weight-normalized layer's V, here ``("last_layer", "kernel")``.)

    Args:
      params: parameter pytree.
      name: the module name.

    Returns:
      Pytree of Python bools.
    """
    return jax.tree_util.tree_map_with_path(lambda p, x: name in _path_names(p), params)


# ----------------------------------------------------------------------------- optimizer


class DinoAdamWState(NamedTuple):
    """State of `dino_adamw`.

    Attributes:
      step: int32, global iteration (indexes the lr and wd schedules).
      count: per-leaf int32, Adam steps taken by that leaf (torch's ``state['step']``).
      mu, nu: first and second moments.
    """

    step: jax.Array
    count: Any
    mu: Any
    nu: Any


def dino_adamw(
    lr: jax.Array,
    wd: jax.Array,
    *,
    decay: Any | Callable[[Any], Any] = decay_mask,
    frozen: Any | Callable[[Any], Any] = last_layer_mask,
    freeze_steps: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """``torch.optim.AdamW`` with DINO's schedules, decay groups and last-layer freeze.

    Per leaf, when active: ``p <- p (1 - lr wd_leaf)``, then the Adam step
    ``p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` with the leaf's own count.
    A frozen leaf (``frozen`` and ``step < freeze_steps``) is left exactly as torch
    leaves a parameter whose gradient is None: no update, moments and count unchanged.

    Args:
      lr, wd: per-iteration schedules (1-D arrays), indexed by the optimizer's own step.
      decay: bool pytree (or function of params) where weight decay applies.
      frozen: bool pytree (or function of params) of the leaves frozen early.
      freeze_steps: iterations of freeze (``freeze_last_layer * niter_per_ep``).
      b1, b2, eps: Adam constants (torch defaults).

    Returns:
      An optax ``GradientTransformation``; ``update`` needs ``params``.
    """
    lr, wd = jnp.asarray(lr, jnp.float32), jnp.asarray(wd, jnp.float32)

    def init(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return DinoAdamWState(jnp.zeros((), jnp.int32),
                              jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params),
                              jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("dino_adamw.update: params=None; weight decay needs the params")
        dmask = decay(params) if callable(decay) else decay
        fmask = frozen(params) if callable(frozen) else frozen
        lr_t, wd_t = at_step(lr, state.step), at_step(wd, state.step)
        in_freeze = state.step < freeze_steps

        def leaf(g, p, c, m, v, dec, frz):
            active = jnp.logical_not(jnp.logical_and(frz, in_freeze))
            c1 = c + 1
            m1 = b1 * m + (1 - b1) * g
            v1 = b2 * v + (1 - b2) * g * g
            bc1 = 1 - b1 ** c1.astype(jnp.float32)
            bc2 = 1 - b2 ** c1.astype(jnp.float32)
            adam = (lr_t / bc1) * m1 / (jnp.sqrt(v1) / jnp.sqrt(bc2) + eps)
            decay_term = jnp.where(dec, lr_t * wd_t * p, jnp.zeros_like(p))
            u = -(decay_term + adam).astype(p.dtype)
            return (jnp.where(active, u, jnp.zeros_like(u)), jnp.where(active, c1, c),
                    jnp.where(active, m1, m), jnp.where(active, v1, v))

        out = jax.tree.map(leaf, grads, params, state.count, state.mu, state.nu, dmask, fmask)
        treedef = jax.tree.structure(grads)
        u, c, m, v = (jax.tree.unflatten(treedef, list(x)) for x in
                      zip(*treedef.flatten_up_to(out)))
        return u, DinoAdamWState(state.step + 1, c, m, v)

    return optax.GradientTransformation(init, update)


def make_dino_optimizer(schedules: DinoSchedules, **kwargs) -> optax.GradientTransformation:
    """The DINO optimizer from `make_dino_schedules` output.

    Args:
      schedules: `DinoSchedules` (lr, wd, freeze_steps are used).
      **kwargs: passed to `dino_adamw` (``decay``, ``frozen``, ``b1``, ``b2``, ``eps``).

    Returns:
      `dino_adamw` transformation.
    """
    return dino_adamw(schedules.lr, schedules.wd, freeze_steps=schedules.freeze_steps,
                      **kwargs)
