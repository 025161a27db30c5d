"""Plateau control: a learning-rate factor driven by a metric, on top of any schedule.

``ReduceLROnPlateau`` watches a metric (``plateau.step(loss)`` once per evaluation) and keeps a
multiplicative factor, lowered when the metric stops improving and, optionally, raised after a
run of improvements. ``schedule * plateau`` (or ``plateau.wrap(schedule)``) is a schedule like
any other, compiled into the same flat program: its value at step t is ``schedule(t)`` times the
factor in force when it is evaluated, kept within ``min_lr`` / ``max_lr``.

``ReduceLROnPlateau`` is also importable from :mod:`lrfast.schedules` and :mod:`lrfast`. This
module builds on the schedule classes of :mod:`lrfast.schedules`, which imports it at its end
(the package imports :mod:`lrfast.schedules` first, so either import order works for users).
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np

from ._dispatch import schedule_kernels as _schedules
from ._validation import check_choice, check_count, check_real
from .schedules import Schedule, _from_json, _schedule, constant

if TYPE_CHECKING:
    # Both builds share one API (the same .pxi): type against the portable build's stub.
    from ._schedules import PlateauCell
else:
    PlateauCell = _schedules.PlateauCell

__all__ = ["ReduceLROnPlateau"]


class ReduceLROnPlateau:
    """A multiplicative factor driven by a metric; composes with any schedule.

    ``schedule * plateau`` (or ``plateau.wrap(schedule)``) is a schedule whose value is
    ``schedule(t) * factor``, floored at ``min_lr`` while the factor is below 1 and capped at
    ``max_lr`` while it is above 1. Call ``plateau.step(metric)`` once per evaluation.

    Defaults follow torch's ``ReduceLROnPlateau``: the factor is multiplied by ``factor`` on the
    (patience+1)-th evaluation in a row without improvement (``counting='keras'``: on the
    patience-th), then ``cooldown`` evaluations are ignored. An improvement beats the best so
    far by ``threshold``: relative (``best * (1 -/+ threshold)`` for positive metrics; lrfast
    scales by ``|best|`` so negative metrics work too) or absolute. A NaN metric is never an
    improvement. ``increase_factor`` (the seed articles' performance scheduling, no peer has
    it): after ``increase_patience`` improvements in a row the factor is multiplied by it,
    never letting the rate exceed ``max_lr``. A reduction that would lower the rate by ``eps``
    or less is skipped, as in torch, when ``step`` is given the rate in force
    (``plateau.step(loss, lr=opt.last_lr)``); otherwise ``eps`` applies to the factor.

    Examples
    --------
    Halve the rate after two evaluations in a row without improvement (``patience=1``):

    >>> from lrfast import ReduceLROnPlateau
    >>> from lrfast.schedules import constant
    >>> plateau = ReduceLROnPlateau(factor=0.5, patience=1)
    >>> s = constant(0.1) * plateau
    >>> [plateau.step(loss) for loss in (1.0, 0.9, 0.95, 0.95)]
    [1.0, 1.0, 1.0, 0.5]
    >>> s(0)
    0.05

    ``min_lr`` floors the rate once it has been lowered:

    >>> plateau = ReduceLROnPlateau(factor=0.5, patience=0, min_lr=0.02)
    >>> s = plateau.wrap(constant(0.1))
    >>> [plateau.step(1.0) for _ in range(4)]
    [1.0, 0.5, 0.25, 0.125]
    >>> s(0)
    0.02
    """

    _CONFIG = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr",
               "eps", "counting", "increase_factor", "increase_patience", "max_lr")

    def __init__(self, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8, counting="torch",
                 increase_factor=None, increase_patience=5, max_lr=None):
        self.mode = check_choice(mode, "mode", ("min", "max"))
        self.factor = check_real(factor, "factor", low=0, low_open=True)
        if self.factor >= 1.0:
            raise ValueError(f"factor must be < 1.0, got {factor}")
        self.patience = check_count(patience, "patience", low=0)
        self.threshold = check_real(threshold, "threshold", low=0)
        self.threshold_mode = check_choice(threshold_mode, "threshold_mode", ("rel", "abs"))
        self.cooldown = check_count(cooldown, "cooldown", low=0)
        self.min_lr = check_real(min_lr, "min_lr", low=0)
        self.eps = check_real(eps, "eps", low=0)
        self.counting = check_choice(counting, "counting", ("torch", "keras"))
        if increase_factor is not None:
            increase_factor = check_real(increase_factor, "increase_factor", low=1.0, low_open=True)
            if max_lr is None:
                raise ValueError("max_lr is required with increase_factor (it caps the rate)")
        self.increase_factor = increase_factor
        self.increase_patience = check_count(increase_patience, "increase_patience")
        self.max_lr = None if max_lr is None else check_real(max_lr, "max_lr", low=0)
        if self.max_lr is not None and self.max_lr < self.min_lr:
            raise ValueError(f"max_lr must be >= min_lr, got {max_lr} < {min_lr}")
        self._cell = PlateauCell()
        self._cell.min_lr = self.min_lr
        self._cell.max_lr = math.inf if self.max_lr is None else self.max_lr
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad = 0
        self.num_good = 0
        self.cooldown_counter = 0
        self.num_steps = 0
        self._cell.scale = 1.0

    @property
    def scale(self):
        """The current factor (1.0 until the first reduction)."""
        return self._cell.scale

    def config(self):
        return {"type": "plateau", **{k: getattr(self, k) for k in self._CONFIG}}

    def wrap(self, schedule):
        """The schedule ``schedule(t) * factor`` (with the min_lr / max_lr bounds)."""
        return _WithPlateau(schedule, self)

    def __mul__(self, other):
        if isinstance(other, Schedule):
            return _WithPlateau(other, self)
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            return _WithPlateau(constant(other), self)
        return NotImplemented

    __rmul__ = __mul__

    def _better(self, a, best):
        if math.isnan(a):
            return False
        if self.counting == "keras":
            # keras: min_delta is absolute.
            return a < best - self.threshold if self.mode == "min" else a > best + self.threshold
        if math.isinf(best):
            return a < best if self.mode == "min" else a > best
        delta = self.threshold * abs(best) if self.threshold_mode == "rel" else self.threshold
        return a < best - delta if self.mode == "min" else a > best + delta

    def step(self, metric, lr=None):
        """Record one evaluation of the metric; returns the factor now in force.

        ``lr``: the learning rate in force (e.g. ``optimizer.last_lr``). When given, a reduction
        is skipped if it would lower the *rate* by ``eps`` or less, exactly as torch does;
        without it, ``eps`` applies to the factor.
        """
        if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
            metric = float(np.asarray(metric).item()) if isinstance(metric, np.ndarray) and \
                metric.size == 1 else metric
            if isinstance(metric, bool) or not isinstance(metric, numbers.Real):
                raise TypeError(f"metric must be a real number, got {type(metric).__name__}")
        a = float(metric)
        self.num_steps += 1
        improved = self._better(a, self.best)
        if self.counting == "torch":
            if improved:
                self.best = a
                self.num_bad = 0
                self.num_good += 1
            else:
                self.num_bad += 1
                self.num_good = 0
            if self.cooldown_counter > 0:
                self.cooldown_counter -= 1
                self.num_bad = 0
            if self.num_bad > self.patience:
                self._reduce(lr)
        else:
            # keras: the cooldown counter is decremented first, and "in cooldown" is judged
            # after that, so the last cooldown evaluation already counts.
            if self.cooldown_counter > 0:
                self.cooldown_counter -= 1
                self.num_bad = 0
            if improved:
                self.best = a
                self.num_bad = 0
                self.num_good += 1
            else:
                self.num_good = 0
                if self.cooldown_counter == 0:
                    self.num_bad += 1
                    if self.num_bad >= self.patience:
                        self._reduce(lr)
        if self.increase_factor is not None and self.num_good >= self.increase_patience:
            self._cell.scale = self._cell.scale * self.increase_factor
            self.num_good = 0
        return self._cell.scale

    def _reduce(self, lr=None):
        old = self._cell.scale
        new = old * self.factor
        if lr is None:
            significant = old - new > self.eps
        else:
            lr = check_real(lr, "lr", low=0)
            significant = lr - max(lr * self.factor, self.min_lr) > self.eps
        if significant:
            self._cell.scale = new
        self.cooldown_counter = self.cooldown
        self.num_bad = 0

    def state_dict(self):
        return {"config": self.config(), "best": self.best, "num_bad": self.num_bad,
                "num_good": self.num_good, "cooldown_counter": self.cooldown_counter,
                "num_steps": self.num_steps, "scale": self._cell.scale}

    def load_state_dict(self, state):
        """Restore ``state_dict()``; the configuration must match this controller's."""
        keys = ("config", "best", "num_bad", "num_good", "cooldown_counter", "num_steps", "scale")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ValueError(f"a plateau state dict has the keys {keys}")
        if state["config"] != self.config():
            raise ValueError("the state was saved by a ReduceLROnPlateau with another configuration")
        counters = [check_count(state[k], k, low=0) for k in keys[2:6]]
        best = float(state["best"])
        scale = check_real(state["scale"], "scale", low=0, low_open=True)
        self.best = best
        self.num_bad, self.num_good, self.cooldown_counter, self.num_steps = counters
        self._cell.scale = scale

    def __repr__(self):
        return "ReduceLROnPlateau(" + ", ".join(
            f"{k}={getattr(self, k)!r}" for k in self._CONFIG) + f"; scale={self.scale!r})"


class _WithPlateau(Schedule):
    kind = "with_plateau"

    def __init__(self, schedule, plateau):
        if not isinstance(plateau, ReduceLROnPlateau):
            raise TypeError(f"plateau must be a ReduceLROnPlateau, got {type(plateau).__name__}")
        self._params = {"schedule": _schedule("schedule", schedule), "plateau": plateau}
        self._compile()

    @property
    def plateau(self):
        return self._params["plateau"]

    def to_dict(self):
        d = super().to_dict()
        d["scale"] = self.plateau.scale
        return d

    @classmethod
    def _from_params(cls, params):
        cfg = dict(params["plateau"])
        cfg.pop("type", None)
        plateau = ReduceLROnPlateau(**cfg)
        plateau._cell.scale = float(params.get("scale", 1.0))
        return cls(_from_json(params["schedule"]), plateau)

    def _emit(self, b):
        child = self._params["schedule"]._emit(b)
        cell = self.plateau._cell
        b.keep.append(cell)
        return b.node("plateau", ip=[child, cell.address])
