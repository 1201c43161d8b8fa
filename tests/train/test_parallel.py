"""Data parallelism on 8 fake CPU devices equals the single-device math."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxadapt.models.resnet import BasicBlock, ResNet
from jaxadapt.train import parallel
from jaxadapt.train.state import create_train_state
from jaxadapt.train.steps import make_eval_step, make_train_step

KEY = jax.random.key(0, impl="rbg")  # threefry init compiles slowly on XLA:CPU
MODEL = ResNet(stage_sizes=(1, 1), block_cls=BasicBlock, width=8, stem="small",
               num_classes=3, in_channels=5)
TX = optax.sgd(0.05, momentum=0.9)

needs_devices = pytest.mark.skipif(jax.device_count() < 2, reason="needs >1 device "
                                   "(tests/conftest.py fakes 8 CPU devices)")


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n).astype(np.int32)
    img = rng.normal(size=(n, 32, 32, 5)).astype(np.float32)
    img[..., 1] += label[:, None, None]
    mask = (rng.uniform(size=n) < 0.75).astype(np.float32)
    return {"image": img, "label": label, "mask": mask,
            "stats_mask": np.arange(n) % 5 != 4}  # uneven across devices on purpose


@needs_devices
def test_parallel_equals_single_device():
    mesh = parallel.make_data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    state = create_train_state(MODEL, TX, KEY, (1, 32, 32, 5))
    single = jax.jit(make_train_step(MODEL, TX))
    para = parallel.parallel_train_step(make_train_step(MODEL, TX), mesh)
    s1, s8 = state, parallel.replicate(state, mesh)
    for i in range(3):
        b = _batch(seed=i)
        s1, m1 = single(s1, jax.tree.map(jnp.asarray, b))
        s8, m8 = para(s8, parallel.shard_batch(b, mesh))
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert s8.params["head"]["kernel"].sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats)),
                    jax.tree.leaves((s8.params, s8.batch_stats))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # Evaluation: logits stay sharded, sums are global.
    b = _batch(seed=9)
    e1 = jax.jit(make_eval_step(MODEL, "batch"))(s1, jax.tree.map(jnp.asarray, b))
    e8 = parallel.parallel_eval_step(make_eval_step(MODEL, "batch"), mesh)(
        s8, parallel.shard_batch(b, mesh))
    assert len(e8["logits"].sharding.device_set) == jax.device_count()
    for k in ("logits", "loss_sum", "count"):
        np.testing.assert_allclose(np.asarray(e8[k]), np.asarray(e1[k]), rtol=1e-5, atol=1e-5)


@needs_devices
def test_shard_batch_not_divisible_error():
    mesh = parallel.make_data_mesh()
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"batch size {n + 1} .* {n} devices.*multiple"):
        parallel.shard_batch({"image": np.zeros((n + 1, 2))}, mesh)
    sharded = parallel.shard_batch({"image": np.zeros((2 * n, 3))}, mesh)
    assert sharded["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert sharded["image"].addressable_shards[0].data.shape == (2, 3)


def test_make_data_mesh_groups_devices_by_process():
    devs = jax.devices()
    mesh = parallel.make_data_mesh(devs[::-1])
    keys = [(d.process_index, d.id) for d in mesh.devices.flat]
    assert keys == sorted(keys) and len(keys) == len(devs)


@needs_devices
def test_process_batches_reads_the_whole_batch_on_one_process():
    calls = []

    def read(rows, *, first_column, seed=None, masks=None):
        calls.append((rows, first_column, seed, masks))
        return iter([{"row": r} for r in rows])

    mesh = parallel.make_data_mesh()
    index = np.arange(32).reshape(2, 16)
    masks = index % 3 > 0
    out = list(parallel.process_batches(read, index, mesh, masks=masks, seed=(1, 2)))
    rows, first, seed, got_masks = calls[0]
    np.testing.assert_array_equal(rows, index)
    np.testing.assert_array_equal(got_masks, masks)
    assert first == 0 and seed == (1, 2) and len(out) == 2
    with pytest.raises(ValueError, match="config.train.batch_size=12 is not a multiple of "
                                         "the 8 local devices"):
        parallel.process_batches(read, np.zeros((1, 12), np.int64), mesh,
                                 field="config.train.batch_size")
    # Episodes (group of rows) split over a sub-mesh of 2 devices: 2 episodes of 3 rows.
    sub = parallel.make_data_mesh(jax.devices()[:2])
    parallel.process_batches(read, np.zeros((1, 6), np.int64), sub, group=3)
    assert calls[-1][1] == 0 and calls[-1][0].shape == (1, 6)
