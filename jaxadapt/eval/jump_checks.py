"""Checks of `config.data.source` and `config.data.jump` (part of `validation.validate`).

`key_problems` checks the type and range of every `data.jump` key whatever the source
(a bad value fails even before it is used); `jump_problems` checks, for
`data.source = "jump"`, that the paths exist and that the model fits the images. What
needs the tables read (source names, class count) is checked by the loader
(`jaxadapt.data.worlds`), with the same kind of message.
"""

from __future__ import annotations

import os
from typing import Any

from jaxadapt.config_rules import MISSING, get, is_int, is_number, lacks
from jaxadapt.data import fileio, worlds


_STRINGS = ("root", "remote_prefix", "well_csv", "plate_csv", "labels", "beam_runner")
_NAME_TUPLES = ("load_data", "sources", "batches", "plate_types", "compounds",  # may be empty
                "beam_options")
_NON_EMPTY_TUPLES = ("controls", "channels")
_INTEGERS = {"image_size": 0, "downsample": 1, "stats_sample": 0, "num_workers": 1,
             "shard_sites": 1}
_BOOLS = ("drop_unlabelled", "check_headers")
#: The builder's choices (`jump_images.build_jump_store`; illum through `worlds.ILLUM`).
_CHOICES = {"engine": ("local", "beam"), "on_bad_site": ("raise", "skip"),
            "illum": tuple(worlds.ILLUM)}
_HOW = {
    "image_size": "0 keeps each site's size after downsampling",
    "stats_sample": "0 reads every training image",
}


def _tuple_problem(key: str, value: Any, non_empty: bool) -> str | None:
    ok = (isinstance(value, (tuple, list)) and all(isinstance(x, str) and x for x in value)
          and len(set(value)) == len(value) and (value or not non_empty))
    if ok:
        return None
    what = "a non-empty tuple" if non_empty else "a tuple (empty: all)"
    return (f"config.{key}={value!r}: must be {what} of distinct non-empty strings; pass e.g. "
            f"--config.{key}=\"('a', 'b')\" (note the quotes; one value needs a trailing comma)")


def key_problems(cfg: Any) -> list[str]:
    """Types and ranges of every `config.data.jump` key (checked for any data source).

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    if get(cfg, "data.jump") is MISSING:
        return [lacks("data.jump")]
    out = []
    for name in _STRINGS + _NAME_TUPLES + _NON_EMPTY_TUPLES + tuple(_INTEGERS) + _BOOLS + tuple(
            _CHOICES) + ("upper_percentile", "lower_percentile", "progress_every_s"):
        if get(cfg, f"data.jump.{name}") is MISSING:
            out.append(lacks(f"data.jump.{name}"))
    if out:
        return out
    j = cfg.data.jump
    for name in _STRINGS:
        if not isinstance(j[name], str):
            out.append(f"config.data.jump.{name}={j[name]!r}: must be a string (a path)")
    for name in _NAME_TUPLES + _NON_EMPTY_TUPLES:
        problem = _tuple_problem(f"data.jump.{name}", j[name], name in _NON_EMPTY_TUPLES)
        out += [problem] if problem else []
    for name, lo in _INTEGERS.items():
        if not (is_int(j[name]) and j[name] >= lo):
            how = f" ({_HOW[name]})" if name in _HOW else ""
            out.append(f"config.data.jump.{name}={j[name]!r}: must be an integer >= {lo}{how}")
    for name in _BOOLS:
        if not isinstance(j[name], bool):
            out.append(f"config.data.jump.{name}={j[name]!r}: must be True or False")
    for name, choices in _CHOICES.items():
        if not (isinstance(j[name], str) and j[name] in choices):
            out.append(f"config.data.jump.{name}={j[name]!r}: use one of {choices}")
    every = j.progress_every_s
    if not (is_number(every) and every > 0):
        out.append(f"config.data.jump.progress_every_s={j.progress_every_s!r}: must be a "
                   "number > 0 (seconds between build progress lines)")
    if not out and j.on_bad_site == "skip" and not j.check_headers:
        out.append("config.data.jump.on_bad_site='skip' needs config.data.jump.check_headers="
                   "True: bad files are found by the header scan before any record is written")
    lo, hi = j.lower_percentile, j.upper_percentile
    for name, value, ok, rule in (
            ("upper_percentile", hi, lambda x: 0 < x <= 100, "a number in (0, 100] (the paper "
             "clips at 99.99)"),
            ("lower_percentile", lo, lambda x: 0 <= x < 100, "a number in [0, 100) (0: each "
             "channel's minimum)")):
        if not (is_number(value) and ok(value)):
            out.append(f"config.data.jump.{name}={value!r}: must be {rule}")
    if not out and lo >= hi:
        out.append(f"config.data.jump.lower_percentile={lo!r}: must be below "
                   f"config.data.jump.upper_percentile={hi!r}")
    return out


def _path_problem(key: str, root: str, path: str, required: bool) -> str | None:
    if not path:
        return (f"config.{key} is empty; config.data.source='jump' needs it ({_WHAT[key]})"
                if required else None)
    if key == "data.jump.labels" and path.startswith(worlds.BUILTIN):
        if path[len(worlds.BUILTIN):] in worlds.BUILTIN_LABELS:
            return None
        return (f"config.{key}={path!r}: no such built-in label table; use one of "
                f"{[worlds.BUILTIN + n for n in worlds.BUILTIN_LABELS]} or a path")
    full = worlds.under_root(root, path)
    if fileio.is_url(full):  # remote: the loader reads it (a network call per check)
        return None
    if not fileio.expand(full):
        return (f"config.{key}={path!r}: no such file ({full}); give {_WHAT[key]}, an "
                "absolute path or one under config.data.jump.root")
    return None


_WHAT = {
    "data.jump.well_csv": "JUMP's well.csv.gz: Metadata_Source, Metadata_Plate, "
                          "Metadata_Well, Metadata_JCP2022",
    "data.jump.labels": "a table of Metadata_JCP2022 and label (class 0..K-1) or moa, or "
                        "builtin:jump_poscon / builtin:jump_target2",
    "data.jump.plate_csv": "JUMP's plate.csv.gz, read to select config.data.jump.plate_types",
    "data.jump.load_data": "per-plate load_data tables (.csv, .csv.gz, .parquet)",
}


def jump_problems(cfg: Any) -> list[str]:
    """For `data.source = "jump"`: the paths exist and the model fits the images.

    Args:
      cfg: the study config (its `data.jump` keys already of the right types).

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    j = cfg.data.jump
    root = os.path.expanduser(j.root) if isinstance(j.root, str) else ""
    if not root:
        return ["config.data.source='jump' needs config.data.jump.root: set "
                "--config.data.jump.root=/path/to/cellpainting-gallery (the local copy, or an "
                "fsspec URL such as s3://cellpainting-gallery)"]
    if not fileio.is_url(root) and not os.path.isdir(root):
        return [f"config.data.jump.root={j.root!r} is not a directory; point it at the local "
                "copy of the Cell Painting Gallery"]
    out = []
    if not j.load_data:
        out.append(f"config.data.jump.load_data=(): config.data.source='jump' needs "
                   f"{_WHAT['data.jump.load_data']}, e.g. --config.data.jump.load_data="
                   "\"('cpg0016-jump/source_3/workspace/load_data_csv/*/*/load_data.csv.gz',)\"")
    for pattern in j.load_data:
        problem = _path_problem("data.jump.load_data", root, pattern, True)
        out += [problem] if problem else []
    for name, required in (("well_csv", True), ("labels", True),
                           ("plate_csv", bool(j.plate_types))):
        problem = _path_problem(f"data.jump.{name}", root, j[name], required)
        out += [problem] if problem else []
    c = get(cfg, "model.in_channels")
    if is_int(c) and c != len(j.channels):
        out.append(f"config.model.in_channels={c}: config.data.jump.channels={tuple(j.channels)!r}"
                   f" loads {len(j.channels)}; set --config.model.in_channels={len(j.channels)}")
    crop = get(cfg, "data.crop_size")
    if j.image_size and is_int(crop) and crop > j.image_size:
        out.append(f"config.data.crop_size={crop} exceeds config.data.jump.image_size="
                   f"{j.image_size}; set crop_size <= {j.image_size} or raise image_size")
    return out
