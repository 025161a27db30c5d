"""Test-wide settings.

hypothesis runs derandomized by default, so that the suite (and CI) draws the same examples
every time and a red run is reproducible. To explore new examples, set
LRFAST_HYPOTHESIS_RANDOM=1 (or pass ``--hypothesis-seed=N``).
"""
import os

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test extra; the tests that need it skip without it
    settings = None

if settings is not None:
    settings.register_profile("lrfast-fixed", derandomize=True)
    settings.register_profile("lrfast-random", derandomize=False)
    settings.load_profile(
        "lrfast-random" if os.environ.get("LRFAST_HYPOTHESIS_RANDOM") == "1" else "lrfast-fixed")


def pytest_report_header(config):
    import lrfast

    info = lrfast._openmp.build_info()
    where = os.path.dirname(os.path.abspath(lrfast.__file__))
    return [(f"lrfast {lrfast.__version__} from {where} (kernels: {lrfast._dispatch.name}, "
            f"openmp: {info['openmp']}, debug checks: {info['debug_checks']})")]


def pytest_sessionstart(session):
    """LRFAST_TEST_INSTALLED_UNDER=PREFIX: refuse to run unless the lrfast imported lives under
    PREFIX, so a run meant to test an installed wheel can never test a source checkout."""
    prefix = os.environ.get("LRFAST_TEST_INSTALLED_UNDER")
    if not prefix:
        return
    import pytest

    import lrfast

    where = os.path.realpath(lrfast.__file__)
    if os.path.commonpath([where, os.path.realpath(prefix)]) != os.path.realpath(prefix):
        raise pytest.UsageError(f"lrfast was imported from {where}, not from under {prefix}")
