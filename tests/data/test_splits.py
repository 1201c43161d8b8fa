"""Tests of the study splits: disjoint, covering, stratified, deterministic, and errors."""

import itertools

import ml_collections
import numpy as np
import pytest

from jaxadapt.data import schema, splits

CLASSES = ("cA", "cB", "cC")


def make_table(n_sources=2, n_batches=4, n_plates=2, wells_per_class=4, n_dmso=6, sites=2):
    """A small study: every plate holds every class in several wells plus DMSO wells."""
    cols = {k: [] for k in schema.SITE_FIELDS}
    for s, b, p in itertools.product(range(n_sources), range(n_batches), range(n_plates)):
        wells = [(c, i) for i, c in enumerate(CLASSES) for _ in range(wells_per_class)]
        wells += [(schema.DMSO, -1)] * n_dmso
        for w, (comp, lab) in enumerate(wells):
            for site in range(sites):
                for k, v in zip(cols, (f"s{s}", f"s{s}b{b}", f"s{s}b{b}p{p}", f"W{w:02d}", site,
                                       comp, "", lab, lab < 0)):
                    cols[k].append(v)
    return schema.SiteTable({k: np.array(v) for k, v in cols.items()})


def cfg(**kw):
    c = ml_collections.ConfigDict(dict(val_batches=0.15, new_batch_batches=1,
                                       in_domain_fraction=0.25, seed=0))
    c.update(kw)
    return c


def test_splits_disjoint_and_cover():
    t = make_table()
    sp = splits.make_splits(t, train_source="s0", cfg=cfg())
    assert set(sp) == set(splits.SPLITS)
    for a, b in itertools.combinations(sp, 2):
        assert not np.intersect1d(sp[a], sp[b]).size, (a, b)
    allrows = np.sort(np.concatenate(list(sp.values())))
    np.testing.assert_array_equal(allrows, np.arange(len(t)))  # every row somewhere
    src = t["source"]
    assert (src[sp["new_source"]] == "s1").all() and (src[sp["train"]] == "s0").all()
    b = t["batch"]
    val_b, new_b = set(b[sp["validation"]]), set(b[sp["new_batch"]])
    assert len(val_b) == 1 and len(new_b) == 1  # 0.15 * 4 batches -> 1
    train_plates = set(t["plate"][sp["train"]])
    assert set(t["plate"][sp["in_domain"]]) == train_plates
    assert not (set(b[sp["train"]]) & (val_b | new_b))
    for name in sp:
        assert t["is_control"][sp[name]].any(), name  # controls in every split


def test_in_domain_is_stratified_by_whole_wells():
    t = make_table()
    sp = splits.make_splits(t, train_source="s0", cfg=cfg(in_domain_fraction=0.25))
    ind = sp["in_domain"]
    key = np.char.add(t["plate"], t["well"])
    assert not np.intersect1d(key[ind], key[sp["train"]]).size  # no well split across sets
    for plate in set(t["plate"][ind]):
        for comp in CLASSES + (schema.DMSO,):
            sel = ind[(t["plate"][ind] == plate) & (t["compound"][ind] == comp)]
            n_wells = len(set(t["well"][sel]))
            assert n_wells == (round(0.25 * 6) if comp == schema.DMSO else 1), (plate, comp)


def test_deterministic_by_seed():
    t = make_table()
    a = splits.make_splits(t, train_source="s0", cfg=cfg(seed=3))
    b = splits.make_splits(t, train_source="s0", cfg=cfg(seed=3))
    c = splits.make_splits(t, train_source="s0", cfg=cfg(seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_counts_as_ints():
    t = make_table(n_batches=5)
    sp = splits.make_splits(t, train_source="s1", cfg=cfg(val_batches=2, new_batch_batches=2))
    assert len(set(t["batch"][sp["validation"]])) == 2
    assert len(set(t["batch"][sp["new_batch"]])) == 2
    assert len(set(t["batch"][sp["train"]])) == 1


def test_errors():
    t = make_table()
    with pytest.raises(ValueError, match=r"train_source='s9'.*'s0', 's1'"):
        splits.make_splits(t, train_source="s9", cfg=cfg())
    with pytest.raises(ValueError, match="has 4 batches"):
        splits.make_splits(t, train_source="s0", cfg=cfg(val_batches=2, new_batch_batches=2))
    with pytest.raises(ValueError, match="in_domain_fraction"):
        splits.make_splits(t, train_source="s0", cfg=cfg(in_domain_fraction=0.0))
    one = make_table(n_sources=1)
    with pytest.raises(ValueError, match="'new_source' is empty"):
        splits.make_splits(one, train_source="s0", cfg=cfg())
    sp = splits.make_splits(one, train_source="s0", cfg=cfg(allow_empty=("new_source",)))
    assert len(sp["new_source"]) == 0


def test_class_missing_from_train():
    t = make_table()
    cols = dict(t.columns)
    label, comp = cols["label"].copy(), cols["compound"].copy()
    # a class that only exists in source s1
    sel = (cols["source"] == "s1") & (label == 2)
    label[sel], comp[sel] = 3, "cD"
    cols.update(label=label, compound=comp)
    with pytest.raises(ValueError, match=r"label=3 \(compound cD\).*'new_source'"):
        splits.make_splits(schema.SiteTable(cols), train_source="s0", cfg=cfg())


def test_pair_names_parse_and_build_the_matrix():
    assert splits.parse_pair("new_source") is None
    assert splits.parse_pair("source:s0->s1") == ("s0", "s1")
    assert splits.pair_name("s0", "s0") == "source:s0->s0"
    assert splits.source_matrix(["s0"], ["s0", "s1"]) == ("source:s0->s0", "source:s0->s1")
    for bad in ("source:s0", "source:->s1", "source:s0->", "source:a->b->c"):
        with pytest.raises(ValueError, match="source:<train source>->"):
            splits.parse_pair(bad)


def test_pair_split_rows_on_a_tiny_table():
    t = make_table(n_sources=3)
    sp = splits.make_splits(t, train_source="s1", cfg=cfg())
    # a != b: every row of source b (perturbed and controls), none of the others.
    got = splits.split_rows(t, sp, "source:s1->s2", "s1")
    np.testing.assert_array_equal(got, np.flatnonzero(t["source"] == "s2"))
    # a == b: the held-out wells of a's training plates, i.e. in_domain.
    np.testing.assert_array_equal(splits.split_rows(t, sp, "source:s1->s1", "s1"), sp["in_domain"])
    # Pooled names resolve as before; pairs of another training source are not this
    # replicate's cell.
    np.testing.assert_array_equal(splits.split_rows(t, sp, "new_source", "s1"), sp["new_source"])
    assert splits.split_rows(t, sp, "source:s0->s1", "s1") is None
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['s7'\]; valid sources: \['s0', 's1', 's2'\]"):
        splits.split_rows(t, sp, "source:s1->s7", "s1")
    with pytest.raises(ValueError, match="unknown split 'new_plate'"):
        splits.split_rows(t, sp, "new_plate", "s1")
