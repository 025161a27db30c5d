"""Address tables: what one native call needs to update many tensors of one dtype.

A ``Bank`` holds, for the tensors of one dtype, the table of base addresses the kernels read
(row 0 param, row 1 grad, then the optimizer's state rows), the prefix sums of the tensor sizes,
the expected shapes (for the per-step gradient check) and the sorted byte ranges that the step
writes (a gradient must not overlap them).
"""
from __future__ import annotations

import numpy as np

from . import _optim
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


class Bank:
    """The tensors of one dtype, laid out for one kernel call.

    Parameters
    ----------
    dtype : numpy dtype (float32 or float64)
    indices : list of int, positions of these tensors in the caller's list
    rows : list of (list of arrays or None); ``rows[r][k]`` is buffer ``r`` of tensor ``k``.
        Row ``GRAD_ROW`` may be None: it is filled at each step by ``gather``.
    written : list of arrays whose memory the step writes (params and state)
    """

    def __init__(self, dtype, indices, rows, written):
        self.dtype = np.dtype(dtype)
        self.is64 = self.dtype == np.float64
        self.typenum = self.dtype.num
        self.indices = list(indices)
        n = len(self.indices)
        params = rows[0]
        self.table = np.zeros((len(rows), n), dtype=np.intp)
        for r, arrays in enumerate(rows):
            if arrays is not None:
                self.table[r] = [address(a) for a in arrays]
        sizes = np.array([p.size for p in params], dtype=np.intp)
        self.offsets = np.zeros(n + 1, dtype=np.intp)
        np.cumsum(sizes, out=self.offsets[1:])
        self.ndims = np.array([p.ndim for p in params], dtype=np.intp)
        self.dims = np.array([d for p in params for d in p.shape], dtype=np.intp)
        ranges = sorted(byte_range(a) for a in written if a.nbytes > 0)
        self.wstart = np.array([r[0] for r in ranges], dtype=np.intp)
        self.wend = np.array([r[1] for r in ranges], dtype=np.intp)
        self._grad_row = self.table[GRAD_ROW]

    def gather(self, grads, params, labels, covers_all):
        """Check this bank's grads and record their addresses; raise on the first bad one."""
        seq = grads if covers_all else [grads[i] for i in self.indices]
        code, k = _optim.gather_grads(
            seq, self.typenum, self.ndims, self.dims, self._grad_row, self.wstart, self.wend
        )
        if code != _optim.GATHER_OK:
            i = self.indices[k]
            raise_gather_error(code, seq[k], params[i], labels[i])
