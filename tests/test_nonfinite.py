"""Non-finite gradients (skip_nonfinite), loss-scale unscaling (grad_scale) and flush-to-zero
(flush_subnormals), for every optimizer configuration, list and FlatParams paths."""
import numpy as np
import pytest

import lrfast
from cases import (CONFIGS, OPTIMIZERS, ReferenceRun, assert_state_close, config_id, make_grads,
                   make_params, run_python, snapshot)

SHAPES = [(5,), (40_001,), (3, 7), (0,), (9_000,)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_nonfinite_grad_skips_the_whole_step(case, dtype, bad):
    """One bad element anywhere: nothing changes, the step is counted as skipped, and the run
    then continues exactly as a run that never saw the bad gradients (vs the reference)."""
    name, hyper, _ = case
    params = make_params(SHAPES, dtype)
    ref = ReferenceRun(name, hyper, params)
    opt = OPTIMIZERS[name](params, **hyper, skip_nonfinite=True)
    rng = np.random.default_rng(3)
    for t in range(6):
        grads = make_grads(SHAPES, dtype, rng)
        assert opt.step(grads) is True
        ref.step(grads)
        # A bad gradient in a different tensor and position each time.
        k = [1, 0, 2, 4, 1, 4][t]
        bad_grads = [g.copy() for g in grads]
        bad_grads[k].flat[(t * 7919) % bad_grads[k].size] = bad
        before = snapshot(opt)
        assert opt.step(bad_grads) is False
        assert snapshot(opt) == before
        assert opt.skipped_steps == t + 1
    assert opt.step_count == 6
    assert_state_close(opt, ref.params, ref.state, dtype)


def test_without_the_option_nan_goes_through():
    """The default does not check: a NaN gradient reaches the parameter (torch's behaviour)."""
    p = [np.zeros(4)]
    opt = lrfast.SGD(p, lr=0.1)
    assert opt.step([np.array([1.0, np.nan, 0.0, 0.0])]) is True
    assert np.isnan(p[0][1]) and p[0][0] == -0.1
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("where", ["float32", "float64"])
def test_skip_is_atomic_across_dtype_banks(where):
    """Mixed float32/float64 params are two native calls: a NaN in either skips both."""
    params = [np.ones(10_000, np.float32), np.ones(7, np.float64), np.ones(3, np.float32)]
    opt = lrfast.Adam(params, lr=0.1, skip_nonfinite=True)
    grads = [np.ones(10_000, np.float32), np.ones(7, np.float64), np.ones(3, np.float32)]
    opt.step(grads)
    before = snapshot(opt)
    grads[0 if where == "float32" else 1][-1] = np.nan
    assert opt.step(grads) is False
    assert snapshot(opt) == before and opt.skipped_steps == 1


def test_skip_on_flat_params_and_schedule_does_not_advance():
    flat = lrfast.FlatParams({"w": (300, 20), "b": (20,)}, np.float32)
    sched = lrfast.schedules.linear(1.0, 0.0, 10)
    opt = lrfast.SGD(flat, lr=sched, momentum=0.9, skip_nonfinite=True)
    flat.grad[...] = 1.0
    opt.step()
    assert opt.last_lr == 1.0
    flat.grads["b"][3] = np.inf
    before = snapshot(opt)
    assert opt.step() is False
    assert snapshot(opt) == before
    flat.grad[...] = 1.0
    opt.step()
    assert opt.step_count == 2 and opt.last_lr == sched(1) and opt.skipped_steps == 1


def test_skipped_steps_survive_state_dict():
    p = [np.ones(3)]
    opt = lrfast.Adam(p, skip_nonfinite=True)
    opt.step([np.array([np.nan, 0.0, 0.0])])
    other = lrfast.Adam([np.ones(3)], skip_nonfinite=True)
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1
    sd = opt.state_dict()
    del sd["skipped_steps"]  # a state dict from before the counter existed
    other.load_state_dict(sd)
    assert other.skipped_steps == 0


# --------------------------------------------------------------------------------------------
# grad_scale
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1024.0, 3.0, 0.25])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_grad_scale_is_unscaling_inside_the_update(case, dtype, scale):
    """step(g, grad_scale=s) is the reference stepped with g * (1/s), the factor computed in
    double and rounded to the dtype (as a GradScaler unscales); the grads are not written."""
    name, hyper, _ = case
    params = make_params(SHAPES, dtype)
    ref = ReferenceRun(name, hyper, params)
    opt = OPTIMIZERS[name](params, **hyper)
    rng = np.random.default_rng(5)
    inv = np.dtype(dtype).type(1.0 / scale)
    for _ in range(4):
        grads = [g * np.dtype(dtype).type(scale) for g in make_grads(SHAPES, dtype, rng)]
        kept = [g.tobytes() for g in grads]
        opt.step(grads, grad_scale=scale)
        assert [g.tobytes() for g in grads] == kept
        ref.step([g * inv for g in grads])
    assert_state_close(opt, ref.params, ref.state, dtype)


def test_grad_scale_power_of_two_is_bitwise_the_unscaled_step():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(1000).astype(np.float32)
    a, b = [np.ones(1000, np.float32)], [np.ones(1000, np.float32)]
    oa, ob = lrfast.Adam(a, lr=0.1), lrfast.Adam(b, lr=0.1)
    for _ in range(3):
        oa.step([g])
        ob.step([g * np.float32(65536.0)], grad_scale=65536.0)
    assert a[0].tobytes() == b[0].tobytes()


def test_scaled_overflow_is_caught_after_unscaling():
    """With grad_scale < 1 a finite grad can overflow once unscaled: that step is skipped."""
    big = np.finfo(np.float32).max
    p = [np.zeros(3, np.float32)]
    opt = lrfast.SGD(p, lr=0.1, skip_nonfinite=True)
    assert opt.step([np.array([1, big, 2], np.float32)]) is True
    assert opt.step([np.array([1, big, 2], np.float32)], grad_scale=0.5) is False


@pytest.mark.parametrize("scale, exc, pattern", [
    (0.0, ValueError, "finite and > 0"),
    (-2.0, ValueError, "finite and > 0"),
    (float("inf"), ValueError, "finite and > 0"),
    (float("nan"), ValueError, "finite and > 0"),
    ("2", TypeError, "real number"),
    (True, TypeError, "real number"),
    (None, TypeError, "real number"),
])
def test_bad_grad_scale_changes_nothing(scale, exc, pattern):
    p = [np.ones(4)]
    opt = lrfast.Adam(p)
    before = snapshot(opt)
    with pytest.raises(exc, match=pattern):
        opt.step([np.ones(4)], grad_scale=scale)
    assert snapshot(opt) == before


@pytest.mark.parametrize("option", ["skip_nonfinite", "flush_subnormals"])
def test_options_must_be_bool(option):
    with pytest.raises(TypeError, match=option):
        lrfast.Adam([np.ones(2)], **{option: "yes"})


# --------------------------------------------------------------------------------------------
# flush_subnormals
# --------------------------------------------------------------------------------------------

needs_ftz = pytest.mark.skipif(not lrfast._dispatch.kernels.has_flush_to_zero(),
                               reason="no flush-to-zero on this CPU architecture")


@needs_ftz
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flush_subnormals_reads_subnormal_grads_as_zero(dtype):
    tiny = np.finfo(dtype).tiny
    n = 50_000
    g = [np.full(n, tiny / 4, dtype)]
    flushed, kept = [np.ones(n, dtype)], [np.ones(n, dtype)]
    fo = lrfast.Adam(flushed, flush_subnormals=True)
    ko = lrfast.Adam(kept)
    with lrfast.threads(2):
        fo.step(g)
        ko.step(g)
    fs, ks = fo.state_dict()["state"][0], ko.state_dict()["state"][0]
    # Flushed: the gradient read as 0, so the moments stay 0 and the param does not move.
    assert not fs["exp_avg"].any() and not fs["exp_avg_sq"].any()
    assert flushed[0].tobytes() == np.ones(n, dtype).tobytes()
    # Not flushed: the first moment holds subnormals, as the reference computes.
    ref = ReferenceRun("Adam", {}, [np.ones(n, dtype)])
    ref.step(g)
    assert ks["exp_avg"].tobytes() == ref.state["exp_avg"][0].tobytes()
    assert ks["exp_avg"].any()


@needs_ftz
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_flush_subnormals_changes_nothing_on_normal_numbers(case, dtype):
    name, hyper, _ = case
    a, b = make_params(SHAPES, dtype), make_params(SHAPES, dtype)
    oa = OPTIMIZERS[name](a, **hyper)
    ob = OPTIMIZERS[name](b, **hyper, flush_subnormals=True)
    rng = np.random.default_rng(8)
    for _ in range(3):
        g = make_grads(SHAPES, dtype, rng)
        oa.step(g)
        ob.step(g)
    assert snapshot(oa)[:2] == snapshot(ob)[:2]


@needs_ftz
def test_flush_mode_is_restored_after_the_step():
    """The kernel's threads get their floating-point mode back: a later step without the
    option (same OpenMP threads) and NumPy in the calling thread still produce subnormals."""
    code = """
import numpy as np, lrfast
tiny = np.finfo(np.float32).tiny
n = 200_000
g = [np.full(n, tiny / 4, np.float32)]
with lrfast.threads(2):
    lrfast.SGD([np.ones(n, np.float32)], lr=1.0, flush_subnormals=True).step(g)
    p = [np.zeros(n, np.float32)]
    lrfast.SGD(p, lr=1.0).step(g)
assert (p[0] == -tiny / 4).all(), p[0][:3]
x = np.float32(tiny)
assert x / np.float32(4) != 0
print("ok")
"""
    out = run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
