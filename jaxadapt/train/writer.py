"""Scalar metrics to TensorBoard event files and to a JSONL file.

`metrics.jsonl` holds one JSON object per scalar:
`{"step": int, "name": str, "value": float, "time": unix seconds}`. It is
appended to, so a resumed run continues the same file (steps of an epoch that
was interrupted and re-run appear twice; readers keep the last occurrence).
Non-finite values are written as JSON `NaN` / `Infinity` (Python's `json`
reads them back).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"


def _to_float(name: str, value: Any) -> float:
    """Converts a scalar (Python, NumPy or 0-d/size-1 jax array) to float."""
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        raise ValueError(
            f"scalar {name!r} has shape {arr.shape}; write_scalars takes scalars "
            "only, reduce it first (e.g. .mean())."
        )
    return float(arr.reshape(()))


class MetricWriter:
    """Writes scalars to TensorBoard (tensorboardX) and `<logdir>/metrics.jsonl`.

    Only process 0 writes by default, so multi-host runs produce one record.
    Use as a context manager or call `close()`.
    """

    def __init__(
        self, logdir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool | None = None
    ):
        """Opens the writers.

        Args:
          logdir: output folder; created if absent.
          tensorboard: also write TensorBoard event files (tensorboardX).
          enabled: write at all; default: only when `jax.process_index() == 0`.

        Raises:
          ValueError: if `logdir` is an existing file.
        """
        self.logdir = os.path.abspath(os.fspath(logdir))
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        if os.path.exists(self.logdir) and not os.path.isdir(self.logdir):
            raise ValueError(
                f"logdir={self.logdir!r} is an existing file; pass a "
                "directory path (it is created if missing)."
            )
        os.makedirs(self.logdir, exist_ok=True)
        self._jsonl = open(os.path.join(self.logdir, JSONL_NAME), "a", encoding="utf-8")
        # The event file is created at the first write: loading a finished run (which
        # opens a writer but trains nothing) must not leave an empty event file behind.
        self._tensorboard = tensorboard

    def _tensorboard_writer(self):
        if self._tb is None and self._tensorboard:
            from tensorboardX import SummaryWriter  # deferred: optional at import time

            self._tb = SummaryWriter(logdir=self.logdir)
        return self._tb

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes a dict of scalars at one step.

        Args:
          step: x-axis value (global step, or epoch for `epoch/*` tags).
          scalars: name -> scalar (Python number, NumPy or jax scalar).

        Returns:
          None.
        """
        if not self.enabled:
            return
        now = time.time()
        tb = self._tensorboard_writer()
        for name, value in scalars.items():
            v = _to_float(name, value)
            self._jsonl.write(
                json.dumps({"step": int(step), "name": str(name), "value": v, "time": now}) + "\n"
            )
            if tb is not None:
                tb.add_scalar(str(name), v, global_step=int(step), walltime=now)

    def flush(self) -> None:
        """Pushes buffered records to disk."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files; later writes are ignored."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads `<logdir>/metrics.jsonl` back.

    Args:
      logdir: the writer's folder.

    Returns:
      The records in file order.
    """
    with open(os.path.join(os.fspath(logdir), JSONL_NAME), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
