"""TTT-MAE (Gandelsman et al. 2022): episodic test-time training of the MAE encoder.

Written for jaxadapt after yossigandelsman/test_time_training_mae (`engine_test_time.py`
``train_on_test``, ``main_test_time_training.py``). What the reference does, per test
image, independently:

1. reset: a fresh copy of the trained model and a fresh ``SGD(lr, momentum=0.9)``;
2. ``steps_per_example`` (paper: 20) steps, each on a batch of ``batch_size`` (README:
   128) copies of that image with a fresh random 75 % patch mask per copy; loss = MAE's
   reconstruction loss (norm-pix targets, removed patches only); with
   ``finetune_mode="encoder"`` (default) every parameter whose name does not start with
   "decoder" is trained: the encoder *and the mask token*, decoder frozen (the task head
   receives no gradient from this loss);
3. classify the (unmasked) image with the adapted encoder and the frozen task head.
lr = blr * batch / 256 (README: blr 1e-2, batch 128 -> 5e-3).

Differences, on purpose: the reference's copies are random-resized crops + flips unless
``--single_crop``; here they are identical copies unless an ``augment`` function is given.
The reference adapts one image at a time; here many images adapt at once (``vmap`` over
images, each with its own key, sharded over the devices of a mesh). Image ``i`` draws its
masks from ``fold_in(fold_in(key, ids[i]), step)``, so its result does not depend on the
other images of the call, on their order or on the device count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxadapt.methods.coda.mae import mae_loss, mae_targets
from jaxadapt.models.mae import MAE, mask_noise


__all__ = ["classify_with_head", "make_ttt_adapt", "make_ttt_predict"]

Array = jax.Array
#: classify(adapted encoder params, images, the params given to predict) -> logits; the
#: third argument lets a frozen task head travel with the MAE's params (e.g. under "task").
Classify = Callable[[Any, Array, Any], Array]
#: The MAE's own parts; other entries of the params (a task head) never enter the MAE.
_MAE_PARTS = ("encoder", "mask_token", "decoder")


def classify_with_head(model: MAE, head: Callable[[dict[str, Array]], Array]) -> Classify:
    """A ``classify(encoder_params, images, params) -> logits`` from a head on ViT tokens.

    Args:
      model: the `MAE` (its encoder makes the tokens, unmasked).
      head: ``head({"cls": (B, D), "patches": (B, N, D)}) -> (B, K)`` logits, the frozen
        task model (e.g. the dual model's task part with its params closed over).

    Returns:
      The classify function for `make_ttt_predict`.
    """
    encoder = model.encoder_def()
    return lambda enc, images, params=None: head(encoder.apply({"params": enc}, images))


def _check_settings(steps: int, lr: float, momentum: float, copies: int,
                    mask_ratio: float) -> None:
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"TTT-MAE steps={steps!r}: use an integer >= 1 (the paper: 20)")
    if not (isinstance(copies, (int, np.integer)) and copies >= 1):
        raise ValueError(f"TTT-MAE copies={copies!r}: use an integer >= 1 (the reference: "
                         f"128 copies of the image per step)")
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"TTT-MAE mask_ratio={mask_ratio!r} is outside (0, 1); use a "
                         f"fraction of patches to remove such as 0.75")
    if not float(lr) >= 0.0:
        raise ValueError(f"TTT-MAE lr={lr!r}: use a learning rate >= 0 (reference: 5e-3)")
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"TTT-MAE momentum={momentum!r}: use a value in [0, 1) "
                         f"(reference: 0.9)")


def make_ttt_adapt(model: MAE, *, steps: int = 20, lr: float = 5e-3, momentum: float = 0.9,
                   copies: int = 128, mask_ratio: float = 0.75, norm_pix: bool = True,
                   train_mask_token: bool = True,
                   augment: Callable[[Array, Array], Array] | None = None) -> Callable:
    """Test-time training on ONE image: ``adapt(params, image, key) -> (encoder, losses)``.

    Args:
      model: the trained `MAE`.
      steps, lr, momentum: SGD steps (``optax.sgd(lr, momentum)``, as torch's SGD).
      copies: copies of the image per step, each with its own mask.
      mask_ratio: fraction of patches removed.
      norm_pix: per-patch standardized targets.
      train_mask_token: also adapt the mask token (the reference's "encoder" mode);
        False adapts the encoder alone.
      augment: optional ``augment(key, copies (B, H, W, C)) -> (B, H, W, C)``.

    Returns:
      ``adapt``: params {"encoder", "mask_token", "decoder"}, image (H, W, C), key ->
      (adapted encoder params, (steps,) losses, each before its update). Pure, unjitted.
    """
    _check_settings(steps, lr, momentum, copies, mask_ratio)
    p = model.patch_size
    n = (model.img_size // p) ** 2
    opt = optax.sgd(lr, momentum=momentum if momentum > 0 else None)
    names = ("encoder", "mask_token") if train_mask_token else ("encoder",)

    def adapt(params: Any, image: Array, key: Array):
        train = {k: params[k] for k in names}
        frozen = {k: v for k, v in params.items() if k not in names and k in _MAE_PARTS}
        batch = jnp.broadcast_to(image, (copies, *image.shape))

        def loss_fn(tr, t_key):
            x = batch if augment is None else augment(jax.random.fold_in(t_key, 1), batch)
            noise = mask_noise(jax.random.fold_in(t_key, 0), copies, n)
            pred, mask = model.apply({"params": {**frozen, **tr}}, x, noise, mask_ratio)
            return mae_loss(pred, mae_targets(x, p, norm_pix), mask)

        def body(carry, t):
            tr, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(tr, jax.random.fold_in(key, t))
            updates, opt_state = opt.update(grads, opt_state, tr)
            return (optax.apply_updates(tr, updates), opt_state), loss

        (train, _), losses = jax.lax.scan(body, (train, opt.init(train)), jnp.arange(steps))
        return train["encoder"], losses

    return adapt


def _check_images(model: MAE, images: Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"TTT-MAE images have shape {images.shape}; expected (N, H, W, C)")
    _, h, w, c = images.shape
    p = model.patch_size
    if h % p or w % p:
        bad = h if h % p else w
        raise ValueError(f"TTT-MAE image size {h}x{w} is not divisible by patch_size={p}; "
                         f"crop or resize to a multiple of {p} (e.g. {bad // p * p or p}) "
                         f"or use an MAE whose patch size divides {bad}")
    if (h, w) != (model.img_size, model.img_size) or c != model.in_channels:
        raise ValueError(f"TTT-MAE images are {h}x{w}x{c} but the MAE was built for "
                         f"{model.img_size}x{model.img_size}x{model.in_channels}; crop to "
                         f"the MAE's img_size or build the MAE for these images")


def _run_chunks(run: Callable, params: Any, images: Array, keys: Array, chunk: int,
                n_dev: int) -> tuple[Array, Array]:
    """``run`` over consecutive chunks, each padded (copies of its first image) to a
    multiple of the device count; the padding's outputs are dropped."""
    outs = []
    for s in range(0, images.shape[0], chunk):
        x, k = images[s:s + chunk], keys[s:s + chunk]
        m = x.shape[0]
        pad = -m % n_dev
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
            k = jnp.concatenate([k, jnp.broadcast_to(k[:1], (pad, *k.shape[1:]))])
        logits, losses = run(params, x, k)
        outs.append((logits[:m], losses[:m]))
    return (jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs]))


def make_ttt_predict(model: MAE, classify: Classify, *, steps: int = 20, lr: float = 5e-3,
                     momentum: float = 0.9, copies: int = 128, mask_ratio: float = 0.75,
                     norm_pix: bool = True, train_mask_token: bool = True,
                     augment: Callable[[Array, Array], Array] | None = None,
                     mesh: Mesh | None = None, axis_name: str = "data",
                     chunk_size: int | None = None) -> Callable:
    """TTT-MAE prediction: ``predict(params, images, key, ids=None) -> logits``.

    Every image is adapted on its own from ``params`` (reset per image, see
    `make_ttt_adapt`), then classified by ``classify(adapted_encoder, image[None], params)``. The
    images of a call adapt at once: ``vmap`` over images, and with a ``mesh`` the image
    axis is split over its ``axis_name`` devices with ``jax.shard_map`` (no communication:
    the parameters are cast device-varying, so no gradient is summed across devices).
    A count that does not divide over the devices is padded (copies of image 0) and the
    padding dropped from the result. Images are independent, so on several hosts each
    process adapts its own images with a mesh of its local devices
    (``make_data_mesh(jax.local_devices())``); ``images`` here are process-local arrays.

    Args:
      model: the trained `MAE`; params of ``predict`` are its full params.
      classify: ``classify(encoder_params, images (B, H, W, C), params) -> (B, K)``
        logits, the frozen task model (e.g. `classify_with_head`); ``params`` are those
        given to ``predict``, so a task head may travel in them (entries other than the
        MAE's parts never enter the MAE).
      steps, lr, momentum, copies, mask_ratio, norm_pix, train_mask_token, augment: as
        `make_ttt_adapt` (defaults: the reference's).
      mesh: a device mesh with ``axis_name`` (`jaxadapt.train.parallel.make_data_mesh`);
        None: one device.
      chunk_size: images per jitted call (bounds memory: each image holds ``copies``
        activations; every chunk has the same padded shape, so one compile); None: all
        at once (one compile per distinct padded count). Rounded up to a multiple of the
        device count.

    Returns:
      ``predict(params, images (N, H, W, C), key, ids=None) -> (N, K)`` logits; ``ids``
      (N,) ints name the images for their keys (default ``arange(N)``).
      ``predict.with_losses`` returns (logits, (N, steps) TTT losses).
    """
    if chunk_size is not None and not (isinstance(chunk_size, (int, np.integer))
                                       and chunk_size >= 1):
        raise ValueError(f"TTT-MAE chunk_size={chunk_size!r}: use None or an integer >= 1")
    adapt = make_ttt_adapt(model, steps=steps, lr=lr, momentum=momentum, copies=copies,
                           mask_ratio=mask_ratio, norm_pix=norm_pix,
                           train_mask_token=train_mask_token, augment=augment)

    def one(params, image, key):
        enc, losses = adapt(params, image, key)
        return classify(enc, image[None], params)[0], losses

    def many(params, images, keys):
        if mesh is not None:
            params = jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), params)
        return jax.vmap(one, in_axes=(None, 0, 0))(params, images, keys)

    n_dev = 1 if mesh is None else mesh.shape[axis_name]
    chunk = None if chunk_size is None else -(-chunk_size // n_dev) * n_dev
    if mesh is None:
        run = jax.jit(many)
    else:
        data, rep = PartitionSpec(axis_name), PartitionSpec()
        run = jax.jit(jax.shard_map(many, mesh=mesh, in_specs=(rep, data, data),
                                    out_specs=(data, data)))

    def with_losses(params: Any, images: Array, key: Array, ids: Array | None = None):
        _check_images(model, images)
        total = images.shape[0]
        if total == 0:
            raise ValueError("TTT-MAE got 0 images; pass (N, H, W, C) with N >= 1")
        ids = jnp.arange(total) if ids is None else jnp.asarray(ids)
        if ids.shape != (total,):
            raise ValueError(f"TTT-MAE ids have shape {ids.shape}; expected ({total},), "
                             f"one id per image")
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        return _run_chunks(run, params, images, keys, chunk or total, n_dev)

    def predict(params: Any, images: Array, key: Array, ids: Array | None = None) -> Array:
        return with_losses(params, images, key, ids)[0]

    predict.with_losses = with_losses
    return predict
