"""Gradient clipping by the global norm over all tensors, as torch.nn.utils.clip_grad_norm_.

One native pass computes the norm of all gradients together, a second scales them in place
when the norm exceeds ``max_norm``. The gradients of each dtype are concatenated and cut into
fixed blocks; |x|^p is summed in double per block, and the block sums are added in block order
(float32 gradients first, then float64), so the norm is bitwise the same for any number of
threads. The NumPy twin is :func:`lrfast.reference.clip_grad_norm_`.

Summing in double is more exact than torch, which sums float32 gradients in float32: the norms
agree to float32 rounding, except at the ends of the float32 range, where torch's sum of squares
overflows to inf (or underflows to 0) and lrfast's does not.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
import numpy as np

from . import _dispatch, _layout
from ._threads import get_num_threads
from ._precision import HALF
from ._validation import _real, as_named, check_array, check_bool, check_disjoint, label
from .flat import FlatParams

__all__ = ["clip_grad_norm_", "grad_norm"]

# torch adds this to the norm before dividing, so that a zero norm gives no division by zero.
NORM_EPS = 1e-6


def _norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a real number or 'inf', got {type(norm_type).__name__}")
    p = _real(norm_type, "norm_type")
    if not (p > 0):
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}")
    return p


class _Labels:
    """The name of each grad in messages, made only when one is needed."""

    def __init__(self, keys=None, single=None):
        self.keys, self.single = keys, single

    def __getitem__(self, k):
        return self.single if self.single else label("grads", self.keys[k])

    def __len__(self):
        return 1 if self.single else len(self.keys)


def _grads(grads):
    """(arrays, labels) from one array, a list/tuple/dict of arrays, or a FlatParams."""
    if isinstance(grads, FlatParams):
        return [grads.grad], _Labels(single="flat.grad")
    if isinstance(grads, np.ndarray):
        return [grads], _Labels(single="grads")
    if not isinstance(grads, (Sequence, Mapping)) and isinstance(grads, Iterable):
        grads = list(grads)  # a generator, as torch accepts
    keys, arrays, _ = as_named(grads, "grads")
    return arrays, _Labels(keys)


def _banks(arrays, labels, writeable):
    """Check ``arrays`` and lay them out per dtype: [(is64, table, offsets)], float32 first.

    The per-array checks run in one native loop; only a bad array goes through the Python
    checks that word the error.
    """
    n = len(arrays)
    addrs = np.empty(n, dtype=np.intp)
    sizes = np.empty(n, dtype=np.intp)
    typenums = np.empty(n, dtype=np.intc)
    bad = _dispatch.kernels.collect_arrays(arrays, addrs, sizes, typenums, writeable)
    if bad >= 0:
        if check_array(arrays[bad], labels[bad], writeable=writeable) in HALF:
            raise TypeError(f"{labels[bad]} has dtype {arrays[bad].dtype}: gradient clipping "
                            "takes float32 and float64 grads (half-precision ones are not "
                            "clipped yet; clip their float32 master copies)")
        raise AssertionError("collect_arrays and check_array disagree")  # pragma: no cover
    is64 = typenums == np.dtype(np.float64).num
    if writeable:
        # Two grads sharing memory would be scaled twice.
        ends = addrs + sizes * np.where(is64, 8, 4)
        order = np.argsort(addrs[sizes > 0], kind="stable")
        nonempty = np.flatnonzero(sizes > 0)[order]
        clash = np.flatnonzero(ends[nonempty[:-1]] > addrs[nonempty[1:]])
        if clash.size:
            check_disjoint(arrays, [labels[k] for k in range(n)])
    out = []
    for flag in (False, True):
        mask = is64 == flag
        if not mask.any():
            continue
        table, offsets = _layout.table([addrs[mask]], sizes[mask])
        out.append((flag, table, offsets))
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
    if p == 2.0:
        return math.sqrt(acc)
    try:
        return acc if p == 1.0 else acc ** (1.0 / p)
    except OverflowError:  # p < 1: the root of a finite sum may exceed the float range
        return math.inf


def grad_norm(grads, norm_type=2.0) -> float:
    """The norm of all ``grads`` taken as one vector (nothing is modified).

    ``norm_type``: p > 0, or ``inf`` (the largest absolute value). NaN when a grad is NaN.

    Examples
    --------
    Two tensors taken together as the vector (3, 4, 12):

    >>> import numpy as np
    >>> import lrfast
    >>> grads = [np.array([3.0, 4.0]), np.array([12.0])]
    >>> lrfast.grad_norm(grads)
    13.0
    >>> lrfast.grad_norm(grads, norm_type=1)
    19.0
    >>> lrfast.grad_norm(grads, norm_type="inf")
    12.0
    >>> grads[0].tolist()
    [3.0, 4.0]
    """
    p = _norm_type(norm_type)
    arrays, labels = _grads(grads)
    return _total_norm(_banks(arrays, labels, False), p, get_num_threads())


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

    Examples
    --------
    The gradient (3, 4) has norm 5. Clipped to norm 1, it is scaled by 1 / (5 + 1e-6), which
    is 0.2 to six digits:

    >>> import numpy as np
    >>> import lrfast
    >>> grads = np.array([3.0, 4.0])
    >>> lrfast.clip_grad_norm_(grads, max_norm=1.0)
    5.0
    >>> print(grads.round(6))
    [0.6 0.8]

    Under ``max_norm`` nothing is written:

    >>> grads = np.array([3.0, 4.0])
    >>> lrfast.clip_grad_norm_(grads, max_norm=10.0)
    5.0
    >>> print(grads)
    [3. 4.]

    The norm is taken over all tensors together; (3, 4, 12) has norm 13, so clipping to 6.5
    halves every tensor:

    >>> grads = {"w": np.array([3.0, 4.0]), "b": np.array([12.0])}
    >>> lrfast.clip_grad_norm_(grads, max_norm=6.5)
    13.0
    >>> print(grads["w"].round(6), grads["b"].round(6))
    [1.5 2. ] [6.]

    A NaN anywhere makes the norm NaN; ``error_if_nonfinite=True`` raises then, and leaves
    the gradients as they were:

    >>> grads = np.array([3.0, np.nan])
    >>> lrfast.clip_grad_norm_(grads, max_norm=1.0, error_if_nonfinite=True)
    Traceback (most recent call last):
        ...
    RuntimeError: the total 2.0-norm of the gradients is nan, so they cannot be clipped; ...
    >>> print(grads)
    [ 3. nan]
    """
    p = _norm_type(norm_type)
    error_if_nonfinite = check_bool(error_if_nonfinite, "error_if_nonfinite")
    max_norm = _real(max_norm, "max_norm")
    if not (max_norm >= 0):
        raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
    arrays, labels = _grads(grads)
    nthreads = get_num_threads()
    banks = _banks(arrays, labels, True)
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
