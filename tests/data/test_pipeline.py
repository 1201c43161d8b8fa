"""Tests of transforms and the grain pipeline (in-memory source and a real TFDS store)."""

import numpy as np
import pytest

from jaxadapt.data import pipeline, sampling as samplers, schema, store, transforms


S, C = 40, 5


class ArraySource:
    """Random-access source over an in-memory array, like tfds.data_source."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "row": i}

    def __getitems__(self, keys):
        return [self[k] for k in keys]


def make_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, S, S, C), dtype=np.uint8)
    ctrl = np.arange(n) % 4 == 3
    table = schema.SiteTable({
        "source": np.array(["s"] * n), "batch": np.array(["b"] * n),
        "plate": np.array([f"p{i % 2}" for i in range(n)]),
        "well": np.array([f"W{i:02d}" for i in range(n)]), "site": np.zeros(n, np.int64),
        "compound": np.where(ctrl, schema.DMSO, "c"), "moa": np.array([""] * n),
        "label": np.where(ctrl, -1, np.arange(n) % 3), "is_control": ctrl,
    })
    return images, table


def test_center_crop_and_normalize():
    images, _ = make_data(4)
    stats = transforms.channel_stats_of(images)
    flat = images.reshape(-1, C).astype(np.float64)
    np.testing.assert_allclose(stats.mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, flat.std(0, ddof=0), rtol=1e-12)
    out = transforms.eval_transform(32, stats)(images[1])
    ref = (images[1, 4:36, 4:36].astype(np.float64) - flat.mean(0)) / flat.std(0)
    assert out.dtype == np.float32 and out.shape == (32, 32, C)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_random_crop_and_flips_match_numpy_restatement():
    images, _ = make_data(1)
    t = transforms.train_transform(24, None)
    seen_windows, seen_flips = set(), set()
    for k in range(200):
        out = t(images[0], np.random.default_rng(k))
        rng = np.random.default_rng(k)
        y, x = rng.integers(S - 24 + 1), rng.integers(S - 24 + 1)
        fh, fv = rng.integers(2, size=2)
        ref = images[0, y:y + 24, x:x + 24]
        ref = ref[:, ::-1] if fh else ref
        ref = ref[::-1] if fv else ref
        np.testing.assert_array_equal(out, ref.astype(np.float32))
        seen_windows.add((int(y), int(x)))
        seen_flips.add((int(fh), int(fv)))
    assert len(seen_flips) == 4 and len(seen_windows) > 100
    assert max(max(w) for w in seen_windows) <= S - 24
    with pytest.raises(ValueError, match="needs an rng"):
        t(images[0])
    with pytest.raises(ValueError, match="crop_size=48"):
        transforms.eval_transform(48, None)(images[0])


def test_constant_channel_rejected():
    images = np.zeros((2, 8, 8, C), np.uint8)
    images[..., :4] = np.arange(64, dtype=np.uint8).reshape(8, 8)[None, ..., None]
    with pytest.raises(ValueError, match=r"channel 4 \(Mito\) is constant"):
        transforms.channel_stats_of(images)


def _collect(it):
    return list(it)


def test_batches_content_and_determinism():
    images, table = make_data()
    src = ArraySource(images)
    stats = pipeline.channel_stats(src, np.arange(0, 24, 2), chunk=5)
    ref_stats = transforms.channel_stats_of(images[::2])
    np.testing.assert_allclose(stats.mean, ref_stats.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, ref_stats.std, rtol=1e-12)
    idx = samplers.mixed_batches(np.arange(24), 6, seed=0, epoch=0)
    masks = np.ones(idx.shape, bool)
    masks[-1, -2:] = False
    tf = transforms.train_transform(32, stats)
    out = _collect(pipeline.batches(src, table, idx, transform=tf, seed=(5, 0), masks=masks,
                                    num_threads=4))
    assert len(out) == 4
    for k, b in enumerate(out):
        assert set(b) == {"image", "label", "is_control", "mask", "row"}
        assert b["image"].dtype == np.float32 and b["image"].shape == (6, 32, 32, C)
        assert b["label"].dtype == np.int32 and b["row"].dtype == np.int64
        np.testing.assert_array_equal(b["row"], idx[k])
        np.testing.assert_array_equal(b["label"], table["label"][idx[k]])
        np.testing.assert_array_equal(b["mask"], masks[k] & ~table["is_control"][idx[k]])
        for j, r in enumerate(idx[k]):
            ref = tf(images[r], np.random.default_rng([5, 0, k, j]))
            np.testing.assert_array_equal(b["image"][j], ref)
    serial = _collect(pipeline.batches(src, table, idx, transform=tf, seed=(5, 0), num_threads=1))
    assert all(np.array_equal(a["image"], s["image"]) for a, s in zip(out, serial))
    resumed = _collect(pipeline.batches(src, table, idx[2:], transform=tf, seed=(5, 0),
                                        first_index=2))
    assert all(np.array_equal(a["image"], s["image"]) for a, s in zip(out[2:], resumed))


def test_bad_images_name_the_row():
    images, table = make_data()
    bad = images.astype(np.float32)
    bad[13, 3, 4, 2] = np.nan
    it = pipeline.batches(ArraySource(bad), table, np.arange(24).reshape(4, 6),
                          transform=transforms.eval_transform(32, None), seed=0)
    with pytest.raises(ValueError, match=r"row 13 \(plate p1, well W13.*NaN"):
        _collect(it)
    it = pipeline.batches(ArraySource(images[..., :3]), table, np.arange(6)[None],
                          transform=transforms.eval_transform(32, None), seed=0)
    with pytest.raises(ValueError, match=r"row 0 .* 3 channels"):
        _collect(it)
    with pytest.raises(ValueError, match="masks shape"):
        pipeline.batches(ArraySource(images), table, np.arange(6)[None], seed=0,
                         transform=transforms.eval_transform(32, None), masks=np.ones(5, bool))


def test_tfds_store_through_pipeline(tmp_path):
    images, table = make_data()
    chunks = lambda t: iter([(np.arange(10), images[:10]), (np.arange(10, 24), images[10:])])
    src, tab, _ = store.ensure_store(str(tmp_path / "st"), lambda: table, chunks,
                                     image_shape=(S, S, C))
    units = samplers.eval_units(tab, np.arange(24), unit="plate", batch_size=5)
    tf = transforms.eval_transform(32, transforms.channel_stats_of(images))
    for u in units:
        got = _collect(pipeline.batches(src, tab, u.rows, masks=u.mask, transform=tf, seed=0))
        for b, rows in zip(got, u.rows):
            np.testing.assert_array_equal(b["image"], np.stack([tf(images[r]) for r in rows]))
            assert not b["mask"][np.asarray(tab["is_control"])[rows]].any()


def test_processes_reading_shares_get_the_images_of_one_reader():
    # Augmentation is seeded by the global position, so shares read by separate
    # processes (each with its first column) equal the whole batch read at once.
    images, table = make_data()
    src, tf = ArraySource(images), transforms.train_transform(32, None)
    index = np.arange(24).reshape(2, 12)[:, ::-1]
    whole = _collect(pipeline.batches(src, table, index, transform=tf, seed=(3, 1)))
    parts = []
    for p in range(3):
        local, first = samplers.process_share(index, p, 3, local_devices=2)
        parts.append(_collect(pipeline.batches(src, table, local, transform=tf, seed=(3, 1),
                                               first_column=first)))
    for k in range(2):
        for key in ("image", "label", "mask", "row"):
            np.testing.assert_array_equal(
                np.concatenate([part[k][key] for part in parts]), whole[k][key])
    # Without the offset the augmentation would differ (the check above can fail).
    local, _ = samplers.process_share(index, 1, 3, local_devices=2)
    wrong = _collect(pipeline.batches(src, table, local, transform=tf, seed=(3, 1)))
    assert not np.array_equal(wrong[0]["image"], whole[0]["image"][4:8])


def test_channel_stats_from_shares_equal_one_reader_exactly():
    images, _ = make_data(24)
    src, rows = ArraySource(images), np.arange(3, 23)
    whole = pipeline.channel_stats(src, rows, chunk=4)
    # Three readers; combine totals the other readers' partial integer sums.
    partials = {}

    def recorder(p):
        def combine(values):
            partials[p] = values
            return values
        return combine

    for p in range(3):
        pipeline.channel_stats(src, rows, chunk=4, share=(p, 3), combine=recorder(p))
    total = [sum(v) for v in zip(*partials.values())]
    for p in range(3):
        got = pipeline.channel_stats(src, rows, chunk=4, share=(p, 3),
                                     combine=lambda values: total)
        np.testing.assert_array_equal(got.mean, whole.mean)
        np.testing.assert_array_equal(got.std, whole.std)
    assert partials[0][0] == 7 * S * S  # reader 0 read 7 of the 20 rows (array_split)
    with pytest.raises(ValueError, match="needs a combine function"):
        pipeline.channel_stats(src, rows, share=(0, 2))


class CountingSource(ArraySource):
    """Records every row read."""

    def __init__(self, images):
        super().__init__(images)
        self.read = []

    def __getitems__(self, keys):
        self.read += list(keys)
        return super().__getitems__(keys)


def test_bounded_stats_sample_reads_only_k_rows_the_same_on_every_reader():
    from jaxadapt.eval import study

    images, _ = make_data(60)
    rows = np.arange(2, 58)
    src = CountingSource(images)
    got = study.train_stats(src, rows, max_rows=9)
    assert len(src.read) == 9 and len(set(src.read)) == 9 and set(src.read) <= set(rows)
    ref = transforms.channel_stats_of(images[sorted(src.read)])
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-12)
    np.testing.assert_allclose(got.std, ref.std, rtol=1e-12)
    # Deterministic: the same sample every call; two readers split exactly those 9 rows.
    again = CountingSource(images)
    study.train_stats(again, rows, max_rows=9)
    assert again.read == src.read
    shares = [CountingSource(images) for _ in range(2)]
    for p, s in enumerate(shares):
        pipeline.channel_stats(s, rows, max_rows=9, seed=0, share=(p, 2), combine=lambda v: v)
    assert sorted(shares[0].read + shares[1].read) == sorted(src.read)
    # No bound (or one above the row count): every row.
    every = CountingSource(images)
    study.train_stats(every, rows, max_rows=100)
    assert sorted(every.read) == rows.tolist()
