"""Checkpoints of a training loop: a pytree of arrays plus JSON metadata, via orbax.

One checkpoint = one step directory `<ckpt_dir>/<step>/` holding two items:
`payload` (any pytree of arrays: train state, best parameters, ...; saved with
`ocp.args.StandardSave`) and `meta` (a JSON-able dict: epoch, counters, history).

Atomicity comes from orbax: a step is written under a temporary name
(`<step>.orbax-checkpoint-tmp-*`) and renamed once complete, so a save killed
half-way is never listed as a step. Such left-over temporary directories are
deleted when a `Checkpointer` is opened. A finalized step that still fails to
restore (files deleted or truncated by hand, a disk fault) is skipped by
`restore_latest`, which falls back to the newest readable step.

State classes may grow: a field of a flax struct that holds no arrays in the template
(e.g. `TrainState.extra` = {}) and is absent from an older checkpoint is taken from
the template, so checkpoints written before the field existed still restore.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
_PAYLOAD = "payload"
_META = "meta"
log = logging.getLogger(__name__)


def abstract_like(tree: PyTree) -> PyTree:
    """The restore template of a pytree: shapes, dtypes and shardings, no data.

    Args:
      tree: a pytree whose leaves are `jax.Array`s (any sharding: one device,
        replicated or sharded over a mesh), `jax.ShapeDtypeStruct`s, NumPy arrays
        or Python scalars.

    Returns:
      The same structure with every `jax.Array` replaced by a
      `jax.ShapeDtypeStruct` carrying its sharding, so that a restore places each
      array exactly as the template's array was placed. Other leaves are kept.
    """

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.generic):  # orbax restores 0-d arrays, not NumPy scalars
            return np.asarray(x)
        return x

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager`.

    Usable as a context manager; `close()` waits for pending asynchronous saves.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True
    ):
        """Opens (and creates) a checkpoint directory.

        Args:
          directory: folder of the step directories; created if absent.
          max_to_keep: number of most recent steps kept (>= 1). Two or more leave a
            fallback should the newest step turn out unreadable.
          async_save: write files in a background thread after the device-to-host
            copy, so training continues during the write.

        Raises:
          ValueError: if `directory` is an existing file or `max_to_keep` < 1.
        """
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(
                f"ckpt_dir={directory!r} is an existing file, not a directory; pass a "
                "directory path (it is created if missing) or remove the file."
            )
        if int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep={max_to_keep!r} must be >= 1; pass 1 or more.")
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep),
            create=True,
            cleanup_tmp_directories=True,  # drop the remains of killed saves
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            directory, options=options, item_names=(_PAYLOAD, _META)
        )

    def all_steps(self) -> list[int]:
        """Returns the finalized steps on disk, ascending (temporary dirs excluded)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Returns the newest finalized step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, payload: PyTree, meta: dict[str, Any]) -> None:
        """Saves a pytree and its JSON metadata as step `step`.

        Args:
          step: step number (e.g. epochs completed); must not exist yet.
          payload: pytree of arrays (jax, NumPy or scalars); flax struct nodes,
            optax states and NamedTuples are fine.
          meta: JSON-serializable dict (numbers, strings, lists, dicts, None).

        Returns:
          None. With `async_save` the write may still be running; `wait()` or
          `close()` blocks until it is on disk.
        """
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{_PAYLOAD: ocp.args.StandardSave(payload), _META: ocp.args.JsonSave(meta)}
            ),
        )

    def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """Restores one step into the structure, dtypes and shardings of `template`.

        Args:
          step: an existing step.
          template: a pytree like the saved payload; concrete arrays or
            `jax.ShapeDtypeStruct`s (see `abstract_like`). Arrays come back with the
            template's sharding (single device, replicated or sharded on a mesh).
            Struct fields without arrays that the step lacks (a field added since)
            come back as the template's value.

        Returns:
          (payload, meta).
        """
        abstract = abstract_like(template)
        saved = self._saved_tree(step)
        item = abstract if saved is None else _restore_item(abstract, saved)
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{
                    _PAYLOAD: ocp.args.StandardRestore(item),
                    _META: ocp.args.JsonRestore(),
                }
            ),
        )
        payload = out[_PAYLOAD] if item is abstract else _rebuild(abstract, out[_PAYLOAD])
        return payload, dict(out[_META])

    def _saved_tree(self, step: int) -> PyTree | None:
        """The payload's on-disk tree (struct nodes as dicts); None if unreadable."""
        path = epath.Path(self.directory) / str(int(step)) / _PAYLOAD
        try:
            meta = ocp.StandardCheckpointHandler().metadata(path)
        except Exception:  # noqa: BLE001 - the restore itself reports a damaged step
            return None
        return getattr(meta, "tree", meta)

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Returns only the JSON metadata of `step` (no arrays are read)."""
        out = self._manager.restore(
            int(step), args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(out[_META])

    def restore_latest(self, template: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
        """Restores the newest readable step, setting unreadable newer ones aside.

        Steps are tried newest first. When an older step restores after newer ones
        failed, the template evidently fits and the newer ones are damaged: they
        are renamed `<step>.unreadable-<time>` (kept for inspection, no longer
        listed). When no step restores (e.g. a template of another model), nothing
        is renamed.

        Args:
          template: see `restore`.

        Returns:
          (step, payload, meta), or None when the directory holds no step.

        Raises:
          ValueError: if steps exist but none can be restored into `template`
            (e.g. the directory belongs to a different model).
        """
        self.wait()
        failed, errors = [], []
        for step in reversed(self.all_steps()):
            try:
                payload, meta = self.restore(step, template)
            except Exception as e:  # noqa: BLE001 - orbax raises many types here
                failed.append(step)
                errors.append(f"step {step}: {type(e).__name__}: {e}"[:300])
                log.warning(
                    "checkpoint step %d in %s failed to restore (%s); trying an older one",
                    step,
                    self.directory,
                    e,
                )
                continue
            # An older step restored, so the template fits: the newer ones are damaged.
            for bad in failed:
                self._set_aside(bad)
            return step, payload, meta
        if errors:
            raise ValueError(
                f"ckpt_dir={self.directory!r}: no checkpoint step could be restored "
                f"into the given state ({'; '.join(errors)}); pass a fresh ckpt_dir "
                "or one written by the same model/optimizer."
            )
        return None

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable step so it is neither listed nor overwritten."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            if os.path.isdir(src):
                os.rename(src, f"{src}.unreadable-{time.time_ns()}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_struct(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type) and hasattr(x, "replace")


def _restore_item(template: PyTree, saved: Any) -> PyTree:
    """`template` with the array-free struct fields that `saved` lacks left out.

    Returns the template itself when nothing is missing (the plain restore path);
    otherwise the struct nodes on the way become dicts of their fields, the form
    orbax stores them in.
    """
    if _is_struct(template) and isinstance(saved, dict):
        fields = [f.name for f in dataclasses.fields(template)
                  if f.metadata.get("pytree_node", True)]
        values = {n: getattr(template, n) for n in fields}
        missing = [n for n in fields if n not in saved and not jax.tree.leaves(values[n])]
        inner = {n: _restore_item(v, saved[n]) if n in saved else v
                 for n, v in values.items() if n not in missing}
        if not missing and all(inner[n] is values[n] for n in inner):
            return template
        return inner
    if isinstance(template, dict) and isinstance(saved, dict):
        inner = {k: _restore_item(v, saved[k]) if k in saved else v for k, v in template.items()}
        return template if all(inner[k] is template[k] for k in inner) else inner
    return template


def _rebuild(template: PyTree, restored: PyTree) -> PyTree:
    """The restored values in the template's types; fields not restored from the template."""
    if _is_struct(template) and isinstance(restored, dict):
        return template.replace(
            **{n: _rebuild(getattr(template, n), v) for n, v in restored.items()})
    if isinstance(template, dict) and isinstance(restored, dict):
        return {k: _rebuild(v, restored[k]) if k in restored else v for k, v in template.items()}
    return restored


def tree_equal(a: PyTree, b: PyTree) -> bool:
    """Returns True if two pytrees have the same structure and equal leaves.

    Args:
      a, b: pytrees of arrays or scalars.

    Returns:
      Whether structure and every leaf (exactly, `np.array_equal`) match.
    """
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
