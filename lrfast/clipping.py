"""Gradient clipping by the global norm over all tensors, as torch.nn.utils.clip_grad_norm_.

One native pass computes the norm of all gradients together (per dtype), a second scales them
in place when the norm exceeds ``max_norm``. The norm is summed in double over fixed blocks of
the concatenated gradients and the block sums are added in block order, so it is bitwise the
same for any number of threads. The NumPy twin is :func:`lrfast.reference.clip_grad_norm_`.
"""
from __future__ import annotations

import math
import numbers
import numpy as np

from . import _dispatch
from ._tables import address, group_by_dtype
from ._threads import get_num_threads
from ._validation import as_named, check_array, check_disjoint, label
from .flat import FlatParams

__all__ = ["clip_grad_norm_", "grad_norm"]

# torch adds this to the norm before dividing, so that a zero norm gives no division by zero.
NORM_EPS = 1e-6


def _norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a real number or 'inf', got {type(norm_type).__name__}")
    p = float(norm_type)
    if not (p > 0):
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}")
    return p


def _grads(grads):
    """(arrays, labels) from one array, a list/tuple/dict of arrays, or a FlatParams."""
    if isinstance(grads, FlatParams):
        return [grads.grad], ["flat.grad"]
    if isinstance(grads, np.ndarray):
        return [grads], ["grads"]
    keys, arrays, _ = as_named(grads, "grads")
    return arrays, [label("grads", k) for k in keys]


def _banks(arrays):
    """[(is64, table, offsets)] per dtype, in first-seen dtype order."""
    out = []
    for dtype, indices in group_by_dtype(arrays).items():
        group = [arrays[i] for i in indices]
        table = np.array([[address(a) for a in group]], dtype=np.intp)
        offsets = np.zeros(len(group) + 1, dtype=np.intp)
        np.cumsum([a.size for a in group], out=offsets[1:])
        out.append((dtype == np.float64, table, offsets))
    return out


def _total_norm(banks, p, nthreads) -> float:
    kernels = _dispatch.kernels
    acc = 0.0
    for is64, table, offsets in banks:
        partials = np.empty(max(1, -(-int(offsets[-1]) // kernels.NORM_BLOCK_SIZE)), dtype=np.float64)
        part = kernels.grad_norm_reduce(table, offsets, is64, nthreads, p, partials)
        if math.isinf(p):
            acc = part if (part > acc or part != part) else acc
        else:
            acc += part
    if math.isinf(p) or acc != acc:
        return acc
    return math.sqrt(acc) if p == 2.0 else acc if p == 1.0 else acc ** (1.0 / p)


def grad_norm(grads, norm_type=2.0) -> float:
    """The norm of all ``grads`` taken as one vector (nothing is modified).

    ``norm_type``: p > 0, or ``inf`` (the largest absolute value). NaN when a grad is NaN.
    """
    p = _norm_type(norm_type)
    arrays, labels = _grads(grads)
    for a, what in zip(arrays, labels):
        check_array(a, what, writeable=False)
    return _total_norm(_banks(arrays), p, get_num_threads())


def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False) -> float:
    r"""Scale ``grads`` in place so that their global norm is at most ``max_norm``.

    With :math:`N = \lVert (g_1, \dots, g_n) \rVert_p` over all elements of all tensors, every
    gradient is multiplied by :math:`\min(1, \text{max\_norm} / (N + 10^{-6}))` (the factor is
    rounded to the gradient's dtype; nothing is written when it is 1). As torch's
    ``clip_grad_norm_``: a NaN norm multiplies the grads by NaN unless ``error_if_nonfinite``,
    which raises instead and changes nothing.

    Parameters
    ----------
    grads : array, list/tuple/dict of float32/float64 arrays, or a FlatParams (its grad buffer)
    max_norm : float >= 0
    norm_type : float > 0 or ``inf``, default 2
    error_if_nonfinite : bool, default False

    Returns
    -------
    float : the total norm before clipping.
    """
    p = _norm_type(norm_type)
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}")
    max_norm = float(max_norm)
    if not (max_norm >= 0):
        raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
    arrays, labels = _grads(grads)
    for a, what in zip(arrays, labels):
        check_array(a, what, writeable=True)
    check_disjoint(arrays, labels)
    nthreads = get_num_threads()
    banks = _banks(arrays)
    total = _total_norm(banks, p, nthreads)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"the total {norm_type}-norm of the gradients is {total}, so they cannot be "
            "clipped; nothing was changed (error_if_nonfinite=False scales them by it anyway)"
        )
    coef = max_norm / (total + NORM_EPS)
    if not (coef >= 1.0):  # also when coef is NaN, as torch's clamp(max=1) keeps NaN
        for is64, table, offsets in banks:
            _dispatch.kernels.scale_(table, offsets, is64, nthreads, coef)
    return total


clip_grad_norm = clip_grad_norm_
