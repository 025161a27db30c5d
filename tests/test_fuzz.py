"""hypothesis fuzz tests.

A. Values: random valid hyper-parameters, shapes (0-size, 0-d, odd, thread-split sizes), dtypes
   (float32, float64, both in one optimizer), kernel builds, thread counts, ``grad_scale`` and
   ``skip_nonfinite``, with grads and params drawn to hold huge, tiny, subnormal, +-0 and (where
   asked) NaN/inf values, stepped in lockstep with lrfast.reference and compared NaN-aware with
   ``cases.tolerances``. A nonzero subnormal result of the reference must stay a nonzero
   subnormal (flush_subnormals is off); with ``flush_subnormals=True`` nothing subnormal is
   left and the process' own floating-point mode is untouched.

B. Validation layer: random inputs to the constructors, to ``step()``, to ``load_state_dict``
   and to ``lrfast.clip_grad_norm_`` (mostly one bad input at a time, so that each check is
   reached). Every call succeeds or raises TypeError or ValueError (RuntimeError only where
   documented); a call that raises changes nothing (``snapshot``, and the grads are never
   written); where an independent oracle says the input is valid the call must succeed and
   agree with the reference, and where it says it is invalid the call must raise. Every
   hyper-parameter x every pool value is also checked exhaustively against an oracle.

The defects this fuzzing found (OverflowError escaping for huge ints, a step count beyond a C
long, a signalling Decimal as grad_scale, AMSGrad dropping a NaN maximum, byte-swapped arrays
read as native) are fixed; the tests at the end keep them fixed.

Run-time: about 15-25 s in all. To soak, raise the ``max_examples`` (12x passes in ~3 min).
"""
from __future__ import annotations

import collections
import decimal
import math
import numbers
import types
from fractions import Fraction

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import lrfast  # noqa: E402
from lrfast import _dispatch  # noqa: E402
from cases import (OPTIMIZERS, SPECS, ReferenceRun, environment, snapshot,  # noqa: E402
                   tolerances)

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
NAMES = sorted(OPTIMIZERS)
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

def assert_allowed(exc, extra=()):
    """The exception is one the API documents (TypeError/ValueError, plus ``extra``)."""
    if isinstance(exc, (TypeError, ValueError) + tuple(extra)):
        return
    raise AssertionError(f"unexpected exception type {type(exc).__name__}: {exc!r}") from exc



environments = st.tuples(st.sampled_from(_dispatch.available()), st.sampled_from([1, 2, 3]),
                         st.sampled_from([None, 1, 64]))


# ==============================================================================================
# Strategies: valid configurations, shapes, values
# ==============================================================================================

@st.composite
def configs(draw, names=None):
    """(name, hyper) with random valid hyper-parameters (test_properties' strategy, widened to
    lr 0 and large, eps 0, momentum >= 1, alpha = 1, betas = 0, every flag)."""
    name = draw(st.sampled_from(names or NAMES))

    def eps(lo):
        return 0.0 if draw(st.integers(0, 7)) == 0 else draw(st.floats(lo, 1e-3))

    if name in ("AdamWScheduleFree", "SGDScheduleFree"):  # no maximize; 0 < beta < 1
        h = {"lr": draw(st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]),
                                  st.floats(1e-6, 0.5))),
             "weight_decay": draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0])),
             "warmup_steps": draw(st.sampled_from([0, 1, 3])),
             "r": draw(st.sampled_from([0.0, 0.5, 2.0])),
             "weight_lr_power": draw(st.sampled_from([0.0, 1.0, 2.0]))}
        beta = st.one_of(st.floats(0.01, 0.999), st.sampled_from([0.5, 0.9, 0.999]))
        if name == "SGDScheduleFree":
            h["momentum"] = draw(beta)
        else:
            h.update(betas=(draw(beta), draw(st.one_of(st.floats(0.0, 0.999),
                                                       st.sampled_from([0.0, 0.999])))),
                     eps=eps(1e-8))
        return name, h

    h = {"lr": draw(st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]),
                              st.floats(1e-6, 0.5))),
         "weight_decay": draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0])),
         "maximize": draw(st.booleans())}
    if name == "SGD":
        h["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0, 1.5]))
        if h["momentum"] and draw(st.booleans()):
            h["nesterov"] = True
        else:
            h["dampening"] = draw(st.floats(0.0, 1.0))
    elif name == "Adagrad":
        h.update(lr_decay=draw(st.sampled_from([0.0, 0.01, 0.1, 10.0])), eps=eps(1e-10),
                 initial_accumulator_value=draw(st.sampled_from([0.0, 0.1, 1.0])),
                 eps_inside_sqrt=draw(st.booleans()))
    elif name == "RMSprop":
        h.update(alpha=draw(st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.5, 1.0]))),
                 eps=eps(1e-8), momentum=draw(st.sampled_from([0.0, 0.5, 0.9])),
                 centered=draw(st.booleans()))
    elif "betas" in HYPER_NAMES[name]:
        unit = st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.5, 0.9, 0.999]))
        h.update(betas=(draw(unit), draw(unit)), eps=eps(1e-8), amsgrad=draw(st.booleans()))
    # torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop
    if name == "RAdam":
        h["decoupled_weight_decay"] = draw(st.booleans())
    elif name == "Adadelta":
        h.update(rho=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])), eps=eps(1e-8))
    elif name == "Rprop":
        h.update(etas=(draw(st.sampled_from([1e-3, 0.5, 0.999])),
                       draw(st.sampled_from([1.001, 1.2, 10.0]))),
                 step_sizes=draw(st.sampled_from([(0.0, 0.0), (1e-6, 50.0), (0.0, math.inf),
                                                  (1e-3, 1e-3)])))
    # Updates with per-step scalar state: NAdam, ASGD
    if name == "NAdam":
        h.update(momentum_decay=draw(st.sampled_from([0.0, 4e-3, 0.1, 10.0])),
                 decoupled_weight_decay=draw(st.booleans()))
    elif name == "ASGD":
        h.update(lambd=draw(st.sampled_from([0.0, 1e-4, 0.1, 1.0])),
                 alpha=draw(st.sampled_from([0.0, 0.75, 1.0, 2.0])),
                 t0=draw(st.sampled_from([0.0, 2.0, 1e6])))
    # Updates from outside torch.optim: Lion, ADOPT (Lion's lr must be > 0, as lion-pytorch's)
    if name == "Lion":
        h["lr"] = h["lr"] or 1e-3
        h["decoupled_weight_decay"] = draw(st.booleans())
    elif name == "Adopt":
        h.update(caution=draw(st.booleans()), decoupled=draw(st.booleans()),
                 clip_exp=draw(st.sampled_from([None, 0.333, 1.0])))
    # (the options drawn above that this optimizer does not have)
    h = {k: v for k, v in h.items() if k in HYPER_NAMES[name]}
    return name, h


shape_st = st.one_of(
    st.tuples(st.integers(0, 70)),
    st.tuples(st.integers(0, 9), st.integers(0, 9)),
    st.just(()),
    st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(0, 3)),
    st.tuples(st.integers(4090, 4110)),  # several threads' spans once the threshold is lowered
)


@st.composite
def layouts(draw, max_tensors=5):
    """(shapes, dtypes, container) for one optimizer's params."""
    shapes = draw(st.lists(shape_st, min_size=1, max_size=max_tensors))
    mode = draw(st.sampled_from(["f32", "f64", "mixed"]))
    if mode == "mixed":
        dtypes = [draw(st.sampled_from([F32, F64])) for _ in shapes]
    else:
        dtypes = [F32 if mode == "f32" else F64] * len(shapes)
    return shapes, dtypes, draw(st.sampled_from(["list", "tuple", "dict"]))


def elements(dtype, *, nonfinite=False, subnormal_only=False):
    """Scalars of ``dtype``: moderate, huge (up to ~3e30 / 3e300, squares finite or not), tiny
    normal, subnormal (tiny / 2**k), +-0, and NaN/+-inf when ``nonfinite``."""
    dtype = np.dtype(dtype)
    fi = np.finfo(dtype)
    tiny = float(fi.tiny)
    top = 30 if dtype == F32 else 300
    sign = st.sampled_from([1.0, -1.0])
    subnormal = st.builds(lambda k, s: s * tiny / 2.0 ** k, st.integers(1, fi.nmant), sign)
    tiny_normal = st.builds(lambda m, s: s * m * tiny, st.floats(1.0, 1e3), sign)
    zeros = st.sampled_from([0.0, -0.0])
    if subnormal_only:
        parts = [subnormal, subnormal, tiny_normal, zeros]
    else:
        parts = [st.floats(-10.0, 10.0, width=8 * dtype.itemsize),
                 st.builds(lambda m, e, s: s * m * 10.0 ** e, st.floats(1.0, 3.0),
                           st.integers(top // 2 - 4, top), sign),
                 tiny_normal, subnormal, zeros]
    if nonfinite:
        parts.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return st.one_of(parts).map(lambda x: float(dtype.type(x)))


def draw_arrays(data, shapes, dtypes, **kw):
    return [data.draw(hnp.arrays(d, s, elements=elements(d, **kw))) for s, d in zip(shapes, dtypes)]


def container(arrays, kind, keys):
    if kind == "dict":
        return dict(zip(keys, arrays))
    return tuple(arrays) if kind == "tuple" else list(arrays)


# ==============================================================================================
# Comparisons with the reference
# ==============================================================================================

def assert_subnormals_kept(actual, expected, what):
    """Where the reference holds a nonzero subnormal the result does too (not flushed)."""
    fi = np.finfo(expected.dtype)
    with np.errstate(invalid="ignore"):
        sub = (expected != 0) & (np.abs(expected) < fi.tiny)
    if np.any(sub):
        a, e = np.asarray(actual)[sub], np.asarray(expected)[sub]
        assert np.all(a != 0) and np.all(np.signbit(a) == np.signbit(e)), \
            f"{what}: subnormal reference values were flushed: {a[:5]} vs {e[:5]}"
        assert np.all(np.abs(a - e) <= 4 * fi.smallest_subnormal), f"{what}: {a[:5]} vs {e[:5]}"


def assert_matches_reference(opt, ref, keys):
    params = opt.params
    is_dict = isinstance(params, dict)
    plist = [params[k] for k in keys] if is_dict else list(params)
    state = opt.state_dict()["state"]
    assert opt.step_count == ref.t
    for i, key in enumerate(keys if is_dict else range(len(plist))):
        p, rp = plist[i], ref.params[i]
        tol = tolerances(p.dtype)
        np.testing.assert_allclose(p, rp, err_msg=f"param {key!r} vs reference", **tol)
        assert_subnormals_kept(p, rp, f"param {key!r}")
        present = {name for name, bufs in ref.state.items() if bufs[i] is not None}
        assert set(state[key]) == present, (sorted(state[key]), sorted(present))
        for name, bufs in ref.state.items():
            if bufs[i] is None:  # a buffer this param's shape has not (Adafactor)
                continue
            np.testing.assert_allclose(state[key][name], bufs[i],
                                       err_msg=f"{name}[{key!r}] vs reference", **tol)
            assert_subnormals_kept(state[key][name], bufs[i], f"{name}[{key!r}]")


def unscaled(grads, grad_scale):
    """The grads the update uses: times 1/grad_scale computed in double, rounded to the dtype."""
    if type(grad_scale) in (float, int) and grad_scale == 1.0:
        return [np.asarray(g) for g in grads]
    inv = 1.0 / float(grad_scale)
    with np.errstate(all="ignore"):
        return [np.asarray(g) * np.asarray(g).dtype.type(inv) for g in grads]


def reference_step(ref, grads, grad_scale):
    with np.errstate(all="ignore"):
        ref.step(unscaled(grads, grad_scale))


# ==============================================================================================
# A. Values against the reference
# ==============================================================================================

GRAD_SCALES = [1.0, 1.0, 1.0, 1, 0.75, 2.0 ** -8, 2.0 ** 16, 1e-3, 3.0e4, 1e-300, 1e300]


@settings(max_examples=70, deadline=None, suppress_health_check=SLOW_OK)
@given(config=configs(), layout=layouts(), env=environments, skip=st.booleans(),
       nonfinite=st.sampled_from(["none", "none", "grads", "grads+params"]), data=st.data())
def test_extreme_values_match_reference(config, layout, env, skip, nonfinite, data):
    name, hyper = config
    shapes, dtypes, kind = layout
    keys = [f"w{i}" for i in range(len(shapes))]
    params = draw_arrays(data, shapes, dtypes, nonfinite=nonfinite == "grads+params")
    with environment(*env):
        ref = ReferenceRun(name, hyper, params)
        opt = OPTIMIZERS[name](container(params, kind, keys), **hyper, skip_nonfinite=skip)
        skipped = 0
        for _ in range(5):
            grads = draw_arrays(data, shapes, dtypes, nonfinite=nonfinite != "none")
            scale = data.draw(st.sampled_from(GRAD_SCALES), label="grad_scale")
            grad_bytes = [g.tobytes() for g in grads]
            before = snapshot(opt)
            applied = opt.step(container(grads, kind, keys), grad_scale=scale)
            assert [g.tobytes() for g in grads] == grad_bytes, "step wrote into a gradient"
            if skip and not lrfast.reference.all_finite(grads, scale):
                assert applied is False
                assert snapshot(opt) == before
                skipped += 1
            else:
                assert applied is True
                reference_step(ref, grads, scale)
            assert opt.skipped_steps == skipped
        assert_matches_reference(opt, ref, keys)


@settings(max_examples=50, deadline=None, suppress_health_check=SLOW_OK)
@given(config=configs(), layout=layouts(), env=environments, data=st.data())
def test_subnormal_values_match_reference_and_flush_option(config, layout, env, data):
    """Only subnormal, tiny and +-0 params and grads: the reference's subnormal results are
    reproduced (no flush). A twin with flush_subnormals=True runs first on every step: it must
    leave no subnormal in its own params and state and must not change the FP mode of the
    calling thread (the reference, run after it in the same thread, would flush otherwise)."""
    name, hyper = config
    shapes, dtypes, kind = layout
    keys = [f"w{i}" for i in range(len(shapes))]
    params = draw_arrays(data, shapes, dtypes, subnormal_only=True)
    has_ftz = _dispatch.kernels.has_flush_to_zero()
    with environment(*env):
        ref = ReferenceRun(name, hyper, params)
        opt = OPTIMIZERS[name](container(params, kind, keys), **hyper)
        twin_params = [p.copy() for p in params]
        twin = OPTIMIZERS[name](twin_params, **hyper, flush_subnormals=True) if has_ftz else None
        for _ in range(4):
            grads = draw_arrays(data, shapes, dtypes, subnormal_only=True)
            if twin is not None:
                assert twin.step(grads) is True
            assert opt.step(container(grads, kind, keys)) is True
            reference_step(ref, grads, 1.0)
        assert_matches_reference(opt, ref, keys)
    for dt in (np.float32, np.float64):
        half = np.array([np.finfo(dt).tiny], dt) / dt(2)
        assert half[0] != 0, "flush-to-zero leaked into the calling thread"
    if twin is not None:
        state = twin.state_dict()["state"]
        for k, p in enumerate(twin_params):
            for what, a in [("param", p)] + sorted(state[k].items()):
                fi = np.finfo(a.dtype)
                with np.errstate(invalid="ignore"):
                    sub = (a != 0) & (np.abs(a) < fi.tiny)
                assert not np.any(sub), f"flush_subnormals=True left subnormals in {what}[{k}]"


# ==============================================================================================
# B. Validation layer
# ==============================================================================================

HUGE_INT = 10 ** 400
WEIRD = [
    None, "0.1", "", b"1", True, False, 1j, complex(0.1, 0.0), math.nan, math.inf, -math.inf,
    -1.0, -1, -1e-300, 0, 0.0, -0.0, 1, 2, 0.5, 1e308, 1e-320, HUGE_INT, -HUGE_INT, 2 ** 63,
    np.float32(0.1), np.float64("nan"), np.float64(-2.0), np.int64(3), np.int8(-1),
    np.uint64(2 ** 64 - 1), np.bool_(True), np.float16(0.5), np.complex64(1), np.longdouble(0.25),
    np.array(0.1), np.array([0.1, 0.2]), [0.1], (0.9, 0.999), (0.9,), (0.9, 0.999, 0.1),
    [0.5, 0.5], {"a": 1}, object(), Fraction(1, 3), Fraction(1, 10 ** 400), Fraction(10 ** 400, 3),
    decimal.Decimal("0.1"), decimal.Decimal("nan"),  # (Decimal('sNaN'): see the xfail tests)
    (lambda t: 0.1), (lambda t: -1.0), (lambda t: "x"), (lambda t: None), (lambda t: HUGE_INT),
    (lambda t: math.nan), (lambda t: 0.1j), (lambda t: np.float32(0.01)),
]
weird = st.sampled_from(WEIRD)
# Values of the right type at and around the documented limits.
BOUNDARY = [-1.0, -1e-300, -0.0, 0.0, 5e-324, 0.999999, 1.0, 1.0 + 2 ** -52, 2.0, 1e308,
            math.inf, math.nan, True, False, np.bool_(True), np.bool_(False), 0, 1]
weird_or_boundary = st.one_of(st.sampled_from(BOUNDARY), weird, st.sampled_from(BOUNDARY))

# Each optimizer's hyper-parameter arguments and the boolean ones, from the spec table.
HYPER_NAMES = {name: list(spec.arguments) for name, spec in SPECS.items()}
BOOL_HYPER = {name for spec in SPECS.values() for name in spec.arguments
              if isinstance(spec.default(name), bool)}

# Byte-swapped float32/float64 (e.g. '>f4' here) share the native type numbers, so a check on
# type numbers alone lets them through (steps misread them before 20ecd9b).
SWAPPED = [np.dtype(np.float32).newbyteorder(), np.dtype(np.float64).newbyteorder()]
# (float16 is an element type lrfast updates; uint16 is bfloat16 bits only when told so.)
BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.uint16, np.complex64, np.complex128,
              object, np.bool_, np.longdouble] + SWAPPED


def _fill(shape, dtype, rng):
    return np.asarray(rng.standard_normal(shape)).astype(dtype)


def misaligned(shape, dtype, rng):
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    a = np.frombuffer(bytearray(size * dtype.itemsize + dtype.itemsize), dtype=dtype,
                      count=size, offset=1).reshape(shape)
    a[...] = _fill(shape, dtype, rng)
    return a


def random_strided(shape, dtype, rng, draw):
    """A read-only view with random non-negative strides (often, not always, non-contiguous)."""
    dtype = np.dtype(dtype)
    if not shape:
        return _fill(shape, dtype, rng)
    strides = tuple(dtype.itemsize * draw(st.integers(0, 3)) for _ in shape)
    extent = sum((d - 1) * s for d, s in zip(shape, strides) if d > 0) + dtype.itemsize
    base = _fill((extent // dtype.itemsize + 1,), dtype, rng)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides, writeable=False)


def noncontig_variants(a, rng, draw):
    """Views of ``a``'s values laid out non-contiguously where the shape allows it."""
    choice = draw(st.sampled_from(["slice", "transpose", "reverse", "strides"]))
    if choice == "slice" and a.ndim >= 1:
        big = np.zeros((a.shape[0] * 2,) + a.shape[1:], a.dtype)
        big[::2] = a
        return big[::2]
    if choice == "transpose" and a.ndim >= 2:
        return np.ascontiguousarray(a.T).T
    if choice == "reverse" and a.ndim >= 1:
        return a[::-1].copy()[::-1]
    return random_strided(a.shape, a.dtype, rng, draw)


def wrong_shape(shape, draw):
    size = int(np.prod(shape, dtype=np.int64))
    options = [(size + 1,), tuple(shape) + (1,), (1,) + tuple(shape)]
    if len(shape) >= 2 and tuple(reversed(shape)) != tuple(shape):
        options.append(tuple(reversed(shape)))
    if shape != () and size == 1:
        options.append(())
    if len(shape) >= 2:
        options.append((size,))
    return draw(st.sampled_from([s for s in options if s != tuple(shape)]))


# -- constructors -------------------------------------------------------------------------------

GOOD_PARAM_KINDS = ["good", "good", "good", "good", "shape0", "zero_d", "matrix"]
BAD_PARAM_KINDS = ["readonly", "noncontig", "misaligned", "dtype", "swapped", "none", "list",
                   "scalar", "np_scalar", "same_twice", "overlapping", "memoryview",
                   "same_twice", "overlapping"]


def fault_slots(draw, slots, focus=None):
    """Which inputs get a bad value: none, one (most often), or several. ``focus``: a second
    list of slots that, half of the time, the faults are drawn from instead."""
    if focus and draw(st.booleans(), label="focus"):
        slots = focus
    mode = draw(st.sampled_from(["one", "none", "one", "several", "one"]), label="faults")
    if mode == "none" or not slots:
        return set()
    if mode == "one":
        return {draw(st.sampled_from(slots), label="fault")}
    return {s for s in slots if draw(st.integers(0, 2), label=f"fault {s}") == 0}


def make_param(kind, shape, dtype, rng, draw):
    if kind == "readonly":
        a = _fill(shape, dtype, rng)
        a.flags.writeable = False
        return a
    if kind == "noncontig":
        return noncontig_variants(_fill(shape, dtype, rng), rng, draw)
    if kind == "misaligned":
        return misaligned(shape, dtype, rng)
    if kind == "dtype":
        return _fill(shape, draw(st.sampled_from(BAD_DTYPES)), rng)
    if kind == "swapped":
        return _fill(shape, draw(st.sampled_from(SWAPPED)), rng)
    if kind == "shape0":
        return np.zeros((0,) + tuple(shape[1:]), dtype)
    if kind == "zero_d":
        return _fill((), dtype, rng)
    if kind == "none":
        return None
    if kind == "list":
        return _fill(shape, dtype, rng).tolist()
    if kind == "scalar":
        return 1.0
    if kind == "np_scalar":
        return np.dtype(dtype).type(1.0)
    if kind == "matrix":
        return np.asmatrix(_fill((2, 3), dtype, rng))
    if kind == "memoryview":
        return memoryview(_fill(shape, dtype, rng))
    if kind == "huge":
        return _fill(shape, dtype, rng) * dtype.type(1e30 if dtype == F32 else 1e300)
    if kind == "nonfinite":
        a = _fill(shape, dtype, rng)
        if a.size:
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf]))
        return a
    return _fill(shape, dtype, rng)


def build_items(draw, shapes, faulty, good_kinds, bad_kinds, rng):
    """One array (or bad item) per shape; items in ``faulty`` get a bad kind. The kinds
    'same_twice' and 'overlapping' add a pair of items sharing memory."""
    items = []
    for i, s in enumerate(shapes):
        dtype = draw(st.sampled_from([F32, F64]))
        kind = draw(st.sampled_from(bad_kinds if i in faulty else good_kinds), label=f"item {i}")
        if kind == "same_twice":
            a = _fill(s if np.prod(s) else (3,), dtype, rng)
            items += [a, a]
        elif kind == "overlapping":
            n = max(2, int(np.prod(s)))
            base = _fill((2 * n,), dtype, rng)
            cut = draw(st.integers(1, n - 1))
            items += [base[:n], base[cut:cut + n]]
        else:
            items.append(make_param(kind, s, dtype, rng, draw))
    return items


def param_ok(a):
    return (isinstance(a, np.ndarray) and a.dtype in (F32, F64) and a.flags.c_contiguous
            and a.flags.aligned and a.flags.writeable)


def disjoint(arrays):
    live = [a for a in arrays if a.nbytes > 0]
    return not any(np.may_share_memory(a, b) for i, a in enumerate(live) for b in live[:i])


small_shapes = st.lists(shape_st.filter(lambda s: np.prod(s) < 200), min_size=1, max_size=4)


def fuzzed_params(draw, shapes, faults):
    """(params container, its arrays, valid?) with a bad item where ``faults`` names one."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    faulty = {i for i in range(len(shapes)) if f"param{i}" in faults}
    items = build_items(draw, shapes, faulty, GOOD_PARAM_KINDS, BAD_PARAM_KINDS, rng)
    kind = draw(st.sampled_from(["generator", "set", "ndarray", "none", "str", "empty"]
                                if "container" in faults else
                                ["list", "list", "tuple", "dict", "userlist", "flat"]))
    if kind == "flat":
        flat = lrfast.FlatParams({f"t{i}": s for i, s in enumerate(shapes)})
        return flat, [flat.param], True
    keys = [f"p{i}" for i in range(len(items))]
    made = {
        "list": lambda: list(items), "tuple": lambda: tuple(items),
        "dict": lambda: dict(zip(keys, items)), "userlist": lambda: collections.UserList(items),
        "generator": lambda: (x for x in items), "set": lambda: set(map(id, items)),
        "ndarray": lambda: np.zeros((len(items), 2)), "none": lambda: None, "str": lambda: "p",
        "empty": lambda: draw(st.sampled_from([[], (), {}])),
    }[kind]()
    arrays = [a for a in items if isinstance(a, np.ndarray)]
    ok = (kind in ("list", "tuple", "dict", "userlist") and all(param_ok(a) for a in items)
          and disjoint(arrays))
    return made, arrays, ok


def hyper_ok(h):
    """A successful constructor holds validated values only."""
    if "beta2_decay" in h:  # Adafactor: eps (eps1 or None, eps2), beta2_decay <= 0, d >= 1
        e1, e2 = h["eps"]
        assert e1 is None or type(e1) is float and 0.0 <= e1 < math.inf, h
        assert type(e2) is float and 0.0 <= e2 < math.inf, h
        assert type(h["beta2_decay"]) is float and -math.inf < h["beta2_decay"] <= 0.0, h
        assert type(h["d"]) is float and 1.0 <= h["d"] < math.inf, h
        h = {k: v for k, v in h.items() if k not in ("eps", "beta2_decay", "d")}
    for k, v in h.items():
        if k in BOOL_HYPER:
            assert type(v) is bool, (k, v)
        elif k == "lr":
            assert callable(v) or (type(v) is float and 0.0 <= v < math.inf), (k, v)
        elif k == "betas":
            assert all(type(b) is float and 0.0 <= b < 1.0 for b in v), (k, v)
        elif k == "etas":  # (Rprop)
            assert all(type(b) is float for b in v) and 0.0 < v[0] < 1.0 < v[1], (k, v)
        elif k == "step_sizes":  # (Rprop)
            assert all(type(b) is float for b in v) and 0.0 <= v[0] <= v[1], (k, v)
        elif k in ("lambd", "t0") or (k == "alpha" and "lambd" in h):  # (ASGD: any real)
            assert type(v) is float, (k, v)
        elif k == "warmup_steps":  # schedule-free's: a count of steps
            assert type(v) is int and v >= 0, (k, v)
        elif k == "r":  # schedule-free's averaging power: any finite value
            assert type(v) is float and math.isfinite(v), (k, v)
        elif k == "clip_exp":  # ADOPT's: None (no clipping) or any finite value
            assert v is None or (type(v) is float and math.isfinite(v)), (k, v)
        elif k == "dampening":  # torch does not range-check dampening either
            assert type(v) is float, (k, v)
            if h["nesterov"]:
                assert h["momentum"] > 0 and v == 0, h
        else:
            assert type(v) is float and 0.0 <= v < math.inf, (k, v)
            if k in ("alpha", "rho"):
                assert v <= 1.0


@settings(max_examples=400, deadline=None, suppress_health_check=SLOW_OK)
@given(config=configs(), data=st.data())
def test_fuzz_constructor(config, data):
    name, hyper = config
    hyper_keys = HYPER_NAMES[name] + ["skip_nonfinite", "flush_subnormals"]
    shapes = data.draw(small_shapes, label="shapes")
    param_slots = [f"param{i}" for i in range(len(shapes))] + ["container"]
    faults = fault_slots(data.draw, param_slots + hyper_keys, focus=param_slots)
    made, arrays, params_ok = fuzzed_params(data.draw, shapes, faults)
    kwargs = dict(hyper)
    for key in hyper_keys:
        if key not in faults:
            continue
        if key == "betas" and data.draw(st.booleans()):
            pair = [data.draw(weird_or_boundary, label="beta"), data.draw(st.floats(0.0, 0.999))]
            kwargs[key] = tuple(pair[::data.draw(st.sampled_from([1, -1]))])
        else:
            kwargs[key] = data.draw(weird_or_boundary, label=key)
    must_work = params_ok and not any(k in faults for k in hyper_keys)
    before = [a.tobytes() for a in arrays]
    try:
        opt = OPTIMIZERS[name](made, **kwargs)
    except Exception as exc:  # noqa: BLE001 (any type is checked below)
        assert_allowed(exc)
        assert not must_work, f"valid constructor arguments were refused: {exc!r}"
        assert [a.tobytes() for a in arrays] == before
        return
    assert params_ok or isinstance(made, lrfast.FlatParams), "invalid params were accepted"
    assert [a.tobytes() for a in arrays] == before, "the constructor wrote into a param"
    hyper_ok(opt.hyperparams)
    # The new optimizer steps (or its lr schedule refuses a value, changing nothing).
    p = opt.params
    grads = {k: np.zeros_like(v) for k, v in p.items()} if isinstance(p, dict) else \
        [np.zeros_like(v) for v in p]
    snap = snapshot(opt)
    try:
        assert opt.step(None if isinstance(made, lrfast.FlatParams) else grads) in (True, False)
    except Exception as exc:  # noqa: BLE001 (any type is checked below)
        assert_allowed(exc)
        assert snapshot(opt) == snap


BETA_PAIRS = [(0.9, 0.999), [0.5, 0.5], (0.0, 0.0), (1.0, 0.9), (0.9, 1.0), (0.9, -0.0),
              (-1e-300, 0.9), (np.float32(0.5), Fraction(1, 2)), ("0.9", 0.9), (None, 0.9),
              (0.9, math.nan), (True, 0.9), (0.9, 1j), np.array([0.9, 0.99]), (0.9, HUGE_INT)]
BASES = [(name, {}) for name in NAMES] + [("SGD", {"momentum": 0.9, "nesterov": True})]


def expected_hyper_error(name, base, key, value):
    """What the documented checks make of ``key=value`` over the ``base`` arguments: None
    (accepted), TypeError or ValueError (also for a huge int, beyond the float range)."""
    def real(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return TypeError
        try:
            float(v)
        except OverflowError:
            return ValueError
        return None

    if name == "Adafactor" and key in ("eps", "beta2_decay", "d"):
        if key == "eps":  # a pair (eps1 or None, eps2), each >= 0
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                return ValueError
            for i, e in enumerate(value):
                if e is None and i == 0:
                    continue
                err = real(e)
                if err:
                    return err
                if not 0.0 <= float(e) < math.inf:
                    return ValueError
            return None
        err = real(value)
        if err:
            return err
        v = float(value)
        if key == "beta2_decay":
            return None if -math.inf < v <= 0.0 else ValueError
        return None if 1.0 <= v < math.inf else ValueError

    if key in BOOL_HYPER or key in ("skip_nonfinite", "flush_subnormals"):
        if not isinstance(value, (bool, np.bool_)):
            return TypeError
        if key == "nesterov" and value and not (base.get("momentum", 0) > 0
                                                and base.get("dampening", 0) == 0):
            return ValueError
        if key == "flush_subnormals" and value and not _dispatch.kernels.has_flush_to_zero():
            return ValueError
        return None
    if (name, key) in (("Adopt", "clip_exp"), ("Lamb", "max_grad_norm")) and value is None:
        return None  # (None: no clipping)
    if (name, key) == ("Adopt", "clip_exp"):  # any finite real
        return real(value) or (None if math.isfinite(float(value)) else ValueError)
    if (name, key) in (("Lamb", "max_grad_norm"), ("Lion", "lr")) and not callable(value):
        return real(value) or (None if 0.0 < float(value) < math.inf else ValueError)
    schedule_free = name in ("AdamWScheduleFree", "SGDScheduleFree")
    if schedule_free and key == "warmup_steps":  # an int >= 0
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return TypeError
        return ValueError if value < 0 else None
    if schedule_free and key == "r":  # any finite real
        err = real(value)
        return err or (None if math.isfinite(float(value)) else ValueError)
    if schedule_free and key == "momentum":  # in (0, 1)
        return real(value) or (None if 0.0 < float(value) < 1.0 else ValueError)
    if key == "betas":
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            return ValueError
        for i, b in enumerate(value):
            err = real(b)
            if err:
                return err
            if not (0.0 <= float(b) < 1.0 or name == "Lion" and float(b) == 1.0):
                return ValueError  # (lion-pytorch allows a beta of 1)
            if schedule_free and i == 0 and float(b) == 0.0:  # eval() divides by beta1
                return ValueError
        return None
    if key in ("etas", "step_sizes"):  # (Rprop's pairs, range-checked together)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            return ValueError
        for b in value:
            err = real(b)
            if err:
                return err
        lo, hi = (float(b) for b in value)
        ok = 0.0 < lo < 1.0 < hi if key == "etas" else 0.0 <= lo <= hi
        return None if ok else ValueError
    if key == "lr" and callable(value):
        return TypeError if name == "Rprop" else None  # (Rprop's lr only starts its state)
    err = real(value)
    if err:
        return err
    v = float(value)
    if name == "ASGD" and key in ("lambd", "alpha", "t0"):  # any real, as torch
        return None
    if key == "dampening":  # any real, as torch; Nesterov needs it to be 0
        return ValueError if base.get("nesterov") and v != 0 else None
    if not 0.0 <= v < math.inf:
        return ValueError
    if key in ("alpha", "rho") and v > 1.0:
        return ValueError
    if key == "momentum" and base.get("nesterov") and v <= 0:
        return ValueError
    return None


def test_every_hyper_value_against_an_oracle():
    """Exhaustive, not random: every hyper-parameter of every optimizer set to every value of
    the fuzz pools, against an oracle written from the documented checks. Accepted values are
    stored as floats/bools equal to what was given; refused ones raise the oracle's type."""
    checked = 0
    for name, base in BASES:
        for key in HYPER_NAMES[name] + ["skip_nonfinite", "flush_subnormals"]:
            pairs = key == "betas" or (name, key) == ("Adafactor", "eps")
            values = WEIRD + BOUNDARY + (BETA_PAIRS if pairs else [])
            for value in values:
                want = expected_hyper_error(name, base, key, value)
                params = [np.zeros(3, np.float32)]
                try:
                    opt = OPTIMIZERS[name](params, **{**base, key: value})
                except Exception as exc:  # noqa: BLE001 (any type is checked below)
                    assert_allowed(exc)
                    assert want is not None and isinstance(exc, want), \
                        f"{name}({key}={value!r}) over {base}: got {exc!r}, expected {want}"
                    continue
                assert want is None, f"{name}({key}={value!r}) over {base} was accepted"
                if key in ("skip_nonfinite", "flush_subnormals"):
                    assert getattr(opt, key) is bool(value)
                    continue
                if (name, key) == ("Adafactor", "eps"):  # (eps1 or None, eps2)
                    got = opt.hyperparams[key]
                    assert got == tuple(None if b is None else float(b) for b in value)
                    checked += 1
                    continue
                got = opt.hyperparams[key]
                if key in ("betas", "etas", "step_sizes"):
                    assert got == tuple(float(b) for b in value) and \
                        all(type(b) is float for b in got)
                elif key in BOOL_HYPER:
                    assert got is bool(value)
                elif callable(value):
                    assert got is value
                elif key == "warmup_steps":  # schedule-free's count of steps
                    assert type(got) is int and got == value, (key, value, got)
                elif value is None:  # (an optional value: no clipping)
                    assert got is None, (key, got)
                else:
                    assert type(got) is float and (got == float(value) or math.isnan(got)), \
                        (key, value, got)
                checked += 1
    assert checked > 200


# -- step ---------------------------------------------------------------------------------------

GOOD_GRAD_KINDS = ["good"] * 6 + ["readonly", "buffer_view", "size1_strides", "shared",
                                  "matrix", "param_empty"]
BAD_GRAD_KINDS = ["none", "list", "scalar", "np_scalar", "dtype", "shape", "noncontig",
                  "misaligned", "param", "other_param", "state", "other_state"]
GOOD_SCALES = [1.0, 1.0, 1.0, 1, 2.0, 0.5, 65536.0, np.float32(4.0), Fraction(3, 2), 1e-300]


def grad_scale_ok(s):
    if type(s) in (float, int) and s == 1.0:
        return True
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        return False
    try:
        f = float(s)
    except OverflowError:
        return False
    return math.isfinite(f) and f > 0


def make_grad(kind, k, opt, params, rng, draw, made_so_far):
    """A grad for tensor ``k`` of ``opt`` (None means "no grad" here, see kind 'none')."""
    p = params[k]
    shape, dtype = p.shape, p.dtype
    good = _fill(shape, dtype, rng)
    if draw(st.integers(0, 9)) == 0 and good.size:
        good.reshape(-1)[draw(st.integers(0, good.size - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
    if kind == "readonly":
        good.flags.writeable = False
        return good
    if kind == "buffer_view":
        buf = np.zeros(good.size + 7, dtype)
        view = buf[3:3 + good.size].reshape(shape)
        view[...] = good
        return view
    if kind == "size1_strides" and good.size <= 1 and shape:
        strides = tuple(dtype.itemsize * draw(st.sampled_from([0, 1, 7, -1])) for _ in shape)
        return np.lib.stride_tricks.as_strided(good, shape=shape, strides=strides,
                                               writeable=False)
    if kind == "shared":
        for g in made_so_far:
            if isinstance(g, np.ndarray) and g.dtype == dtype and g.shape == shape:
                return g
        return good
    if kind == "matrix" and good.ndim == 2:
        return np.asmatrix(good)
    if kind == "param_empty" and p.size == 0:
        return p  # a zero-size grad "sharing" a zero-size param: no bytes in common
    if kind == "none":
        return None
    if kind == "list":
        return good.tolist()
    if kind == "scalar":
        return 0.5
    if kind == "np_scalar":
        return dtype.type(0.5)
    if kind == "dtype":
        others = [d for d in BAD_DTYPES + [F32, F64] if np.dtype(d) != dtype]
        return good.astype(draw(st.sampled_from(others)))
    if kind == "shape":
        return np.zeros(wrong_shape(shape, draw), dtype)
    if kind == "noncontig":
        return noncontig_variants(good, rng, draw)
    if kind == "misaligned":
        return misaligned(shape, dtype, rng)
    if kind == "param":
        return p if draw(st.booleans()) else p.reshape(shape)
    if kind == "other_param":
        big = [i for i in range(len(params)) if i != k and params[i].nbytes >= good.nbytes > 0]
        if big:
            other = params[draw(st.sampled_from(big))]
            return np.frombuffer(other, dtype, count=good.size).reshape(shape)
    if kind in ("state", "other_state"):
        views = opt._views  # the optimizer's own state views (private: for the overlap checks)
        if kind == "state" and views[k]:
            return views[k][draw(st.sampled_from(sorted(views[k])))]
        cands = [v for i in range(len(params)) for v in views[i].values()
                 if v.nbytes >= good.nbytes > 0]
        if cands:
            return np.frombuffer(draw(st.sampled_from(cands)), dtype,
                                 count=good.size).reshape(shape)
    return good


def grad_ok(g, p, written):
    if not isinstance(g, np.ndarray):
        return False
    if g.dtype != p.dtype or g.shape != p.shape:
        return False
    if not (g.flags.c_contiguous and g.flags.aligned):
        return False
    return not (g.nbytes and any(np.may_share_memory(g, w) for w in written if w.nbytes))


GOOD_CONTAINERS = ["same"] * 4 + ["tuple", "list", "userlist", "proxy", "reordered"]
BAD_CONTAINERS = ["dict", "drop", "append", "missing_key", "extra_key", "generator", "none",
                  "ndarray", "str"]


def wrap_grads(kind, grads, keys, is_dict):
    """(container, valid?) for the grads list, in the kind of container ``kind`` names."""
    if kind == "none":
        return None, False
    if kind == "str":
        return "grads", False
    if kind == "ndarray":
        return np.zeros((len(grads), 1)), False
    if kind == "generator":
        return (g for g in grads), False
    if is_dict:
        d = dict(zip(keys, grads))
        if kind in ("same", "dict"):
            return d, True
        if kind == "proxy":
            return types.MappingProxyType(d), True
        if kind == "reordered":
            return dict(reversed(list(d.items()))), True
        if kind == "drop":
            return dict(list(d.items())[:-1]), False
        if kind in ("append", "extra_key"):
            return {**d, "extra": grads[0]}, False
        if kind == "missing_key":
            return {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(d.items())}, False
        return list(grads), False  # tuple / list / userlist: a sequence for dict params
    if kind in ("same", "list", "reordered", "missing_key"):
        return list(grads), True
    if kind == "tuple":
        return tuple(grads), True
    if kind == "userlist":
        return collections.UserList(grads), True
    if kind == "drop":
        return list(grads[:-1]), False
    if kind in ("append", "extra_key"):
        return list(grads) + [grads[0]], False
    return dict(enumerate(grads)), False  # dict / proxy for list params


def leaves(grads):
    return [g for g in grads if isinstance(g, np.ndarray)]


@settings(max_examples=250, deadline=None, suppress_health_check=SLOW_OK)
@given(config=configs(), layout=layouts(max_tensors=4), env=environments, skip=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1), data=st.data())
def test_fuzz_step(config, layout, env, skip, seed, data):
    name, hyper = config
    shapes, dtypes, kind = layout
    shapes = [s if np.prod(s) < 1000 else (37,) for s in shapes]
    rng = np.random.default_rng(seed)
    params = [_fill(s, d, rng) for s, d in zip(shapes, dtypes)]
    keys = [f"w{i}" for i in range(len(shapes))]
    with environment(*env):
        ref = ReferenceRun(name, hyper, params)
        opt = OPTIMIZERS[name](container(params, kind, keys), **hyper, skip_nonfinite=skip)
        warm = [_fill(s, d, rng) for s, d in zip(shapes, dtypes)]
        assert opt.step(container(warm, kind, keys)) is True
        reference_step(ref, warm, 1.0)
        written = params + [v for views in opt._views for v in views.values()]
        for _ in range(3):
            grad_slots = [f"grad{k}" for k in range(len(params))]
            faults = fault_slots(data.draw, grad_slots + ["container", "grad_scale"],
                                 focus=grad_slots)
            grads = []
            for k in range(len(params)):
                kinds = BAD_GRAD_KINDS if f"grad{k}" in faults else GOOD_GRAD_KINDS
                gkind = data.draw(st.sampled_from(kinds), label=f"grad kind {k}")
                grads.append(make_grad(gkind, k, opt, params, rng, data.draw, grads))
            ckind = data.draw(st.sampled_from(BAD_CONTAINERS if "container" in faults
                                              else GOOD_CONTAINERS), label="container")
            made, container_ok = wrap_grads(ckind, grads, keys, kind == "dict")
            gs = data.draw(weird_or_boundary if "grad_scale" in faults
                           else st.sampled_from(GOOD_SCALES),
                           label="grad_scale")
            valid = (container_ok and grad_scale_ok(gs)
                     and all(grad_ok(g, p, written) for g, p in zip(grads, params)))
            described = [(type(g).__name__, getattr(g, "dtype", None), getattr(g, "shape", None))
                         for g in grads]
            note(f"container={ckind} valid={valid} grads={described}")
            before, skipped = snapshot(opt), opt.skipped_steps
            grad_bytes = [g.tobytes() for g in leaves(grads)]
            try:
                applied = opt.step(made, grad_scale=gs)
            except Exception as exc:  # noqa: BLE001 (any type is checked below)
                assert_allowed(exc)
                assert not valid, f"valid step raised {exc!r}"
                assert snapshot(opt) == before and opt.skipped_steps == skipped
                continue
            finally:
                assert [g.tobytes() for g in leaves(grads)] == grad_bytes, "a grad was written"
            assert valid, "an invalid step was accepted"
            if skip and not lrfast.reference.all_finite(grads, gs):
                assert applied is False
                assert snapshot(opt) == before and opt.skipped_steps == skipped + 1
            else:
                assert applied is True and opt.skipped_steps == skipped
                reference_step(ref, grads, gs)
                assert_matches_reference(opt, ref, keys)
        assert_matches_reference(opt, ref, keys)


# -- load_state_dict ----------------------------------------------------------------------------

# Step counts are bounded below 2**62 (the kernels take the 1-based step as a C long long);
# the skip counter is a plain Python int with no bound.
STEP_COUNTS = [0, 1, 7, 2 ** 31, 2 ** 62 - 1, np.int64(3), np.uint8(2)]
SKIP_COUNTS = STEP_COUNTS + [2 ** 62, 2 ** 63 - 1, 2 ** 64, HUGE_INT]
BAD_STEP_COUNTS = [-1, True, False, 1.0, "1", None, np.float64(2.0), -HUGE_INT]
TOO_LARGE_STEP_COUNTS = [2 ** 62, 2 ** 63 - 1, 2 ** 64, HUGE_INT]
VALID_LOAD_OPS = ["step_count", "skipped", "pop_skipped", "hyper_lr_none", "buf_nan",
                  "buf_noncontig", "buf_readonly", "buf_param", "buf_matrix", "buf_same_dtype",
                  "proxy"]
BAD_LOAD_OPS = ["pop_required", "set_top", "optimizer", "bad_step_count", "bad_skipped",
                "hyper_pop", "hyper_add", "state_pop", "state_add", "state_entry", "buf_pop",
                "buf_add", "buf_dtype", "buf_shape", "buf_list", "buf_none", "not_mapping"] * 2 \
    + ["buf_dtype", "buf_dtype", "buf_shape", "buf_add", "buf_pop", "state_entry"]


def mutate_state_dict(sd, op, draw, rng, params, name):
    """Apply ``op`` to ``sd``; return (state dict, 'ok' | 'bad' | 'unknown') for what it did."""
    state, hyper = sd["state"], sd["hyperparams"]
    keys = sorted(state, key=str)
    entries = [(k, b) for k in keys for b in sorted(state[k])]
    if op in VALID_LOAD_OPS:  # (a param's scalar state is shared by the params: not edited alone)
        shared = {b.name for b in SPECS[name].update.scalar_state}
        entries = [(k, b) for k, b in entries if b not in shared]
    if op.startswith("buf_") and op not in ("buf_add",) and not entries:
        return sd, "ok"  # no state buffers (SGD without momentum): nothing to change
    if op.startswith("buf_") and op != "buf_add":
        k, b = draw(st.sampled_from(entries), label="buffer")
        arr = state[k][b]
    if op == "step_count":
        sd["step_count"] = draw(st.sampled_from(STEP_COUNTS))
    elif op == "skipped":
        sd["skipped_steps"] = draw(st.sampled_from(SKIP_COUNTS))
    elif op == "pop_skipped":
        sd.pop("skipped_steps", None)
    elif op == "hyper_lr_none":
        hyper["lr"] = None
    elif op == "hyper_set":
        hyper[draw(st.sampled_from(sorted(hyper)))] = draw(weird_or_boundary)
        return sd, "unknown"
    elif op == "buf_nan":
        state[k][b] = np.full_like(arr, np.nan)
    elif op == "buf_noncontig":
        state[k][b] = noncontig_variants(arr, rng, draw)
    elif op == "buf_readonly":
        arr = arr.copy()
        arr.flags.writeable = False
        state[k][b] = arr
    elif op == "buf_param":
        # same shape and dtype by construction, where the buffer has its param's shape (not
        # Adafactor's row_var/col_var)
        if arr.shape == params[k].shape:
            state[k][b] = params[k]
    elif op == "buf_matrix":
        if arr.ndim == 2:
            state[k][b] = np.asmatrix(arr)
    elif op == "buf_same_dtype":
        state[k][b] = arr.astype(arr.dtype.newbyteorder("="))
    elif op == "proxy":
        return types.MappingProxyType(sd), "ok"
    elif op == "pop_required":
        del sd[draw(st.sampled_from(["optimizer", "step_count", "hyperparams", "state"]))]
        return sd, "bad"
    elif op == "set_top":
        sd[draw(st.sampled_from(["optimizer", "hyperparams", "state"]))] = draw(weird)
        return sd, "bad"
    elif op == "optimizer":
        sd["optimizer"] = draw(st.sampled_from([n for n in NAMES if n != name] + ["", None, 3]))
        return sd, "bad"
    elif op in ("bad_step_count", "bad_skipped"):
        bad = BAD_STEP_COUNTS + (TOO_LARGE_STEP_COUNTS if op == "bad_step_count" else [])
        sd["step_count" if op == "bad_step_count" else "skipped_steps"] = draw(
            st.sampled_from(bad))
        return sd, "bad"
    elif op == "hyper_pop":
        del hyper[draw(st.sampled_from(sorted(hyper)))]
        return sd, "bad"
    elif op == "hyper_add":
        hyper["bogus"] = 1.0
        return sd, "bad"
    elif op == "state_pop":
        del state[draw(st.sampled_from(keys))]
        return sd, "bad"
    elif op == "state_add":
        state["bogus"] = {}
        return sd, "bad"
    elif op == "state_entry":
        state[draw(st.sampled_from(keys))] = draw(weird)
        return sd, "bad"
    elif op == "buf_pop":
        del state[k][b]
        return sd, "bad"
    elif op == "buf_add":
        state[draw(st.sampled_from(keys))]["bogus_buffer"] = np.zeros(1)
        return sd, "bad"
    elif op == "buf_dtype":
        state[k][b] = arr.astype(draw(st.sampled_from(BAD_DTYPES + [F32, F64])))
        return sd, "ok" if state[k][b].dtype == arr.dtype else "bad"
    elif op == "buf_shape":
        state[k][b] = np.zeros(wrong_shape(arr.shape, draw), arr.dtype)
        return sd, "bad"
    elif op == "buf_list":
        state[k][b] = arr.tolist()
        return sd, "bad"
    elif op == "buf_none":
        state[k][b] = None
        return sd, "bad"
    elif op == "not_mapping":
        return draw(st.sampled_from([None, [], [("optimizer", "SGD")], "state", 3])), "bad"
    return sd, "ok"


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(name=st.sampled_from(NAMES), data=st.data(), seed=st.integers(0, 2 ** 32 - 1),
       layout=layouts(max_tensors=3), env=environments)
def test_fuzz_load_state_dict(name, data, seed, layout, env):
    rng = np.random.default_rng(seed)
    shapes, dtypes, kind = layout
    shapes = [s if np.prod(s) < 1000 else (37,) for s in shapes]
    keys = [f"w{i}" for i in range(len(shapes))]
    state_keys = keys if kind == "dict" else list(range(len(shapes)))
    _, target_hyper = data.draw(configs([name]), label="target")
    _, source_hyper = data.draw(configs([name]), label="source")  # maybe other state buffers
    params = [_fill(s, d, rng) for s, d in zip(shapes, dtypes)]
    with environment(*env):
        opt = OPTIMIZERS[name](container(params, kind, keys), **target_hyper,
                               skip_nonfinite=data.draw(st.booleans()))
        source = OPTIMIZERS[name](container([p.copy() for p in params], kind, keys),
                                  **source_hyper, skip_nonfinite=data.draw(st.booleans()))
        for which in (opt, source):  # different step counts, state and skipped counts
            for _ in range(data.draw(st.integers(0, 2))):
                grads = [_fill(s, d, rng) for s, d in zip(shapes, dtypes)]
                if data.draw(st.integers(0, 3)) == 0 and grads[0].size:
                    grads[0].reshape(-1)[0] = np.nan  # skipped where skip_nonfinite is on
                which.step(container(grads, kind, keys))
        sd = source.state_dict()
        # Valid edits, then at most one bad (or unknown) one: a lone fault must be caught.
        ops = data.draw(st.lists(st.sampled_from(VALID_LOAD_OPS), max_size=2), label="valid ops")
        ops += data.draw(st.sampled_from([["bad"], [], ["hyper_set"], ["bad"], [], ["bad"]]))
        if ops[-1:] == ["bad"]:
            ops[-1] = data.draw(st.sampled_from(BAD_LOAD_OPS), label="bad op")
        note(f"load ops {ops}")
        verdict = "ok"
        for op in ops:
            if type(sd) is not dict:  # a proxy or a non-mapping: nothing more to mutate
                break
            sd, v = mutate_state_dict(sd, op, data.draw, rng, dict(zip(state_keys, params)),
                                      name)
            verdict = v if v != "ok" else verdict
        note(f"verdict {verdict}")
        before, hyper_before, skipped = snapshot(opt), opt.hyperparams, opt.skipped_steps
        try:
            opt.load_state_dict(sd)
        except Exception as exc:  # noqa: BLE001 (any type is checked below)
            assert_allowed(exc)
            assert verdict != "ok", f"a valid state dict was refused: {exc!r}"
            assert snapshot(opt) == before and opt.hyperparams == hyper_before
            assert opt.skipped_steps == skipped
            return
        assert verdict != "bad", "an invalid state dict was accepted"
        # Loaded: the optimizer now holds exactly what the dict holds.
        assert opt.step_count == sd["step_count"]
        assert opt.skipped_steps == sd.get("skipped_steps", 0)
        now = opt.state_dict()
        assert set(now["state"]) == set(sd["state"])
        for key, bufs in now["state"].items():
            assert set(bufs) == set(sd["state"][key])
            for b, arr in bufs.items():
                assert arr.tobytes() == np.asarray(sd["state"][key][b]).tobytes(), (key, b)
        # ... and its next step is the reference's from that state.
        h = opt.hyperparams
        grads = [_fill(s, d, rng) for s, d in zip(shapes, dtypes)]
        snap = snapshot(opt)
        loaded_params = [p.copy() for p in params]
        try:
            assert opt.step(container(grads, kind, keys)) is True
        except Exception as exc:  # noqa: BLE001 (any type is checked below)
            assert_allowed(exc)  # e.g. a schedule refusing a value
            assert snapshot(opt) == snap
            return
        if callable(h["lr"]):
            return
        ref = ReferenceRun(name, h, loaded_params)  # its state and step count: the loaded ones
        ref.t = int(sd["step_count"])
        # (.get: Adafactor's None where a param has no such buffer)
        ref.state = {b: [now["state"][k].get(b) for k in state_keys] for b in ref.state}
        ref.scalar_state.update(now.get("schedule_free", {}))  # schedule-free's group scalars
        for b in SPECS[name].update.scalar_state:  # one array per dtype, as ReferenceRun's
            if b.name in ref.state:
                one: dict = {}
                ref.state[b.name] = [one.setdefault(a.dtype, a) for a in ref.state[b.name]]
        reference_step(ref, grads, 1.0)
        assert_matches_reference(opt, ref, state_keys)


# -- clip_grad_norm_ ----------------------------------------------------------------------------

GOOD_CLIP_KINDS = ["good"] * 4 + ["shape0", "zero_d", "huge", "nonfinite"]
BAD_CLIP_KINDS = ["readonly", "noncontig", "misaligned", "dtype", "swapped", "none", "list",
                  "same_twice", "overlapping", "same_twice", "overlapping"]
NORM_TYPES = [2.0, 2, 1, 1.0, 0.5, 3, 3.5, "inf", "INF", "Inf", math.inf, np.float32(2.0),
              np.int64(1)]
BAD_NORM_TYPES = ["fro", "2", 0, -1.0]
MAX_NORMS = [0.0, 1e-3, 1.0, 5.0, 1e30, math.inf, np.float32(2.0), 3, Fraction(1, 2)]


def _real_value(x):
    """float(x) for a non-bool real, else None (also for a huge int, beyond the float range)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        return float(x)
    except OverflowError:
        return None


def clip_arg_ok(max_norm, norm_type):
    if isinstance(norm_type, str):
        ok_p = norm_type.lower() == "inf"
    else:
        p = _real_value(norm_type)
        ok_p = p is not None and p > 0
    m = _real_value(max_norm)
    return ok_p and m is not None and m >= 0


def expected_norm(arrays, p):
    flat = np.concatenate([np.abs(a.astype(np.float64).ravel()) for a in arrays] + [np.zeros(0)])
    with np.errstate(all="ignore"):
        if p == math.inf:
            return float(np.max(flat)) if flat.size else 0.0
        return float(np.power(np.sum(flat ** p), 1.0 / p))


@settings(max_examples=400, deadline=None, suppress_health_check=SLOW_OK)
@given(seed=st.integers(0, 2 ** 32 - 1), data=st.data(), env=environments)
def test_fuzz_clip_grad_norm(seed, data, env):
    rng = np.random.default_rng(seed)
    shapes = data.draw(st.lists(shape_st, min_size=0, max_size=4), label="shapes")
    grad_slots = [f"grad{i}" for i in range(len(shapes))]
    faults = fault_slots(data.draw, grad_slots + ["container", "max_norm", "norm_type",
                                                  "error_if_nonfinite"], focus=grad_slots)
    faulty = {i for i in range(len(shapes)) if f"grad{i}" in faults}
    items = build_items(data.draw, shapes, faulty, GOOD_CLIP_KINDS, BAD_CLIP_KINDS, rng)
    ckind = data.draw(st.sampled_from(["none", "str", "set"] if "container" in faults else
                                      ["list", "list", "tuple", "dict", "single", "flat",
                                       "generator"]), label="container")
    if ckind == "single":  # one array on its own (a bad non-array item would be a container)
        items = [items[0] if items and isinstance(items[0], np.ndarray) else np.zeros(3)]
        made = items[0]
    elif ckind == "flat":
        flat = lrfast.FlatParams({f"t{i}": s for i, s in enumerate(shapes or [(3,)])})
        flat.grad[...] = rng.standard_normal(flat.grad.shape)
        items, made = [flat.grad], flat
    else:
        made = {"list": list, "tuple": tuple, "generator": lambda xs: (x for x in xs),
                "none": lambda xs: None, "str": lambda xs: "grads", "set": lambda xs: {1, 2},
                "dict": lambda xs: {f"g{i}": x for i, x in enumerate(xs)}}[ckind](items)
    max_norm = data.draw(weird_or_boundary if "max_norm" in faults
                         else st.sampled_from(MAX_NORMS), label="max_norm")
    norm_type = data.draw(st.one_of(weird, st.sampled_from(BAD_NORM_TYPES))
                          if "norm_type" in faults else st.sampled_from(NORM_TYPES),
                          label="norm_type")
    error_if = data.draw(st.one_of(weird, st.sampled_from([0, 1, "yes"]))
                         if "error_if_nonfinite" in faults else
                         st.sampled_from([False, True, np.bool_(True), np.bool_(False)]),
                         label="error_if_nonfinite")
    arrays = [a for a in items if isinstance(a, np.ndarray)]
    valid = (ckind not in ("none", "str", "set") and clip_arg_ok(max_norm, norm_type)
             and isinstance(error_if, (bool, np.bool_))
             and all(param_ok(a) for a in items) and disjoint(arrays))
    before = [a.tobytes() for a in arrays]
    expected = None
    if valid:
        p = math.inf if isinstance(norm_type, str) else float(norm_type)
        expected = expected_norm(arrays, p)
        copies = [a.copy() for a in arrays]
    with environment(*env):
        try:
            total = lrfast.clip_grad_norm_(made, max_norm, norm_type=norm_type,
                                           error_if_nonfinite=error_if)
        except Exception as exc:  # noqa: BLE001 (any type is checked below)
            documented = (RuntimeError,) if (valid and error_if
                                              and not math.isfinite(expected)) else ()
            assert_allowed(exc, documented)
            assert not valid or isinstance(exc, RuntimeError), \
                f"valid clip raised {exc!r}"
            assert [a.tobytes() for a in arrays] == before, "a failed clip changed the grads"
            return
    assert valid, "invalid clip arguments were accepted"
    assert not (error_if and not math.isfinite(expected)), \
        "error_if_nonfinite with a non-finite norm did not raise"
    if math.isnan(expected):
        assert math.isnan(total)
    else:
        assert total == pytest.approx(expected, rel=1e-9, abs=0.0) or total == expected
    coef = float(max_norm) / (total + 1e-6)
    with np.errstate(all="ignore"):
        for a, c in zip(arrays, copies):
            want = c if coef >= 1.0 else c * c.dtype.type(coef)
            np.testing.assert_allclose(a, want, **tolerances(a.dtype))


# ==============================================================================================
# Defects the fuzzing above found, fixed since: regression tests
# ==============================================================================================

def _p32():
    return [np.zeros(3, np.float32)]


def _g32():
    return [np.ones(3, np.float32)]


def _load_huge_step_then_step():
    opt = lrfast.Adam(_p32())
    sd = opt.state_dict()
    sd["step_count"] = 2 ** 63 - 1
    opt.load_state_dict(sd)  # refused now (step counts are < 2**62); it used to be accepted
    opt.step(_g32())         # and the next step overflowed a C long


KNOWN_OVERFLOWS = {
    "hyper-huge-int": lambda: lrfast.SGD(_p32(), lr=10 ** 400),
    "beta-huge-int": lambda: lrfast.Adam(_p32(), betas=(0.9, 10 ** 400)),
    "lr-setter-huge-int": lambda: setattr(lrfast.SGD(_p32()), "lr", 10 ** 400),
    "grad-scale-huge-int": lambda: lrfast.SGD(_p32()).step(_g32(), grad_scale=10 ** 400),
    "grad-scale-huge-fraction": lambda: lrfast.SGD(_p32()).step(
        _g32(), grad_scale=Fraction(10 ** 400, 3)),
    "schedule-returns-huge-int": lambda: lrfast.SGD(_p32(), lr=lambda t: 10 ** 400).step(_g32()),
    "load-step-count-2**63-1": _load_huge_step_then_step,
    "clip-max-norm-huge-int": lambda: lrfast.clip_grad_norm_([np.ones(3)], 10 ** 400),
    "clip-norm-type-huge-int": lambda: lrfast.clip_grad_norm_([np.ones(3)], 1.0,
                                                              norm_type=10 ** 400),
}


@pytest.mark.parametrize("call", list(KNOWN_OVERFLOWS.values()), ids=list(KNOWN_OVERFLOWS))
def test_huge_numbers_raise_type_or_value_error(call):
    """Huge ints used to let an OverflowError escape; now a documented error type."""
    with pytest.raises((TypeError, ValueError)):
        call()


def test_grad_scale_signaling_decimal_is_a_type_error():
    """grad_scale used to be compared with 1.0 before its type was checked."""
    with pytest.raises(TypeError):
        lrfast.SGD(_p32()).step(_g32(), grad_scale=decimal.Decimal("sNaN"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_amsgrad_max_propagates_nan_like_torch(dtype):
    """The AMSGrad max used to drop a NaN max_exp_avg_sq (torch.maximum keeps it)."""
    p = np.zeros(1, dtype)
    opt = lrfast.Adam([p], lr=0.1, amsgrad=True)
    sd = opt.state_dict()
    sd["state"][0]["max_exp_avg_sq"][:] = np.nan  # e.g. a state restored from a checkpoint
    opt.load_state_dict(sd)
    opt.step([np.ones(1, dtype)])
    assert np.isnan(opt.state_dict()["state"][0]["max_exp_avg_sq"]).all()
    assert np.isnan(p).all()


# Found by this fuzzing and fixed in 20ecd9b; kept as plain regression checks.

@pytest.mark.parametrize("api", ["step", "functional", "clip", "grad_norm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byteswapped_arrays_are_refused(api, dtype):
    p = np.zeros(3, dtype)
    g = np.array([1.0, 2.0, 3.0], np.dtype(dtype).newbyteorder())
    before = g.tobytes()
    with pytest.raises(TypeError, match="has dtype"):
        if api == "step":
            lrfast.SGD([p], lr=1.0).step([g])
        elif api == "functional":
            lrfast.functional.sgd_(p, g, step=1, lr=1.0)
        elif api == "clip":
            lrfast.clip_grad_norm_([g], 1.0)
        else:
            lrfast.grad_norm([g])
    assert not p.any() and g.tobytes() == before


@pytest.mark.parametrize("call", [
    lambda: lrfast.clip_grad_norm_([np.full(100, 1e308)], 1.0, norm_type=0.5),
    lambda: lrfast.grad_norm([np.ones(10_000)], norm_type=1e-3),
], ids=["clip-p=0.5", "grad_norm-p=1e-3"])
def test_p_below_one_norm_overflows_to_inf(call):
    assert call() == math.inf
