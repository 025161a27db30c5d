"""The compiled optimizers against lrfast.reference, in lockstep, on params and every state
buffer, for every configuration of the registry, float32 and float64."""
import numpy as np
import pytest

import lrfast
from cases import (
    CONFIGS,
    OPTIMIZERS,
    ReferenceRun,
    assert_state_close,
    config_id,
    make_grads,
    make_params,
)

# One optimizer over tensors of every awkward size: empty, one element, odd, 2-D, and a large one
# that is split across threads (with the small ones batched into the first thread's span).
SHAPES = [(0,), (1,), (7,), (3, 5), (1_000_003,), (0, 4), (33,)]
STEPS = 50


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_class_matches_reference(case, dtype):
    name, hyper, _ = case
    params = make_params(SHAPES, dtype)
    ref = ReferenceRun(name, hyper, params)
    opt = OPTIMIZERS[name](params, **hyper)
    rng = np.random.default_rng(1)
    for _ in range(STEPS):
        grads = make_grads(SHAPES, dtype, rng)
        opt.step(grads)
        ref.step(grads)
    assert opt.step_count == STEPS
    assert_state_close(opt, ref.params, ref.state, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_functional_matches_reference_single_tensor(case, dtype):
    """lrfast.functional on one array (not a list) against lrfast.reference on the same."""
    name, hyper, _ = case
    shape = (257,)
    ref = ReferenceRun(name, hyper, make_params([shape], dtype))
    fast = ReferenceRun(name, hyper, make_params([shape], dtype))
    rng = np.random.default_rng(2)
    for t in range(1, 21):
        (g,) = make_grads([shape], dtype, rng)
        ref.step([g])
        fast.t = t
        _functional_step(fast, g)
    assert_close_runs(fast, ref, dtype)


def _functional_step(run, g):
    """One lrfast.functional call on single arrays, with the hyper-parameters of ``run``."""
    from lrfast import functional

    run.call(functional, g, single=True)


def assert_close_runs(fast, ref, dtype):
    from cases import tolerances

    tol = tolerances(dtype)
    np.testing.assert_allclose(fast.params[0], ref.params[0], **tol)
    for name in ref.state:
        if ref.state[name][0] is None:  # a buffer this param's shape has not (Adafactor)
            assert fast.state[name][0] is None, name
            continue
        np.testing.assert_allclose(fast.state[name][0], ref.state[name][0], err_msg=name, **tol)


def test_mixed_dtypes_in_one_optimizer():
    """float32 and float64 tensors in one optimizer: one call per dtype, each exact."""
    p32 = make_params([(100,), (5, 5)], np.float32)
    p64 = make_params([(64,), (3,)], np.float64, seed=3)
    params = [p32[0], p64[0], p32[1], p64[1]]
    ref = ReferenceRun("Adam", dict(lr=0.01), params)
    opt = lrfast.Adam(params, lr=0.01)
    rng = np.random.default_rng(4)
    for _ in range(10):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
        opt.step(grads)
        ref.step(grads)
    for p, rp in zip(params, ref.params):
        np.testing.assert_allclose(p, rp, rtol=1e-6 if p.dtype == np.float32 else 1e-12)


def test_dict_params_and_schedule():
    """Named parameters (dict) and a callable lr: schedule(step_count) is used for each update."""
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    plain = [params["w"].copy(), params["b"].copy()]

    def schedule(t):
        return 0.1 * 0.5 ** t

    opt = lrfast.SGD(params, lr=schedule, momentum=0.9)
    ref_buf = [np.zeros_like(p) for p in plain]
    lrs = []
    for t in range(6):
        grads = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
        opt.step(grads)
        lrs.append(opt.last_lr)
        lrfast.reference.sgd_(plain, [grads["w"], grads["b"]], ref_buf, step=t + 1,
                              lr=schedule(t), momentum=0.9)
    assert lrs == [0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125]
    np.testing.assert_allclose(params["w"], plain[0], rtol=1e-12)
    np.testing.assert_allclose(params["b"], plain[1], rtol=1e-12)
    assert set(opt.state_dict()["state"]) == {"w", "b"}


def test_zero_size_only():
    params = [np.zeros((0,), np.float32), np.zeros((2, 0), np.float32)]
    opt = lrfast.Adam(params)
    opt.step([np.zeros((0,), np.float32), np.zeros((2, 0), np.float32)])
    assert opt.step_count == 1
    assert opt.state_dict()["state"][1]["exp_avg"].shape == (2, 0)


def test_hand_computed_first_adam_step():
    """At t=1 Adam moves each weight by lr * sign(g) (up to eps): 1 - 0.1 * 1 and 2 + 0.1."""
    p = np.array([1.0, 2.0])
    lrfast.Adam([p], lr=0.1, eps=0.0).step([np.array([3.0, -0.5])])
    np.testing.assert_allclose(p, [0.9, 2.1], rtol=0, atol=1e-15)


def test_hand_computed_sgd_momentum():
    """buf1 = g1 = 1; buf2 = 0.9*1 + 2 = 2.9; p = 0 - 0.1*1 - 0.1*2.9 = -0.39."""
    p = np.zeros(1)
    opt = lrfast.SGD([p], lr=0.1, momentum=0.9)
    opt.step([np.array([1.0])])
    opt.step([np.array([2.0])])
    np.testing.assert_allclose(p, [-0.39], rtol=1e-15)


def test_hand_computed_first_rmsprop_and_adagrad_steps():
    """RMSprop, alpha=0.99: v = 0.01 g^2, so p -= lr g / (0.1 |g|) = 10 lr sign(g).
    Adagrad with eps inside the sqrt: s = 0 + 9 = 9, p -= 0.5 * 3 / sqrt(9 + 7) = 0.375."""
    p = np.array([1.0, -1.0])
    lrfast.RMSprop([p], lr=0.01, eps=0.0).step([np.array([4.0, -0.25])])
    np.testing.assert_allclose(p, [0.9, -0.9], rtol=1e-14)
    q = np.array([2.0])
    lrfast.Adagrad([q], lr=0.5, eps=7.0, eps_inside_sqrt=True).step([np.array([3.0])])
    np.testing.assert_allclose(q, [1.625], rtol=1e-15)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lr_set_between_steps(name):
    """``opt.lr = value`` before each step (a hand-driven schedule, as python -m lrfast compare
    drives them): each step as the reference's at that step's rate. (Adafactor's setter once
    failed: its state allocation did not set the scalar-state list the setter reads.)"""
    params = make_params([(5,), (2, 3)], np.float64)
    ref = ReferenceRun(name, dict(lr=0.01), params)
    opt = OPTIMIZERS[name]([p.copy() for p in params], lr=0.01)
    rng = np.random.default_rng(2)
    for t, lr in enumerate([0.01, 0.03, 0.002, 0.02]):
        grads = make_grads([(5,), (2, 3)], np.float64, rng)
        opt.lr = lr
        opt.step(grads)
        ref.step(grads, lr=lr)
        for p, r in zip(opt.params, ref.params):
            np.testing.assert_allclose(p, r, rtol=1e-12, atol=1e-14)
