r"""Row-wise sparse updates of embedding tables: only the rows a batch touched are updated.

A batch reaches a table ``(rows, dim)`` through ``n`` lookups: ``indices`` (``n`` row numbers,
int32 or int64, duplicates allowed, any order) and ``grads`` (``n`` gradient rows, one per
lookup, the table's dtype), the form ``nn.Embedding(sparse=True)`` gives before coalescing.
One step is one native call pair: the lookups are grouped by row (a parallel stable radix sort
on the row number), the gradient rows of each touched row are summed in lookup order (so the
result is the same for any number of threads), and each touched row is updated with its state,
the rows cut over threads by their number of lookups. Rows no lookup touched are not read,
not written, and their state is not decayed.

Updates (``g`` is the summed gradient of a touched row, negated when ``maximize``, plus
``weight_decay * w`` when that option is set; it is off by default and decays touched rows
only; ``t`` is the step, 1-based):

==================  =================================================================  =========
function / class    update of a touched row ``w``                                     state
==================  =================================================================  =========
``sparse_sgd_``     :math:`w \leftarrow w - \eta g`                                    none
``SparseSGD``
``sparse_adagrad_`` :math:`s \leftarrow s + g^2,\ w \leftarrow w - \eta_t g / (\sqrt{s}    ``state_sum``
``SparseAdagrad``   + \epsilon)`, :math:`\eta_t = \eta / (1 + (t-1)\,\text{lr\_decay})`     per element
                    (torch's Adagrad on sparse gradients)
``rowwise_adagrad_``:math:`s \leftarrow s + \operatorname{mean}_j g_j^2,\                  ``state_sum``
``RowWiseAdagrad``  w \leftarrow w - \eta_t g / (\sqrt{s} + \epsilon)` (FBGEMM's           one per row
                    ``EXACT_ROWWISE_ADAGRAD``)
``sparse_adam_``    :math:`m \mathrel{+}= (1-\beta_1)(g - m),\ v \mathrel{+}= (1-\beta_2)   ``exp_avg``,
``SparseAdam``      (g^2 - v),\ w \leftarrow w - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}  ``exp_avg_sq``
                    \frac{m}{\sqrt{v} + \epsilon}` (torch's SparseAdam: lazy moments)     per element
``rowwise_adam_``   as ``sparse_adam_`` with :math:`g^2` replaced by                       ``exp_avg``;
``RowWiseAdam``     :math:`\operatorname{mean}_j g_j^2`: one second moment per row         ``exp_avg_sq``
                    (4 bytes of it per row instead of ``4 dim``)                          per row
==================  =================================================================  =========

The arithmetic is torch's, operation by operation, in the table's precision (float32 or
float64); the row means are summed in float64. Everything is checked before anything is
written: an index out of range, a shape or dtype that does not fit, a state array that
overlaps the table raise and change nothing.

Examples
--------
>>> import numpy as np
>>> import lrfast
>>> table = np.zeros((4, 2), dtype=np.float32)
>>> opt = lrfast.SparseAdagrad(table, lr=0.5)
>>> opt.step(np.array([3, 1, 3]), np.ones((3, 2), dtype=np.float32))   # row 3 twice: g = 2
True
>>> table.tolist()
[[0.0, 0.0], [-0.5, -0.5], [0.0, 0.0], [-0.5, -0.5]]
>>> opt.state["state_sum"][:, 0].tolist()
[0.0, 1.0, 0.0, 4.0]
"""
from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _dispatch
from ._counters import StepCounters
from ._threads import get_num_threads
from ._validation import (check_betas, check_bool, check_disjoint, check_lr,
                          check_nonneg, check_step, lr_value)

__all__ = ["merge_rows", "sparse_sgd_", "sparse_adagrad_", "rowwise_adagrad_", "sparse_adam_",
           "rowwise_adam_", "SparseSGD", "SparseAdagrad", "RowWiseAdagrad", "SparseAdam",
           "RowWiseAdam", "ROW_UPDATES"]

REQUIRED = object()


def _adagrad_values(h: dict, step: int) -> tuple:
    clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
    return (-clr, h["weight_decay"], h["eps"], 0.0, 0.0)


def _adam_values(h: dict, step: int) -> tuple:
    bias_correction1 = 1 - h["beta1"] ** step
    bias_correction2 = 1 - h["beta2"] ** step
    step_size = h["lr"] * math.sqrt(bias_correction2) / bias_correction1
    return (-step_size, h["weight_decay"], h["eps"], 1 - h["beta1"], 1 - h["beta2"])


def _sgd_values(h: dict, step: int) -> tuple:
    return (-h["lr"], h["weight_decay"], 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RowUpdate:
    """One row-wise update, described once: the functional layer, the classes, the reference
    and the tests read it.

    ``hypers``: the functional keyword arguments with their defaults (``REQUIRED`` for lr);
    ``state``: (buffer name, one value per row?) in the functional argument order;
    ``values``: (hyper-parameters, step) -> the five doubles the kernel reads;
    ``kind``: the kernel's number for it (src/_rowwise.pxi)."""

    name: str
    kind: int
    hypers: dict
    state: tuple
    uses_step: bool
    values: Callable[[dict, int], tuple]


_ADAGRAD_HYPERS = {"lr": REQUIRED, "lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0,
                   "maximize": False}
_ADAM_HYPERS = {"lr": REQUIRED, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                "maximize": False}

ROW_UPDATES = {u.name: u for u in (
    RowUpdate("sparse_sgd", 0, {"lr": REQUIRED, "weight_decay": 0.0, "maximize": False}, (),
              False, _sgd_values),
    RowUpdate("sparse_adagrad", 1, _ADAGRAD_HYPERS, (("state_sum", False),), True,
              _adagrad_values),
    RowUpdate("rowwise_adagrad", 2, _ADAGRAD_HYPERS, (("state_sum", True),), True,
              _adagrad_values),
    RowUpdate("sparse_adam", 3, _ADAM_HYPERS, (("exp_avg", False), ("exp_avg_sq", False)), True,
              _adam_values),
    RowUpdate("rowwise_adam", 4, _ADAM_HYPERS, (("exp_avg", False), ("exp_avg_sq", True)), True,
              _adam_values),
)}


# ------------------------------------------------------------------------------------------
# Checks (everything before the first write)
# ------------------------------------------------------------------------------------------

def _check_hypers(update: RowUpdate, given: dict) -> dict:
    h = {}
    for name, default in update.hypers.items():
        value = given.get(name, default)
        if value is REQUIRED:
            raise TypeError(f"{update.name}_() missing required keyword argument: {name!r}")
        if name == "maximize":
            h[name] = check_bool(value, "maximize")
        elif name == "lr":
            h[name] = check_nonneg(value, "Invalid learning rate")
        elif name in ("beta1", "beta2"):
            h[name] = check_betas((given.get("beta1", update.hypers["beta1"]),
                                   given.get("beta2", update.hypers["beta2"])))[name == "beta2"]
        else:
            h[name] = check_nonneg(value, f"Invalid {'epsilon' if name == 'eps' else name} value")
    return h


def _check_table(table, what="table") -> None:
    if not isinstance(table, np.ndarray):
        raise TypeError(f"{what} must be a numpy.ndarray, got {type(table).__name__}")
    if table.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be float32 or float64, got {table.dtype}")
    if table.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows, dim), got shape {table.shape}")
    if not table.flags.c_contiguous or not table.flags.aligned:
        raise ValueError(f"{what} must be C-contiguous and aligned")
    if not table.flags.writeable:
        raise ValueError(f"{what} is read-only; lrfast updates it in place")


def _check_lookups(rows: int, dim: int, dtype, indices, grads) -> tuple[np.ndarray, np.ndarray]:
    """(indices as int64, grads as a C-contiguous array) for a table of ``rows`` x ``dim``
    ``dtype`` values, or a clear error."""
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices must be a numpy.ndarray of integers, got {type(indices).__name__}")
    if indices.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers (int32 or int64), got {indices.dtype}")
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D (one row number per lookup), got shape {indices.shape}")
    if not isinstance(grads, np.ndarray):
        raise TypeError(f"grads must be a numpy.ndarray, got {type(grads).__name__}")
    if grads.dtype != dtype:
        raise TypeError(f"grads must have the table's dtype {dtype}, got {grads.dtype}")
    if grads.shape != (indices.shape[0], dim):
        raise ValueError(f"grads must have shape (len(indices), dim) = "
                         f"{(indices.shape[0], dim)}, got {grads.shape}")
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise IndexError(f"index {bad} is out of range for a table of {rows} rows")
    return (np.ascontiguousarray(indices, dtype=np.int64),
            np.ascontiguousarray(grads))


def _check_state(update: RowUpdate, table: np.ndarray, state: list) -> None:
    for (name, per_row), arr in zip(update.state, state):
        want = table.shape[:1] if per_row else table.shape
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
        if arr.dtype != table.dtype:
            raise TypeError(f"{name} must have the table's dtype {table.dtype}, got {arr.dtype}")
        if arr.shape != want:
            raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
        if not arr.flags.c_contiguous or not arr.flags.aligned:
            raise ValueError(f"{name} must be C-contiguous and aligned")
        if not arr.flags.writeable:
            raise ValueError(f"{name} is read-only; lrfast updates it in place")
    check_disjoint([table, *state], ["table", *(n for n, _ in update.state)])


def _all_finite(grads: np.ndarray, nthreads: int) -> bool:
    return bool(_dispatch.kernels.rowwise_all_finite(grads.reshape(-1), nthreads))


# ------------------------------------------------------------------------------------------
# The native step
# ------------------------------------------------------------------------------------------

# Each Python thread's work arrays, kept from step to step: the grouping's (int64) and the
# per-row gradient sums (one per dtype). Fresh ones per step would be fresh pages, and faulting
# them in (on this project's machines, 2 MB pages zeroed by the kernel) costs more than the
# sort.
_work = threading.local()


def _buffer(name: str, size: int, dtype) -> np.ndarray:
    """This thread's array ``name`` of at least ``size`` elements (grown, never shrunk)."""
    arr = getattr(_work, name, None)
    if arr is None or arr.shape[0] < size:
        arr = np.empty(max(size, 1), dtype=dtype)
        setattr(_work, name, arr)
    return arr


def _group(indices: np.ndarray, rows: int, nthreads: int):
    """(order, starts, rows, slot): views of this thread's work array, valid until its next
    call."""
    kernels = _dispatch.kernels
    work = _buffer("group", kernels.rowwise_work_size(indices.shape[0], nthreads), np.int64)
    return kernels.rowwise_group(indices, rows, nthreads, work)


def _run(update: RowUpdate, table, indices, grads, state, h: dict, step: int,
         nthreads: int) -> None:
    if indices.shape[0] == 0 or table.shape[1] == 0:
        return
    order, starts, rows, slot = _group(indices, table.shape[0], nthreads)
    acc = _buffer(f"sums_{table.dtype.name}", rows.shape[0] * table.shape[1], table.dtype)
    values = np.array(update.values(h, step), dtype=np.float64)
    s0 = state[0] if len(state) > 0 else None
    s1 = state[1] if len(state) > 1 else None
    _dispatch.kernels.rowwise_update(update.kind, table, grads, order, starts, rows, slot, acc,
                                     s0, s1, values, h["maximize"], nthreads)


def merge_rows(indices, grads, num_rows, *, maximize=False):
    """Sum the gradient rows of duplicate lookups: ``(rows, merged)``.

    ``rows`` holds each touched row once, ascending (int64); ``merged[k]`` is the sum, in
    lookup order, of the ``grads`` rows whose index is ``rows[k]`` (negated when
    ``maximize``). The same result for any thread count. This is the first half of every
    row-wise step, exposed for measurement and for building coalesced gradients.

    >>> import numpy as np
    >>> rows, merged = merge_rows(np.array([5, 2, 5]), np.array([[1.], [2.], [3.]]), 8)
    >>> rows.tolist(), merged.tolist()
    ([2, 5], [[2.0], [4.0]])
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows, numbers.Integral) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    if not isinstance(grads, np.ndarray) or grads.ndim != 2:
        raise ValueError("grads must be a 2-D numpy.ndarray (lookups, dim)")
    if grads.dtype not in (np.float32, np.float64):
        raise TypeError(f"grads must be float32 or float64, got {grads.dtype}")
    maximize = check_bool(maximize, "maximize")
    indices, grads = _check_lookups(int(num_rows), grads.shape[1], grads.dtype, indices, grads)
    nthreads = get_num_threads()
    order, starts, rows, slot = _group(indices, int(num_rows), nthreads)
    merged = np.empty((rows.shape[0], grads.shape[1]), dtype=grads.dtype)
    if merged.size:
        _dispatch.kernels.rowwise_merge(grads, order, starts, slot, merged, maximize, nthreads)
    return rows.copy(), merged  # (rows is a view of the work array)


# ------------------------------------------------------------------------------------------
# lrfast.functional: one in-place function per row-wise update
# ------------------------------------------------------------------------------------------

def _make_function(update: RowUpdate):
    state_names = [name for name, _ in update.state]

    def fn(table, indices, grads, *state, **kwargs):
        _check_table(table)
        if len(state) != len(state_names):
            raise TypeError(f"{update.name}_() takes the state arrays {state_names} after grads, "
                            f"got {len(state)}")
        step = 1
        if update.uses_step:
            if "step" not in kwargs:
                raise TypeError(f"{update.name}_() missing required keyword argument: 'step'")
            step = check_step(kwargs.pop("step"))
        unknown = set(kwargs) - set(update.hypers)
        if unknown:
            raise TypeError(f"{update.name}_() got unexpected keyword arguments {sorted(unknown)}")
        h = _check_hypers(update, kwargs)
        indices, grads = _check_lookups(table.shape[0], table.shape[1], table.dtype, indices,
                                        grads)
        _check_state(update, table, list(state))
        _run(update, table, indices, grads, list(state), h, step, get_num_threads())

    fn.__name__ = fn.__qualname__ = update.name + "_"
    args = ", ".join(["table", "indices", "grads", *state_names])
    kw = ", ".join((["step"] if update.uses_step else [])
                   + [n if d is REQUIRED else f"{n}={d!r}" for n, d in update.hypers.items()])
    fn.__doc__ = (f"{update.name}_({args}, *, {kw})\n\n"
                  f"In place: the touched rows of ``table`` and of its state (see "
                  f":mod:`lrfast.embedding` for the formula). ``step`` is 1-based.")
    fn.__module__ = __name__
    return fn


sparse_sgd_ = _make_function(ROW_UPDATES["sparse_sgd"])
sparse_adagrad_ = _make_function(ROW_UPDATES["sparse_adagrad"])
rowwise_adagrad_ = _make_function(ROW_UPDATES["rowwise_adagrad"])
sparse_adam_ = _make_function(ROW_UPDATES["sparse_adam"])
rowwise_adam_ = _make_function(ROW_UPDATES["rowwise_adam"])


# ------------------------------------------------------------------------------------------
# Optimizer classes
# ------------------------------------------------------------------------------------------

class _RowOptimizer(StepCounters):
    """One embedding table and its state; ``step(indices, grads)`` updates the touched rows
    (an empty batch counts as a step, as in torch)."""

    _update: RowUpdate

    def __init__(self, table, hyper: dict, *, initial_accumulator_value: float = 0.0,
                 skip_nonfinite: bool = False):
        _check_table(table)
        self._table = table
        self._hyper = self._validate(hyper)
        self._skip_nonfinite = check_bool(skip_nonfinite, "skip_nonfinite")
        init = check_nonneg(initial_accumulator_value, "Invalid initial_accumulator_value value")
        self._state = {}
        for name, per_row in self._update.state:
            shape = table.shape[:1] if per_row else table.shape
            fill = init if name == "state_sum" else 0.0
            self._state[name] = np.full(shape, fill, dtype=table.dtype)
        self._step_count = 0
        self._skipped = 0
        self._last_lr: float | None = None

    def _validate(self, hyper: dict) -> dict:
        h = dict(hyper)
        lr = check_lr(h["lr"])
        if "betas" in h:
            h["betas"] = check_betas(h["betas"])
        rest = {k: v for k, v in h.items() if k not in ("lr", "betas")}
        rest["lr"] = 0.0
        checked = _check_hypers(self._update, {**rest, **self._betas(h)})
        for k in rest:
            if k != "lr":
                h[k] = checked[k]
        h["lr"] = lr
        return h

    @staticmethod
    def _betas(h: dict) -> dict:
        if "betas" not in h:
            return {}
        return {"beta1": h["betas"][0], "beta2": h["betas"][1]}

    def _kernel_hypers(self, lr: float) -> dict:
        h = {k: v for k, v in self._hyper.items() if k != "betas"}
        h.update(self._betas(self._hyper))
        h["lr"] = lr
        return h

    # -- public API -------------------------------------------------------------------------

    @property
    def table(self) -> np.ndarray:
        return self._table

    @property
    def state(self) -> dict:
        """The state arrays by name (live views: the optimizer updates them in place)."""
        return dict(self._state)

    @property
    def lr(self):
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value):
        self._hyper["lr"] = check_lr(value)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (the table itself not counted)."""
        return sum(a.nbytes for a in self._state.values())

    def step(self, indices, grads) -> bool:
        """Update the rows ``indices`` touched, from their gradient rows ``grads``.

        Duplicate indices are summed first. Returns False (and changes nothing but
        ``skipped_steps``) when ``skip_nonfinite`` is set and a gradient value is NaN or
        infinite; True otherwise.
        """
        indices, grads = _check_lookups(self._table.shape[0], self._table.shape[1],
                                        self._table.dtype, indices, grads)
        lr = lr_value(self._hyper["lr"], self._step_count)
        nthreads = get_num_threads()
        if self._skip_nonfinite and grads.size and not _all_finite(grads, nthreads):
            self._skipped += 1
            return False
        step = self._step_count + 1
        _run(self._update, self._table, indices, grads, list(self._state.values()),
             self._kernel_hypers(lr), step, nthreads)
        self._step_count = step
        self._last_lr = lr
        return True

    def state_dict(self) -> dict:
        """A copy of everything needed to resume (the table itself is the caller's)."""
        hyper = dict(self._hyper)
        if callable(hyper["lr"]):
            hyper["lr"] = None
        return {"optimizer": type(self).__name__, "step_count": self._step_count,
                "skipped_steps": self._skipped, "hyperparams": hyper,
                "state": {k: v.copy() for k, v in self._state.items()}}

    def _named_state(self) -> list:
        """``[("table", table, {buffer: live array})]``: the one entry, in the form of
        ``Optimizer._named_state``, that ``lrfast.checkpoint`` saves and restores."""
        return [("table", self._table, dict(self._state))]

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``; everything is checked before anything changes."""
        self._commit_state(self._check_state_dict(state_dict))

    def _check_state_dict(self, state_dict) -> tuple:
        """Validate a state dict against this optimizer; return what ``_commit_state`` needs."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("optimizer", "step_count", "hyperparams", "state"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
        if state_dict["optimizer"] != name:
            raise ValueError(f"state_dict was saved by {state_dict['optimizer']!r}, not {name!r}")
        steps = state_dict["step_count"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state_dict['step_count'] must be an int >= 0, got {steps!r}")
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, numbers.Integral) or skipped < 0:
            raise ValueError(f"state_dict['skipped_steps'] must be an int >= 0, got {skipped!r}")
        saved = state_dict["hyperparams"]
        if not isinstance(saved, Mapping) or set(saved) != set(self._hyper):
            raise ValueError(f"state_dict['hyperparams'] must have the keys {sorted(self._hyper)}")
        hyper = dict(saved)
        if hyper["lr"] is None or callable(self._hyper["lr"]):
            hyper["lr"] = self._hyper["lr"]
        hyper = self._validate(hyper)
        state = state_dict["state"]
        if not isinstance(state, Mapping) or set(state) != set(self._state):
            raise ValueError(f"state_dict['state'] must have the buffers {sorted(self._state)}")
        for key, current in self._state.items():
            arr = state[key]
            if not isinstance(arr, np.ndarray) or arr.shape != current.shape:
                raise ValueError(f"state_dict['state'][{key!r}] must be an array of shape "
                                 f"{current.shape}")
            if arr.dtype != current.dtype:
                raise TypeError(f"state_dict['state'][{key!r}] must be {current.dtype}, "
                                f"got {arr.dtype}")
        return hyper, {key: state[key] for key in self._state}, int(steps), int(skipped)

    def _commit_state(self, checked: tuple) -> None:
        """Apply a validated state dict (cannot fail)."""
        hyper, state, steps, skipped = checked
        for key, current in self._state.items():
            current[...] = state[key]
        self._hyper = hyper
        self._step_count = steps
        self._skipped = skipped


class SparseSGD(_RowOptimizer):
    r"""SGD on the touched rows of an embedding table (torch's SGD on sparse gradients).

    :math:`w \leftarrow w - \eta\,(g + \lambda w)` for each touched row, ``g`` the sum of its
    lookups' gradient rows; :math:`\lambda` (``weight_decay``, default 0) decays touched rows
    only: an lrfast option that torch refuses for sparse gradients.
    """

    _update = ROW_UPDATES["sparse_sgd"]

    def __init__(self, table, lr=1e-3, weight_decay=0.0, maximize=False, *,
                 skip_nonfinite=False):
        super().__init__(table, {"lr": lr, "weight_decay": weight_decay, "maximize": maximize},
                         skip_nonfinite=skip_nonfinite)


class SparseAdagrad(_RowOptimizer):
    r"""Adagrad on the touched rows, one accumulator per element (torch's Adagrad on sparse
    gradients): :math:`s \leftarrow s + g^2`, :math:`w \leftarrow w - \eta_t\, g / (\sqrt{s} +
    \epsilon)`, :math:`\eta_t = \eta / (1 + (t - 1)\,\text{lr\_decay})`.

    Duchi, Hazan and Singer, *Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization* (JMLR 2011).
    """

    _update = ROW_UPDATES["sparse_adagrad"]

    def __init__(self, table, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False, *,
                 skip_nonfinite=False):
        super().__init__(table, {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
                                 "eps": eps, "maximize": maximize},
                         initial_accumulator_value=initial_accumulator_value,
                         skip_nonfinite=skip_nonfinite)


class RowWiseAdagrad(SparseAdagrad):
    r"""Adagrad with one accumulator per row (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``):
    :math:`s_r \leftarrow s_r + \frac{1}{d}\sum_j g_j^2`,
    :math:`w \leftarrow w - \eta_t\, g / (\sqrt{s_r} + \epsilon)`. State: 4 bytes per row.

    FBGEMM's default ``eps`` is 1e-8; lrfast keeps torch Adagrad's 1e-10 for both variants.
    """

    _update = ROW_UPDATES["rowwise_adagrad"]


class SparseAdam(_RowOptimizer):
    r"""Lazy Adam (torch's ``SparseAdam``): the moments of touched rows only are updated,

    .. math::
        m \mathrel{+}= (1-\beta_1)(g - m), \quad v \mathrel{+}= (1-\beta_2)(g^2 - v), \quad
        w \leftarrow w - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m}{\sqrt{v}+\epsilon}

    with ``t`` the optimizer's step count (not the row's). Kingma and Ba, *Adam* (ICLR 2015).
    """

    _update = ROW_UPDATES["sparse_adam"]

    def __init__(self, table, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 maximize=False, *, skip_nonfinite=False):
        super().__init__(table, {"lr": lr, "betas": betas, "eps": eps,
                                 "weight_decay": weight_decay, "maximize": maximize},
                         skip_nonfinite=skip_nonfinite)


class RowWiseAdam(SparseAdam):
    r"""Lazy Adam with one second moment per row, the mean of the squared gradient row
    (FBGEMM's ``PARTIAL_ROWWISE_ADAM`` idea, with SparseAdam's bias correction and eps): the
    state is ``dim + 1`` values per row instead of ``2 dim``."""

    _update = ROW_UPDATES["rowwise_adam"]
