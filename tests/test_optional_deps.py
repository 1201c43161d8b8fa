"""The base install (`pip install -e .`, no extras) must import and run the studies.

Optional packages (Beam, pandas/pyarrow for profiles, copairs for retrieval, pycytominer)
are imported only where they are used; a config that needs one says which extra to install.
"""

import subprocess
import sys

OPTIONAL = ("apache_beam", "pandas", "pyarrow", "copairs", "pycytominer")

# Runs with the optional packages made unimportable (sys.modules[name] = None).
_SCRIPT = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
from jaxadapt.eval import cli, retrieval, study, validation  # what experiments/run.py imports
from jaxadapt.data import worlds
from tests.eval.tiny import set_keys
assert retrieval.missing_requirements() == ["copairs", "pandas"]
validation.validate(cli.load_config_file("configs/quickstart.py"))
validation.validate(cli.load_config_file("configs/domain_gap.py"))
cfg = set_keys(cli.load_config_file("configs/domain_gap.py"), {{"eval.retrieval": True}})
try:
    validation.validate(cfg)
except ValueError as e:
    print(e)
"""


def test_base_install_imports_and_names_the_extra_a_config_needs():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("config.eval.retrieval=True scores copairs mAP, but ['copairs', 'pandas'] is not "
            "installed; pip install -e \".[metrics]\"") in proc.stdout
