"""Shared setup for the benchmarks in bench/.

Run them explicitly (the project's ``testpaths`` only lists ``tests``)::

    pytest bench/ --benchmark-only       # timings
    pytest bench/ --benchmark-disable    # smoke run: every case once
"""
from __future__ import annotations

import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parent.parent


def _use_checkout():
    """Benchmark the checkout's lrfast when it has been built in place, else an installed one."""
    built = any((_ROOT / "lrfast" / ("_optim" + s)).exists() for s in EXTENSION_SUFFIXES)
    if built and str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))


_use_checkout()

SEED = 20240611


class _Data:
    """Parameters and gradients for one list of tensor sizes, made once and only copied after."""

    def __init__(self, sizes):
        rng = np.random.default_rng(SEED)
        self.params = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
        self.grads = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
        for a in self.params + self.grads:
            a.flags.writeable = False

    def copies(self):
        return [p.copy() for p in self.params], [g.copy() for g in self.grads]


@pytest.fixture(scope="session")
def adam_data():
    """``adam_data(sizes)`` -> fresh float32 (params, grads) lists, the same values on every call.

    Random normal values from a fixed seed; every implementation gets its own copies, so all of
    them start from identical data.
    """
    cache: dict[tuple, _Data] = {}

    def get(sizes):
        key = tuple(sizes)
        if key not in cache:
            cache[key] = _Data(key)
        return cache[key].copies()

    yield get
    cache.clear()
