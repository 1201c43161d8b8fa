"""The shared rules of config checking: reading a key, wording a problem.

`get` reads a dotted key (or `MISSING`); `bad` and `lacks` word a problem the same way
everywhere (the key, its value, the fix: the default as an example); `is_int`,
`is_number` and `guarded` are the tests the section checks share. The study's section
checks (`jaxadapt.eval`) and each method family's own checks (`jaxadapt.methods.*.checks`)
build on this module.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxadapt import config as defaults


class _Missing:
    """The value of a key a config lacks; shown by name in messages, not by address."""

    def __repr__(self) -> str:
        return "<missing>"


#: What `get` returns for a key the config lacks.
MISSING = _Missing()
#: The adaptation units (`eval.unit`, a sweep's `unit`).
UNITS = ("plate", "batch", "source")

def get(cfg: Any, key: str) -> Any:
    """The value at dotted `key` of `cfg`, or `MISSING`."""
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError, IndexError):
            return MISSING
    return node


@functools.lru_cache(maxsize=1)
def _defaults() -> ml_collections.ConfigDict:
    return defaults.get_defaults()


def example(key: str) -> str:
    """A valid command-line value for `key`: its default."""
    value = get(_defaults(), key)
    return repr(value) if isinstance(value, (str, tuple)) else str(value)


def bad(key: str, value: Any, rule: str) -> str:
    """The message for `key` holding `value`, against `rule`, with its default as the fix."""
    return f"config.{key}={value!r}: {rule}; set e.g. --config.{key}={example(key)}"


def lacks(key: str) -> str:
    """The message for a config without `key`."""
    return (f"config lacks {key}; start from jaxadapt.config.get_defaults(), which sets "
            "every field a study reads")


def is_int(x: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x: Any) -> bool:
    """A finite integer or float (Python or NumPy), not a bool."""
    return (is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(float(x))


def guarded(check: Callable, *args, **kwargs) -> list[str]:
    """`check(*args, **kwargs)`'s ValueError as a one-message list; [] if it passes."""
    try:
        check(*args, **kwargs)
    except ValueError as err:
        return [str(err)]
    return []
