"""Tests of jaxadapt.train.writer: JSONL and TensorBoard event files read back."""

import glob
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxadapt.train.writer import MetricWriter, read_jsonl


def _read_events(path: str) -> list:
    """Parses a TFRecord file (u64 length, u32 crc, data, u32 crc) of Events."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        assert len(payload) == length, "truncated record"
        events.append(event_pb2.Event.FromString(payload))
        pos += 12 + length + 4
    return events


def test_jsonl_and_event_file_round_trip(tmp_path):
    with MetricWriter(tmp_path / "logs") as w:
        w.write_scalars(1, {"train/loss": 2.5, "train/acc": jnp.float32(0.25)})
        w.write_scalars(2, {"train/loss": np.float64(1.5), "val/loss": float("nan")})
    recs = read_jsonl(tmp_path / "logs")
    got = [(r["step"], r["name"], r["value"]) for r in recs]
    assert got[:3] == [(1, "train/loss", 2.5), (1, "train/acc", 0.25), (2, "train/loss", 1.5)]
    assert got[3][:2] == (2, "val/loss") and math.isnan(got[3][2])
    assert all(isinstance(r["time"], float) for r in recs)

    files = glob.glob(os.path.join(tmp_path, "logs", "events.out.tfevents.*"))
    assert len(files) == 1
    scalars = [
        (e.step, v.tag, v.simple_value) for e in _read_events(files[0]) for v in e.summary.value
    ]
    assert (1, "train/loss", 2.5) in scalars
    assert (2, "train/loss", 1.5) in scalars
    assert (1, "train/acc", 0.25) in scalars


def test_append_on_reopen_and_disabled(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"a": 1})
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(2, {"a": 2})
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2]
    assert not glob.glob(os.path.join(tmp_path, "events.*"))
    off = MetricWriter(tmp_path / "off", enabled=False)
    off.write_scalars(1, {"a": 1})
    off.close()
    assert not os.path.exists(tmp_path / "off")


def test_bad_input(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="logdir=.*existing file"):
        MetricWriter(f)
    with MetricWriter(tmp_path / "ok", tensorboard=False) as w:
        with pytest.raises(ValueError, match="'v' has shape \\(3,\\).*reduce"):
            w.write_scalars(0, {"v": np.zeros(3)})


def test_a_writer_that_writes_nothing_leaves_no_event_file(tmp_path):
    # Loading a finished run opens a writer and writes nothing: no empty event file.
    with MetricWriter(tmp_path):
        pass
    assert not glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
