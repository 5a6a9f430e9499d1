"""Test-wide setup.

JAX must see 8 CPU devices before any backend is initialised, so that the
multi-device tests can build meshes; single-device code paths are unaffected
(they only use device 0).
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

SHARED_DATA = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers", "oracle: compares against torch/transformers/mergekit (skips if absent)")


@pytest.fixture(scope="session")
def shared_data_dir():
    """Path of ../shared/data; skips the test with a reason where it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {SHARED_DATA} "
                    "(present in CI; see README 'Data')")
    return SHARED_DATA
