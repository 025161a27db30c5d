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
``ema`` (default None)
    An :class:`lrfast.Averager` over the same params: each applied step also updates the
    average, fused into the update's pass (each tile of params is averaged right after it is
    written). A skipped step leaves it alone; ``state_dict()`` and checkpoints include it (an
    ``"average"`` buffer per param and the ``"averager"`` counters).

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
from ._counters import StepCounters
from ._precision import HALF
from ._specs import OPTIMIZERS, OptimizerSpec
from .averaging import Averager
from . import quantization as _quantization
from .quantization import Int8State
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
from . import _validation
from ._optim import (GATHER_DTYPE, GATHER_MISALIGNED, GATHER_NOT_ARRAY,
                     GATHER_NOT_CONTIGUOUS, GATHER_OVERLAP, GATHER_SHAPE,
                     STEP_SKIPPED_NONFINITE)

__all__ = ["Optimizer", *OPTIMIZERS]  # a class per optimizer of the spec table


class Optimizer(StepCounters):
    """Base class: params, state buffers, address tables, step, state_dict.

    Everything particular to an optimizer comes from its spec (``lrfast._specs.OPTIMIZERS``,
    named by the subclass's ``_spec``): which hyper-parameters it takes and how each is checked,
    which state buffers those values need and what they start at, and the kernel that runs the
    update. A subclass holds its signature and documentation, and passes its arguments on.
    """

    _spec: OptimizerSpec
    # Does the update run through Plans that fuse the average (False: it is taken in a pass of
    # its own after the step)?
    _fuses_average = True

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
        # An update with per-tensor factors (LAMB, LARS, ADOPT's caution) sees a FlatParams'
        # named views as tensors; any other sees the whole buffer as one.
        self._flat_views = self._flat is not None and self._spec.update.per_tensor
        half_out = arguments["half_out"]
        if self._flat is not None and self._flat_views:
            flat = self._flat
            keys, is_dict = list(flat.names), False
            arrays = [flat.params[k] for k in keys]
            self._bits = self._bits or flat.bfloat16_bits
            if half_out is None and flat.half is not None and flat.halves is not None:
                half_out = [flat.halves[k] for k in keys]
        elif self._flat is not None:
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
        self._quant = self._state_dtype if isinstance(self._state_dtype, Int8State) else None
        if self._quant is not None:
            self._check_quantizable()
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
        self._averager = self._check_averager(arguments["ema"])
        self._average_step = ("none", 0.0)  # what this step does to the averages
        self._allocate()
        if self._averager is not None:
            self._averager._owner = f"{type(self).__name__} at {id(self):#x}"

    def _check_quantizable(self) -> None:
        """8-bit state is for element-wise updates laid out by this class's _allocate."""
        name = type(self).__name__
        if type(self)._allocate is not Optimizer._allocate or self._spec.update.per_tensor:
            raise ValueError(f"state_dtype=int8 is not available for {name}: 8-bit state is "
                             "kept for element-wise updates that take one pass over the state "
                             "(not per-tensor trust ratios, factored or schedule-free state)")
        if self._flat is not None:
            raise ValueError(f"state_dtype=int8 does not take a FlatParams: pass its named "
                             f"views (flat.params), which share its memory, to {name} instead")

    def _check_averager(self, ema):
        """``ema``: None, or an Averager over these params that no other optimizer owns."""
        if ema is None:
            return None
        if not isinstance(ema, Averager):
            raise TypeError(f"ema must be an lrfast.Averager over the params, got "
                            f"{type(ema).__name__}")
        if ema._owner is not None:
            raise ValueError(f"this Averager is already updated by {ema._owner}")
        for p, what in zip(self._params, self._labels):
            avg = ema._average_of(p)
            if avg is None or avg.shape != p.shape:
                raise ValueError(f"ema does not average {what.replace('grads', 'params', 1)}: "
                                 "build the Averager over the optimizer's params")
        return ema

    def _attach_averages(self) -> None:
        """Give every plan its tensors' averages, and list them as state (``"average"``)."""
        av = self._averager
        if av is None:
            return
        for i, p in enumerate(self._params):
            self._views[i]["average"] = av._average_of(p)
        if not self._fuses_average:
            return
        self._avg_addrs = [np.array([_layout.address(self._views[i]["average"])
                                     for i in bank.indices], dtype=np.intp)
                           for bank in self._banks]
        for (i, _), plan in self._grad_plans.items():
            plan.set_averages(self._avg_addrs[i])

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
        """The state these hyper-parameters use: element-wise buffers, then scalar state."""
        h = self._update_values(hyper)
        update = self._spec.update
        return update.state_buffers(h) + update.scalar_names(h)

    # -- layout -----------------------------------------------------------------------------

    def _allocate(self) -> None:
        """Allocate state (one contiguous buffer per group of element types and state name)
        and the address tables."""
        update = self._spec.update
        h = self._update_values(self._hyper)
        active = update.state_buffers(h)
        self._views: list[dict[str, np.ndarray]] = [dict() for _ in self._params]
        written = list(self._params) + list(self._half_out or [])
        written += self._allocate_scalars(h)
        # The state's dtype per param: the param's own, or state_dtype's.
        state_dtypes = [self._state_dtype_of(p) for p in self._params]
        state_storages = [self._state_storage_of(p) for p in self._params]
        rows: list = [self._params, None]
        storages: list = [self._storages, self._storages]
        scales: dict = {}  # {row: each tensor's block scales} for rows kept in 8 bits
        q = self._quant
        for buf in update.buffers:
            if buf.name not in active:
                rows.append(None)
                storages.append(None)
                continue
            views: list = [None] * len(self._params)
            row_storages = list(state_storages)
            init = update.initial_value(buf.name, h)
            quantized = [q is not None and bool(buf.quant) and q.quantizes(p.size)
                         for p in self._params]
            if q is not None and any(quantized):
                idx = [i for i, yes in enumerate(quantized) if yes]
                row_scales: list = [None] * len(self._params)
                codes, block_scales = _quantization.filled(
                    sum(self._params[i].size for i in idx),
                    sum(q.nblocks(self._params[i].size) for i in idx), init, buf.quant, q)
                written += [codes, block_scales]
                at = bat = 0
                for i in idx:
                    p, nb = self._params[i], q.nblocks(self._params[i].size)
                    views[i] = codes[at:at + p.size].reshape(p.shape)
                    row_scales[i] = block_scales[bat:bat + nb]
                    self._views[i][buf.name] = views[i]
                    self._views[i][_quantization.scales_name(buf.name)] = row_scales[i]
                    row_storages[i] = buf.kernel_row_name
                    at += p.size
                    bat += nb
                scales[len(rows)] = row_scales
            for dtype in dict.fromkeys(d for d, yes in zip(state_dtypes, quantized) if not yes):
                idx = [i for i, d in enumerate(state_dtypes) if d == dtype and not quantized[i]]
                flat = _precision.full(sum(self._params[i].size for i in idx), init, dtype)
                written.append(flat)
                at = 0
                for i in idx:
                    p = self._params[i]
                    views[i] = flat[at:at + p.size].reshape(p.shape)
                    self._views[i][buf.name] = views[i]
                    at += p.size
            rows.append(views)
            storages.append(row_storages)
        out_storages = None if self._half_out is None else [
            _precision.storage_of(o.dtype, self._bits) for o in self._half_out]
        # Every bank's gradients are checked against all memory the step writes.
        self._banks = _layout.banks(rows, storages, written, [p.dtype for p in self._params],
                                    self._half_out, out_storages, scales,
                                    q.block_size if q is not None else 0)
        self._single_bank = len(self._banks) == 1
        self._plans = [b.plan(update.name) for b in self._banks]
        # each bank's scalar state (shared by the banks of one scalar dtype)
        self._scalars: list[dict[str, np.ndarray]] = [
            self._scalar_sets[self._scalar_dtype_of(self._params[b.indices[0]])]
            for b in self._banks] if self._scalar_sets else []
        # {(bank, grad dtype): plan}: the plans for grads of another type than the params'
        self._grad_plans = {(i, b.grad_dtype): plan
                            for i, (b, plan) in enumerate(zip(self._banks, self._plans))}
        self._sync_plans()
        self._attach_averages()

    def _allocate_scalars(self, h) -> list:
        """Per-step scalar state (NAdam's mu_product, ASGD's eta and mu): one 0-d array per
        scalar dtype, float64 for float64 params and float32 otherwise, as torch keeps them
        (the params always step together); every param's state holds its dtype's arrays.
        Returns the arrays (memory the step writes)."""
        update = self._spec.update
        self._scalar_sets: dict = {}
        names = update.scalar_names(h)
        if not names:
            return []
        for i, p in enumerate(self._params):
            dtype = self._scalar_dtype_of(p)
            if dtype not in self._scalar_sets:
                arrays = {}
                for name in names:
                    value = update.initial_value(name, h)
                    if callable(value):  # ASGD's eta starts at the lr: a schedule's first value
                        try:
                            value = lr_value(value, self._step_count)
                        except (TypeError, ValueError):  # (the step reports a bad schedule)
                            value = math.nan
                    arrays[name] = np.array(value, dtype=dtype)
                self._scalar_sets[dtype] = arrays
            self._views[i].update(self._scalar_sets[dtype])
        return [a for arrays in self._scalar_sets.values() for a in arrays.values()]

    @staticmethod
    def _scalar_dtype_of(param) -> np.dtype:
        """The dtype of ``param``'s scalar state: float64 for float64 params, else float32."""
        return np.dtype(np.float64 if param.dtype == np.float64 else np.float32)

    def _step_scalars(self, lr, t):
        """Per bank: the kernel's per-step scalars and the new scalar state for step ``t``."""
        update = self._spec.update
        h = self._update_values(self._hyper)
        out = []
        for arrays in self._scalars:
            rnd = next(iter(arrays.values())).dtype.type
            out.append(update.step_scalars(h, t, lr, {n: float(a) for n, a in arrays.items()},
                                           lambda x, fresh=False: float(rnd(x))))
        return out

    def _step_banks(self, grads, lr, t, nthreads, inv_scale, scalars):
        """step_plans with each bank's own scalars: every grad checked, then the non-finite
        check, then the updates."""
        for i, (bank, plan) in enumerate(zip(self._banks, self._plans)):
            bad = plan.gather(bank.grads_of(grads, False))
            if bad is not None:
                return (i, *bad)
        if self._skip_nonfinite and not all(plan.all_finite(inv_scale, nthreads)
                                            for plan in self._plans):
            return (-1, STEP_SKIPPED_NONFINITE, -1)
        for plan, (values, _) in zip(self._plans, scalars):
            plan.run(lr, t, nthreads, inv_scale, values)
        return None

    def _state_storage_of(self, param) -> str:
        """The element type of ``param``'s state buffers (those 8-bit state does not keep)."""
        return _precision.state_storage(self._state_dtype,
                                        _precision.storage_of(param.dtype, self._bits))

    def _state_dtype_of(self, param) -> np.dtype:
        """The dtype of ``param``'s state buffers (those 8-bit state does not keep): its own,
        or state_dtype's (bfloat16 as ml_dtypes.bfloat16, or uint16 bits when it is missing or
        with bfloat16_bits=True)."""
        storage = self._state_storage_of(param)
        if storage == _precision.storage_of(param.dtype, self._bits):
            return param.dtype
        if storage == "bfloat16":
            try:
                return _precision.numpy_dtype("bfloat16", self._bits)[0]
            except TypeError:
                return np.dtype(np.uint16)
        return np.dtype(storage)

    def _quantized_buffers(self, param, active) -> dict:
        """{buffer: map sign} for ``param``'s buffers kept in 8 bits under ``active``."""
        q = self._quant
        if q is None or not q.quantizes(param.size):
            return {}
        return {b.name: b.quant for b in self._spec.update.buffers
                if b.quant and b.name in active}

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (every state buffer, block scales and scalar state
        included; not the params, grads or an ``ema=`` average), measured from the arrays."""
        seen: dict = {}
        for views in self._views:
            for name, arr in views.items():
                if name != "average":
                    seen[id(arr)] = arr.nbytes
        return int(sum(seen.values()))

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
            if self._averager is not None:
                # (made during a step: it also takes that step's average)
                plan.set_averages(self._avg_addrs[i])
                plan.set_average_step(*self._average_step)
        if plan is self._plans[i]:
            return False
        self._plans[i] = plan
        return True

    # -- public API -------------------------------------------------------------------------

    @property
    def flush_subnormals(self) -> bool:
        return self._flush_subnormals

    @property
    def lr(self):
        """The learning rate: a float or a schedule ``step -> float``."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value):
        self._hyper = self._validate({**self._hyper, "lr": value})
        self._sync_plans()
        if self._step_count == 0 and self._scalars:
            # scalar state that starts at the lr (ASGD's eta) takes the lr of the first step,
            # as torch's, made at that step
            h = self._update_values(self._hyper)
            for bank, arrays in zip(self._banks, self._scalars):
                for name, arr in arrays.items():
                    value = self._spec.update.initial_value(name, h)
                    arr[...] = lr_value(value, 0) if callable(value) else value

    @property
    def ema(self):
        """The Averager this optimizer's steps update (None without ``ema=``)."""
        return self._averager

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
                if self._flat_views:
                    return [flat.grads[k] for k in self._keys]
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
        self._check_can_step()
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
            av = self._averager
            if av is not None:
                av._check_not_swapped("step")
                average = av._next()
                self._average_step = average[:2]
                if self._fuses_average:
                    for plan in self._grad_plans.values():
                        plan.set_average_step(*self._average_step)
            if not self._apply(grads, lr, t, get_num_threads(), inv_scale):
                self._skipped += 1
                return False
            if av is not None:
                if not self._fuses_average and average[0] != "none":
                    av._run(average[0], average[1])
                av._commit(average)
            self._step_count = t
            self._last_lr = lr
            return True
        finally:
            self._busy.release()

    def _check_can_step(self) -> None:
        """Raise if the optimizer may not step now (before anything is read)."""

    def _apply(self, grads, lr, t, nthreads, inv_scale) -> bool:
        """Step ``t`` with this ``lr``: check everything, then write params and state (or
        nothing). False: skipped, a gradient is not finite. Subclasses with state of their own
        extend it (the step count and last lr are the caller's)."""
        scalars = self._step_scalars(lr, t) if self._scalars else None
        if not self._run_plans(grads, lr, t, nthreads, inv_scale, scalars):
            return False
        for arrays, (_, new) in zip(self._scalars, scalars or ()):
            for name, value in new.items():
                arrays[name][...] = value
        return True

    def _run_plans(self, grads, lr, t, nthreads, inv_scale, bank_scalars=None,
                   shared=()) -> bool:
        """Every bank's plan for step ``t``; False when skipped for a non-finite gradient.
        ``bank_scalars``: per bank, (its per-step scalars, its new scalar state), from
        _step_scalars; ``shared``: per-step scalars common to all banks (schedule-free)."""
        while True:
            if self._single_bank:
                bad = self._plans[0].step(grads, lr, t, nthreads, inv_scale,
                                          bank_scalars[0][0] if bank_scalars else shared)
                bad = None if bad is None else (0, *bad)
            elif bank_scalars:
                bad = self._step_banks(grads, lr, t, nthreads, inv_scale, bank_scalars)
            else:
                bad = _dispatch.kernels.step_plans(
                    self._plans, [bank.grads_of(grads, False) for bank in self._banks],
                    lr, t, nthreads, inv_scale, shared)
            if bad is None:
                return True
            i, code, k = bad
            if code == STEP_SKIPPED_NONFINITE:
                return False
            # Grads of another element type than the last step's (fp32 params with half
            # grads): switch plans and check again; anything else is an error.
            if not (code == GATHER_DTYPE and k == 0 and self._switch_grad_plan(
                    i, self._banks[i].grads_of(grads, self._single_bank)[0])):
                self._banks[i].raise_bad_grad((code, k), grads, self._params, self._labels,
                                              self._single_bank)

    def state_dict(self) -> dict:
        """A copy of everything needed to resume: step count, hyper-parameters, state buffers.

        The learning rate is saved as a float, or as None when it is a schedule (a schedule is
        a pure function of ``step_count`` and is not saved).
        """
        hyper = dict(self._hyper)
        if callable(hyper["lr"]):
            hyper["lr"] = None
        if self._averager is not None:
            self._averager._check_not_swapped("save the state")
        sd = {
            "optimizer": type(self).__name__,
            "step_count": self._step_count,
            "skipped_steps": self._skipped,
            "hyperparams": hyper,
            "state": {
                key: {name: view.copy() for name, view in views.items()}
                for key, _, views in self._named_state()
            },
        }
        if self._averager is not None:
            sd["averager"] = self._averager._counters()
        if self._quant is not None:
            sd["quantization"] = {"block_size": self._quant.block_size,
                                  "min_size": self._quant.min_size}
        return sd

    def _named_state(self):
        """(key, parameter view, {buffer: state view}) per named parameter."""
        if self._flat is None or self._flat_views:
            return list(zip(self._keys, self._params, self._views))
        flat = self._flat
        per_buffer = {name: flat.views(view) for name, view in self._views[0].items()
                      if view.ndim}
        scalars = self._scalars[0] if self._scalars else {}
        return [(key, flat.params[key],
                 {**{name: per_buffer[name][key] for name in per_buffer}, **scalars})
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
        scalar_names = self._spec.update.scalar_names(self._update_values(hyper))
        scalar_values: dict = {}
        av = self._averager
        counters = None
        if av is not None:
            av._check_not_swapped("load the state")
            if not isinstance(state_dict.get("averager"), Mapping):
                raise ValueError("state_dict is missing 'averager' (this optimizer has ema=)")
            counters = av._check_counters(state_dict["averager"], "state_dict['averager']")
        saved_block = self._saved_block_size(state_dict)
        converted: dict = {}
        for key, p, _ in entries:
            entry = state[key]
            want = self._state_dtype_of(p)
            names = tuple(self._buffers_of(p, active)) + (("average",) if av is not None else ())
            mine = self._quantized_buffers(p, active)
            # Buffers saved in 8 bits carry their block scales; either kind converts to this
            # optimizer's (8-bit <-> float32).
            saved_q = {n for n in names if isinstance(entry, Mapping)
                       and _quantization.scales_name(n) in entry}
            expected = set(names) | {_quantization.scales_name(n) for n in saved_q}
            if not isinstance(entry, Mapping) or set(entry) != expected:
                raise ValueError(
                    f"state_dict['state'][{key!r}] must hold {sorted(names)} (an 8-bit buffer "
                    "with its '<name>_absmax' scales), "
                    f"got {sorted(entry) if isinstance(entry, Mapping) else entry!r}"
                )
            out = converted[key] = {}
            for buf_name in names:
                arr = entry[buf_name]
                what = f"state_dict['state'][{key!r}][{buf_name!r}]"
                if not isinstance(arr, np.ndarray):
                    raise TypeError(f"{what} must be a numpy.ndarray, got {type(arr).__name__}")
                out[buf_name] = arr
                if buf_name in scalar_names:
                    self._check_scalar_state(what, arr, p, buf_name, scalar_values)
                    continue
                if buf_name == "average":
                    Averager._check_average(arr, p, what)
                    continue
                shape = self._buffer_shape(buf_name, p)
                if arr.shape != shape:
                    raise ValueError(f"{what} has shape {arr.shape}, but the parameter has shape "
                                     f"{p.shape}" + ("" if shape == p.shape else
                                                     f" (so it must be {shape})"))
                if buf_name in saved_q:
                    arr = self._saved_quantized(entry, buf_name, what, saved_block, mine, p)
                elif buf_name in mine and arr.dtype == np.float32:
                    arr = None  # quantised below, once everything is checked
                elif buf_name in mine:
                    raise TypeError(f"{what} has dtype {arr.dtype}; this optimizer keeps it in 8 "
                                    "bits and converts float32 state (or codes with "
                                    "'_absmax' scales)")
                elif arr.dtype != want:
                    raise TypeError(f"{what} has dtype {arr.dtype}, but this optimizer keeps "
                                    f"it as {want}")
                out[buf_name] = arr if arr is not None else entry[buf_name]
            # Conversions, now that the entry is known to be good.
            for buf_name, sign in mine.items():
                value = out[buf_name]
                if isinstance(value, tuple):  # codes and scales, already this block size
                    out[buf_name], out[_quantization.scales_name(buf_name)] = value
                else:
                    if buf_name in saved_q:  # 8 bits in blocks of another size
                        value = self._dequantize_state(entry, buf_name, saved_block)
                    codes, scales = self._quantize_state(value, sign)
                    out[buf_name] = codes
                    out[_quantization.scales_name(buf_name)] = scales
            for buf_name in saved_q - set(mine):
                out[buf_name] = self._dequantize_state(entry, buf_name, saved_block)
        state = converted
        return hyper, active, state, int(steps), int(skipped), counters

    @staticmethod
    def _saved_block_size(state_dict) -> int:
        """The block size of a state dict's 8-bit buffers (0: it has none)."""
        info = state_dict.get("quantization")
        if info is None:
            return 0
        size = info.get("block_size") if isinstance(info, Mapping) else None
        try:
            return _quantization._check_block(size)
        except ValueError:
            raise ValueError(f"state_dict['quantization'] must hold the 8-bit state's "
                             f"block_size, got {info!r}") from None

    def _saved_quantized(self, entry, name, what, block, mine, param):
        """Check a saved 8-bit buffer (codes and scales); return (codes, scales) when this
        optimizer keeps it in 8 bits with the same block size, else None (converted later)."""
        codes, scales = entry[name], entry[_quantization.scales_name(name)]
        if block == 0:
            raise ValueError(f"{what} has '_absmax' scales but state_dict has no "
                             "'quantization' entry with their block_size")
        if codes.dtype != np.uint8:
            raise TypeError(f"{what} holds 8-bit codes and must be uint8, got {codes.dtype}")
        nblocks = -(-param.size // block)
        if (not isinstance(scales, np.ndarray) or scales.dtype != np.float32
                or scales.shape != (nblocks,)):
            raise ValueError(f"{what[:-2]}_absmax'] must be a float32 array of shape "
                             f"({nblocks},) (blocks of {block}), got "
                             f"{getattr(scales, 'dtype', type(scales).__name__)} "
                             f"{getattr(scales, 'shape', '')}")
        if name in mine:
            assert self._quant is not None
            if block == self._quant.block_size:
                return (codes, scales)
            return None
        if self._state_dtype_of(param) != np.float32:
            raise TypeError(f"{what} is kept in 8 bits; this optimizer converts it only to "
                            f"float32 state, not {self._state_dtype_of(param)}")
        return codes

    def _sign_of(self, name) -> str:
        return next(b.quant for b in self._spec.update.buffers if b.name == name)

    def _dequantize_state(self, entry, name, block) -> np.ndarray:
        return _quantization.dequantize_blockwise(
            entry[name], entry[_quantization.scales_name(name)],
            self._sign_of(name) == "signed", block)

    def _quantize_state(self, value, sign):
        """(codes, scales) of a float32 buffer in this optimizer's blocks."""
        assert self._quant is not None
        return _quantization.quantize_blockwise(value, sign == "signed", self._quant.block_size)

    def _buffers_of(self, param, active) -> tuple:
        """The state buffers ``param`` has under the buffers ``active`` (all of them here)."""
        return tuple(active)

    def _buffer_shape(self, name, param) -> tuple:
        """The shape of ``param``'s buffer ``name`` (the param's own here)."""
        return param.shape

    def _check_scalar_state(self, what, arr, p, name, seen) -> None:
        """A saved scalar state value: 0-d, of the param's scalar dtype, and the same for every
        param of that dtype (they step together)."""
        want = self._scalar_dtype_of(p)
        if arr.shape != ():
            raise ValueError(f"{what} must be a 0-d array, got shape {arr.shape}")
        if arr.dtype != want:
            raise TypeError(f"{what} has dtype {arr.dtype}, but this optimizer keeps it as "
                            f"{want}")
        first = seen.setdefault((name, want), arr)
        if not (first == arr or (first != first and arr != arr)):
            raise ValueError(f"{what} is {arr}, but another {want} parameter's is {first}: "
                             f"the params of {type(self).__name__} step together and share it")

    def _commit_state(self, checked):
        """Apply a validated state dict (cannot fail)."""
        hyper, active, state, steps, skipped, counters = checked
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
        if counters is not None:
            self._averager._commit_counters(counters)

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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        Optimizer.__init__(self, params, locals())


# ------------------------------------------------------------------------------------------
# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop
# ------------------------------------------------------------------------------------------

class Adamax(Optimizer):
    r"""Adamax: Adam with the infinity norm of past gradients in place of the second moment.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 2e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8 (added to :math:`|g|` inside the maximum, as torch)
    weight_decay : float, default 0 (L2 penalty added to the gradient)
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`t` = ``step_count + 1``:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1) \\
        u_t &= \max(\beta_2\, u_{t-1},\ |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{u_t}

    Kingma and Ba, 2015 (section 7.1); formulas as torch.optim.Adamax. State: ``exp_avg``
    (:math:`m`) and ``exp_inf`` (:math:`u`); the maximum is NaN where either side is, as
    torch.maximum.

    Examples
    --------
    The first step moves each element by ``lr`` against its gradient's sign; the second divides
    by the larger of the decayed norm and the new gradient:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.Adamax([w], lr=0.1)
    >>> opt.step([np.array([0.5, -3.0])]); w.round(6).tolist()
    True
    [0.9, -1.9]
    >>> opt.step([np.array([0.5, 1.0])]); w.round(6).tolist()
    True
    [0.8, -1.870146]
    >>> opt.state_dict()["state"][0]["exp_inf"].round(6).tolist()
    [0.5, 2.997]
    """

    _spec = OPTIMIZERS["Adamax"]

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())


class RAdam(Optimizer):
    r"""RAdam: Adam with its adaptive step's variance rectified, and plain momentum steps while
    the variance estimate is not tractable yet.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    decoupled_weight_decay : bool, default False
        False: the decay is added to the gradient; True: the params shrink by
        :math:`1 - \eta\lambda` first (as AdamW).
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`t` = ``step_count + 1``:

    .. math::
        \theta_{t-1} &\leftarrow (1 - \eta\lambda)\,\theta_{t-1} \ \text{(decoupled)}
            \quad\text{or}\quad g_t \leftarrow g_t + \lambda\,\theta_{t-1} \\
        m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1), \qquad
        v_t = \beta_2\, v_{t-1} + (1-\beta_2)\, g_t^2 \\
        \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2t\,\beta_2^t}{1-\beta_2^t} \\
        r_t &= \sqrt{\frac{(\rho_t-4)(\rho_t-2)\,\rho_\infty}
                          {(\rho_\infty-4)(\rho_\infty-2)\,\rho_t}} \\
        \theta_t &= \theta_{t-1} - \eta\,\frac{m_t}{1-\beta_1^t}\,
            \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}\, r_t \quad (\rho_t > 5),
        \qquad \theta_t = \theta_{t-1} - \eta\,\frac{m_t}{1-\beta_1^t} \quad\text{otherwise}

    Liu et al., 2020; formulas as torch.optim.RAdam. The scalars and the switch are computed in
    double from the step, once per step.

    Examples
    --------
    With the default betas the first five steps are momentum steps (here of ``lr`` each, for a
    constant gradient); rectified steps start at the sixth, small at first:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([0.0])
    >>> opt = lrfast.RAdam([w], lr=0.1)
    >>> for _ in range(5):
    ...     _ = opt.step([np.array([1.0])])
    >>> w.round(6).tolist()
    [-0.5]
    >>> opt.step([np.array([1.0])]); w.round(6).tolist()
    True
    [-0.502582]
    """

    _spec = OPTIMIZERS["RAdam"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())


class Adadelta(Optimizer):
    r"""Adadelta: steps scaled by the ratio of the running RMS of past updates to that of the
    gradients.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1.0 (a factor on the update, as torch)
    rho : float, default 0.9 (decay of both running averages, in [0, 1])
    eps : float, default 1e-6 (inside both square roots)
    weight_decay : float, default 0
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        v_t &= \rho\, v_{t-1} + (1-\rho)\, g_t^2 \\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
        u_t &= \rho\, u_{t-1} + (1-\rho)\, \Delta_t^2 \\
        \theta_t &= \theta_{t-1} - \eta\, \Delta_t

    Zeiler, 2012; formulas as torch.optim.Adadelta. State: ``square_avg`` (:math:`v`) and
    ``acc_delta`` (:math:`u`).

    Examples
    --------
    The first step is :math:`\sqrt{\epsilon} / \sqrt{0.1 \cdot 4 + \epsilon} \cdot 2`:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0])
    >>> opt = lrfast.Adadelta([w])
    >>> opt.step([np.array([2.0])]); w.round(6).tolist()
    True
    [0.996838]
    >>> opt.step([np.array([2.0])]); w.round(6).tolist()
    True
    [0.993593]
    """

    _spec = OPTIMIZERS["Adadelta"]

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())


class Rprop(Optimizer):
    r"""Rprop: a step size per element, grown while its gradient keeps its sign and shrunk when
    the sign flips; each step moves an element by its step size against its gradient's sign.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float, default 1e-2
        The initial step size of every element (state ``step_size``); not used after that. A
        schedule is refused (it would have no effect); changing ``lr`` after construction
        changes nothing either (torch's Rprop reads its lr when the state is made, at the
        first step).
    etas : (float, float), default (0.5, 1.2)
        The factors (:math:`\eta_-, \eta_+`) that shrink and grow the step sizes,
        :math:`0 < \eta_- < 1 < \eta_+`.
    step_sizes : (float, float), default (1e-6, 50)
        The bounds of the step sizes (:math:`\delta_{\min}, \delta_{\max}`),
        :math:`0 \le \delta_{\min} \le \delta_{\max}` (torch does not check them).
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    .. math::
        f_t &= \eta_+ \ \text{if } g_t\,g_{t-1} > 0, \quad \eta_- \ \text{if } g_t\,g_{t-1} < 0,
            \quad 1 \ \text{otherwise} \\
        \delta_t &= \operatorname{clamp}(f_t\,\delta_{t-1}, \delta_{\min}, \delta_{\max}),
            \qquad \delta_0 = \eta \\
        g_t &\leftarrow 0 \ \text{where } f_t = \eta_- \\
        \theta_t &= \theta_{t-1} - \operatorname{sign}(g_t)\,\delta_t

    Riedmiller and Braun, 1993 (without weight backtracking); formulas as torch.optim.Rprop.
    State: ``prev`` (the last :math:`g_t`, zero where its sign flipped) and ``step_size``
    (:math:`\delta`). As in torch, the sign of a NaN is 0: a NaN gradient leaves its element
    where it is.

    Examples
    --------
    The first gradient has no predecessor: both elements move by lr. Then the first keeps its
    sign (its step grows by 1.2) and the second flips (its step shrinks by 0.5, and it stays):

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, 1.0])
    >>> opt = lrfast.Rprop([w], lr=0.01)
    >>> opt.step([np.array([1.0, -1.0])]); w.round(6).tolist()
    True
    [0.99, 1.01]
    >>> opt.step([np.array([1.0, 1.0])]); w.round(6).tolist()
    True
    [0.978, 1.01]
    >>> opt.state_dict()["state"][0]["step_size"].round(6).tolist()
    [0.012, 0.005]
    """

    _spec = OPTIMIZERS["Rprop"]

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *,
                 maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())


# ------------------------------------------------------------------------------------------
# Updates with per-step scalar state: NAdam (mu_product), ASGD (eta, mu)
# ------------------------------------------------------------------------------------------


class NAdam(Optimizer):
    r"""NAdam: Adam with Nesterov momentum and a momentum schedule.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 2e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum_decay : float, default 4e-3 (:math:`\psi`)
    decoupled_weight_decay : bool, default False (True: decay the weights directly, NAdamW)
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`t` = ``step_count + 1`` and the momentum schedule
    :math:`\mu_t = \beta_1 (1 - \frac12 0.96^{t\psi})`:

    .. math::
        \Pi_t &= \Pi_{t-1}\,\mu_t \quad (\Pi_0 = 1) \\
        \theta &\leftarrow \theta (1 - \eta\lambda) \ \text{(decoupled)} \quad\text{or}\quad
            g_t \leftarrow g_t + \lambda\theta_{t-1} \\
        m_t &= \operatorname{lerp}(m_{t-1}, g_t, 1-\beta_1), \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta - \eta\Bigl(\frac{1-\mu_t}{1-\Pi_t}\, g_t
            + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\, m_t\Bigr)
            \Big/ \Bigl(\sqrt{v_t / (1-\beta_2^t)} + \epsilon\Bigr)

    Dozat, 2016 ("Incorporating Nesterov Momentum into Adam"); formulas as torch.optim.NAdam.
    The momentum product :math:`\Pi_t` is per-param scalar state, ``mu_product`` in
    ``state_dict()``, kept as torch keeps it: float64 for float64 params, else float32.

    Examples
    --------
    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.NAdam([w], lr=0.1)
    >>> opt.step([np.array([0.5, -3.0])])
    True
    >>> w.round(6).tolist()
    [0.894355, -1.894355]
    >>> float(opt.state_dict()["state"][0]["mu_product"])
    0.45007347359129607
    """

    _spec = OPTIMIZERS["NAdam"]

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())


class ASGD(Optimizer):
    r"""Averaged SGD: SGD with a decaying step size and a running average of the weights.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-2
    lambd : float, default 1e-4 (decay term)
    alpha : float, default 0.75 (power of the step size's decay)
    t0 : float, default 1e6 (the step at which averaging starts)
    weight_decay : float, default 0
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`t` = ``step_count + 1``, and the step size :math:`\eta_t` and averaging weight
    :math:`\mu_t` of the previous step (:math:`\eta_1 = \eta`, :math:`\mu_1 = 1`):

    .. math::
        g_t &\leftarrow g_t + \lambda_{wd}\,\theta_{t-1} \\
        \theta_t &= \theta_{t-1} (1 - \lambda\eta_t) - \eta_t\, g_t \\
        \bar x_t &= \bar x_{t-1} + \mu_t (\theta_t - \bar x_{t-1})
            \quad (\bar x_t = \theta_t \text{ when } \mu_t = 1) \\
        \eta_{t+1} &= \eta / (1 + \lambda\eta t)^{\alpha}, \qquad
        \mu_{t+1} = 1 / \max(1, t - t_0)

    ``ax`` (:math:`\bar x`) is the Polyak average of the iterates (Polyak and Juditsky, 1992:
    the averaged weights, which are what one evaluates); it is the param itself until step
    :math:`t_0 + 1`, the uniform average of the iterates after. ``eta`` and ``mu`` are
    per-param scalar state in ``state_dict()``, kept as torch keeps them (float64 for float64
    params, else float32). Formulas as torch.optim.ASGD.

    Examples
    --------
    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.ASGD([w], lr=0.1)
    >>> opt.step([np.array([0.5, -3.0])])
    True
    >>> w.round(6).tolist()
    [0.94999, -1.69998]
    >>> st = opt.state_dict()["state"][0]
    >>> round(float(st["eta"]), 6), float(st["mu"])
    (0.099999, 1.0)
    """

    _spec = OPTIMIZERS["ASGD"]

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, *,
                 maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())


# ------------------------------------------------------------------------------------------
# Updates from outside torch.optim: Lion, ADOPT
# ------------------------------------------------------------------------------------------


class Lion(Optimizer):
    r"""Lion (EvoLved Sign Momentum), as lion-pytorch's ``Lion``.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-4 (must be > 0)
    betas : (float, float), default (0.9, 0.99); each in [0, 1]
    weight_decay : float, default 0
    decoupled_weight_decay : bool, default False
        lion-pytorch's meaning: the decay is divided by the initial lr, so each step multiplies
        the param by :math:`1 - \lambda\,\eta_t/\eta_0`. Here :math:`\eta_0` is the lr of the
        step itself (the decay per step is ``weight_decay``); lrfast.torch.Lion divides by the
        constructor's lr, as lion-pytorch does, so an lr scheduler scales it.
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    In lion-pytorch's order of operations:

    .. math::
        \theta &\leftarrow \theta\,(1 - \eta\lambda) \\
        \theta &\leftarrow \theta - \eta\,\operatorname{sign}(\beta_1 m + (1-\beta_1)\, g) \\
        m &\leftarrow \beta_2 m + (1-\beta_2)\, g

    with :math:`\operatorname{sign}(0) = 0` (torch.sgn; NaN also gives 0, as there).
    Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023.

    ``optax.lion(learning_rate, b1, b2, weight_decay=...)`` is the same update with the same
    roles of b1 (the interpolation inside the sign) and b2 (the momentum's decay), with two
    differences of convention: optax's weight_decay defaults to 1e-3 (here 0), and it adds
    :math:`\lambda\theta` to the signed update before scaling by the lr, so
    :math:`\theta - \eta(\operatorname{sign}(\cdot) + \lambda\theta)`: the same value as the
    decay-then-step above up to rounding. optax has no decoupled form; with a constant lr,
    ``decoupled_weight_decay=True`` is optax's ``weight_decay = weight_decay / lr``.

    Examples
    --------
    The first step moves each element by exactly ``lr`` against its gradient's sign, after
    the decay :math:`1 - 0.1 \cdot 0.1 = 0.99`:

    >>> import numpy as np
    >>> import lrfast
    >>> w = {"w": np.array([1.0, -2.0])}
    >>> opt = lrfast.Lion(w, lr=0.1, weight_decay=0.1)
    >>> opt.step({"w": np.array([0.5, -3.0])})
    True
    >>> w["w"].round(6).tolist()
    [0.89, -1.88]
    """

    _spec = OPTIMIZERS["Lion"]

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                 decoupled_weight_decay=False, *,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        Optimizer.__init__(self, params, locals())


class Adopt(Optimizer):
    r"""ADOPT (modified Adam that converges with any beta2), as timm's ``Adopt``.

    Parameters
    ----------
    params : list, tuple or dict of float32, float64, float16 or bfloat16 arrays, updated in place
    lr : float or callable, default 1e-3
    betas : (float, float), default (0.9, 0.9999)
    eps : float, default 1e-6 (a floor of the square root)
    clip_exp : float or None, default 0.333 (None: no clipping)
    weight_decay : float, default 0
    decoupled : bool, default False (decay the param instead of adding to the gradient)
    corrected_weight_decay : bool, default False
        timm's: decoupled decay scaled by :math:`\eta^2/\eta_{max}` instead of :math:`\eta`,
        :math:`\eta_{max}` the constructor's lr. Here :math:`\eta_{max}` is the step's lr (so
        it equals the uncorrected decay); lrfast.torch.Adopt uses the constructor's lr, as timm.
    caution : bool, default False
        timm's cautious step (Liang et al., 2024): only the elements where the new ``m``
        agrees in sign with ``g`` move, by ``m`` divided by the fraction of the tensor's
        elements that agree (that fraction taken as at least 1e-3); ``exp_avg`` keeps the
        unmasked ``m``.
    maximize : bool, default False
    skip_nonfinite, flush_subnormals, state_dtype, half_out, rounding, seed, bfloat16_bits :
        options every optimizer takes (see the module docstring)

    Notes
    -----
    With :math:`t` = ``step_count + 1`` and :math:`g \leftarrow \pm g + \lambda\theta` (the
    decay term unless decoupled), the first step only sets :math:`v \leftarrow v + g^2` (the
    param and :math:`m` are unchanged); every later step:

    .. math::
        \theta &\leftarrow \theta - \eta\lambda\,\theta \ \text{(decoupled)} \\
        n &= \operatorname{clip}\!\left(\frac{g}{\max(\sqrt{v}, \epsilon)},
             \pm (t-1)^{c}\right) \ \text{(no clip when } c \text{ is None)} \\
        m &\leftarrow \operatorname{lerp}(m, n, 1-\beta_1) \\
        u &= m \cdot \frac{[m g > 0]}{\max(\operatorname{mean}[m g > 0], 10^{-3})}
            \ \text{(caution; else } u = m) \\
        \theta &\leftarrow \theta - \eta\, u \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, g^2

    The step reads p, g, m, v and writes p, m, v once (28 bytes per float32 element, 56
    float64: Adam's traffic). With ``caution`` the mean is over each tensor, so a step is two
    passes: the first reads g, m, v (and p with the decay added to g) to count each tensor's
    agreeing elements, the second is the step: 40 bytes per float32 element (44 with the
    coupled decay; src/_updates_community.pxi). Over a FlatParams each named view is its own
    tensor.

    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
    2024; operations in timm's order.

    Examples
    --------
    The first step only records the squared gradient; at the second, :math:`g/|g_1| = \pm 1`
    (clipped to :math:`\pm 1^{0.333}`), :math:`m = 0.1 \cdot (\pm 1)`, and each element moves
    by ``lr * 0.1``:

    >>> import numpy as np
    >>> import lrfast
    >>> w = {"w": np.array([1.0, -2.0])}
    >>> opt = lrfast.Adopt(w, lr=0.1)
    >>> g = {"w": np.array([0.5, -3.0])}
    >>> opt.step(g), w["w"].tolist()
    (True, [1.0, -2.0])
    >>> opt.step(g), w["w"].round(6).tolist()
    (True, [0.99, -1.99])
    """

    _spec = OPTIMIZERS["Adopt"]

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_exp=0.333,
                 weight_decay=0.0, decoupled=False, corrected_weight_decay=False, *,
                 caution=False, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        Optimizer.__init__(self, params, locals())


# ------------------------------------------------------------------------------------------
# Per-tensor trust ratios: LAMB, LARS
# ------------------------------------------------------------------------------------------

class Lamb(Optimizer):
    r"""LAMB (timm.optim.Lamb): Adam's direction, each tensor's step scaled by its trust ratio
    ``||param|| / ||update||``.

    .. math::
        c &= \max(\lVert (g_1, \dots, g_n) \rVert / \text{max\_grad\_norm}, 1), \qquad
            g \leftarrow g / c \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1), \qquad
            v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        u &= \frac{m / (1 - \beta_1^t)}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}
            + \lambda\theta, \qquad
        \theta \leftarrow \theta - \eta \frac{\lVert\theta\rVert}{\lVert u\rVert} u

    ``c`` is one number for all tensors (``max_grad_norm=None``: no clipping); the norms are
    per tensor, and the ratio is 1 when either is 0. ``grad_averaging=False``: ``m <- beta1 m
    + g``. ``bias_correction=False``: no bias corrections. ``decoupled_decay``: the decay
    multiplies ``theta`` by ``1 - lr * weight_decay`` (``lr ** 2 / lr0`` in place of ``lr``
    with ``corrected_weight_decay``, ``lr0`` the lr the optimizer was made with) before the
    norms instead of joining ``u``. The ratio applies when ``weight_decay != 0`` or
    ``always_adapt``; ``trust_clip`` caps it at 1 (LAMBC). ``caution``: ``u`` keeps only the
    elements whose sign agrees with ``g``, divided by the fraction kept (at least 1e-3).

    The per-tensor norms need a pass over each tensor before its update, so a step is two
    passes over the memory: the first reads p, g, m, v and writes the new m, v, the second
    reads p, m, v and writes p, 40 bytes per float32 element (80 float64; Adam moves 28).
    ``caution`` adds a read-only pass and a read of g in the last (+20), ``max_grad_norm`` a
    read of the grads for the global norm (+4); with no ratio (``weight_decay=0``, no
    ``always_adapt`` or ``caution``) it is one pass of 28 (src/_updates_trust.pxi). Over a FlatParams each named view is its own tensor.

    Examples
    --------
    With ``weight_decay=0`` the first step is Adam's, ``lr * sign(g)`` (to 1e-6 from eps):

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.Lamb([w], lr=0.1, weight_decay=0.0, max_grad_norm=None)
    >>> opt.step([np.array([0.5, -3.0])])
    True
    >>> w.round(5).tolist()
    [0.9, -1.9]

    With the default ``weight_decay=0.01`` the step is rescaled to ``lr * ||w||``: here
    ``u = (1, -1) + 0.01 w = (1.01, -1.02)`` (to 1e-6), ``||w|| = sqrt(5)``, so ``w`` moves by
    ``0.1 * sqrt(5) / ||u|| * u = (-0.1573, 0.1589)`` (max_grad_norm=1 clips ``g`` first, which
    Adam's direction does not see):

    >>> w = np.array([1.0, -2.0])
    >>> opt = lrfast.Lamb([w], lr=0.1)
    >>> opt.step([np.array([0.5, -3.0])])
    True
    >>> w.round(4).tolist()
    [0.8427, -1.8411]
    """

    _spec = OPTIMIZERS["Lamb"]

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, grad_averaging=True, max_grad_norm=1.0, trust_clip=False,
                 always_adapt=False, caution=False, decoupled_decay=False,
                 corrected_weight_decay=False, *,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        # timm's max_lr_snapshot: the lr the optimizer is made with, the peak lr of
        # corrected_weight_decay (kept when lr changes later).
        self._max_lr = None
        if corrected_weight_decay is True:
            if callable(lr):
                raise ValueError("corrected_weight_decay needs the peak lr as a number (lr ** 2 "
                                 "/ peak lr scales the decay), not a schedule")
            peak = _real(lr, "lr")
            if peak <= 0:
                raise ValueError(f"Corrected weight decay requires a positive max lr, got "
                                 f"{peak}. Construct the optimizer with the peak lr.")
            self._max_lr = peak
        Optimizer.__init__(self, params, locals())

    def _update_values(self, hyper) -> dict:
        out = super()._update_values(hyper)
        out["max_lr"] = self._max_lr
        return out


class Lars(Optimizer):
    r"""LARS (timm.optim.Lars): momentum SGD on each tensor's gradient scaled by its trust
    ratio (LARC's clipping with ``trust_clip``).

    .. math::
        r &= \frac{\kappa \lVert\theta\rVert}{\lVert g\rVert + \lambda \lVert\theta\rVert
            + \epsilon}, \qquad g \leftarrow (g + \lambda\theta)\, r \\
        b &\leftarrow \mu b + (1 - \tau) g \ (b = g \text{ at the first step}), \qquad
        \theta \leftarrow \theta - \eta\, b \ (\theta - \eta (g + \mu b) \text{ with nesterov})

    ``kappa`` is ``trust_coeff``; the norms are per tensor, and ``r`` is 1 when either is 0.
    The ratio applies when ``weight_decay != 0`` or ``always_adapt``; ``trust_clip`` makes it
    ``min(r / lr, 1)``. Without momentum ``theta <- theta - lr g``.

    The norms need a pass over each tensor before its update, so a step is two passes over
    the memory: the first reads p and g, the second reads p, g, the momentum buffer and writes
    p and the buffer, 28 bytes per float32 element (56 float64; 20 without momentum); with
    no ratio (``weight_decay=0``, no ``always_adapt``) it is SGD's one pass, 20 (12)
    (src/_updates_trust.pxi). Over a FlatParams each named view is its own tensor.

    Examples
    --------
    ``||w|| = 5`` and ``||g|| = 1``, so ``r = 0.001 * 5 / (1 + 0.1 * 5 + 0) = 1/300`` and the
    gradient is ``(g + 0.1 w) / 300 = (0.3, 1.4) / 300``:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([3.0, 4.0])
    >>> opt = lrfast.Lars([w], lr=1.0, weight_decay=0.1, eps=0.0)
    >>> opt.step([np.array([0.0, 1.0])])
    True
    >>> (w - np.array([3.0, 4.0])).round(6).tolist()
    [-0.001, -0.004667]
    """

    _spec = OPTIMIZERS["Lars"]

    def __init__(self, params, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, trust_coeff=0.001, eps=1e-8, trust_clip=False,
                 always_adapt=False, *,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        Optimizer.__init__(self, params, locals())


# ------------------------------------------------------------------------------------------
# Factored second moments: Adafactor
# ------------------------------------------------------------------------------------------

def _adafactor_kernel_values(h) -> list:
    """Adafactor's hyper-parameters in the kernel's order; eps1 None as -1 (the kernel then
    takes its element type's machine epsilon)."""
    return [-1.0 if h[n] is None else float(h[n])
            for n in _dispatch.kernels.UPDATE_ARGS["adafactor"]]


def _adafactor_state_shapes(shape) -> dict:
    """{buffer: shape} of the Adafactor state of a param of ``shape`` (torch's shapes)."""
    out = {}
    for b in OPTIMIZERS["Adafactor"].update.buffers:
        s = b.shape_for(shape)
        if s is not None:
            out[b.name] = s
    return out


def _adafactor_table(params, grads, state) -> np.ndarray:
    """The (4, tensors) address table of AdafactorPlan: param, grad, row_var or variance,
    col_var (0 where none)."""
    table = np.zeros((4, len(params)), dtype=np.intp)
    for k, (p, g, st) in enumerate(zip(params, grads, state)):
        table[0, k] = p.ctypes.data
        table[1, k] = g.ctypes.data
        a = st.get("row_var", st.get("variance"))
        table[2, k] = a.ctypes.data
        c = st.get("col_var")
        table[3, k] = 0 if c is None else c.ctypes.data
    return table


def _adafactor_run(rows: dict, single: bool, h: dict, step: int, nthreads: int) -> None:
    """lrfast.functional.adafactor_'s work: ``rows`` {"param", "grad", "row_var", "col_var",
    "variance": list or None} (one entry per tensor), checked, then one AdafactorPlan per
    dtype. Nothing is written unless every check passes."""
    params = rows["param"]

    def what(name, k):
        return name if single else f"{name}[{k}]"

    n = len(params)
    written, labels, state = [], [], []
    for k, p in enumerate(params):
        st = check_array(p, what("param", k), writeable=True)
        if st not in ("float32", "float64"):
            raise TypeError(f"{what('param', k)} has dtype {p.dtype}: Adafactor updates "
                            "float32 and float64 arrays only")
        written.append(p)
        labels.append(what("param", k))
        bufs = {}
        shapes = _adafactor_state_shapes(p.shape)
        for name in ("row_var", "col_var", "variance"):
            lst = rows[name]
            b = None if lst is None else lst[k]
            if name not in shapes:
                if b is not None:
                    raise ValueError(f"{what(name, k)} must be None for a param of "
                                     f"{p.ndim} dimensions")
                continue
            if b is None:
                need = "two or more" if name != "variance" else "fewer than two"
                raise ValueError(f"Adafactor needs {what(name, k)} for a param of {need} "
                                 "dimensions")
            check_array(b, what(name, k), writeable=True)
            if b.dtype != p.dtype or b.shape != shapes[name]:
                raise ValueError(f"{what(name, k)} must be {p.dtype} of shape {shapes[name]}, "
                                 f"got {b.dtype} of shape {b.shape}")
            written.append(b)
            labels.append(what(name, k))
            bufs[name] = b
        state.append(bufs)
    if not n:
        return
    check_disjoint(written, labels)
    ranges = sorted(_validation.byte_range(a) for a in written if a.nbytes > 0)
    wstart = np.array([r[0] for r in ranges], dtype=np.int64)
    wend = np.array([r[1] for r in ranges], dtype=np.int64)
    grads = rows["grad"]
    _adafactor_check_grads(grads, params, [what("grad", k) for k in range(n)], wstart, wend)
    values = _adafactor_kernel_values(h)
    plans = []
    for dtype in dict.fromkeys(p.dtype for p in params):
        idx = [i for i, p in enumerate(params) if p.dtype == dtype]
        table = _adafactor_table([params[i] for i in idx], [grads[i] for i in idx],
                                 [state[i] for i in idx])
        plan = _dispatch.kernels.AdafactorPlan([params[i].shape for i in idx],
                                               dtype == np.float64, table)
        plan.set_hyper(values)
        plans.append(plan)
    for plan in plans:
        plan.run(h["lr"], step, nthreads)


def _adafactor_grad_addresses(grads, params, labels, wstart, wend) -> np.ndarray:
    """The grads' data addresses, each grad checked (see ``_adafactor_check_grads``): the
    common case in one native pass (addresses, sizes, types, layout) and a few vectorised
    comparisons; any failure is then reported by the per-grad checks."""
    n = len(params)
    addrs = np.empty(n, dtype=np.intp)
    sizes = np.empty(n, dtype=np.intp)
    types = np.empty(n, dtype=np.intc)
    ok = _dispatch.kernels.collect_arrays(grads, addrs, sizes, types, False) < 0
    if ok:
        ok = all(g.dtype == p.dtype and g.shape == p.shape for g, p in zip(grads, params))
    if ok and len(wstart):
        nbytes = np.array([g.nbytes for g in grads], dtype=np.int64)
        start = addrs.astype(np.int64)
        j = np.searchsorted(wstart, start + nbytes, side="left")
        ok = not np.any((nbytes > 0) & (j > 0) & (wend[np.maximum(j - 1, 0)] > start))
    if not ok:
        _adafactor_check_grads(grads, params, labels, wstart, wend)
    return addrs


def _adafactor_check_grads(grads, params, labels, wstart, wend) -> None:
    """Each grad an aligned C-contiguous array of its param's dtype and shape, outside the
    sorted written byte ranges [wstart, wend); the gradient checks' messages."""
    for g, p, what in zip(grads, params, labels):
        code = None
        if not isinstance(g, np.ndarray):
            code = GATHER_NOT_ARRAY
        elif g.dtype != p.dtype:
            code = GATHER_DTYPE
        elif g.shape != p.shape:
            code = GATHER_SHAPE
        elif not g.flags.c_contiguous:
            code = GATHER_NOT_CONTIGUOUS
        elif not g.flags.aligned:
            code = GATHER_MISALIGNED
        elif g.nbytes:
            lo, hi = _validation.byte_range(g)
            j = int(np.searchsorted(wstart, hi, side="left"))
            if j > 0 and wend[j - 1] > lo:
                code = GATHER_OVERLAP
        if code is not None:
            _validation.raise_gather_error(code, g, p, what)


class Adafactor(Optimizer):
    r"""Adafactor: second moments factored into per-row and per-column averages.

    Parameters
    ----------
    params : list, tuple or dict of float32 or float64 arrays, updated in place
    lr : float or callable, default 1e-2 (the largest relative step size, and the weight decay's
        factor, as torch)
    beta2_decay : float, default -0.8 (:math:`\tau`; the running averages' weight is
        :math:`t^\tau`)
    eps : (float or None, float), default (None, 1e-3): :math:`\epsilon_1` (None: the params'
        machine epsilon) stabilises the variance estimate, :math:`\epsilon_2` is the smallest
        parameter RMS the step is scaled by
    d : float, default 1 (the update's RMS is clipped to d)
    weight_decay : float, default 0 (decoupled: the params are scaled by
        :math:`1 - \eta\lambda`)
    maximize : bool, default False
    skip_nonfinite, flush_subnormals : bool, default False (see the module docstring)
    state_dtype, half_out, rounding, seed, bfloat16_bits :
        taken for a common signature: Adafactor runs float32 and float64 arrays only, so
        ``half_out`` and a ``state_dtype`` other than the params' are refused;
        ``rounding``/``seed`` have no effect on these types.

    Notes
    -----
    As torch.optim.Adafactor (Shazeer and Stern, 2018, with torch's placement of
    :math:`\epsilon_1` and of the learning rate). Per tensor, at step :math:`t` (``step_count
    + 1``), with :math:`G` the gradient (negated when maximizing):

    .. math::
        \rho_t &= \min(\eta, 1/\sqrt t), \qquad
        \alpha_t = \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\,\rho_t \\
        \theta &\leftarrow \theta_{t-1}(1 - \eta\lambda) \\
        R_t &= \operatorname{lerp}(R_{t-1}, \operatorname{mean}_{\text{cols}} G^2, t^\tau),
        \quad C_t = \operatorname{lerp}(C_{t-1}, \operatorname{mean}_{\text{rows}} G^2,
        t^\tau), \quad \hat V_t = \frac{R_t C_t}{\max(\operatorname{mean}(R_t), \epsilon_1)}
        \ \text{(2 or more dims)} \\
        \hat V_t &= V_t = \operatorname{lerp}(V_{t-1}, G^2, t^\tau) \ \text{(0-D, 1-D)} \\
        U_t &= G / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        \theta_t = \theta - \frac{\alpha_t}{\max(1, \operatorname{RMS}(U_t)/d)}\, U_t

    A param of two or more dimensions is factored over its last two (the leading ones are
    independent slices): its state is ``row_var`` of shape (..., R, 1) and ``col_var`` of
    shape (..., 1, C), as torch keeps them; other params keep ``variance``, of their own
    shape. ``state_dict()["state"][key]`` holds the buffers of that param only.

    Design: the update is not element-wise (each tensor needs its param's norm, its grad's
    row and column mean squares and its update's RMS before the param is written), so it does
    not run through the element-wise Plan. Each dtype's tensors are one ``AdafactorPlan``
    (src/_updates_factored.pxi): a few parallel passes over units of work fixed by the shapes
    (runs of whole rows, or of elements), whose partial sums are combined in a fixed order, so
    the result does not depend on the number of threads. Bytes moved per element: 6 element
    sizes for factored tensors (A reads param and grad, C reads grad, D reads both and writes
    the param), 8 for the others (A and D each read param, grad and variance and write one of
    them). A FlatParams is updated through its named views (the state is per named tensor,
    of its own shape); one with a half twin is refused.

    Examples
    --------
    A vector keeps ``variance``. At the first step the average is the squared gradient, so
    the update is the gradient's sign; its RMS is 1 and every element moves by
    :math:`\alpha = \max(10^{-3}, \operatorname{RMS}(\theta))\,\min(0.01, 1) = 0.01
    \sqrt{21.5} = 0.046368`:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.array([3.0, -4.0, 5.0, 6.0])             # RMS sqrt(21.5)
    >>> opt = lrfast.Adafactor([w])
    >>> opt.step([np.array([0.5, -2.0, 1.0, 4.0])])
    True
    >>> w.round(6).tolist()
    [2.953632, -3.953632, 4.953632, 5.953632]
    >>> m = np.ones((2, 3))
    >>> opt = lrfast.Adafactor({"m": m})
    >>> {k: v.shape for k, v in opt.state_dict()["state"]["m"].items()}
    {'row_var': (2, 1), 'col_var': (1, 3)}
    """

    _spec = OPTIMIZERS["Adafactor"]

    # Its own plans (AdafactorPlan): an ``ema`` takes a pass of its own after the step.
    _fuses_average = False

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, maximize=False,
                 skip_nonfinite=False, flush_subnormals=False, state_dtype=None, half_out=None,
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        # A FlatParams is optimized through its named views (each tensor's own shape: the
        # factored state needs it), its grads read from its grad buffer's views.
        self._af_flat = params if isinstance(params, FlatParams) else None
        if self._af_flat is not None:
            if self._af_flat.half is not None:
                raise ValueError("Adafactor does not write half copies: it cannot update a "
                                 "FlatParams with a half twin")
            params = dict(self._af_flat.params)
        if half_out is not None:
            raise ValueError("Adafactor does not write half copies (half_out): it updates "
                             "float32 and float64 params only")
        super().__init__(params, locals())

    def _allocate(self) -> None:
        for p, st, what in zip(self._params, self._storages,
                               [label("params", k) for k in self._keys]):
            if st not in ("float32", "float64"):
                raise TypeError(f"{what} has dtype {p.dtype}: Adafactor updates float32 and "
                                "float64 arrays only")
            if self._state_dtype_of(p) != p.dtype:
                raise TypeError(f"state_dtype={self._state_dtype}: Adafactor keeps its state "
                                f"in the params' dtype ({what} is {p.dtype})")
        shapes = [_adafactor_state_shapes(p.shape) for p in self._params]
        self._scalars = []  # no per-step scalar state (the lr setter reads this)
        self._views = [dict() for _ in self._params]
        written = list(self._params)
        self._af_plans = []
        for dtype in dict.fromkeys(p.dtype for p in self._params):
            idx = [i for i, p in enumerate(self._params) if p.dtype == dtype]
            sizes = [int(np.prod(s)) for i in idx for s in shapes[i].values()]
            flat = np.zeros(sum(sizes), dtype=dtype)
            written.append(flat)
            at = 0
            for i in idx:
                for name, s in shapes[i].items():
                    n = int(np.prod(s))
                    self._views[i][name] = flat[at:at + n].reshape(s)
                    at += n
            params = [self._params[i] for i in idx]
            table = _adafactor_table(params, params, [self._views[i] for i in idx])
            plan = _dispatch.kernels.AdafactorPlan([p.shape for p in params],
                                                   dtype == np.float64, table)
            self._af_plans.append((np.array(idx, dtype=np.intp), table, plan))
        ranges = sorted(_validation.byte_range(a) for a in written if a.nbytes > 0)
        self._wstart = np.array([r[0] for r in ranges], dtype=np.int64)
        self._wend = np.array([r[1] for r in ranges], dtype=np.int64)
        self._sync_plans()
        self._attach_averages()

    def _sync_plans(self):
        values = _adafactor_kernel_values(self._update_values(self._hyper))
        for _, _, plan in self._af_plans:
            plan.set_hyper(values)
            plan.set_options(self._flush_subnormals)

    def _buffer_shape(self, name, param):
        return _adafactor_state_shapes(param.shape).get(name)

    def _buffers_of(self, param, active):
        return tuple(_adafactor_state_shapes(param.shape))

    @property
    def params(self):
        return dict(self._af_flat.params) if self._af_flat is not None else super().params

    def _grad_list(self, grads):
        flat = self._af_flat
        if flat is None:
            return super()._grad_list(grads)
        if grads is None or grads is flat or grads is flat.grad or grads is flat.grads:
            return [flat.grads[k] for k in self._keys]
        raise TypeError("an optimizer over FlatParams reads the FlatParams' own grad buffer: "
                        "call step() without arguments (write grads into flat.grads)")

    def _grad_addresses(self, grads):
        return _adafactor_grad_addresses(grads, self._params, self._labels, self._wstart,
                                         self._wend)

    def _apply(self, grads, lr, t, nthreads, inv_scale) -> bool:
        # Adafactor runs its own plans (AdafactorPlan), one per element type.
        addrs = self._grad_addresses(grads)
        for idx, table, _ in self._af_plans:
            table[1] = addrs[idx]
        if self._skip_nonfinite:
            sign = -inv_scale if self._hyper["maximize"] else inv_scale
            if not all(plan.all_finite(sign, nthreads) for _, _, plan in self._af_plans):
                return False
        for _, _, plan in self._af_plans:
            plan.run(lr, t, nthreads, inv_scale)
        return True


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
        return super().step(grads, grad_scale=grad_scale)

    def _check_can_step(self) -> None:
        if not self._train_mode:
            raise RuntimeError("Optimizer was not in train mode when step is called. Please "
                               "insert .train() and .eval() calls on the optimizer. See "
                               "documentation for details.")

    def _apply(self, grads, lr, t, nthreads, inv_scale) -> bool:
        # The kernel steps with the warmup-scheduled lr and this step's averaging weight.
        lr_k, ckp1, lr_max, weight_sum = _schedule_free_step_values(
            t - 1, lr, self._hyper, self._lr_max, self._weight_sum)
        if not self._run_plans(grads, lr_k, t, nthreads, inv_scale, shared=(ckp1,)):
            return False
        self._scheduled_lr = lr_k
        self._lr_max = lr_max
        self._weight_sum = weight_sum
        return True

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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
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
                 rounding="nearest", seed=0, bfloat16_bits=False, ema=None):
        super().__init__(params, locals())
