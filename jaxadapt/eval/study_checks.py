"""Checks of what a study runs on: its seeds, methods, sources, splits, the data design.

`study_problems` checks `seeds`, `methods`, `train_sources` and `eval_splits` against
the simulated (or JUMP) sources; `data_problems` checks the simulator design and the
fields that must agree with it; `profile_problems` checks the `data.profiles` section
(through `data.profiles.section_problems`) and the MLP it needs. Part of `validation.validate`.
"""

from __future__ import annotations

from typing import Any

from jaxadapt.config_rules import MISSING, example, get, guarded, is_int, lacks
from jaxadapt.data import schema, splits
from jaxadapt.data import profiles, sim as sim_wing
from jaxadapt.eval import jump_checks
from jaxadapt.methods import registry


def _names(cfg: Any, key: str, allowed: Any, what: str, rule: str = "",
           adjective: str = "") -> list[str]:
    """A non-empty tuple of distinct values, each in `allowed` (a container or a test)."""
    v = get(cfg, key)
    syntax = f"pass a tuple, e.g. --config.{key}=\"{example(key)}\""
    if v is MISSING:
        return [lacks(key)]
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)) or not v:
        return [f"config.{key}={v!r}: must be a non-empty tuple; {syntax}"]
    ok = allowed if callable(allowed) else (lambda x: isinstance(x, str) and x in allowed)
    bad = [x for x in v if not ok(x)]
    if bad:
        known = f"; {rule}" if rule else f"; use some of {tuple(allowed)}"
        # `--config.methods=erm,tent` arrives as ('erm,tent',): show the tuple syntax.
        hint = f"; {syntax}" if any(isinstance(x, str) and "," in x for x in bad) else ""
        adjective = adjective or ("invalid" if callable(allowed) else "unknown")
        listed = ", ".join(repr(x) for x in bad)
        return [f"config.{key}={tuple(v)!r}: {adjective} {what} {listed}{known}{hint}"]
    if len(set(v)) != len(v):
        return [f"config.{key}={tuple(v)!r} lists a value twice (it would be scored twice); "
                "list each once"]
    return []


def study_problems(cfg: Any) -> list[str]:
    """seeds, methods, train_sources, eval_splits and how they fit the simulated design.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    if _profiles(cfg):  # the sources are known once the tables are read (worlds.load_world)
        out = _names(cfg, "seeds", lambda s: is_int(s) and s >= 0, "seed", "use integers >= 0")
        out += _names(cfg, "methods", registry.method_names(), "method")
        out += _names(cfg, "train_sources", lambda s: isinstance(s, str) and bool(s), "source",
                      "use the profiles' Metadata_Source names")
        return out + _names(cfg, "eval_splits", _is_split, "split",
                            f"use some of {splits.SPLITS} or source pairs 'source:<a>-><b>'",
                            "unknown")
    key, sources = _source_names(cfg)
    out = _names(cfg, "seeds", lambda s: is_int(s) and s >= 0, "seed", "use integers >= 0")
    out += _names(cfg, "methods", registry.method_names(), "method")
    if sources is None:  # real data, no source subset: the names are known once it is read
        out += _names(cfg, "train_sources", lambda s: isinstance(s, str) and s, "source",
                      "use Metadata_Source names, e.g. 'source_3'")
    else:
        out += _names(cfg, "train_sources", sources, "source",
                      f"use some of config.{key}={sources!r}")
    out += _names(cfg, "eval_splits", _is_split, "split",
                  f"use some of {splits.SPLITS} or source pairs 'source:<a>-><b>'", "unknown")
    if sources is None:
        return out
    out += _pair_problems(cfg, sources, key)
    evals, trains = get(cfg, "eval_splits"), get(cfg, "train_sources")
    if isinstance(evals, (tuple, list)) and "new_source" in evals:
        for src in trains if isinstance(trains, (tuple, list)) else ():
            if src in sources and not set(sources) - {src}:
                out.append(f"config.eval_splits={tuple(evals)!r} scores new_source, but "
                           f"config.{key}={sources!r} has no source besides the "
                           f"training source {src!r}; add one (e.g. 'source_8') or drop "
                           "new_source from config.eval_splits")
    return out


def _source_names(cfg: Any) -> tuple[str, tuple | None]:
    """(config key, the study's source names), or (key, None) where unknown before reading."""
    key = "data.jump.sources" if get(cfg, "data.source") == "jump" else "data.sim.sources"
    sources = get(cfg, key)
    sources = tuple(sources) if isinstance(sources, (tuple, list)) else ()
    if key == "data.jump.sources" and not sources:
        return key, None
    return key, sources


def _is_split(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    try:
        return name in splits.SPLITS or splits.parse_pair(name) is not None
    except ValueError:
        return False


def _pair_problems(cfg: Any, sources: tuple, key: str = "data.sim.sources") -> list[str]:
    """Source pairs in eval_splits: both names simulated, the first one trained on."""
    evals, trains = get(cfg, "eval_splits"), get(cfg, "train_sources")
    trains = tuple(trains) if isinstance(trains, (tuple, list)) else ()
    out = []
    for name in evals if isinstance(evals, (tuple, list)) else ():
        pair = splits.parse_pair(name) if _is_split(name) else None
        if pair is None:
            continue
        unknown = [s for s in pair if s not in sources]
        if unknown:
            out.append(f"config.eval_splits: {name!r} names unknown source(s) {unknown}; "
                       f"valid sources: config.{key}={sources!r}")
        elif pair[0] not in trains:
            out.append(f"config.eval_splits: {name!r} scores models trained on {pair[0]!r}, "
                       f"which config.train_sources={trains!r} does not train; add it there "
                       "or drop the pair")
    return out


def data_problems(cfg: Any) -> list[str]:
    """The simulator design, and the fields that must agree with it.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    sim = get(cfg, "data.sim")
    if sim is MISSING:
        return [lacks("data.sim")]
    out = [m if not m.startswith("sim ") else "config.data.sim." + m[4:]  # "sim <field>=..."
           for m in guarded(sim_wing.check_config, sim)]
    if _profiles(cfg):
        return out + guarded(splits.in_domain_fraction, cfg.splits)
    if get(cfg, "model.name") == "mlp":
        out.append("config.model.name='mlp' takes CellProfiler profiles, not images; set "
                   "--config.data.source=jump_profiles (and data.profiles), or use a resnet/vit")
    if get(cfg, "data.source") == "jump":  # the simulator's design is not what runs
        ok = not jump_checks.key_problems(cfg)  # their own messages come from _CHECKS
        return out + (jump_checks.jump_problems(cfg) if ok else [])
    crop, size = get(cfg, "data.crop_size"), get(sim, "image_size")
    if is_int(crop) and is_int(size) and crop > size:
        out.append(f"config.data.crop_size={crop} exceeds config.data.sim.image_size={size}; "
                   f"set crop_size <= {size} or raise image_size")
    preset = get(sim, "preset")
    classes = sim_wing.num_classes(preset) if preset in sim_wing.PRESETS else 1
    channels = len(schema.CHANNELS)
    k = get(cfg, "model.num_classes")
    if is_int(k) and k < classes:
        out.append(f"config.model.num_classes={k}: the {get(sim, 'preset')} simulator has "
                   f"{classes} classes; set --config.model.num_classes={classes}")
    c = get(cfg, "model.in_channels")
    if is_int(c) and c != channels:
        out.append(f"config.model.in_channels={c}: the simulator renders {channels} channels "
                   f"{schema.CHANNELS}; set --config.model.in_channels={channels}")
    trains, n_batches = get(cfg, "train_sources"), get(sim, "batches_per_source")
    for src in trains if isinstance(trains, (tuple, list)) and is_int(n_batches) else ():
        out += guarded(splits.batch_counts, cfg.splits, n_batches, src)
    out += guarded(splits.in_domain_fraction, cfg.splits)
    return out


def _profiles(cfg: Any) -> bool:
    return get(cfg, "data.source") == "jump_profiles"


def profile_problems(cfg: Any) -> list[str]:
    """The `data.profiles` section (`profiles_config`), and the MLP on 1 x 1 inputs it needs.

    Args:
      cfg: the study config.

    Returns:
      One message per problem, naming the key, the value and the fix.
    """
    section = get(cfg, "data.profiles")
    if section is MISSING:
        return [lacks("data.profiles")]
    out = profiles.section_problems(section, reads_profiles=_profiles(cfg))
    if not _profiles(cfg):
        return out
    if get(cfg, "model.name") != "mlp":
        out.append(f"config.model.name={get(cfg, 'model.name')!r}: profiles are feature "
                   "vectors; set --config.model.name=mlp")
    if get(cfg, "data.crop_size") != 1:
        out.append(f"config.data.crop_size={get(cfg, 'data.crop_size')!r}: a profile is a "
                   "1 x 1 record; set --config.data.crop_size=1")
    return out

