"""How many threads the kernels use.

By default lrfast follows the OpenMP runtime's own default, ``omp_get_max_threads()``, which
honours ``OMP_NUM_THREADS`` and is what ``threadpoolctl.threadpool_limits(user_api="openmp")``
changes. ``set_num_threads`` overrides it for lrfast alone; ``threads`` does so for a block.
Small steps run on fewer threads whatever the setting: each update has a measured minimum of
elements per thread (``lrfast.show_config()`` lists them).
"""
from __future__ import annotations

import operator

from . import _openmp

_requested: int | None = None


def _check(n):
    if n is None:
        return None
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"the number of threads must be an int or None, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"the number of threads must be at least 1, got {n}")
    return n


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads in lrfast's kernels; ``None`` goes back to following OpenMP's default.

    Examples
    --------
    >>> import lrfast
    >>> lrfast.set_num_threads(1)
    >>> lrfast.get_num_threads()
    1
    >>> lrfast.set_num_threads(None)  # follow OpenMP again
    """
    global _requested
    _requested = _check(n)


def get_num_threads() -> int:
    """The number of threads a large step will use.

    1 when lrfast was built without OpenMP, whatever was asked for.

    Examples
    --------
    >>> import lrfast
    >>> lrfast.get_num_threads() >= 1
    True
    """
    if not _openmp.openmp_enabled():
        return 1
    if _requested is not None:
        return _requested
    return max(1, _openmp.max_threads())


class threads:
    """Context manager: ``with lrfast.threads(1): ...`` runs the block's steps on ``n`` threads.

    The previous setting is restored on exit, also when the block raises.

    Examples
    --------
    >>> import lrfast
    >>> before = lrfast.get_num_threads()
    >>> with lrfast.threads(1):
    ...     lrfast.get_num_threads()
    1
    >>> lrfast.get_num_threads() == before
    True
    """

    def __init__(self, n: int | None):
        self._n = _check(n)
        self._saved: list[int | None] = []

    def __enter__(self):
        global _requested
        self._saved.append(_requested)
        _requested = self._n
        return self

    def __exit__(self, *exc):
        global _requested
        _requested = self._saved.pop()
        return False
