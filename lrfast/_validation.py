"""Input checks shared by the optimizer classes, lrfast.functional and the schedules.

Everything here runs before a kernel writes a byte: a call that raises has changed nothing.
Hyper-parameter messages are torch.optim's, so they read as users expect. Schedule and plateau
parameters are checked once, at construction, by the functions of the last section; their
messages name the parameter.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from . import _optim, _precision

# ------------------------------------------------------------------------------------------
# Hyper-parameters
# ------------------------------------------------------------------------------------------

def _real(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (OverflowError, ArithmeticError, ValueError):  # a huge int; a signalling Decimal
        raise ValueError(f"{what} is not representable as a float: {value!r}") from None


def check_nonneg(value, message):
    """A finite float >= 0; ``message`` is the torch-style text, formatted with the value."""
    v = _real(value, message.split(":")[0].replace("Invalid ", ""))
    if not (0.0 <= v < math.inf):
        raise ValueError(f"{message}: {value}")
    return v


def check_lr(lr):
    """A non-negative float, or a callable schedule ``step -> float`` (checked at each step)."""
    if callable(lr):
        return lr
    return check_nonneg(lr, "Invalid learning rate")


def check_beta(value, index):
    v = _real(value, f"beta at index {index}")
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid beta parameter at index {index}: {value}")
    return v


def check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (check_beta(betas[0], 0), check_beta(betas[1], 1))


def check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_step(step):
    """The 1-based number of the update being made (torch's ``state['step']`` after increment)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the number of this update), got {step!r}")
    return int(step)


def lr_value(lr, step_count):
    """The learning rate for the update after ``step_count`` completed ones."""
    if not callable(lr):
        return lr
    value = lr(step_count)
    try:
        v = float(value)
    except (TypeError, ValueError, ArithmeticError):
        raise TypeError(
            f"the learning-rate schedule returned {value!r} at step {step_count}; expected a float"
        ) from None
    if not (0.0 <= v < math.inf):
        raise ValueError(
            f"the learning-rate schedule returned {value!r} at step {step_count}; "
            "a learning rate must be finite and >= 0"
        )
    return v


# ------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------

def label(kind, key):
    return f"{kind}[{key!r}]"


def check_array(arr, what, *, writeable, bfloat16_bits=False):
    """A C-contiguous, aligned NumPy array of an element type the kernels take (float32,
    float64, float16, bfloat16; see lrfast._precision), writeable when it will be written.
    Returns its element type's name."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{what} must be a numpy.ndarray, got {type(arr).__name__}")
    storage = _precision.storage_of(arr.dtype, bfloat16_bits)
    if storage is None:
        raise TypeError(_precision.dtype_message(what, arr.dtype))
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; pass np.ascontiguousarray({what.split('[')[0]})")
    if not arr.flags.aligned:
        raise ValueError(f"{what} is not aligned to its dtype; copy it into a fresh array")
    if writeable and not arr.flags.writeable:
        raise ValueError(f"{what} is read-only; lrfast updates it in place")
    return storage


def byte_range(arr):
    start = arr.__array_interface__["data"][0]
    return start, start + arr.nbytes


def check_disjoint(arrays, labels):
    """Raise if two of ``arrays`` (non-empty ones) share memory; return their sorted ranges."""
    ranges = sorted(
        (byte_range(a) + (i,) for i, a in enumerate(arrays) if a.nbytes > 0),
    )
    for (s0, e0, i0), (s1, e1, i1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            a, b = sorted((i0, i1))
            raise ValueError(
                f"{labels[b]} shares memory with {labels[a]}; each array must be updated once"
            )
    starts = np.array([r[0] for r in ranges], dtype=np.intp)
    ends = np.array([r[1] for r in ranges], dtype=np.intp)
    return starts, ends


def as_named(container, kind):
    """(keys, arrays, is_dict) for a list/tuple or a dict of arrays."""
    if isinstance(container, np.ndarray):
        raise TypeError(f"{kind} must be a list, tuple or dict of arrays, not a single array")
    if isinstance(container, Mapping):
        keys = list(container.keys())
        return keys, [container[k] for k in keys], True
    if isinstance(container, Sequence) and not isinstance(container, (str, bytes)):
        arrays = list(container)
        return list(range(len(arrays))), arrays, False
    raise TypeError(f"{kind} must be a list, tuple or dict of arrays, got {type(container).__name__}")


# ------------------------------------------------------------------------------------------
# Per-step gradient checks (the loop itself runs in lrfast._optim.gather_grads)
# ------------------------------------------------------------------------------------------

def raise_gather_error(code, grad, param, what):
    """Turn a code from ``_optim.gather_grads`` into the matching exception."""
    if code == _optim.GATHER_NOT_ARRAY:
        raise TypeError(f"{what} must be a numpy.ndarray, got {type(grad).__name__}")
    if code == _optim.GATHER_DTYPE:
        raise TypeError(f"{what} has dtype {grad.dtype}, but its parameter has dtype {param.dtype}")
    if code == _optim.GATHER_SHAPE:
        raise ValueError(f"{what} has shape {grad.shape}, but its parameter has shape {param.shape}")
    if code == _optim.GATHER_NOT_CONTIGUOUS:
        raise ValueError(f"{what} is not C-contiguous; pass np.ascontiguousarray(grad)")
    if code == _optim.GATHER_MISALIGNED:
        raise ValueError(f"{what} is not aligned to its dtype; copy it into a fresh array")
    if code == _optim.GATHER_OVERLAP:
        raise ValueError(
            f"{what} shares memory with a parameter or optimizer state; "
            "a gradient must be a separate array"
        )
    raise RuntimeError(f"unknown gradient check code {code} for {what}")  # pragma: no cover


# ------------------------------------------------------------------------------------------
# Schedule and plateau parameters (lrfast.schedules, lrfast.plateau)
# ------------------------------------------------------------------------------------------

# The largest step count a schedule takes: steps up to it give finite, exact values.
MAX_STEP = 2**62


def check_real(value, name, *, low=None, high=None, low_open=False):
    """A finite float (not a bool) with ``low <= value <= high`` (``low < value`` when
    ``low_open``); a bound of None is no bound.

    Unlike ``_real``, a number that ``float`` cannot hold is not caught: ``float`` raises its
    own OverflowError, as the schedules always have.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def check_count(value, name, *, low=1):
    """An int (not a bool) from ``low`` to ``MAX_STEP``: a step count or a number of steps."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if v > MAX_STEP:
        raise ValueError(f"{name} must be <= 2**62, got {v}")
    return v


def check_choice(value, name, options):
    """One of ``options`` (compared with ==), returned as given."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def check_increasing(values, name, *, low=0):
    """A list of strictly increasing counts, each checked by ``check_count`` as ``name[i]``."""
    values = [check_count(b, f"{name}[{i}]", low=low) for i, b in enumerate(values)]
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise ValueError(f"{name} must be strictly increasing, got {values}")
    return values
