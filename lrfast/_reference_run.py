"""Stepping an optimizer of the spec table with :mod:`lrfast.reference`, as its class steps it.

:class:`ReferenceRun` holds its own state, built from the spec (``lrfast._specs.OPTIMIZERS``):
the defaults of the hyper-parameters not given, which state buffers exist and what they start at
(zeros; Adagrad's sum at initial_accumulator_value), named as torch names them, and how the
reference function is called. The tests step it in lockstep with the classes;
``python -m lrfast compare --reference`` trains with it in place of the compiled kernels.
"""
from __future__ import annotations

import numpy as np

from . import reference
from ._specs import OPTIMIZERS as SPECS

__all__ = ["ReferenceRun", "STEP_KWARGS", "initial_buffer", "step_kwargs"]

# Updates whose kernel reads per-step values (``Update.scalars``) derived from state the classes
# keep: {update name: (validated update values, 1-based step, the run's scalar state, a dict
# the function reads and advances) -> that step's keyword arguments for the reference and
# functional calls (the scalars, and any value they replace)}.
STEP_KWARGS: dict = {}


def initial_buffer(update, name, values, param):
    """Buffer ``name`` of ``param`` as the classes start it: a copy of the param
    (``Buffer.init`` PARAM), else full of the spec's initial value (None: the param has no
    such buffer)."""
    buf = next(b for b in update.buffers if b.name == name)
    if buf.starts_as_param:
        return param.copy()
    # shaped by its spec for its param (Adafactor's row_var/col_var; None where a param has
    # no such buffer), else as the param
    shape = buf.shape_for(param.shape)
    if shape is None:
        return None
    return np.full(shape, update.initial_value(name, values), param.dtype)


def step_kwargs(update, values, t, scalar_state):
    """The per-step keyword arguments of ``update`` at step ``t``, advancing ``scalar_state``
    (a dict, empty at the start of a run; see STEP_KWARGS)."""
    fn = STEP_KWARGS.get(update.name)
    return {} if fn is None else fn(values, t, scalar_state)


def _schedule_free_kwargs(values, t, state):
    """Step ``t``'s warmup-scheduled lr and averaging weight ckp1 from lrfast.reference's
    derivation, advancing the group scalars in ``state`` (lr_max, weight_sum: the classes'
    state dict entries of the same names)."""
    v = reference.schedule_free_values(
        t - 1, values["lr"], warmup_steps=values["warmup_steps"], r=values["r"],
        weight_lr_power=values["weight_lr_power"], lr_max=state.get("lr_max", -1.0),
        weight_sum=state.get("weight_sum", 0.0))
    state.update(lr_max=v["lr_max"], weight_sum=v["weight_sum"])
    return {"lr": v["lr"], "ckp1": v["ckp1"]}


STEP_KWARGS.update(adamw_schedule_free=_schedule_free_kwargs,
                   sgd_schedule_free=_schedule_free_kwargs)


class ReferenceRun:
    """Steps lrfast.reference in lockstep with an optimizer class, holding its own state.

    Everything about the optimizer comes from its spec (``lrfast._specs.OPTIMIZERS``): the
    defaults of the hyper-parameters not given, which state buffers exist and what they start at
    (zeros; Adagrad's sum at initial_accumulator_value), named as torch names them so they can be
    compared buffer by buffer, and how the reference function is called.

    ``copy=False``: update ``params`` themselves rather than copies. ``step(grads, lr=...)``
    takes that step's learning rate (a schedule's value) in place of the constructor's.
    """

    def __init__(self, name, hyper, params, *, copy=True):
        self.name = name
        self.spec = SPECS[name]
        self.values = self.spec.validate(hyper)  # the update's, defaults filled in
        self.h = self.spec.collapse(self.values)  # the class's (Adam: ``betas``)
        self.params = [p.copy() for p in params] if copy else list(params)
        self.t = 0
        self.scalar_state: dict = {}  # per-step values' state (STEP_KWARGS)
        update = self.spec.update
        self.state = {
            buf: [initial_buffer(update, buf, self.values, p) for p in self.params]
            for buf in update.state_buffers(self.values)
        }
        # Scalar state (NAdam's mu_product, ASGD's eta and mu): one 0-d array per scalar dtype
        # (float64 for float64 params, else float32), shared by the params of that dtype, which
        # step together.
        for name in update.scalar_names(self.values):
            value = update.initial_value(name, self.values)
            if callable(value):  # a schedule: its first value
                value = value(0)
            shared: dict = {}
            self.state[name] = [shared.setdefault(sd, np.array(value, dtype=sd))
                                for sd in map(self._scalar_dtype, self.params)]

    @staticmethod
    def _scalar_dtype(p):
        return np.dtype(np.float64 if p.dtype == np.float64 else np.float32)

    def step(self, grads, lr=None):
        if lr is not None:
            self.values = {**self.values, "lr": float(lr)}
        self.t += 1
        self.call(reference, grads)

    def call(self, module, grads, single=False):
        """``module``'s function for the update (lrfast.reference or lrfast.functional), on this
        run's params and state at step ``self.t``; ``single``: on the first tensor's arrays
        rather than on lists. With scalar state, one call per scalar dtype."""
        if self.spec.update.scalar_state and not single:
            groups: dict = {}
            for k, p in enumerate(self.params):
                groups.setdefault(self._scalar_dtype(p), []).append(k)
            if len(groups) > 1:
                for idx in groups.values():
                    self._call(module, [grads[k] for k in idx], idx)
                return
        self._call(module, grads, None, single)

    def _call(self, module, grads, idx, single=False):
        update = self.spec.update

        def arrays(lst):
            if lst is None:
                return None
            if idx is not None:
                lst = [lst[k] for k in idx]
            return lst[0] if single else lst

        args = [arrays(self.params), grads] + [arrays(self.state.get(b.name))
                                               for b in update.buffers if not b.keyword]
        # the scalar state: one 0-d array per call
        args += [self.state[b.name][0 if idx is None else idx[0]] for b in update.scalar_state]
        kwargs = {h.name: self.values[h.name] for h in update.hypers if h.functional}
        kwargs.update({b.argname: arrays(self.state.get(b.name))
                       for b in update.buffers if b.keyword})
        if update.takes_step:
            kwargs["step"] = self.t
        kwargs.update(step_kwargs(update, self.values, self.t, self.scalar_state))
        getattr(module, update.name + "_")(*args, **kwargs)
