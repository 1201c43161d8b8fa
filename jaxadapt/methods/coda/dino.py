"""DINO (Caron et al. 2021) as pure functions over an explicit `DinoState`.

The PyTorch reference (facebookresearch/dino) hides the centre inside the loss module
and updates it as a side effect of ``forward``; here the centre, the teacher and the
optimizer state are fields of `DinoState`, and one step is a pure function
``(state, batch) -> (state, metrics)``. Order of one step, as the reference's
``train_one_epoch``: loss (old centre) -> gradients -> clip -> optimizer (last layer
frozen early, see `dino_optim.dino_adamw`) -> teacher EMA towards the *updated* student
-> centre update from the raw teacher outputs.

Data parallelism: with ``axis_name`` set the step is meant to run per device inside
``jax.shard_map`` (`parallel_dino_step`) or ``jax.pmap``; the loss, the gradients, the
monitor and the centre's batch mean are averaged over the axis with ``lax.pmean``.
The student parameters are cast to device-varying before differentiation: under
``shard_map``'s replication checking the gradient of replicated parameters would
otherwise come back already *summed* over devices, and a ``pmean`` on top leaves it
multiplied by the device count (tests/methods/coda/test_dino.py shows both).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxadapt.methods.coda.dino_optim import DinoSchedules, at_step, clip_per_parameter


_HI = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in the loss contractions on GPU


class DinoState(flax.struct.PyTreeNode):
    """Everything a DINO step reads and returns.

    Attributes:
      step: int32 scalar, iterations done (indexes the schedules).
      params: student parameters.
      teacher: teacher parameters (EMA of the student; no gradient).
      centre: (1, K) float32 centre of the teacher outputs.
      opt_state: optimizer state of the student.
      key: root PRNG key; step ``t`` uses ``fold_in(key, t)`` (resumption-safe).
    """

    step: jax.Array
    params: Any
    teacher: Any
    centre: jax.Array
    opt_state: Any
    key: jax.Array


def create_dino_state(params: Any, optimizer: optax.GradientTransformation,
                      key: jax.Array, out_dim: int) -> DinoState:
    """Initial state: teacher = copy of the student, centre zeros, step 0.

    Args:
      params: initialized student parameters.
      optimizer: e.g. `dino_optim.make_dino_optimizer`.
      key: root PRNG key.
      out_dim: K, the head's output dimension.

    Returns:
      `DinoState`.
    """
    return DinoState(step=jnp.zeros((), jnp.int32), params=params,
                     teacher=jax.tree.map(jnp.array, params),
                     centre=jnp.zeros((1, out_dim), jnp.float32),
                     opt_state=optimizer.init(params), key=key)


def _views(student_out, teacher_out, n_global):
    if teacher_out.shape[0] % n_global:
        raise ValueError(f"dino_loss: teacher_out has {teacher_out.shape[0]} rows, not a "
                         f"multiple of n_global={n_global}; pass the n_global crops stacked "
                         "crop-major")
    b = teacher_out.shape[0] // n_global
    if student_out.shape[0] % b or student_out.shape[0] // b < n_global:
        raise ValueError(f"dino_loss: student_out has {student_out.shape[0]} rows; expected "
                         f"a multiple (>= {n_global}) of the batch {b} (crop-major chunks)")
    return b, student_out.shape[0] // b


def _pair_terms(student_out, teacher_out, centre, student_temp, teacher_temp, n_global):
    """(cross-entropy per (teacher view, student view), teacher entropy per view, mask)."""
    b, n_crops = _views(student_out, teacher_out, n_global)
    k = teacher_out.shape[-1]
    # Temperatures may be float32 schedule entries: cast so float64 inputs stay float64.
    student_temp = jnp.asarray(student_temp).astype(student_out.dtype)
    teacher_temp = jnp.asarray(teacher_temp).astype(teacher_out.dtype)
    log_s = jax.nn.log_softmax(student_out / student_temp, axis=-1).reshape(n_crops, b, k)
    t_logits = jax.lax.stop_gradient((teacher_out - centre) / teacher_temp)
    log_t = jax.nn.log_softmax(t_logits, axis=-1).reshape(n_global, b, k)
    p_t = jnp.exp(log_t)
    ce = -jnp.einsum("ibk,vbk->iv", p_t, log_s, precision=_HI) / b
    ent = -jnp.einsum("ibk,ibk->i", p_t, log_t, precision=_HI) / b
    mask = jnp.arange(n_global)[:, None] != jnp.arange(n_crops)[None, :]
    return ce, ent, mask


def dino_loss(student_out: jax.Array, teacher_out: jax.Array, centre: jax.Array, *,
              student_temp: float | jax.Array, teacher_temp: float | jax.Array,
              n_global: int = 2) -> jax.Array:
    """DINO's loss: mean over (teacher view i, student view v != i) of the cross-entropy.

    Args:
      student_out: (n_crops * B, K) student head outputs, crop-major (globals first).
      teacher_out: (n_global * B, K) teacher head outputs of the global crops.
      centre: (1, K) centre subtracted from the teacher outputs.
      student_temp: student temperature (0.1).
      teacher_temp: teacher temperature (scheduled 0.04 -> 0.07).
      n_global: number of global crops.

    Returns:
      Scalar loss; no gradient flows into ``teacher_out`` or ``centre``.
    """
    ce, _, mask = _pair_terms(student_out, teacher_out, centre, student_temp, teacher_temp,
                              n_global)
    return jnp.sum(jnp.where(mask, ce, 0)) / jnp.sum(mask).astype(ce.dtype)


def update_centre(centre: jax.Array, teacher_out: jax.Array, momentum: float = 0.9,
                  axis_name: str | None = None) -> jax.Array:
    """``c <- m c + (1 - m) mean(teacher_out)``, the mean over all rows and devices.

    Args:
      centre: (1, K).
      teacher_out: (n_global * B, K) raw teacher outputs (not centred).
      momentum: centre momentum (0.9).
      axis_name: mapped axis to average the batch mean over (equal per-device batches).

    Returns:
      The new (1, K) centre (no gradient).
    """
    batch = jnp.mean(jax.lax.stop_gradient(teacher_out), axis=0, keepdims=True)
    if axis_name is not None:
        batch = jax.lax.pmean(batch, axis_name)
    return centre * momentum + batch * (1 - momentum)


def ema_update(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """Teacher EMA: ``t <- m t + (1 - m) s`` per leaf (m cast to the leaf's dtype).

    Args:
      teacher: teacher parameters.
      student: student parameters (after this step's update).
      momentum: EMA momentum (scheduled 0.996 -> 1).

    Returns:
      New teacher parameters.
    """
    def one(t, s):
        m = jnp.asarray(momentum).astype(t.dtype)
        return t * m + (1 - m) * jax.lax.stop_gradient(s)

    return jax.tree.map(one, teacher, student)


def monitor(student_out: jax.Array, teacher_out: jax.Array, centre: jax.Array,
            temps: tuple[float | jax.Array, float | jax.Array], *,
            n_global: int = 2) -> dict[str, jax.Array]:
    """Collapse diagnostics of one step (Caron et al., section 5.3).

    Args:
      student_out, teacher_out, centre, n_global: as for `dino_loss`.
      temps: (student_temp, teacher_temp).

    Returns:
      {"teacher_entropy": mean entropy (nats) of softmax((t - c) / T_t) over the teacher
      rows, "centre_norm": ||c||_2, "kl": mean over the loss's pairs of
      KL(teacher || student)}. Collapse: entropy -> 0 (one dimension dominates) or
      -> log K (uniform output), and KL -> 0 in both.
    """
    ce, ent, mask = _pair_terms(student_out, teacher_out, centre, temps[0], temps[1],
                                n_global)
    kl = jnp.sum(jnp.where(mask, ce - ent[:, None], 0)) / jnp.sum(mask).astype(ce.dtype)
    return {"teacher_entropy": jnp.mean(ent), "centre_norm": jnp.sqrt(jnp.sum(centre ** 2)),
            "kl": kl}


def collapse_warning(metrics: dict[str, Any], *, out_dim: int, low: float = 0.05,
                     high: float = 0.95) -> str | None:
    """A message when the teacher entropy says the run collapsed, else None.

    Args:
      metrics: with "teacher_entropy" (and optionally "kl", "centre_norm", "step").
      out_dim: K; the entropy lies in [0, log K].
      low, high: fractions of log K below / above which to warn.

    Returns:
      Human-readable warning with the numbers, or None.
    """
    h, log_k = float(metrics["teacher_entropy"]), math.log(out_dim)
    extra = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in ("kl", "centre_norm", "step")
                      if k in metrics)
    if h < low * log_k:
        kind = ("collapse to one dimension: the teacher puts all mass on one output "
                "(sharpening beats centring: e.g. raise the teacher temperature)")
    elif h > high * log_k:
        # A random ViT's teacher starts near log K too: say where the run stands, not
        # that it collapsed.
        step = f" at step {int(metrics['step'])}" if "step" in metrics else ""
        kind = (f"the teacher has not left the uniform regime{step}: its output is still "
                "flat (centring beats sharpening; if it stays there, lower the teacher "
                "temperature or raise freeze_last_layer)")
    else:
        return None
    return (f"DINO {kind}; teacher entropy {h:.4g} nats vs log K = {log_k:.4g} "
            f"(warn below {low * log_k:.4g} or above {high * log_k:.4g}); {extra}")


# ----------------------------------------------------------------------------- the step


def _crops(batch: dict[str, jax.Array], n_global: int) -> list[jax.Array]:
    """Image-major {"global": (B,G,...), "local": (B,n,...)} -> crop-major list."""
    g = batch["global"]
    if g.ndim != 5 or g.shape[1] != n_global:
        raise ValueError(f"dino step: batch['global'] has shape {g.shape}; expected "
                         f"(B, n_global={n_global}, G, G, C)")
    crops = [g[:, i] for i in range(n_global)]
    loc = batch.get("local")
    if loc is not None:
        if loc.ndim != 5 or loc.shape[0] != g.shape[0]:
            raise ValueError(f"dino step: batch['local'] has shape {loc.shape}; expected "
                             f"(B={g.shape[0]}, n_local, l, l, C)")
        crops += [loc[:, i] for i in range(loc.shape[1])]
    return crops


def _to_varying(tree: Any, axis_name: str) -> Any:
    """Mark replicated values device-varying so that their gradient stays per device."""
    return jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), tree)


def _student_inputs(state: DinoState, axis_name: str | None) -> tuple[jax.Array, Any]:
    """This step's student PRNG key (per device too) and the parameters to differentiate.

    With ``axis_name``, the parameters are cast device-varying (see the module docstring:
    otherwise their gradient comes back already summed over devices).
    """
    rng = jax.random.fold_in(state.key, state.step)
    params = state.params
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        params = _to_varying(params, axis_name)
    return rng, params


def _mean_over_devices(loss: jax.Array, grads: Any, mon: dict[str, jax.Array],
                       axis_name: str | None) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """Loss, gradients and the batch-dependent monitor entries averaged over ``axis_name``.

    No-op on one device (``axis_name=None``). The monitor's ``centre_norm`` reads only
    the replicated centre, so it is already the same on every device.
    """
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
        mon.update(jax.lax.pmean({k: mon[k] for k in ("teacher_entropy", "kl")}, axis_name))
    return loss, grads, mon


def _apply_step(state: DinoState, grads: Any, optimizer: optax.GradientTransformation,
                teacher_out: jax.Array, *, momentum: jax.Array, centre_momentum: float,
                axis_name: str | None) -> DinoState:
    """The state after one step, in the reference's order: optimizer update of the student,
    teacher EMA towards the *updated* student, centre from the raw teacher outputs."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    return state.replace(
        step=state.step + 1, params=new_params, opt_state=opt_state,
        teacher=ema_update(state.teacher, new_params, momentum),
        centre=update_centre(state.centre, teacher_out, centre_momentum, axis_name))


def make_dino_step(
    apply_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    schedules: DinoSchedules,
    *,
    n_global: int = 2,
    axis_name: str | None = None,
    student_temp: float = 0.1,
    centre_momentum: float = 0.9,
    clip_grad: float = 3.0,
    global_clip: bool = False,
    stochastic: bool = False,
) -> Callable[[DinoState, dict[str, jax.Array]], tuple[DinoState, dict[str, jax.Array]]]:
    """Build the DINO step ``(state, batch) -> (state, metrics)``.

    Args:
      apply_fn: ``apply_fn(params, crops) -> (len(crops) * B, K)`` crop-major (e.g.
        ``lambda p, c: DINOModel(...).apply({"params": p}, c)``); with ``stochastic``
        it is called ``apply_fn(params, crops, rng)`` for the student (drop path).
      optimizer: `dino_optim.make_dino_optimizer` (last-layer freeze and schedules
        inside; any optax transformation that takes ``params`` works).
      schedules: `dino_optim.DinoSchedules` (momentum and teacher_temp are read here).
      n_global: global crops per image (the teacher sees only these).
      axis_name: mapped axis for data parallelism (None: single device / plain jit).
      student_temp, centre_momentum: DINO constants (0.1, 0.9).
      clip_grad: clip threshold (DINO 3.0 per parameter; 0 disables).
      global_clip: clip by the global norm instead (CODA: 1.0).
      stochastic: pass a per-step (and per-device) PRNG key to the student's apply_fn.

    Returns:
      The step. ``batch`` = {"global": (B, n_global, G, G, C), "local": (B, n, l, l, C)}
      image-major ("local" optional). Metrics: loss, lr, wd, momentum, teacher_temp,
      grad_norm (before clipping), teacher_entropy, centre_norm, kl.
    """
    def step(state: DinoState, batch: dict[str, jax.Array]):
        crops = _crops(batch, n_global)
        it = state.step
        temp, mom = at_step(schedules.teacher_temp, it), at_step(schedules.momentum, it)
        teacher_out = jax.lax.stop_gradient(apply_fn(state.teacher, crops[:n_global]))
        rng, params = _student_inputs(state, axis_name)

        def loss_fn(p):
            out = apply_fn(p, crops, rng) if stochastic else apply_fn(p, crops)
            loss = dino_loss(out, teacher_out, state.centre, student_temp=student_temp,
                             teacher_temp=temp, n_global=n_global)
            return loss, out

        (loss, student_out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        mon = monitor(student_out, teacher_out, state.centre, (student_temp, temp),
                      n_global=n_global)
        loss, grads, mon = _mean_over_devices(loss, grads, mon, axis_name)
        grad_norm = optax.tree.norm(grads)
        grads = clip_per_parameter(grads, clip_grad, global_norm=global_clip)
        new_state = _apply_step(state, grads, optimizer, teacher_out, momentum=mom,
                                centre_momentum=centre_momentum, axis_name=axis_name)
        metrics = {"loss": loss, "lr": at_step(schedules.lr, it),
                   "wd": at_step(schedules.wd, it), "momentum": mom, "teacher_temp": temp,
                   "grad_norm": grad_norm, **mon}
        return new_state, metrics

    step.axis_name = axis_name
    return step


def parallel_dino_step(step_fn: Callable, mesh: Mesh, *, axis_name: str = "data",
                       donate_state: bool = False) -> Callable:
    """Run a step built with ``axis_name`` per device with ``jax.shard_map``, jitted.

    Args:
      step_fn: from `make_dino_step(..., axis_name=axis_name)`.
      mesh: a mesh with that axis (e.g. `jaxadapt.train.parallel.make_data_mesh()`).
      axis_name: the data axis name ("data").
      donate_state: donate the input state's buffers.

    Returns:
      ``(state, batch) -> (state, metrics)``: state replicated, every batch leaf split
      along axis 0, metrics replicated. On several hosts pass the batch as global arrays
      (`jaxadapt.train.parallel.shard_batch` of each host's slice) and the state from
      `jaxadapt.train.parallel.replicate`.

    Raises:
      ValueError: the step was built for another axis, the mesh lacks the axis, or the
        batch does not divide over the devices.
    """
    if getattr(step_fn, "axis_name", axis_name) != axis_name:
        raise ValueError(f"parallel_dino_step: step_fn was built with axis_name="
                         f"{step_fn.axis_name!r}; build it with axis_name={axis_name!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"parallel_dino_step: mesh axes {mesh.axis_names} lack "
                         f"{axis_name!r}; use jaxadapt.train.parallel.make_data_mesh()")
    n_dev = mesh.shape[axis_name]
    mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(
        axis_name)), out_specs=(PartitionSpec(), PartitionSpec()))
    jitted = jax.jit(mapped, donate_argnums=(0,) if donate_state else ())

    def run(state: DinoState, batch: dict[str, Any]):
        for name, x in batch.items():
            if x.shape[0] % n_dev:
                raise ValueError(f"parallel_dino_step: batch size {x.shape[0]} of "
                                 f"batch[{name!r}] does not divide over the {n_dev} "
                                 f"devices of axis {axis_name!r}; use a multiple of {n_dev}")
        return jitted(state, batch)

    return run
