"""In-place optimizer updates as functions, over one tensor or lists of tensors.

Each function takes the parameter, its gradient and its state buffers, either as single arrays
or as lists of arrays (one entry per tensor), and updates parameter and state in place with one
native call per dtype. Hyper-parameters are keyword-only; ``lr`` is required, the others default
as the optimizer classes do. The same signatures, in pure NumPy, are in :mod:`lrfast.reference`.

``step`` is the 1-based number of the update being made (torch's ``state['step']`` after its
increment): the first update is ``step=1``. Bias corrections (Adam), the learning-rate decay
(Adagrad) and the first momentum buffer (SGD) depend on it.

Updates whose kernel reads per-step values derived from state the optimizer classes keep
(``Update.scalars``) take them as required keyword arguments: schedule-free's ``ckp1`` (with
``lr`` the warmup-scheduled lr), from :func:`lrfast.reference.schedule_free_values`.

All inputs are checked before anything is written: a call that raises has changed nothing.

Element types are the optimizer classes' (see :mod:`lrfast.optim`): float32, float64, float16
and bfloat16 arrays; state in the params' dtype or float32 for half params; half grads for
float32 params. The keyword-only options ``half_out`` (arrays receiving the updated float32
params rounded to bfloat16/float16), ``rounding``, ``seed`` (the step is the ``step``
argument, 1 for updates that do not take one) and ``bfloat16_bits`` mean what they mean there.

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

from . import _dispatch, _layout, _precision
from ._specs import REQUIRED, UPDATES, Update
from ._threads import get_num_threads
from ._validation import _real, check_array, check_bool, check_disjoint, check_step

__all__ = [name + "_" for name in UPDATES]

# The element-type options every function takes (see lrfast.optim: as the classes').
_OPTIONS = {"half_out": None, "rounding": "nearest", "seed": 0, "bfloat16_bits": False}


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


def _run(update: Update, named, h: dict, step: int, options: dict, scalars=()) -> None:
    """Validate ``named`` = [("param", ...), ("grad", ...), state...] and run the update
    (``scalars``: its per-step values, see ``Update.scalars``)."""
    bits = check_bool(options["bfloat16_bits"], "bfloat16_bits")
    rounding = _precision.check_rounding(options["rounding"])
    seed = _precision.check_seed(options["seed"])
    half_out = options["half_out"]
    if half_out is not None:
        named = named + [("half_out", half_out)]
    rows, single = _as_lists(named)

    def what(name, k):
        return name if single else f"{name}[{k}]"

    params = rows[0][1]
    written, written_labels = [], []
    storages: dict[str, list[str]] = {}
    for name, arrays in rows:
        if arrays is None or name == "grad":
            continue
        storages[name] = []
        for k, (a, p) in enumerate(zip(arrays, params)):
            storage = check_array(a, what(name, k), writeable=True, bfloat16_bits=bits)
            if name != "param":
                _check_buffer(name, storage, a, p, storages["param"][k], what(name, k),
                              what("param", k))
            storages[name].append(storage)
            written.append(a)
            written_labels.append(what(name, k))
    if not params:
        return
    check_disjoint(written, written_labels)
    grads = rows[1][1]
    grad_labels = [what("grad", k) for k in range(len(params))]
    # The grads' dtypes pick the plans (fp32 params may take half grads); a grad that is not
    # an array, or of a dtype its param does not take, is reported by the plan's check.
    grad_dtypes, grad_storages = [], []
    for k, (g, p, st) in enumerate(zip(grads, params, storages["param"])):
        gst = _precision.storage_of(g.dtype, bits) if isinstance(g, np.ndarray) else None
        ok = gst == st and g.dtype == p.dtype or st == "float32" and gst in _precision.HALF
        grad_dtypes.append(g.dtype if ok else p.dtype)
        grad_storages.append(gst if ok else st)
    state_names = [name for name, _ in rows[2:] if name != "half_out"]
    row_arrays = [params, None] + [arrays for name, arrays in rows[2:] if name != "half_out"]
    row_storages = [storages["param"], grad_storages] + [storages.get(name) for name in state_names]
    banks = _layout.banks(row_arrays, row_storages, written, grad_dtypes,
                          None if half_out is None else rows[-1][1],
                          None if half_out is None else storages["half_out"])
    covers_all = len(banks) == 1
    plans = [bank.plan(update.name) for bank in banks]
    values = update.kernel_values(h, _dispatch.kernels)
    for plan in plans:
        plan.set_hyper(values)
        plan.set_options(False, False, rounding, seed)
    # Every grad is checked before any kernel runs.
    bad = _dispatch.kernels.step_plans(plans, [bank.grads_of(grads, covers_all) for bank in banks],
                                       h["lr"], step, get_num_threads(), 1.0, scalars)
    if bad is not None:
        i, code, k = bad
        banks[i].raise_bad_grad((code, k), grads, params, grad_labels, covers_all)


def _check_buffer(name, storage, a, p, param_storage, what, param_what):
    """A state buffer or half copy laid out as its param, of a type the kernels take with it."""
    if a.shape != p.shape:
        raise ValueError(f"{what} has shape {a.shape}, but {param_what} has shape {p.shape}")
    if name == "half_out":
        if storage not in _precision.HALF or param_storage != "float32":
            raise TypeError(f"{what} has dtype {a.dtype}: a half copy is bfloat16 or float16, "
                            f"of float32 params ({param_what} is {p.dtype})")
    elif a.dtype != p.dtype and not (storage == "float32" and param_storage in _precision.HALF):
        raise TypeError(f"{what} has dtype {a.dtype}, but {param_what} has dtype {p.dtype} "
                        "(state is kept in the params' dtype, or in float32 for half params)")


def _signature(update: Update) -> inspect.Signature:
    """param, grad, the state buffers (optional ones default to None), then keyword-only: step
    when the update reads it, the hyper-parameters (lr required), keyword-only buffers."""
    P = inspect.Parameter
    params = [P("param", P.POSITIONAL_OR_KEYWORD), P("grad", P.POSITIONAL_OR_KEYWORD)]
    for b in update.buffers:
        if not b.keyword:
            params.append(P(b.argname, P.POSITIONAL_OR_KEYWORD,
                            default=REQUIRED if b.used is None else None))
    for b in update.scalar_state:  # 0-d arrays, one per call, advanced in place
        params.append(P(b.argname, P.POSITIONAL_OR_KEYWORD))
    if update.takes_step:
        params.append(P("step", P.KEYWORD_ONLY))
    if update.advance is None:  # per-step values the caller derives (required)
        for name in update.scalars:
            params.append(P(name, P.KEYWORD_ONLY))
    for h in update.hypers:
        if h.functional:
            params.append(P(h.name, P.KEYWORD_ONLY,
                            default=REQUIRED if h.name == "lr" else h.default))
    for b in update.buffers:
        if b.keyword:
            params.append(P(b.argname, P.KEYWORD_ONLY, default=None))
    for name, default in _OPTIONS.items():
        params.append(P(name, P.KEYWORD_ONLY, default=default))
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
    opts = {name: a[name] for name in _OPTIONS}
    if update.advance is None:  # per-step values the caller derives (schedule-free's ckp1)
        _run(update, named, h, step, opts, [_real(a[name], name) for name in update.scalars])
        return
    if isinstance(a["param"], (list, tuple)) and not a["param"]:
        _run(update, named, h, step, opts)  # (no tensors: no step, the scalar state stays)
        return
    arrays = _scalar_state(update, a, h)
    rnd = next(iter(arrays.values())).dtype.type
    scalars, new = update.step_scalars(h, step, h["lr"], {n: float(x) for n, x in arrays.items()},
                                       lambda x, fresh=False: float(rnd(x)))
    _run(update, named, h, step, opts, scalars)
    for name, value in new.items():  # only once the update has run
        arrays[name][...] = value


def _scalar_state(update: Update, a: dict, h: dict) -> dict:
    """The update's scalar state arguments, checked: writeable 0-d float32 or float64 arrays,
    all of one dtype (the state's values are rounded to it)."""
    out = {}
    for b in update.scalar_state:
        if not b.is_used(h):
            continue
        x = a[b.argname]
        if not isinstance(x, np.ndarray) or x.shape != ():
            raise TypeError(f"{b.argname} must be a 0-d numpy.ndarray (the scalar state, "
                            f"updated in place), got {type(x).__name__}"
                            f"{' of shape ' + str(x.shape) if isinstance(x, np.ndarray) else ''}")
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{b.argname} has dtype {x.dtype}; the scalar state is float32 "
                            "(float64 for float64 params)")
        if not x.flags.writeable:
            raise ValueError(f"{b.argname} is read-only")
        out[b.name] = x
    dtypes = {x.dtype for x in out.values()}
    if len(dtypes) > 1:
        raise TypeError(f"the scalar state {sorted(out)} must have one dtype, got "
                        f"{sorted(str(d) for d in dtypes)}")
    return out


def _make(update: Update, body: Callable[[Update, dict], None] = _apply) -> Callable[..., None]:
    """A real Python function with the spec's signature (so Python binds the arguments and
    words the errors, at no per-call cost), whose body hands them to ``body`` (by default
    :func:`_apply`). Made from source, the technique of collections.namedtuple and
    dataclasses."""
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
    namespace: dict[str, Any] = {"_apply": body, "_update": update, "_defaults": defaults}
    exec(source, namespace)
    fn = namespace[name]
    fn.__module__ = __name__
    fn.__doc__ = (f"{update.title} update in place; the formula is in "
                  f":func:`lrfast.reference.{update.name}_` and the optimizer class.")
    return fn


globals().update({name + "_": _make(update) for name, update in UPDATES.items()})


# ------------------------------------------------------------------------------------------
# Factored second moments: Adafactor. Not element-wise: its function runs the kernel's
# AdafactorPlan (see lrfast.optim.Adafactor) instead of a Plan; the signature is the spec's,
# as for every other update (row_var, col_var, variance: None where a param has no such
# buffer, as torch's functional adafactor takes them).
# ------------------------------------------------------------------------------------------

def _adafactor_apply(update: Update, a: dict) -> None:
    from .optim import _adafactor_run

    h = update.validate({h.name: a[h.name] for h in update.hypers if h.functional})
    if callable(h["lr"]):
        raise TypeError("lr must be a float in lrfast.functional; call the schedule first")
    step = check_step(a["step"])
    if a["half_out"] is not None:
        raise ValueError("adafactor_ does not write half copies (half_out): it updates "
                         "float32 and float64 params only")
    check_bool(a["bfloat16_bits"], "bfloat16_bits")
    _precision.check_rounding(a["rounding"])
    _precision.check_seed(a["seed"])
    rows, single = _as_lists([(name, a[name]) for name in
                              ("param", "grad", "row_var", "col_var", "variance")])
    _adafactor_run(dict(rows), single, h, step, get_num_threads())


globals()["adafactor_"] = _make(UPDATES["adafactor"], _adafactor_apply)

# The row-wise sparse updates of embedding tables (lrfast.embedding): in place over the touched
# rows, ``fn(table, indices, grads, *state, step=..., lr=..., ...)``.
from .embedding import (merge_rows, rowwise_adagrad_, rowwise_adam_, sparse_adagrad_,  # noqa: E402,F401
                        sparse_adam_, sparse_sgd_)

__all__ += ["merge_rows", "sparse_sgd_", "sparse_adagrad_", "rowwise_adagrad_", "sparse_adam_",
            "rowwise_adam_"]

if TYPE_CHECKING:  # what the loop above defines, for type checkers
    sgd_: Callable[..., None]
    adagrad_: Callable[..., None]
    rmsprop_: Callable[..., None]
    adam_: Callable[..., None]
    adamax_: Callable[..., None]
    radam_: Callable[..., None]
    adadelta_: Callable[..., None]
    rprop_: Callable[..., None]
    nadam_: Callable[..., None]
    asgd_: Callable[..., None]
    lion_: Callable[..., None]
    adopt_: Callable[..., None]
    lamb_: Callable[..., None]
    lars_: Callable[..., None]
    adafactor_: Callable[..., None]
    adamw_schedule_free_: Callable[..., None]
    sgd_schedule_free_: Callable[..., None]

