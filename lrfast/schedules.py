"""Learning-rate schedules: pure, closed-form functions of the step count.

Every schedule is an object ``s`` with two call paths:

- ``s(t)`` with an int returns a float (a native scalar path);
- ``s(steps)`` with an integer NumPy array returns a float64 array of the same shape, computed
  by an OpenMP kernel.

``t`` counts the updates already done: the first update uses ``s(0)`` (as optax, torch and
keras do). Steps must be >= 0; steps up to 2**62 give finite, correct values.

Parameters are checked once, at construction (a bad one raises ValueError naming it). However a
schedule is composed (``join``, ``warmup``, ``*``, ``clamp``, a plateau factor), it is compiled
into one flat program evaluated in C: no Python recursion per step. Every schedule has a
readable ``repr`` and ``to_dict()`` / ``from_dict()`` (JSON-able, exact round trip), and each has
a pure-NumPy twin in :mod:`lrfast.reference` (``reference.schedule_values(spec, steps)``).

Boundary conventions are stated per schedule; ``docs/schedules.md`` has the table against
torch.optim.lr_scheduler, optax, keras and timm.

Examples
--------
>>> import numpy as np
>>> from lrfast.schedules import linear
>>> s = linear(0.0, 1.0, 4)
>>> s(2)
0.5
>>> s(np.arange(6)).tolist()
[0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

from ._dispatch import schedule_kernels as _schedules
from ._threads import get_num_threads
from ._validation import check_bool, check_choice, check_count, check_increasing, check_real

if TYPE_CHECKING:
    # Both builds share one API (the same .pxi): type against the portable build's stub.
    from ._schedules import NativeSchedule
else:
    NativeSchedule = _schedules.NativeSchedule

__all__ = [
    "Schedule", "constant", "step_decay", "multistep", "exponential_decay", "natural_exp_decay",
    "inverse_time_decay", "polynomial_decay", "linear", "linear_factor", "cosine_decay",
    "cosine_restarts", "warmup", "warmup_cosine", "wsd", "one_cycle", "cosine_onecycle",
    "linear_onecycle", "cyclic", "piecewise_constant", "piecewise_interpolate", "inverse_sqrt",
    "join", "clamp", "scale", "ReduceLROnPlateau", "from_dict",
]

_NIP = _schedules.N_INT_PARAMS
_NFP = _schedules.N_FLOAT_PARAMS


# ------------------------------------------------------------------------------------------
# Parameter checks (once, at construction; the generic ones are in lrfast._validation)
# ------------------------------------------------------------------------------------------

def _schedule(name, s):
    if not isinstance(s, Schedule):
        raise TypeError(f"{name} must be an lrfast schedule, got {type(s).__name__}")
    return s


# ------------------------------------------------------------------------------------------
# Program builder
# ------------------------------------------------------------------------------------------

class _Builder:
    """Collects nodes of a flat program; children are emitted before their parents."""

    def __init__(self):
        self.kind, self.ip, self.fp, self.ibuf, self.fbuf, self.keep = [], [], [], [], [], []

    def node(self, kind, ip=(), fp=()):
        ip, fp = list(ip), list(fp)
        self.kind.append(_schedules.KINDS[kind])
        self.ip.append(ip + [0] * (_NIP - len(ip)))
        self.fp.append(fp + [0.0] * (_NFP - len(fp)))
        return len(self.kind) - 1

    def ints(self, values):
        at = len(self.ibuf)
        self.ibuf.extend(int(v) for v in values)
        return at

    def floats(self, values):
        at = len(self.fbuf)
        self.fbuf.extend(float(v) for v in values)
        return at

    def install(self, target, root):
        target._load_program(
            np.array(self.kind, dtype=np.intc), np.array(self.ip, dtype=np.int64),
            np.array(self.fp, dtype=np.float64), np.array(self.ibuf, dtype=np.int64),
            np.array(self.fbuf, dtype=np.float64), root, self.keep)


_REGISTRY: dict = {}


class Schedule(NativeSchedule):
    """Base of all schedules. Subclasses validate their parameters, store them in ``_params``
    (in signature order) and emit their nodes in ``_emit``."""

    kind = ""
    _params: dict[str, Any]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def _compile(self):
        b = _Builder()
        root = self._emit(b)
        b.install(self, root)

    def _emit(self, b):  # pragma: no cover - every concrete schedule overrides it
        raise NotImplementedError

    def _num_threads(self):
        """The thread count ``s(steps)`` evaluates with: lrfast's setting (``lrfast.threads``,
        ``set_num_threads``), chosen here and passed to the kernel as an argument."""
        return get_num_threads()

    # -- description --------------------------------------------------------------------------

    def to_dict(self):
        """A JSON-able description; ``from_dict(s.to_dict())`` rebuilds the same schedule."""
        out = {"type": self.kind}
        for k, v in self._params.items():
            out[k] = _to_json(v)
        return out

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{self.kind}({args})"

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(repr(self))

    # -- composition --------------------------------------------------------------------------

    def __mul__(self, other):
        if isinstance(other, ReduceLROnPlateau):
            return _WithPlateau(self, other)
        if isinstance(other, Schedule):
            return _Product(self, other)
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            return scale(self, other)
        return NotImplemented

    __rmul__ = __mul__


def _to_json(v):
    if isinstance(v, Schedule):
        return v.to_dict()
    if isinstance(v, ReduceLROnPlateau):
        return v.config()
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    return v


def from_dict(spec):
    """Rebuild a schedule from ``Schedule.to_dict()`` output (or the same JSON).

    Examples
    --------
    >>> from lrfast.schedules import constant, from_dict
    >>> spec = constant(0.1).to_dict()
    >>> spec
    {'type': 'constant', 'value': 0.1}
    >>> from_dict(spec)
    constant(value=0.1)
    >>> from_dict(spec) == constant(0.1)
    True
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a schedule spec is a dict with a 'type', got {spec!r}")
    kind = spec["type"]
    if kind not in _REGISTRY:
        raise ValueError(f"unknown schedule type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[kind]
    params = {k: v for k, v in spec.items() if k != "type"}
    return cls._from_params(params)


def _from_json(v):
    if isinstance(v, dict) and "type" in v:
        return from_dict(v)
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


class _Simple(Schedule):
    """A schedule whose parameters are plain values (rebuilt with ``cls(**params)``)."""

    @classmethod
    def _from_params(cls, params):
        return cls(**{k: _from_json(v) for k, v in params.items()})


# ------------------------------------------------------------------------------------------
# Closed-form schedules
# ------------------------------------------------------------------------------------------

class _Constant(_Simple):
    kind = "constant"

    def __init__(self, value):
        self._params = {"value": check_real(value, "value", low=0)}
        self._compile()

    def _emit(self, b):
        return b.node("const", fp=[self._params["value"]])


def constant(value):
    """``value`` at every step.

    Examples
    --------
    >>> from lrfast.schedules import constant
    >>> s = constant(0.1)
    >>> s(0), s(1_000_000)
    (0.1, 0.1)
    """
    return _Constant(value)


class _Exponential(_Simple):
    kind = "exponential_decay"

    def __init__(self, init_value, decay_rate, transition_steps=1, staircase=False,
                 transition_begin=0, end_value=None):
        p = {
            "init_value": check_real(init_value, "init_value", low=0),
            "decay_rate": check_real(decay_rate, "decay_rate", low=0, low_open=True),
            "transition_steps": check_count(transition_steps, "transition_steps"),
            "staircase": check_bool(staircase, "staircase"),
            "transition_begin": check_count(transition_begin, "transition_begin", low=0),
            "end_value": None if end_value is None else check_real(end_value, "end_value", low=0),
        }
        self._params = p
        self._compile()

    def _emit(self, b):
        p = self._params
        end = p["end_value"]
        return b.node("exponential",
                      ip=[p["transition_steps"], p["transition_begin"], p["staircase"],
                          end is not None],
                      fp=[p["init_value"], p["decay_rate"], 0.0 if end is None else end])


def exponential_decay(init_value, decay_rate, transition_steps=1, staircase=False,
                      transition_begin=0, end_value=None):
    r"""``init * rate^((t - begin) / T)`` (optax ``exponential_decay``; keras ``ExponentialDecay``).

    ``staircase`` floors the exponent; before ``transition_begin`` the value is ``init``;
    ``end_value`` bounds the result (a floor when decaying, a ceiling when ``rate > 1``).
    torch ``ExponentialLR(gamma)`` is ``exponential_decay(lr, gamma)``.

    Examples
    --------
    Halved at each step; with ``staircase``, halved every 10 steps:

    >>> from lrfast.schedules import exponential_decay
    >>> s = exponential_decay(1.0, 0.5)
    >>> [s(t) for t in (0, 1, 3)]
    [1.0, 0.5, 0.125]
    >>> s = exponential_decay(1.0, 0.5, transition_steps=10, staircase=True)
    >>> [s(t) for t in (0, 9, 10, 25)]
    [1.0, 1.0, 0.5, 0.25]

    ``end_value`` stops the decay:

    >>> s = exponential_decay(1.0, 0.5, end_value=0.2)
    >>> [s(t) for t in (1, 2, 3, 100)]
    [0.5, 0.25, 0.2, 0.2]
    """
    return _Exponential(init_value, decay_rate, transition_steps, staircase, transition_begin,
                        end_value)


def step_decay(init_value, gamma, step_size):
    """``init * gamma^floor(t / step_size)`` (torch ``StepLR``; the seeds' step decay with t
    counted from 0).

    Examples
    --------
    >>> from lrfast.schedules import step_decay
    >>> s = step_decay(0.1, 0.5, 10)
    >>> [s(t) for t in (0, 9, 10, 25)]
    [0.1, 0.1, 0.05, 0.025]
    """
    return _Exponential(init_value, gamma, step_size, staircase=True)


class _NaturalExp(_Simple):
    kind = "natural_exp_decay"

    def __init__(self, init_value, decay_rate):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "decay_rate": check_real(decay_rate, "decay_rate", low=0)}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("natural_exp", fp=[p["init_value"], p["decay_rate"]])


def natural_exp_decay(init_value, decay_rate):
    """``init * exp(-k t)``: the seeds' continuous exponential decay.

    Examples
    --------
    With ``k = 0.1``, step 10 is ``exp(-1)``:

    >>> import math
    >>> from lrfast.schedules import natural_exp_decay
    >>> s = natural_exp_decay(1.0, 0.1)
    >>> s(0)
    1.0
    >>> round(s(10), 6), round(math.exp(-1.0), 6)
    (0.367879, 0.367879)
    """
    return _NaturalExp(init_value, decay_rate)


class _InverseTime(_Simple):
    kind = "inverse_time_decay"

    def __init__(self, init_value, decay_rate, decay_steps=1, staircase=False):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "decay_rate": check_real(decay_rate, "decay_rate", low=0),
                        "decay_steps": check_count(decay_steps, "decay_steps"),
                        "staircase": check_bool(staircase, "staircase")}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("inverse_time", ip=[p["decay_steps"], 0, p["staircase"]],
                      fp=[p["init_value"], p["decay_rate"]])


def inverse_time_decay(init_value, decay_rate, decay_steps=1, staircase=False):
    """``init / (1 + k t / T)``, ``staircase`` floors ``t / T`` (keras ``InverseTimeDecay``).

    Examples
    --------
    >>> from lrfast.schedules import inverse_time_decay
    >>> s = inverse_time_decay(1.0, 1.0, decay_steps=10)
    >>> [s(t) for t in (0, 10, 30)]
    [1.0, 0.5, 0.25]
    >>> s = inverse_time_decay(1.0, 1.0, decay_steps=10, staircase=True)
    >>> [s(t) for t in (5, 10, 15)]
    [1.0, 0.5, 0.5]
    """
    return _InverseTime(init_value, decay_rate, decay_steps, staircase)


class _Polynomial(_Simple):
    kind = "polynomial_decay"

    def __init__(self, init_value, end_value, decay_steps, power=1.0, transition_begin=0,
                 cycle=False):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "end_value": check_real(end_value, "end_value", low=0),
                        "decay_steps": check_count(decay_steps, "decay_steps"),
                        "power": check_real(power, "power", low=0, low_open=True),
                        "transition_begin": check_count(transition_begin, "transition_begin",
                                                        low=0),
                        "cycle": check_bool(cycle, "cycle")}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("polynomial", ip=[p["decay_steps"], p["transition_begin"], p["cycle"]],
                      fp=[p["init_value"], p["end_value"], p["power"]])


def polynomial_decay(init_value, end_value, decay_steps, power=1.0, transition_begin=0,
                     cycle=False):
    """``(init - end) (1 - s/T)^power + end`` with ``s = clip(t - begin, 0, T)``: optax
    ``polynomial_schedule``, torch ``PolynomialLR`` (end 0). ``cycle=True`` is keras'
    ``PolynomialDecay(cycle=True)``: T becomes the next multiple of T at or above t.

    Examples
    --------
    A quadratic decay over 10 steps, then flat:

    >>> from lrfast.schedules import polynomial_decay
    >>> s = polynomial_decay(1.0, 0.0, 10, power=2.0)
    >>> [s(t) for t in (0, 5, 10, 20)]
    [1.0, 0.25, 0.0, 0.0]
    """
    return _Polynomial(init_value, end_value, decay_steps, power, transition_begin, cycle)


def linear(init_value, end_value, transition_steps, transition_begin=0):
    """From ``init_value`` to ``end_value`` in ``transition_steps``, then flat (optax
    ``linear_schedule``).

    Examples
    --------
    >>> from lrfast.schedules import linear
    >>> s = linear(0.0, 1.0, 4)
    >>> [s(t) for t in (0, 1, 2, 4, 100)]
    [0.0, 0.25, 0.5, 1.0, 1.0]
    """
    return _Polynomial(init_value, end_value, transition_steps, 1.0, transition_begin)


def linear_factor(base_lr, start_factor=1.0 / 3, end_factor=1.0, total_iters=5):
    """torch ``LinearLR``: ``base_lr`` times a factor going linearly from ``start_factor`` to
    ``end_factor`` over ``total_iters`` steps.

    Examples
    --------
    >>> from lrfast.schedules import linear_factor
    >>> s = linear_factor(1.0, start_factor=0.5, end_factor=1.0, total_iters=4)
    >>> [s(t) for t in (0, 2, 4, 10)]
    [0.5, 0.75, 1.0, 1.0]
    """
    check_real(start_factor, "start_factor", low=0, low_open=True, high=1.0)
    check_real(end_factor, "end_factor", low=0, high=1.0)
    return _Polynomial(base_lr * start_factor, base_lr * end_factor, total_iters, 1.0)


class _Cosine(_Simple):
    kind = "cosine_decay"

    def __init__(self, init_value, decay_steps, end_value=0.0, exponent=1.0, periodic=False):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "decay_steps": check_count(decay_steps, "decay_steps"),
                        "end_value": check_real(end_value, "end_value", low=0),
                        "exponent": check_real(exponent, "exponent", low=0, low_open=True),
                        "periodic": check_bool(periodic, "periodic")}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("cosine", ip=[p["decay_steps"], 0, p["periodic"]],
                      fp=[p["init_value"], p["end_value"], p["exponent"]])


def cosine_decay(init_value, decay_steps, alpha=0.0, exponent=1.0, end_value=None,
                 periodic=False):
    r"""``end + (init - end) ((1 + cos(pi t / T)) / 2)^exponent``, flat at ``end`` after T.

    ``end = alpha * init`` unless ``end_value`` is given (optax ``cosine_decay_schedule``, keras
    ``CosineDecay``). ``periodic=True`` continues the cosine past T instead of clamping, as
    torch ``CosineAnnealingLR(T_max=T, eta_min=end)`` does.

    Examples
    --------
    Step 25 is a quarter of the way: ``(1 + cos(pi / 4)) / 2``. The cosine is exact to about one
    unit in the last place, so the values are shown rounded:

    >>> from lrfast.schedules import cosine_decay
    >>> s = cosine_decay(1.0, 100)
    >>> [round(s(t), 6) for t in (0, 25, 50, 100, 200)]
    [1.0, 0.853553, 0.5, 0.0, 0.0]
    >>> s = cosine_decay(1.0, 100, alpha=0.1)
    >>> [round(s(t), 6) for t in (50, 100, 200)]
    [0.55, 0.1, 0.1]
    >>> s = cosine_decay(1.0, 100, periodic=True)
    >>> [round(s(t), 6) for t in (100, 150, 200)]
    [0.0, 0.5, 1.0]
    """
    alpha = check_real(alpha, "alpha", low=0, high=1.0)
    end = alpha * check_real(init_value, "init_value", low=0) if end_value is None else end_value
    return _Cosine(init_value, decay_steps, end, exponent, periodic)


class _CosineRestarts(_Simple):
    kind = "cosine_restarts"

    def __init__(self, init_value, first_period, period_mult=1.0, min_value=0.0, peak_decay=1.0):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "first_period": check_count(first_period, "first_period"),
                        "period_mult": check_real(period_mult, "period_mult", low=1.0),
                        "min_value": check_real(min_value, "min_value", low=0),
                        "peak_decay": check_real(peak_decay, "peak_decay", low=0, high=1.0)}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("cosine_restarts", ip=[p["first_period"]],
                      fp=[p["init_value"], p["min_value"], p["period_mult"], p["peak_decay"]])


def cosine_restarts(init_value, first_period, period_mult=1.0, min_value=0.0, peak_decay=1.0):
    """SGDR (Loshchilov and Hutter, 2017): cosine from the peak to ``min_value`` over periods of
    ``first_period * period_mult^k`` steps, the peak multiplied by ``peak_decay^k`` at restart k.

    torch ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` (peak_decay 1); keras
    ``CosineDecayRestarts(first_decay_steps, t_mul, m_mul, alpha)`` when alpha = 0 or m_mul = 1
    (keras shrinks only the part above its floor, ``alpha * init``, by ``m_mul^k``; here the
    peak itself is multiplied); timm ``CosineLRScheduler(cycle_mul, cycle_decay)``.

    Examples
    --------
    Periods of 10, 20, 40 steps (starting at steps 0, 10, 30), the peak halved at each restart:

    >>> from lrfast.schedules import cosine_restarts
    >>> s = cosine_restarts(1.0, 10, period_mult=2.0, peak_decay=0.5)
    >>> [round(s(t), 6) for t in (0, 5, 10, 20, 30)]
    [1.0, 0.5, 0.5, 0.25, 0.25]
    """
    return _CosineRestarts(init_value, first_period, period_mult, min_value, peak_decay)


class _OneCycle(_Simple):
    kind = "one_cycle"

    def __init__(self, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
                 div_factor=25.0, final_div_factor=1e4, three_phase=False):
        p = {"max_lr": check_real(max_lr, "max_lr", low=0),
             "total_steps": check_count(total_steps, "total_steps", low=2),
             "pct_start": check_real(pct_start, "pct_start", low=0, low_open=True, high=1.0),
             "anneal_strategy": check_choice(anneal_strategy, "anneal_strategy", ("cos", "linear")),
             "div_factor": check_real(div_factor, "div_factor", low=0, low_open=True),
             "final_div_factor": check_real(final_div_factor, "final_div_factor", low=0,
                                            low_open=True),
             "three_phase": check_bool(three_phase, "three_phase")}
        end1 = float(p["pct_start"] * p["total_steps"]) - 1
        end2 = float(2 * p["pct_start"] * p["total_steps"]) - 2
        if end1 <= 0:
            raise ValueError(f"pct_start * total_steps must be > 1 so that the first phase has a "
                             f"step, got {p['pct_start']} * {p['total_steps']}")
        last = p["total_steps"] - 1
        if (end2 if p["three_phase"] else end1) >= last or (p["three_phase"] and end2 <= end1):
            raise ValueError("pct_start is too large for total_steps: the last phase has no step")
        self._params = p
        self._compile()

    def _emit(self, b):
        p = self._params
        initial = p["max_lr"] / p["div_factor"]
        minimum = initial / p["final_div_factor"]
        end1 = float(p["pct_start"] * p["total_steps"]) - 1
        end2 = float(2 * p["pct_start"] * p["total_steps"]) - 2
        return b.node("one_cycle",
                      ip=[p["total_steps"], p["three_phase"], p["anneal_strategy"] == "cos"],
                      fp=[initial, p["max_lr"], minimum, end1, end2])


def one_cycle(max_lr, total_steps, pct_start=0.3, anneal_strategy="cos", div_factor=25.0,
              final_div_factor=1e4, three_phase=False):
    """torch ``OneCycleLR`` (Smith and Topin, 2018), same parameters and phase boundaries; steps
    from ``total_steps - 1`` on keep the final value (torch raises past ``total_steps``).

    Examples
    --------
    100 steps with torch's defaults: up from ``1.0 / 25`` to 1.0 at step ``0.3 * 100 - 1``, then
    down to ``1.0 / 25 / 1e4`` at step 99:

    >>> from lrfast.schedules import one_cycle
    >>> s = one_cycle(1.0, 100)
    >>> [round(s(t), 6) for t in (0, 29, 99, 500)]
    [0.04, 1.0, 4e-06, 4e-06]
    """
    return _OneCycle(max_lr, total_steps, pct_start, anneal_strategy, div_factor,
                     final_div_factor, three_phase)


class _Cyclic(_Simple):
    kind = "cyclic"

    def __init__(self, base_lr, max_lr, step_size_up=2000, step_size_down=None,
                 mode="triangular", gamma=1.0):
        self._params = {
            "base_lr": check_real(base_lr, "base_lr", low=0),
            "max_lr": check_real(max_lr, "max_lr", low=0),
            "step_size_up": check_count(step_size_up, "step_size_up"),
            "step_size_down": None if step_size_down is None else check_count(
                step_size_down, "step_size_down"),
            "mode": check_choice(mode, "mode", ("triangular", "triangular2", "exp_range")),
            "gamma": check_real(gamma, "gamma", low=0, low_open=True, high=1.0),
        }
        self._compile()

    def _emit(self, b):
        p = self._params
        down = p["step_size_up"] if p["step_size_down"] is None else p["step_size_down"]
        mode = ("triangular", "triangular2", "exp_range").index(p["mode"])
        return b.node("cyclic", ip=[p["step_size_up"], down, mode],
                      fp=[p["base_lr"], p["max_lr"], p["gamma"]])


def cyclic(base_lr, max_lr, step_size_up=2000, step_size_down=None, mode="triangular",
           gamma=1.0):
    """torch ``CyclicLR`` (Smith, 2017): triangular, triangular2 (amplitude halved each cycle)
    or exp_range (amplitude times ``gamma^t``).

    Examples
    --------
    >>> from lrfast.schedules import cyclic
    >>> s = cyclic(0.0, 1.0, step_size_up=4)
    >>> [s(t) for t in (0, 2, 4, 6, 8, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.5]
    >>> s = cyclic(0.0, 1.0, step_size_up=4, mode="triangular2")
    >>> [s(t) for t in (4, 12, 20)]
    [1.0, 0.5, 0.25]
    """
    return _Cyclic(base_lr, max_lr, step_size_up, step_size_down, mode, gamma)


class _PiecewiseConstant(_Simple):
    kind = "piecewise_constant"

    def __init__(self, boundaries, values, boundary="ge"):
        boundaries = check_increasing(list(boundaries), "boundaries")
        values = [check_real(v, f"values[{i}]", low=0) for i, v in enumerate(values)]
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"values must have one more entry than boundaries: got "
                             f"{len(values)} values for {len(boundaries)} boundaries")
        self._params = {"boundaries": boundaries, "values": values,
                        "boundary": check_choice(boundary, "boundary", ("ge", "gt"))}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("piecewise_constant",
                      ip=[b.ints(p["boundaries"]), b.floats(p["values"]), len(p["boundaries"]),
                          p["boundary"] == "gt"])


def piecewise_constant(boundaries, values, boundary="ge"):
    """``values[j]`` once ``j`` boundaries are passed. ``boundary='ge'`` switches at
    ``t >= b`` (torch, optax); ``'gt'`` at ``t > b`` (keras ``PiecewiseConstantDecay``).

    Examples
    --------
    >>> from lrfast.schedules import piecewise_constant
    >>> s = piecewise_constant([10, 20], [1.0, 0.5, 0.25])
    >>> [s(t) for t in (9, 10, 20)]
    [1.0, 0.5, 0.25]
    >>> s = piecewise_constant([10, 20], [1.0, 0.5, 0.25], boundary="gt")
    >>> [s(t) for t in (10, 11, 20, 21)]
    [1.0, 0.5, 0.5, 0.25]
    """
    return _PiecewiseConstant(boundaries, values, boundary)


def multistep(init_value, milestones, gamma=0.1):
    """torch ``MultiStepLR``: multiplied by ``gamma`` at each milestone (switch at t >= m).

    Examples
    --------
    >>> from lrfast.schedules import multistep
    >>> s = multistep(1.0, [10, 20], gamma=0.5)
    >>> [s(t) for t in (9, 10, 20)]
    [1.0, 0.5, 0.25]
    """
    milestones = check_increasing(list(milestones), "milestones")
    gamma = check_real(gamma, "gamma", low=0)
    values = [check_real(init_value, "init_value", low=0)]
    for _ in milestones:
        values.append(values[-1] * gamma)
    return _PiecewiseConstant(milestones, values)


class _PiecewiseInterpolate(_Simple):
    kind = "piecewise_interpolate"

    def __init__(self, boundaries, values, interpolation="linear"):
        boundaries = check_increasing(list(boundaries), "boundaries")
        values = [check_real(v, f"values[{i}]", low=0) for i, v in enumerate(values)]
        if len(values) != len(boundaries) or not values:
            raise ValueError(f"values and boundaries must have the same, non-zero length: got "
                             f"{len(values)} and {len(boundaries)}")
        self._params = {"boundaries": boundaries, "values": values,
                        "interpolation": check_choice(interpolation, "interpolation",
                                                      ("linear", "cosine"))}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("piecewise_interp",
                      ip=[b.ints(p["boundaries"]), b.floats(p["values"]), len(p["boundaries"]),
                          p["interpolation"] == "cosine"])


def piecewise_interpolate(boundaries, values, interpolation="linear"):
    """Through the points ``(boundaries[j], values[j])``, linearly or along a half cosine; flat
    before the first and after the last point.

    Examples
    --------
    >>> from lrfast.schedules import piecewise_interpolate
    >>> s = piecewise_interpolate([10, 20], [0.0, 1.0])
    >>> [s(t) for t in (0, 10, 15, 20, 30)]
    [0.0, 0.0, 0.5, 1.0, 1.0]
    >>> s = piecewise_interpolate([10, 20], [0.0, 1.0], interpolation="cosine")
    >>> round(s(15), 6)
    0.5
    """
    return _PiecewiseInterpolate(boundaries, values, interpolation)


def _onecycle_points(transition_steps, peak_value, pct_start, div_factor, final_div_factor,
                     pct_final=None):
    """optax's one-cycle points: (0, peak/div), (int(pct_start T), peak), optionally
    (int(pct_final T), peak/div), (T, peak/(div * final_div))."""
    transition_steps = check_count(transition_steps, "transition_steps", low=2)
    peak = check_real(peak_value, "peak_value", low=0)
    pct = check_real(pct_start, "pct_start", low=0, low_open=True, high=1.0)
    div = check_real(div_factor, "div_factor", low=0, low_open=True)
    final = check_real(final_div_factor, "final_div_factor", low=0, low_open=True)
    init = peak / div
    points = [0, int(pct * transition_steps)]
    values = [init, init * div]
    if pct_final is not None:
        pct_final = check_real(pct_final, "pct_final", low=0, low_open=True, high=1.0)
        points.append(int(pct_final * transition_steps))
        values.append(values[-1] / div)
    points.append(transition_steps)
    values.append(values[-1] / final if pct_final is not None else init * div / (div * final))
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"pct_start{'' if pct_final is None else ' < pct_final'} must split "
                         f"transition_steps={transition_steps} into non-empty phases")
    return points, values


def cosine_onecycle(transition_steps, peak_value, pct_start=0.3, div_factor=25.0,
                    final_div_factor=1e4):
    """optax ``cosine_onecycle_schedule``: up from ``peak/div`` to ``peak`` by step
    ``int(pct_start * T)``, then down to ``peak/(div*final_div)`` by step T, along half cosines.

    Examples
    --------
    Over 100 steps: 0.04 (``1.0 / 25``) at step 0, 1.0 at step 30, ``1.0 / 25 / 1e4`` at step 100:

    >>> from lrfast.schedules import cosine_onecycle
    >>> s = cosine_onecycle(100, 1.0)
    >>> [round(s(t), 6) for t in (0, 15, 30, 100)]
    [0.04, 0.52, 1.0, 4e-06]
    """
    b, v = _onecycle_points(transition_steps, peak_value, pct_start, div_factor,
                            final_div_factor)
    return _PiecewiseInterpolate(b, v, "cosine")


def linear_onecycle(transition_steps, peak_value, pct_start=0.3, pct_final=0.85,
                    div_factor=25.0, final_div_factor=1e4):
    """optax ``linear_onecycle_schedule``: straight lines from ``peak/div`` up to ``peak`` by step
    ``int(pct_start * T)``, back to ``peak/div`` by ``int(pct_final * T)``, then down to
    ``peak/(div*final_div)`` by step T.

    Examples
    --------
    Over 100 steps: 0.04 (``1.0 / 25``) at step 0, 1.0 at step 30, 0.04 again at step 85,
    ``0.04 / 1e4`` at step 100:

    >>> from lrfast.schedules import linear_onecycle
    >>> s = linear_onecycle(100, 1.0)
    >>> [s(t) for t in (0, 30, 85, 100)]
    [0.04, 1.0, 0.04, 4e-06]
    """
    b, v = _onecycle_points(transition_steps, peak_value, pct_start, div_factor,
                            final_div_factor, pct_final)
    return _PiecewiseInterpolate(b, v, "linear")


class _InverseSqrt(_Simple):
    kind = "inverse_sqrt"

    def __init__(self, init_value, timescale=1):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "timescale": check_count(timescale, "timescale")}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("inverse_sqrt", ip=[p["timescale"]], fp=[p["init_value"]])


def inverse_sqrt(init_value, timescale=1):
    """``init / sqrt(max(t, T) / T)``: flat until T, then proportional to 1/sqrt(t) (the
    Transformer's decay; put ``warmup`` in front for the fairseq form).

    Examples
    --------
    >>> from lrfast.schedules import inverse_sqrt
    >>> s = inverse_sqrt(1.0, timescale=4)
    >>> [s(t) for t in (0, 4, 16, 64)]
    [1.0, 1.0, 0.5, 0.25]
    """
    return _InverseSqrt(init_value, timescale)


class _SqrtDecay(_Simple):
    kind = "sqrt_decay"

    def __init__(self, init_value, end_value, decay_steps):
        self._params = {"init_value": check_real(init_value, "init_value", low=0),
                        "end_value": check_real(end_value, "end_value", low=0),
                        "decay_steps": check_count(decay_steps, "decay_steps")}
        self._compile()

    def _emit(self, b):
        p = self._params
        return b.node("sqrt_decay", ip=[p["decay_steps"]], fp=[p["init_value"], p["end_value"]])


# ------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------

class _Join(Schedule):
    kind = "join"

    def __init__(self, schedules, boundaries, local=True):
        schedules = [_schedule(f"schedules[{i}]", s) for i, s in enumerate(schedules)]
        if not schedules:
            raise ValueError("schedules must not be empty")
        boundaries = check_increasing(list(boundaries), "boundaries", low=1)
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(f"boundaries must have one entry fewer than schedules: got "
                             f"{len(boundaries)} for {len(schedules)} schedules")
        if isinstance(local, (bool, np.bool_)):
            local = [bool(local)] * len(schedules)
        local = [check_bool(f, f"local[{i}]") for i, f in enumerate(local)]
        if len(local) != len(schedules):
            raise ValueError("local must be a bool or one bool per schedule")
        self._params = {"schedules": schedules, "boundaries": boundaries, "local": local}
        self._compile()

    @classmethod
    def _from_params(cls, params):
        return cls([_from_json(s) for s in params["schedules"]], params["boundaries"],
                   params.get("local", True))

    def _emit(self, b):
        p = self._params
        kids = [s._emit(b) for s in p["schedules"]]
        at = b.ints(kids + p["boundaries"] + [int(f) for f in p["local"]])
        return b.node("join", ip=[at, len(kids)])


def join(schedules, boundaries, local=True):
    """``schedules[j]`` from ``boundaries[j-1]`` on. With ``local=True`` (optax
    ``join_schedules``) each piece sees the steps since its boundary; with ``False`` the global
    step. ``local`` may also be a list, one flag per piece.

    Examples
    --------
    1.0 for 5 steps, then a linear decay that starts at its own step 0 (``local=True``) or at
    the global step 5 (``local=False``):

    >>> from lrfast.schedules import constant, join, linear
    >>> s = join([constant(1.0), linear(1.0, 0.0, 10)], [5])
    >>> [s(t) for t in (4, 5, 10, 15)]
    [1.0, 1.0, 0.5, 0.0]
    >>> s = join([constant(1.0), linear(1.0, 0.0, 10)], [5], local=False)
    >>> [s(t) for t in (4, 5, 10)]
    [1.0, 0.5, 0.0]
    """
    return _Join(schedules, boundaries, local)


class _Product(Schedule):
    kind = "product"

    def __init__(self, a, b):
        self._params = {"a": _schedule("a", a), "b": _schedule("b", b)}
        self._compile()

    @classmethod
    def _from_params(cls, params):
        return cls(_from_json(params["a"]), _from_json(params["b"]))

    def _emit(self, b):
        ia = self._params["a"]._emit(b)
        ib = self._params["b"]._emit(b)
        return b.node("product", ip=[ia, ib])


def scale(schedule, factor):
    """``factor * schedule(t)``.

    Examples
    --------
    >>> from lrfast.schedules import constant, linear, scale
    >>> scale(constant(2.0), 0.25)(0)
    0.5
    >>> (0.25 * constant(2.0))(0)
    0.5

    ``*`` of two schedules multiplies their values:

    >>> s = linear(0.0, 1.0, 4) * constant(0.5)
    >>> [s(t) for t in (0, 2, 4)]
    [0.0, 0.25, 0.5]
    """
    return _Product(_schedule("schedule", schedule), constant(check_real(factor, "factor", low=0)))


class _Clamp(Schedule):
    kind = "clamp"

    def __init__(self, schedule, min_value=0.0, max_value=None):
        lo = check_real(min_value, "min_value", low=0)
        hi = None if max_value is None else check_real(max_value, "max_value", low=0)
        if hi is not None and hi < lo:
            raise ValueError(f"max_value must be >= min_value, got {hi} < {lo}")
        self._params = {"schedule": _schedule("schedule", schedule), "min_value": lo,
                        "max_value": hi}
        self._compile()

    @classmethod
    def _from_params(cls, params):
        return cls(_from_json(params["schedule"]), params["min_value"], params["max_value"])

    def _emit(self, b):
        p = self._params
        child = p["schedule"]._emit(b)
        hi = math.inf if p["max_value"] is None else p["max_value"]
        return b.node("clamp", ip=[child], fp=[p["min_value"], hi])


def clamp(schedule, min_value=0.0, max_value=None):
    """``schedule(t)`` limited to ``[min_value, max_value]`` (``max_value=None``: no ceiling).

    Examples
    --------
    >>> from lrfast.schedules import clamp, linear
    >>> s = clamp(linear(1.0, 0.0, 10), 0.2, 0.8)
    >>> [s(t) for t in (0, 5, 10)]
    [0.8, 0.5, 0.2]
    """
    return _Clamp(schedule, min_value, max_value)


class _Warmup(Schedule):
    kind = "warmup"

    def __init__(self, schedule, warmup_steps, start_value=0.0, overlap=False):
        self._params = {"schedule": _schedule("schedule", schedule),
                        "warmup_steps": check_count(warmup_steps, "warmup_steps"),
                        "start_value": check_real(start_value, "start_value", low=0),
                        "overlap": check_bool(overlap, "overlap")}
        self._compile()

    @classmethod
    def _from_params(cls, params):
        return cls(_from_json(params["schedule"]), params["warmup_steps"],
                   params.get("start_value", 0.0), params.get("overlap", False))

    def _emit(self, b):
        p = self._params
        inner, w = p["schedule"], p["warmup_steps"]
        target = inner(w) if p["overlap"] else inner(0)
        ramp = _Polynomial(p["start_value"], target, w)._emit(b)
        kid = inner._emit(b)
        at = b.ints([ramp, kid, w, 1, 0 if p["overlap"] else 1])
        return b.node("join", ip=[at, 2])


def warmup(schedule, warmup_steps, start_value=0.0, overlap=False):
    """A linear ramp from ``start_value`` (which may be non-zero) over ``warmup_steps`` steps.

    ``overlap=False``: the ramp is a prefix; it ends at ``schedule(0)`` and the schedule then
    runs from its own step 0 (``schedule(t - warmup_steps)``; timm's ``warmup_prefix=True``).
    ``overlap=True``: the ramp replaces the schedule's first steps; it ends at
    ``schedule(warmup_steps)``, so the curve is continuous, and the schedule keeps the global
    step. (timm's default ramps to the base rate instead and then jumps to the schedule:
    ``join([linear(start, base, W), s], [W], local=[True, False])``.)

    Examples
    --------
    >>> from lrfast.schedules import constant, cosine_decay, warmup
    >>> s = warmup(constant(1.0), 4)
    >>> [s(t) for t in (0, 2, 4, 100)]
    [0.0, 0.5, 1.0, 1.0]

    As a prefix, the cosine starts after the ramp and ends 10 steps later than on its own:

    >>> s = warmup(cosine_decay(1.0, 100), 10)
    >>> [round(s(t), 6) for t in (5, 10, 60, 110)]
    [0.5, 1.0, 0.5, 0.0]
    """
    return _Warmup(schedule, warmup_steps, start_value, overlap)


class _WarmupCosine(_Simple):
    kind = "warmup_cosine"

    def __init__(self, init_value, peak_value, warmup_steps, decay_steps, end_value=0.0,
                 exponent=1.0, decay_includes_warmup=True):
        p = {"init_value": check_real(init_value, "init_value", low=0),
             "peak_value": check_real(peak_value, "peak_value", low=0),
             "warmup_steps": check_count(warmup_steps, "warmup_steps", low=0),
             "decay_steps": check_count(decay_steps, "decay_steps"),
             "end_value": check_real(end_value, "end_value", low=0),
             "exponent": check_real(exponent, "exponent", low=0, low_open=True),
             "decay_includes_warmup": check_bool(decay_includes_warmup, "decay_includes_warmup")}
        if p["decay_includes_warmup"] and p["decay_steps"] <= p["warmup_steps"]:
            raise ValueError(f"warmup_steps ({p['warmup_steps']}) must be shorter than "
                             f"decay_steps ({p['decay_steps']}), which include the warmup")
        self._params = p
        self._compile()

    def _emit(self, b):
        p = self._params
        w = p["warmup_steps"]
        span = p["decay_steps"] - w if p["decay_includes_warmup"] else p["decay_steps"]
        cos = _Cosine(p["peak_value"], span, p["end_value"], p["exponent"])
        if w == 0:
            return cos._emit(b)
        ramp = _Polynomial(p["init_value"], p["peak_value"], w)._emit(b)
        kid = cos._emit(b)
        return b.node("join", ip=[b.ints([ramp, kid, w, 1, 1]), 2])


def warmup_cosine(init_value, peak_value, warmup_steps, decay_steps, end_value=0.0,
                  exponent=1.0, decay_includes_warmup=True):
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine to ``end_value``.

    ``decay_includes_warmup=True`` counts ``decay_steps`` from step 0, warmup included (optax
    ``warmup_cosine_decay_schedule``); ``False`` counts them after the warmup (keras
    ``CosineDecay(warmup_steps=...)``).

    Examples
    --------
    >>> from lrfast.schedules import warmup_cosine
    >>> s = warmup_cosine(0.0, 1.0, warmup_steps=10, decay_steps=110)
    >>> [round(s(t), 6) for t in (0, 5, 10, 60, 110)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    return _WarmupCosine(init_value, peak_value, warmup_steps, decay_steps, end_value, exponent,
                         decay_includes_warmup)


class _WSD(_Simple):
    kind = "wsd"

    def __init__(self, peak_value, warmup_steps, stable_steps, decay_steps, init_value=0.0,
                 end_value=0.0, decay_shape="linear"):
        self._params = {"peak_value": check_real(peak_value, "peak_value", low=0),
                        "warmup_steps": check_count(warmup_steps, "warmup_steps", low=0),
                        "stable_steps": check_count(stable_steps, "stable_steps", low=0),
                        "decay_steps": check_count(decay_steps, "decay_steps"),
                        "init_value": check_real(init_value, "init_value", low=0),
                        "end_value": check_real(end_value, "end_value", low=0),
                        "decay_shape": check_choice(decay_shape, "decay_shape",
                                                    ("linear", "cosine", "sqrt"))}
        self._compile()

    def _emit(self, b) -> int:
        p = self._params
        peak, end, n = p["peak_value"], p["end_value"], p["decay_steps"]
        decay = {"linear": lambda: _Polynomial(peak, end, n),
                 "cosine": lambda: _Cosine(peak, n, end),
                 "sqrt": lambda: _SqrtDecay(peak, end, n)}[p["decay_shape"]]()
        pieces: list[Schedule] = []
        bounds, at = [], 0
        if p["warmup_steps"]:
            pieces.append(_Polynomial(p["init_value"], peak, p["warmup_steps"]))
            at += p["warmup_steps"]
            bounds.append(at)
        if p["stable_steps"]:
            pieces.append(_Constant(peak))
            at += p["stable_steps"]
            bounds.append(at)
        pieces.append(decay)
        if len(pieces) == 1:
            return decay._emit(b)
        kids = [s._emit(b) for s in pieces]
        return b.node("join", ip=[b.ints(kids + bounds + [1] * len(kids)), len(kids)])


def wsd(peak_value, warmup_steps, stable_steps, decay_steps, init_value=0.0, end_value=0.0,
        decay_shape="linear"):
    """Warmup-stable-decay: linear warmup to ``peak_value``, ``stable_steps`` at the peak, then
    a ``decay_shape`` decay ('linear', 'cosine', or 'sqrt' = 1 - sqrt) to ``end_value``.

    Examples
    --------
    10 steps of warmup, 80 at the peak, a linear decay over the last 10:

    >>> from lrfast.schedules import wsd
    >>> s = wsd(1.0, 10, 80, 10)
    >>> [s(t) for t in (0, 5, 10, 89, 90, 95, 100)]
    [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    return _WSD(peak_value, warmup_steps, stable_steps, decay_steps, init_value, end_value,
                decay_shape)


# ------------------------------------------------------------------------------------------
# Plateau control: lrfast.plateau
# ------------------------------------------------------------------------------------------

# The controller and its composed schedule are defined in lrfast.plateau, which subclasses
# Schedule and so imports this module; importing them here, once everything above exists,
# keeps ``lrfast.schedules.ReduceLROnPlateau`` working, lets ``schedule * plateau`` and
# ``to_dict`` refer to them, and registers the "with_plateau" kind for ``from_dict``.
from .plateau import ReduceLROnPlateau, _WithPlateau  # noqa: E402
