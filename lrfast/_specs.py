"""Each optimizer, described once: the table every layer reads.

An :class:`Update` is one element-wise rule as the kernels run it (``"adam"``): its
hyper-parameters with their defaults and checks (torch's messages), its state buffers and when
each is used, and whether it reads the step number. The order in which its values reach the
kernel is the kernel's own (``UPDATE_ARGS`` in src/_updates.pxi), read from the compiled module,
so the two cannot disagree.

An :class:`OptimizerSpec` is one user-facing optimizer over an update (``Adam`` and ``AdamW``
are both the ``"adam"`` update): which hyper-parameters it takes positionally, its own defaults,
the values it fixes (AdamW: ``decoupled=True``), pairs it takes as one argument (``betas``), and
what lrfast.torch needs to behave as the torch.optim class of the same name.

What reads this table:

- ``lrfast.optim``: each class validates its arguments, sizes its state and fills its kernel
  plan from its spec (the classes hold signatures and documentation only);
- ``lrfast.functional``: its functions are made from the updates (signature and checks);
- ``lrfast.torch``: its classes are made from the specs and torch's signatures;
- the tests (``tests/cases.py``: defaults, state and the reference calls) and the bench.

Adding an optimizer: an :class:`Update` and an :class:`OptimizerSpec` here, its element loop in
src/_updates.pxi, its function in ``lrfast.reference`` and its class in ``lrfast.optim``.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ._validation import (
    _real,
    check_beta,
    check_bool,
    check_lr,
    check_nonneg,
)

REQUIRED = inspect.Parameter.empty
_NAN = float("nan")
# Buffer.init for a buffer that starts as a copy of its param (schedule-free's z).
PARAM = "param"


# ------------------------------------------------------------------------------------------
# Checks, as small factories: each returns ``value -> validated value``
# ------------------------------------------------------------------------------------------

def nonneg(message: str) -> Callable[[Any], float]:
    """A finite float >= 0; ``message`` is torch's text (the value is appended)."""
    return lambda v: check_nonneg(v, message)


def unit(message: str) -> Callable[[Any], float]:
    """A float in [0, 1]."""
    def check(v):
        out = check_nonneg(v, message)
        if out > 1.0:
            raise ValueError(f"{message}: {v}")
        return out
    return check


def beta(index: int) -> Callable[[Any], float]:
    """A float in [0, 1), reported as torch's ``betas[index]``."""
    return lambda v: check_beta(v, index)


def flag(name: str) -> Callable[[Any], bool]:
    return lambda v: check_bool(v, name)


def real(name: str) -> Callable[[Any], float]:
    return lambda v: _real(v, name)


# ------------------------------------------------------------------------------------------
# The description of an update
# ------------------------------------------------------------------------------------------

def _no_rounding(x: float, fresh: bool = False) -> float:
    return float(x)


@dataclass(frozen=True)
class Hyper:
    """A hyper-parameter: name, default, check; ``functional=False`` for one that only sets
    initial state (the classes take it; the functions get the state itself)."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    functional: bool = True


@dataclass(frozen=True)
class Buffer:
    """A state buffer, named as torch names it, in the kernel's row order.

    ``used``: when the update reads it (None: always), and ``needs`` what makes it so, for the
    message of a missing buffer; ``init``: the hyper-parameter it starts at, a number, or
    ``PARAM``: a copy of its param (``initial_value`` is then 0; each layer copies the param)
    (zeros otherwise);
    ``arg``: its argument name in lrfast.functional when not ``name``; ``keyword``: that
    argument is keyword-only.
    """

    name: str
    used: Optional[Callable[[dict], bool]] = None
    needs: str = ""
    init: Any = ""  # a hyper-parameter's name, or a number
    arg: str = ""
    keyword: bool = False
    # The buffer's shape for a param of shape ``s`` (None: the param's own shape); a callable
    # that returns None says a param of that shape has no such buffer (Adafactor's factored
    # row_var/col_var for matrices, variance for vectors).
    shape: Optional[Callable[[tuple], Optional[tuple]]] = None
    # A per-param scalar (torch's 0-d tensor: NAdam's mu_product, ASGD's eta and mu) that the
    # Python layer keeps and advances; not a kernel row (see ``Update.scalar_state``).
    scalar: bool = False
    # With 8-bit state (``state_dtype="int8"``): "signed" or "unsigned", the map a moment of
    # either sign or a non-negative one is kept in (lrfast.quantization); "" keeps the buffer
    # in float32 (not a moment: Rprop's step sizes, ASGD's average of the params).
    quant: str = ""

    @property
    def kernel_row_name(self) -> str:
        """The element type name a plan gives this buffer's row when it is kept in 8 bits."""
        return {"signed": "int8s", "unsigned": "int8u"}[self.quant]

    @property
    def argname(self) -> str:
        return self.arg or self.name

    def shape_for(self, param_shape: tuple) -> Optional[tuple]:
        """The buffer's shape for a param of ``param_shape``; None: it has no such buffer."""
        return tuple(param_shape) if self.shape is None else self.shape(tuple(param_shape))

    def is_used(self, h: dict) -> bool:
        return self.used is None or bool(self.used(h))

    @property
    def starts_as_param(self) -> bool:
        return self.init == PARAM


@dataclass(frozen=True)
class Update:
    """One element-wise update as the kernels run it."""

    name: str
    hypers: tuple
    buffers: tuple
    takes_step: bool  # the kernel reads the 1-based step (functional takes ``step=``)
    rule: Optional[Callable[[dict], None]] = None  # a check across hyper-parameters
    title: str = ""
    # Names of the per-step values the kernel reads besides lr and the step, derived by the
    # Python layer from scalar state it keeps (the kernel's UPDATE_SCALARS, in its order).
    scalars: tuple = ()
    # The update scales each tensor by factors made from a reduction over it (LAMB's and LARS's
    # norms, ADOPT's cautious mask mean): the kernel's PASS_UPDATES. An optimizer over a
    # FlatParams then treats each named view as a tensor, not the whole buffer as one.
    per_tensor: bool = False
    # Per-param scalar state (``Buffer(..., scalar=True)``, named as torch names it), not in the
    # kernel's address table, and the rule that advances it: ``advance(h, step, lr, state,
    # rnd)`` with the validated hyper-parameters, the 1-based step, this step's lr and the
    # current values ({name: float}) returns (the kernel's per-step ``scalars``, the new
    # values); ``rnd(x, fresh=False)`` rounds a float to the state's element type (float32 or
    # float64), as a 0-d tensor of that type stores it (``fresh``: a value torch makes as a new
    # tensor of its default dtype before copying it into the state; only lrfast.torch rounds
    # those differently). Called only for a step that runs.
    scalar_state: tuple = ()
    advance: Optional[Callable[..., tuple]] = None

    def hyper(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise KeyError(name)

    @functools.cached_property
    def _known(self) -> frozenset:
        return frozenset(h.name for h in self.hypers)

    def validate(self, values: dict) -> dict:
        """Check every hyper-parameter (missing ones take their defaults); return the validated
        values in the spec's order. Unknown names are an error."""
        if not self._known.issuperset(values):
            unknown = sorted(set(values) - self._known)
            raise TypeError(f"{self.name}: unknown hyper-parameters {unknown}")
        out = {}
        for h in self.hypers:
            v = values.get(h.name, h.default)
            if v is REQUIRED:
                raise TypeError(f"{self.name}: missing hyper-parameter {h.name!r}")
            out[h.name] = h.check(v)
        if self.rule is not None:
            self.rule(out)
        return out

    def state_buffers(self, h: dict) -> tuple:
        """Names of the buffers the update uses under validated hyper-parameters ``h``."""
        return tuple(b.name for b in self.buffers if b.is_used(h))

    def scalar_names(self, h: dict) -> tuple:
        """Names of the scalar state the update keeps under validated hyper-parameters ``h``."""
        return tuple(b.name for b in self.scalar_state if b.is_used(h))

    def step_scalars(self, h: dict, step: int, lr: float, state: dict,
                     rnd: Optional[Callable[..., float]] = None) -> tuple:
        """(the kernel's per-step scalars, the new scalar state) for the step ``step`` (see
        ``advance``); ``((), {})`` for an update without scalar state."""
        if self.advance is None:
            return (), {}
        if rnd is None:
            rnd = _no_rounding
        return self.advance(h, step, lr, state, rnd)

    def initial_value(self, name: str, h: dict) -> float:
        for b in self.buffers + self.scalar_state:
            if b.name == name:
                if isinstance(b.init, str):
                    return h[b.init] if b.init and b.init != PARAM else 0.0
                return float(b.init)
        raise KeyError(name)

    def kernel_values(self, h: dict, kernels) -> list:
        """The hyper-parameters in the order the kernel takes them (booleans as 0/1; an
        optional one that is None, such as ADOPT's clip_exp, as NaN)."""
        return [_NAN if h[name] is None else float(h[name])
                for name in kernels.UPDATE_ARGS[self.name]]

    def missing_buffer_message(self, b: Buffer) -> str:
        noun = b.argname if b.argname.endswith("buffer") else f"{b.argname} buffer"
        return f"{b.needs} needs a {noun}"


# ------------------------------------------------------------------------------------------
# The description of an optimizer class (NumPy and torch)
# ------------------------------------------------------------------------------------------

# torch.optim's implementation switches, with torch's defaults. lrfast.torch accepts and stores
# them (state dicts keep torch's keys) and refuses the two that need torch's own update.
TORCH_FLAGS = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}
TORCH_REFUSED = ("capturable", "differentiable")


@dataclass(frozen=True)
class TorchSpec:
    """What lrfast.torch needs beyond the update to be the torch.optim class of its name.

    ``cls``: the torch.optim class whose signature lrfast.torch takes (None: the update has none
    in torch, and lrfast.torch makes a signature from the spec); ``step_state``: torch keeps
    ``state['step']``; ``state_at_init``: torch creates the state when params are added
    (Adagrad); ``renamed``: torch's name for an update hyper-parameter; ``group``: entries torch
    puts in every group whatever the arguments (AdamW's decoupled flag); ``older``: entries an
    older torch's state dict may lack, with the value torch's ``__setstate__`` gives them;
    ``tensor_rules``: torch's refusals of tensor lr/betas with ``foreach`` (Adam, AdamW);
    ``lrfast_only``: the class's arguments torch's class does not have (they keep their
    defaults in lrfast.torch); ``flags``: for a class torch.optim lacks (``cls`` None), the
    (name, default) pairs its reference implementation takes after the hyper-parameters, in
    its order (None: torch's implementation switches, ``TORCH_FLAGS``).
    """

    cls: Optional[str]
    step_state: bool = True
    state_at_init: bool = False
    renamed: dict = field(default_factory=dict)
    group: dict = field(default_factory=dict)
    older: dict = field(default_factory=dict)
    tensor_rules: bool = False
    lrfast_only: tuple = ()
    flags: Optional[tuple] = None


@dataclass(frozen=True)
class OptimizerSpec:
    """A user-facing optimizer over an update."""

    name: str
    update: Update
    positional: tuple  # class arguments (after params) that may be given by position
    defaults: dict = field(default_factory=dict)  # the class's own defaults
    fixed: dict = field(default_factory=dict)  # update hyper-parameters the class fixes
    pairs: dict = field(default_factory=dict)  # one argument for two hyper-parameters
    torch: Optional[TorchSpec] = None

    # -- the class's arguments --------------------------------------------------------------

    def _member_of(self, name: str) -> Optional[str]:
        for pair, members in self.pairs.items():
            if name in members:
                return pair
        return None

    @property
    def arguments(self) -> tuple:
        """The class's hyper-parameter arguments, in order (pairs in place of their members)."""
        out: list = []
        for h in self.update.hypers:
            if h.name in self.fixed:
                continue
            pair = self._member_of(h.name)
            name = pair or h.name
            if name not in out:
                out.append(name)
        return tuple(out)

    def default(self, name: str) -> Any:
        """The class's default for argument ``name``."""
        if name in self.defaults:
            return self.defaults[name]
        if name in self.pairs:
            return tuple(self.default(m) for m in self.pairs[name])
        return self.update.hyper(name).default

    @property
    def class_defaults(self) -> dict:
        return {name: self.default(name) for name in self.arguments}

    def signature(self, leading=("params",), trailing=()) -> inspect.Signature:
        """The class's signature: ``leading`` positional names, the arguments (positional as the
        spec says, the rest keyword-only), then ``trailing`` (name, default), keyword-only
        unless the spec lists the name as positional. An argument named in ``trailing`` moves
        there with its own default (lion-pytorch's decoupled_weight_decay follows a switch)."""
        P = inspect.Parameter

        def kind(name):
            return P.POSITIONAL_OR_KEYWORD if name in self.positional else P.KEYWORD_ONLY

        placed = {n for n, _ in trailing}
        params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in leading]
        params += [P(name, kind(name), default=self.default(name))
                   for name in self.arguments if name not in placed]
        params += [P(n, kind(n), default=self.default(n) if n in self.arguments else d)
                   for n, d in trailing]
        return inspect.Signature(params)

    def expand(self, values: dict) -> dict:
        """Class-level values -> the update's raw values (pairs split, fixed values added)."""
        out = dict(self.fixed)
        for name, v in values.items():
            if name in self.pairs:
                a, b = self.pairs[name]
                if not isinstance(v, (tuple, list)) or len(v) != 2:
                    raise ValueError(f"{name} must be a pair ({a}, {b}), got {v!r}")
                out[a], out[b] = v
            else:
                out[name] = v
        return out

    def collapse(self, h: dict) -> dict:
        """The update's validated values -> the class-level dict (what ``hyperparams`` shows)."""
        out: dict = {}
        for name in self.arguments:
            if name in self.pairs:
                out[name] = tuple(h[m] for m in self.pairs[name])
            else:
                out[name] = h[name]
        return out

    def validate(self, values: dict) -> dict:
        """Validate class-level values (defaults filled in); return the update-level dict."""
        full = {**self.class_defaults, **values}
        return self.update.validate(self.expand(full))


# ------------------------------------------------------------------------------------------
# The updates
# ------------------------------------------------------------------------------------------

def _lr(default):
    return Hyper("lr", default, check_lr)


def _weight_decay(default=0.0):
    return Hyper("weight_decay", default, nonneg("Invalid weight_decay value"))


def _maximize():
    return Hyper("maximize", False, flag("maximize"))


def _eps(default):
    return Hyper("eps", default, nonneg("Invalid epsilon value"))


def _momentum():
    return Hyper("momentum", 0.0, nonneg("Invalid momentum value"))


def _nesterov_rule(h):
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


SGD_UPDATE = Update(
    "sgd",
    hypers=(
        _lr(1e-3),
        _momentum(),
        Hyper("dampening", 0.0, real("dampening")),
        _weight_decay(),
        Hyper("nesterov", False, flag("nesterov")),
        _maximize(),
    ),
    buffers=(Buffer("momentum_buffer", lambda h: h["momentum"] != 0, "momentum != 0",
                     quant="signed"),),
    takes_step=True,  # only whether it is the first: the buffer starts as the first gradient
    rule=_nesterov_rule,
    title="SGD",
)

ADAGRAD_UPDATE = Update(
    "adagrad",
    hypers=(
        _lr(1e-2),
        Hyper("lr_decay", 0.0, nonneg("Invalid lr_decay value")),
        _weight_decay(),
        Hyper("initial_accumulator_value", 0.0,
              nonneg("Invalid initial_accumulator_value value"), functional=False),
        _eps(1e-10),
        Hyper("eps_inside_sqrt", False, flag("eps_inside_sqrt")),
        _maximize(),
    ),
    buffers=(Buffer("sum", init="initial_accumulator_value", arg="state_sum", quant="unsigned"),),
    takes_step=True,
    title="Adagrad",
)

RMSPROP_UPDATE = Update(
    "rmsprop",
    hypers=(
        _lr(1e-2),
        Hyper("alpha", 0.99, unit("Invalid alpha value")),
        _eps(1e-8),
        _weight_decay(),
        _momentum(),
        Hyper("centered", False, flag("centered")),
        _maximize(),
    ),
    buffers=(
        Buffer("square_avg", quant="unsigned"),
        Buffer("momentum_buffer", lambda h: h["momentum"] > 0, "momentum > 0", quant="signed"),
        Buffer("grad_avg", lambda h: h["centered"], "centered=True", quant="signed"),
    ),
    takes_step=False,
    title="RMSprop",
)

ADAM_UPDATE = Update(
    "adam",
    hypers=(
        _lr(1e-3),
        Hyper("beta1", 0.9, beta(0)),
        Hyper("beta2", 0.999, beta(1)),
        _eps(1e-8),
        _weight_decay(),
        Hyper("decoupled", False, flag("decoupled")),
        Hyper("amsgrad", False, flag("amsgrad")),
        _maximize(),
    ),
    buffers=(
        Buffer("exp_avg", quant="signed"),
        Buffer("exp_avg_sq", quant="unsigned"),
        Buffer("max_exp_avg_sq", lambda h: h["amsgrad"], "amsgrad=True", keyword=True, quant="unsigned"),
    ),
    takes_step=True,
    title="Adam (AdamW with decoupled=True)",
)

UPDATES = {u.name: u for u in (SGD_UPDATE, ADAGRAD_UPDATE, RMSPROP_UPDATE, ADAM_UPDATE)}


# ------------------------------------------------------------------------------------------
# The optimizers
# ------------------------------------------------------------------------------------------

_ADAM_TM_TORCH_OLDER = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                         differentiable=False, decoupled_weight_decay=False, fused=None)

OPTIMIZERS = {
    "SGD": OptimizerSpec(
        "SGD", SGD_UPDATE,
        positional=("lr", "momentum", "dampening", "weight_decay", "nesterov"),
        torch=TorchSpec("SGD", step_state=False,
                        older=dict(nesterov=False, maximize=False, foreach=None,
                                   differentiable=False, fused=False)),
    ),
    "Adagrad": OptimizerSpec(
        "Adagrad", ADAGRAD_UPDATE,
        positional=("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
        torch=TorchSpec("Adagrad", state_at_init=True, lrfast_only=("eps_inside_sqrt",),
                        older=dict(foreach=None, maximize=False, differentiable=False,
                                   fused=None)),
    ),
    "RMSprop": OptimizerSpec(
        "RMSprop", RMSPROP_UPDATE,
        positional=("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
        torch=TorchSpec("RMSprop",
                        older=dict(momentum=0, centered=False, foreach=None, maximize=False,
                                   differentiable=False, capturable=False)),
    ),
    "Adam": OptimizerSpec(
        "Adam", ADAM_UPDATE,
        positional=("lr", "betas", "eps", "weight_decay", "amsgrad"),
        fixed={"decoupled": False},
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec("Adam", renamed={"decoupled_weight_decay": "decoupled"},
                        older=_ADAM_TM_TORCH_OLDER, tensor_rules=True),
    ),
    "AdamW": OptimizerSpec(
        "AdamW", ADAM_UPDATE,
        positional=("lr", "betas", "eps", "weight_decay", "amsgrad"),
        defaults={"weight_decay": 1e-2},
        fixed={"decoupled": True},
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec("AdamW", group={"decoupled_weight_decay": True},
                        older=_ADAM_TM_TORCH_OLDER, tensor_rules=True),
    ),
}


def _add(*specs: OptimizerSpec) -> None:
    """Add optimizers (and their updates) to the tables, in the order given."""
    for spec in specs:
        if UPDATES.setdefault(spec.update.name, spec.update) is not spec.update:
            raise ValueError(f"two updates named {spec.update.name!r}")
        if spec.name in OPTIMIZERS:
            raise ValueError(f"two optimizers named {spec.name!r}")
        OPTIMIZERS[spec.name] = spec


# ------------------------------------------------------------------------------------------
# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop
# ------------------------------------------------------------------------------------------

_TM_TORCH_OLDER = dict(foreach=None, maximize=False, differentiable=False, capturable=False)


def _rprop_lr(value):
    """Rprop's lr: a number (>= 0) that only starts the step sizes."""
    if callable(value):
        raise TypeError("Rprop's lr only sets the initial step sizes (state 'step_size'), which "
                        "then adapt by the etas whatever the lr: give it as a number, not a "
                        "schedule")
    return check_lr(value)


def _rprop_rule(h):
    if not 0.0 < h["etaminus"] < 1.0 < h["etaplus"]:
        raise ValueError(f"Invalid eta values: {h['etaminus']}, {h['etaplus']}")
    lo, hi = h["step_size_min"], h["step_size_max"]
    # (torch does not check them; lrfast refuses the pairs that make no step size sense)
    if not 0.0 <= lo <= hi:
        raise ValueError(f"Invalid step_sizes values: {lo}, {hi} (need 0 <= step_size_min <= "
                         "step_size_max)")


ADAMAX_UPDATE = Update(
    "adamax",
    hypers=(
        _lr(2e-3),
        Hyper("beta1", 0.9, beta(0)),
        Hyper("beta2", 0.999, beta(1)),
        _eps(1e-8),
        _weight_decay(),
        _maximize(),
    ),
    buffers=(Buffer("exp_avg", quant="signed"), Buffer("exp_inf", quant="unsigned")),
    takes_step=True,
    title="Adamax",
)

RADAM_UPDATE = Update(
    "radam",
    hypers=(
        _lr(1e-3),
        Hyper("beta1", 0.9, beta(0)),
        Hyper("beta2", 0.999, beta(1)),
        _eps(1e-8),
        _weight_decay(),
        Hyper("decoupled_weight_decay", False, flag("decoupled_weight_decay")),
        _maximize(),
    ),
    buffers=(Buffer("exp_avg", quant="signed"), Buffer("exp_avg_sq", quant="unsigned")),
    takes_step=True,
    title="RAdam",
)

ADADELTA_UPDATE = Update(
    "adadelta",
    hypers=(
        _lr(1.0),
        Hyper("rho", 0.9, unit("Invalid rho value")),
        _eps(1e-6),
        _weight_decay(),
        _maximize(),
    ),
    buffers=(Buffer("square_avg", quant="unsigned"), Buffer("acc_delta", quant="unsigned")),
    takes_step=False,  # torch counts steps in the state but the update does not read them
    title="Adadelta",
)

RPROP_UPDATE = Update(
    "rprop",
    hypers=(
        # lr only starts the step sizes: the functions take the step_size buffer instead
        Hyper("lr", 1e-2, _rprop_lr, functional=False),
        Hyper("etaminus", 0.5, real("etaminus")),
        Hyper("etaplus", 1.2, real("etaplus")),
        Hyper("step_size_min", 1e-6, real("step_size_min")),
        Hyper("step_size_max", 50.0, real("step_size_max")),
        _maximize(),
    ),
    buffers=(Buffer("prev"), Buffer("step_size", init="lr")),
    takes_step=False,
    rule=_rprop_rule,
    title="Rprop",
)

_add(
    OptimizerSpec(
        "Adamax", ADAMAX_UPDATE,
        positional=("lr", "betas", "eps", "weight_decay"),
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec("Adamax", older=_TM_TORCH_OLDER),
    ),
    OptimizerSpec(
        "RAdam", RADAM_UPDATE,
        positional=("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec("RAdam", older=dict(_TM_TORCH_OLDER, decoupled_weight_decay=False)),
    ),
    OptimizerSpec(
        "Adadelta", ADADELTA_UPDATE,
        positional=("lr", "rho", "eps", "weight_decay"),
        torch=TorchSpec("Adadelta", older=_TM_TORCH_OLDER),
    ),
    OptimizerSpec(
        "Rprop", RPROP_UPDATE,
        positional=("lr", "etas", "step_sizes"),
        pairs={"etas": ("etaminus", "etaplus"), "step_sizes": ("step_size_min", "step_size_max")},
        torch=TorchSpec("Rprop", older=_TM_TORCH_OLDER),
    ),
)


# ------------------------------------------------------------------------------------------
# Updates with per-step scalar state: NAdam (mu_product), ASGD (eta, mu)
# ------------------------------------------------------------------------------------------

def _nadam_advance(h, step, lr, state, rnd):
    # torch: mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) in Python floats, then ``mu_product *= mu_t``
    # on the 0-d tensor (the product of two values of its type, rounded to it). The kernel
    # reads the new product; mu_{t+1} and the next product are formed in double in _prepare.
    mu = h["beta1"] * (1.0 - 0.5 * (0.96 ** (step * h["momentum_decay"])))
    product = rnd(state["mu_product"] * rnd(mu))
    return (product,), {"mu_product": product}


NADAM_UPDATE = Update(
    "nadam",
    hypers=(
        _lr(2e-3),
        Hyper("beta1", 0.9, beta(0)),
        Hyper("beta2", 0.999, beta(1)),
        _eps(1e-8),
        _weight_decay(),
        Hyper("momentum_decay", 4e-3, nonneg("Invalid momentum_decay value")),
        Hyper("decoupled_weight_decay", False, flag("decoupled_weight_decay")),
        _maximize(),
    ),
    buffers=(Buffer("exp_avg", quant="signed"), Buffer("exp_avg_sq", quant="unsigned")),
    takes_step=True,
    title="NAdam",
    scalars=("mu_product",),
    scalar_state=(Buffer("mu_product", init=1.0, scalar=True),),
    advance=_nadam_advance,
)


def _asgd_advance(h, step, lr, state, rnd):
    # torch's update reads eta and mu as they are, then sets the next ones from this step's
    # number and lr: eta = lr / (1 + lambd lr t)^alpha, mu = 1 / max(1, t - t0).
    # (torch makes each as a tensor of the default dtype and copies it into the state: fresh)
    eta = rnd(lr / ((1 + h["lambd"] * lr * step) ** h["alpha"]), True)
    mu = rnd(1 / max(1, step - h["t0"]), True)
    return (state["eta"], state["mu"]), {"eta": eta, "mu": mu}


ASGD_UPDATE = Update(
    "asgd",
    hypers=(
        _lr(1e-2),
        Hyper("lambd", 1e-4, real("lambd")),
        Hyper("alpha", 0.75, real("alpha")),
        Hyper("t0", 1e6, real("t0")),
        _weight_decay(),
        _maximize(),
    ),
    buffers=(Buffer("ax"),),
    takes_step=True,
    title="ASGD",
    scalars=("eta", "mu"),
    scalar_state=(Buffer("eta", init="lr", scalar=True), Buffer("mu", init=1.0, scalar=True)),
    advance=_asgd_advance,
)

_add(
    OptimizerSpec(
        "NAdam", NADAM_UPDATE,
        positional=("lr", "betas", "eps", "weight_decay", "momentum_decay",
                    "decoupled_weight_decay"),
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec("NAdam", older=dict(maximize=False, foreach=None, capturable=False,
                                            differentiable=False,
                                            decoupled_weight_decay=False)),
    ),
    OptimizerSpec(
        "ASGD", ASGD_UPDATE,
        positional=("lr", "lambd", "alpha", "t0", "weight_decay"),
        torch=TorchSpec("ASGD", older=dict(foreach=None, maximize=False, differentiable=False,
                                           capturable=False)),
    ),
)


# ------------------------------------------------------------------------------------------
# Updates from outside torch.optim: Lion, ADOPT
# ------------------------------------------------------------------------------------------

def _positive_lr(v):
    """Lion's lr: a float > 0 (lion-pytorch asserts it), or a schedule (the NumPy class)."""
    if callable(v):
        return v
    out = _real(v, "learning rate")
    if not 0.0 < out < float("inf"):
        raise ValueError(f"Invalid learning rate: {v} (Lion needs lr > 0)")
    return out


def _closed_beta(index: int) -> Callable[[Any], float]:
    """A float in [0, 1] (lion-pytorch allows beta = 1), reported as ``betas[index]``."""
    def check(v):
        out = _real(v, f"beta at index {index}")
        if not 0.0 <= out <= 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {v}")
        return out
    return check


def _optional_real(name: str, positive: bool = False) -> Callable[[Any], Optional[float]]:
    """None, or a finite float (> 0 with ``positive``)."""
    def check(v):
        if v is None:
            return None
        out = _real(v, name)
        if not (abs(out) < float("inf")) or (positive and not out > 0):
            raise ValueError(f"Invalid {name} value: {v}")
        return out
    return check


def _adopt_rule(h):
    if h["corrected_weight_decay"] and h["max_lr"] is not None and h["max_lr"] <= 0:
        raise ValueError(f"Corrected weight decay requires a positive max lr, got {h['max_lr']}. "
                         "Construct the optimizer with the peak lr.")


LION_UPDATE = Update(
    "lion",
    hypers=(
        Hyper("lr", 1e-4, _positive_lr),
        Hyper("beta1", 0.9, _closed_beta(0)),
        Hyper("beta2", 0.99, _closed_beta(1)),
        _weight_decay(),
        Hyper("decoupled_weight_decay", False, flag("decoupled_weight_decay")),
        # The lr that decoupled decay is divided by (lion-pytorch: the constructor's lr);
        # None: the step's own lr, so the decay per step is weight_decay.
        Hyper("init_lr", None, _optional_real("init_lr", positive=True)),
    ),
    buffers=(Buffer("exp_avg", quant="signed"),),
    takes_step=False,
    title="Lion",
)

ADOPT_UPDATE = Update(
    "adopt",
    hypers=(
        _lr(1e-3),
        Hyper("beta1", 0.9, beta(0)),
        Hyper("beta2", 0.9999, beta(1)),
        _eps(1e-6),
        Hyper("clip_exp", 0.333, _optional_real("clip_exp")),
        _weight_decay(),
        Hyper("decoupled", False, flag("decoupled")),
        Hyper("corrected_weight_decay", False, flag("corrected_weight_decay")),
        # caution's mask is scaled by its mean over each tensor: the kernel's second pass
        Hyper("caution", False, flag("caution")),
        _maximize(),
        # corrected_weight_decay's peak lr (timm: the constructor's lr); None: the step's lr.
        Hyper("max_lr", None, _optional_real("max_lr")),
    ),
    buffers=(Buffer("exp_avg", quant="signed"), Buffer("exp_avg_sq", quant="unsigned")),
    takes_step=True,  # the first step only fills exp_avg_sq; later ones clip by step**clip_exp
    rule=_adopt_rule,
    title="ADOPT",
    per_tensor=True,  # (caution's per-tensor mean)
)

_add(
    OptimizerSpec(
        "Lion", LION_UPDATE,
        positional=("lr", "betas", "weight_decay", "use_triton", "decoupled_weight_decay"),
        fixed={"init_lr": None},
        pairs={"betas": ("beta1", "beta2")},
        # lion-pytorch keeps no step; its switches sit between weight_decay and
        # decoupled_weight_decay, which (an argument placed among the flags) keeps its place.
        torch=TorchSpec(None, step_state=False,
                        flags=(("use_triton", False), ("decoupled_weight_decay", False))),
    ),
    OptimizerSpec(
        "Adopt", ADOPT_UPDATE,
        positional=("lr", "betas", "eps", "clip_exp", "weight_decay", "decoupled",
                    "corrected_weight_decay"),
        fixed={"max_lr": None},
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec(None, older=dict(maximize=False, foreach=None, capturable=False,
                                         differentiable=False, clip_exp=None, caution=False,
                                         corrected_weight_decay=False),
                        # timm's order: maximize (an argument) between foreach and capturable
                        flags=(("foreach", None), ("maximize", False), ("capturable", False),
                               ("differentiable", False))),
    ),
)


# ------------------------------------------------------------------------------------------
# Per-tensor trust ratios: LAMB, LARS
# ------------------------------------------------------------------------------------------

# timm's Lamb and Lars (timm.optim.lamb, timm.optim.lars). Both scale each tensor's step by a
# trust ratio made from per-tensor norms, so the kernels run them in passes (src/
# _updates_trust.pxi) and an optimizer over a FlatParams treats each named view as its own
# tensor (``Update.per_tensor``).

def _optional_positive(name: str) -> Callable[[Any], Optional[float]]:
    """None, or a finite float > 0."""
    def check(v):
        if v is None:
            return None
        out = _real(v, name)
        if not (0.0 < out < float("inf")):
            raise ValueError(f"Invalid {name} value: {v}")
        return out
    return check


LAMB_UPDATE = Update(
    "lamb",
    hypers=(
        _lr(1e-3),
        Hyper("bias_correction", True, flag("bias_correction")),
        Hyper("beta1", 0.9, beta(0)),
        Hyper("beta2", 0.999, beta(1)),
        Hyper("eps", 1e-6, nonneg("Invalid epsilon")),
        Hyper("weight_decay", 0.01, nonneg("Invalid weight_decay")),
        Hyper("grad_averaging", True, flag("grad_averaging")),
        Hyper("max_grad_norm", 1.0, _optional_positive("max_grad_norm")),
        Hyper("trust_clip", False, flag("trust_clip")),
        Hyper("always_adapt", False, flag("always_adapt")),
        Hyper("caution", False, flag("caution")),
        Hyper("decoupled_decay", False, flag("decoupled_decay")),
        Hyper("corrected_weight_decay", False, flag("corrected_weight_decay")),
        # The peak lr of corrected_weight_decay (the decoupled decay is scaled by lr ** 2 /
        # max_lr; None: by lr, as timm's functional lamb): the classes take the lr they are
        # made with (timm's max_lr_snapshot).
        Hyper("max_lr", None, _optional_positive("max_lr")),
    ),
    buffers=(Buffer("exp_avg", quant="signed"), Buffer("exp_avg_sq", quant="unsigned")),
    takes_step=True,
    title="LAMB",
    per_tensor=True,
)

LARS_UPDATE = Update(
    "lars",
    hypers=(
        _lr(1.0),
        _momentum(),
        Hyper("dampening", 0.0, real("dampening")),
        Hyper("weight_decay", 0.0, nonneg("Invalid weight_decay value")),
        Hyper("nesterov", False, flag("nesterov")),
        Hyper("trust_coeff", 0.001, nonneg("Invalid trust_coeff value")),
        _eps(1e-8),
        Hyper("trust_clip", False, flag("trust_clip")),
        Hyper("always_adapt", False, flag("always_adapt")),
    ),
    buffers=(Buffer("momentum_buffer", lambda h: h["momentum"] != 0, "momentum != 0",
                     quant="signed"),),
    takes_step=True,  # only whether it is the first: the buffer starts as the first gradient
    rule=_nesterov_rule,
    title="LARS",
    per_tensor=True,
)

_add(
    OptimizerSpec(
        "Lamb", LAMB_UPDATE,
        positional=("lr", "bias_correction", "betas", "eps", "weight_decay", "grad_averaging",
                    "max_grad_norm", "trust_clip", "always_adapt", "caution",
                    "decoupled_decay", "corrected_weight_decay", "foreach"),
        fixed={"max_lr": None},
        pairs={"betas": ("beta1", "beta2")},
        # timm's foreach follows the hyper-parameters, positional as they are
        torch=TorchSpec(None, step_state=False, flags=(("foreach", None),)),
    ),
    OptimizerSpec(
        "Lars", LARS_UPDATE,
        positional=("lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coeff",
                    "eps", "trust_clip", "always_adapt", "foreach"),
        torch=TorchSpec(None, step_state=False, flags=(("foreach", None),)),
    ),
)


# ------------------------------------------------------------------------------------------
# Factored second moments: Adafactor
# ------------------------------------------------------------------------------------------

def _at_least(bound: float, message: str, below: bool = False) -> Callable[[Any], float]:
    """A finite float >= ``bound`` (<= with ``below``), torch's Adafactor message (the value
    appended after "but is: "; torch also takes infinities, lrfast refuses them as for every
    optimizer)."""
    def check(v):
        out = _real(v, message.split(" should")[0])
        if not (out <= bound if below else out >= bound):
            raise ValueError(f"{message} but is: {v}")
        if math.isinf(out):
            raise ValueError(f"{message} and finite but is: {v}")
        return out
    return check


def _eps1(v):
    """Adafactor's epsilon1: None (the params' machine epsilon) or a float >= 0."""
    return None if v is None else _at_least(0.0, "epsilon1 should be >= 0")(v)


def _factored_shape(kind: str) -> Callable[[tuple], Optional[tuple]]:
    """The shape of Adafactor's buffer ``kind`` for a param of shape ``s`` (None: the param
    has no such buffer): row_var (..., R, 1) and col_var (..., 1, C) for two or more
    dimensions, variance (the param's shape) for fewer, as torch's."""
    def shape(s):
        s = tuple(s)
        if kind == "variance":
            return s if len(s) < 2 else None
        if len(s) < 2:
            return None
        return s[:-1] + (1,) if kind == "row_var" else s[:-2] + (1, s[-1])
    return shape


ADAFACTOR_UPDATE = Update(
    "adafactor",
    hypers=(
        Hyper("lr", 1e-2, lambda v: v if callable(v) else
              _at_least(0.0, "Learning rate should be >= 0")(v)),
        Hyper("beta2_decay", -0.8, _at_least(0.0, "beta2_decay should be <= 0", below=True)),
        Hyper("eps1", None, _eps1),
        Hyper("eps2", 1e-3, _at_least(0.0, "epsilon2 should be >= 0")),
        Hyper("d", 1.0, _at_least(1.0, "Clipping threshold d should be >= 1")),
        Hyper("weight_decay", 0.0, _at_least(0.0, "weight_decay should be >= 0")),
        _maximize(),
    ),
    # Which buffers a param has depends on its number of dimensions, not on the
    # hyper-parameters: each is passed (None where the param has none), as torch's functional
    # adafactor takes them; ``Buffer.shape`` gives each one's shape.
    buffers=(
        Buffer("row_var", shape=_factored_shape("row_var")),
        Buffer("col_var", shape=_factored_shape("col_var")),
        Buffer("variance", shape=_factored_shape("variance")),
    ),
    takes_step=True,
    title="Adafactor",
)

_add(OptimizerSpec(
    "Adafactor", ADAFACTOR_UPDATE,
    positional=("lr", "beta2_decay", "eps", "d", "weight_decay"),
    pairs={"eps": ("eps1", "eps2")},
    torch=TorchSpec("Adafactor", older=dict(foreach=None)),  # as torch's __setstate__
))


# ------------------------------------------------------------------------------------------
# Schedule-free AdamW and SGD
# ------------------------------------------------------------------------------------------

# Both keep z (the base sequence; the params hold y during training) in the state, starting as
# a copy of the param (``Buffer.init == PARAM``), and per group the package's scalar state: k,
# lr_max, weight_sum, scheduled_lr and the train/eval mode (kept by the classes, not here).
# Each step the classes derive the warmup-scheduled lr (the kernel's lr) and the averaging
# weight ckp1 (the kernel's one per-step scalar); see lrfast.reference.schedule_free_values.
# warmup_steps, r and weight_lr_power only shape those values: class arguments, not the
# kernel's (``functional=False``).


def _check_warmup_steps(v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"warmup_steps must be an int, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"Invalid warmup_steps value: {v}")
    return int(v)


def _finite(name):
    def check(v):
        out = _real(v, name)
        if not math.isfinite(out):
            raise ValueError(f"Invalid {name} value: {v}")
        return out
    return check


def _schedule_free_beta1(v):
    # eval() divides by beta1 (x = lerp(y, z, 1 - 1/beta1)): 0 has no average to return to.
    out = check_beta(v, 0)
    if out == 0:
        raise ValueError(f"Invalid beta parameter at index 0: {v} (schedule-free needs "
                         "0 < beta1 < 1)")
    return out


def _sgd_schedule_free_momentum(v):
    out = _real(v, "momentum")
    if not 0 < out < 1:
        raise ValueError(f"Momentum must be between 0 and 1 exclusive: {v}")
    return out


def _schedule_free_hypers():
    return (
        Hyper("warmup_steps", 0, _check_warmup_steps, functional=False),
        Hyper("r", 0.0, _finite("r"), functional=False),
        Hyper("weight_lr_power", 2.0, nonneg("Invalid weight_lr_power value"),
              functional=False),
    )


ADAMW_SCHEDULE_FREE_UPDATE = Update(
    "adamw_schedule_free",
    hypers=(
        _lr(0.0025),
        Hyper("beta1", 0.9, _schedule_free_beta1),
        Hyper("beta2", 0.999, beta(1)),
        _eps(1e-8),
        _weight_decay(),
        *_schedule_free_hypers(),
    ),
    buffers=(Buffer("z", init=PARAM), Buffer("exp_avg_sq")),
    takes_step=True,  # k + 1: the second moment's bias correction
    title="Schedule-free AdamW",
    scalars=("ckp1",),
)

SGD_SCHEDULE_FREE_UPDATE = Update(
    "sgd_schedule_free",
    hypers=(
        _lr(1.0),
        Hyper("momentum", 0.9, _sgd_schedule_free_momentum),
        _weight_decay(),
        *_schedule_free_hypers(),
    ),
    buffers=(Buffer("z", init=PARAM),),
    takes_step=False,
    title="Schedule-free SGD",
    scalars=("ckp1",),
)

# The package's trailing switch: foreach (its default: torch has _foreach_mul_). lrfast's
# kernel runs either way; the value is stored so state dicts keep the package's keys.
_SCHEDULE_FREE_FLAGS = (("foreach", True),)

_add(
    OptimizerSpec(
        "AdamWScheduleFree", ADAMW_SCHEDULE_FREE_UPDATE,
        positional=("lr", "betas", "eps", "weight_decay", "warmup_steps", "r",
                    "weight_lr_power"),
        pairs={"betas": ("beta1", "beta2")},
        torch=TorchSpec(None, step_state=False, flags=_SCHEDULE_FREE_FLAGS),
    ),
    OptimizerSpec(
        "SGDScheduleFree", SGD_SCHEDULE_FREE_UPDATE,
        positional=("lr", "momentum", "weight_decay", "warmup_steps", "r", "weight_lr_power"),
        torch=TorchSpec(None, step_state=False, flags=_SCHEDULE_FREE_FLAGS),
    ),
)
