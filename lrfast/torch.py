"""lrfast's kernels as drop-in ``torch.optim`` optimizers for CPU training.

``from lrfast.torch import AdamW`` in place of ``from torch.optim import AdamW``: the classes
``SGD``, ``Adagrad``, ``RMSprop``, ``Adam`` and ``AdamW`` subclass :class:`torch.optim.Optimizer`
with torch's signatures, defaults, ``param_groups``, state names and ``state_dict`` format (a
state dict saved by ``torch.optim.Adam`` loads into ``lrfast.torch.Adam`` and back), hooks and
lr schedulers. ``step()`` runs lrfast's native kernels directly on the tensors' memory: no
copies, one native call per (group, dtype) for all of that group's tensors, instead of torch's
per-tensor loops or kernels.

What runs here: dense float32/float64 parameters on the CPU, and complex64/complex128 ones on
their real view (as torch does). A non-contiguous parameter is updated through a contiguous
copy, gathered and written back at each step; contiguous ones are updated in place. Anything
else is refused when the parameter is added (a CUDA or meta tensor, bfloat16/float16, a sparse
parameter) or at the step that meets it (a sparse gradient), with a message that says so,
never computed wrongly. ``capturable=True`` and ``differentiable=True`` (which
need torch's own autograd-aware update) are refused; ``foreach`` and ``fused`` are accepted and
stored, so state dicts keep torch's keys, but lrfast's kernel runs in either case. A param whose
``.grad`` is None is skipped, as torch skips it. Threads: ``lrfast.set_num_threads``.

This module imports torch; ``import lrfast`` never does.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _dispatch, _hyperparams
from ._threads import get_num_threads

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]

# The dtypes updated, and whether the kernel runs in float64. A complex param is updated on its
# real view (``torch.view_as_real``: the real and imaginary parts as two real elements), as
# torch's optimizers do, so its state buffers are complex too and the state dicts torch's.
_IS64 = {torch.float32: False, torch.float64: True, torch.complex64: False,
         torch.complex128: True}


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


def _check_param(p: Any, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(p).__name__}")
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
    if p.dtype not in _IS64:
        raise TypeError(f"{where} has dtype {p.dtype}: lrfast.torch updates float32 and float64 "
                        "tensors, and complex64/complex128 on their real view (use torch.optim "
                        "for other dtypes)")
    # A non-contiguous param (a view such as w[..., 0] or w.t()) is updated through a
    # contiguous copy, gathered and scattered back at each step (see _Optimizer.step).


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
    with another; torch keeps one tensor per param), and one address table per (dtype, key)
    bucket holding the param and state addresses. A later step reuses it while the same params
    have gradients and the params' memory and state tensors are the same objects; it then only
    reads the gradients' addresses into the tables.
    """

    def __init__(self, opt, group, needs, params, states, keys, count_steps):
        self.params = params
        self.positions = [k for k, p in enumerate(group["params"]) if p.grad is not None]
        self.ngroup = len(group["params"])
        self.param_ptrs = [p.data_ptr() for p in params]
        self.states = states
        self.needs = needs
        self.state_obj = opt.state
        self.steps = None
        self.key_splits = opt._key_splits
        if count_steps:
            values = [float(st["step"]) for st in states]
            self.steps = torch.tensor(values, dtype=_scalar_dtype())
            for i, st in enumerate(states):
                st["step"] = self.steps[i]
        # What ``grad_pointers`` checks each step, per param of the group (None: no gradient
        # when the plan was made): the param's address, its state dict, and the identities of
        # the state tensors the tables point into.
        names = needs + (("step",) if self.steps is not None else ())
        self.same = _identity_check(names)
        self.group_params = list(group["params"])
        entries: list[Any] = [None] * len(self.group_params)
        for i, k in enumerate(self.positions):
            entries[k] = (self.param_ptrs[i], states[i], tuple(states[i][n] for n in names))
        self.entries = entries
        # Buckets by dtype and key (SGD: first step of the momentum buffer or not).
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, keys[i]), []).append(i)
        rows = _hyperparams.STATE_ROWS[opt._kind]
        self.buckets = []
        for (dtype, key), idx in groups.items():
            table = np.zeros((2 + len(rows), len(idx)), dtype=np.intp)
            sizes = np.zeros(len(idx) + 1, dtype=np.intp)
            for col, i in enumerate(idx):
                table[0, col] = self.param_ptrs[i]
                for r, name in enumerate(rows):
                    if name in needs:
                        table[2 + r, col] = states[i][name].data_ptr()
                # real elements: a complex param is two per element (see _IS64)
                sizes[col + 1] = params[i].numel() * (2 if params[i].is_complex() else 1)
            self.buckets.append((_IS64[dtype], key, idx, table, np.cumsum(sizes)))
        self.single = len(self.buckets) == 1
        # A plan whose keys change after this step (SGD's first step) is used once.
        self.reusable = not any(key for _, key, _, _, _ in self.buckets)

    def grad_pointers(self, group, state):
        """The gradients' addresses if this plan still describes the group, else None."""
        gparams = group["params"]
        if state is not self.state_obj or len(gparams) != len(self.group_params):
            return None
        out: list[int] = []
        append = out.append
        same = self.same
        try:
            for p, q, entry in zip(gparams, self.group_params, self.entries):
                g = p.grad
                if p is not q:
                    return None
                if entry is None:
                    if g is not None:
                        return None
                    continue
                ptr, st, tensors = entry
                if (g is None or p.data_ptr() != ptr or not g.is_contiguous()
                        or state.get(p) is not st or not same(st, tensors)):
                    return None
                append(g.data_ptr())
        except (RuntimeError, KeyError):  # a sparse gradient; a state buffer removed
            return None
        return out

    def run(self, kernel, nthreads, kwargs, hyper, gptrs):
        """Run the update with these gradient addresses. False (nothing done) when the params'
        step counts no longer fall into this plan's buckets."""
        steps = self.steps.tolist() if self.steps is not None else None
        calls = []
        for is64, key, idx, table, offsets in self.buckets:
            if steps is not None and self.key_splits:
                if self.single:
                    lo, hi = min(steps), max(steps)
                else:
                    lo = min(steps[i] for i in idx)
                    hi = max(steps[i] for i in idx)
                if hi != lo:
                    return False
                key = int(lo) + 1  # this update's 1-based step
            calls.append((is64, key, idx, table, offsets))
        for is64, key, idx, table, offsets in calls:
            table[1] = gptrs if self.single else [gptrs[i] for i in idx]
            kernel(table, offsets, is64, nthreads, **kwargs(hyper, key))
        if self.steps is not None:
            self.steps.add_(1)
        return True


class _Optimizer(torch.optim.Optimizer):
    """What the five classes share: parameter checks, the per-step gather and the kernel call.

    Subclasses set ``_kind`` (the update: its kernel is ``<kind>_step``, its state buffers in
    the kernel's table order are ``_hyperparams.STATE_ROWS[kind]``),
    ``_counts_steps`` (keeps ``state['step']``) and ``_key_splits`` (the step count is a kernel
    argument), and implement ``_hyper(group)`` (validated hyper-parameters) and
    ``_kwargs(hyper, key)`` (the kernel's keyword arguments).
    """

    _kind = ""
    _counts_steps = True
    _key_splits = True  # does the key (step, or SGD's first step) change the kernel's arguments?
    _name = ""
    # Group entries a state dict from an older torch may lack, with the value torch's own
    # ``__setstate__`` gives them (loading such a dict fills them in, as torch does).
    _older_defaults: dict[str, Any] = {}

    def __init__(self, params, defaults):
        self._plans: dict[int, _Plan] = {}
        # The hyper-parameters are checked before ``params`` is read, as torch does: a bad
        # value is reported as such whatever ``params`` is.
        self._check_defaults(defaults)
        super().__init__(params, defaults)

    def _check_defaults(self, defaults: dict[str, Any]) -> None:
        """torch's constructor checks of the defaults, with its messages, then lrfast's."""
        lr = defaults["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._hyper(defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``__setstate__`` (also the end of ``load_state_dict``), then the entries an
        older state dict lacks and, where it kept a step as a number, the step as a tensor."""
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            for name, value in self._older_defaults.items():
                group.setdefault(name, value)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=_scalar_dtype())

    # -- groups ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then lrfast's checks of the new group's params and
        hyper-parameters; a group that fails them is not added."""
        super().add_param_group(param_group)
        self._plans.clear()
        group = self.param_groups[-1]
        try:
            for k, p in enumerate(group["params"]):
                _check_param(p, f"parameter {k} of group {len(self.param_groups) - 1}")
            self._hyper(group)
        except Exception:
            self.param_groups.pop()
            raise
        self._init_group_state(group)

    def _init_group_state(self, group: dict[str, Any]) -> None:
        """State created when a group is added (only Adagrad has any, as in torch)."""

    def _check_flags(self, group: dict[str, Any]) -> None:
        if group.get("differentiable"):
            raise ValueError(f"lrfast.torch.{self._name} does not support differentiable=True "
                             "(use torch.optim)")
        if group.get("capturable"):
            raise ValueError(f"lrfast.torch.{self._name} does not support capturable=True "
                             "(use torch.optim)")

    # -- state ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (same format), then a check of every loaded buffer: its
        shape, dtype, device and layout must be its param's. On a mismatch nothing is kept."""
        saved = ({p: dict(st) for p, st in self.state.items()},
                 [{k: v for k, v in g.items()} for g in self.param_groups])
        super().load_state_dict(state_dict)
        try:
            for gi, group in enumerate(self.param_groups):
                self._hyper(group)
                for k, p in enumerate(group["params"]):
                    for name, buf in self.state.get(p, {}).items():
                        if name == "step":
                            continue
                        if not isinstance(buf, torch.Tensor):
                            raise ValueError(f"state {name!r} of parameter {k} of group {gi} "
                                             f"is a {type(buf).__name__}, not a tensor")
                        if (buf.shape != p.shape or buf.dtype != p.dtype
                                or buf.device != p.device or buf.layout is not torch.strided):
                            raise ValueError(
                                f"state {name!r} of parameter {k} of group {gi} does not match "
                                f"its parameter: {tuple(buf.shape)} {buf.dtype} on {buf.device}"
                                f" versus {tuple(p.shape)} {p.dtype}")
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

    def _state_for(self, p: torch.Tensor, hyper: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The param's state, with every buffer these hyper-parameters need (zeros when new),
        and the bucket key of its update (see ``_Plan``; None here)."""
        st = self.state[p]
        for name in self._needs(hyper):
            if name not in st:
                st[name] = self._new_buffer(name, p, hyper)
        if self._counts_steps and "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        return st, None

    def _new_buffer(self, name: str, p: torch.Tensor, hyper: dict[str, Any]) -> torch.Tensor:
        # Always contiguous (torch's preserve_format would keep a transposed param's layout):
        # the kernels read a buffer in the order of a contiguous param, or of the contiguous
        # copy a non-contiguous param is updated through.
        return torch.zeros_like(p, memory_format=torch.contiguous_format)

    # -- the step ---------------------------------------------------------------------------

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _needs(self, hyper: dict[str, Any]) -> tuple[str, ...]:
        """The state buffers these hyper-parameters use."""
        return _hyperparams.state_buffers(self._kind, hyper)

    def _kwargs(self, hyper: dict[str, Any], step: int) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Run one update of every param that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kernel = getattr(_dispatch.kernels, self._kind + "_step")
        nthreads = get_num_threads()
        # Every group and gradient is checked before any state is created or memory written.
        work = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(group)
            needs = self._needs(hyper)
            plan = self._plans.get(gi)
            gptrs = None
            if plan is not None and plan.needs == needs:
                gptrs = plan.grad_pointers(group, self.state)
            if gptrs is not None:
                work.append((gi, group, hyper, needs, plan, gptrs))
            else:
                work.append((gi, group, hyper, needs, None, self._checked_grads(gi, group)))
        for gi, group, hyper, needs, plan, grads in work:
            if plan is not None and plan.run(kernel, nthreads, self._kwargs, hyper, grads):
                continue
            if plan is not None:  # step counts diverged from the plan's buckets: lay out again
                grads = self._checked_grads(gi, group)
            self._plans.pop(gi, None)
            params = [p for p, _ in grads]
            if not params:
                continue
            states, keys = [], []
            for p in params:
                st, key = self._state_for(p, hyper)
                states.append(st)
                keys.append(key)
            # A non-contiguous param is gathered into a contiguous copy, updated there, and
            # scattered back; its group is laid out anew at every step (never the others).
            work = [p if p.is_contiguous() else p.contiguous() for p in params]
            gathered = any(w is not p for w, p in zip(work, params))
            count = self._counts_steps
            plan = _Plan(self, group, needs, work, states, [None] * len(params) if count
                         else keys, count)
            gptrs = [g.data_ptr() for _, g in grads]
            if not plan.run(kernel, nthreads, self._kwargs, hyper, gptrs):
                # Params at different step counts (added, or without a gradient, at other
                # times): one call per (dtype, step), laid out for this step only.
                keys = [int(st["step"]) + 1 for st in states]
                plan = _Plan(self, group, needs, work, states, keys, False)
                plan.run(kernel, nthreads, self._kwargs, hyper, gptrs)
                for st in states:
                    st["step"].add_(1)
            elif plan.reusable and not gathered:
                self._plans[gi] = plan
            for w, p in zip(work, params):
                if w is not p:
                    p.copy_(w)
        return loss

    def _checked_grads(self, gi, group):
        """[(param, grad)] for the group's params with a gradient, every one checked; a
        non-contiguous gradient is replaced by a contiguous copy (the param is never copied)."""
        out = []
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided:
                raise RuntimeError(f"{self._name} does not support sparse gradients")
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise ValueError(
                    f"the gradient of parameter {k} of group {gi} does not match it: "
                    f"{tuple(g.shape)} {g.dtype} on {g.device} versus {tuple(p.shape)} "
                    f"{p.dtype} on {p.device}")
            _check_param(p, f"parameter {k} of group {gi}")  # p.data may have been replaced
            if not g.is_contiguous():
                g = g.contiguous()
            out.append((p, g))
        return out


class Adam(_Optimizer):
    r"""Adam (``decoupled_weight_decay=True``: AdamW) with torch.optim.Adam's signature and
    state, run by lrfast's kernel.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}\ \text{(L2; AdamW:}\
               \theta_{t-1} \leftarrow \theta_{t-1}(1-\gamma\lambda)\text{)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon},
                    \quad \hat v_t = v_t\ \text{or}\ \max(\hat v_{t-1}, v_t)\ \text{(amsgrad)}

    State per param, as torch names it: ``step``, ``exp_avg``, ``exp_avg_sq`` and, with
    ``amsgrad``, ``max_exp_avg_sq``.
    """

    _kind = "adam"
    _name = "Adam"
    _older_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                           differentiable=False, decoupled_weight_decay=False, fused=None)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def _check_defaults(self, defaults):
        # torch's Adam (only) refuses tensor hyper-parameters with foreach=True.
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
        super()._check_defaults(defaults)

    def _hyper(self, group):
        self._check_flags(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        h = _hyperparams.adam(_scalar(group["lr"]), _scalar(betas[0]), _scalar(betas[1]),
                              group["eps"], group["weight_decay"], group["amsgrad"],
                              group["maximize"])
        h["decoupled"] = bool(group.get("decoupled_weight_decay", False))
        return h

    def _kwargs(self, hyper, step):
        return dict(lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"],
                    weight_decay=hyper["weight_decay"], decoupled=hyper["decoupled"],
                    amsgrad=hyper["amsgrad"], maximize=hyper["maximize"], step=step)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (default 1e-2), torch.optim.AdamW's signature."""

    _name = "AdamW"

    def __setstate__(self, state):
        # Whatever the state dict says (an Adam's, or an AdamW's from before the flag existed),
        # AdamW's decay is decoupled, as in torch.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)


class SGD(_Optimizer):
    r"""SGD with momentum, dampening, Nesterov and weight decay, torch.optim.SGD's signature.

    .. math::
        g_t = \pm\nabla_\theta f_t + \lambda\theta_{t-1},\quad
        b_t = \mu b_{t-1} + (1-\tau) g_t\ (b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \gamma\,(g_t + \mu b_t\ \text{(Nesterov)}\ \text{or}\ b_t)

    State per param: ``momentum_buffer`` when ``momentum != 0`` (none otherwise, as in torch).
    """

    _kind = "sgd"
    _counts_steps = False
    _name = "SGD"
    _older_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False,
                           fused=False)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults)

    def _hyper(self, group):
        self._check_flags(group)
        return _hyperparams.sgd(_scalar(group["lr"]), group["momentum"], group["dampening"],
                                _scalar(group["weight_decay"]), group["nesterov"],
                                group["maximize"])

    def _state_for(self, p, hyper):
        if hyper["momentum"] == 0:
            # No state: torch makes no entry for the param (self.state is a defaultdict, so
            # only ``get`` leaves it untouched).
            return self.state.get(p), False
        st = self.state[p]
        first = False
        if st.get("momentum_buffer") is None:
            # torch starts the buffer at the first gradient; the kernel's first step does that.
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            first = True
        return st, first

    def _kwargs(self, hyper, first):
        return dict(lr=hyper["lr"], momentum=hyper["momentum"], dampening=hyper["dampening"],
                    weight_decay=hyper["weight_decay"], nesterov=hyper["nesterov"],
                    maximize=hyper["maximize"], first_step=bool(first))


class Adagrad(_Optimizer):
    r"""Adagrad with torch.optim.Adagrad's signature and state (``step``, ``sum``, created when
    the params are added, ``sum`` at ``initial_accumulator_value``).

    .. math::
        \tilde\gamma = \frac{\gamma}{1 + (t-1)\eta},\quad g_t = \pm\nabla_\theta f_t
        + \lambda\theta_{t-1},\quad s_t = s_{t-1} + g_t^2,\quad
        \theta_t = \theta_{t-1} - \tilde\gamma\,\frac{g_t}{\sqrt{s_t} + \epsilon}
    """

    _kind = "adagrad"
    _name = "Adagrad"
    _older_defaults = dict(foreach=None, maximize=False, differentiable=False, fused=None)

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        foreach=foreach, maximize=maximize, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults)

    def _hyper(self, group):
        self._check_flags(group)
        return _hyperparams.adagrad(_scalar(group["lr"]), group["lr_decay"],
                                    group["weight_decay"], group["initial_accumulator_value"],
                                    group["eps"], False, group["maximize"])

    def _init_group_state(self, group):
        hyper = self._hyper(group)
        for p in group["params"]:
            self._state_for(p, hyper)

    def _new_buffer(self, name, p, hyper):
        value = hyper["initial_accumulator_value"]
        if p.is_complex():
            # On the real view both parts start at the value, as in torch.
            value = complex(value, value)
        return torch.full_like(p, value, memory_format=torch.contiguous_format)

    def _kwargs(self, hyper, step):
        return dict(lr=hyper["lr"], lr_decay=hyper["lr_decay"], weight_decay=hyper["weight_decay"],
                    eps=hyper["eps"], eps_inside_sqrt=False, maximize=hyper["maximize"],
                    step=step)


class RMSprop(_Optimizer):
    r"""RMSprop with torch.optim.RMSprop's signature and state (``step``, ``square_avg``;
    ``momentum_buffer`` when ``momentum > 0``; ``grad_avg`` when ``centered``).

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        \tilde v_t = v_t - \bar g_t^2\ \text{(centered,}\ \bar g_t = \alpha\bar g_{t-1}
        + (1-\alpha) g_t\text{)},\quad
        b_t = \mu b_{t-1} + \frac{g_t}{\sqrt{\tilde v_t} + \epsilon},\quad
        \theta_t = \theta_{t-1} - \gamma b_t\ \text{(or}\ \gamma\frac{g_t}{\sqrt{\tilde v_t}
        + \epsilon}\ \text{without momentum)}
    """

    _kind = "rmsprop"
    _key_splits = False  # torch counts RMSprop's steps, but the update does not use them
    _name = "RMSprop"
    _older_defaults = dict(momentum=0, centered=False, foreach=None, maximize=False,
                           differentiable=False, capturable=False)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, capturable=capturable,
                        foreach=foreach, maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults)

    def _hyper(self, group):
        self._check_flags(group)
        return _hyperparams.rmsprop(_scalar(group["lr"]), group["alpha"], group["eps"],
                                    group["weight_decay"], group["momentum"], group["centered"],
                                    group["maximize"])

    def _kwargs(self, hyper, step):
        return dict(lr=hyper["lr"], alpha=hyper["alpha"], eps=hyper["eps"],
                    weight_decay=hyper["weight_decay"], momentum=hyper["momentum"],
                    centered=hyper["centered"], maximize=hyper["maximize"])
