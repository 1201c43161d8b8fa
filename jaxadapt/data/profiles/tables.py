"""Well-level CellProfiler profiles (JUMP feature schema) -> SiteTable + float32 features.

A JUMP profile table (``.parquet``, ``.csv`` or ``.csv.gz``) has one row per well:
``Metadata_*`` columns and CellProfiler feature columns (``Cells_AreaShape_Area``,
``Nuclei_...``, ``Cytoplasm_...``). `load_profiles` reads one or more such tables, takes
source / batch / compound from JUMP's ``plate.csv.gz`` / ``well.csv.gz`` where the
profiles lack them, labels compounds from a label table, handles non-finite features by
policy (raise, or drop and list them in a report beside the data: never a silent hole),
and normalizes every plate against its negative controls (`profile_norm`).

A profile is served to the rest of the package as a 1 x 1 "image" with D channels
(`ProfileSource`), so the data pipeline, samplers, units and every BN-family method run
on profiles unchanged; `jaxadapt.models.mlp.MLP` flattens it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from jaxadapt.data import schema
from jaxadapt.data.profiles import norm as profile_norm


log = logging.getLogger(__name__)

#: CellProfiler compartments whose columns are features (as pycytominer infers them).
FEATURE_PREFIXES: tuple[str, ...] = ("Cells_", "Cytoplasm_", "Nuclei_")
#: Schema field -> JUMP column read from the profile table (or the joined tables).
DEFAULT_COLUMNS: dict[str, str] = {
    "source": "Metadata_Source", "batch": "Metadata_Batch", "plate": "Metadata_Plate",
    "well": "Metadata_Well", "compound": "Metadata_JCP2022",
}
NONFINITE_POLICIES = ("raise", "drop_features", "drop_wells")
UNLABELLED_POLICIES = ("raise", "drop")
REPORT_NAME = "profiles_report.json"
_SHOW = 8  # offending names an error message lists


class ProfileSpec(NamedTuple):
    """What to load (the `config.data.profiles` section, see `spec_from_config`).

    Attributes:
      paths: profile tables (.parquet, .csv, .csv.gz), any number of plates each.
      label_table: CSV with columns `compound`, `label` (class 0..K-1) and optional `moa`.
      plate_table: JUMP plate.csv(.gz) (Metadata_Source, Metadata_Batch, Metadata_Plate),
        joined on the plate when the profiles lack a source or batch column; "" = none.
      well_table: JUMP well.csv(.gz) (Metadata_Source, Metadata_Plate, Metadata_Well,
        Metadata_JCP2022), joined when the profiles lack the compound column; "" = none.
      columns: schema field -> column name (keys of `DEFAULT_COLUMNS`).
      feature_prefixes: a column starting with one of these is a feature.
      control_compounds: negative controls (DMSO): normalization reference, no label.
      normalization: "mad_robustize", "standardize" (per plate, against its controls) or
        "none" (profiles already normalized).
      on_nonfinite: "raise", "drop_features" or "drop_wells" for NaN/inf raw features.
      on_unlabelled: "raise" or "drop" wells whose compound is neither labelled nor a control.
      report_dir: where the drop report goes; "" = beside the first profile table.
    """

    paths: tuple[str, ...]
    label_table: str
    plate_table: str = ""
    well_table: str = ""
    columns: Mapping[str, str] = DEFAULT_COLUMNS
    feature_prefixes: tuple[str, ...] = FEATURE_PREFIXES
    control_compounds: tuple[str, ...] = (schema.DMSO,)
    normalization: str = "mad_robustize"
    on_nonfinite: str = "raise"
    on_unlabelled: str = "raise"
    report_dir: str = ""


class Profiles(NamedTuple):
    """Loaded profiles: row i of `table` describes row i of `features`.

    Attributes:
      table: SiteTable (one row per well; `site` is 0: a profile aggregates the well).
      features: float32 [N, D], normalized as the spec says.
      feature_names: the D column names.
      report: what was dropped ({"features": ..., "wells": ..., "unlabelled": ...}).
      report_path: the JSON report written beside the data, "" when nothing was dropped.
    """

    table: schema.SiteTable
    features: np.ndarray
    feature_names: tuple[str, ...]
    report: dict
    report_path: str


def _pandas():
    try:
        import pandas as pd  # pylint: disable=g-import-not-at-top
    except ImportError as err:  # the "profiles" extra
        raise ImportError("CellProfiler profiles need pandas and pyarrow: "
                          'pip install -e ".[profiles]"') from err
    return pd


def read_table(path: str):
    """Reads a .parquet, .csv or .csv.gz table into a pandas DataFrame.

    Raises:
      ValueError: a missing file or an unknown extension, naming the path.
    """
    pd = _pandas()
    if not os.path.isfile(path):
        raise ValueError(f"profile table {path} does not exist; fix config.data.profiles paths")
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    if path.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path, low_memory=False)
    raise ValueError(f"{path}: unknown table format; use .parquet, .csv or .csv.gz")


def _require(df, needed: Sequence[str], path: str, fix: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing} (it has {list(df.columns)[:8]}...); "
                         f"{fix}")


def read_label_table(path: str) -> tuple[dict[str, int], dict[str, str]]:
    """compound -> class index and compound -> MoA ("" where absent) from a label CSV.

    Args:
      path: CSV (or .csv.gz / .parquet) with columns `compound`, `label`, optional `moa`.

    Returns:
      (label_map, moa_map).

    Raises:
      ValueError: a missing column, a negative class or a compound listed twice.
    """
    df = read_table(path)
    _require(df, ("compound", "label"), path, "a label table has columns compound,label[,moa]")
    labels = df["label"].to_numpy()
    if len(df) == 0 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError(f"{path}: column label must hold class indices 0..K-1 (got "
                         f"{labels[:_SHOW].tolist()}); controls are not listed there")
    dup = df["compound"][df["compound"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: compounds {dup[:_SHOW]} are listed twice; keep one row each")
    moa = df["moa"].fillna("").astype(str) if "moa" in df.columns else [""] * len(df)
    compounds = df["compound"].astype(str).tolist()
    return dict(zip(compounds, labels.astype(int).tolist())), dict(zip(compounds, moa))


def _join(df, spec: ProfileSpec, path: str):
    """Adds source/batch (plate table) and compound (well table) where the profiles lack them."""
    cols = {**DEFAULT_COLUMNS, **dict(spec.columns)}
    _require(df, (cols["plate"], cols["well"]), path,
             "set config.data.profiles.columns.plate / .well to the table's names")
    lacking = [f for f in ("source", "batch") if cols[f] not in df.columns]
    if lacking and spec.plate_table:
        plates = read_table(spec.plate_table)
        need = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate")
        _require(plates, need, spec.plate_table, "use JUMP's plate.csv.gz")
        plates = plates[list(need)].rename(columns={"Metadata_Source": cols["source"],
                                                    "Metadata_Batch": cols["batch"],
                                                    "Metadata_Plate": cols["plate"]})
        df = df.drop(columns=[cols[f] for f in ("source", "batch") if cols[f] in df.columns])
        df = df.merge(plates, on=cols["plate"], how="left")
        absent = sorted(set(df.loc[df[cols["source"]].isna(), cols["plate"]].astype(str)))
        if absent:
            raise ValueError(f"{path}: plate(s) {absent[:_SHOW]} are absent from the plate "
                             f"table {spec.plate_table}; add their rows (source, batch, plate)")
    if cols["compound"] not in df.columns and spec.well_table:
        wells = read_table(spec.well_table)
        need = ("Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022")
        _require(wells, need, spec.well_table, "use JUMP's well.csv.gz")
        wells = wells[list(need)].rename(columns={"Metadata_Source": cols["source"],
                                                  "Metadata_Plate": cols["plate"],
                                                  "Metadata_Well": cols["well"],
                                                  "Metadata_JCP2022": cols["compound"]})
        _require(df, (cols["source"],), path, "give a plate_table or a source column")
        df = df.merge(wells, on=[cols["source"], cols["plate"], cols["well"]], how="left")
    _require(df, [cols[f] for f in DEFAULT_COLUMNS], path,
             "add the column, map it with config.data.profiles.columns.<field>, or give "
             "config.data.profiles.plate_table (source, batch) / well_table (compound)")
    return df, cols


def _str(column) -> np.ndarray:
    """A pandas column as a NumPy str array (the schema's 'U' kind; pandas gives objects)."""
    return np.asarray(column.astype(str).tolist(), dtype=str)


def _features(df, prefixes: Sequence[str], path: str) -> list[str]:
    names = [c for c in df.columns if str(c).startswith(tuple(prefixes))]
    if not names:
        raise ValueError(f"{path} has no feature column (none starts with {tuple(prefixes)}); "
                         "set config.data.profiles.feature_prefixes")
    bad = [c for c in names if not np.issubdtype(df[c].dtype, np.number)]
    if bad:
        raise ValueError(f"{path}: feature column(s) {bad[:_SHOW]} are not numeric; fix or "
                         "drop them from the table")
    return names


def _read_all(spec: ProfileSpec):
    """Reads, joins and concatenates the tables; every table must have the same features."""
    pd = _pandas()
    frames, names = [], None
    for path in spec.paths:
        df, cols = _join(read_table(path), spec, path)
        these = _features(df, spec.feature_prefixes, path)
        if names is None:
            names, first = these, path
        elif set(these) != set(names):
            missing, extra = sorted(set(names) - set(these)), sorted(set(these) - set(names))
            raise ValueError(f"{path} lacks feature column(s) {missing[:_SHOW]} of {first}"
                             f"{f' and adds {extra[:_SHOW]}' if extra else ''}; every table "
                             "must hold the same features")
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df, cols, list(names)


def _nonfinite(x: np.ndarray, names: list[str], where: np.ndarray, policy: str,
               report: dict, what: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Applies the NaN/inf policy: returns (features, names, kept rows)."""
    bad = ~np.isfinite(x)
    keep = np.ones(len(x), bool)
    if not bad.any():
        return x, names, keep
    cols = np.flatnonzero(bad.any(0))
    listed = {names[c]: int(bad[:, c].sum()) for c in cols}
    if policy == "raise":
        shown = dict(list(listed.items())[:_SHOW])
        raise ValueError(f"{what}: {len(cols)} feature(s) hold NaN/inf values (feature: count) "
                         f"{shown}; clean them, or set config.data.profiles.on_nonfinite="
                         "'drop_features' or 'drop_wells' (listed in a report beside the data)")
    if policy == "drop_features":
        report["features"].update(listed)
        kept = np.setdiff1d(np.arange(x.shape[1]), cols)
        return x[:, kept], [names[c] for c in kept], keep
    keep = ~bad.any(1)
    report["wells"] += [{"plate": p, "well": w, "reason": f"NaN/inf {what}"}
                        for p, w in where[~keep].tolist()]
    return x, names, keep


def _labels(compound: np.ndarray, label_map: Mapping[str, int], controls: Sequence[str],
            policy: str, where: np.ndarray, report: dict, path: str) -> np.ndarray:
    """Kept rows: compounds that are labelled or controls (raise or report the others)."""
    known = np.isin(compound, list(label_map) + list(controls))
    if known.all():
        return known
    unknown = sorted(set(compound[~known].tolist()))
    if policy == "raise":
        raise ValueError(f"{len(unknown)} compound(s) of the profiles are neither in the label "
                         f"table {path} nor controls: {unknown[:_SHOW]}; add them, or set "
                         "config.data.profiles.on_unlabelled='drop' (listed in the report)")
    report["unlabelled"] += [{"plate": p, "well": w, "compound": c} for (p, w), c
                             in zip(where[~known].tolist(), compound[~known].tolist())]
    return known


def load_profiles(spec: ProfileSpec) -> Profiles:
    """Reads, labels, cleans and normalizes well-level profiles.

    Args:
      spec: the ProfileSpec.

    Returns:
      Profiles (table, float32 features, names, report, report path).

    Raises:
      ValueError: naming the file and column for missing metadata or feature columns,
        the features holding NaN/inf (policy "raise"), unlabelled compounds (policy
        "raise"), plates absent from the plate table or without controls.
    """
    if spec.on_nonfinite not in NONFINITE_POLICIES or spec.on_unlabelled not in UNLABELLED_POLICIES:
        raise ValueError(f"on_nonfinite={spec.on_nonfinite!r} / on_unlabelled="
                         f"{spec.on_unlabelled!r}: use {NONFINITE_POLICIES} / {UNLABELLED_POLICIES}")
    label_map, moa_map = read_label_table(spec.label_table)
    both = sorted(set(label_map) & set(spec.control_compounds))
    if both:
        raise ValueError(f"{spec.label_table} labels control compound(s) {both}; a control "
                         "carries no class: remove it from the label table")
    df, cols, names = _read_all(spec)
    report: dict[str, Any] = {"features": {}, "wells": [], "unlabelled": []}
    where = np.stack([_str(df[cols["plate"]]), _str(df[cols["well"]])], 1)
    compound = _str(df[cols["compound"]])
    keep = _labels(compound, label_map, spec.control_compounds, spec.on_unlabelled, where,
                   report, spec.label_table)
    x = df[names].to_numpy(np.float64)[keep]
    x, names, finite = _nonfinite(x, names, where[keep], spec.on_nonfinite, report, "raw features")
    rows = np.flatnonzero(keep)[finite]
    x = x[finite]
    if len(rows) == 0:
        raise ValueError(f"no well of {list(spec.paths)} is left after the label and NaN "
                         "policies; check the label table and the features")
    plate = where[rows, 0]
    is_control = np.isin(compound[rows], list(spec.control_compounds))
    x = profile_norm.normalize_per_plate(x, plate, is_control, spec.normalization)
    x, names, _ = _nonfinite(x, names, where[rows], "raise", report, "normalized features")
    comp = compound[rows]
    table = schema.SiteTable({
        "source": _str(df[cols["source"]])[rows],
        "batch": _str(df[cols["batch"]])[rows],
        "plate": plate, "well": where[rows, 1],
        "site": np.zeros(len(rows), np.int64),
        "compound": comp,
        "moa": np.array([moa_map.get(c, "") for c in comp], dtype=str),
        "label": np.array([schema.NO_LABEL if c else label_map[k]
                           for k, c in zip(comp, is_control)], np.int64),
        "is_control": is_control,
    })
    path = write_report(report, spec)
    return Profiles(table, x.astype(np.float32), tuple(names), report, path)


def write_report(report: dict, spec: ProfileSpec) -> str:
    """Writes what was dropped as JSON beside the data; nothing dropped: no file, "".

    Returns:
      The report's path, or "".
    """
    if not (report["features"] or report["wells"] or report["unlabelled"]):
        return ""
    folder = spec.report_dir or os.path.dirname(os.path.abspath(spec.paths[0]))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, REPORT_NAME)
    with open(path, "w") as f:
        json.dump({"tables": list(spec.paths), "dropped_features": report["features"],
                   "dropped_wells": report["wells"],
                   "dropped_unlabelled_wells": report["unlabelled"]}, f, indent=1)
    log.warning("profiles: dropped %d feature(s), %d NaN/inf well(s), %d unlabelled well(s); "
                "listed in %s", len(report["features"]), len(report["wells"]),
                len(report["unlabelled"]), path)
    return path


class ProfileSource:
    """Random-access profile records as the image store serves images.

    Record i is {"image": float32 [1, 1, D], "row": i}: a profile is a 1 x 1 image with D
    channels, so `jaxadapt.data.pipeline` reads, checks and batches it unchanged.
    """

    def __init__(self, features: np.ndarray):
        features = np.asarray(features, np.float32)
        if features.ndim != 2:
            raise ValueError(f"profile features must be [N, D], got shape {features.shape}")
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.features[i][None, None], "row": int(i)}

    def __getitems__(self, rows: Sequence[int]) -> list[dict]:
        return [self[i] for i in rows]


def spec_from_config(p: Any) -> ProfileSpec:
    """The ProfileSpec of a `config.data.profiles` section (ConfigDict or mapping)."""
    return ProfileSpec(
        paths=tuple(p["paths"]), label_table=p["label_table"], plate_table=p["plate_table"],
        well_table=p["well_table"], columns={**DEFAULT_COLUMNS, **dict(p["columns"])},
        feature_prefixes=tuple(p["feature_prefixes"]),
        control_compounds=tuple(p["control_compounds"]), normalization=p["normalization"],
        on_nonfinite=p["on_nonfinite"], on_unlabelled=p["on_unlabelled"],
        report_dir=p["report_dir"])


def load_profile_world(cfg: Any) -> tuple[ProfileSource, schema.SiteTable]:
    """The study's records and table from `cfg.data.profiles` (`config.data.source="jump_profiles"`).

    Args:
      cfg: the study config.

    Returns:
      (ProfileSource, SiteTable).

    Raises:
      ValueError: as `load_profiles`, and when `cfg.model.in_channels` is not the
        number of features.
    """
    prof = load_profiles(spec_from_config(cfg.data.profiles))
    d = prof.features.shape[1]
    if cfg.model.in_channels != d:
        raise ValueError(f"config.model.in_channels={cfg.model.in_channels} but the profiles "
                         f"have {d} features; set --config.model.in_channels={d}")
    log.info("profiles: %d wells x %d features, %d plates, normalization %s", len(prof.table),
             d, len(prof.table.unique("plate")), cfg.data.profiles.normalization)
    return ProfileSource(prof.features), prof.table
