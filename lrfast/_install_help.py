"""The message ``import lrfast`` gives when its compiled kernels cannot be loaded.

Kept apart from ``__init__`` so that it imports nothing compiled and can be tested on its own.
"""
from __future__ import annotations

import os
import sys


def _source_checkout(package_dir: str) -> bool:
    """Is ``package_dir`` the ``lrfast/`` folder of a source checkout (setup.py and src/ beside)?"""
    root = os.path.dirname(package_dir)
    return os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(
        os.path.join(root, "src", "_optim.pyx"))


def kernels_missing_message(exc: BaseException, package_dir: str | None = None) -> str:
    package_dir = package_dir or os.path.dirname(os.path.abspath(__file__))
    head = f"lrfast's compiled kernels could not be loaded from {package_dir} ({exc})."
    if _source_checkout(package_dir):
        root = os.path.dirname(package_dir)
        return (
            f"{head}\nThis is a source checkout of lrfast ({root}) whose kernels have not been "
            "built. Either build them there, which needs a C compiler: `pip install -e .` (or "
            "`python setup.py build_ext --inplace`); or, to use an installed lrfast instead, "
            "run Python from another folder so that this checkout does not shadow it."
        )
    return (
        f"{head}\nThe installation is incomplete, or was built for another Python or platform "
        f"(this is Python {sys.version_info.major}.{sys.version_info.minor} on {sys.platform}). "
        "Reinstall it: `pip install --force-reinstall lrfast`."
    )
