"""MAE's reconstruction objective and its data-parallel pre-training step.

Written for jaxadapt after facebookresearch/mae (`models_mae.py` patchify / forward_loss,
`main_pretrain.py` optimizer, `util/lr_sched.py`): targets are the image's patches,
standardized per patch with the **unbiased** variance (torch ``.var``'s default) and eps
1e-6 when ``norm_pix``; the loss is the per-patch mean squared error averaged over the
*removed* patches only.

Masks: each image's masking noise comes from ``fold_in(key, global image index)``, so a
step's masks (and hence its result) do not depend on how the batch is split over devices.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxadapt.methods.coda.dino_optim import decay_mask
from jaxadapt.models.mae import MAE, mask_noise


__all__ = ["MAEState", "create_mae_state", "image_noise", "mae_loss", "mae_lr_schedule",
           "mae_targets", "make_mae_optimizer", "make_mae_step", "patchify", "unpatchify"]

Array = jax.Array


def _check_patch(images: Array, p: int) -> tuple[int, int, int, int]:
    if images.ndim != 4:
        raise ValueError(f"images have shape {images.shape}; expected (B, H, W, C)")
    b, h, w, c = images.shape
    if h % p or w % p:
        bad = h if h % p else w
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}; crop or "
                         f"resize to a multiple of {p} (e.g. {bad // p * p or p}) or use a "
                         f"patch size that divides {bad}")
    return b, h, w, c


def patchify(images: Array, p: int) -> Array:
    """Cut NHWC images into flattened patches.

    Patches are row-major over the (H/p, W/p) grid; inside a patch the elements are
    ordered (row in patch, column in patch, channel), channel fastest: the reference's
    ``nchpwq -> nhwpqc`` order, here from NHWC.

    Args:
      images: (B, H, W, C); p: patch side, dividing H and W.

    Returns:
      (B, H/p * W/p, p * p * C).
    """
    b, h, w, c = _check_patch(images, p)
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, p: int, grid: tuple[int, int], channels: int) -> Array:
    """The inverse of `patchify`.

    Args:
      patches: (B, rows * cols, p * p * C); p: patch side; grid: (rows, cols);
      channels: C.

    Returns:
      (B, rows * p, cols * p, C).
    """
    gh, gw = grid
    b, n, e = patches.shape
    if n != gh * gw or e != p * p * channels:
        raise ValueError(f"patches have shape {patches.shape}; expected (B, {gh * gw}, "
                         f"{p * p * channels}) for grid {grid}, p={p}, C={channels}")
    x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, channels)


def mae_targets(images: Array, p: int, norm_pix: bool = True) -> Array:
    """Reconstruction targets: the patches, standardized per patch when ``norm_pix``.

    ``(x - mean) / sqrt(var + 1e-6)`` over each patch's p * p * C values with the
    unbiased variance (ddof 1, torch ``.var``'s default; ``jnp.var``'s is ddof 0).

    Args:
      images: (B, H, W, C); p: patch side; norm_pix: standardize (MAE's norm_pix_loss).

    Returns:
      (B, N, p * p * C) float32.
    """
    t = patchify(images.astype(jnp.float32), p)
    if not norm_pix:
        return t
    mean = jnp.mean(t, axis=-1, keepdims=True)
    var = jnp.var(t, axis=-1, keepdims=True, ddof=1)
    return (t - mean) / jnp.sqrt(var + 1e-6)


def mae_loss(pred: Array, target: Array, mask: Array) -> Array:
    """MSE per patch, averaged over the removed patches only (``sum(l m) / sum(m)``).

    Args:
      pred, target: (B, N, E); mask: (B, N), 1 = removed.

    Returns:
      Scalar float32.
    """
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(f"mae_loss: pred {pred.shape}, target {target.shape}, mask "
                         f"{mask.shape}; expected (B, N, E), (B, N, E), (B, N)")
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


def image_noise(key: Array, index: Array, n: int) -> Array:
    """Per-image masking noise: image ``index[i]`` draws from ``fold_in(key, index[i])``.

    Args:
      key: step key; index: (B,) int global image indices; n: patches per image.

    Returns:
      (B, n) noise for `jaxadapt.models.mae.random_masking`.
    """
    return jax.vmap(lambda i: mask_noise(jax.random.fold_in(key, i), 1, n)[0])(index)


# ----------------------------------------------------------------------------- optimizer


def mae_lr_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0,
                    min_lr: float = 0.0) -> Callable[[Array], Array]:
    """MAE's ``adjust_learning_rate`` per iteration: linear warm-up, then half-cycle cosine.

    Args:
      base_lr: peak lr (MAE: blr * batch / 256); total_steps, warmup_steps: iterations;
      min_lr: the cosine's floor.

    Returns:
      ``lr(step)``, usable as an optax schedule.
    """
    if not 0 <= warmup_steps <= total_steps or total_steps < 1:
        raise ValueError(f"mae_lr_schedule: warmup_steps={warmup_steps}, total_steps="
                         f"{total_steps}; need 0 <= warmup_steps <= total_steps, total >= 1")

    def lr(step: Array) -> Array:
        s = jnp.asarray(step, jnp.float32)
        warm = base_lr * s / max(warmup_steps, 1)
        frac = (s - warmup_steps) / max(total_steps - warmup_steps, 1)
        cos = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(s < warmup_steps, warm, cos)

    return lr


def make_mae_optimizer(batch_size: int, *, blr: float = 1.5e-4,
                       weight_decay: float = 0.05,
                       schedule: Callable[[float], Callable] | None = None
                       ) -> optax.GradientTransformation:
    """MAE's AdamW: lr = blr * batch / 256, betas (0.9, 0.95), decay not on biases / 1-D.

    Args:
      batch_size: the global batch (all devices).
      blr: base lr (MAE: 1.5e-4).
      weight_decay: MAE: 0.05 (torch AdamW's decoupled ``p -= lr * wd * p``).
      schedule: ``schedule(peak_lr) -> lr(step)`` (e.g. ``lambda lr: mae_lr_schedule(lr,
        total, warmup)``); None: constant lr.

    Returns:
      The optax transformation (its ``update`` needs params; under strict dtype
      promotion call it inside ``jax.numpy_dtype_promotion("standard")``, as
      `make_mae_step` does: optax's bias correction mixes float and int32).
    """
    if batch_size < 1:
        raise ValueError(f"make_mae_optimizer: batch_size={batch_size}; use >= 1")
    peak = blr * batch_size / 256.0
    lr = schedule(peak) if schedule is not None else peak
    return optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay,
                       mask=decay_mask)


# ----------------------------------------------------------------------------- the step


class MAEState(flax.struct.PyTreeNode):
    """MAE pre-training state. Attributes: step (int32), params, opt_state."""

    step: jax.Array
    params: Any
    opt_state: Any


def _split(params: Any, freeze: tuple[str, ...]) -> tuple[dict, dict]:
    unknown = sorted(set(freeze) - set(params))
    if unknown:
        raise ValueError(f"freeze={freeze!r} names {unknown}, not parts of the MAE params; "
                         f"use some of {sorted(params)} (e.g. ('decoder',))")
    return ({k: v for k, v in params.items() if k not in freeze},
            {k: v for k, v in params.items() if k in freeze})


def create_mae_state(params: Any, optimizer: optax.GradientTransformation,
                     freeze: tuple[str, ...] = ()) -> MAEState:
    """The step-0 state.

    Args:
      params: {"encoder", "mask_token", "decoder"} (e.g. `init_mae_params`).
      optimizer: e.g. `make_mae_optimizer`.
      freeze: top-level parts left unchanged (their optimizer state is not made), e.g.
        ("decoder",) to adapt the encoder on unlabelled target data as TTT-MAE does;
        pass the same to `make_mae_step`.

    Returns:
      `MAEState`.
    """
    train, _ = _split(params, tuple(freeze))
    return MAEState(jnp.zeros((), jnp.int32), params, optimizer.init(train))


def make_mae_step(model: MAE, optimizer: optax.GradientTransformation,
                  mesh: Mesh | None = None, *, axis_name: str = "data",
                  mask_ratio: float = 0.75, norm_pix: bool = True,
                  freeze: tuple[str, ...] = ()) -> Callable:
    """Build the jitted MAE pre-training step ``(state, images, key) -> (state, metrics)``.

    With a mesh the step runs per device under ``jax.shard_map`` over ``axis_name``
    (images split along axis 0, state replicated), the gradients and the loss averaged
    with ``pmean``; the parameters are first cast device-varying, else shard_map returns
    the gradient of replicated parameters already summed and the pmean would leave it
    multiplied by the device count (the trap of `jaxadapt.methods.coda.dino`). Every device
    removes the same number of patches per image, so the pmean of the per-device losses
    is the global loss. Image ``i`` of the global batch is masked with
    ``fold_in(fold_in(key, step), i)``: the result equals the single-device one.

    Args:
      model: the `MAE`; optimizer: e.g. `make_mae_optimizer`.
      mesh: a mesh with ``axis_name`` (`jaxadapt.train.parallel.make_data_mesh`); None:
        one device, plain jit.
      axis_name: the data axis.
      mask_ratio: fraction of patches removed (MAE: 0.75).
      norm_pix: per-patch standardized targets (MAE's norm_pix_loss).
      freeze: top-level parts of the params that stay fixed (as in `create_mae_state`).

    Returns:
      The step; metrics {"loss", "grad_norm"} (the norm of the trained parts' gradient).
    """
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"make_mae_step: mask_ratio={mask_ratio!r} is outside (0, 1); "
                         f"use e.g. 0.75")
    p = model.patch_size
    n = (model.img_size // p) ** 2

    def local_step(state: MAEState, images: Array, key: Array):
        b = images.shape[0]
        first = 0 if mesh is None else jax.lax.axis_index(axis_name) * b
        noise = image_noise(jax.random.fold_in(key, state.step), first + jnp.arange(b), n)
        target = mae_targets(images, p, norm_pix)
        train, fixed = _split(state.params, tuple(freeze))
        params = train
        if mesh is not None:
            params = jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), params)

        def loss_fn(prm):
            pred, mask = model.apply({"params": {**fixed, **prm}}, images, noise, mask_ratio)
            return mae_loss(pred, target, mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        if mesh is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
            updates, opt_state = optimizer.update(grads, state.opt_state, train)
        new_params = {**fixed, **optax.apply_updates(train, updates)}
        new = MAEState(state.step + 1, new_params, opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    if mesh is None:
        return jax.jit(local_step)
    rep = PartitionSpec()
    mapped = jax.shard_map(local_step, mesh=mesh, in_specs=(rep, PartitionSpec(axis_name), rep),
                           out_specs=(rep, rep))
    jitted = jax.jit(mapped)
    n_dev = mesh.shape[axis_name]

    def step(state: MAEState, images: Array, key: Array):
        if images.shape[0] % n_dev:
            raise ValueError(f"make_mae_step: batch size {images.shape[0]} does not divide "
                             f"over the {n_dev} devices of axis {axis_name!r}; use a "
                             f"multiple of {n_dev}")
        return jitted(state, images, key)

    return step
