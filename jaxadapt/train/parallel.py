"""Data parallelism with a 1-D device mesh named "data" and jit shardings.

State is replicated; every batch leaf is split along axis 0 over the "data" axis. Under
``jit`` with these shardings a reduction over the batch axis (a BN mean, the loss) is
global: XLA inserts the all-reduces, so the step computes exactly the single-device
math (BN statistics over the whole global batch, never an average of per-device
variances) and the gradients are not multiplied by the device count.

Multi-host: `make_data_mesh` spans ``jax.devices()`` (all hosts), ordered by process.
Every process draws the same global index batches (samplers are seeded identically);
`process_batches` reads only this process's contiguous share of each
(`jaxadapt.data.sampling.process_share`: columns ``[p B / P, (p + 1) B / P)``) and
`shard_batch` assembles the global array from the shares with
``jax.make_array_from_process_local_data``, so the step sees exactly the global batch
a one-process run sees: only the reading and decoding of images is split. Every
process must call the step with the same state and the same share size. On one host
the share is the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxadapt.data import sampling as samplers


DATA_AXIS = "data"


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over the devices, axis name "data", grouped by process in process order.

    Args:
      devices: devices to use; default ``jax.devices()`` (all hosts).

    Returns:
      The mesh; process p's devices hold the p-th contiguous block of every batch, the
      block `process_batches` reads on p.
    """
    devs = list(jax.devices() if devices is None else devices)
    devs.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits axis 0 over "data". Args: mesh. Returns: the sharding."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that copies an array to every device. Args: mesh. Returns: the sharding."""
    return NamedSharding(mesh, PartitionSpec())


def local_device_count(mesh: Mesh) -> int:
    """Devices of the mesh that belong to this process. Args: mesh. Returns: the count."""
    pid = jax.process_index()
    return sum(1 for d in mesh.devices.flat if d.process_index == pid)


def _mesh_first_row(mesh: Mesh, width: int) -> int:
    """First row of a width-`width` batch that the mesh places on this process's devices."""
    spans = batch_sharding(mesh).addressable_devices_indices_map((width,)).values()
    return min(s[0].start or 0 for s in spans)


def process_batches(read: Callable[..., Iterator[dict]], index_batches, mesh: Mesh, *,
                    masks=None, group: int = 1, field: str = "batch size",
                    **read_kwargs) -> Iterator[dict]:
    """Reads only this process's share of every global index batch.

    Args:
      read: ``read(rows, [masks=...,] first_column=..., **read_kwargs)`` -> iterator of
        dict batches, e.g. ``DataView.train_batches`` / ``eval_batches``.
      index_batches: int [K, B] global row batches, identical on every process.
      mesh: from `make_data_mesh`; the share is split again over its local devices.
      masks: optional bool [K, B] global masks, sliced like the rows.
      group: columns that stay on one device (an episode's L + N rows).
      field: config key of the batch size, named in errors.
      **read_kwargs: passed to `read` (e.g. ``seed``).

    Returns:
      The iterator of this process's batches (B / P rows each) for `shard_batch`.

    Raises:
      ValueError: B (or B / group episodes) does not split over processes x local
        devices, naming both numbers; or the mesh does not place this process's share
        on its devices (a mesh not from `make_data_mesh`).
    """
    local, first = samplers.process_share(
        index_batches, jax.process_index(), jax.process_count(),
        local_devices=local_device_count(mesh), group=group, field=field)
    if jax.process_count() > 1 and _mesh_first_row(mesh, np.shape(index_batches)[1]) != first:
        raise ValueError("the mesh does not hold process blocks in process order; build it "
                         "with parallel.make_data_mesh")
    if masks is not None:
        read_kwargs["masks"] = np.asarray(masks)[:, first:first + local.shape[1]]
    return read(local, first_column=first, **read_kwargs)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a (process-local) batch on the mesh, split along axis 0.

    Args:
      batch: pytree of arrays with a common leading batch axis (NumPy or JAX).
      mesh: from `make_data_mesh`.

    Returns:
      The same tree of global ``jax.Array``s sharded over "data".

    Raises:
      ValueError: a leaf is a scalar, or its batch size does not divide by the local
        device count.
    """
    sharding = batch_sharding(mesh)
    n_local = local_device_count(mesh)

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        name = jax.tree_util.keystr(path) or "batch"
        if x.ndim == 0:
            raise ValueError(f"shard_batch: {name} is a scalar; every leaf needs a batch axis")
        if x.shape[0] % n_local:
            raise ValueError(
                f"shard_batch: batch size {x.shape[0]} of {name} is not divisible by the "
                f"{n_local} devices of this process; use a batch size that is a multiple "
                f"of {n_local} (pad with mask=0 rows) or fewer devices"
            )
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree (e.g. a TrainState) to every device of the mesh.

    Args:
      tree: pytree of arrays, identical on every process.
      mesh: from `make_data_mesh`.

    Returns:
      The tree as fully replicated global arrays.
    """
    return jax.device_put(tree, replicated_sharding(mesh))


def parallel_train_step(
    train_step: Callable, mesh: Mesh, *, donate_state: bool = False
) -> Callable:
    """Jit a ``(state, batch) -> (state, metrics)`` step for data parallelism.

    Args:
      train_step: e.g. from `jaxadapt.train.steps.make_train_step`.
      mesh: from `make_data_mesh`.
      donate_state: donate the input state's buffers (saves memory on accelerators;
        the passed-in state must not be used afterwards).

    Returns:
      The jitted step: state replicated in and out, batch sharded along axis 0, metrics
      replicated.
    """
    rep, data = replicated_sharding(mesh), batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, data),
        out_shardings=(rep, rep),
        donate_argnums=(0,) if donate_state else (),
    )


def parallel_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
    """Jit an ``(state, batch) -> outputs`` eval step: per-row outputs stay sharded.

    Args:
      eval_step: e.g. from `jaxadapt.train.steps.make_eval_step` (called without
        ``norm_stats``).
      mesh: from `make_data_mesh`.

    Returns:
      The jitted step; ``logits``/``features`` sharded over "data", sums replicated.
    """
    rep, data = replicated_sharding(mesh), batch_sharding(mesh)
    outs = {"logits": data, "features": data, "loss_sum": rep, "count": rep, "correct": rep}
    return jax.jit(eval_step, in_shardings=(rep, data), out_shardings=outs)
