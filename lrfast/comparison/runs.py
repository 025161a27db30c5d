"""One comparison run: a problem trained from one seed with one optimizer, schedule and rate.

What is varied, each from a short text a user can type:

* an optimizer: a name of lrfast's optimizer table (``"Adam"``), optionally with
  hyper-parameters other than the rate (``"SGD(momentum=0.9)"``; literal values only, read with
  :func:`ast.literal_eval`, never evaluated);
* a schedule: the shape of the rate over the problem's step budget, scaled by the rate being
  tried: one of :data:`SCHEDULES` (``"cosine"``; ``"plateau"`` is a constant rate under
  :class:`lrfast.ReduceLROnPlateau` driven by the evaluated loss), or any schedule expression of
  ``python -m lrfast plot`` (``"cosine_decay(1.0, 300)"``), whose values multiply the rate.

A run records the loss at every evaluation, the steps and seconds to the problem's target
(seconds: the optimizer steps and gradient computations only, not the evaluations), and whether
it diverged (schedule-free optimizers are evaluated at their average x, through their
``eval()`` and ``train()``, as their users evaluate them): a non-finite loss, or one above :data:`DIVERGENCE_FACTOR` times the starting loss,
ends the run there, counted as diverged, never raised.
"""
from __future__ import annotations

import ast
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .problems import PROBLEMS, Problem

__all__ = ["OptimizerChoice", "ScheduleChoice", "RunResult", "SCHEDULES", "parse_optimizer",
           "parse_schedule", "run"]

DIVERGENCE_FACTOR = 1e3


@dataclass(frozen=True)
class OptimizerChoice:
    """An optimizer of lrfast's table with its hyper-parameters (the rate aside)."""

    label: str
    name: str
    hyper: dict = field(default_factory=dict)


def _literal(node, text):
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"optimizer {text!r}: hyper-parameter values must be literals "
                         f"(numbers, booleans, None, tuples)") from None


def parse_optimizer(text: str) -> OptimizerChoice:
    """``"Adam"`` or ``"SGD(momentum=0.9, nesterov=True)"`` -> :class:`OptimizerChoice`,
    checked against the optimizer's spec (unknown names and bad values raise ValueError)."""
    from .._specs import OPTIMIZERS

    if not isinstance(text, str) or not text.strip():
        raise ValueError("an optimizer is a name such as 'Adam' or 'SGD(momentum=0.9)'")
    text = text.strip()
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"optimizer {text!r} is not a name or a call such as "
                         f"'SGD(momentum=0.9)'") from None
    if isinstance(node, ast.Name):
        name, hyper = node.id, {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args \
            and all(k.arg is not None for k in node.keywords):
        name = node.func.id
        hyper = {k.arg: _literal(k.value, text) for k in node.keywords}
    else:
        raise ValueError(f"optimizer {text!r}: give a name and keyword arguments only, "
                         f"such as 'SGD(momentum=0.9)'")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; lrfast has {', '.join(OPTIMIZERS)}")
    if "lr" in hyper:
        raise ValueError(f"optimizer {text!r}: the learning rate is the compared quantity; "
                         f"give rates with lrs=/--lrs instead")
    hyper = {k: list(v) if isinstance(v, list) else v for k, v in hyper.items()}
    try:
        OPTIMIZERS[name].validate({**hyper, "lr": 1e-3})
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer {text!r}: {e}") from None
    return OptimizerChoice(text, name, hyper)


def _warmup_cosine(lr, budget):
    from ..schedules import warmup_cosine

    # from lr / W rather than 0: some optimizers (Lion) refuse a zero rate
    warm = max(1, budget // 20)
    return warmup_cosine(lr / warm, lr, warm, budget)


def _cosine(lr, budget):
    from ..schedules import cosine_decay

    return cosine_decay(lr, budget)


def _constant(lr, budget):
    from ..schedules import constant

    return constant(lr)


def _step(lr, budget):
    from ..schedules import multistep

    return multistep(lr, [budget // 2, (3 * budget) // 4], 0.1)


def _linear(lr, budget):
    from ..schedules import linear

    return linear(lr, 0.0, budget)


def _inverse_sqrt(lr, budget):
    from ..schedules import inverse_sqrt

    return inverse_sqrt(lr, max(1, budget // 20))


#: Built-in schedule shapes: name -> (description, ``(lr, budget) -> schedule``).
SCHEDULES: dict[str, tuple[str, Callable]] = {
    "constant": ("the rate throughout", _constant),
    "cosine": ("cosine decay to 0 over the budget", _cosine),
    "warmup-cosine": ("linear warmup over 5% of the budget (W steps, from rate / W), then "
                      "cosine to 0", _warmup_cosine),
    "step": ("x0.1 at 50% and again at 75% of the budget", _step),
    "linear": ("linear decay to 0 over the budget", _linear),
    "inverse-sqrt": ("flat for 5% of the budget, then 1/sqrt(t)", _inverse_sqrt),
    "plateau": ("constant, halved after 5 evaluations without a 0.01% improvement "
                "(ReduceLROnPlateau on the evaluated loss)", _constant),
}
PLATEAU = dict(factor=0.5, patience=5, threshold=1e-4)


@dataclass(frozen=True)
class ScheduleChoice:
    """A schedule shape: built-in (``name`` in SCHEDULES) or a factor expression."""

    label: str
    expression: str = ""

    @property
    def plateau(self) -> bool:
        return self.label == "plateau"

    def build(self, lr: float, budget: int):
        """(schedule, plateau or None) for rate ``lr`` over ``budget`` steps."""
        from ..plateau import ReduceLROnPlateau

        if self.expression:
            from .._plot import parse_spec

            return parse_spec(self.expression) * lr, None
        schedule = SCHEDULES[self.label][1](lr, budget)
        if self.plateau:
            plateau = ReduceLROnPlateau(**PLATEAU)
            return schedule * plateau, plateau
        return schedule, None


def parse_schedule(text: str) -> ScheduleChoice:
    """A built-in shape's name, or a schedule expression (its values multiply the rate)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a schedule is one of {', '.join(SCHEDULES)} or a schedule "
                         f"expression such as 'cosine_decay(1.0, 500)'")
    text = text.strip()
    if text in SCHEDULES:
        return ScheduleChoice(text)
    from .._plot import SpecError, parse_spec

    try:
        parse_spec(text)
    except SpecError as e:
        raise ValueError(f"schedule {text!r} is neither one of {', '.join(SCHEDULES)} nor a "
                         f"schedule expression: {e}") from None
    return ScheduleChoice(text, expression=text)


@dataclass
class RunResult:
    """What one run measured. ``curve``: (step, loss) at step 0 and every evaluation.
    ``steps_to_target`` / ``seconds_to_target``: None when the target was not reached."""

    problem: str
    optimizer: str
    schedule: str
    lr: float
    seed: int
    reference: bool
    steps_to_target: Optional[int]
    seconds_to_target: Optional[float]
    final_loss: float
    best_loss: float
    diverged: bool
    steps_run: int
    seconds: float
    curve: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curve"] = [[s, _json_float(v)] for s, v in self.curve]
        for key in ("final_loss", "best_loss"):
            d[key] = _json_float(d[key])
        return d


def _json_float(v: float) -> Any:
    """JSON has no inf or NaN: those become strings."""
    return v if math.isfinite(v) else str(v)


def _lr_values(schedule, budget, reference):
    """The rate at steps 0..budget-1 (no plateau): from lrfast.reference's schedule code for a
    reference run, else from the compiled schedule."""
    steps = np.arange(budget)
    if reference:
        from ..reference import schedule_values

        return np.asarray(schedule_values(schedule.to_dict(), steps), dtype=np.float64)
    return np.asarray(schedule(steps), dtype=np.float64)


class _NumpyStepper:
    def __init__(self, choice, params, lr, reference):
        self.keys = list(params)
        if reference:
            from .._reference_run import ReferenceRun

            self.ref = ReferenceRun(choice.name, dict(choice.hyper, lr=lr),
                                    [params[k] for k in self.keys], copy=False)
            self.opt = None
        else:
            import lrfast

            self.opt = getattr(lrfast, choice.name)(params, lr=lr, **choice.hyper)

    def step(self, grads, lr):
        if self.opt is None:
            self.ref.step([grads[k] for k in self.keys], lr=lr)
        else:
            self.opt.lr = lr
            self.opt.step(grads)

    def _interpolate(self, to_eval: bool) -> None:
        """The reference's schedule-free eval() / train(): params to x and back to y."""
        from ..reference import schedule_free_interpolate_

        values = self.ref.values
        beta = float(values["beta1"] if "beta1" in values else values["momentum"])
        schedule_free_interpolate_(self.ref.params, self.ref.state["z"],
                                   1 - 1 / beta if to_eval else 1 - beta)

    def eval(self) -> None:
        """Schedule-free optimizers are evaluated at x, their average, as their users do."""
        if self.opt is None:
            if "z" in self.ref.state:
                self._interpolate(True)
        elif hasattr(self.opt, "eval"):
            self.opt.eval()

    def train(self) -> None:
        if self.opt is None:
            if "z" in self.ref.state:
                self._interpolate(False)
        elif hasattr(self.opt, "train"):
            self.opt.train()


class _TorchStepper:
    def __init__(self, choice, instance, lr, reference):
        import torch

        if reference:
            cls = getattr(torch.optim, choice.name, None)
            if cls is None:
                raise ValueError(f"torch.optim has no {choice.name}: the torch problem's "
                                 f"reference run needs torch.optim's class")
        else:
            import lrfast.torch

            cls = getattr(lrfast.torch, choice.name)
        self.instance = instance
        self.opt = cls(instance.params, lr=lr, **choice.hyper)
        self.train()  # lrfast.torch's schedule-free classes start in eval mode, as torch's

    def eval(self) -> None:
        if hasattr(self.opt, "eval"):  # schedule-free: evaluated at x
            self.opt.eval()

    def train(self) -> None:
        if hasattr(self.opt, "train"):
            self.opt.train()

    def step(self, step, lr):
        self.instance.backward(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()


def run(problem: str | Problem, optimizer: OptimizerChoice, schedule: ScheduleChoice,
        lr: float, seed: int, *, reference: bool = False) -> RunResult:
    """Train ``problem`` from ``seed`` for its budget; measure (see the module's docstring)."""
    prob = PROBLEMS[problem] if isinstance(problem, str) else problem
    inst = prob.make(seed)
    sched, plateau = schedule.build(lr, prob.budget)
    lrs = None if plateau is not None else _lr_values(sched, prob.budget, reference)
    torch_problem = prob.framework == "torch"
    first_lr = float(lrs[0]) if lrs is not None else float(sched(0))
    if torch_problem:
        stepper: Any = _TorchStepper(optimizer, inst, first_lr, reference)
    else:
        stepper = _NumpyStepper(optimizer, inst.params, first_lr, reference)

    loss0 = inst.loss()
    curve = [(0, loss0)]
    limit = DIVERGENCE_FACTOR * max(abs(loss0), 1e-300)
    steps_to = seconds_to = None
    best = loss0 if math.isfinite(loss0) else math.inf
    diverged = not math.isfinite(loss0)
    elapsed = 0.0
    t = 0
    with np.errstate(all="ignore"):
        while t < prob.budget and not diverged:
            lr_t = float(lrs[t]) if lrs is not None else float(sched(t))
            start = time.perf_counter()
            if torch_problem:
                stepper.step(t, lr_t)
            else:
                stepper.step(inst.grads(t), lr_t)
            elapsed += time.perf_counter() - start
            t += 1
            if t % prob.eval_every and t != prob.budget:
                continue
            stepper.eval()
            loss = inst.loss()
            stepper.train()
            curve.append((t, loss))
            if not math.isfinite(loss) or loss > limit:
                diverged = True
                break
            best = min(best, loss)
            if steps_to is None and loss <= prob.target:
                steps_to, seconds_to = t, elapsed
            if plateau is not None:
                plateau.step(loss)
    final = math.inf if diverged else curve[-1][1]
    return RunResult(prob.name, optimizer.label, schedule.label, float(lr), int(seed),
                     bool(reference), steps_to, seconds_to, float(final), float(best), diverged,
                     t, elapsed, curve)
