"""Optimizer classes: torch.optim's names, defaults and formulas over NumPy arrays.

Every optimizer updates all of its tensors with one native call per dtype (one parallel region),
in place and without allocating. Addresses of params and state are gathered once, at
construction; each step only checks the gradients and reads their addresses.

Step counting: ``step_count`` is the number of updates completed. A learning-rate schedule is
called with it before the update (the first update uses ``lr(0)``), and bias corrections use
``t = step_count + 1``, as torch does.

Options every optimizer takes (keyword-only):

``skip_nonfinite`` (default False)
    Before each update, one read-only native pass checks every gradient element (after
    unscaling). If any is NaN or infinite the whole step is skipped: no parameter or state
    element changes, ``step_count`` does not advance, ``skipped_steps`` goes up by one and
    ``step()`` returns False. Off, nothing is checked and nothing is slower.
``flush_subnormals`` (default False)
    Run the update with the CPU's flush-to-zero and denormals-are-zero modes on in the kernel's
    threads (restored afterwards; the rest of the process is unaffected). Subnormal gradients
    and moments then read and write as zero, which avoids the slow path some CPUs take on them.

``state_dtype`` (default None: the params' type)
    The state buffers' element type: float32 keeps float32 state for bfloat16/float16 params.
``half_out`` (default None)
    Arrays laid out as the params (list or dict; a FlatParams' half twin is used by itself), of
    dtype bfloat16 or float16, that receive the updated float32 params rounded to half
    precision in the same pass: the copy offloaded training sends back to the accelerator.
``rounding`` (default "nearest"), ``seed`` (default 0)
    How values are rounded into half-precision buffers (params, state, ``half_out``): to
    nearest, ties to even (as torch), or "stochastic": up with probability equal to the
    fraction of the gap, which keeps small updates to bfloat16 weights from being rounded
    away. The random bits are a hash of the seed, the step, the buffer and the element's index,
    so a run is reproducible for any number of threads.
``bfloat16_bits`` (default False)
    uint16 arrays (params, grads, state, ``half_out``) hold bfloat16 bit patterns.

Element types: params may be float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``
arrays, or uint16 arrays of bfloat16 bits with ``bfloat16_bits=True``); half-precision updates
compute in float32 and round each stored value. Grads have their params' dtype, or, for float32
params, a half-precision dtype (fp32 master weights with bf16/fp16 grads: each grad is widened
inside the update, never copied).

``step(grads, grad_scale=s)`` divides the gradients by a loss scale as part of the update (they
are multiplied by ``1/s``, computed in double and rounded to the gradient's dtype, as a
GradScaler's unscale does); the gradient arrays themselves are not modified.
"""
from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping

import numpy as np

from . import _dispatch, _layout, _precision
from ._precision import HALF
from ._specs import OPTIMIZERS, OptimizerSpec
from .flat import FlatParams
from ._threads import get_num_threads
from ._validation import (
    as_named,
    check_array,
    check_bool,
    _real,
    check_disjoint,
    label,
    lr_value,
)
from ._optim import GATHER_DTYPE, STEP_SKIPPED_NONFINITE

__all__ = ["Optimizer", *OPTIMIZERS]  # a class per optimizer of the spec table


class Optimizer:
    """Base class: params, state buffers, address tables, step, state_dict.

    Everything particular to an optimizer comes from its spec (``lrfast._specs.OPTIMIZERS``,
    named by the subclass's ``_spec``): which hyper-parameters it takes and how each is checked,
    which state buffers those values need and what they start at, and the kernel that runs the
    update. A subclass holds its signature and documentation, and passes its arguments on.
    """

    _spec: OptimizerSpec

    def __init__(self, params, arguments):
        """``arguments``: the subclass's arguments by name (its ``locals()``): the spec's
        hyper-parameters and the options every optimizer takes are read from it."""
        hyper = self._validate({name: arguments[name] for name in self._spec.arguments})
        skip_nonfinite = check_bool(arguments["skip_nonfinite"], "skip_nonfinite")
        flush_subnormals = check_bool(arguments["flush_subnormals"], "flush_subnormals")
        if flush_subnormals and not _dispatch.kernels.has_flush_to_zero():
            raise ValueError("flush_subnormals is not supported on this CPU architecture")
        self._bits = check_bool(arguments["bfloat16_bits"], "bfloat16_bits")
        self._state_dtype = _precision.check_state_dtype(arguments["state_dtype"])
        self._rounding = _precision.check_rounding(arguments["rounding"])
        self._seed = _precision.check_seed(arguments["seed"])
        self._skip_nonfinite = skip_nonfinite
        self._flush_subnormals = flush_subnormals
        self._skipped = 0
        self._flat = params if isinstance(params, FlatParams) else None
        half_out = arguments["half_out"]
        if self._flat is not None:
            # One tensor: the whole flat buffer, updated by a single loop.
            keys, arrays, is_dict = ["param"], [self._flat.param], False
            self._bits = self._bits or self._flat.bfloat16_bits
            if half_out is None and self._flat.half is not None:
                half_out = [self._flat.half]
        else:
            keys, arrays, is_dict = as_named(params, "params")
        if not arrays:
            raise ValueError("optimizer got an empty parameter list")
        labels = [label("params", k) for k in keys]
        self._storages = [check_array(a, what, writeable=True, bfloat16_bits=self._bits)
                          for a, what in zip(arrays, labels)]
        for st in self._storages:
            _precision.state_storage(self._state_dtype, st)
        self._half_out = self._check_half_out(half_out, keys, arrays, is_dict)
        check_disjoint(arrays + (self._half_out or []),
                       labels + [label("half_out", k) for k in keys] * bool(self._half_out))
        self._hyper = hyper
        self._keys = keys
        self._params = arrays
        self._labels = [label("grads", k) for k in keys]
        self._is_dict = is_dict
        self._step_count = 0
        self._last_lr = None
        self._busy = threading.Lock()
        self._allocate()

    def _check_half_out(self, half_out, keys, arrays, is_dict):
        """The half copies as a list in the params' order (None when not asked for)."""
        if half_out is None:
            return None
        if self._flat is not None and isinstance(half_out, (list, tuple)) and len(half_out) == 1:
            outs = list(half_out)
        elif is_dict:
            if not isinstance(half_out, Mapping) or set(half_out) != set(keys):
                raise ValueError("half_out must be a dict with the params' keys")
            outs = [half_out[k] for k in keys]
        else:
            outs = as_named(half_out, "half_out")[1]
            if len(outs) != len(arrays):
                raise ValueError(f"half_out has {len(outs)} arrays for {len(arrays)} params")
        for k, o, p, st in zip(keys, outs, arrays, self._storages):
            what = label("half_out", k)
            if check_array(o, what, writeable=True, bfloat16_bits=self._bits) not in HALF:
                raise TypeError(f"{what} has dtype {o.dtype}; half_out arrays are bfloat16 or "
                                "float16")
            if st != "float32":
                raise TypeError(f"{what}: a half copy is written from float32 params, but "
                                f"{label('params', k)} is {p.dtype}")
            if o.shape != p.shape:
                raise ValueError(f"{what} has shape {o.shape}, but its parameter has shape "
                                 f"{p.shape}")
        return outs

    # -- from the spec ----------------------------------------------------------------------

    @classmethod
    def _validate(cls, hyper: dict) -> dict:
        """Check a full class-level hyper-parameter dict; return the validated copy."""
        return cls._spec.collapse(cls._spec.validate(hyper))

    def _update_values(self, hyper) -> dict:
        """The update's values for validated class-level ``hyper`` (pairs split, fixed added)."""
        return self._spec.expand(hyper)

    def _active_state(self, hyper) -> tuple:
        """The state buffers these hyper-parameters use."""
        return self._spec.update.state_buffers(self._update_values(hyper))

    # -- layout -----------------------------------------------------------------------------

    def _allocate(self) -> None:
        """Allocate state (one contiguous buffer per group of element types and state name)
        and the address tables."""
        update = self._spec.update
        h = self._update_values(self._hyper)
        active = update.state_buffers(h)
        self._views: list[dict[str, np.ndarray]] = [dict() for _ in self._params]
        written = list(self._params) + list(self._half_out or [])
        # The state's dtype per param: the param's own, or float32 (state_dtype).
        state_dtypes = [self._state_dtype_of(p) for p in self._params]
        rows: list = [self._params, None]
        storages: list = [self._storages, self._storages]
        for buf in update.buffers:
            if buf.name not in active:
                rows.append(None)
                storages.append(None)
                continue
            views: list = [None] * len(self._params)
            for dtype in dict.fromkeys(state_dtypes):
                idx = [i for i, d in enumerate(state_dtypes) if d == dtype]
                flat = _precision.full(sum(self._params[i].size for i in idx),
                                       update.initial_value(buf.name, h), dtype)
                written.append(flat)
                at = 0
                for i in idx:
                    p = self._params[i]
                    views[i] = flat[at:at + p.size].reshape(p.shape)
                    self._views[i][buf.name] = views[i]
                    at += p.size
            rows.append(views)
            storages.append([_precision.storage_of(d, self._bits) for d in state_dtypes])
        out_storages = None if self._half_out is None else [
            _precision.storage_of(o.dtype, self._bits) for o in self._half_out]
        # Every bank's gradients are checked against all memory the step writes.
        self._banks = _layout.banks(rows, storages, written, [p.dtype for p in self._params],
                                    self._half_out, out_storages)
        self._single_bank = len(self._banks) == 1
        self._plans = [b.plan(update.name) for b in self._banks]
        # {(bank, grad dtype): plan}: the plans for grads of another type than the params'
        self._grad_plans = {(i, b.grad_dtype): plan
                            for i, (b, plan) in enumerate(zip(self._banks, self._plans))}
        self._sync_plans()

    def _state_dtype_of(self, param) -> np.dtype:
        """The dtype of ``param``'s state buffers: its own, or float32 (state_dtype)."""
        storage = _precision.storage_of(param.dtype, self._bits)
        if _precision.state_storage(self._state_dtype, storage) == storage:
            return param.dtype
        return np.dtype(np.float32)

    def _sync_plans(self):
        values = self._spec.update.kernel_values(self._update_values(self._hyper),
                                                 _dispatch.kernels)
        for plan in self._grad_plans.values():
            plan.set_hyper(values)
            plan.set_options(self._skip_nonfinite, self._flush_subnormals, self._rounding,
                             self._seed)

    def _switch_grad_plan(self, i, grad) -> bool:
        """Bank ``i``'s first grad has another dtype than its plan takes: use the plan for that
        dtype (made on first use) if the bank's params take it. False if they do not."""
        bank = self._banks[i]
        if not isinstance(grad, np.ndarray):
            return False
        key = (i, grad.dtype)
        plan = self._grad_plans.get(key)
        if plan is None:
            storage = _precision.storage_of(grad.dtype, self._bits)
            if bank.storages[0] != "float32" or storage not in HALF:
                return False
            plan = self._grad_plans[key] = bank.plan(self._spec.update.name, grad.dtype, storage)
            self._sync_plans()
        if plan is self._plans[i]:
            return False
        self._plans[i] = plan
        return True

    # -- public API -------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Updates completed so far."""
        return self._step_count

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN or infinite (``skip_nonfinite=True``)."""
        return self._skipped

    @property
    def skip_nonfinite(self) -> bool:
        return self._skip_nonfinite

    @property
    def flush_subnormals(self) -> bool:
        return self._flush_subnormals

    @property
    def last_lr(self):
        """The learning rate used by the last step (None before the first)."""
        return self._last_lr

    @property
    def lr(self):
        """The learning rate: a float or a schedule ``step -> float``."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value):
        self._hyper = self._validate({**self._hyper, "lr": value})
        self._sync_plans()

    @property
    def hyperparams(self) -> dict:
        """A copy of the validated hyper-parameters."""
        return dict(self._hyper)

    @property
    def params(self):
        """The arrays being optimized, as given (list or dict; a FlatParams' named views)."""
        if self._flat is not None:
            return dict(self._flat.params)
        if self._is_dict:
            return dict(zip(self._keys, self._params))
        return list(self._params)

    def _grad_list(self, grads):
        n = len(self._params)
        flat = self._flat
        if flat is not None:
            if grads is None or grads is flat or grads is flat.grad or grads is flat.grads:
                return [flat.grad]
            raise TypeError("an optimizer over FlatParams reads the FlatParams' own grad buffer: "
                            "call step() without arguments (write grads into flat.grads)")
        if grads is None:
            raise TypeError("step() needs the gradients (a list or dict like the params)")
        if self._is_dict:
            if not isinstance(grads, Mapping):
                raise TypeError(
                    "params were given as a dict, so grads must be a dict with the same keys, "
                    f"got {type(grads).__name__}"
                )
            if len(grads) != n or any(k not in grads for k in self._keys):
                known = set(self._keys)
                missing = [k for k in self._keys if k not in grads]
                extra = [k for k in grads if k not in known]
                raise ValueError(f"grads do not match params: missing {missing}, unexpected {extra}")
            return [grads[k] for k in self._keys]
        if not isinstance(grads, (list, tuple)):
            if isinstance(grads, Mapping):
                raise TypeError("params were given as a list, so grads must be a list or tuple")
            grads = as_named(grads, "grads")[1]
        if len(grads) != n:
            raise ValueError(f"expected {n} grads (one per parameter), got {len(grads)}")
        return grads

    def step(self, grads=None, *, grad_scale=1.0) -> bool:
        """Apply one update with ``grads`` (same kind, order, shapes and dtypes as the params;
        for a FlatParams, no argument: its ``grad`` buffer is used).

        ``grad_scale``: the loss scale the gradients carry; they are multiplied by
        ``1/grad_scale`` inside the update (the arrays are not modified).

        Returns True when the update was applied, False when it was skipped because a gradient
        is not finite (only with ``skip_nonfinite=True``). Everything is checked before anything
        is written: a step that raises, or is skipped, changes nothing but ``skipped_steps``.
        """
        inv_scale = _inverse_scale(grad_scale)
        # The kernel runs without the GIL, so a second Python thread could enter step() on the
        # same optimizer meanwhile and overwrite its gradient addresses: refuse that instead.
        if not self._busy.acquire(False):
            raise RuntimeError(
                f"{type(self).__name__}.step() is already running in another thread; steps of "
                "one optimizer must not overlap (use one optimizer per thread, or a lock)"
            )
        try:
            grads = self._grad_list(grads)
            lr = self._hyper["lr"]
            if callable(lr):
                lr = lr_value(lr, self._step_count)
            t = self._step_count + 1
            nthreads = get_num_threads()
            while True:
                if self._single_bank:
                    bad = self._plans[0].step(grads, lr, t, nthreads, inv_scale)
                    i, bad = 0, None if bad is None else (0, *bad)
                else:
                    bad = _dispatch.kernels.step_plans(
                        self._plans, [bank.grads_of(grads, False) for bank in self._banks],
                        lr, t, nthreads, inv_scale)
                if bad is None:
                    break
                i, code, k = bad
                if code == STEP_SKIPPED_NONFINITE:
                    self._skipped += 1
                    return False
                # Grads of another element type than the last step's (fp32 params with half
                # grads): switch plans and check again; anything else is an error.
                if not (code == GATHER_DTYPE and k == 0 and self._switch_grad_plan(
                        i, self._banks[i].grads_of(grads, self._single_bank)[0])):
                    self._banks[i].raise_bad_grad((code, k), grads, self._params, self._labels,
                                                  self._single_bank)
            self._step_count = t
            self._last_lr = lr
            return True
        finally:
            self._busy.release()

    def state_dict(self) -> dict:
        """A copy of everything needed to resume: step count, hyper-parameters, state buffers.

        The learning rate is saved as a float, or as None when it is a schedule (a schedule is
        a pure function of ``step_count`` and is not saved).
        """
        hyper = dict(self._hyper)
        if callable(hyper["lr"]):
            hyper["lr"] = None
        return {
            "optimizer": type(self).__name__,
            "step_count": self._step_count,
            "skipped_steps": self._skipped,
            "hyperparams": hyper,
            "state": {
                key: {name: view.copy() for name, view in views.items()}
                for key, _, views in self._named_state()
            },
        }

    def _named_state(self):
        """(key, parameter view, {buffer: state view}) per named parameter."""
        if self._flat is None:
            return list(zip(self._keys, self._params, self._views))
        flat = self._flat
        per_buffer = {name: flat.views(view) for name, view in self._views[0].items()}
        return [(key, flat.params[key], {name: per_buffer[name][key] for name in per_buffer})
                for key in flat.names]

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``; everything is checked before anything changes.

        The saved learning rate replaces the current one only when both are numbers: a schedule
        given to this optimizer is kept, and resumes at the loaded ``step_count``.
        """
        self._commit_state(self._check_state_dict(state_dict))

    def _check_state_dict(self, state_dict):
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
        if (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0
                or steps >= 2**62):  # type: ignore[operator]  # typeshed: Integral has no __ge__
            raise ValueError(
                f"state_dict['step_count'] must be an int in [0, 2**62), got {steps!r}")
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, numbers.Integral) or skipped < 0:
            raise ValueError(f"state_dict['skipped_steps'] must be an int >= 0, got {skipped!r}")
        saved = state_dict["hyperparams"]
        if not isinstance(saved, Mapping) or set(saved) != set(self._hyper):
            raise ValueError(
                f"state_dict['hyperparams'] must have the keys {sorted(self._hyper)}, "
                f"got {sorted(saved) if isinstance(saved, Mapping) else saved!r}"
            )
        hyper = dict(saved)
        if hyper["lr"] is None or callable(self._hyper["lr"]):
            hyper["lr"] = self._hyper["lr"]
        hyper = self._validate(hyper)
        state = state_dict["state"]
        entries = self._named_state()
        keys = [key for key, _, _ in entries]
        if not isinstance(state, Mapping) or set(state) != set(keys):
            raise ValueError(
                f"state_dict['state'] must have one entry per parameter {keys}, "
                f"got {list(state) if isinstance(state, Mapping) else state!r}"
            )
        active = self._active_state(hyper)
        for key, p, _ in entries:
            entry = state[key]
            want = self._state_dtype_of(p)
            if not isinstance(entry, Mapping) or set(entry) != set(active):
                raise ValueError(
                    f"state_dict['state'][{key!r}] must hold {sorted(active)}, "
                    f"got {sorted(entry) if isinstance(entry, Mapping) else entry!r}"
                )
            for buf_name in active:
                arr = entry[buf_name]
                what = f"state_dict['state'][{key!r}][{buf_name!r}]"
                if not isinstance(arr, np.ndarray):
                    raise TypeError(f"{what} must be a numpy.ndarray, got {type(arr).__name__}")
                if arr.shape != p.shape:
                    raise ValueError(f"{what} has shape {arr.shape}, but the parameter has shape {p.shape}")
                if arr.dtype != want:
                    raise TypeError(f"{what} has dtype {arr.dtype}, but this optimizer keeps "
                                    f"it as {want}")
        return hyper, active, state, int(steps), int(skipped)

    def _commit_state(self, checked):
        """Apply a validated state dict (cannot fail)."""
        hyper, active, state, steps, skipped = checked
        if active != self._active_state(self._hyper):
            self._hyper = hyper
            self._allocate()
        self._hyper = hyper
        self._sync_plans()
        for key, _, views in self._named_state():
            for buf_name, view in views.items():
                np.copyto(view, state[key][buf_name])
        self._step_count = steps
        self._skipped = skipped

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({len(self._params)} tensors, {hp})"


def _inverse_scale(grad_scale) -> float:
    if type(grad_scale) in (float, int) and grad_scale == 1:  # the common case, first
        return 1.0
    s = _real(grad_scale, "grad_scale")
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"grad_scale must be finite and > 0, got {grad_scale!r}")
    return 1.0 / s


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, Nesterov momentum and weight decay.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    weight_decay : float, default 0 (L2 penalty added to the gradient)
    nesterov : bool, default False
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`g_t` the gradient (negated when maximizing) and :math:`\lambda` the weight decay:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        b_t &= \begin{cases} g_t & t = 1 \\ \mu\,b_{t-1} + (1-\tau)\,g_t & t > 1 \end{cases} \\
        g_t &\leftarrow g_t + \mu\,b_t \ \text{(Nesterov)} \quad\text{or}\quad g_t \leftarrow b_t \\
        \theta_t &= \theta_{t-1} - \eta\,g_t

    As torch.optim.SGD (Sutskever et al., 2013, for the momentum form). The buffer starts as the
    first gradient, without dampening.

    Examples
    --------
    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, 2.0])
    >>> opt = lrfast.SGD([w], lr=0.1, momentum=0.9)
    >>> opt.step([np.array([0.5, -1.0])])      # the buffer starts as the gradient
    True
    >>> w.tolist()
    [0.95, 2.1]
    >>> opt.step([np.array([0.5, -1.0])])      # buffer 0.9 * g + g = 1.9 g
    True
    >>> w.round(6).tolist()
    [0.855, 2.29]
    """

    _spec = OPTIMIZERS["SGD"]

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        super().__init__(params, locals())


class Adagrad(Optimizer):
    r"""Adagrad: per-element step sizes from the sum of squared gradients.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-2
    lr_decay : float, default 0
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    eps : float, default 1e-10
    eps_inside_sqrt : bool, default False
        False: :math:`\sqrt{s_t} + \epsilon` as torch; True: :math:`\sqrt{s_t + \epsilon}` as the
        seed articles' AdaGrad and optax.
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        \tilde\eta_t &= \eta / (1 + (t-1)\,\delta) \\
        s_t &= s_{t-1} + g_t^2 \\
        \theta_t &= \theta_{t-1} - \tilde\eta_t\, g_t / (\sqrt{s_t} + \epsilon)

    Duchi, Hazan and Singer, 2011; formulas as torch.optim.Adagrad.

    Examples
    --------
    The first step divides by the gradient's own size, the second by sqrt(4 + 4):

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0])
    >>> opt = lrfast.Adagrad([w], lr=0.1)
    >>> opt.step([np.array([2.0])]); w.round(6).tolist()
    True
    [0.9]
    >>> opt.step([np.array([2.0])]); w.round(6).tolist()
    True
    [0.829289]
    """

    _spec = OPTIMIZERS["Adagrad"]

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, eps_inside_sqrt=False,
                 maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        super().__init__(params, locals())


class RMSprop(Optimizer):
    r"""RMSprop, optionally centered and with momentum.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-2
    alpha : float, default 0.99 (smoothing constant, in [0, 1])
    eps : float, default 1e-8 (added outside the square root, as torch)
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        v_t &= \alpha\, v_{t-1} + (1-\alpha)\, g_t^2 \\
        \bar g_t &= \operatorname{lerp}(\bar g_{t-1}, g_t, 1-\alpha) \ \text{(centered)} \\
        d_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered)} \quad\text{else}\quad
               \sqrt{v_t} + \epsilon \\
        b_t &= \mu\, b_{t-1} + g_t / d_t,\ \theta_t = \theta_{t-1} - \eta\, b_t \ (\mu > 0)
               \quad\text{else}\quad \theta_t = \theta_{t-1} - \eta\, g_t / d_t

    Hinton's lecture 6e (2012); centered form from Graves (2013); formulas as torch.optim.RMSprop.

    Examples
    --------
    A unit gradient: the average of squares is 1 - alpha = 0.01, so the step is
    lr / sqrt(0.01) = 10 lr:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0])
    >>> opt = lrfast.RMSprop([w], lr=0.01)
    >>> opt.step([np.array([1.0])]); w.round(6).tolist()
    True
    [0.9]
    >>> sorted(opt.state_dict()["state"][0])
    ['square_avg']
    """

    _spec = OPTIMIZERS["RMSprop"]

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        super().__init__(params, locals())


class Adam(Optimizer):
    r"""Adam, with optional AMSGrad and L2 weight decay.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8 (added to the bias-corrected square root, as torch)
    weight_decay : float, default 0 (added to the gradient; see AdamW for decoupled decay)
    amsgrad : bool, default False
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`t` = ``step_count + 1``:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1) \\
        v_t &= \beta_2\, v_{t-1} + (1-\beta_2)\, g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \ \text{(AMSGrad, else } \hat v_t = v_t) \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1-\beta_2^t} + \epsilon}

    Kingma and Ba, 2015; AMSGrad from Reddi, Kale and Kumar, 2018; formulas as torch.optim.Adam,
    the last line evaluated as :math:`\theta - \frac{\eta\sqrt{1-\beta_2^t}}{1-\beta_1^t}
    \frac{m_t}{\sqrt{\hat v_t} + \epsilon\sqrt{1-\beta_2^t}}` (equal, one division per element).

    Examples
    --------
    Adam's first step moves each element by about ``lr`` against its gradient's sign, whatever
    the gradient's size:

    >>> import numpy as np
    >>> import lrfast
    >>> w = {"w": np.array([1.0, -2.0])}
    >>> opt = lrfast.Adam(w, lr=0.1)
    >>> opt.step({"w": np.array([0.5, -3.0])})
    True
    >>> w["w"].round(6).tolist()
    [0.9, -1.9]
    >>> opt.step_count, opt.last_lr
    (1, 0.1)
    """

    _spec = OPTIMIZERS["Adam"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        super().__init__(params, locals())


class AdamW(Adam):
    r"""Adam with decoupled weight decay.

    The same as :class:`Adam` except that weight decay shrinks the parameter directly,
    :math:`\theta \leftarrow \theta\,(1 - \eta\lambda)`, before the Adam update, instead of being
    added to the gradient. Default ``weight_decay=1e-2``. Loshchilov and Hutter, 2019; formulas
    as torch.optim.AdamW.

    Examples
    --------
    The decay scales the weights by 1 - lr * weight_decay = 0.999 before the Adam step:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.AdamW([w], lr=0.1, weight_decay=0.01)
    >>> opt.step([np.array([0.5, -3.0])])
    True
    >>> w.round(6).tolist()
    [0.899, -1.898]
    """

    _spec = OPTIMIZERS["AdamW"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        Optimizer.__init__(self, params, locals())


# ------------------------------------------------------------------------------------------
# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Updates with per-step scalar state: NAdam (mu_product), ASGD (eta, mu)
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Updates from outside torch.optim: Lion, ADOPT
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Per-tensor trust ratios: LAMB, LARS
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Factored second moments: Adafactor
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Schedule-free AdamW and SGD
# ------------------------------------------------------------------------------------------


def _schedule_free_step_values(k, lr, hyper, lr_max, weight_sum):
    """(scheduled lr, ckp1, new lr_max, new weight_sum) of step ``k`` (0-based), in the
    schedulefree package's arithmetic (see lrfast.reference.schedule_free_values)."""
    warmup = hyper["warmup_steps"]
    lr = lr * ((k + 1) / warmup if k < warmup else 1.0)
    lr_max = max(lr, lr_max)
    weight = ((k + 1) ** hyper["r"]) * (lr_max ** hyper["weight_lr_power"])
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return lr, ckp1, lr_max, weight_sum


def _widen_into(dst, src, storage):
    """dst (float32) <- src, a bfloat16/float16 array (or uint16 bfloat16 bits) widened."""
    if storage == "bfloat16":
        dst[...] = (src.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        dst[...] = src.view(np.float16).astype(np.float32)


class _ScheduleFree(Optimizer):
    r"""What :class:`AdamWScheduleFree` and :class:`SGDScheduleFree` share.

    The params hold y (where gradients are taken) while training, and x (the average, where
    the model is evaluated) after :meth:`eval`; the state keeps z, the base sequence, which
    starts as a copy of the params. The optimizer keeps the package's group scalars: k (here
    ``step_count``), ``lr_max``, ``weight_sum``, ``scheduled_lr`` and the train/eval mode.
    Unlike the package's classes, a new optimizer is in train mode: its z equals the params,
    so x = y and the package's first ``train()`` would change nothing.
    """

    _beta_argument: str  # the hyper-parameter holding beta: "betas" (its first) or "momentum"

    def __init__(self, params, arguments):
        self._train_mode = True
        self._lr_max = -1.0
        self._weight_sum = 0.0
        self._scheduled_lr = 0.0
        super().__init__(params, arguments)

    def _beta(self) -> float:
        value = self._hyper[self._beta_argument]
        return value[0] if isinstance(value, tuple) else value

    def _allocate(self) -> None:
        super()._allocate()
        # z starts as the param (in the state's element type)
        for p, st, views in zip(self._params, self._storages, self._views):
            z = views["z"]
            if z.dtype == p.dtype:
                np.copyto(z, p)
            else:
                _widen_into(z, p, st)
        # One (table, offsets, param type, z type, half copy type) per bank for train()/eval():
        # rows params and z, and the half copy's when the bank writes one.
        self._swap_tables = []
        z_row = 2  # the update's first state row
        for bank in self._banks:
            rows = [0, z_row] + ([bank.table.shape[0] - 1] if bank.out is not None else [])
            self._swap_tables.append((np.ascontiguousarray(bank.table[rows]), bank.offsets,
                                      bank.storages[0], bank.storages[z_row], bank.out))

    # -- train / eval -----------------------------------------------------------------------

    @property
    def train_mode(self) -> bool:
        """True while the params hold y (training), False while they hold x (evaluation)."""
        return self._train_mode

    @property
    def scheduled_lr(self) -> float:
        """The warmup-scheduled lr of the last step (0 before the first)."""
        return self._scheduled_lr

    def _interpolate(self, weight: float) -> None:
        nthreads = get_num_threads()
        # Stochastic rounding draws from a step number no update uses (the top bit set).
        step = (1 << 63) | self._step_count
        if not self._busy.acquire(False):
            raise RuntimeError(f"{type(self).__name__}.step() is running in another thread; "
                               "train() and eval() must not overlap it")
        try:
            for table, offsets, pst, zst, out in self._swap_tables:
                _dispatch.kernels.schedule_free_interpolate(table, offsets, pst, zst, weight,
                                                            nthreads, out, self._rounding,
                                                            self._seed, step)
        finally:
            self._busy.release()

    def eval(self) -> None:
        """Put the params at x, the average (for evaluation and for saving a model): each
        param becomes lerp(y, z, 1 - 1/beta). Nothing happens in eval mode."""
        if self._train_mode:
            self._interpolate(1 - 1 / self._beta())
            self._train_mode = False

    def train(self) -> None:
        """Put the params back at y, where gradients are taken: each param becomes
        lerp(x, z, 1 - beta). Nothing happens in train mode."""
        if not self._train_mode:
            self._interpolate(1 - self._beta())
            self._train_mode = True

    # -- step -------------------------------------------------------------------------------

    def step(self, grads=None, *, grad_scale=1.0) -> bool:
        """As :meth:`Optimizer.step`; the step must be taken in train mode (call
        :meth:`train` after :meth:`eval`). A skipped step changes nothing, the group scalars
        (k, lr_max, weight_sum) included."""
        if not self._train_mode:
            raise RuntimeError("Optimizer was not in train mode when step is called. Please "
                               "insert .train() and .eval() calls on the optimizer. See "
                               "documentation for details.")
        inv_scale = _inverse_scale(grad_scale)
        if not self._busy.acquire(False):
            raise RuntimeError(
                f"{type(self).__name__}.step() is already running in another thread; steps of "
                "one optimizer must not overlap (use one optimizer per thread, or a lock)"
            )
        try:
            grads = self._grad_list(grads)
            lr = self._hyper["lr"]
            if callable(lr):
                lr = lr_value(lr, self._step_count)
            k = self._step_count
            lr_k, ckp1, lr_max, weight_sum = _schedule_free_step_values(
                k, lr, self._hyper, self._lr_max, self._weight_sum)
            scalars = (ckp1,)
            t = k + 1
            nthreads = get_num_threads()
            while True:
                if self._single_bank:
                    bad = self._plans[0].step(grads, lr_k, t, nthreads, inv_scale, scalars)
                    i, bad = 0, None if bad is None else (0, *bad)
                else:
                    bad = _dispatch.kernels.step_plans(
                        self._plans, [bank.grads_of(grads, False) for bank in self._banks],
                        lr_k, t, nthreads, inv_scale, scalars)
                if bad is None:
                    break
                i, code, idx = bad
                if code == STEP_SKIPPED_NONFINITE:
                    self._skipped += 1
                    return False
                if not (code == GATHER_DTYPE and idx == 0 and self._switch_grad_plan(
                        i, self._banks[i].grads_of(grads, self._single_bank)[0])):
                    self._banks[i].raise_bad_grad((code, idx), grads, self._params,
                                                  self._labels, self._single_bank)
            self._step_count = t
            self._last_lr = lr
            self._scheduled_lr = lr_k
            self._lr_max = lr_max
            self._weight_sum = weight_sum
            return True
        finally:
            self._busy.release()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """:meth:`Optimizer.state_dict` and ``"schedule_free"``: the group scalars
        ``lr_max``, ``weight_sum``, ``scheduled_lr`` and ``train_mode`` (k is ``step_count``).
        Save in eval mode, as the package advises, to keep x in the saved model."""
        sd = super().state_dict()
        sd["schedule_free"] = {"lr_max": self._lr_max, "weight_sum": self._weight_sum,
                               "scheduled_lr": self._scheduled_lr,
                               "train_mode": self._train_mode}
        return sd

    def _check_state_dict(self, state_dict):
        checked = super()._check_state_dict(state_dict)
        group = state_dict.get("schedule_free")
        keys = {"lr_max", "weight_sum", "scheduled_lr", "train_mode"}
        if not isinstance(group, Mapping) or set(group) != keys:
            raise ValueError(f"state_dict['schedule_free'] must be a dict with the keys "
                             f"{sorted(keys)}, got {group!r}")
        values = {}
        for name in ("lr_max", "weight_sum", "scheduled_lr"):
            v = _real(group[name], f"state_dict['schedule_free'][{name!r}]")
            if not math.isfinite(v):
                raise ValueError(f"state_dict['schedule_free'][{name!r}] must be finite, "
                                 f"got {group[name]!r}")
            values[name] = v
        values["train_mode"] = check_bool(group["train_mode"],
                                          "state_dict['schedule_free']['train_mode']")
        return checked, values

    def _commit_state(self, checked):
        checked, values = checked
        super()._commit_state(checked)
        self._lr_max = values["lr_max"]
        self._weight_sum = values["weight_sum"]
        self._scheduled_lr = values["scheduled_lr"]
        self._train_mode = values["train_mode"]


class AdamWScheduleFree(_ScheduleFree):
    r"""Schedule-free AdamW: no learning-rate decay schedule, a linear warmup built in, and the
    average of the iterates to evaluate at.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 0.0025
    betas : (float, float), default (0.9, 0.999); 0 < beta1 < 1
    eps : float, default 1e-8
    weight_decay : float, default 0 (at y, added to the normalised gradient)
    warmup_steps : int, default 0 (linear warmup of the lr over this many steps)
    r : float, default 0 (the averaging weights grow as (k+1)^r)
    weight_lr_power : float, default 2 (and as lr_max^weight_lr_power)
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    The params hold :math:`y`; the state :math:`z` (starting as the params) and :math:`v`.
    Step :math:`k` (0-based, ``step_count``), with :math:`t = k+1`:

    .. math::
        \eta_k &= \eta \min(1, t / \text{warmup\_steps}), \quad
        \eta_{\max} \leftarrow \max(\eta_{\max}, \eta_k) \\
        w_k &= t^r \eta_{\max}^{\,\text{weight\_lr\_power}}, \quad W \leftarrow W + w_k, \quad
        c = w_k / W \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        d = g / (\sqrt{v / (1 - \beta_2^t)} + \epsilon) + \lambda y \\
        y &\leftarrow \operatorname{lerp}(y, z, c) + \eta_k (\beta_1 (1 - c) - 1)\, d, \quad
        z \leftarrow z - \eta_k d

    :meth:`eval` sets the params to :math:`x = \operatorname{lerp}(y, z, 1 - 1/\beta_1)`,
    :meth:`train` back to :math:`y = \operatorname{lerp}(x, z, 1 - \beta_1)`; a step in eval
    mode is an error. A callable ``lr`` (an lrfast schedule) gives :math:`\eta` at each step,
    before the warmup factor. Defazio et al., 2024 ("The Road Less Scheduled"); formulas as the
    schedulefree package's AdamWScheduleFree.

    Examples
    --------
    The first step has c = 1: y moves to z, then both take the step, whose normalised gradient
    is sign(g) (up to eps): y = z = w - lr sign(g).

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.AdamWScheduleFree([w], lr=0.1)
    >>> opt.step([np.array([0.5, -3.0])])
    True
    >>> w.round(6).tolist()
    [0.9, -1.9]
    >>> opt.step([np.array([0.5, -3.0])])   # c = 1/2: y = (y + z)/2 + 0.1 (0.9/2 - 1) sign(g)
    True
    >>> opt.eval(); w.round(6).tolist()     # x = lerp(y, z, 1 - 1/0.9)
    [0.85, -1.85]
    >>> opt.train()
    """

    _spec = OPTIMIZERS["AdamWScheduleFree"]
    _beta_argument = "betas"

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, *,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        super().__init__(params, locals())


class SGDScheduleFree(_ScheduleFree):
    r"""Schedule-free SGD: momentum through interpolation and averaging, no decay schedule, a
    linear warmup built in.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1.0
    momentum : float, default 0.9; 0 < momentum < 1
    weight_decay : float, default 0 (at y, added to the gradient)
    warmup_steps : int, default 0 (linear warmup of the lr over this many steps)
    r : float, default 0 (the averaging weights grow as (k+1)^r)
    weight_lr_power : float, default 2 (and as lr_max^weight_lr_power)
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    As :class:`AdamWScheduleFree` (the same :math:`\eta_k` and :math:`c`), without the second
    moment, :math:`\mu` for :math:`\beta_1`:

    .. math::
        d &= g + \lambda y \\
        y &\leftarrow \operatorname{lerp}(y, z, c) + \eta_k (\mu (1 - c) - 1)\, d, \quad
        z \leftarrow z - \eta_k d

    :meth:`eval`: :math:`x = \operatorname{lerp}(y, z, 1 - 1/\mu)`; :meth:`train`:
    :math:`y = \operatorname{lerp}(x, z, 1 - \mu)`. Defazio et al., 2024; formulas as the
    schedulefree package's SGDScheduleFree.

    Examples
    --------
    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0])
    >>> opt = lrfast.SGDScheduleFree([w], lr=0.1, momentum=0.5)
    >>> opt.step([np.array([2.0])]); w.round(6).tolist()    # c = 1: y = z = 1 - 0.1 * 2
    True
    [0.8]
    >>> opt.step([np.array([2.0])]); w.round(6).tolist()    # z = 0.6, y = 0.8 - 0.1 * 0.75 * 2
    True
    [0.65]
    >>> opt.eval(); w.round(6).tolist()                     # x = lerp(y, z, -1) = 2y - z
    [0.7]
    """

    _spec = OPTIMIZERS["SGDScheduleFree"]
    _beta_argument = "momentum"

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, *,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False):
        super().__init__(params, locals())
