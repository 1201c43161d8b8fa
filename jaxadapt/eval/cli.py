"""Command-line plumbing for experiments/run.py: config flags with helpful errors, devices.

Kept in the library so that the entry point stays a few lines and so that the
config-override checks are tested.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import Sequence

import ml_collections
from absl import flags

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` the way config_flags does: `get_config(arg)` or `get_config()`.

    Args:
      spec: config file path, optionally followed by `:arg` (e.g. `configs/erm.py:gpu`).

    Returns:
      The (unlocked) ConfigDict.

    Raises:
      ValueError: if the file does not exist or defines no get_config.
    """
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_jaxadapt_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--config {spec!r}: no such config file; pass e.g. configs/quickstart.py")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except FileNotFoundError as e:
        raise ValueError(f"--config {spec!r}: no such config file; pass e.g. configs/quickstart.py") from e
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path!r} defines no get_config(); a config file must")
    return module.get_config(arg) if arg else module.get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of `config` as a dotted path, e.g. `train.learning_rate`."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def check_overrides(argv: Sequence[str], config: ml_collections.ConfigDict) -> None:
    """Fails with the list of valid keys when a `--config.<key>=` override names no key.

    ml_collections would raise an AttributeError deep in flag parsing; a user deserves
    the key they mistyped and the keys that exist.

    Args:
      argv: the command line.
      config: the loaded config.

    Raises:
      ValueError: naming the unknown key, close matches and all valid keys.
    """
    valid = flat_keys(config)
    prefixes = {k.rsplit(".", i)[0] for k in valid for i in range(k.count(".") + 1)}
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match and match.group(1) not in prefixes:
            import difflib

            key = match.group(1)
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"--config.{key}: no such config key.{hint} Valid keys:\n  " + "\n  ".join(valid)
            )


def config_spec_from_argv(argv: Sequence[str]) -> str | None:
    """The value of `--config` in argv (`--config x` or `--config=x`), or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser that checks config overrides first and reports errors cleanly.

    Pass as `app.run(main, flags_parser=parse_flags)`.
    """
    spec = config_spec_from_argv(argv)
    try:
        if spec is not None:
            check_overrides(argv, load_config_file(spec))
        return flags.FLAGS(argv)
    except (ValueError, flags.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
