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
