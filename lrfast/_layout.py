"""Address tables and plans: what one native call needs to update many tensors of one dtype.

Every layer that runs a kernel over many tensors builds its table here: the optimizer classes
and lrfast.functional from NumPy arrays (a :class:`Bank` per dtype, whose :meth:`Bank.plan` is
the native ``Plan`` that checks the grads and runs the update), lrfast.torch from tensors'
addresses (:func:`table`, then :func:`plan`), and clipping from the addresses its native check
collected (:func:`table`).

A table has one row per buffer (row 0 param, row 1 grad, then the update's state rows) and one
column per tensor; ``offsets`` are the prefix sums of the tensor sizes in elements.
"""
from __future__ import annotations

import numpy as np

from . import _dispatch
from ._validation import byte_range, raise_gather_error

GRAD_ROW = 1


def address(arr):
    return arr.__array_interface__["data"][0]


def group_by_dtype(arrays) -> dict[np.dtype, list[int]]:
    """{dtype: [indices]} in first-seen order."""
    groups: dict = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.dtype, []).append(i)
    return groups


def table(rows, sizes):
    """(table, offsets) from ``rows`` (one sequence of addresses per buffer, or None for a row
    filled later, e.g. the grads) and the tensors' sizes in elements."""
    n = len(sizes)
    out = np.zeros((len(rows), n), dtype=np.intp)
    for r, addrs in enumerate(rows):
        if addrs is not None:
            out[r] = addrs
    offsets = np.zeros(n + 1, dtype=np.intp)
    np.cumsum(np.asarray(sizes, dtype=np.intp), out=offsets[1:])
    return out, offsets


def plan(update, table, offsets, storage):
    """A native plan whose grads the caller writes into ``table[GRAD_ROW]`` before each run."""
    return _dispatch.kernels.Plan(update, table, offsets, storage)


class Bank:
    """The NumPy tensors of one dtype, laid out for one kernel call.

    Parameters
    ----------
    dtype : numpy dtype (float32 or float64)
    indices : list of int, positions of these tensors in the caller's list
    rows : list of (list of arrays or None); ``rows[r][k]`` is buffer ``r`` of tensor ``k``.
        Row ``GRAD_ROW`` is None: a plan fills it at each step.
    written : list of arrays whose memory the step writes (params and state): a grad must not
        overlap any of them.
    """

    def __init__(self, dtype, indices, rows, written):
        self.dtype = np.dtype(dtype)
        self.typenum = self.dtype.num
        self.indices = list(indices)
        params = rows[0]
        self.table, self.offsets = table(
            [None if arrays is None else [address(a) for a in arrays] for arrays in rows],
            [p.size for p in params])
        self.ndims = np.array([p.ndim for p in params], dtype=np.intp)
        self.dims = np.array([d for p in params for d in p.shape], dtype=np.intp)
        ranges = sorted(byte_range(a) for a in written if a.nbytes > 0)
        self.wstart = np.array([r[0] for r in ranges], dtype=np.intp)
        self.wend = np.array([r[1] for r in ranges], dtype=np.intp)

    def plan(self, update):
        """The native plan running ``update`` over this bank, checking its grads each step."""
        return _dispatch.kernels.Plan(update, self.table, self.offsets, self.dtype.name,
                                      self.typenum, self.ndims, self.dims, self.wstart,
                                      self.wend)

    def grads_of(self, grads, covers_all):
        """This bank's share of the caller's list of grads."""
        return grads if covers_all else [grads[i] for i in self.indices]

    def raise_bad_grad(self, bad, grads, params, labels, covers_all):
        """Raise the error for ``bad`` = (code, index in this bank) from a plan's check."""
        code, k = bad
        i = self.indices[k]
        raise_gather_error(code, self.grads_of(grads, covers_all)[k], params[i], labels[i])


def banks(params, rows, written):
    """One :class:`Bank` per dtype of ``params``; ``rows`` as for Bank but over all tensors."""
    out = []
    for dtype, indices in group_by_dtype(params).items():
        bank_rows = [None if arrays is None else [arrays[i] for i in indices] for arrays in rows]
        out.append(Bank(dtype, indices, bank_rows, written))
    return out
