"""In-place optimizer updates as functions, over one tensor or lists of tensors.

Each function takes the parameter, its gradient and its state buffers, either as single arrays
or as lists of arrays (one entry per tensor), and updates parameter and state in place with one
native call per dtype. Hyper-parameters are keyword-only; ``lr`` is required, the others default
as the optimizer classes do. The same signatures, in pure NumPy, are in :mod:`lrfast.reference`.

``step`` is the 1-based number of the update being made (torch's ``state['step']`` after its
increment): the first update is ``step=1``. Bias corrections (Adam), the learning-rate decay
(Adagrad) and the first momentum buffer (SGD) depend on it.

All inputs are checked before anything is written: a call that raises has changed nothing.

The functions are made from the update specs (``lrfast._specs.UPDATES``): one per update, named
after it with a trailing underscore, its signature and checks read from the spec.

Examples
--------
Two Adam steps on one tensor, the state buffers held by the caller:

>>> import numpy as np
>>> from lrfast import functional as F
>>> p = np.array([1.0, -2.0]); g = np.array([0.5, 0.5])
>>> m = np.zeros(2); v = np.zeros(2)
>>> F.adam_(p, g, m, v, step=1, lr=0.1)
>>> p.round(6).tolist()
[0.9, -2.1]
>>> F.sgd_([p], [g], step=1, lr=0.5)    # lists of tensors: one call for all of them
>>> p.round(6).tolist()
[0.65, -2.35]
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import _dispatch, _layout
from ._specs import REQUIRED, UPDATES, Update
from ._threads import get_num_threads
from ._validation import check_array, check_disjoint, check_same_layout, check_step

__all__ = [name + "_" for name in UPDATES]


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


def _run(update: Update, named, h: dict, step: int) -> None:
    """Validate ``named`` = [("param", ...), ("grad", ...), state...] and run the update."""
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
    values = update.kernel_values(h, _dispatch.kernels)
    banks = _layout.banks(params, [None if name == "grad" else arrays for name, arrays in rows],
                          written)
    covers_all = len(banks) == 1
    plans = [bank.plan(update.name) for bank in banks]
    for plan in plans:
        plan.set_hyper(values)
    # Every grad is checked before any kernel runs.
    bad = _dispatch.kernels.step_plans(plans, [bank.grads_of(grads, covers_all) for bank in banks],
                                       h["lr"], step, get_num_threads())
    if bad is not None:
        i, code, k = bad
        banks[i].raise_bad_grad((code, k), grads, params, grad_labels, covers_all)


def _signature(update: Update) -> inspect.Signature:
    """param, grad, the state buffers (optional ones default to None), then keyword-only: step
    when the update reads it, the hyper-parameters (lr required), keyword-only buffers."""
    P = inspect.Parameter
    params = [P("param", P.POSITIONAL_OR_KEYWORD), P("grad", P.POSITIONAL_OR_KEYWORD)]
    for b in update.buffers:
        if not b.keyword:
            params.append(P(b.argname, P.POSITIONAL_OR_KEYWORD,
                            default=REQUIRED if b.used is None else None))
    if update.takes_step:
        params.append(P("step", P.KEYWORD_ONLY))
    for h in update.hypers:
        if h.functional:
            params.append(P(h.name, P.KEYWORD_ONLY,
                            default=REQUIRED if h.name == "lr" else h.default))
    for b in update.buffers:
        if b.keyword:
            params.append(P(b.argname, P.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


def _apply(update: Update, a: dict) -> None:
    """The body of every generated function: ``a`` holds its arguments by name."""
    h = update.validate({h.name: a[h.name] for h in update.hypers if h.functional})
    step = check_step(a["step"]) if update.takes_step else 1
    if callable(h["lr"]):
        raise TypeError("lr must be a float in lrfast.functional; call the schedule first")
    named = [("param", a["param"]), ("grad", a["grad"])]
    for b in update.buffers:
        value = a[b.argname]
        if not b.is_used(h):
            value = None
        elif value is None:
            raise ValueError(update.missing_buffer_message(b))
        named.append((b.argname, value))
    _run(update, named, h, step)


def _make(update: Update) -> Callable[..., None]:
    """A real Python function with the spec's signature (so Python binds the arguments and
    words the errors, at no per-call cost), whose body hands them to :func:`_apply`. Made from
    source, the technique of collections.namedtuple and dataclasses."""
    name = update.name + "_"
    defaults: dict[str, Any] = {}
    parts: list[str] = []
    for p in _signature(update).parameters.values():
        if p.kind is p.KEYWORD_ONLY and "*" not in parts:
            parts.append("*")
        if p.default is REQUIRED:
            parts.append(p.name)
        else:  # the default object itself, looked up when the function is defined
            defaults[p.name] = p.default
            parts.append(f"{p.name}=_defaults[{p.name!r}]")
    source = f"def {name}({', '.join(parts)}):\n    _apply(_update, locals())\n"
    namespace: dict[str, Any] = {"_apply": _apply, "_update": update, "_defaults": defaults}
    exec(source, namespace)
    fn = namespace[name]
    fn.__module__ = __name__
    fn.__doc__ = (f"{update.title} update in place; the formula is in "
                  f":func:`lrfast.reference.{update.name}_` and the optimizer class.")
    return fn


globals().update({name + "_": _make(update) for name, update in UPDATES.items()})

if TYPE_CHECKING:  # what the loop above defines, for type checkers
    sgd_: Callable[..., None]
    adagrad_: Callable[..., None]
    rmsprop_: Callable[..., None]
    adam_: Callable[..., None]

