"""Tests of jaxadapt.train.loop.fit and jaxadapt.train.progress.

A tiny Dense-BatchNorm-Dense classifier on fixed random data, 4 steps per epoch;
the batches of epoch e come from a generator seeded with e, as fit requires.
"""

import io
import os
import shutil

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxadapt.train.checkpoint import tree_equal
from jaxadapt.train.loop import FitConfig, fit
from jaxadapt.train.progress import ProgressBar
from jaxadapt.train.writer import MetricWriter, read_jsonl

_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(64, 6)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0).astype(np.int32)
XV = _RNG.normal(size=(32, 6)).astype(np.float32)
YV = (XV[:, 0] > 0).astype(np.int32) + (XV[:, 1] > 0).astype(np.int32)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(
            nn.BatchNorm(use_running_average=not train, use_fast_variance=False)(nn.Dense(8)(x))
        )
        return nn.Dense(3)(x)


class _State(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple


_NET = _Net()
_TX = optax.adam(1e-2)


def _init() -> _State:
    v = _NET.init(jax.random.key(0), jnp.zeros((2, 6), jnp.float32), train=False)
    return _State(
        step=jnp.zeros((), jnp.int32),
        params=v["params"],
        batch_stats=v["batch_stats"],
        opt_state=_TX.init(v["params"]),
    )


def _train_step_fn(state, batch):
    def loss_fn(params):
        logits, upd = _NET.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return ce.mean(), (logits, upd["batch_stats"])

    # optax's Adam bias correction mixes float and int32 (strict promotion fails).
    with jax.numpy_dtype_promotion("standard"):
        (loss, (logits, bs)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt = _TX.update(g, state.opt_state, state.params)
    acc = (logits.argmax(-1) == batch["label"]).astype(jnp.float32).mean()
    new = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=bs,
        opt_state=opt,
    )
    return new, {"loss": loss, "accuracy": acc, "logits": logits}


_train_step = jax.jit(_train_step_fn)


@jax.jit
def _val_loss(state):
    logits = _NET.apply({"params": state.params, "batch_stats": state.batch_stats}, XV, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, YV).mean()


def _validate(state):
    return {"loss": _val_loss(state)}


def _epoch_batches(epoch):
    order = np.random.default_rng((1, epoch)).permutation(len(X))
    return [{"image": X[i], "label": Y[i]} for i in order.reshape(4, 16)]


def _cfg(**kw):
    kw.setdefault("progress", False)
    return FitConfig(**kw)


def test_early_stopping_restores_best(tmp_path):
    losses = [1.0, 0.5, 0.4, 0.6, 0.45, 0.8, 0.1]
    seen = []

    def validate(state):
        seen.append(jax.device_get(state.params))
        return {"loss": losses[len(seen) - 1], "accuracy": 0.5}

    res = fit(
        _init(),
        _cfg(num_epochs=20, patience=3, ckpt_dir=str(tmp_path / "ck")),
        train_step=_train_step,
        epoch_batches=_epoch_batches,
        validate=validate,
    )
    assert res.stopped_early and res.finished
    assert res.best_epoch == 2 and res.best_val_loss == 0.4
    assert res.epochs_done == 6 and len(seen) == 6 and res.global_step == 24
    assert [h["val_loss"] for h in res.history] == losses[:6]
    assert tree_equal(res.state.params, seen[2])
    assert tree_equal(res.last_state.params, seen[5])
    assert not tree_equal(seen[2], seen[5])
    assert res.state.opt_state is res.last_state.opt_state


def _run(ckpt_dir, writer=None, **kw):
    return fit(
        _init(),
        _cfg(num_epochs=5, patience=20, ckpt_dir=ckpt_dir, **kw),
        train_step=_train_step,
        epoch_batches=_epoch_batches,
        validate=_validate,
        writer=writer,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full") / "ck")
    return d, _run(d)


def _assert_same(a, b):
    assert tree_equal(a.state, b.state)
    assert tree_equal(a.last_state, b.last_state)
    assert a.history == b.history
    assert (a.best_epoch, a.best_val_loss, a.global_step, a.epochs_done) == (
        b.best_epoch,
        b.best_val_loss,
        b.global_step,
        b.epochs_done,
    )


def test_resume_equals_uninterrupted(tmp_path, full_run):
    _, full = full_run
    d = str(tmp_path / "ck")
    part = _run(d, stop_after_epochs=2)
    assert not part.finished and part.epochs_done == 2
    part = _run(d, stop_after_epochs=2)
    assert part.epochs_done == 4
    rest = _run(d)
    assert rest.finished and not rest.stopped_early
    _assert_same(rest, full)
    assert len(full.history) == 5 and full.history[0]["epoch"] == 0
    assert {"train_loss", "train_accuracy", "val_loss"} <= set(full.history[0])


def test_finished_run_returns_at_once(full_run):
    d, full = full_run

    def boom(*_):
        raise AssertionError("a finished run must not train")

    again = fit(
        _init(),
        _cfg(num_epochs=5, patience=20, ckpt_dir=d),
        train_step=boom,
        epoch_batches=boom,
        validate=boom,
    )
    _assert_same(again, full)


def test_donating_step_with_async_checkpoints(tmp_path, full_run):
    """Kept best params and pending saves must survive buffer donation."""
    _, full = full_run
    step = jax.jit(_train_step_fn, donate_argnums=0)
    d = str(tmp_path / "ck")
    for cap in (3, None):
        res = fit(
            _init(),
            _cfg(num_epochs=5, patience=20, ckpt_dir=d, stop_after_epochs=cap),
            train_step=step,
            epoch_batches=_epoch_batches,
            validate=_validate,
        )
    _assert_same(res, full)


def test_resume_past_leftover_tmp_and_damaged_step(tmp_path, full_run, caplog):
    _, full = full_run
    d = str(tmp_path / "ck")
    _run(d, stop_after_epochs=3)  # steps 2 and 3 kept (max_to_keep=2)
    shutil.copytree(
        os.path.join(d, "3"), os.path.join(d, "4.orbax-checkpoint-tmp-99")
    )  # killed save
    for root, _, files in os.walk(os.path.join(d, "3", "payload")):
        for f in files:  # the newest complete step is damaged too
            os.remove(os.path.join(root, f))
    _assert_same(_run(d), full)  # resumes from step 2, re-runs epochs 2..4
    assert "step 3" in caplog.text and "failed to restore" in caplog.text
    assert any(n.startswith("3.unreadable-") for n in os.listdir(d))


def test_writer_and_progress_output(tmp_path, capsys):
    with MetricWriter(tmp_path / "logs") as w:
        fit(
            _init(),
            FitConfig(num_epochs=2, patience=5, log_every_steps=3),
            train_step=_train_step,
            epoch_batches=_epoch_batches,
            validate=_validate,
            writer=w,
            lr_schedule=lambda s: 1e-2,
        )
    recs = read_jsonl(tmp_path / "logs")
    step_losses = [r["step"] for r in recs if r["name"] == "train/loss"]
    assert step_losses == [3, 6]
    assert [r["value"] for r in recs if r["name"] == "train/lr"] == [0.01, 0.01]
    names = {r["name"] for r in recs}
    assert {
        "epoch/val_loss",
        "epoch/train_loss",
        "epoch/train_accuracy",
        "epoch/images_per_sec",
        "epoch/best_val_loss",
    } <= names
    assert "train/logits" not in names  # non-scalar metrics are not logged
    err = capsys.readouterr().err
    assert "steps/s" in err and "img/s" in err and "ETA" in err
    assert "epoch 2/2:" in err and "patience" in err


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"num_epochs": 0}, "num_epochs=0"),
        ({"num_epochs": 3, "patience": 0}, "patience=0"),
        ({"num_epochs": 3, "log_every_steps": 0}, "log_every_steps=0"),
        ({"num_epochs": 3, "stop_after_epochs": 0}, "stop_after_epochs=0"),
        ({"num_epochs": 3, "min_delta": -1.0}, "min_delta=-1.0"),
    ],
)
def test_bad_config(kw, field):
    with pytest.raises(ValueError, match=f"FitConfig.{field}.*pass"):
        FitConfig(**kw)


def test_bad_ckpt_dir_and_validate(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="FitConfig.ckpt_dir=.*existing file"):
        FitConfig(num_epochs=2, ckpt_dir=str(f))
    with pytest.raises(ValueError, match="validate returned.*'loss'"):
        fit(
            _init(),
            _cfg(num_epochs=1),
            train_step=_train_step,
            epoch_batches=_epoch_batches,
            validate=lambda s: {"acc": 1.0},
        )
    with pytest.raises(ValueError, match="epoch_batches\\(0\\) yielded no batch"):
        fit(
            _init(),
            _cfg(num_epochs=1),
            train_step=_train_step,
            epoch_batches=lambda e: [],
            validate=_validate,
        )


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_lines_off_tty():
    out, clock = io.StringIO(), _Clock()
    bar = ProgressBar(20, desc="epoch 1/3", stream=out, is_tty=False, clock=clock)
    for _ in range(20):
        clock.t += 5.0
        bar.update(1, images=32, metrics={"loss": 0.123456})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per 10%, no duplicate final line
    assert lines[0].startswith("epoch 1/3 | 2/20 ( 10%) | 0:10<1:30 ETA")
    assert "0.20 steps/s" in lines[0] and "6.4 img/s" in lines[0]


def test_progress_short_loop_off_tty_prints_little():
    # A loop of a few seconds must not print a line per 10% into a CI log.
    out, clock = io.StringIO(), _Clock()
    bar = ProgressBar(20, desc="epoch 1/3", stream=out, is_tty=False, clock=clock)
    for _ in range(20):
        clock.t += 0.5
        bar.update(1, images=32)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "20/20 (100%)" in lines[0]


def test_progress_tty_and_unknown_total():
    out, clock = io.StringIO(), _Clock()
    bar = ProgressBar(None, stream=out, is_tty=True, clock=clock)
    clock.t = 1.0
    bar.update(4)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert "4 steps" in text and "4.00 steps/s" in text and "ETA" not in text
    out, clock = io.StringIO(), _Clock()
    bar = ProgressBar(None, stream=out, is_tty=False, clock=clock, log_interval_s=10.0)
    for _ in range(25):
        clock.t += 1.0
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 2  # at 10 s and 20 s


def test_count_weighted_epoch_means():
    mets = iter([(1.0, 1.0), (4.0, 3.0)])

    def step(state, batch):
        loss, count = next(mets)
        return state, {"loss": jnp.float32(loss), "count": jnp.float32(count)}

    res = fit(
        _init(),
        _cfg(num_epochs=1),
        train_step=step,
        epoch_batches=lambda e: [{"image": X[:2]}, {"image": X[:4]}],
        validate=lambda s: {"loss": 1.0},
    )
    assert res.history[0]["train_loss"] == (1.0 * 1 + 4.0 * 3) / 4
    assert res.history[0]["train_count"] == 4.0
