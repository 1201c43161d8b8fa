"""Checks of `config.sweep`: a tuple of dicts, each of known keys with valid values.

`validation.validate` calls `sweep_problems` with the rest of the config;
`eval.protocol.swept_settings` calls it before it runs a sweep.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections

from jaxadapt.config_rules import MISSING, UNITS, guarded, is_int, is_number
from jaxadapt.data import subsets


#: The command-line form of a sweep, quoted in every sweep error.
SWEEP_SYNTAX = """--config.sweep='({"L": 16, "N": 128},)'"""

# Swept keys -> (test, what a valid value is). L, alpha and unit are read by the protocol
# runner (how test units and batches are cut), N by cs_arm_bn.
SWEEP_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "L": (lambda v: is_int(v) and v >= 1, "an integer >= 1 (test batch = context size)"),
    "alpha": (lambda v: (isinstance(v, str) and v == "balanced") or (is_number(v) and v > 0),
              "a number > 0 or 'balanced' (Dirichlet label shift)"),
    "N": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (controls per test context)"),
    "unit": (lambda v: isinstance(v, str) and v in UNITS, f"one of {UNITS} (adaptation unit)"),
    "adapt_on": (lambda v: not guarded(subsets.check_adapt_on, v),
                 f"one of {subsets.ADAPT_ON}, 'plate:<name>' or 'batch:<name>' "
                 "(adaptation subset)"),
}


def sweep_problems(sweep: Any) -> list[str]:
    """What is wrong with `config.sweep` (a tuple of dicts of known keys); [] if nothing.

    Args:
      sweep: the value of `config.sweep` (None or () for no sweep).

    Returns:
      One message per problem, each naming the setting, the key, the value and the fix.
    """
    if sweep is None or sweep is MISSING:
        return []
    if isinstance(sweep, (str, bytes)):
        return [f"config.sweep={sweep!r} is a string; a sweep is a tuple of dicts, "
                f"e.g. {SWEEP_SYNTAX}"]
    if isinstance(sweep, (Mapping, ml_collections.ConfigDict)):
        return [f"config.sweep={sweep!r} is one dict; a sweep is a tuple of them, "
                f"e.g. {SWEEP_SYNTAX}"]
    if not isinstance(sweep, (tuple, list)):
        return [f"config.sweep={sweep!r}: a sweep is a tuple of dicts, e.g. {SWEEP_SYNTAX}"]
    if sweep and all(isinstance(s, str) and s in SWEEP_KEYS for s in sweep):
        return [f"config.sweep={tuple(sweep)!r} holds key names, not settings: a single dict on "
                f"the command line is read as its keys; wrap it in a tuple (note the trailing "
                f"comma), e.g. {SWEEP_SYNTAX}"]
    out = []
    not_dicts = [s for s in sweep if not isinstance(s, (Mapping, ml_collections.ConfigDict))]
    if not_dicts:  # one message: the same fix holds for every such setting
        out.append(f"config.sweep setting {not_dicts[0]!r} is a {type(not_dicts[0]).__name__}, "
                   f"not a dict; write each setting as a dict of {sorted(SWEEP_KEYS)}, "
                   f"e.g. {SWEEP_SYNTAX}")
    for s in sweep:
        if not isinstance(s, (Mapping, ml_collections.ConfigDict)):
            continue
        for key in s.keys():
            if key not in SWEEP_KEYS:
                known = "; ".join(f"{k}: {what}" for k, (_, what) in SWEEP_KEYS.items())
                out.append(f"config.sweep setting {dict(s)}: unknown key {key!r}; "
                           f"known keys: {known}")
            elif not SWEEP_KEYS[key][0](s[key]):
                out.append(f"config.sweep setting {dict(s)}: {key}={s[key]!r}; "
                           f"use {SWEEP_KEYS[key][1]}")
    return out

