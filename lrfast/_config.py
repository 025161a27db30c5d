"""lrfast.show_config(): what this build of lrfast is and how it will run."""
from __future__ import annotations

import os
import platform
import sys

import numpy as np

from . import _dispatch, _openmp
from ._threads import get_num_threads
from ._version import __version__


def config() -> dict:
    """The facts ``show_config`` prints, as a dict."""
    info = _openmp.build_info()
    return {
        "lrfast": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "compiler": info["compiler"],
        "compile_flags": info["flags"] + ("  (+ -mavx2 for the avx2 build)" if _dispatch.AVX2_SHIPPED else ""),
        "simd": info["simd"],
        "openmp": info["openmp"],
        "debug_checks": info["debug_checks"],
        "flush_to_zero": _dispatch.kernels.has_flush_to_zero(),
        "num_threads": get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "kernel_build": _dispatch.name,
        "kernel_builds_available": _dispatch.available(),
        "min_elements_per_thread": ", ".join(
            f"{k} {v}" for k, v in _dispatch.kernels.get_min_elements_per_thread().items()),
    }


def show_config() -> None:
    """Print version, compiler, flags, SIMD sets, OpenMP and the thread count."""
    for key, value in config().items():
        if isinstance(value, list):
            value = " ".join(value) or "(none)"
        print(f"{key:>24}: {value}")
