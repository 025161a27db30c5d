"""lrfast's kernels as drop-in ``torch.optim`` optimizers for CPU training.

``from lrfast.torch import AdamW`` in place of ``from torch.optim import AdamW``: the classes
``SGD``, ``Adagrad``, ``RMSprop``, ``Adam`` and ``AdamW`` subclass :class:`torch.optim.Optimizer`
with torch's signatures, defaults, ``param_groups``, state names and ``state_dict`` format (a
state dict saved by ``torch.optim.Adam`` loads into ``lrfast.torch.Adam`` and back), hooks and
lr schedulers. ``step()`` runs lrfast's native kernels directly on the tensors' memory: no
copies, one native call per (group, dtype) for all of that group's tensors, instead of torch's
per-tensor loops or kernels.

What runs here: dense float32, float64, bfloat16 and float16 parameters on the CPU, and
complex64/complex128 ones on their real view (as torch does); FSDP2's DTensor parameters on
their local shards (each process updates its shard; the state stays DTensors of the param's
placements, as torch.optim keeps it). A non-contiguous parameter is updated through a
contiguous copy, gathered and written back at each step; contiguous ones are updated in place.
Anything else is refused when the parameter is added (a CUDA or meta tensor, another dtype, a
sparse parameter, a fake tensor) or at the step that meets it (a sparse gradient, except in
SGD, Adagrad and SparseAdam), with a message that says so, never computed wrongly. ``capturable=True`` and ``differentiable=True``
(which need torch's own autograd-aware update) are refused; ``foreach`` and ``fused`` are
accepted and stored, so state dicts keep torch's keys, but lrfast's kernel runs in either case.
A param whose ``.grad`` is None is skipped, as torch skips it. Threads:
``lrfast.set_num_threads``.

Half precision. bfloat16/float16 params are computed as torch's fused CPU kernels compute
them: each value loaded and widened to float32, the update in float32, every written buffer
rounded back (to nearest, ties to even). The state is kept in the param dtype by default
(torch's fused behaviour: state dicts match torch's), or in float32 with the lrfast-only
keyword ``state_dtype=torch.float32`` (valid values: None, the params' dtype, or float32 for
bfloat16/float16 params; a state dict saved either way loads either way, and float32 state is
not cast to the param dtype on load as torch would). Float32 params may keep their state in
half precision, ``state_dtype=torch.bfloat16`` (or ``torch.float16``): the update reads it
widened and rounds it back as it writes it (per ``rounding``), 2 bytes per element.
A float32 param may have a
bfloat16/float16 gradient (torch 2.13's ``p.grad_dtype = torch.bfloat16`` makes autograd
produce one): the kernel widens it as it reads it. Params are grouped into one native call per
(param dtype, grad dtype, state dtype) within a group. Against torch's fused kernels (Adam,
AdamW, Adagrad) one step agrees to rounding: bit for bit nearly everywhere, else 1 ulp of the
half type (torch fuses multiply-adds) and torch's fused Adagrad rounds its lr to the half
type. torch 2.13's fused CPU SGD is wrong on half params of 16 elements or more; lrfast's
SGD matches lrfast.reference (and torch's for-loop SGD to rounding).

8-bit state. ``state_dtype="int8"`` (or ``lrfast.quantization.Int8State(block_size=256,
min_size=4096)``) keeps each moment buffer of a float32, bfloat16 or float16 param of at least
``min_size`` elements as uint8 codes of the param's shape, ``state[name]``, and float32 scales,
one per block of ``block_size`` elements, ``state[name + "_absmax"]`` (lrfast.quantization
has the rule): about 1 byte per element instead of 4. Smaller params, and buffers that are not
moments (Rprop's step sizes, ASGD's average), keep float32 state. Each step dequantises a
block, updates it in float32 and quantises it back in the same kernel pass. Refused for
float64, complex and DTensor params and for updates that are not one element-wise pass
(Adafactor, schedule-free, LAMB, LARS, ADOPT). ``load_state_dict`` converts: a float state
dict into 8-bit state (quantised), an 8-bit one into float state (dequantised) or into another
block size; between optimizers of the same settings codes and scales load bit for bit.

``rounding="stochastic"`` (lrfast-only, with ``seed=0``) rounds every value stored into a
half buffer (params, state, CPUAdam's half copies) up or down with probability given by its
distance, the random bits a hash of (seed, step, buffer row, element index within the
group's dtype bucket), so a run reproduces for any thread count. The step is the update's
(``state['step']``); SGD, which keeps no step, uses 1 at a momentum buffer's first step and
the optimizer's count of ``step()`` calls plus one otherwise (that count is not in the state
dict: a resumed SGD run draws other bits than an uninterrupted one).

:class:`CPUAdam` is a drop-in for DeepSpeed's ``DeepSpeedCPUAdam`` (its constructor and
semantics, and older DeepSpeed's ``step(closure, fp16_param_groups)``, whose half copies of
the updated float32 params are written in the same kernel pass). torchao's
``CPUOffloadOptimizer(params, optimizer_class=lrfast.torch.AdamW)`` runs lrfast.torch's class
per offloaded param; tested only on CPU under a stand-in accelerator (no real host-device
transfer was tested).

Sparse gradients (``nn.Embedding(sparse=True)``): :class:`SGD` and :class:`Adagrad` take sparse
COO gradients as torch.optim does, and :class:`SparseAdam` is a drop-in for
``torch.optim.SparseAdam``; the rows a gradient touches are updated by the row-wise kernels of
:mod:`lrfast.embedding`, the state kept in torch's layout (see the classes' docstrings).

Weight averages. :func:`ema_multi_avg_fn` and :func:`swa_multi_avg_fn` are ``multi_avg_fn``s
for ``torch.optim.swa_utils.AveragedModel`` (in place of torch's ``get_ema_multi_avg_fn`` and
``get_swa_multi_avg_fn``): one native call per dtype for all the float tensors, torch's own
function for the others. Every class also takes ``ema=(averaged_model, model)`` (lrfast-only),
with an AveragedModel built with one of them: each ``step()`` then does what
``averaged_model.update_parameters(model)`` after it would, the averages of the params it
updates taken in the same native pass (the first update copies, ``n_averaged`` counts as
torch's; buffers copied, not averaged, as torch's default, or averaged with
``use_buffers=True``). A step that is not taken (a GradScaler step skipped for an inf
gradient, a step that raises) leaves the average alone. The pairing: ``model.parameters()``
with ``averaged_model.module.parameters()``, in order, of the same shapes and dtypes; every
optimizer param must be one of the model's. A model param the step did not update (not in the
optimizer, or without a gradient) is still averaged, after the step, as torch would. The
pairing is read when the optimizer is made (params replaced in either module later are not
seen; their memory moving, by ``.to()`` or ``.data``, is), and is not pickled: a copy of the
optimizer has no ``ema``. Save ``averaged_model.state_dict()`` beside the optimizer's.

This module imports torch; ``import lrfast`` never does. Its classes are made from the
optimizer specs (``lrfast._specs.OPTIMIZERS``), one per spec, each with torch.optim's signature
for the class of its name.

Examples
--------
>>> import torch
>>> import lrfast.torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
>>> opt = lrfast.torch.Adam([w], lr=0.1)
>>> w.grad = torch.tensor([0.5, -3.0])
>>> opt.step()
>>> [round(x, 6) for x in w.tolist()]
[0.9, -1.9]
>>> sorted(opt.state[w])
['exp_avg', 'exp_avg_sq', 'step']
"""
from __future__ import annotations

import inspect
import numbers
from itertools import repeat
from operator import attrgetter, getitem, is_
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _dispatch, _layout
from ._specs import OPTIMIZERS, TORCH_FLAGS, TORCH_REFUSED, OptimizerSpec
from ._precision import check_rounding, check_seed
from ._threads import get_num_threads
from .quantization import (SIGNED, UNSIGNED, Int8State, dequantize_blockwise,
                           quantize_blockwise, scales_name)

__all__ = list(OPTIMIZERS) + ["SparseAdam", "CPUAdam", "ema_multi_avg_fn",
                               "swa_multi_avg_fn"]

# The dtypes updated, and the kernel storage each runs as. A complex param is updated on its
# real view (``torch.view_as_real``: the real and imaginary parts as two real elements), as
# torch's optimizers do, so its state buffers are complex too and the state dicts torch's.
_STORAGE = {torch.float32: "float32", torch.float64: "float64", torch.complex64: "float32",
            torch.complex128: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_HALF = (torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# 8-bit state (``state_dtype="int8"`` or an Int8State): the params it is kept for, and the code
# of 0 in each map (a zero-initialised buffer's codes).
_INT8_PARAMS = (torch.float32, torch.bfloat16, torch.float16)
_ZERO_CODE = {"signed": int(np.flatnonzero(SIGNED == 0)[0]),
              "unsigned": int(np.flatnonzero(UNSIGNED == 0)[0])}
# The lrfast-only keywords every class takes after torch's arguments (see the module docstring).
_LRFAST_KEYWORDS = {"state_dtype": None, "rounding": "nearest", "seed": 0, "ema": None}


def _is_dtensor(t: Any) -> bool:
    cls = type(t)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def _local(t: Any) -> Any:
    """A DTensor's local shard (a view of its memory), any other tensor itself."""
    if not _is_dtensor(t):
        return t
    # The DTensor's own local tensor where it has one: to_local() of a Parameter makes a new
    # view at each call (microseconds per param, at every step); the memory is the same.
    local = getattr(t, "_local_tensor", None)
    return local if type(local) is torch.Tensor else t.to_local()


def _scalar(value: Any) -> Any:
    """A one-element tensor hyper-parameter (torch allows them) as a Python number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyper-parameter must have one element, got {value.shape}")
        return value.item()
    return value


def _scalar_dtype() -> torch.dtype:
    # torch keeps ``state['step']`` in float64 when that is the default dtype, else float32.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _round_to(dtype: torch.dtype):
    """``x -> x`` rounded to ``dtype`` as a 0-d tensor of it stores it."""
    if dtype == torch.float64:
        return float
    if dtype == torch.float32:
        return lambda x: float(np.float32(x))
    box = torch.empty((), dtype=dtype)

    def rnd(x):
        box.fill_(x)
        return box.item()
    return rnd


def _rounder(dtype: torch.dtype):
    """The scalar state's rounding (see ``Update.advance``): to ``dtype``, the state's type;
    a ``fresh`` value, which torch makes as a tensor of the default dtype
    (``torch.as_tensor(x)``) and copies into the state, to the default dtype first."""
    to_state = _round_to(dtype)
    default = torch.get_default_dtype()
    to_default = _round_to(default) if default != dtype else None

    def rnd(x, fresh=False):
        if fresh and to_default is not None:
            x = to_default(x)
        return to_state(x)
    return rnd


def _check_param(p: Any, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(p).__name__}")
    if _is_dtensor(p):
        # FSDP2's sharded params: each process updates its local shard, which is memory of
        # its own; the state follows the param (DTensors of the same placements, as torch's).
        _check_param(p.to_local(), where + " (its local shard)")  # type: ignore[attr-defined]
        return
    if getattr(type(p), "__torch_dispatch__", None) is not torch.Tensor.__torch_dispatch__:
        # A DTensor (FSDP2's sharded params), a fake or functional tensor: its data is not
        # this tensor's own memory (a DTensor's data_ptr() is 0), so the kernels cannot write
        # it. (Checked first: asking a fake tensor for its data_ptr is itself an error.)
        raise ValueError(f"{where} is a {type(p).__name__}, a tensor subclass whose data is not "
                         "its own memory (a DTensor, fake or functional tensor): lrfast.torch "
                         "updates plain tensors only (use torch.optim for these)")
    if p.device.type != "cpu":
        raise ValueError(f"{where} is on {p.device}: lrfast.torch updates CPU tensors only "
                         "(use torch.optim for other devices)")
    if p.layout is not torch.strided:
        raise ValueError(f"{where} is a {p.layout} tensor: lrfast.torch updates dense tensors only")
    if p.numel() and p.data_ptr() == 0:
        raise ValueError(f"{where} has no memory of its own (data_ptr() is 0): lrfast.torch "
                         "cannot update it")
    if p.dtype not in _STORAGE:
        raise TypeError(f"{where} has dtype {p.dtype}: lrfast.torch updates float32, float64, "
                        "bfloat16 and float16 tensors, and complex64/complex128 on their real "
                        "view (use torch.optim for other dtypes)")
    # A non-contiguous param (a view such as w[..., 0] or w.t()) is updated through a
    # contiguous copy, gathered and scattered back at each step (see _Optimizer.step).


_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_is = is_


def _identity_check(names):
    """``check(st, tensors)``: is ``st[names[i]] is tensors[i]`` for every i? Written out per
    count (at most four buffers), since this runs for every param at every step."""
    if len(names) == 1:
        a, = names
        return lambda st, t: st[a] is t[0]
    if len(names) == 2:
        a, b = names
        return lambda st, t: st[a] is t[0] and st[b] is t[1]
    if len(names) == 3:
        a, b, c = names
        return lambda st, t: st[a] is t[0] and st[b] is t[1] and st[c] is t[2]
    if len(names) == 4:
        a, b, c, d = names
        return lambda st, t: st[a] is t[0] and st[b] is t[1] and st[c] is t[2] and st[d] is t[3]
    return lambda st, t: all(st[n] is x for n, x in zip(names, t))


class _Plan:
    """One group's step, laid out for the kernels and kept between steps.

    Built from the group's params that have a gradient: their state (created if new), their
    ``state['step']`` tensors re-homed as 0-d views of one buffer (read with one call, advanced
    with another; torch keeps one tensor per param), and one address table per bucket holding
    the param and state addresses. A bucket is one native plan: the tensors of one (param
    dtype, grad dtype, state dtypes, half copy dtype, key), each table row read and written in
    its own element type. A later step reuses it while the same params have gradients of the
    same dtypes and the params' memory and state tensors are the same objects; it then only
    reads the gradients' addresses into the tables.
    """

    def __init__(self, opt, group, needs, params, states, keys, count_steps, gdtypes,
                 outs=None, averages=None):
        self.params = params
        self.positions = [k for k, p in enumerate(group["params"]) if p.grad is not None]
        self.ngroup = len(group["params"])
        self.param_ptrs = [p.data_ptr() for p in params]
        self.states = states
        self.needs = needs
        self.state_obj = opt.state
        # Per-param scalar state (NAdam's mu_product, ASGD's eta and mu): read at each step,
        # the params of a bucket sharing its values, and written back after the kernel ran.
        self.update = opt._spec.update
        self.scalar_names = tuple(b.name for b in self.update.scalar_state
                                  if all(b.name in st for st in states))
        self.steps = None
        # Does the step number change the kernel's arguments?
        self.key_splits = opt._spec.update.takes_step
        self.stochastic = opt._rounding == "stochastic"
        if count_steps:
            values = [float(st["step"]) for st in states]
            self.steps = torch.tensor(values, dtype=_scalar_dtype())
            for i, st in enumerate(states):
                st["step"] = self.steps[i]
        # What ``grad_pointers`` checks each step, per param of the group (None: no gradient
        # when the plan was made): the param's address, its grad's dtype, its state dict, and
        # the identities of the state tensors the tables point into.
        # With 8-bit state a param's block scales count among its state tensors.
        names = needs + (("step",) if self.steps is not None else ())
        pnames = [names + tuple(scales_name(n) for n in needs
                                if states[i][n].dtype == torch.uint8)
                  for i in range(len(params))]
        checks: dict[tuple, Any] = {}
        self.group_params = list(group["params"])
        entries: list[Any] = [None] * len(self.group_params)
        for i, k in enumerate(self.positions):
            same = checks.get(pnames[i])
            if same is None:
                same = checks[pnames[i]] = _identity_check(pnames[i])
            entries[k] = (self.param_ptrs[i], gdtypes[i], states[i],
                          tuple(states[i][n] for n in pnames[i]), same)
        self.entries = entries
        # The same checks as flat lists, for grad_pointers' fast path (every param of the group
        # had a gradient): each runs as one C-level map over the group instead of per param.
        self.dense = len(self.positions) == self.ngroup
        # A group with DTensors (FSDP2's params) is checked param by param, on the local
        # shards (a DTensor's own data_ptr() is 0): grad_pointers' general path.
        self.sharded = any(map(_is_dtensor, self.group_params))
        self.gdtypes = list(gdtypes)
        self.state_dicts = list(states)
        self.buffer_dicts = [st for st, ns in zip(states, pnames) for _ in ns]
        self.buffer_names = [n for ns in pnames for n in ns]
        self.buffer_tensors = [st[n] for st, ns in zip(states, pnames) for n in ns]
        update = opt._spec.update
        # The state buffers' local memory (a DTensor's shard)
        local = [{n: _local(states[i][n]) for n in needs} for i in range(len(params))]
        # ``averages``: per param, the tensor of an ``ema=`` AveragedModel its step also
        # averages (None: none, or one the step cannot write; see _EmaLink). A bucket's
        # tensors are all averaged or none is.
        if averages is None:
            averages = [None] * len(params)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            sdt = tuple(local[i][n].dtype for n in needs)
            odt = outs[i].dtype if outs is not None else None
            scal = self._scalar_key(i)
            groups.setdefault((p.dtype, gdtypes[i], sdt, odt, keys[i], scal,
                               averages[i] is not None), []).append(i)
        self.buckets = []
        self.averaged: list[bool] = []
        for (dtype, gdtype, sdt, odt, key, _, averaged), idx in groups.items():
            storage = _STORAGE[dtype]
            rows: list[Any] = [[self.param_ptrs[i] for i in idx], None]
            types: list[Any] = [storage, _STORAGE[gdtype]]
            scale_rows = []  # 8-bit rows' block scales: after the half copy, in row order
            for b in update.buffers:
                if b.name in needs:
                    rows.append([local[i][b.name].data_ptr() for i in idx])
                    if local[idx[0]][b.name].dtype == torch.uint8:
                        types.append(b.kernel_row_name)
                        scale_rows.append([states[i][scales_name(b.name)].data_ptr()
                                           for i in idx])
                    else:
                        types.append(_STORAGE[local[idx[0]][b.name].dtype])
                else:
                    rows.append(None)
                    types.append(None)
            if odt is not None:
                rows.append([outs[i].data_ptr() for i in idx])
            rows += scale_rows
            # real elements: a complex param is two per element (see _STORAGE)
            table, offsets = _layout.table(
                rows, [params[i].numel() * (2 if params[i].is_complex() else 1) for i in idx])
            # Row types (None: a row the update does not read, which the mixed-type driver
            # then leaves alone) for half params or when a read row differs from the params'
            # type; else none, every row is the params' type and the plan stays off the
            # mixed-type driver.
            mixed = storage in ("bfloat16", "float16") or any(
                t is not None and t != storage for t in types)
            q = opt._int8
            plan = _layout.plan(update.name, table, offsets, storage,
                                rows=types if mixed else None,
                                out=None if odt is None else _STORAGE[odt],
                                qblock=q.block_size if scale_rows and q is not None else 0)
            if opt._rounding != "nearest":
                plan.set_options(False, False, opt._rounding, opt._seed)
            if averaged:
                plan.set_averages(np.array([averages[i].data_ptr() for i in idx],
                                           dtype=np.intp))
            self.buckets.append((plan, key, idx, table))
            self.averaged.append(averaged)
        # The model params whose average this plan's run takes (``ema=``), by identity.
        self.fused = [group["params"][k] for k, a in zip(self.positions, averages)
                      if a is not None]
        self.single = len(self.buckets) == 1
        # A plan whose keys change after this step (SGD's first step) is used once.
        self.reusable = not any(key == 1 for _, key, _, _ in self.buckets)

    def _scalar_key(self, i):
        """Param ``i``'s scalar state: (value, dtype) per name; () without scalar state."""
        st = self.states[i]
        return tuple((st[n].item(), st[n].dtype) for n in self.scalar_names)

    def grad_pointers(self, group, state):
        """The gradients' addresses if this plan still describes the group, else None."""
        gparams = group["params"]
        if state is not self.state_obj or len(gparams) != len(self.group_params):
            return None
        if self.dense and not self.sharded:
            return self._dense_grad_pointers(gparams, state)
        out: list[int] = []
        append = out.append
        try:
            for p, q, entry in zip(gparams, self.group_params, self.entries):
                g = p.grad
                if p is not q:
                    return None
                if entry is None:
                    if g is not None:
                        return None
                    continue
                ptr, gdtype, st, tensors, same = entry
                if g is None:
                    return None
                local, lg = _local(p), _local(g)
                if (local.data_ptr() != ptr or lg.dtype is not gdtype
                        or not lg.is_contiguous() or state.get(p) is not st
                        or not same(st, tensors)):
                    return None
                if (local is not p or lg is not g) and (
                        _is_dtensor(p) != _is_dtensor(g) or lg.shape != local.shape):
                    return None  # (_checked_grads says what is wrong)
                append(lg.data_ptr())
        except (RuntimeError, KeyError):  # a sparse gradient; a state buffer removed
            return None
        return out

    def _dense_grad_pointers(self, gparams, state):
        """grad_pointers' checks when every param had a gradient, each a map over the group
        (this runs at every step: per-param Python was most of a small model's step)."""
        try:
            if not all(map(_is, gparams, self.group_params)):
                return None
            grads = list(map(_GRAD, gparams))
            if any(map(_is, grads, repeat(None))):
                return None
            if (list(map(_DATA_PTR, gparams)) != self.param_ptrs
                    or not all(map(_is, map(_DTYPE, grads), self.gdtypes))
                    or not all(map(_IS_CONTIGUOUS, grads))
                    or not all(map(_is, map(state.get, gparams), self.state_dicts))
                    or not all(map(_is, map(getitem, self.buffer_dicts, self.buffer_names),
                                   self.buffer_tensors))):
                return None
            return list(map(_DATA_PTR, grads))
        except (RuntimeError, KeyError):  # a sparse gradient; a state buffer removed
            return None

    def run(self, values, lr, nthreads, gptrs, calls=1, kernel_step=None, hyper=None,
            grad_sumsq=None, step_scalars=None, average=None):
        """Run the update (hyper-parameters ``values`` in the kernel's order) with these
        gradient addresses. False (nothing done) when the params' step counts no longer fall
        into this plan's buckets. ``calls``: the optimizer's count of steps, the stochastic
        rounding's step where torch keeps none (SGD); ``kernel_step``: the step the kernel is
        told whatever the counts (CPUAdam without bias correction, schedule-free's k + 1);
        ``hyper``: the validated hyper-parameters (for an update with scalar state);
        ``grad_sumsq``: the sum of the squares of all the optimizer's grads (LAMB's clipping);
        ``step_scalars``: the update's per-step values (``Update.scalars``) where the class
        derives them itself (schedule-free). False also when the params of a bucket no longer
        share their scalar state. ``average``: (mode, weight) of the fused weight average
        (``ema=``) for the buckets that have one; None: they leave their averages alone."""
        steps = self.steps.tolist() if self.steps is not None else None
        calls_ = []
        scalars = []
        for plan, key, idx, table in self.buckets:
            if steps is not None and self.key_splits:
                if self.single:
                    lo, hi = min(steps), max(steps)
                else:
                    lo = min(steps[i] for i in idx)
                    hi = max(steps[i] for i in idx)
                if hi != lo:
                    return False
                key = int(lo) + 1  # this update's 1-based step
            if self.scalar_names:
                first = self._scalar_key(idx[0])
                if any(self._scalar_key(i) != first for i in idx[1:]):
                    return False
                step = 1 if key is None else key
                scalars.append(self.update.step_scalars(
                    hyper, step, lr, {n: v for n, (v, _) in zip(self.scalar_names, first)},
                    _rounder(first[0][1])))
            else:
                scalars.append(((), {}))
            calls_.append((plan, key, idx, table))
        for (plan, key, idx, table), (kscalars, new), averaged in zip(calls_, scalars,
                                                                      self.averaged):
            table[_layout.GRAD_ROW] = gptrs if self.single else [gptrs[i] for i in idx]
            plan.set_hyper(values)
            if averaged:
                plan.set_average_step(*(average or ("none", 0.0)))
            step = 1 if key is None else key
            if kernel_step is not None:
                step = kernel_step
            elif self.stochastic:
                # The rounding's random bits change every step also where the update ignores
                # the step (RMSprop: its count) or torch keeps none (SGD, which reads only
                # "first step of the momentum buffer or not": the optimizer's count of steps).
                if steps is None:
                    step = 1 if key == 1 else calls + 1
                elif not self.key_splits:
                    step = int(max(steps[i] for i in idx)) + 1
            if step_scalars is not None:
                kscalars = step_scalars
            if grad_sumsq is None:
                plan.run(lr, step, nthreads, 1.0, kscalars)
            else:
                plan.run(lr, step, nthreads, 1.0, kscalars, grad_sumsq=grad_sumsq)
            for i in idx:
                st = self.states[i]
                for name, value in new.items():
                    st[name].fill_(value)
        if self.steps is not None:
            self.steps.add_(1)
        return True


class _Optimizer(torch.optim.Optimizer):
    """What every class shares: parameter checks, state, the per-step gather and the kernel
    call. A class is this with a spec (``_spec``, from ``lrfast._specs.OPTIMIZERS``) and a
    signature; see :func:`_make_class`."""

    _spec: OptimizerSpec
    # ``ema=``: the AveragedModel each step also updates (see _EmaLink); not pickled, so a copy
    # or an unpickled optimizer has none.
    _ema: _EmaLink | None = None
    # During a step with ``ema=``: (mode, weight) of its average, and the lists of model params
    # whose average the plans' runs took (see _step_groups).
    _avg_step: tuple[str, float] | None = None
    _avg_fused: list[list[torch.Tensor]] | None = None

    def __init__(self, params, defaults, state_dtype=None, rounding="nearest", seed=0,
                 ema=None):
        self._plans: dict[int, _Plan] = {}
        defaults = self._group_defaults(defaults)
        # The hyper-parameters are checked before ``params`` is read, as torch does: a bad
        # value is reported as such whatever ``params`` is.
        self._check_defaults(defaults)
        # lrfast-only options of the whole optimizer (not in param_groups, so state dicts
        # keep torch's format; kept by pickling and deepcopy through __getstate__)
        self._state_dtype = self._checked_state_dtype(state_dtype)
        self._rounding = check_rounding(rounding)
        self._seed = check_seed(seed)
        self._calls = 0  # step() calls: the stochastic rounding's step where torch keeps none
        super().__init__(params, defaults)
        if ema is not None:
            self._ema = _EmaLink(self, ema)

    @property
    def ema(self) -> Any:
        """The ``torch.optim.swa_utils.AveragedModel`` each step updates (``ema=``), or None."""
        return self._ema.averaged if self._ema is not None else None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_state_dtype=self._state_dtype, _rounding=self._rounding,
                     _seed=self._seed, _calls=self._calls)
        return state

    # Can this class keep 8-bit state? Not where the update reads a whole tensor's state at
    # once (``Update.per_tensor``: the kernels refuse it) nor for classes with a step of their
    # own (Adafactor, schedule-free).
    _takes_int8 = True

    def _checked_state_dtype(self, state_dtype: Any) -> Any:
        """``state_dtype`` validated: None, one of _STATE_DTYPES, or an Int8State ("int8":
        its defaults)."""
        if isinstance(state_dtype, str) and state_dtype == "int8":
            state_dtype = Int8State()
        if isinstance(state_dtype, Int8State):
            if not self._takes_int8 or self._spec.update.per_tensor:
                why = ("reads each tensor's whole state at once (per-tensor norms or means)"
                       if self._spec.update.per_tensor else "is not a one-pass element-wise "
                       "update over the state")
                raise ValueError(f"state_dtype={state_dtype!r} (8-bit state) is not available "
                                 f"for lrfast.torch.{self._spec.name}: its update {why}; use "
                                 "state_dtype=None or torch.float32/torch.bfloat16")
            return state_dtype
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                            and state_dtype in _STATE_DTYPES):
            raise ValueError("state_dtype must be None (the params' dtype), one of "
                             f"{', '.join(map(str, _STATE_DTYPES))}, 'int8' or an "
                             f"lrfast.quantization.Int8State, got {state_dtype!r}")
        return state_dtype

    @property
    def _int8(self) -> Int8State | None:
        """The 8-bit state's settings, or None."""
        sd = self._state_dtype
        return sd if isinstance(sd, Int8State) else None

    def _state_dtype_for(self, p: torch.Tensor, where: str = "a parameter") -> torch.dtype:
        """The dtype of ``p``'s (unquantised) state buffers: its own, float32 for a
        half-precision param when ``state_dtype=torch.float32``, bfloat16/float16 for a float32
        param when ``state_dtype`` is that, and float32 with 8-bit state (for the buffers and
        params it does not quantise)."""
        sd = self._state_dtype
        if isinstance(sd, Int8State):
            if p.dtype not in _INT8_PARAMS:
                raise ValueError(f"state_dtype={sd!r} (8-bit state) is not available for "
                                 f"{where} of dtype {p.dtype}: 8-bit state is kept for "
                                 "float32, bfloat16 and float16 params only (use state_dtype="
                                 "None for float64 and complex params)")
            if _is_dtensor(p):
                raise ValueError(f"state_dtype={sd!r} (8-bit state) is not available for "
                                 f"{where}, a DTensor: the block scales of a sharded param are "
                                 "not kept (use state_dtype=None or torch.bfloat16)")
            return torch.float32
        if sd is None or sd == p.dtype:
            return p.dtype
        if sd == torch.float32 and p.dtype in _HALF:
            return sd
        if sd in _HALF and p.dtype == torch.float32:
            return sd
        raise ValueError(f"state_dtype={sd} is not available for {where} of dtype {p.dtype}: "
                         "the state is kept in the param's dtype, in torch.float32 for "
                         "torch.bfloat16/torch.float16 params, or in torch.bfloat16/"
                         "torch.float16 for torch.float32 params")

    def _quantized(self, p: torch.Tensor, name: str) -> str:
        """The 8-bit map ("signed", "unsigned") buffer ``name`` of ``p`` is kept in, or ""
        where it is not kept in 8 bits (no 8-bit state, a small param, not a moment)."""
        q = self._int8
        if q is None or not q.quantizes(p.numel()):
            return ""
        for b in self._spec.update.buffers:
            if b.name == name:
                return b.quant
        return ""

    @property
    def _name(self) -> str:
        return self._spec.name

    def _group_defaults(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The group defaults made from the constructor's arguments (a class whose reference
        implementation keeps some of them elsewhere, or adds entries, changes them here)."""
        return defaults

    def _group_values(self, group: dict[str, Any]) -> dict[str, Any]:
        """Update hyper-parameters a group does not hold, from where the class keeps them."""
        return {}

    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        """torch's constructor checks of the defaults, with its messages, then lrfast's."""
        lr = defaults["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if self._spec.torch is not None and self._spec.torch.tensor_rules:
            _check_tensor_rules(defaults)
        self._hyper(defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``__setstate__`` (also the end of ``load_state_dict``), then the entries an
        older state dict lacks and, where it kept a step as a number, the step as a tensor."""
        super().__setstate__(state)
        self._plans = {}
        t = self._spec.torch
        for group in self.param_groups:
            for name, value in (t.older.items() if t is not None else ()):
                group.setdefault(name, value)
            if t is not None:
                # Whatever the state dict says, entries the class fixes keep their value (an
                # AdamW's decay is decoupled even when loaded from an Adam's state dict).
                group.update(t.group)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=_scalar_dtype())
                for b in self._spec.update.scalar_state:  # kept as a number by older torch
                    if st and b.name in st and not torch.is_tensor(st[b.name]):
                        st[b.name] = torch.tensor(float(st[b.name]), dtype=_scalar_dtype())

    # -- groups ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then lrfast's checks of the new group's params and
        hyper-parameters; a group that fails them is not added."""
        super().add_param_group(param_group)
        self._plans.clear()
        group = self.param_groups[-1]
        try:
            for k, p in enumerate(group["params"]):
                where = f"parameter {k} of group {len(self.param_groups) - 1}"
                _check_param(p, where)
                self._state_dtype_for(p, where)
            self._hyper(group)
            if self._ema is not None:
                self._ema.check_params(group["params"], len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise
        self._init_group_state(group)

    def _init_group_state(self, group: dict[str, Any]) -> None:
        """State created when a group is added, where torch does so (Adagrad)."""
        if self._spec.torch is not None and self._spec.torch.state_at_init:
            hyper = self._hyper(group)
            for p in group["params"]:
                self._state_for(p, hyper)

    def _check_flags(self, group: dict[str, Any]) -> None:
        for name in TORCH_REFUSED:
            if group.get(name):
                raise ValueError(f"lrfast.torch.{self._name} does not support {name}=True "
                                 "(use torch.optim)")

    # -- state ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (same format), then a check of every loaded buffer: its
        shape, dtype, device and layout must be its param's. On a mismatch nothing is kept.

        8-bit state (a buffer's uint8 codes beside its ``<name>_absmax`` block scales) loads
        bit for bit into an optimizer that keeps that buffer in 8 bits with the same block
        size; otherwise it is converted: quantised from a float buffer, dequantised into a
        float one (or requantised with another block size, read from the number of scales)."""
        saved = ({p: dict(st) for p, st in self.state.items()},
                 [{k: v for k, v in g.items()} for g in self.param_groups])
        # torch casts every loaded buffer to its param's dtype; where lrfast keeps float32
        # state for a half param, the buffer is taken again from the saved one, widened.
        saved_ids = [i for g in state_dict.get("param_groups", ()) for i in g.get("params", ())]
        super().load_state_dict(state_dict)
        try:
            loaded = dict(zip((p for g in self.param_groups for p in g["params"]), saved_ids))
            for gi, group in enumerate(self.param_groups):
                self._hyper(group)
                for k, p in enumerate(group["params"]):
                    want = self._state_dtype_for(p)
                    scalar_state = self._spec.update.scalar_names(self._hyper(group))
                    handled: set = set()
                    if self.state.get(p):
                        handled = self._load_codes(p, self.state[p],
                                                   state_dict["state"][loaded[p]],
                                                   f"of parameter {k} of group {gi}")
                    for name, buf in list(self.state.get(p, {}).items()):
                        if name == "step" or name in handled:
                            continue
                        if name in scalar_state:
                            if (not isinstance(buf, torch.Tensor) or buf.dim() != 0
                                    or not buf.is_floating_point()):
                                raise ValueError(f"state {name!r} of parameter {k} of group "
                                                 f"{gi} must be a 0-d floating-point tensor")
                            continue
                        if not isinstance(buf, torch.Tensor):
                            raise ValueError(f"state {name!r} of parameter {k} of group {gi} "
                                             f"is a {type(buf).__name__}, not a tensor")
                        if want != p.dtype and buf.dtype == p.dtype:
                            src = state_dict["state"][loaded[p]][name]
                            buf = src.to(device=p.device, dtype=want, copy=True)
                            self.state[p][name] = buf
                        if (buf.shape != p.shape or buf.dtype != want
                                or buf.device != p.device or buf.layout is not torch.strided):
                            raise ValueError(
                                f"state {name!r} of parameter {k} of group {gi} does not match "
                                f"its parameter: {tuple(buf.shape)} {buf.dtype} on {buf.device}"
                                f" versus {tuple(p.shape)} {p.dtype} (state in {want})")
                        if not buf.is_contiguous():
                            # (torch keeps a transposed param's state transposed; the kernels
                            # read buffers in element order, so lrfast keeps them contiguous)
                            self.state[p][name] = buf.contiguous()
        except Exception:
            self.state.clear()
            self.state.update(saved[0])
            for group, old in zip(self.param_groups, saved[1]):
                group.clear()
                group.update(old)
            raise
        self._plans.clear()

    def _load_codes(self, p: torch.Tensor, st: dict, src: dict, where: str) -> set:
        """Put the state buffers of ``p`` that are, or are to be, 8-bit into the form this
        optimizer keeps them in, from ``src`` (the state dict's entry: torch's load has cast
        every floating tensor to the param's dtype, codes included). Returns the names done."""
        q = self._int8
        handled: set = set()
        for b in self._spec.update.buffers:
            name, sname = b.name, scales_name(b.name)
            if name not in st:
                if sname in st:
                    raise ValueError(f"state {sname!r} {where} (8-bit block scales) has no "
                                     f"{name!r} beside it")
                continue
            codes, scales = src.get(name), src.get(sname)
            from_codes = scales is not None or (isinstance(codes, torch.Tensor)
                                                and codes.dtype == torch.uint8)
            sign = self._quantized(p, name)
            if not from_codes and not sign:
                continue  # a float buffer kept in float: the general checks
            handled.update((name, sname))
            if from_codes:
                if not b.quant:
                    raise ValueError(f"state {name!r} {where} holds 8-bit codes, but "
                                     f"lrfast.torch.{self._name} never keeps {name!r} in 8 bits")
                block = self._check_loaded_codes(p, name, codes, scales, where)
                assert codes is not None and scales is not None  # (checked)
                codes, scales = codes.detach().cpu(), scales.detach().cpu()
                if sign and q is not None and scales.numel() == q.nblocks(p.numel()):
                    # the same blocks: bit for bit
                    st[name] = codes.clone(memory_format=torch.contiguous_format)
                    st[sname] = scales.clone(memory_format=torch.contiguous_format)
                    continue
                values = dequantize_blockwise(codes.contiguous().numpy(),
                                              scales.contiguous().numpy(),
                                              b.quant == "signed", block)
            else:
                if (not isinstance(codes, torch.Tensor) or _is_dtensor(codes)
                        or tuple(codes.shape) != tuple(p.shape) or codes.is_complex()
                        or not codes.is_floating_point()):
                    got = (f"{tuple(codes.shape)} {codes.dtype}"
                           if isinstance(codes, torch.Tensor) else f"a {type(codes).__name__}")
                    raise ValueError(f"state {name!r} {where} does not match its parameter: "
                                     f"{got} versus {tuple(p.shape)} (a real floating-point "
                                     "tensor to quantise)")
                values = codes.detach().to(device="cpu", dtype=torch.float32).numpy()
            if sign:
                assert q is not None
                c, sc = quantize_blockwise(values, sign == "signed", q.block_size)
                st[name] = torch.from_numpy(c)
                st[sname] = torch.from_numpy(sc)
            else:
                st[name] = torch.from_numpy(np.ascontiguousarray(values)).to(
                    device=p.device, dtype=self._state_dtype_for(p))
                st.pop(sname, None)
        if handled:  # each buffer's scales right after it
            order = [n for n in st if not (n.endswith("_absmax") and n in handled)]
            entries = {}
            for n in order:
                entries[n] = st[n]
                if scales_name(n) in st and n in handled:
                    entries[scales_name(n)] = st[scales_name(n)]
            st.clear()
            st.update(entries)
        return handled

    @staticmethod
    def _check_loaded_codes(p: torch.Tensor, name: str, codes: Any, scales: Any,
                            where: str) -> int:
        """A loaded 8-bit buffer's codes and scales fit ``p``; returns their block size (the
        smallest that gives that many blocks: any other that does splits the same way)."""
        if p.is_complex() or _is_dtensor(p):
            raise ValueError(f"state {name!r} {where} holds 8-bit codes, which are not kept for "
                             f"a {'DTensor' if _is_dtensor(p) else p.dtype} param")
        if (not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8
                or tuple(codes.shape) != tuple(p.shape) or codes.layout is not torch.strided
                or _is_dtensor(codes)):
            got = (f"{tuple(codes.shape)} {codes.dtype}" if isinstance(codes, torch.Tensor)
                   else f"a {type(codes).__name__}")
            raise ValueError(f"state {name!r} {where} must be 8-bit codes (uint8 of the "
                             f"param's shape {tuple(p.shape)}) beside its block scales, got "
                             f"{got}")
        sname = scales_name(name)
        if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32
                or scales.dim() != 1 or scales.layout is not torch.strided
                or _is_dtensor(scales)):
            got = (f"{tuple(scales.shape)} {scales.dtype}" if isinstance(scales, torch.Tensor)
                   else f"a {type(scales).__name__}")
            raise ValueError(f"state {sname!r} {where} must be the block scales of {name!r} "
                             f"(a 1-D float32 tensor), got {got}")
        n, k = p.numel(), scales.numel()
        for shift in range(5, 12):
            if -(-n // (1 << shift)) == k:
                return 1 << shift
        raise ValueError(f"state {sname!r} {where} has {k} block scales: no block size from "
                         f"32 to 2048 splits the param's {n} elements into that many blocks")

    @property
    def _counts_steps(self) -> bool:
        return self._spec.torch is None or self._spec.torch.step_state

    def _state_for(self, p: torch.Tensor, hyper: dict[str, Any]) -> tuple[Any, Any]:
        """The param's state, with every buffer these hyper-parameters need (made when new),
        and the bucket key of its update (see ``_Plan``): None where torch counts steps;
        otherwise the step the kernel is told, 1 when the buffers were made now (SGD's
        momentum buffer then starts as the gradient) and 2 after."""
        needs = self._needs(hyper)
        counts = self._counts_steps
        scalar_state = self._spec.update.scalar_names(hyper)
        if scalar_state and not self.state.get(p):
            # torch's order: step, the scalar state (0-d tensors of torch's scalar dtype),
            # then the buffers
            st = self.state[p]
            st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            for name in scalar_state:
                st[name] = torch.tensor(float(self._spec.update.initial_value(name, hyper)),
                                        dtype=_scalar_dtype())
        if not needs and not counts:
            # No state: torch makes no entry for the param (self.state is a defaultdict, so
            # only ``get`` leaves it untouched).
            return self.state.get(p), 2
        st = self.state[p]
        made = False
        for name in needs:
            if st.get(name) is None:
                sign = self._quantized(p, name)
                if sign:
                    st[name], st[scales_name(name)] = self._new_codes(name, p, hyper, sign)
                else:
                    st[name] = self._new_buffer(name, p, hyper)
                made = True
        if counts:
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            return st, None
        return st, 1 if made else 2

    def _new_buffer(self, name: str, p: torch.Tensor, hyper: dict[str, Any]) -> torch.Tensor:
        # Always contiguous (torch's preserve_format would keep a transposed param's layout):
        # the kernels read a buffer in the order of a contiguous param, or of the contiguous
        # copy a non-contiguous param is updated through.
        value = self._spec.update.initial_value(name, hyper)
        dtype = self._state_dtype_for(p)
        if value == 0:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        # On a complex param's real view both parts start at the value, as in torch.
        fill = complex(value, value) if p.is_complex() else value
        return torch.full_like(p, fill, dtype=dtype, memory_format=torch.contiguous_format)

    def _new_codes(self, name: str, p: torch.Tensor, hyper: dict[str, Any],
                   sign: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A new 8-bit buffer: (uint8 codes of the param's shape, float32 block scales), every
        element reading as the buffer's initial value (0: the code of 0 and zero scales)."""
        q = self._int8
        assert q is not None
        value = self._spec.update.initial_value(name, hyper)
        nblocks = q.nblocks(p.numel())
        if value == 0:
            code, scale = _ZERO_CODE[sign], 0.0
        else:  # a block of the value, quantised: every block of the buffer is that one
            c, sc = quantize_blockwise(np.full(q.block_size, value, dtype=np.float32),
                                       sign == "signed", q.block_size)
            code, scale = int(c[0]), float(sc[0])
        return (torch.full(p.shape, code, dtype=torch.uint8),
                torch.full((nblocks,), scale, dtype=torch.float32))

    # -- the step ---------------------------------------------------------------------------

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The update's validated hyper-parameters from a group (torch's names and pairs)."""
        self._check_flags(group)
        spec = self._spec
        # The class's arguments, pairs split (and checked) and the values it fixes added ...
        raw = spec.expand({name: group[name] for name in spec.arguments if name in group})
        raw = {name: _scalar(value) for name, value in raw.items()}
        # ... then torch's own names for update options (Adam's decoupled_weight_decay).
        for torch_name, name in (spec.torch.renamed.items() if spec.torch else ()):
            if torch_name in group:
                raw[name] = bool(group[torch_name])
        raw.update({name: _scalar(value) for name, value in self._group_values(group).items()})
        # Options torch does not have (Adagrad's eps_inside_sqrt) take their defaults.
        return spec.update.validate(raw)

    def _needs(self, hyper: dict[str, Any]) -> tuple[str, ...]:
        """The state buffers these hyper-parameters use."""
        return self._spec.update.state_buffers(hyper)

    @torch.no_grad()
    def step(self, closure=None):
        """Run one update of every param that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups()
        return loss

    def _step_groups(self, outs=None, kernel_steps=None, grad_sumsq=None, step_values=None,
                     hypers=None):
        """The step of every group (``_run_groups``) and, with ``ema=``, its weight average:
        fused into the plans' runs where it can be, then the rest (see _EmaLink)."""
        ema = self._ema
        if ema is None:
            self._run_groups(outs, kernel_steps, grad_sumsq, step_values, hypers)
            return
        average = ema.begin(self)  # (checks only: a step that raises changes nothing)
        self._avg_step, self._avg_fused = average, []
        try:
            self._run_groups(outs, kernel_steps, grad_sumsq, step_values, hypers)
            fused = self._avg_fused
        finally:
            self._avg_step = self._avg_fused = None
        ema.finish(average, fused)

    def _averages_of(self, params):
        """Per param (of a group, with a gradient): the ``ema=`` average its step writes, or
        None (see _EmaLink); None without ``ema=``."""
        if self._avg_step is None or self._ema is None:
            return None
        return self._ema.fusable(params)

    def _run_groups(self, outs=None, kernel_steps=None, grad_sumsq=None, step_values=None,
                    hypers=None):
        """The step of every group. ``outs``: per group, a list (by position in the group)
        of half tensors receiving the updated float32 params (CPUAdam's fp16_param_groups);
        ``kernel_steps``: per group, the step the kernel is told, or None (its count);
        ``grad_sumsq``: the sum of the squares of every group's grads (LAMB's clipping);
        ``step_values``: per group, (lr, per-step scalars) in place of the group's lr, for an
        update that reads scalars (schedule-free: the warmup-scheduled lr and ckp1);
        ``hypers``: per group, its validated hyper-parameters where the caller has them."""
        update = self._spec.update
        nthreads = get_num_threads()
        # Every group and gradient is checked before any state is created or memory written.
        work = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group) if hypers is None else hypers[gi]
            needs = self._needs(hyper)
            values = update.kernel_values(hyper, _dispatch.kernels)
            plan = self._plans.get(gi)
            gptrs = None
            if plan is not None and plan.needs == needs and outs is None:
                gptrs = plan.grad_pointers(group, self.state)
            if gptrs is not None:
                work.append((gi, group, hyper, needs, values, plan, gptrs))
            else:
                grads = self._checked_grads(gi, group, outs)
                self._check_state(gi, group, needs)
                work.append((gi, group, hyper, needs, values, None, grads))
        self._calls += 1  # (after the checks: a step that raises changes nothing)
        for gi, group, hyper, needs, values, plan, grads in work:
            lr = hyper["lr"]
            scalars: Any = None  # (None: the plan derives them, if the update has any)
            if step_values is not None:
                lr, scalars = step_values[gi]
            kstep = kernel_steps[gi] if kernel_steps is not None else None
            average = self._avg_step
            if plan is not None and plan.run(values, lr, nthreads, grads, self._calls, kstep,
                                             hyper, grad_sumsq, scalars, average):
                if self._avg_fused is not None:
                    self._avg_fused.append(plan.fused)
                continue
            if plan is not None:  # step counts diverged from the plan's buckets: lay out again
                grads = self._checked_grads(gi, group, outs)
            self._plans.pop(gi, None)
            params = [p for p, _, _ in grads]
            if not params:
                continue
            states, keys = [], []
            for p in params:
                st, key = self._state_for(p, hyper)
                states.append(st)
                keys.append(key)
            # A DTensor is updated on its local shard. A non-contiguous param is gathered into
            # a contiguous copy, updated there, and scattered back; its group is laid out anew
            # at every step (never the others).
            local = [_local(p) for p in params]
            targets = [w if w.is_contiguous() else w.contiguous() for w in local]
            gathered = any(w is not p for w, p in zip(targets, local))
            gdtypes = [g.dtype for _, g, _ in grads]
            halves = None if outs is None else [h for _, _, h in grads]
            count = self._counts_steps
            averages = self._averages_of(params)
            plan = _Plan(self, group, needs, targets, states, [None] * len(params) if count
                         else keys, count, gdtypes, halves, averages)
            gptrs = [g.data_ptr() for _, g, _ in grads]
            if not plan.run(values, lr, nthreads, gptrs, self._calls, kstep, hyper,
                            grad_sumsq, scalars, average):
                # Params at different step counts (added, or without a gradient, at other
                # times): one call per (dtype, step), laid out for this step only.
                keys = [int(st["step"]) + 1 for st in states]
                plan = _Plan(self, group, needs, targets, states, keys, False, gdtypes, halves,
                             averages)
                plan.run(values, lr, nthreads, gptrs, self._calls, kstep, hyper, grad_sumsq,
                         scalars, average)
                for st in states:
                    st["step"].add_(1)
            elif plan.reusable and not gathered and outs is None:
                self._plans[gi] = plan
            if self._avg_fused is not None:
                self._avg_fused.append(plan.fused)
            for w, p in zip(targets, local):
                if w is not p:
                    p.copy_(w)

    def _check_state(self, gi, group, needs):
        """The state buffers a new layout will point the kernels at, where the state was set
        other than by ``load_state_dict`` (ZeroRedundancyOptimizer's ``load_state_dict``
        assigns the local optimizer's ``state`` entries directly): a buffer that does not fit
        its param (shape, kind, dtype, device) is refused before anything is written; a
        non-contiguous one is replaced by a contiguous copy, as ``load_state_dict`` does."""
        for k, p in enumerate(group["params"]):
            st = self.state.get(p) if p.grad is not None else None
            if not st:
                continue
            for name in needs:
                buf = st.get(name)
                if buf is None:
                    continue
                if self._quantized(p, name) or (isinstance(buf, torch.Tensor)
                                                and buf.dtype == torch.uint8):
                    self._check_codes(st, name, p, f"of parameter {k} of group {gi}")
                    continue
                lp = _local(p)
                lb = _local(buf) if isinstance(buf, torch.Tensor) else None
                if (lb is None or _is_dtensor(buf) != _is_dtensor(p) or lb.shape != lp.shape
                        or lb.dtype not in _STORAGE or lb.is_complex() != lp.is_complex()
                        or lb.device != lp.device or lb.layout is not torch.strided):
                    what = (f"{tuple(lb.shape)} {lb.dtype} on {lb.device}" if lb is not None
                            else f"a {type(buf).__name__}")
                    raise ValueError(
                        f"state {name!r} of parameter {k} of group {gi} does not fit its "
                        f"parameter: {what} versus {tuple(lp.shape)} {lp.dtype} on "
                        f"{lp.device}")
                if not lb.is_contiguous():
                    if _is_dtensor(buf):
                        raise ValueError(f"state {name!r} of parameter {k} of group {gi} has "
                                         "a non-contiguous local shard")
                    st[name] = buf.contiguous()

    def _check_codes(self, st, name, p, where):
        """Buffer ``name`` of ``p`` where the optimizer keeps it in 8 bits: uint8 codes of the
        param's shape and float32 block scales (one per block of the optimizer's block size),
        contiguous CPU tensors; anything else is refused."""
        q = self._int8
        codes, scales = st.get(name), st.get(scales_name(name))
        if not self._quantized(p, name):
            raise ValueError(f"state {name!r} {where} holds 8-bit codes (uint8), but this "
                             "optimizer keeps it in "
                             f"{self._state_dtype_for(p)} (state_dtype={self._state_dtype!r}, "
                             f"{p.numel()} elements)")
        assert q is not None
        nblocks = q.nblocks(p.numel())
        for what, t, shape, dtype in ((name, codes, tuple(p.shape), torch.uint8),
                                      (scales_name(name), scales, (nblocks,), torch.float32)):
            if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype
                    or t.device.type != "cpu" or t.layout is not torch.strided
                    or _is_dtensor(t)):
                got = (f"{tuple(t.shape)} {t.dtype} on {t.device}"
                       if isinstance(t, torch.Tensor) else f"a {type(t).__name__}")
                raise ValueError(f"state {what!r} {where} does not fit 8-bit state of block "
                                 f"size {q.block_size}: {got} versus {shape} {dtype} on cpu")
        for what, t in ((name, codes), (scales_name(name), scales)):
            if not t.is_contiguous():
                st[what] = t.contiguous()

    def _checked_grads(self, gi, group, outs=None):
        """[(param, grad, half copy or None)] for the group's params with a gradient, every
        one checked; a DTensor's grad is its local shard, a non-contiguous gradient is
        replaced by a contiguous copy (the param is never copied)."""
        out = []
        halves = None
        if outs is not None:
            halves = outs[gi]
            if halves is None or len(halves) != len(group["params"]):
                raise ValueError(f"fp16_param_groups[{gi}] must be a list of "
                                 f"{len(group['params'])} tensors, one per param of group {gi}")
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided:
                raise RuntimeError(f"{self._name} does not support sparse gradients")
            # A float32 param may have a bfloat16/float16 gradient (torch's ``grad_dtype``):
            # the kernel widens it as it reads it. Other dtypes must match.
            widened = p.dtype == torch.float32 and g.dtype in _HALF
            if ((g.dtype != p.dtype and not widened) or g.shape != p.shape
                    or g.device != p.device):
                raise ValueError(
                    f"the gradient of parameter {k} of group {gi} does not match it: "
                    f"{tuple(g.shape)} {g.dtype} on {g.device} versus {tuple(p.shape)} "
                    f"{p.dtype} on {p.device} (a float32 param's gradient may also be "
                    "bfloat16 or float16)")
            _check_param(p, f"parameter {k} of group {gi}")  # p.data may have been replaced
            if _is_dtensor(p) != _is_dtensor(g):
                raise ValueError(f"parameter {k} of group {gi} and its gradient must both be "
                                 "DTensors or both plain tensors")
            g = _local(g)
            if _is_dtensor(p) and g.shape != _local(p).shape:
                raise ValueError(f"the gradient of parameter {k} of group {gi} is not sharded "
                                 "as the parameter is")
            if not g.is_contiguous():
                g = g.contiguous()
            h = None
            if halves is not None:
                h = halves[k]
                where = f"fp16_param_groups[{gi}][{k}]"
                if not isinstance(h, torch.Tensor) or h.dtype not in _HALF:
                    raise TypeError(f"{where} must be a torch.bfloat16 or torch.float16 tensor")
                if p.dtype != torch.float32:
                    raise ValueError(f"{where}: a half copy is written from float32 params, "
                                     f"and parameter {k} of group {gi} is {p.dtype}")
                if h.shape != p.shape or h.device.type != "cpu" or not h.is_contiguous():
                    raise ValueError(f"{where} must be a contiguous CPU tensor of the param's "
                                     f"shape {tuple(p.shape)}, got {tuple(h.shape)} on "
                                     f"{h.device}")
            out.append((p, g, h))
        return out



# ------------------------------------------------------------------------------------------
# Schedule-free AdamW and SGD: the schedulefree package's group entries, train()/eval() and
# step (k, lr_max, weight_sum, scheduled_lr and train_mode kept in each param group, as the
# package keeps them, so its state dicts load here and back)
# ------------------------------------------------------------------------------------------

_SCHEDULE_FREE_MESSAGE = ("Optimizer was not in train mode when step is called. Please insert "
                          ".train() and .eval() calls on the optimizer. See documentation for "
                          "details.")


def _check_group_scalars(group: dict[str, Any]) -> None:
    """A group's schedule-free entries, where it has them: k an int >= 0, lr_max, weight_sum
    and scheduled_lr real numbers, train_mode a bool."""
    k = group.get("k", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the group entry 'k' (steps taken) must be an int >= 0, got {k!r}")
    for name in ("lr_max", "weight_sum", "scheduled_lr"):
        v = _scalar(group.get(name, 0.0))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"the group entry {name!r} must be a real number, got {v!r}")
    if not isinstance(group.get("train_mode", False), bool):
        raise ValueError(f"the group entry 'train_mode' must be a bool, got "
                         f"{group['train_mode']!r}")


class _ScheduleFreeOptimizer(_Optimizer):
    """The schedulefree package's AdamWScheduleFree / SGDScheduleFree over lrfast's kernels.

    Group entries as the package's: the arguments, then ``k`` (steps taken), ``train_mode``
    (False until :meth:`train`: as in the package, call ``train()`` before the first step),
    ``weight_sum``, ``lr_max`` and ``scheduled_lr``; state ``z`` (a copy of the param at its
    first step) and, for AdamW, ``exp_avg_sq``. Differences: the gradients are not modified
    (the package divides them in place), a step in eval mode raises RuntimeError (the
    package's message, as a subclass of the Exception it raises), and ``foreach`` is stored
    but lrfast's kernel runs either way.
    """

    # (z is the iterate the params are interpolated from, not a moment: kept in full)
    _takes_int8 = False

    # The package's group entries in its order: the arguments with its scalar state.
    _ORDER = ("lr", "betas", "momentum", "eps", "r", "k", "warmup_steps", "train_mode",
              "weight_sum", "lr_max", "scheduled_lr", "weight_lr_power", "weight_decay",
              "foreach")

    def __init__(self, params, defaults, **extra):
        full = dict(defaults, k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0,
                    scheduled_lr=0.0)
        ordered = {name: full[name] for name in self._ORDER if name in full}
        ordered.update(full)
        _Optimizer.__init__(self, params, ordered, **extra)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        hyper = super()._hyper(group)
        _check_group_scalars(group)
        return hyper

    def _beta(self, group: dict[str, Any]) -> float:
        return float(_scalar(group["betas"][0] if "betas" in group else group["momentum"]))

    def _new_buffer(self, name: str, p: torch.Tensor, hyper: dict[str, Any]) -> torch.Tensor:
        if name == "z":  # starts as the param, as the package's torch.clone(p)
            return p.detach().clone(memory_format=torch.contiguous_format).to(
                self._state_dtype_for(p))
        return super()._new_buffer(name, p, hyper)

    @torch.no_grad()
    def _interpolate(self, group: dict[str, Any], weight: float) -> None:
        """Every param of ``group`` that has a z: p <- lerp(p, z, weight), one native pass per
        (param dtype, z dtype)."""
        buckets: dict[tuple, list] = {}
        copies = []
        for p in group["params"]:
            st = self.state.get(p)
            if not st or "z" not in st:
                continue
            local, z = _local(p), _local(st["z"])
            target = local if local.is_contiguous() else local.contiguous()
            if target is not local:
                copies.append((local, target))
            buckets.setdefault((target.dtype, z.dtype), []).append((target, z.contiguous()))
        nthreads = get_num_threads()
        step = (1 << 63) | int(group["k"])  # stochastic rounding: a step no update uses
        for (pdt, zdt), pairs in buckets.items():
            table, offsets = _layout.table(
                [[t.data_ptr() for t, _ in pairs], [z.data_ptr() for _, z in pairs]],
                [t.numel() * (2 if t.is_complex() else 1) for t, _ in pairs])
            _dispatch.kernels.schedule_free_interpolate(
                table, offsets, _STORAGE[pdt], _STORAGE[zdt], weight, nthreads, None,
                self._rounding, self._seed, step)
        for local, target in copies:
            local.copy_(target)

    def eval(self) -> None:
        """Params to x (lerp(y, z, 1 - 1/beta)) in every group in train mode."""
        for group in self.param_groups:
            if group["train_mode"]:
                self._interpolate(group, 1 - 1 / self._beta(group))
                group["train_mode"] = False

    def train(self) -> None:
        """Params to y (lerp(x, z, 1 - beta)) in every group in eval mode."""
        for group in self.param_groups:
            if not group["train_mode"]:
                self._interpolate(group, 1 - self._beta(group))
                group["train_mode"] = True

    @torch.no_grad()
    def step(self, closure=None):
        """One schedule-free step of every group (the first group must be in train mode, as
        the package checks); returns ``closure()``'s loss."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(_SCHEDULE_FREE_MESSAGE)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        news, kernel_steps, step_values, hypers = [], [], [], []
        for group in self.param_groups:
            hyper = self._hyper(group)
            hypers.append(hyper)
            k = group["k"]
            warmup = hyper["warmup_steps"]
            lr = hyper["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
            lr_max = max(lr, float(_scalar(group["lr_max"])))
            weight = ((k + 1) ** hyper["r"]) * (lr_max ** hyper["weight_lr_power"])
            weight_sum = float(_scalar(group["weight_sum"])) + weight
            ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
            news.append((lr, lr_max, weight_sum, k + 1))
            kernel_steps.append(k + 1)
            step_values.append((lr, (ckp1,)))
        self._step_groups(kernel_steps=kernel_steps, step_values=step_values, hypers=hypers)
        for group, (lr, lr_max, weight_sum, k) in zip(self.param_groups, news):
            group["scheduled_lr"] = lr
            group["lr_max"] = lr_max
            group["weight_sum"] = weight_sum
            group["k"] = k
        return loss


def _check_tensor_rules(defaults: dict[str, Any]) -> None:
    """torch's Adam and AdamW refuse tensor lr and betas with foreach=True (and without
    capturable), and betas that mix tensors and numbers."""
    no_tensors = defaults.get("foreach") and not defaults.get("capturable")
    if isinstance(defaults["lr"], torch.Tensor) and no_tensors:
        raise ValueError("lr as a Tensor is not supported for capturable=False and "
                         "foreach=True")
    betas = defaults["betas"]
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        tensors = [isinstance(b, torch.Tensor) for b in betas]
        if tensors[0] != tensors[1]:
            raise ValueError("betas must be either both floats or both Tensors")
        if tensors[0] and no_tensors:
            raise ValueError("betas[0] as a Tensor is not supported for capturable=False "
                             "and foreach=True")


def _make_class(spec: OptimizerSpec, extras: tuple = ()) -> type:
    """lrfast.torch's class for ``spec``: torch.optim's class of that name's signature (or,
    where torch has none, the spec's, with torch's implementation switches), torch's defaults
    and state names, lrfast's kernel. ``extras``: the classes it derives from before
    ``_Optimizer`` (see _EXTRAS), whose docstrings extend its own."""
    bases = tuple(extras)
    if not any(issubclass(b, _Optimizer) for b in bases):
        bases += (_Optimizer,)
    # the first base that is an _Optimizer takes the group defaults (mixins have no __init__)
    init_base = next(b for b in bases if issubclass(b, _Optimizer))
    t = spec.torch
    torch_cls = getattr(torch.optim, t.cls, None) if t is not None and t.cls else None
    if torch_cls is not None:
        sig = inspect.signature(torch_cls)
    else:
        flags = t.flags if t is not None and t.flags is not None else TORCH_FLAGS.items()
        sig = spec.signature(trailing=list(flags))
    fixed_entries = dict(t.group) if t is not None else {}
    torch_sig = sig
    sig = sig.replace(parameters=list(sig.parameters.values()) + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
        for name, value in _LRFAST_KEYWORDS.items()])

    def __init__(self, params, *args, **kwargs):
        extra = {name: kwargs.pop(name, value) for name, value in _LRFAST_KEYWORDS.items()}
        bound = torch_sig.bind(params, *args, **kwargs)
        bound.apply_defaults()
        defaults = {k: v for k, v in bound.arguments.items() if k != "params"}
        defaults.update(fixed_entries)
        init_base.__init__(self, params, defaults, **extra)

    buffers = ", ".join(f"``{b.name}``" for b in spec.update.scalar_state + spec.update.buffers)
    takes_int8 = not spec.update.per_tensor and all(getattr(b, "_takes_int8", True)
                                                    for b in bases)
    doc = (f"{spec.name} over torch tensors: "
           f"{'torch.optim.' + spec.name + chr(39) + 's' if torch_cls else 'the'} signature, "
           f"defaults and state dict format, run by lrfast's kernel.\n\n"
           f"The update is :class:`lrfast.{spec.name}`'s. State per param, as torch names it: "
           f"{'``step``, ' if t is None or t.step_state else ''}{buffers} "
           "(each where the hyper-parameters use it).\n\n"
           "lrfast-only keywords: ``state_dtype`` (None: the params' dtype, as torch's fused "
           "kernels; ``torch.float32`` for bfloat16/float16 params; ``torch.bfloat16`` or "
           "``torch.float16`` for float32 params"
           + ("; ``'int8'`` or an ``lrfast.quantization.Int8State(block_size, min_size)``: "
              "8-bit moments (uint8 codes and float32 block scales, state "
              "``<buffer>_absmax``) for float32/bfloat16/float16 params"
              if takes_int8 else "; 8-bit state is not available for this update")
           + "), ``rounding`` "
           "(``'nearest'`` or ``'stochastic'``), ``seed``, and ``ema`` (an ``(AveragedModel, "
           "model)`` pair each step also updates); see :mod:`lrfast.torch`.\n")
    for extra in extras:
        if extra.__doc__:
            doc += "\n" + inspect.cleandoc(extra.__doc__) + "\n"
    __init__.__signature__ = sig  # type: ignore[attr-defined]
    cls = type(spec.name, bases, {
        "__init__": __init__, "__doc__": doc, "__module__": __name__,
        "__qualname__": spec.name, "_spec": spec})
    cls.__signature__ = sig  # type: ignore[attr-defined]
    return cls



# ------------------------------------------------------------------------------------------
# Factored second moments: Adafactor
# ------------------------------------------------------------------------------------------

def _adafactor_shapes(shape) -> dict[str, tuple]:
    from .optim import _adafactor_state_shapes

    return _adafactor_state_shapes(tuple(shape))


class _Adafactor(_Optimizer):
    """lrfast.torch.Adafactor's base: torch's state (``step``; ``row_var`` (..., R, 1) and
    ``col_var`` (..., 1, C) for params of two or more dimensions, ``variance`` for the others)
    and a step of its own, since the update is not element-wise: per group, the params with a
    gradient, bucketed by (dtype, step count), each bucket one ``AdafactorPlan`` call (see
    :class:`lrfast.Adafactor`). As torch's, ``eps1=None`` is the machine epsilon of the
    group's first param with a gradient, complex params are refused at the step, and the state
    is made at a param's first step. float32 and float64 params only (bfloat16/float16 and
    DTensor params are refused when added: use torch.optim.Adafactor for them)."""

    _takes_int8 = False  # (factored statistics, not an element-wise update)

    def _state_dtype_for(self, p: torch.Tensor, where: str = "a parameter") -> torch.dtype:
        if self._state_dtype is not None and self._state_dtype != p.dtype:
            raise ValueError(f"state_dtype={self._state_dtype} is not available for {where} "
                             f"of dtype {p.dtype}: Adafactor keeps its state in the param's "
                             "dtype")
        return p.dtype

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for k, p in enumerate(group["params"]):
            bad = None
            if _is_dtensor(p):
                bad = "a DTensor (its row and column statistics span the whole tensor)"
            elif p.dtype in _HALF:
                bad = f"of dtype {p.dtype}"
            if bad is not None:
                self.param_groups.pop()
                raise TypeError(f"parameter {k} of group {len(self.param_groups)} is {bad}: "
                                "lrfast.torch.Adafactor updates float32 and float64 tensors "
                                "(use torch.optim.Adafactor)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then a check of every loaded buffer (torch's shapes for
        its param, the param's dtype, on the CPU); on a mismatch nothing is kept."""
        saved = ({p: dict(st) for p, st in self.state.items()},
                 [{k: v for k, v in g.items()} for g in self.param_groups])
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        try:
            for gi, group in enumerate(self.param_groups):
                self._hyper(group)
                for k, p in enumerate(group["params"]):
                    st = self.state.get(p)
                    if not st:
                        continue
                    shapes = _adafactor_shapes(p.shape)
                    names = set(st) - {"step"}
                    if names != set(shapes) or "step" not in st:
                        raise ValueError(f"the state of parameter {k} of group {gi} must hold "
                                         f"{sorted(['step', *shapes])}, got {sorted(st)}")
                    for name in names:
                        buf = st[name]
                        if (not isinstance(buf, torch.Tensor) or buf.shape != shapes[name]
                                or buf.dtype != p.dtype or buf.device != p.device
                                or buf.layout is not torch.strided):
                            got = (f"{tuple(buf.shape)} {buf.dtype} on {buf.device}"
                                   if isinstance(buf, torch.Tensor) else type(buf).__name__)
                            raise ValueError(f"state {name!r} of parameter {k} of group {gi} "
                                             f"must be {shapes[name]} {p.dtype} on "
                                             f"{p.device}, got {got}")
                        if not buf.is_contiguous():
                            st[name] = buf.contiguous()
        except Exception:
            self.state.clear()
            self.state.update(saved[0])
            for group, old in zip(self.param_groups, saved[1]):
                group.clear()
                group.update(old)
            raise
        self._plans.clear()

    def _run_groups(self, outs=None, kernel_steps=None, grad_sumsq=None, step_values=None,
                    hypers=None):
        # (its own plans: an ``ema=`` average is taken after the step, by _EmaLink.finish)
        nthreads = get_num_threads()
        work = []
        # Every group and gradient is checked before any state is made or memory written.
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group)
            grads = self._checked_grads(gi, group)
            for k, (p, g, _) in enumerate(grads):
                if p.is_complex():
                    raise RuntimeError("Adafactor does not support complex parameters")
                if g.dtype != p.dtype:
                    raise ValueError(f"the gradient of a parameter of group {gi} is {g.dtype}, "
                                     f"the parameter {p.dtype}: lrfast.torch.Adafactor takes "
                                     "gradients of the param's dtype")
            work.append((hyper, grads))
        self._calls += 1
        cache = self.__dict__.setdefault("_af_cache", {})
        for hyper, grads in work:
            if not grads:
                continue
            h = dict(hyper)
            if h["eps1"] is None:  # torch: the first param with a gradient sets it
                h["eps1"] = torch.finfo(grads[0][0].dtype).eps
            from .optim import _adafactor_kernel_values

            values = _adafactor_kernel_values(h)
            states = []
            for p, _, _ in grads:
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    for name, shape in _adafactor_shapes(p.shape).items():
                        st[name] = torch.zeros(shape, dtype=p.dtype)
                states.append(st)
            buckets: dict[tuple, list[int]] = {}
            for i, ((p, _, _), st) in enumerate(zip(grads, states)):
                buckets.setdefault((p.dtype, float(st["step"])), []).append(i)
            for (dtype, step), idx in buckets.items():
                params = [grads[i][0] for i in idx]
                targets = [p if p.is_contiguous() else p.contiguous() for p in params]
                key = (dtype, tuple(tuple(p.shape) for p in params))
                entry = cache.get(key)
                if entry is None:
                    if len(cache) >= 64:
                        cache.clear()
                    table = np.zeros((4, len(idx)), dtype=np.intp)
                    plan = _dispatch.kernels.AdafactorPlan(
                        [p.shape for p in params], dtype == torch.float64, table)
                    entry = cache[key] = (plan, table)
                plan, table = entry
                for j, (i, w) in enumerate(zip(idx, targets)):
                    st = states[i]
                    a = st.get("row_var", st.get("variance"))
                    c = st.get("col_var")
                    table[0, j] = w.data_ptr()
                    table[1, j] = grads[i][1].data_ptr()
                    table[2, j] = a.data_ptr()
                    table[3, j] = 0 if c is None else c.data_ptr()
                plan.set_hyper(values)
                plan.run(hyper["lr"], int(step) + 1, nthreads)
                for i, w, p in zip(idx, targets, params):
                    if w is not p:
                        p.copy_(w)
                    states[i]["step"].add_(1)


# ------------------------------------------------------------------------------------------
# Per-tensor trust ratios: LAMB, LARS (timm's Lamb and Lars)
# ------------------------------------------------------------------------------------------
# What the generated classes lack: real params only (the kernels would take a complex param's
# real view as two tensors' worth of elements, and timm's formulas are not written for complex
# values); Lamb's group entries ``step`` (a tensor, counted per group whether or not the group
# has gradients) and ``max_lr_snapshot`` (the constructor's lr, the peak lr of
# corrected_weight_decay), and its clipping by the global norm of every group's gradients with
# the optimizer's own max_grad_norm (``defaults``), as timm's Lamb does.


class _TrustRatio:
    """Real params only: a complex param is refused when its group is added (timm's formulas
    are written for real values)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]  # type: ignore[attr-defined]
        for k, p in enumerate(group["params"]):
            if p.is_complex():
                self.param_groups.pop()  # type: ignore[attr-defined]
                raise TypeError(
                    f"lrfast.torch.{self._spec.name} does not take complex params "  # type: ignore[attr-defined]
                    f"(parameter {k} of group {len(self.param_groups)} is {p.dtype})")  # type: ignore[attr-defined]


def _max_lr_snapshot(lr: Any, corrected: bool) -> float:
    """timm's max_lr_snapshot: the lr as a float, which corrected_weight_decay needs > 0."""
    max_lr = float(lr.detach()) if isinstance(lr, torch.Tensor) else float(lr)
    if corrected and max_lr <= 0:
        raise ValueError(f"Corrected weight decay requires a positive max lr, got {max_lr}. "
                         "Construct the optimizer with the peak lr.")
    return max_lr


class _LambSteps(_TrustRatio):
    """As timm's Lamb: each group counts its steps in a ``step`` entry (a tensor, advanced
    whether or not the group has gradients) and keeps the constructor's lr as
    ``max_lr_snapshot`` (corrected weight decay's peak lr); clipping uses the global norm of
    every group's gradients and the optimizer's own ``max_grad_norm``. Real params only: a
    complex param is refused when its group is added."""

    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        super()._check_defaults(defaults)  # type: ignore[misc]
        snapshot = _max_lr_snapshot(defaults["lr"], bool(defaults["corrected_weight_decay"]))
        # (in timm's order: after the hyper-parameters, before foreach)
        foreach = defaults.pop("foreach", None)
        defaults["max_lr_snapshot"] = snapshot
        defaults["foreach"] = foreach

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.defaults.setdefault(  # type: ignore[attr-defined]
            "max_lr_snapshot", _max_lr_snapshot(self.defaults["lr"], False))  # type: ignore[attr-defined]
        for group in self.param_groups:  # type: ignore[attr-defined]
            for name in ("caution", "decoupled_decay", "corrected_weight_decay"):
                group.setdefault(name, False)
            group.setdefault("max_lr_snapshot", self.defaults["max_lr_snapshot"])  # type: ignore[attr-defined]
            group.setdefault("foreach", None)
            if "step" in group and not torch.is_tensor(group["step"]):
                group["step"] = torch.tensor(float(group["step"]), dtype=_scalar_dtype())

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        h = super()._hyper(group)  # type: ignore[misc]
        defaults = getattr(self, "defaults", None)
        if defaults is not None and "max_grad_norm" in defaults:
            # timm clips with the optimizer's max_grad_norm, whatever a group says
            h["max_grad_norm"] = self._spec.update.hyper(  # type: ignore[attr-defined]
                "max_grad_norm").check(defaults["max_grad_norm"])
        if h["decoupled_decay"] and h["corrected_weight_decay"]:
            h["max_lr"] = _max_lr_snapshot(group.get("max_lr_snapshot", group["lr"]), True)
        return h

    def _global_sumsq(self) -> float:
        """The square of timm's global grad norm (0 when it does not clip)."""
        if self.defaults["max_grad_norm"] is None:  # type: ignore[attr-defined]
            return 0.0
        grads = [p.grad for g in self.param_groups  # type: ignore[attr-defined]
                 for p in g["params"] if p.grad is not None]
        if not grads or any(g.layout is not torch.strided for g in grads):
            return 0.0  # (a sparse gradient: refused by the step's checks)
        norms = list(torch._foreach_norm(grads))
        if len({n.dtype for n in norms}) > 1:
            norms = [n.double() for n in norms]
        return float(torch.linalg.vector_norm(torch.stack(norms))) ** 2

    @torch.no_grad()
    def step(self, closure=None):
        """Run one update of every param that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups  # type: ignore[attr-defined]
        for group in groups:
            if "step" not in group:
                group["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        steps = [int(group["step"].item()) + 1 for group in groups]
        self._step_groups(kernel_steps=steps,  # type: ignore[attr-defined]
                          grad_sumsq=self._global_sumsq())
        for group in groups:
            group["step"].add_(1)
        return loss


# ------------------------------------------------------------------------------------------
# Updates from outside torch.optim: Lion, ADOPT. Their reference classes keep some values
# outside the group entries the generated classes hold; these mixins put them where those
# classes do, so state dicts carry the same entries both ways.
# ------------------------------------------------------------------------------------------

class _LionOptions:
    """lion-pytorch keeps ``decoupled_weight_decay`` and the constructor's lr (which decoupled
    decay is divided by) on the optimizer, not in its groups, and so does this class: its
    groups hold lr, betas and weight_decay, as lion-pytorch's. ``use_triton=True`` (its CUDA
    kernel) is refused, and so are complex params (lion-pytorch's sign of one is z/|z|)."""

    decoupled_wd: bool
    _init_lr: Any

    def _group_defaults(self, defaults: dict[str, Any]) -> dict[str, Any]:
        defaults = dict(defaults)
        if defaults.pop("use_triton"):
            raise ValueError("lrfast.torch.Lion does not support use_triton=True: that is "
                             "lion-pytorch's Triton kernel for CUDA tensors, and lrfast runs its "
                             "own CPU kernel (use lion_pytorch.Lion for it)")
        self.decoupled_wd = defaults.pop("decoupled_weight_decay")
        self._init_lr = defaults["lr"]
        return defaults

    def _group_values(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"decoupled_weight_decay": self.decoupled_wd, "init_lr": self._init_lr}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        groups = self.param_groups  # type: ignore[attr-defined]
        for k, p in enumerate(groups[-1]["params"]):
            if p.is_complex():
                groups.pop()
                raise ValueError(
                    f"parameter {k} of group {len(groups)} is complex: lion-pytorch takes the "
                    "sign of a complex number as z/|z|, which is not an update of its real and "
                    "imaginary parts apart, so lrfast.torch.Lion does not update complex params "
                    "(use lion_pytorch.Lion)")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state.update(decoupled_wd=self.decoupled_wd, _init_lr=self._init_lr)
        return state


class _AdoptOptions:
    """timm's Adopt keeps the constructor's lr in every group as ``max_lr_snapshot`` (the peak
    lr of corrected weight decay)."""

    defaults: dict[str, Any]

    def _group_defaults(self, defaults: dict[str, Any]) -> dict[str, Any]:
        lr = _scalar(defaults["lr"])
        real = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        return dict(defaults, max_lr_snapshot=float(lr) if real else lr)

    def _group_values(self, group: dict[str, Any]) -> dict[str, Any]:
        # (an older state dict's groups may lack it: timm then takes the defaults')
        if "max_lr_snapshot" in group:
            return {"max_lr": group["max_lr_snapshot"]}
        return {"max_lr": getattr(self, "defaults", {}).get("max_lr_snapshot")}


# ------------------------------------------------------------------------------------------
# Sparse COO gradients (nn.Embedding(sparse=True)): SGD and Adagrad, and SparseAdam
# ------------------------------------------------------------------------------------------

def _sparse_rows(p: torch.Tensor, g: torch.Tensor, where: str, name: str):
    """A sparse COO gradient of ``p`` as the row-wise update reads it: (table, indices,
    values, target), ``table`` a (rows, dim) NumPy view of ``target`` (``p`` itself, or its
    contiguous copy to be written back), ``indices`` the flat row of each stored value
    (duplicates kept: lrfast sums them), ``values`` (nnz, dim). Every check is made here,
    before anything is written: an index out of range raises IndexError."""
    if g.layout is not torch.sparse_coo:
        raise RuntimeError(f"{name} takes sparse COO gradients only, the gradient of {where} is "
                           f"{g.layout}")
    if _is_dtensor(p) or p.device.type != "cpu":
        raise RuntimeError(f"{name}: a sparse gradient is taken for a plain CPU tensor only, "
                           f"{where} is not one")
    if p.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{name}: a sparse gradient is taken for float32 and float64 "
                           f"params only, {where} is {p.dtype}")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(f"the sparse gradient of {where} does not match it: {tuple(g.shape)} "
                         f"{g.dtype} on {g.device} versus {tuple(p.shape)} {p.dtype} on "
                         f"{p.device}")
    sd = g.sparse_dim()
    idx = g._indices()
    for d in range(sd):
        if idx.shape[1]:
            low, high = int(idx[d].min()), int(idx[d].max())
            if low < 0 or high >= p.shape[d]:
                bad = low if low < 0 else high
                raise IndexError(f"the sparse gradient of {where} has index {bad} in dimension "
                                 f"{d}, out of range for size {p.shape[d]}")
    rows = 1
    for n in p.shape[:sd]:
        rows *= n
    flat = idx[0] if sd == 1 else torch.zeros(idx.shape[1], dtype=torch.int64)
    if sd != 1:
        for d in range(sd):  # row-major position of each stored value's leading coordinates
            flat = flat * p.shape[d] + idx[d]
    dim = p.numel() // rows if rows else 0
    target = p.detach()
    copy = not target.is_contiguous()
    if copy:
        target = target.contiguous()
    table = target.numpy().reshape(rows, dim)
    values = g._values().detach().contiguous().numpy().reshape(idx.shape[1], dim)
    return table, flat.numpy(), values, (target if copy else None)


class _SparseGrads(_Optimizer):
    """Sparse gradients. A param whose ``.grad`` is a sparse COO tensor (``nn.Embedding(
    sparse=True)``, ``nn.EmbeddingBag(sparse=True)``) is updated on the rows its gradient
    touches, by lrfast's row-wise kernels (:mod:`lrfast.embedding`; duplicate indices summed,
    uncoalesced gradients taken as they are), as torch.optim updates it; the dense params of
    the same group take the dense kernel as before. Refused as torch refuses them:
    ``weight_decay`` with a sparse gradient and ``fused=True``. Beyond torch: float32/float64
    CPU params only, and an index out of range raises IndexError (torch does not check);
    every refusal changes nothing."""

    # torch's messages for its refusals (per class)
    _FUSED_SPARSE = "fused=True does not support sparse gradients"
    _DECAY_SPARSE = "weight_decay is not compatible with sparse gradients"

    def _sparse_update(self, p, table, idx, values, hyper) -> None:
        """The row-wise update of ``p`` (``table`` its memory) from a checked sparse gradient."""
        raise NotImplementedError

    def _sparse_plan(self):
        """[(param, table, indices, values, target, group, hyper)] for every sparse gradient,
        all checked first; raises before anything is written."""
        out = []
        for gi, group in enumerate(self.param_groups):
            hyper = None
            for k, p in enumerate(group["params"]):
                g = p.grad
                if g is None or g.layout is torch.strided:
                    continue
                if hyper is None:
                    hyper = self._hyper(group)
                if group.get("fused"):
                    raise RuntimeError(self._FUSED_SPARSE)
                if hyper["weight_decay"] != 0:
                    raise RuntimeError(self._DECAY_SPARSE)
                where = f"parameter {k} of group {gi}"
                table, idx, values, target = _sparse_rows(p, g, where, self._name)
                self._check_sparse_state(p, hyper, where)
                out.append((p, table, idx, values, target, group, hyper))
        return out

    def _check_sparse_state(self, p, hyper, where):
        pass

    def _run_groups(self, outs=None, kernel_steps=None, grad_sumsq=None, step_values=None,
                    hypers=None):
        sparse = self._sparse_plan() if outs is None else []
        if not sparse:
            return super()._run_groups(outs, kernel_steps, grad_sumsq, step_values, hypers)
        # The dense step first, the sparse grads hidden from it (or densified, see
        # _dense_stand_in); it checks everything before it writes, and the sparse updates,
        # checked above, cannot fail after it.
        hidden = [(p, p.grad) for p, *_ in sparse]
        try:
            for p, *_rest, hyper in sparse:
                p.grad = self._dense_stand_in(p, hyper)
            super()._run_groups(outs, kernel_steps, grad_sumsq, step_values, hypers)
        finally:
            for p, g in hidden:
                p.grad = g
        for p, table, idx, values, target, group, hyper in sparse:
            if self._dense_stand_in(p, hyper) is not None:
                continue  # (updated by the dense step)
            self._sparse_update(p, table, idx, values, hyper)
            if target is not None:  # (a non-contiguous param, updated through a copy)
                p.detach().copy_(target)
        return None

    def _dense_stand_in(self, p, hyper):
        return None


class _SparseSGD(_SparseGrads):
    """SGD with ``momentum``: torch keeps a sparse momentum buffer whose values are those of
    dense momentum on the densified gradient (it fills in as rows are touched); lrfast.torch
    densifies the (coalesced) gradient and takes the dense update, keeping a dense
    ``momentum_buffer`` (a state dict of torch's, with a sparse buffer, loads densified)."""

    _FUSED_SPARSE = "`_fused_sgd` does not support sparse gradients"
    # torch's message: its SGD adds the param to the sparse gradient, which torch refuses
    _DECAY_SPARSE = "add(sparse, dense) is not supported. Use add(dense, sparse) instead."

    def _dense_stand_in(self, p, hyper):
        if hyper["momentum"] == 0:
            return None
        g = p.grad
        return g.coalesce().to_dense() if g is not None and g.layout is not torch.strided else g

    def _sparse_update(self, p, table, idx, values, hyper):
        from .embedding import sparse_sgd_
        sparse_sgd_(table, idx, values, lr=hyper["lr"], maximize=hyper["maximize"])

    @property
    def _sparse_momentum(self) -> dict[int, int]:
        """{position of the param in the state dict: sparse dims of its gradient} for the
        momentum buffers sparse gradients built: ``state_dict`` gives them to torch sparse,
        as torch keeps them (its nesterov step cannot add a dense buffer to a sparse
        gradient)."""
        return self.__dict__.setdefault("_sparse_marks", {})

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_sparse_marks"] = dict(self._sparse_momentum)
        return state

    def _run_groups(self, outs=None, kernel_steps=None, grad_sumsq=None, step_values=None,
                    hypers=None):
        super()._run_groups(outs, kernel_steps, grad_sumsq, step_values, hypers)
        pos = 0
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and g.layout is torch.sparse_coo and group["momentum"] != 0:
                    self._sparse_momentum[pos] = g.sparse_dim()
                pos += 1

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        marks = self._sparse_momentum
        for pos, st in list(sd["state"].items()):
            buf = st.get("momentum_buffer")
            if pos in marks and isinstance(buf, torch.Tensor) and buf.layout is torch.strided:
                st = dict(st)
                st["momentum_buffer"] = buf.to_sparse(sparse_dim=marks[pos])
                sd["state"][pos] = st
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        marks = {}
        if isinstance(state, dict):
            for key, st in state.items():
                buf = st.get("momentum_buffer") if isinstance(st, dict) else None
                if isinstance(buf, torch.Tensor) and buf.layout is torch.sparse_coo:
                    marks[key] = buf.sparse_dim()
        if isinstance(state, dict) and any(
                isinstance(v, torch.Tensor) and v.layout is torch.sparse_coo
                for st in state.values() if isinstance(st, dict) for v in st.values()):
            state_dict = dict(state_dict)
            state_dict["state"] = {
                key: ({n: (v.to_dense() if isinstance(v, torch.Tensor)
                           and v.layout is torch.sparse_coo else v) for n, v in st.items()}
                      if isinstance(st, dict) else st)
                for key, st in state.items()}
        super().load_state_dict(state_dict)
        self.__dict__["_sparse_marks"] = marks


class _SparseAdagrad(_SparseGrads):
    """Adagrad: ``state['sum']`` and ``state['step']`` kept as torch keeps them (the step
    counted for every sparse gradient, an empty one too; ``lr_decay`` read from it)."""

    _FUSED_SPARSE = "`fused` does not support sparse grad or complex param"
    _DECAY_SPARSE = "weight_decay option is not compatible with sparse gradients"

    def _check_sparse_state(self, p, hyper, where):
        if self._state_dtype_for(p, where) != p.dtype or self._quantized(p, "sum"):
            raise RuntimeError(f"{self._name}: a sparse gradient needs state in the param's "
                               f"dtype; {where} keeps it otherwise (state_dtype="
                               f"{self._state_dtype!r})")
        st = self.state.get(p)
        buf = st.get("sum") if st else None
        if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape
                                or buf.dtype != p.dtype or buf.layout is not torch.strided
                                or buf.device != p.device or _is_dtensor(buf)):
            raise ValueError(f"state 'sum' of {where} does not fit its parameter")

    def _sparse_update(self, p, table, idx, values, hyper):
        from .embedding import sparse_adagrad_
        st, _ = self._state_for(p, hyper)
        if not st["sum"].is_contiguous():
            st["sum"] = st["sum"].contiguous()
        st["step"].add_(1)
        sparse_adagrad_(table, idx, values, st["sum"].numpy().reshape(table.shape),
                        step=max(1, int(round(st["step"].item()))), lr=hyper["lr"],
                        lr_decay=hyper["lr_decay"], eps=hyper["eps"],
                        maximize=hyper["maximize"])



class SparseAdam(torch.optim.Optimizer):
    """torch.optim.SparseAdam over torch tensors, run by lrfast's row-wise kernel
    (:func:`lrfast.embedding.sparse_adam_`): torch's signature, checks and messages, state
    ``step`` (an int), ``exp_avg`` and ``exp_avg_sq`` per param, as torch keeps them (state
    dicts load either way). Only the rows a gradient touches are updated (lazy Adam); the
    stored values of an uncoalesced gradient are summed per row first, as torch coalesces.
    An empty gradient counts a step and changes nothing else, as in torch. Beyond torch:
    float32/float64 CPU params only, an index out of range raises IndexError, and every
    gradient of every group is checked before anything is written (torch counts the steps of
    the params before a dense gradient it then refuses)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        super().__init__(params, defaults)
        sparse, complex_ = [], []
        for gi, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse.append([gi, k])
                if p.is_complex():
                    complex_.append([gi, k])
        if sparse:
            raise ValueError(f"Sparse params at indices {sparse}: SparseAdam requires dense "
                             "parameter tensors")
        if complex_:
            raise ValueError(f"Complex params at indices {complex_}: SparseAdam does not "
                             "support complex parameters")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param that has a gradient; returns ``closure()``'s loss."""
        from .embedding import sparse_adam_
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = (float(_scalar(b)) for b in group["betas"])
            h = {"lr": float(_scalar(group["lr"])), "beta1": beta1, "beta2": beta2,
                 "eps": float(_scalar(group["eps"])), "maximize": bool(group.get("maximize"))}
            for k, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please "
                                       "consider Adam instead")
                where = f"parameter {k} of group {gi}"
                rows = _sparse_rows(p, p.grad, where, "SparseAdam")
                st = self.state.get(p)
                for name in ("exp_avg", "exp_avg_sq"):
                    buf = st.get(name) if st else None
                    if st and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape
                               or buf.dtype != p.dtype or buf.layout is not torch.strided
                               or buf.device != p.device):
                        raise ValueError(f"state {name!r} of {where} does not fit its "
                                         "parameter")
                if st and (isinstance(st.get("step"), bool)
                           or not isinstance(st.get("step"), numbers.Integral)
                           or st["step"] < 0):
                    raise ValueError(f"state 'step' of {where} must be an int >= 0, got "
                                     f"{st.get('step')!r}")
                work.append((p, rows, h))
        for p, (table, idx, values, target), h in work:
            st = self.state[p]
            if len(st) == 0:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            for name in ("exp_avg", "exp_avg_sq"):
                if not st[name].is_contiguous():
                    st[name] = st[name].contiguous()
            st["step"] += 1
            if idx.shape[0] == 0:
                continue  # (an empty gradient: torch counts the step, changes nothing else)
            sparse_adam_(table, idx, values, st["exp_avg"].numpy().reshape(table.shape),
                         st["exp_avg_sq"].numpy().reshape(table.shape), step=st["step"], **h)
            if target is not None:
                p.detach().copy_(target)
        return loss


# ------------------------------------------------------------------------------------------
# The classes
# ------------------------------------------------------------------------------------------

# What an optimizer's class needs beyond _Optimizer, by name: a base with a step of its own
# (Adafactor, schedule-free) or mixins that keep a reference class's group entries and checks
# (LAMB, LARS, Lion, ADOPT). Every other optimizer of the spec table is _Optimizer alone.
_EXTRAS: dict[str, tuple[type, ...]] = {
    "SGD": (_SparseSGD,),
    "Adagrad": (_SparseAdagrad,),
    "Adafactor": (_Adafactor,),
    "AdamWScheduleFree": (_ScheduleFreeOptimizer,),
    "SGDScheduleFree": (_ScheduleFreeOptimizer,),
    "Lamb": (_LambSteps,),
    "Lars": (_TrustRatio,),
    "Lion": (_LionOptions,),
    "Adopt": (_AdoptOptions,),
}
globals().update({name: _make_class(spec, _EXTRAS.get(name, ()))
                  for name, spec in OPTIMIZERS.items()})
# Adafactor's buffers depend on each param's shape, not on the hyper-parameters: say so.
globals()["Adafactor"].__doc__ = (
    "Adafactor over torch tensors: torch.optim.Adafactor's signature, defaults and state dict "
    "format, run by lrfast's kernel.\n\nThe update is :class:`lrfast.Adafactor`'s. State per "
    "param, as torch names it: ``step``; ``row_var`` (..., R, 1) and ``col_var`` (..., 1, C) "
    "for params of two or more dimensions, ``variance`` for the others.\n\n"
    + inspect.cleandoc(_Adafactor.__doc__ or ""))

if TYPE_CHECKING:  # what the line above defines, for type checkers (signatures are torch's)
    SGD: Any
    Adagrad: Any
    RMSprop: Any
    Adam: Any
    AdamW: Any
    Adamax: Any
    RAdam: Any
    Adadelta: Any
    Rprop: Any
    NAdam: Any
    ASGD: Any
    Lion: Any
    Adopt: Any
    Lamb: Any
    Lars: Any
    Adafactor: Any
    AdamWScheduleFree: Any
    SGDScheduleFree: Any




class CPUAdam(_Optimizer):
    """A drop-in for DeepSpeed's ``deepspeed.ops.adam.DeepSpeedCPUAdam``, run by lrfast's Adam
    kernel: its constructor, defaults, group entries and state names (``step``, ``exp_avg``,
    ``exp_avg_sq``).

    ``adamw_mode=True`` decays the weights decoupled (AdamW), False adds ``weight_decay * p``
    to the gradient (Adam). ``fp32_optimizer_states=True`` keeps bfloat16/float16 params'
    state in float32, False in the params' dtype. ``bias_correction=False`` runs the update
    without bias corrections (the kernel is told a step so large that ``1 - beta**step`` is
    exactly 1). ``amsgrad=True`` is refused, as DeepSpeed refuses it. Unlike DeepSpeed,
    ``state['step']`` is a tensor (torch's convention; DeepSpeed's int loads), a gradient of
    another dtype than its param is refused unless the param is float32 and the gradient
    bfloat16/float16 (widened as read), and a non-contiguous param is updated.

    ``step(closure=None, fp16_param_groups=None)``: ``fp16_param_groups``, as older DeepSpeed
    versions took it, is one list per param group of bfloat16/float16 tensors (one per param
    of the group, by position); each receives the updated float32 param rounded to its type,
    written by the same kernel pass that updates the param (a ZeRO-Offload step: float32
    master weights on the CPU, half copies for the device).

    ``ema=(averaged_model, model)`` (keyword-only, lrfast's): a weight average each step
    updates, as every lrfast.torch class takes it (see :mod:`lrfast.torch`).
    """

    _spec = OPTIMIZERS["Adam"]

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=0, amsgrad=False, adamw_mode=True,
                 fp32_optimizer_states=True, *, ema=None):
        if amsgrad:
            raise RuntimeError("DeepSpeedCPUAdam does not support the AMSGrad variant.")
        self._adamw_mode = bool(adamw_mode)
        self.adam_w_mode = self._adamw_mode  # DeepSpeed's attribute name
        self.fp32_optimizer_states = bool(fp32_optimizer_states)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, amsgrad=amsgrad)
        _Optimizer.__init__(self, model_params, defaults,
                            state_dtype=torch.float32 if fp32_optimizer_states else None,
                            ema=ema)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_adamw_mode=self._adamw_mode, adam_w_mode=self._adamw_mode,
                     fp32_optimizer_states=self.fp32_optimizer_states)
        return state

    def _state_dtype_for(self, p: torch.Tensor, where: str = "a parameter") -> torch.dtype:
        # float32 state for half params only (DeepSpeed's fp32_optimizer_states)
        return torch.float32 if self._state_dtype is not None and p.dtype in _HALF else p.dtype

    def _check_flags(self, group: dict[str, Any]) -> None:
        if group.get("amsgrad"):
            raise RuntimeError("DeepSpeedCPUAdam does not support the AMSGrad variant.")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        self._check_flags(group)
        raw = self._spec.expand({n: group[n] for n in ("lr", "betas", "eps", "weight_decay")})
        raw = {name: _scalar(value) for name, value in raw.items()}
        raw["decoupled"] = self._adamw_mode
        return self._spec.update.validate(raw)

    @torch.no_grad()
    def step(self, closure=None, fp16_param_groups=None):
        """Update every param that has a gradient; write the half copies when
        ``fp16_param_groups`` is given (see the class). Returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        outs = None
        if fp16_param_groups is not None:
            outs = list(fp16_param_groups)
            if len(outs) != len(self.param_groups):
                raise ValueError(f"fp16_param_groups has {len(outs)} lists for "
                                 f"{len(self.param_groups)} param groups")
            outs = [list(o) if isinstance(o, (list, tuple)) else [o] for o in outs]
        # Without bias correction 1 - beta**step must be 1: a step past which beta**step is 0
        # in double for every beta < 1 (beta**(2**62) underflows), the same in every step.
        ksteps: list[int | None] | None = [
            None if g.get("bias_correction", True) else 2**62 for g in self.param_groups]
        if all(k is None for k in ksteps or ()):
            ksteps = None
        self._step_groups(outs, ksteps)
        return loss


# ------------------------------------------------------------------------------------------
# Weight averages: multi_avg_fns for torch.optim.swa_utils.AveragedModel, and ``ema=``
# ------------------------------------------------------------------------------------------

# The averages run natively: real floating tensors of these dtypes (complex ones go to torch).
_AVG_STORAGE = {torch.float32: "float32", torch.float64: "float64",
                torch.bfloat16: "bfloat16", torch.float16: "float16"}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SHAPE = attrgetter("shape")
_IS_CPU = attrgetter("is_cpu")


def _tensors_key(ts: list) -> tuple:
    """What decides how these tensors are averaged: their types, memory, dtypes, shapes and
    contiguity, and whether they are on the CPU. (It runs at every call: each is one C-level
    map over the tensors, about 1 us per tensor for all six.)"""
    return (tuple(map(type, ts)), tuple(map(_DATA_PTR, ts)), tuple(map(_DTYPE, ts)),
            tuple(map(_SHAPE, ts)), tuple(map(_IS_CONTIGUOUS, ts)), tuple(map(_IS_CPU, ts)))


def _native_pair(a: Any, p: Any) -> bool:
    """Can the native kernel average ``a`` toward ``p`` in place, as torch's lerp would?"""
    return (type(a) in _PLAIN_TENSORS and type(p) in _PLAIN_TENSORS
            and a.is_cpu and p.is_cpu and a.layout is torch.strided
            and p.layout is torch.strided and a.dtype is p.dtype and a.dtype in _AVG_STORAGE
            and a.shape == p.shape and a.is_contiguous() and p.is_contiguous()
            and (a.numel() == 0 or (a.data_ptr() != 0 and p.data_ptr() != 0)))


def _overlapping(spans: list[tuple[int, int, bool]]) -> bool:
    """Do some of these byte ranges ``(start, end, written)`` overlap where one of them is
    written? (Sorted by start, overlapping ranges form connected runs; in a run of two or
    more, each range overlaps another, so a written one in it is a conflict.)"""
    run_end, run_size, run_written = -1, 0, False
    for start, end, written in sorted(spans):
        if start < run_end:
            run_end, run_size = max(run_end, end), run_size + 1
            run_written = run_written or written
        else:
            if run_size > 1 and run_written:
                return True
            run_end, run_size, run_written = end, 1, written
    return run_size > 1 and run_written


def _span(t: Any) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class _MultiAvgFn:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: see
    :func:`ema_multi_avg_fn` and :func:`swa_multi_avg_fn`."""

    _CACHE_SIZE = 16

    def __init__(self, kind: str, decay: float | None = None):
        self.kind = kind
        self.decay = decay
        # {the tensors' keys: ([(storage, table, offsets)], [indices torch averages])}, or the
        # value None: torch averages them all (memory an average shares with another tensor)
        self._layouts: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        if self.kind == "ema":
            return f"lrfast.torch.ema_multi_avg_fn({self.decay!r})"
        return "lrfast.torch.swa_multi_avg_fn()"

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "decay": self.decay}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["kind"], state["decay"])  # type: ignore[misc]

    def weight(self, num_averaged: Any) -> float:
        """The lerp weight of an update after ``num_averaged`` samples, as torch's function
        computes it: ``1 - decay``, or ``1 / (num_averaged + 1)``, which for a tensor
        ``num_averaged`` (AveragedModel's ``n_averaged``, an int64 tensor) is a tensor of
        torch's default dtype (float32 unless changed): a float64 average then moves by that
        float32 weight, in torch's function and here alike."""
        if self.kind == "ema":
            return 1 - self.decay  # type: ignore[operator]
        return float(1 / (num_averaged + 1))

    def _torch_fn(self):
        from torch.optim import swa_utils

        if self.kind == "ema":
            return swa_utils.get_ema_multi_avg_fn(self.decay)
        return swa_utils.get_swa_multi_avg_fn()

    def _tables(self, averages: list, currents: list) -> Any:
        """The native tables for these tensors (cached on their keys), or None."""
        try:
            key = (_tensors_key(averages), _tensors_key(currents))
        except Exception:  # not tensors, or tensors without memory of their own (fake ones)
            return None
        if key in self._layouts:
            return self._layouts[key]
        native, rest = [], []
        for i, (a, p) in enumerate(zip(averages, currents)):
            if not _native_pair(a, p):
                rest.append(i)
            elif a.numel():
                native.append(i)
        spans = ([(*_span(averages[i]), True) for i in native]
                 + [(*_span(currents[i]), False) for i in native])
        layout: Any = None
        if not _overlapping(spans):
            tables = []
            for dtype, storage in _AVG_STORAGE.items():
                idx = [i for i in native if averages[i].dtype is dtype]
                if idx:
                    table, offsets = _layout.table(
                        [[averages[i].data_ptr() for i in idx],
                         [currents[i].data_ptr() for i in idx]],
                        [averages[i].numel() for i in idx])
                    tables.append((storage, table, offsets))
            layout = (tables, rest)
        if len(self._layouts) >= self._CACHE_SIZE:
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    def _by_torch(self, averages: list, currents: list, num_averaged: Any) -> None:
        """torch's own function over these tensors, called once per (device, dtype) of the
        averages, as AveragedModel groups them (its integer path, for instance, is chosen by
        the first tensor it is given)."""
        fn = self._torch_fn()
        groups: dict[tuple, tuple[list, list]] = {}
        for a, p in zip(averages, currents):
            av, cur = groups.setdefault((getattr(a, "device", None), getattr(a, "dtype", None)),
                                        ([], []))
            av.append(a)
            cur.append(p)
        for av, cur in groups.values():
            fn(av, cur, num_averaged)

    @torch.no_grad()
    def __call__(self, averaged_param_list, current_param_list, num_averaged) -> None:
        """Move each averaged tensor toward its current one, in place; see the factories."""
        averages, currents = list(averaged_param_list), list(current_param_list)
        if len(averages) != len(currents):
            raise ValueError(f"{self!r} got {len(averages)} averaged tensors and "
                             f"{len(currents)} current ones: they go in pairs")
        if not averages:
            return
        layout = self._tables(averages, currents)
        if layout is None:
            self._by_torch(averages, currents, num_averaged)
            return
        tables, rest = layout
        weight = self.weight(num_averaged) if tables else 0.0  # (before anything is written)
        if rest:  # torch's own, first: where it raises (an integer SWA), nothing was written
            self._by_torch([averages[i] for i in rest], [currents[i] for i in rest],
                           num_averaged)
        nthreads = get_num_threads()
        for storage, table, offsets in tables:
            _dispatch.kernels.average_update(table, offsets, storage, "lerp", weight, nthreads)


def ema_multi_avg_fn(decay: float = 0.999) -> _MultiAvgFn:
    """An exponential moving average for ``torch.optim.swa_utils.AveragedModel(model,
    multi_avg_fn=...)``, in place of torch's ``get_ema_multi_avg_fn(decay)``:
    ``average <- lerp(average, param, 1 - decay)`` (AveragedModel copies the params at its
    first update).

    The returned function has torch's signature ``fn(averaged_param_list,
    current_param_list, num_averaged)``. Contiguous CPU tensors of float32, float64, bfloat16
    and float16 are updated by lrfast's kernel, one call per dtype for all of them, in parallel
    (the address tables are kept between calls for the same tensors); every other tensor
    (integer buffers, complex, non-contiguous or non-CPU tensors, DTensors, an average sharing
    memory with another tensor) by torch's own function, whose result it then is.

    The kernel computes torch.lerp's two forms (``a + w (p - a)`` for ``w < 0.5``, else
    ``p - (p - a)(1 - w)``, ``w`` rounded to the tensor's precision; half precision in float32)
    without fused multiply-adds. torch's CPU kernels fuse them where the CPU has FMA (its AVX2
    and AVX-512 builds), so there the two differ by rounding, up to an ulp per update; they are
    bitwise equal where the product is exact (``1 - decay`` a power of two) and wherever torch
    runs unfused (``ATEN_CPU_CAPABILITY=default``).

    A model trained with an lrfast.torch optimizer can fuse this average into the optimizer's
    step: ``ema=(averaged_model, model)``.

    >>> import torch
    >>> import lrfast.torch
    >>> w = torch.nn.Linear(1, 1, bias=False)
    >>> _ = w.weight.data.fill_(2.0)
    >>> avg = torch.optim.swa_utils.AveragedModel(
    ...     w, multi_avg_fn=lrfast.torch.ema_multi_avg_fn(0.75))
    >>> avg.update_parameters(w)          # the first update copies
    >>> _ = w.weight.data.fill_(6.0)
    >>> avg.update_parameters(w)          # 2 + (6 - 2) / 4
    >>> avg.module.weight.item()
    3.0
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay <= 1:
        raise ValueError(f"decay must be a real number in [0, 1], got {decay!r}")
    return _MultiAvgFn("ema", decay)


def swa_multi_avg_fn() -> _MultiAvgFn:
    """The uniform running mean of SWA for ``torch.optim.swa_utils.AveragedModel(model,
    multi_avg_fn=...)``, in place of torch's ``get_swa_multi_avg_fn()``: ``average <-
    lerp(average, param, 1 / (n + 1))`` after ``n`` samples (AveragedModel copies the params
    at its first update).

    As torch's, the weight is ``1 / (num_averaged + 1)`` computed with ``num_averaged`` as
    given: AveragedModel passes its int64 ``n_averaged`` tensor, so the weight is a tensor of
    torch's default dtype (float32 unless changed) and float64 averages move by that rounded
    weight. What runs natively, what goes to torch's function, and how the rounding compares
    with torch's: as :func:`ema_multi_avg_fn`. Integer tensors go to torch's function, which
    raises on them when ``num_averaged`` is a tensor (``use_buffers=True`` with BatchNorm's
    ``num_batches_tracked``), as torch's does.

    >>> import torch
    >>> import lrfast.torch
    >>> w = torch.nn.Linear(1, 1, bias=False)
    >>> avg = torch.optim.swa_utils.AveragedModel(w, multi_avg_fn=lrfast.torch.swa_multi_avg_fn())
    >>> for value in (1.0, 2.0, 6.0):
    ...     _ = w.weight.data.fill_(value)
    ...     avg.update_parameters(w)
    >>> avg.module.weight.item(), avg.n_averaged.item()
    (3.0, 3)
    """
    return _MultiAvgFn("swa")


def _describe_avg_fn(averaged: Any) -> str:
    """What averages an AveragedModel, in words (for the error that refuses it)."""
    if averaged.avg_fn is not None:
        return f"avg_fn={getattr(averaged.avg_fn, '__qualname__', averaged.avg_fn)!r}"
    fn = averaged.multi_avg_fn
    if fn is None:
        return ("neither avg_fn nor multi_avg_fn (torch's default SWA, which on the CPU divides "
                "tensor by tensor)")
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if name.startswith(("get_ema_multi_avg_fn", "get_swa_multi_avg_fn")):
        return f"torch's {name.split('.')[0]}() (whose decay lrfast cannot read)"
    return f"multi_avg_fn={name!r}"


class _EmaLink:
    """What ``ema=(averaged_model, model)`` ties to an lrfast.torch optimizer: each applied
    ``step()`` also does what ``averaged_model.update_parameters(model)`` would do after it.

    The pairing: ``model.parameters()`` and ``averaged_model.module.parameters()`` in order
    (AveragedModel's own), the same count, shapes and dtypes; each optimizer param must be one
    of the model's (by identity, in any group and order). The average of a param the step
    updates is taken in the step's own native pass, right after the param is written, where
    the average is a contiguous CPU tensor of a real floating dtype and the param a plain
    tensor; every other model param (not in the optimizer, without a gradient at this step,
    complex, a DTensor) is averaged after the step by the AveragedModel's function. Then, as
    torch: with ``use_buffers=False`` the model's buffers are copied into the averaged module's
    (copied, not averaged); with ``use_buffers=True`` they are averaged by the function too
    (copied at the first update); and ``n_averaged`` goes up by one.
    """

    def __init__(self, opt: _Optimizer, ema: Any):
        from torch.optim.swa_utils import AveragedModel

        if (not isinstance(ema, (tuple, list)) or len(ema) != 2
                or not isinstance(ema[0], AveragedModel)
                or not isinstance(ema[1], torch.nn.Module)):
            got = type(ema).__name__
            if isinstance(ema, (tuple, list)):
                got = f"{got} of " + ", ".join(type(e).__name__ for e in ema)
            raise TypeError("ema must be a pair (averaged_model, model): a "
                            "torch.optim.swa_utils.AveragedModel and the torch.nn.Module whose "
                            f"params the optimizer updates (its buffers are read too); got {got}")
        self.averaged, self.model = ema
        self.fn = self._check_fn()
        self.model_params = list(self.model.parameters())
        self.avg_params = list(self.averaged.module.parameters())
        self.index = {id(p): i for i, p in enumerate(self.model_params)}
        self._check_pairs()
        for gi, group in enumerate(opt.param_groups):
            self.check_params(group["params"], gi)

    # -- checks ------------------------------------------------------------------------------

    def _check_fn(self) -> _MultiAvgFn:
        fn = self.averaged.multi_avg_fn
        if self.averaged.avg_fn is not None or not isinstance(fn, _MultiAvgFn):
            raise ValueError(
                "ema= fuses the averages of lrfast.torch.ema_multi_avg_fn(decay) and "
                "lrfast.torch.swa_multi_avg_fn() into the step; this AveragedModel averages "
                f"with {_describe_avg_fn(self.averaged)}. Build it as AveragedModel(model, "
                "multi_avg_fn=lrfast.torch.ema_multi_avg_fn(decay)) or with "
                "multi_avg_fn=lrfast.torch.swa_multi_avg_fn()")
        return fn

    def _check_pairs(self) -> None:
        """The params and buffers pair up; the averages share no memory with the model;
        integer buffers are not given to the SWA average (torch's raises on them)."""
        names = [n for n, _ in self.model.named_parameters()]
        if len(self.avg_params) != len(self.model_params):
            raise ValueError(f"ema: the averaged module has {len(self.avg_params)} parameters, "
                             f"the model {len(self.model_params)}: build the AveragedModel from "
                             "the model the optimizer trains")
        for name, a, p in zip(names, self.avg_params, self.model_params):
            if a.shape != p.shape or a.dtype != p.dtype:
                raise ValueError(f"ema: the averaged module's parameter {name!r} is "
                                 f"{tuple(a.shape)} {a.dtype}, the model's {tuple(p.shape)} "
                                 f"{p.dtype}: they must match")
        bnames = [n for n, _ in self.model.named_buffers()]
        avg_buffers = list(self.averaged.module.buffers())
        model_buffers = list(self.model.buffers())
        # (a step reads the buffers afresh, as torch does, unless neither module had any: a
        # module walk costs as much as a small model's step)
        self.has_buffers = bool(avg_buffers or model_buffers)
        if len(avg_buffers) != len(model_buffers):
            raise ValueError(f"ema: the averaged module has {len(avg_buffers)} buffers, the "
                             f"model {len(model_buffers)}: they must pair up")
        for name, a, b in zip(bnames, avg_buffers, model_buffers):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"ema: the averaged module's buffer {name!r} is "
                                 f"{tuple(a.shape)} {a.dtype}, the model's {tuple(b.shape)} "
                                 f"{b.dtype}: they must match")
            if (self.averaged.use_buffers and self.fn.kind == "swa"
                    and not (b.is_floating_point() or b.is_complex())):
                raise ValueError(f"ema: with use_buffers=True the SWA average would average the "
                                 f"buffer {name!r} of dtype {b.dtype}, and torch's SWA raises on "
                                 "integer tensors (its addcdiv); use use_buffers=False, or an EMA")
        plain = [t for t in self.model_params + self.avg_params + model_buffers + avg_buffers
                 if type(t) in _PLAIN_TENSORS and t.is_cpu and t.numel() and t.data_ptr()]
        written = {id(t) for t in self.avg_params + avg_buffers}
        if _overlapping([(*_span(t), id(t) in written) for t in plain]):
            raise ValueError("ema: the averaged module shares memory with the model (or its "
                             "tensors with each other); AveragedModel(model) makes a copy")
        self._find_fusable()

    def _find_fusable(self) -> None:
        """Which averages the step can write (by model param), and their addresses now."""
        self.ptrs = list(map(_DATA_PTR, self.avg_params))
        self.fused_avg: dict[int, Any] = {}
        for p, a in zip(self.model_params, self.avg_params):
            if (not _is_dtensor(p) and _native_pair(a, a) and a.dtype is p.dtype
                    and a.shape == p.shape and a.numel()):
                self.fused_avg[id(p)] = a

    def check_params(self, params: list, gi: int) -> None:
        for k, p in enumerate(params):
            if id(p) not in self.index:
                raise ValueError(f"ema: parameter {k} of group {gi} is not a parameter of the "
                                 "model given in ema=(averaged_model, model)")

    # -- the step ----------------------------------------------------------------------------

    def fusable(self, params: list) -> list:
        """Per param, its average if the step writes it, else None."""
        get = self.fused_avg.get
        return [get(id(p)) for p in params]

    def begin(self, opt: _Optimizer) -> tuple[str, float]:
        """(mode, weight) of this step's average: "copy" at AveragedModel's first update,
        "lerp" after it ("none" for a negative n_averaged, which torch does not average).
        Re-checks the pairing when the averaged module's memory moved (``.to()``, ``.data``)."""
        if self.averaged.multi_avg_fn is not self.fn or self.averaged.avg_fn is not None:
            self.fn = self._check_fn()
        if list(map(_DATA_PTR, self.avg_params)) != self.ptrs:
            self._check_pairs()
            opt._plans.clear()
        n_averaged = self.averaged.n_averaged
        n = int(n_averaged)
        if n == 0:
            return "copy", 1.0
        if n < 0:
            return "none", 0.0
        return "lerp", self.fn.weight(n_averaged)

    @torch.no_grad()
    def finish(self, average: tuple[str, float], fused: list[list]) -> None:
        """After the step's runs: average what they did not, then the buffers, then count."""
        averaged, model = self.averaged, self.model
        mode = average[0]
        if mode != "none":
            if sum(map(len, fused)) == len(self.model_params):
                rest = []
            else:
                done = {id(p) for lst in fused for p in lst}
                rest = [i for i, p in enumerate(self.model_params) if id(p) not in done]
            avgs = [self.avg_params[i].detach() for i in rest]
            curs = [self.model_params[i].detach() for i in rest]
            if averaged.use_buffers and self.has_buffers:
                avgs += [b.detach() for b in averaged.module.buffers()]
                curs += [b.detach() for b in model.buffers()]
            curs = [c.to(a.device) for a, c in zip(avgs, curs)]
            if mode == "copy":
                for a, c in zip(avgs, curs):
                    a.copy_(c)
            elif avgs:
                # (AveragedModel calls its function once per (device, dtype); here one call
                # takes them all: each tensor is averaged on its own either way)
                self.fn(avgs, curs, averaged.n_averaged)
        if not averaged.use_buffers and self.has_buffers:
            for b_avg, b in zip(averaged.module.buffers(), model.buffers()):
                b_avg.detach().copy_(b.detach().to(b_avg.device))
        averaged.n_averaged += 1
