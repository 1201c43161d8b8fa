"""Command-line plumbing for experiments/run.py: config flags and errors as one line.

Kept in the library so that the entry point stays a few lines and so that the
config-override checks and the error reporting are tested.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import Callable, Sequence, TypeVar

import ml_collections
from absl import flags

from jaxadapt.config_rules import MISSING, get
from jaxadapt.eval.sweep_checks import SWEEP_SYNTAX
from jaxadapt.train.supervised import Interrupted

T = TypeVar("T")

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


#: Exit status of a run that fails on input the user can fix (config, data, flags).
EXIT_ERROR = 2
#: Exit status of a run stopped on request (`config.train.stop_after_epochs`); re-run it.
EXIT_STOPPED = 3
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          tuple: "a tuple"}
_FLAG_ERROR = re.compile(r"^flag --config\.([A-Za-z0-9_.]+)=")


def wants_traceback(argv: Sequence[str]) -> bool:
    """Whether argv asks for full tracebacks (`--traceback`), read before flags are parsed."""
    return any(a in ("--traceback", "--traceback=true", "--traceback=True", "--traceback=1")
               for a in argv)


def error_lines(err: BaseException) -> list[str]:
    """`error: <problem>` for each problem of `err` (a ConfigError lists several)."""
    return [f"error: {p}" for p in getattr(err, "problems", None) or [str(err)]]


def report_errors(fn: Callable[[], T], *, traceback: bool = False) -> T:
    """Runs `fn`; a user's error ends the process with one line each, not a traceback.

    Only ValueError (bad config or data: every such message names the field, the value
    and the fix) and `Interrupted` (a requested stop) are reported so; any other
    exception is a bug and keeps its traceback.

    Args:
      fn: the work, e.g. `lambda: study.main(cfg)`.
      traceback: re-raise instead (the `--traceback` flag), to see where it failed.

    Returns:
      What `fn` returns.
    """
    try:
        return fn()
    except Interrupted as err:
        if traceback:
            raise
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except ValueError as err:
        if traceback:
            raise
        print("\n".join(error_lines(err)), file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _flag_fix(err: flags.Error, config: ml_collections.ConfigDict | None) -> str:
    """absl's message for an unparsable `--config.<key>=`, plus the type and an example."""
    match = _FLAG_ERROR.match(str(err))
    default = get(config, match.group(1)) if match and config is not None else None
    if default is None or default is MISSING:
        return str(err)
    key = match.group(1)
    kind = _KINDS.get(type(default), f"a {type(default).__name__}")
    if key == "sweep":
        kind, example = "a tuple of dicts", SWEEP_SYNTAX
    elif isinstance(default, tuple):
        example = f"--config.{key}=\"{default!r}\""
    else:
        example = f"--config.{key}={default!r}"
    return f"{err}; config.{key} is {kind}, e.g. {example}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser that checks config overrides first and reports errors cleanly.

    Pass as `app.run(main, flags_parser=parse_flags)`. An error is one line on stderr
    and exit status 2; `--traceback` in argv re-raises it instead.
    """
    spec = config_spec_from_argv(argv)
    config = None
    try:
        if spec is not None:
            config = load_config_file(spec)
            check_overrides(argv, config)
        return flags.FLAGS(argv)
    except (ValueError, flags.Error) as e:
        if wants_traceback(argv):
            raise
        message = _flag_fix(e, config) if isinstance(e, flags.Error) else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
