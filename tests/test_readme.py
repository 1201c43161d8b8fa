"""The README and docs/ are executable documentation: their commands and example must stay true.

Checked here, without training anything: the README's two opening commands (and that CI
runs the second), that its ```python example runs, that every command in README.md and
docs/*.md names an existing script, config file and variant and only config keys that
exist, that local links, repository paths and `jaxadapt.*` names resolve, and that the
README's headline results block is exactly what experiments/update_readme.py writes.
"""

import functools
import glob
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_SCRIPT = re.compile(r"\bpython3?\s+(experiments/[\w/]+\.py)")
_CONFIG = re.compile(r"--config(?:\s+|=)(configs/\w+\.py)(?::(\w+))?")
_CONFIG_MENTION = re.compile(r"\bconfigs/(\w+)\.py(?::(\w+))?")
# `--config.<key>=...` or a bare `--config.<key>`; not `--config.<key>.<placeholder>`.
_OVERRIDE = re.compile(r"--config\.([A-Za-z0-9_.]*[A-Za-z0-9_])(?![A-Za-z0-9_.<])(=?)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"^((?:jaxadapt|configs|experiments|tests|docs)/[\w./-]*)(.?)")
_MODULE_NAME = re.compile(r"\bjaxadapt(?:\.[A-Za-z_]\w*)+")


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _readme() -> str:
    return _read("README.md")


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1).splitlines()
    assert len(first_block) == 2, "the README must open with exactly the two commands"
    assert "configs/quickstart.py" in first_block[0] and "pytest" in first_block[1]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert first_block[1] in ci_lines


def test_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", _readme(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- Commands -----------------------------------------------------------------------------

def _scopes(text: str) -> list[str]:
    """The units a command's flags belong to: a fenced shell block (all its lines: flags may
    sit in a bash array), a table row, or a paragraph. Python blocks are not commands."""
    scopes = []
    for lang, body in _FENCE.findall(text):
        if lang != "python":
            scopes.append(body.replace("\\\n", " "))
    prose = _FENCE.sub("", text)
    for paragraph in re.split(r"\n\s*\n", prose):
        rows = [line for line in paragraph.splitlines() if line.lstrip().startswith("|")]
        scopes.extend(rows)
        rest = "\n".join(line for line in paragraph.splitlines() if not line.lstrip().startswith("|"))
        if rest.strip():
            scopes.append(rest)
    return scopes


@functools.lru_cache(maxsize=None)
def _config_keys(path: str, variant: str) -> tuple[frozenset, frozenset]:
    """(leaf keys, leaf keys and their prefixes) of config file `path` loaded with `variant`."""
    from jaxadapt.eval import cli

    spec = f"{os.path.join(ROOT, path)}:{variant}" if variant else os.path.join(ROOT, path)
    leaves = frozenset(cli.flat_keys(cli.load_config_file(spec)))
    prefixes = frozenset(k.rsplit(".", i)[0] for k in leaves for i in range(k.count(".") + 1))
    return leaves, prefixes


def _variant_problem(path: str, variant: str) -> str | None:
    """Why `path:variant` is not a config a command can load, or None."""
    from jaxadapt import config as defaults
    from jaxadapt.eval import cli

    if not os.path.isfile(os.path.join(ROOT, path)):
        return f"{path}: no such config file"
    if not variant:
        return None
    spec = importlib.util.spec_from_file_location("_doc_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not inspect.signature(module.get_config).parameters:
        return f"{path}:{variant}: this config's get_config() takes no variant"
    if variant not in defaults.VARIANTS:
        return f"{path}:{variant}: unknown variant; configs define {defaults.VARIANTS}"
    try:
        cli.load_config_file(f"{os.path.join(ROOT, path)}:{variant}")
    except Exception as e:  # noqa: BLE001 - reported as the failure
        return f"{path}:{variant}: get_config({variant!r}) fails: {e}"
    return None


def _all_configs() -> list[tuple[str, str]]:
    return [(os.path.relpath(p, ROOT), "") for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))]


def _command_problems(doc: str) -> list[str]:
    problems = []
    for scope in _scopes(_read(doc)):
        for script in _SCRIPT.findall(scope):
            if not os.path.isfile(os.path.join(ROOT, script)):
                problems.append(f"{doc}: `python {script}`: no such script")
        commands = _CONFIG.findall(scope)
        for path, variant in commands:
            problem = _variant_problem(path, variant)
            if problem:
                problems.append(f"{doc}: --config {problem}")
        overrides = _OVERRIDE.findall(scope)
        if not overrides:
            continue
        # The configs these flags go to: the scope's `--config` commands, else the config
        # files it names, else (a flag on its own in prose) any study config.
        named = [(f"configs/{n}.py", v) for n, v in _CONFIG_MENTION.findall(scope)]
        targets = [t for t in dict.fromkeys(commands or named) if not _variant_problem(*t)]
        for key, assigned in overrides:
            kind = 0 if assigned else 1  # an assignment needs a leaf; a mention may be a section
            if commands or named:
                missing = [f"{p}{':' + v if v else ''}" for p, v in targets
                           if key not in _config_keys(p, v)[kind]]
                if missing:
                    problems.append(f"{doc}: --config.{key} names no key of {', '.join(missing)}")
            elif not any(key in _config_keys(*t)[kind] for t in _all_configs()):
                problems.append(f"{doc}: --config.{key} names no key of any config in configs/")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_commands_name_existing_scripts_configs_and_keys(doc):
    """Every `python experiments/<script>.py` exists, every `--config configs/<x>.py[:variant]`
    loads (a variant only where get_config takes one, and one of jaxadapt.config.VARIANTS),
    and every `--config.<key>` names a key of the config it is passed with."""
    assert not _command_problems(doc), "\n".join(_command_problems(doc))


def test_the_command_check_catches_mistakes(tmp_path, monkeypatch):
    bad = tmp_path / "bad.md"
    bad.write_text("`python experiments/nope.py --config configs/quickstart.py:tpu`\n\n"
                   "```bash\npython experiments/run.py --config configs/erm.py --config.train.num_epoch=3\n```\n"
                   "| x | `python experiments/run.py --config configs/missing.py` |\n")
    monkeypatch.setattr(sys.modules[__name__], "_read", lambda name: bad.read_text())
    problems = "\n".join(_command_problems("bad.md"))
    assert "experiments/nope.py" in problems
    assert "quickstart.py:tpu" in problems
    assert "--config.train.num_epoch names no key of configs/erm.py" in problems
    assert "configs/missing.py: no such config file" in problems


# --- Links, paths and names -----------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS)
def test_local_links_resolve(doc):
    base = os.path.dirname(os.path.join(ROOT, doc))
    broken = []
    for target in _LINK.findall(_read(doc)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not os.path.exists(os.path.normpath(os.path.join(base, path))):
            broken.append(target)
    assert not broken, f"{doc}: links to missing files: {broken}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_repository_paths_exist(doc):
    """A code span that starts with a repository folder names a file or folder that exists."""
    missing = []
    for span in re.findall(r"`([^`\n]+)`", _FENCE.sub("", _read(doc))):
        match = _REPO_PATH.match(span)
        if not match or match.group(2) in ("<", "*") or "*" in match.group(1):
            continue
        path = match.group(1).rstrip(".,;:")
        if not os.path.exists(os.path.join(ROOT, path)):
            missing.append(path)
    assert not missing, f"{doc}: names paths that do not exist: {missing}"


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_named_jaxadapt_modules_and_functions_exist(doc):
    names = sorted(set(_MODULE_NAME.findall(_read(doc))))
    bad = [n for n in names if not _resolves(n)]
    assert not bad, f"{doc}: names that no longer exist: {bad}"


# --- The generated results blocks --------------------------------------------------------------

def _update_readme():
    spec = importlib.util.spec_from_file_location(
        "_update_readme", os.path.join(ROOT, "experiments", "update_readme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results_files_of_block(block: str, tmp_path) -> list[str]:
    """results.json files holding exactly the tables of a generated block (read back from it)."""
    cell = re.compile(r"^(-?\d+\.\d{3}) ± (\d+\.\d{3}) \((\d+)\)$")
    paths = []
    for i, table in enumerate(re.split(r"^#+ ", block, flags=re.M)[1:]):
        lines = table.strip().splitlines()
        study = lines[0].strip()
        header = [h.strip() for h in lines[2].strip("|").split("|")]
        has_setting = header[1] == "setting"
        rows = []
        for line in lines[4:]:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            setting = {}
            if has_setting and cells[1] != "-":
                setting = dict(kv.split("=", 1) for kv in cells[1].split(", "))
            for head, value in zip(header[1 + has_setting:], cells[1 + has_setting:]):
                if value:
                    split, metric = head.split(" ", 1)
                    mean, std, n = cell.match(value).groups()
                    rows.append({"method": cells[0], "split": split, "setting": setting,
                                 "metric": metric, "mean": float(mean), "std": float(std), "n": int(n)})
        seeds, sources = re.search(r"seeds (\[.*?\]), training source\(s\) (\[.*?\])\._", table).groups()
        path = tmp_path / f"{i}_{study}.json"
        path.write_text(json.dumps({"study": study, "rows": rows, "config": {
            "seeds": json.loads(seeds), "train_sources": json.loads(sources.replace("'", '"'))}}))
        paths.append(str(path))
    return paths


def test_readme_headline_block_is_what_update_readme_writes(tmp_path):
    updater = _update_readme()
    text = _readme()
    block = text[text.index(updater.START) + len(updater.START):text.index(updater.END)]
    paths = _results_files_of_block(block, tmp_path)
    assert len(paths) >= 1
    assert updater.replace_block(text, paths, "README.md") == text


def test_update_readme_fails_clearly_without_markers(tmp_path):
    updater = _update_readme()
    with pytest.raises(SystemExit, match=r"notes\.md lacks the markers <!-- results:start -->"):
        updater.replace_block("# Notes\n\nno block here\n", [], "notes.md")
    with pytest.raises(SystemExit, match="in that order"):
        updater.replace_block(f"{updater.END}\n{updater.START}\n", [], "notes.md")


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_generated_blocks_have_their_markers(doc):
    updater = _update_readme()
    text = _read(doc)
    assert text.count(updater.START) == 1 and text.count(updater.END) == 1, doc
    assert text.index(updater.START) < text.index(updater.END), doc


_SECTIONS = ("data", "model", "train", "eval", "splits", "arm", "adapt", "dino", "coda", "mae", "tvn")
_KEY_SPAN = re.compile(r"^(?:config\.)?((?:%s)(?:\.[a-z_][a-z0-9_]*)+)(?:=[^`]*)?$" % "|".join(_SECTIONS))


@pytest.mark.parametrize("doc", DOCS)
def test_named_config_keys_exist(doc):
    """A code span in prose such as `data.jump.illum=auto|on|off` or `config.coda.task`
    names a key (or section) of the study configs."""
    spans = re.findall(r"`([^`\n]+)`", _FENCE.sub("", _read(doc)))
    keys = sorted({m.group(1) for m in map(_KEY_SPAN.match, spans) if m})
    known = set().union(*(_config_keys(*t)[1] for t in _all_configs()))
    unknown = [k for k in keys if k not in known]
    assert not unknown, f"{doc}: names config keys that no config has: {unknown}"
