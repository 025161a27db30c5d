"""Address tables and plans: what one native call needs to update many tensors.

Every layer that runs a kernel over many tensors builds its table here: the optimizer classes
and lrfast.functional from NumPy arrays (a :class:`Bank` per combination of element types,
whose :meth:`Bank.plan` is
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


def plan(update, table, offsets, storage, rows=None, out=None, qblock=0):
    """A native plan whose grads the caller writes into ``table[GRAD_ROW]`` before each run
    (``rows``, ``out``, ``qblock``: the rows' element types, the half copy's and the 8-bit
    state's block size, as Plan takes them; the table then ends with a row of block scales per
    8-bit row)."""
    return _dispatch.kernels.Plan(update, table, offsets, storage, rows=rows, out=out,
                                  qblock=qblock)


class Bank:
    """NumPy tensors whose buffers share element types, laid out for one kernel call.

    Parameters
    ----------
    indices : list of int, positions of these tensors in the caller's list
    rows : list of (list of arrays or None); ``rows[r][k]`` is buffer ``r`` of tensor ``k``
        (params, grads, the update's state rows, then the half copy's row when ``out``).
        Row ``GRAD_ROW`` may be None: a plan fills it at each step.
    storages : the element type of each of the update's rows (None: a row it does not read)
    grad_dtype : the NumPy dtype the grads must have
    written : list of arrays whose memory the step writes (params, state, half copies): a grad
        must not overlap any of them.
    out : the half copy's element type, or None
    qblock : the block size of the rows kept in 8 bits (storages "int8s"/"int8u"); ``rows``
        then ends with a row of each tensor's block scales per such row, in row order
    """

    def __init__(self, indices, rows, storages, grad_dtype, written, out=None, qblock=0):
        self.indices = list(indices)
        self.storages = tuple(storages)
        self.grad_dtype = np.dtype(grad_dtype)
        self.out = out
        self.qblock = qblock
        params = rows[0]
        self.table, self.offsets = table(
            [None if arrays is None else [address(a) for a in arrays] for arrays in rows],
            [p.size for p in params])
        self.ndims = np.array([p.ndim for p in params], dtype=np.intp)
        self.dims = np.array([d for p in params for d in p.shape], dtype=np.intp)
        ranges = sorted(byte_range(a) for a in written if a.nbytes > 0)
        self.wstart = np.array([r[0] for r in ranges], dtype=np.intp)
        self.wend = np.array([r[1] for r in ranges], dtype=np.intp)

    def plan(self, update, grad_dtype=None, grad_storage=None):
        """The native plan running ``update`` over this bank, checking its grads each step
        (of ``grad_dtype``, element type ``grad_storage``; by default the bank's own)."""
        storages = self.storages
        if grad_dtype is None:
            grad_dtype = self.grad_dtype
        else:
            storages = (storages[0], grad_storage) + storages[2:]
        return _dispatch.kernels.Plan(update, self.table, self.offsets, storages[0],
                                      np.dtype(grad_dtype).num, self.ndims, self.dims,
                                      self.wstart, self.wend, rows=storages, out=self.out,
                                      qblock=self.qblock)

    def grads_of(self, grads, covers_all):
        """This bank's share of the caller's list of grads."""
        return grads if covers_all else [grads[i] for i in self.indices]

    def raise_bad_grad(self, bad, grads, params, labels, covers_all):
        """Raise the error for ``bad`` = (code, index in this bank) from a plan's check."""
        code, k = bad
        i = self.indices[k]
        raise_gather_error(code, self.grads_of(grads, covers_all)[k], params[i], labels[i])


def banks(rows, storages, written, grad_dtypes, out=None, out_storages=None, scales=None,
          qblock=0):
    """One :class:`Bank` per combination of element types over all tensors.

    ``rows`` as for Bank but over all tensors (row GRAD_ROW None), ``storages[r][k]`` the
    element type of buffer ``r`` of tensor ``k`` (None for rows not used), ``grad_dtypes[k]``
    the dtype tensor ``k``'s grads must have, ``out`` the half copies (a list, or None) and
    ``out_storages`` their element types. ``scales``: {row: each tensor's block scales (None
    where that tensor's row is not kept in 8 bits)} and ``qblock`` their block size.
    """
    n = len(rows[0])
    groups: dict = {}
    for k in range(n):
        key = (tuple(None if s is None else s[k] for s in storages),
               np.dtype(grad_dtypes[k]), None if out is None else out_storages[k],
               rows[0][k].dtype)
        groups.setdefault(key, []).append(k)
    result = []
    for (row_storages, grad_dtype, out_storage, _), indices in groups.items():
        bank_rows = [None if arrays is None else [arrays[i] for i in indices] for arrays in rows]
        if out is not None:
            bank_rows.append([out[i] for i in indices])
        quantized = [r for r, name in enumerate(row_storages) if name in ("int8s", "int8u")]
        for r in quantized:
            bank_rows.append([scales[r][i] for i in indices])
        result.append(Bank(indices, bank_rows, row_storages, grad_dtype, written, out_storage,
                           qblock if quantized else 0))
    return result
