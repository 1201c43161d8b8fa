"""CellProfiler profile loader on real profile tables (LINCS SQ00015054, JUMP BR00121431)."""

import csv
import gzip
import json
import pathlib

import numpy as np
import pandas as pd
import pytest

from jaxadapt.data import pipeline, transforms
from jaxadapt.data.profiles import norm as profile_norm, tables as profiles
from jaxadapt.data.sim import design


DATA = pathlib.Path(__file__).resolve().parent / "profiles"
MINI = DATA / "mini"
# The real LINCS plate, unchanged, as the package ships it (see tests/data/profiles/SOURCE.md).
LINCS_GZ = (design.RESOURCES / "calibration" / "SQ00015054_normalized_feature_select.csv.gz")
LINCS_COLUMNS = {"batch": "Metadata_Batch_Number", "compound": "Metadata_broad_sample"}
# Two real LINCS compounds (6 wells each) as classes 0 and 1.
TWO = ("BRD-K92301463-001-05-5", "BRD-A92630576-050-24-1")


def _labels(tmp_path, compounds=TWO, name="labels.csv"):
    path = tmp_path / name
    pd.DataFrame({"compound": list(compounds), "label": range(len(compounds))}).to_csv(
        path, index=False)
    return str(path)


def _lincs_plate_table(tmp_path):
    """The plate table the LINCS file lacks: its real plate, its batch number 4."""
    path = tmp_path / "plate.csv"
    pd.DataFrame({"Metadata_Source": ["lincs"], "Metadata_Batch": ["4"],
                  "Metadata_Plate": ["SQ00015054"]}).to_csv(path, index=False)
    return str(path)


def _lincs_spec(tmp_path, paths, **kw):
    base = dict(paths=tuple(str(p) for p in paths), label_table=_labels(tmp_path),
                plate_table=_lincs_plate_table(tmp_path), columns=LINCS_COLUMNS,
                control_compounds=("DMSO",), on_unlabelled="drop",
                report_dir=str(tmp_path / "report"))
    base.update(kw)
    return profiles.ProfileSpec(**base)


def _mini_spec(tmp_path, **kw):
    base = dict(paths=(str(MINI / "lincs_a.parquet"), str(MINI / "lincs_b.csv.gz")),
                label_table=str(MINI / "labels.csv"),
                columns={"compound": "Metadata_broad_sample"}, control_compounds=("DMSO",),
                on_unlabelled="drop", report_dir=str(tmp_path / "report"))
    base.update(kw)
    return profiles.ProfileSpec(**base)


def _csv_rows(path):
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_real_lincs_csv_gz_loads_into_the_schema_with_its_values(tmp_path):
    spec = _lincs_spec(tmp_path, [LINCS_GZ], normalization="none")
    prof = profiles.load_profiles(spec)
    raw = _csv_rows(LINCS_GZ)  # an independent parse of the same real file
    kept = [r for r in raw if r["Metadata_broad_sample"] in ("DMSO",) + TWO]
    assert len(prof.table) == len(kept) == 24 + 6 + 6
    assert len(prof.feature_names) == 454
    assert prof.feature_names[0] == "Cells_AreaShape_Compactness"
    want = np.array([[float(r[f]) for f in prof.feature_names] for r in kept], np.float32)
    np.testing.assert_array_equal(prof.features, want)
    t = prof.table
    assert t["well"].tolist() == [r["Metadata_Well"] for r in kept]
    assert set(t["source"]) == {"lincs"} and set(t["batch"]) == {"4"}
    assert set(t["plate"]) == {"SQ00015054"} and set(t["site"]) == {0}
    assert t["is_control"].sum() == 24
    assert (t["label"][t["is_control"]] == -1).all()
    assert sorted(np.bincount(t["label"][~t["is_control"]]).tolist()) == [6, 6]
    # Unlabelled compounds were dropped by policy and listed, never silently.
    report = json.load(open(prof.report_path))
    assert len(report["dropped_unlabelled_wells"]) == 384 - 36
    assert report["dropped_features"] == {} and report["dropped_wells"] == []


def test_csv_and_parquet_load_identically_and_match_the_real_csv_gz(tmp_path):
    a = profiles.load_profiles(_lincs_spec(tmp_path, [DATA / "lincs_SQ00015054_f65.csv"]))
    b = profiles.load_profiles(_lincs_spec(tmp_path, [DATA / "lincs_SQ00015054_f65.parquet"]))
    full = profiles.load_profiles(_lincs_spec(tmp_path, [LINCS_GZ]))
    assert a.feature_names == b.feature_names and len(a.feature_names) == 65
    np.testing.assert_array_equal(a.features, b.features)
    for field in a.table.columns:
        np.testing.assert_array_equal(a.table[field], b.table[field])
    cols = [full.feature_names.index(f) for f in a.feature_names]
    np.testing.assert_allclose(a.features, full.features[:, cols], rtol=1e-6, atol=1e-6)


def test_real_jump_raw_schema_joins_plate_and_well_tables(tmp_path):
    labels = _labels(tmp_path, ("JCP2022_043547", "JCP2022_050797"))
    spec = profiles.ProfileSpec(
        paths=(str(DATA / "BR00121431_main.csv.gz"),), label_table=labels,
        plate_table=str(DATA / "BR00121431_plate.csv"),
        well_table=str(DATA / "BR00121431_well.csv"), normalization="none")
    prof = profiles.load_profiles(spec)
    assert prof.features.shape == (2, 5790)  # Metadata_Site_Count / Object_Count are no features
    assert prof.table["source"].tolist() == ["source_4"] * 2
    assert prof.table["batch"].tolist() == ["2021_04_20_Target2"] * 2
    assert prof.table["compound"].tolist() == ["JCP2022_043547", "JCP2022_050797"]
    assert prof.table["label"].tolist() == [0, 1]
    area = prof.feature_names.index("Cells_AreaShape_Area")
    raw = pd.read_csv(DATA / "BR00121431_main.csv.gz")
    np.testing.assert_allclose(prof.features[:, area], raw["Cells_AreaShape_Area"], rtol=1e-6)
    assert prof.report_path == ""
    # The plate has no DMSO well: normalizing against controls fails naming the plate.
    with pytest.raises(ValueError, match="plate BR00121431 has 0 control well"):
        profiles.load_profiles(spec._replace(normalization="mad_robustize"))


def _numpy_norm(x, plate, ctrl, method):
    out = np.empty_like(x)
    for p in np.unique(plate):
        rows, c = plate == p, (plate == p) & ctrl
        if method == "mad_robustize":
            med = np.median(x[c], axis=0)
            mad = np.median(np.abs(x[c] - med), axis=0)
            out[rows] = (x[rows] - med) / (1.4826 * mad + 1e-18)
        else:
            sd = x[c].std(axis=0)
            out[rows] = (x[rows] - x[c].mean(axis=0)) / np.where(sd == 0, 1.0, sd)
    return out


@pytest.mark.parametrize("method", ["mad_robustize", "standardize"])
def test_per_plate_normalization_equals_numpy_restatement(tmp_path, method):
    raw = profiles.load_profiles(_mini_spec(tmp_path, normalization="none"))
    plate, ctrl = raw.table["plate"], raw.table["is_control"]
    x = raw.features.astype(np.float64)
    x[:, 3] = 7.0  # a feature constant over every plate's controls (and every well)
    got = profile_norm.normalize_per_plate(x, plate, ctrl, method)
    np.testing.assert_allclose(got, _numpy_norm(x, plate, ctrl, method), rtol=1e-10, atol=1e-10)
    for p in np.unique(plate):  # each plate's controls are centred on its own statistics
        c = (plate == p) & ctrl
        centre = np.median if method == "mad_robustize" else np.mean
        np.testing.assert_allclose(centre(got[c], axis=0), 0.0, atol=1e-9)
    # The loader applies it after the label policy, per plate, rows in table order.
    done = profiles.load_profiles(_mini_spec(tmp_path, normalization=method))
    want = _numpy_norm(raw.features.astype(np.float64), plate, ctrl, method)
    np.testing.assert_allclose(done.features, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mad_robustize", "standardize"])
def test_normalization_equals_pycytominer_on_the_real_plate(tmp_path, method):
    """Our NumPy code computes what pycytominer.normalize computes (the JUMP reference)."""
    from pycytominer import normalize

    raw = profiles.load_profiles(_lincs_spec(tmp_path, [LINCS_GZ], normalization="none",
                                             on_unlabelled="drop"))
    ctrl = raw.table["is_control"]
    df = pd.DataFrame(raw.features.astype(np.float64), columns=list(raw.feature_names))
    df["Metadata_is_control"] = ctrl
    want = normalize(df, features=list(raw.feature_names), meta_features=["Metadata_is_control"],
                     samples="Metadata_is_control == True", method=method)
    got = profile_norm.normalize_per_plate(raw.features, raw.table["plate"], ctrl, method)
    np.testing.assert_allclose(got, want[list(raw.feature_names)].to_numpy(), rtol=1e-9,
                               atol=1e-9)


def test_too_few_controls_and_unknown_method_are_named():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="plate P1 has 1 control"):
        profile_norm.normalize_per_plate(x, np.array(["P1"] * 3), np.array([1, 0, 0], bool),
                                         "standardize")
    with pytest.raises(ValueError, match="'zscore' is unknown"):
        profile_norm.normalize_per_plate(x, np.array(["P1"] * 3), np.ones(3, bool), "zscore")


def test_source_serves_profiles_through_the_image_pipeline(tmp_path):
    prof = profiles.load_profiles(_mini_spec(tmp_path))
    source = profiles.ProfileSource(prof.features)
    assert source[5]["image"].shape == (1, 1, 65)
    rows = np.array([[0, 7, 3, 50]])
    (batch,) = pipeline.batches(source, prof.table, rows, transform=transforms.Transform(1, None),
                                seed=0, channels=65, num_threads=1)
    np.testing.assert_array_equal(batch["image"][:, 0, 0], prof.features[rows[0]])
    np.testing.assert_array_equal(batch["label"], prof.table["label"][rows[0]])


# ------------------------------------------------------------------ bad input


def _copy(tmp_path, src, name, change):
    df = pd.read_csv(src) if str(src).endswith((".csv", ".gz")) else pd.read_parquet(src)
    df = change(df)
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_missing_metadata_column_names_file_and_column(tmp_path):
    path = _copy(tmp_path, DATA / "lincs_SQ00015054_f65.csv", "no_well.csv",
                 lambda d: d.drop(columns=["Metadata_Well"]))
    with pytest.raises(ValueError, match=r"no_well.csv lacks column\(s\) \['Metadata_Well'\]"):
        profiles.load_profiles(_lincs_spec(tmp_path, [path]))
    # Source and batch neither in the table nor given by a plate table.
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Metadata_Source'"):
        profiles.load_profiles(_lincs_spec(tmp_path, [DATA / "lincs_SQ00015054_f65.csv"],
                                           plate_table=""))


def test_plate_absent_from_plate_table_is_named(tmp_path):
    path = _copy(tmp_path, DATA / "lincs_SQ00015054_f65.csv", "other.csv",
                 lambda d: d.assign(Metadata_Plate="SQ_UNKNOWN"))
    with pytest.raises(ValueError, match=r"plate\(s\) \['SQ_UNKNOWN'\] are absent"):
        profiles.load_profiles(_lincs_spec(tmp_path, [path]))


def test_missing_feature_column_in_one_table_is_named(tmp_path):
    b = _copy(tmp_path, MINI / "lincs_b.csv.gz", "b.csv",
              lambda d: d.drop(columns=["Nuclei_AreaShape_Solidity"], errors="raise"))
    spec = _mini_spec(tmp_path, paths=(str(MINI / "lincs_a.parquet"), str(b)))
    with pytest.raises(ValueError, match=r"b.csv lacks feature column\(s\) "
                                         r"\['Nuclei_AreaShape_Solidity'\]"):
        profiles.load_profiles(spec)
    none = _copy(tmp_path, MINI / "lincs_b.csv.gz", "nofeat.csv",
                 lambda d: d[[c for c in d.columns if c.startswith("Metadata_")]])
    with pytest.raises(ValueError, match="nofeat.csv has no feature column"):
        profiles.load_profiles(_mini_spec(tmp_path, paths=(str(none),)))


def _with_nan(tmp_path):
    feats = ["Cells_AreaShape_Compactness", "Nuclei_AreaShape_Solidity"]

    def poison(d):
        d = d.copy()
        d.loc[[0, 5], feats[0]] = np.nan
        d.loc[[5], feats[1]] = np.inf
        return d

    return _copy(tmp_path, MINI / "lincs_b.csv.gz", "nan.csv", poison), feats, poison


def test_nan_features_raise_naming_them(tmp_path):
    path, feats, _ = _with_nan(tmp_path)
    spec = _mini_spec(tmp_path, paths=(str(path),), on_unlabelled="drop",
                      label_table=_labels(tmp_path, pd.read_csv(path)["Metadata_broad_sample"]
                                          .drop_duplicates().loc[lambda s: s != "DMSO"]))
    with pytest.raises(ValueError, match="2 feature") as err:
        profiles.load_profiles(spec)
    for f in feats:
        assert f in str(err.value)


def test_nan_drop_policies_write_the_report_beside_the_data(tmp_path):
    path, feats, poison = _with_nan(tmp_path)
    compounds = pd.read_csv(path)["Metadata_broad_sample"]
    labels = _labels(tmp_path, compounds.drop_duplicates().loc[lambda s: s != "DMSO"])
    spec = _mini_spec(tmp_path, paths=(str(path),), label_table=labels, report_dir="")
    by_feature = profiles.load_profiles(spec._replace(on_nonfinite="drop_features"))
    assert set(feats).isdisjoint(by_feature.feature_names)
    assert by_feature.features.shape == (192, 63)
    assert by_feature.report_path == str(tmp_path / profiles.REPORT_NAME)  # beside the table
    assert json.load(open(by_feature.report_path))["dropped_features"] == {feats[0]: 2, feats[1]: 1}
    by_well = profiles.load_profiles(spec._replace(on_nonfinite="drop_wells"))
    assert by_well.features.shape == (190, 65)
    bad = poison(pd.read_csv(MINI / "lincs_b.csv.gz")).loc[[0, 5]]
    listed = json.load(open(by_well.report_path))["dropped_wells"]
    assert [(w["plate"], w["well"]) for w in listed] == list(
        zip(bad["Metadata_Plate"], bad["Metadata_Well"]))
    assert np.isfinite(by_well.features).all()


def test_unlabelled_compounds_and_bad_label_tables_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"compound\(s\) of the profiles are neither"):
        profiles.load_profiles(_mini_spec(tmp_path, on_unlabelled="raise"))
    ctrl = _labels(tmp_path, ("DMSO",), "ctrl.csv")
    with pytest.raises(ValueError, match=r"labels control compound\(s\) \['DMSO'\]"):
        profiles.load_profiles(_mini_spec(tmp_path, label_table=ctrl))
    neg = tmp_path / "neg.csv"
    pd.DataFrame({"compound": ["x"], "label": [-1]}).to_csv(neg, index=False)
    with pytest.raises(ValueError, match="class indices 0..K-1"):
        profiles.load_profiles(_mini_spec(tmp_path, label_table=str(neg)))
    txt = tmp_path / "labels.txt"
    txt.write_text("compound,label\n")
    with pytest.raises(ValueError, match="unknown table format"):
        profiles.read_table(str(txt))
