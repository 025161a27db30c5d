"""Bad input gets a clear error and changes nothing.

One table of bad constructor arguments, one of bad steps, one of bad state dicts, one of bad
functional calls. Each entry names the exception and a pattern of its message; for steps and
loads the test also checks that every param and state buffer is bit-identical afterwards and
that the step counter did not move.
"""
import re

import numpy as np
import pytest

import lrfast
from lrfast import functional as F
from cases import snapshot

SHAPES = [(5,), (2, 3), (40_000,)]  # the last one is split across threads


def good_params(dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def good_grads(dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def noncontig(shape, dtype=np.float32):
    return np.zeros((shape[0] * 2,) + shape[1:], dtype)[::2]


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------

P = good_params

BAD_CONSTRUCTORS = [
    ("neg-lr", lambda: lrfast.SGD(P(), lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    ("nan-lr", lambda: lrfast.Adam(P(), lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    ("str-lr", lambda: lrfast.Adam(P(), lr="0.1"), TypeError, "must be a real number"),
    ("beta1=1", lambda: lrfast.Adam(P(), betas=(1.0, 0.999)), ValueError,
     "Invalid beta parameter at index 0: 1.0"),
    ("beta2<0", lambda: lrfast.AdamW(P(), betas=(0.9, -0.1)), ValueError,
     "Invalid beta parameter at index 1: -0.1"),
    ("betas-len", lambda: lrfast.Adam(P(), betas=(0.9,)), ValueError, "betas must be a pair"),
    ("neg-eps", lambda: lrfast.Adam(P(), eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    ("neg-wd", lambda: lrfast.Adam(P(), weight_decay=-0.1), ValueError,
     "Invalid weight_decay value: -0.1"),
    ("neg-momentum", lambda: lrfast.SGD(P(), momentum=-0.5), ValueError,
     "Invalid momentum value: -0.5"),
    ("nesterov-no-momentum", lambda: lrfast.SGD(P(), nesterov=True), ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    ("nesterov-dampening", lambda: lrfast.SGD(P(), momentum=0.9, dampening=0.1, nesterov=True),
     ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    ("neg-lr-decay", lambda: lrfast.Adagrad(P(), lr_decay=-1), ValueError,
     "Invalid lr_decay value: -1"),
    ("neg-init-acc", lambda: lrfast.Adagrad(P(), initial_accumulator_value=-1), ValueError,
     "Invalid initial_accumulator_value value: -1"),
    ("neg-alpha", lambda: lrfast.RMSprop(P(), alpha=-0.1), ValueError, "Invalid alpha value: -0.1"),
    ("alpha>1", lambda: lrfast.RMSprop(P(), alpha=1.5), ValueError, "Invalid alpha value: 1.5"),
    ("amsgrad-not-bool", lambda: lrfast.Adam(P(), amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    ("empty-list", lambda: lrfast.Adam([]), ValueError, "optimizer got an empty parameter list"),
    ("empty-dict", lambda: lrfast.Adam({}), ValueError, "optimizer got an empty parameter list"),
    ("single-array", lambda: lrfast.Adam(np.zeros(3)), TypeError, "not a single array"),
    ("not-array", lambda: lrfast.Adam([[1.0, 2.0]]), TypeError,
     r"params\[0\] must be a numpy.ndarray, got list"),
    ("int-param", lambda: lrfast.Adam([np.zeros(3, np.int64)]), TypeError,
     r"params\[0\] has dtype int64"),
    ("complex-param", lambda: lrfast.Adam([np.zeros(3, np.complex128)]), TypeError,
     "has dtype complex128"),
    ("int32-param", lambda: lrfast.SGD([np.zeros(3, np.int32)]), TypeError,
     "has dtype int32; lrfast updates float32, float64, float16 and bfloat16 arrays"),
    ("uint16-param", lambda: lrfast.SGD([np.zeros(3, np.uint16)]), TypeError,
     "uint16 bits with bfloat16_bits=True"),
    ("noncontig-param", lambda: lrfast.Adam([noncontig((4,))]), ValueError, "is not C-contiguous"),
    ("readonly-param", lambda: lrfast.Adam([readonly(np.zeros(3))]), ValueError, "is read-only"),
]


@pytest.mark.parametrize("make, exc, pattern", [c[1:] for c in BAD_CONSTRUCTORS],
                         ids=[c[0] for c in BAD_CONSTRUCTORS])
def test_bad_constructor(make, exc, pattern):
    with pytest.raises(exc, match=re.escape(pattern) if "\\" not in pattern else pattern):
        make()


def test_same_array_twice_and_overlapping_params():
    p = np.zeros(10)
    before = p.tobytes()
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        lrfast.Adam([p, p])
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        lrfast.SGD([p[:6], p[4:]])
    assert p.tobytes() == before


# --------------------------------------------------------------------------------------------
# Steps: (id, optimizer factory, grads factory taking the params, exception, pattern)
# --------------------------------------------------------------------------------------------

def adam(params):
    return lrfast.Adam(params, lr=0.01, amsgrad=True)


def sgd(params):
    return lrfast.SGD(params, lr=0.01, momentum=0.9)


def rms(params):
    return lrfast.RMSprop(params, lr=0.01, momentum=0.9, centered=True)


def with_last(grads, replacement):
    """Good grads except the last one: the bad tensor comes after tensors that would be written."""
    return grads[:-1] + [replacement]


BAD_STEPS = [
    ("dtype-mismatch", adam, lambda p: with_last(good_grads(), good_grads(np.float64)[-1]),
     TypeError, r"grads\[2\] has dtype float64, but its parameter has dtype float32"),
    ("int-grad", sgd, lambda p: with_last(good_grads(), np.zeros(40_000, np.int32)),
     TypeError, r"grads\[2\] has dtype int32"),
    ("complex-grad", rms, lambda p: with_last(good_grads(), np.zeros(40_000, np.complex64)),
     TypeError, r"grads\[2\] has dtype complex64"),
    ("float16-grad", adam, lambda p: with_last(good_grads(), np.zeros(40_000, np.float16)),
     TypeError, r"grads\[2\] has dtype float16"),
    ("byte-swapped-grad", adam,
     lambda p: with_last(good_grads(), good_grads()[-1].astype(np.dtype(np.float32).newbyteorder())),
     TypeError, r"grads\[2\] has dtype >f4, but its parameter has dtype float32"),
    ("shape-mismatch", adam, lambda p: with_last(good_grads(), np.zeros(39_999, np.float32)),
     ValueError, r"grads\[2\] has shape \(39999,\), but its parameter has shape \(40000,\)"),
    ("ndim-mismatch", sgd, lambda p: [good_grads()[0], np.zeros(6, np.float32), good_grads()[2]],
     ValueError, r"grads\[1\] has shape \(6,\), but its parameter has shape \(2, 3\)"),
    ("too-few", adam, lambda p: good_grads()[:2], ValueError, "expected 3 grads"),
    ("too-many", adam, lambda p: good_grads() + [np.zeros(1, np.float32)], ValueError,
     "expected 3 grads"),
    ("noncontig", rms, lambda p: with_last(good_grads(), noncontig((40_000,))), ValueError,
     r"grads\[2\] is not C-contiguous"),
    ("grad-is-param", adam, lambda p: with_last(good_grads(), p[2]), ValueError,
     r"grads\[2\] shares memory with a parameter"),
    ("grad-view-of-param", sgd, lambda p: [good_grads()[0], p[1][:, ::-1].copy(), p[2][::1]],
     ValueError, r"grads\[2\] shares memory"),
    ("grad-is-other-param", adam, lambda p: [p[0][::1].reshape(5).copy(), good_grads()[1],
                                             np.frombuffer(p[2], np.float32).reshape(40_000)],
     ValueError, r"grads\[2\] shares memory"),
    ("grad-overlaps-other-param", rms, lambda p: [good_grads()[0],
                                                  p[2][10:16].reshape(2, 3), good_grads()[2]],
     ValueError, r"grads\[1\] shares memory"),
    ("not-array", adam, lambda p: with_last(good_grads(), [0.0] * 40_000), TypeError,
     r"grads\[2\] must be a numpy.ndarray, got list"),
    ("dict-for-list", adam, lambda p: {0: good_grads()[0]}, TypeError, "must be a list or tuple"),
    ("scalar", adam, lambda p: 3.0, TypeError, "grads must be a list, tuple or dict"),
]


@pytest.mark.parametrize("make_opt, make_grads, exc, pattern", [c[1:] for c in BAD_STEPS],
                         ids=[c[0] for c in BAD_STEPS])
def test_bad_step_changes_nothing(make_opt, make_grads, exc, pattern):
    params = good_params()
    opt = make_opt(params)
    for seed in range(3):
        opt.step(good_grads(seed=seed))
    before = snapshot(opt)
    with pytest.raises(exc, match=pattern):
        opt.step(make_grads(params))
    assert snapshot(opt) == before


def test_bad_schedule_value_changes_nothing():
    params = good_params()

    def schedule(t):
        return 0.1 if t < 2 else (-1.0 if t == 2 else float("nan"))

    opt = lrfast.Adam(params, lr=schedule)
    opt.step(good_grads())
    opt.step(good_grads())
    before = snapshot(opt)
    with pytest.raises(ValueError, match="schedule returned -1.0 at step 2"):
        opt.step(good_grads())
    assert snapshot(opt) == before


def test_dict_grads_must_match_keys():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(4), "b": rng.standard_normal(2)}
    opt = lrfast.SGD(params, lr=0.1, momentum=0.5)
    opt.step({"w": np.ones(4), "b": np.ones(2)})
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        opt.step({"w": np.ones(4), "c": np.ones(2)})
    with pytest.raises(TypeError, match="grads must be a dict"):
        opt.step([np.ones(4), np.ones(2)])
    assert snapshot(opt) == before


# --------------------------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------------------------

def _sd():
    opt = lrfast.Adam(good_params(), lr=0.01)
    opt.step(good_grads())
    return opt.state_dict()


def _edit(fn):
    def make():
        sd = _sd()
        fn(sd)
        return sd
    return make


BAD_STATE_DICTS = [
    ("not-dict", lambda: [1, 2], TypeError, "state_dict must be a dict"),
    ("no-state", _edit(lambda sd: sd.pop("state")), ValueError, "missing 'state'"),
    ("other-optimizer", _edit(lambda sd: sd.update(optimizer="SGD")), ValueError,
     "saved by 'SGD', not 'Adam'"),
    ("neg-step", _edit(lambda sd: sd.update(step_count=-1)), ValueError, "step_count"),
    ("bad-hyper", _edit(lambda sd: sd["hyperparams"].update(eps=-1.0)), ValueError,
     "Invalid epsilon value: -1.0"),
    ("missing-hyper", _edit(lambda sd: sd["hyperparams"].pop("betas")), ValueError,
     "must have the keys"),
    ("missing-param", _edit(lambda sd: sd["state"].pop(2)), ValueError, "one entry per parameter"),
    ("extra-param", _edit(lambda sd: sd["state"].update({3: {}})), ValueError,
     "one entry per parameter"),
    ("missing-buffer", _edit(lambda sd: sd["state"][1].pop("exp_avg_sq")), ValueError,
     "must hold"),
    ("wrong-shape", _edit(lambda sd: sd["state"][2].update(exp_avg=np.zeros(39_999, np.float32))),
     ValueError, "has shape (39999,), but the parameter has shape (40000,)"),
    ("wrong-dtype", _edit(lambda sd: sd["state"][0].update(exp_avg=np.zeros(5))), TypeError,
     "has dtype float64, but this optimizer keeps it as float32"),
    ("not-array", _edit(lambda sd: sd["state"][0].update(exp_avg=[0.0] * 5)), TypeError,
     "must be a numpy.ndarray"),
]


@pytest.mark.parametrize("make_sd, exc, pattern", [c[1:] for c in BAD_STATE_DICTS],
                         ids=[c[0] for c in BAD_STATE_DICTS])
def test_bad_load_changes_nothing(make_sd, exc, pattern):
    opt = lrfast.Adam(good_params(), lr=0.01)
    for seed in range(2):
        opt.step(good_grads(seed=seed + 5))
    before = snapshot(opt)
    hyper = opt.hyperparams
    with pytest.raises(exc, match=re.escape(pattern)):
        opt.load_state_dict(make_sd())
    assert snapshot(opt) == before
    assert opt.hyperparams == hyper


# --------------------------------------------------------------------------------------------
# lrfast.functional
# --------------------------------------------------------------------------------------------

def _adam_kw(**kw):
    return dict(dict(step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8), **kw)


def _arrays(n=6, dtype=np.float64):
    rng = np.random.default_rng(3)
    return [rng.standard_normal(n).astype(dtype) for _ in range(5)]


BAD_FUNCTIONAL = [
    ("step-0", lambda a: F.adam_(a[0], a[1], a[2], a[3], **_adam_kw(step=0)), ValueError,
     "step must be an int >= 1"),
    ("state-shape", lambda a: F.adam_(a[0], a[1], a[2][:5], a[3], **_adam_kw()), ValueError,
     "exp_avg has shape (5,), but param has shape (6,)"),
    ("state-dtype", lambda a: F.adam_(a[0], a[1], a[2].astype(np.float32), a[3], **_adam_kw()),
     TypeError, "exp_avg has dtype float32, but param has dtype float64"),
    ("amsgrad-no-buffer", lambda a: F.adam_(a[0], a[1], a[2], a[3], **_adam_kw(amsgrad=True)),
     ValueError, "amsgrad=True needs a max_exp_avg_sq buffer"),
    ("state-is-param", lambda a: F.adam_(a[0], a[1], a[0], a[3], **_adam_kw()), ValueError,
     "exp_avg shares memory with param"),
    ("grad-is-state", lambda a: F.adam_(a[0], a[3], a[2], a[3], **_adam_kw()), ValueError,
     "grad shares memory with a parameter or optimizer state"),
    ("list-length", lambda a: F.sgd_([a[0], a[1]], [a[2]], step=1, lr=0.1), ValueError,
     "grad has 1 tensors, but param has 2"),
    ("mixed-single-list", lambda a: F.sgd_(a[0], [a[1]], step=1, lr=0.1), TypeError,
     "param is a single array, so grad must be one too"),
    ("sgd-no-buffer", lambda a: F.sgd_(a[0], a[1], step=1, lr=0.1, momentum=0.9), ValueError,
     "momentum != 0 needs a momentum_buffer"),
    ("rms-centered-no-avg", lambda a: F.rmsprop_(a[0], a[1], a[2], lr=0.1, centered=True),
     ValueError, "centered=True needs a grad_avg buffer"),
    ("adagrad-readonly-sum", lambda a: F.adagrad_(a[0], a[1], readonly(a[2]), step=1, lr=0.1),
     ValueError, "state_sum is read-only"),
    ("schedule-as-lr", lambda a: F.sgd_(a[0], a[1], step=1, lr=lambda t: 0.1), TypeError,
     "lr must be a float in lrfast.functional"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in BAD_FUNCTIONAL],
                         ids=[c[0] for c in BAD_FUNCTIONAL])
def test_bad_functional_changes_nothing(call, exc, pattern):
    arrays = _arrays()
    before = [a.tobytes() for a in arrays]
    with pytest.raises(exc, match=re.escape(pattern)):
        call(arrays)
    assert [a.tobytes() for a in arrays] == before
