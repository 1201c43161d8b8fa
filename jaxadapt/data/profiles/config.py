"""Config-time checks of the `config.data.profiles` section (`profiles.spec_from_config` reads it).

`jaxadapt.eval.validation` calls `section_problems` (every config, whatever its data
source; the files only when the study reads profiles), so a bad path or column name
fails before anything is trained.
"""

from __future__ import annotations

import os
from typing import Any

from jaxadapt.data.profiles.tables import DEFAULT_COLUMNS


#: Keys holding one path, "" meaning none.
PATH_KEYS = ("label_table", "plate_table", "well_table", "report_dir")
#: Keys holding a non-empty tuple of non-empty strings.
NAME_KEYS = ("feature_prefixes", "control_compounds")
_WHERE = "config.data.profiles"


def _names(p: Any, key: str) -> list[str]:
    v = p.get(key)
    if (isinstance(v, (tuple, list)) and v and all(isinstance(x, str) and x for x in v)
            and len(set(v)) == len(v)):
        return []
    return [f"{_WHERE}.{key}={v!r}: must be a non-empty tuple of distinct non-empty strings, "
            f"e.g. --{_WHERE[7:]}.{key}=\"('Cells_', 'Nuclei_')\""]


def _columns(p: Any) -> list[str]:
    columns = p.get("columns")
    if columns is None:
        return [f"{_WHERE} lacks columns; start from jaxadapt.config.get_defaults()"]
    out = [f"{_WHERE}.columns.{f}={columns.get(f)!r}: must name the table's column, e.g. "
           f"--{_WHERE[7:]}.columns.{f}={DEFAULT_COLUMNS[f]}"
           for f in DEFAULT_COLUMNS if not (isinstance(columns.get(f), str) and columns.get(f))]
    extra = sorted(set(columns.keys()) - set(DEFAULT_COLUMNS))
    if extra:
        out.append(f"{_WHERE}.columns has unknown field(s) {extra}; use {list(DEFAULT_COLUMNS)}")
    return out


def _files(p: Any) -> list[str]:
    """What a study reading profiles needs: tables and a label table that exist."""
    out = []
    if not p.get("paths"):
        out.append("config.data.source='jump_profiles' needs profile tables; set "
                   f"--{_WHERE[7:]}.paths=\"('plate1.parquet',)\"")
    if not p.get("label_table"):
        out.append("config.data.source='jump_profiles' needs a label table; set "
                   f"--{_WHERE[7:]}.label_table=labels.csv (columns compound,label[,moa])")
    for key in ("paths", "label_table", "plate_table", "well_table"):
        v = p.get(key)
        files = list(v) if isinstance(v, (tuple, list)) else [v] if v else []
        missing = [f for f in files if isinstance(f, str) and not os.path.isfile(f)]
        if missing:
            out.append(f"{_WHERE}.{key}: file(s) {missing} do not exist; fix the path(s)")
    return out


def section_problems(p: Any, *, reads_profiles: bool) -> list[str]:
    """Every problem of a `config.data.profiles` section, each naming key, value and fix.

    Args:
      p: the section (ConfigDict or mapping).
      reads_profiles: the study reads them (`config.data.source="jump_profiles"`): then
        tables and label table must be given and exist.

    Returns:
      The messages; [] when the section is fine. (Choice fields such as
      `normalization` are checked with the validator's other choices.)
    """
    out = [f"{_WHERE}.{k}={p.get(k)!r}: must be a string (a path, or '' for none)"
           for k in PATH_KEYS if not isinstance(p.get(k), str)]
    paths = p.get("paths")
    if not (isinstance(paths, (tuple, list)) and all(isinstance(x, str) and x for x in paths)):
        out.append(f"{_WHERE}.paths={paths!r}: must be a tuple of file paths, e.g. "
                   f"--{_WHERE[7:]}.paths=\"('a.parquet', 'b.csv.gz')\"")
    out += [m for k in NAME_KEYS for m in _names(p, k)] + _columns(p)
    return out + (_files(p) if reads_profiles and not out else [])
