"""The README is executable documentation: its commands and example must stay true."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


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
