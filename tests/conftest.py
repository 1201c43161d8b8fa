"""Test-wide setup: 8 fake CPU devices and strict dtype promotion, before JAX starts."""

import os

# Must run before jax is imported anywhere: tests of data parallelism need 8 devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_collection_finish(session):
    """A run that collects no test is a broken run, not a pass."""
    if not session.items and not session.config.option.collectonly:
        raise RuntimeError("pytest collected no tests: check testpaths and file names")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory) -> str:
    """One TFDS cache folder for the whole run: simulated stores are keyed by their config's
    hash, so tests that render the same tiny world share one build (tens of seconds each)."""
    return str(tmp_path_factory.mktemp("sim_cache"))
