"""In-place optimizer updates as functions, over one tensor or lists of tensors.

Each function takes the parameter, its gradient and its state buffers, either as single arrays
or as lists of arrays (one entry per tensor), and updates parameter and state in place with one
native call per dtype. Hyper-parameters are keyword-only. The same signatures, in pure NumPy,
are in :mod:`lrfast.reference`.

``step`` is the 1-based number of the update being made (torch's ``state['step']`` after its
increment): the first update is ``step=1``. Bias corrections (Adam), the learning-rate decay
(Adagrad) and the first momentum buffer (SGD) depend on it.

All inputs are checked before anything is written: a call that raises has changed nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _dispatch, _hyperparams
from ._tables import Bank, group_by_dtype
from ._threads import get_num_threads
from ._validation import check_array, check_bool, check_disjoint, check_same_layout, check_step

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_"]


def _as_lists(named) -> tuple[list[tuple[str, Any]], bool]:
    """[(name, list-or-None)] with one entry per tensor; single arrays become lists of one."""
    single = isinstance(named[0][1], np.ndarray)
    out: list[tuple[str, Any]] = []  # (name, list of arrays or None)
    n = None
    for name, value in named:
        if value is None:
            out.append((name, None))
            continue
        if single:
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"param is a single array, so {name} must be one too, got {type(value).__name__}"
                )
            value = [value]
        else:
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"{name} must be a numpy.ndarray or a list of them, got {type(value).__name__}"
                )
            value = list(value)
        if n is None:
            n = len(value)
        elif len(value) != n:
            raise ValueError(f"{name} has {len(value)} tensors, but param has {n}")
        out.append((name, value))
    return out, single


def _run(kernel, named, kwargs):
    """Validate ``named`` = [("param", ...), ("grad", ...), state...] and run ``kernel``."""
    rows, single = _as_lists(named)

    def what(name, k):
        return name if single else f"{name}[{k}]"

    params = rows[0][1]
    written, written_labels = [], []
    for name, arrays in rows:
        if arrays is None or name == "grad":
            continue
        for k, (a, p) in enumerate(zip(arrays, params)):
            check_array(a, what(name, k), writeable=True)
            if name != "param":
                check_same_layout(a, p, what(name, k), what("param", k))
            written.append(a)
            written_labels.append(what(name, k))
    if not params:
        return
    check_disjoint(written, written_labels)
    grads = rows[1][1]
    grad_labels = [what("grad", k) for k in range(len(params))]
    banks = []
    for dtype, indices in group_by_dtype(params).items():
        bank_rows = [
            None if arrays is None or name == "grad" else [arrays[i] for i in indices]
            for name, arrays in rows
        ]
        bank = Bank(dtype, indices, bank_rows, written)
        bank.gather(grads, params, grad_labels, len(indices) == len(params))
        banks.append(bank)
    kernel = getattr(_dispatch.kernels, kernel)
    nthreads = get_num_threads()
    for bank in banks:
        kernel(bank.table, bank.offsets, bank.is64, nthreads, **kwargs)


def sgd_(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
         nesterov=False, weight_decay=0.0, maximize=False):
    """SGD update in place; see :class:`lrfast.SGD` for the formula.

    ``momentum_buffer`` is required when ``momentum != 0``; at ``step=1`` it is overwritten with
    the gradient (torch's first-step initialisation), later steps use its contents.
    """
    h = _hyperparams.sgd(lr, momentum, dampening, weight_decay, nesterov, maximize)
    step = check_step(step)
    if callable(h["lr"]):
        raise TypeError("lr must be a float in lrfast.functional; call the schedule first")
    if h["momentum"] != 0 and momentum_buffer is None:
        raise ValueError("momentum != 0 needs a momentum_buffer")
    named = [("param", param), ("grad", grad),
             ("momentum_buffer", momentum_buffer if h["momentum"] != 0 else None)]
    _run("sgd_step", named, dict(
        lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
        weight_decay=h["weight_decay"], nesterov=h["nesterov"], maximize=h["maximize"],
        first_step=step == 1))


def adagrad_(param, grad, state_sum, *, step, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
             eps_inside_sqrt=False, maximize=False):
    """Adagrad update in place; see :class:`lrfast.Adagrad` for the formula."""
    h = _hyperparams.adagrad(lr, lr_decay, weight_decay, 0.0, eps, eps_inside_sqrt, maximize)
    step = check_step(step)
    if callable(h["lr"]):
        raise TypeError("lr must be a float in lrfast.functional; call the schedule first")
    _run("adagrad_step", [("param", param), ("grad", grad), ("state_sum", state_sum)], dict(
        lr=h["lr"], lr_decay=h["lr_decay"], weight_decay=h["weight_decay"], eps=h["eps"],
        eps_inside_sqrt=h["eps_inside_sqrt"], maximize=h["maximize"], step=step))


def rmsprop_(param, grad, square_avg, momentum_buffer=None, grad_avg=None, *, lr, alpha=0.99,
             eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    """RMSprop update in place; see :class:`lrfast.RMSprop` for the formula.

    ``momentum_buffer`` is required when ``momentum > 0``, ``grad_avg`` when ``centered``.
    """
    h = _hyperparams.rmsprop(lr, alpha, eps, weight_decay, momentum, centered, maximize)
    if callable(h["lr"]):
        raise TypeError("lr must be a float in lrfast.functional; call the schedule first")
    if h["momentum"] > 0 and momentum_buffer is None:
        raise ValueError("momentum > 0 needs a momentum_buffer")
    if h["centered"] and grad_avg is None:
        raise ValueError("centered=True needs a grad_avg buffer")
    named = [("param", param), ("grad", grad), ("square_avg", square_avg),
             ("momentum_buffer", momentum_buffer if h["momentum"] > 0 else None),
             ("grad_avg", grad_avg if h["centered"] else None)]
    _run("rmsprop_step", named, dict(
        lr=h["lr"], alpha=h["alpha"], eps=h["eps"], weight_decay=h["weight_decay"],
        momentum=h["momentum"], centered=h["centered"], maximize=h["maximize"]))


def adam_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay=0.0,
          decoupled=False, amsgrad=False, max_exp_avg_sq=None, maximize=False):
    """Adam (``decoupled=False``) or AdamW (``decoupled=True``) update in place.

    See :class:`lrfast.Adam` and :class:`lrfast.AdamW` for the formula. ``max_exp_avg_sq`` is
    required when ``amsgrad``.
    """
    h = _hyperparams.adam(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize)
    step = check_step(step)
    if callable(h["lr"]):
        raise TypeError("lr must be a float in lrfast.functional; call the schedule first")
    if h["amsgrad"] and max_exp_avg_sq is None:
        raise ValueError("amsgrad=True needs a max_exp_avg_sq buffer")
    named = [("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
             ("max_exp_avg_sq", max_exp_avg_sq if h["amsgrad"] else None)]
    _run("adam_step", named, dict(
        lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
        weight_decay=h["weight_decay"], decoupled=check_bool(decoupled, "decoupled"), amsgrad=h["amsgrad"],
        maximize=h["maximize"], step=step))
