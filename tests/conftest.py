"""Test-wide setup.

JAX must see 8 CPU devices before any backend is initialised, so that the
multi-device tests can build meshes; single-device code paths are unaffected
(they only use device 0).

Skips: on a user's machine a test whose oracle package (torch, transformers,
mergekit), pretrained-weight wheel or data folder is absent skips with a reason.
In CI (`CI=true`, as `.ci/run` is run) everything is installed and the data
folder is present, so a skip there means a broken setup: it is reported as a
failure instead, unless the test is marked `may_skip_in_ci` with a reason.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

SHARED_DATA = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers", "oracle: compares against torch/transformers/mergekit (skips if absent)")
    config.addinivalue_line(
        "markers", "may_skip_in_ci(reason): a skip of this test is expected even in CI")


def _ci_failure(report, item=None) -> None:
    """Turns a skip into a failure under CI=true (see the module docstring)."""
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item is not None and item.get_closest_marker("may_skip_in_ci"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped in CI (CI=true requires every oracle, weight wheel and the "
                       f"data folder): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _ci_failure(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole module at collection
    _ci_failure(outcome.get_result())


@pytest.fixture(scope="session")
def shared_data_dir():
    """Path of ../shared/data; skips the test with a reason where it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {SHARED_DATA} "
                    "(present in CI; see README 'Data')")
    return SHARED_DATA
