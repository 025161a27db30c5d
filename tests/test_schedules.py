"""Schedules: every one against its NumPy reference over >= 2,000 steps and every boundary, the
vector path equal to the scalar path, huge steps, bad input, descriptions, plateau control, and
schedule-driven optimizers that resume exactly."""
import json
import math

import numpy as np
import pytest

import lrfast
import lrfast.schedules as S
from lrfast import reference as R
from cases import snapshot

# One table of schedules; each entry also lists the steps where its formula changes (boundaries).
SCHEDULES = [
    ("constant", S.constant(0.3), []),
    ("step", S.step_decay(0.1, 0.5, 7), [7, 14, 21]),
    ("exp-stair-begin-end", S.exponential_decay(0.1, 0.9, 10, True, 5, 0.01), [5, 15, 225]),
    ("exp-growth-capped", S.exponential_decay(0.1, 1.01, 1, end_value=0.5), [161, 162]),
    ("natural-exp", S.natural_exp_decay(0.1, 0.01), []),
    ("inverse-time-stair", S.inverse_time_decay(0.1, 0.5, 10, True), [10, 20]),
    ("inverse-time", S.inverse_time_decay(0.1, 0.5, 10), []),
    ("poly-begin", S.polynomial_decay(0.1, 0.01, 100, 2.0, 5), [5, 105]),
    ("poly-cycle", S.polynomial_decay(0.1, 0.01, 100, 2.0, cycle=True), [100, 101, 200, 201]),
    ("linear", S.linear(0.1, 0.0, 1000), [1000]),
    ("linear-factor", S.linear_factor(0.1, 0.25, 1.0, 40), [40]),
    ("cosine-alpha-exp", S.cosine_decay(0.1, 500, alpha=0.1, exponent=2.0), [500]),
    ("cosine-periodic", S.cosine_decay(0.1, 300, end_value=0.01, periodic=True), [300, 600]),
    ("restarts-mult2-decay", S.cosine_restarts(0.1, 50, 2.0, 0.001, 0.7), [50, 150, 350, 750]),
    ("restarts-mult1.5", S.cosine_restarts(0.1, 40, 1.5, 0.0), [40, 100, 190]),
    ("restarts", S.cosine_restarts(0.1, 50), [50, 100]),
    ("one-cycle", S.one_cycle(0.1, 1000), [299, 300, 999, 1000]),
    ("one-cycle-3-linear", S.one_cycle(0.1, 1000, three_phase=True, anneal_strategy="linear"),
     [299, 300, 598, 599, 999]),
    ("cyclic-tri2", S.cyclic(0.01, 0.1, 100, 50, "triangular2"), [100, 150, 250, 300]),
    ("cyclic-exp", S.cyclic(0.01, 0.1, 100, mode="exp_range", gamma=0.999), [100, 200]),
    ("cyclic", S.cyclic(0.01, 0.1, 100), [100, 200]),
    ("multistep", S.multistep(0.1, [100, 500, 900], 0.3), [100, 500, 900]),
    ("piecewise-gt", S.piecewise_constant([10, 20], [1.0, 0.5, 0.25], "gt"), [10, 11, 20, 21]),
    ("interp-cosine", S.piecewise_interpolate([0, 100, 1000], [0.0, 1.0, 0.1], "cosine"),
     [100, 1000]),
    ("interp-linear", S.piecewise_interpolate([10, 100], [0.5, 1.0]), [10, 100]),
    ("onecycle-optax-cos", S.cosine_onecycle(1000, 0.1), [300, 1000]),
    ("onecycle-optax-lin", S.linear_onecycle(1000, 0.1), [300, 1000]),
    ("inverse-sqrt", S.inverse_sqrt(0.1, 100), [100]),
    ("warmup-prefix", S.warmup(S.cosine_decay(0.1, 1000), 100, 0.01), [100, 1100]),
    ("warmup-overlap", S.warmup(S.cosine_decay(0.1, 1000), 100, 0.01, overlap=True), [100, 1000]),
    ("warmup-cosine", S.warmup_cosine(0.0, 0.1, 100, 1000, 0.001), [100, 1000]),
    ("warmup-cosine-keras", S.warmup_cosine(0.0, 0.1, 100, 1000, 0.001,
                                            decay_includes_warmup=False), [100, 1100]),
    ("wsd-sqrt", S.wsd(0.1, 100, 500, 300, decay_shape="sqrt"), [100, 600, 900]),
    ("wsd-cosine", S.wsd(0.1, 100, 500, 300, init_value=0.01, end_value=0.001,
                         decay_shape="cosine"), [100, 600, 900]),
    ("wsd-no-warmup", S.wsd(0.1, 0, 500, 300), [500, 800]),
    ("join-mixed", S.join([S.constant(0.1), S.linear(0.1, 0.0, 100), S.constant(0.5)], [50, 300],
                          local=[True, True, False]), [50, 150, 300]),
    ("clamp", S.clamp(S.cosine_decay(0.2, 100), 0.05, 0.1), [33, 67, 100]),
    ("scale", S.scale(S.inverse_sqrt(1.0, 10), 0.5), [10]),
    ("product", S.warmup(S.constant(1.0), 50) * S.exponential_decay(0.1, 0.5, 100), [50]),
]
IDS = [c[0] for c in SCHEDULES]
HUGE = [2**31, 2**31 + 1, 2**40, 2**53 + 1, 2**62 - 1, 2**62]


def steps_for(boundaries):
    near = [b + d for b in boundaries for d in (-1, 0, 1) if b + d >= 0]
    return np.unique(np.concatenate([np.arange(2500), near, HUGE]).astype(np.int64))


@pytest.mark.parametrize("name, sched, boundaries", SCHEDULES, ids=IDS)
def test_matches_reference_and_scalar_path(name, sched, boundaries):
    t = steps_for(boundaries)
    vec = sched(t)
    ref = R.schedule_values(sched.to_dict(), t)
    assert vec.dtype == np.float64 and vec.shape == t.shape
    assert np.all(np.isfinite(vec)), name
    np.testing.assert_allclose(vec, ref, rtol=1e-12, atol=1e-300)
    scalar = np.array([sched(int(x)) for x in t])
    assert np.array_equal(vec, scalar)  # element for element, bit for bit


@pytest.mark.parametrize("name, sched, boundaries", SCHEDULES, ids=IDS)
def test_description_round_trip(name, sched, boundaries):
    spec = json.loads(json.dumps(sched.to_dict()))
    again = S.from_dict(spec)
    assert repr(again) == repr(sched) and again == sched
    t = steps_for(boundaries)
    assert np.array_equal(again(t), sched(t))
    assert repr(sched).startswith(sched.to_dict()["type"] + "(")


def test_vector_path_shapes_dtypes_and_threads():
    s = S.warmup_cosine(0.0, 0.1, 100, 10_000)
    t = np.arange(40_000, dtype=np.int64)
    with lrfast.threads(1):
        one = s(t)
    with lrfast.threads(2):
        two = s(t)
    assert np.array_equal(one, two)
    for dtype in (np.int8, np.int16, np.int32, np.uint16, np.uint32, np.uint64):
        small = np.arange(100, dtype=dtype)
        assert np.array_equal(s(small), one[:100])
    grid = t[:600].reshape(20, 30)
    assert s(grid).shape == (20, 30) and np.array_equal(s(grid).ravel(), one[:600])
    assert s(t[::7]).tolist() == one[::7].tolist()          # non-contiguous input
    assert s(np.array([], dtype=np.int64)).shape == (0,)
    assert s(np.int64(5)) == s(5) and isinstance(s(5), float)


@pytest.mark.parametrize("bad, exc, pattern", [
    (-1, ValueError, "step must be >= 0"),
    (2**63, ValueError, "does not fit in 64 bits"),
    (1.0, TypeError, "step must be an int"),
    ("3", TypeError, "step must be an int"),
    (True, TypeError, "step must be an int"),
    (None, TypeError, "step must be an int"),
    (np.array([0, 5, -2]), ValueError, "steps must be >= 0, got -2"),
    (np.array([0.0, 1.0]), TypeError, "steps must be an integer array"),
    (np.array([2**64 - 1], dtype=np.uint64), ValueError, "do not fit in 64 bits"),
])
def test_bad_steps(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        S.cosine_decay(0.1, 100)(bad)


BAD_PARAMS = [
    (lambda: S.step_decay(0.1, 0.5, 0), ValueError, "step_size|transition_steps"),
    (lambda: S.exponential_decay(0.1, 0.9, transition_steps=-5), ValueError, "transition_steps"),
    (lambda: S.exponential_decay(-0.1, 0.9), ValueError, "init_value"),
    (lambda: S.exponential_decay(0.1, 0.0), ValueError, "decay_rate"),
    (lambda: S.exponential_decay(0.1, 0.9, 2.5), TypeError, "transition_steps must be an int"),
    (lambda: S.cosine_decay(0.1, 0), ValueError, "decay_steps"),
    (lambda: S.cosine_decay(0.1, 10, alpha=1.5), ValueError, "alpha"),
    (lambda: S.cosine_decay(float("nan"), 10), ValueError, "init_value must be finite"),
    (lambda: S.multistep(0.1, [30, 10]), ValueError, "milestones must be strictly increasing"),
    (lambda: S.multistep(0.1, [10, 10]), ValueError, "milestones must be strictly increasing"),
    (lambda: S.piecewise_constant([10, 20], [1.0, 0.5]), ValueError, "one more entry"),
    (lambda: S.piecewise_constant([10], [1.0, -0.5]), ValueError, r"values\[1\]"),
    (lambda: S.piecewise_interpolate([5, 3], [1.0, 0.5]), ValueError, "boundaries"),
    (lambda: S.warmup_cosine(0.0, 0.1, 1000, 1000), ValueError, "warmup_steps .* shorter"),
    (lambda: S.warmup(S.constant(0.1), 0), ValueError, "warmup_steps"),
    (lambda: S.warmup("cosine", 10), TypeError, "schedule must be an lrfast schedule"),
    (lambda: S.one_cycle(0.1, 3, pct_start=0.3), ValueError, "pct_start"),
    (lambda: S.one_cycle(0.1, 100, anneal_strategy="cosine"), ValueError, "anneal_strategy"),
    (lambda: S.cyclic(0.01, 0.1, 0), ValueError, "step_size_up"),
    (lambda: S.cyclic(0.01, 0.1, mode="sine"), ValueError, "mode"),
    (lambda: S.cosine_restarts(0.1, 10, 0.5), ValueError, "period_mult"),
    (lambda: S.join([S.constant(1.0), S.constant(2.0)], []), ValueError, "boundaries"),
    (lambda: S.join([S.constant(1.0), S.constant(2.0)], [0]), ValueError, "boundaries"),
    (lambda: S.clamp(S.constant(1.0), 0.5, 0.1), ValueError, "max_value"),
    (lambda: S.wsd(0.1, 10, 10, 0), ValueError, "decay_steps"),
    (lambda: S.wsd(0.1, 10, 10, 10, decay_shape="exp"), ValueError, "decay_shape"),
    (lambda: S.ReduceLROnPlateau(factor=1.0), ValueError, "factor"),
    (lambda: S.ReduceLROnPlateau(mode="lowest"), ValueError, "mode"),
    (lambda: S.ReduceLROnPlateau(patience=-1), ValueError, "patience"),
    (lambda: S.ReduceLROnPlateau(increase_factor=2.0), ValueError, "max_lr is required"),
    (lambda: S.from_dict({"type": "nope"}), ValueError, "unknown schedule type"),
]


@pytest.mark.parametrize("make, exc, pattern", BAD_PARAMS, ids=[str(i) for i in range(len(BAD_PARAMS))])
def test_bad_parameters_name_the_parameter(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_seed_worked_examples_recomputed():
    """Seed 003. Step decay, eta0=0.1, alpha=0.5, T=10: iterations 1-10 use 0.1, 11-20 0.05,
    21-30 0.025; with lrfast's count of completed updates, iteration k uses t = k - 1.
    Exponential decay eta0=0.1, alpha=0.95, T=1000: 0.1 * 0.95**(100/1000) is 0.0994884 (the
    article prints 0.099505); at t=1 it is 0.0999949 (printed 0.099995, right when rounded)."""
    step = S.step_decay(0.1, 0.5, 10)
    lrs = [step(k - 1) for k in range(1, 31)]
    assert lrs[:10] == [0.1] * 10 and lrs[10:20] == [0.05] * 10 and lrs[20:] == [0.025] * 10
    expo = S.exponential_decay(0.1, 0.95, 1000)
    assert expo(100) == pytest.approx(0.0994884, abs=5e-8)
    assert expo(100) == pytest.approx(0.1 * math.exp(0.1 * math.log(0.95)), rel=1e-15)
    assert expo(1) == pytest.approx(0.0999949, abs=5e-8)
    assert expo(500) == pytest.approx(0.1 * math.sqrt(0.95), rel=1e-15)
    # The continuous form eta0 * e^(-k t) of seed 002/003.
    assert S.natural_exp_decay(0.1, 0.001)(1000) == pytest.approx(0.1 / math.e, rel=1e-15)


# --------------------------------------------------------------------------------------------
# Plateau control
# --------------------------------------------------------------------------------------------

def drive(plateau, metrics):
    return [plateau.step(m) for m in metrics]


def test_plateau_torch_counting_by_hand():
    """patience=2: the 3rd bad evaluation in a row reduces (torch counts > patience)."""
    p = S.ReduceLROnPlateau(factor=0.5, patience=2, threshold=0.0)
    scales = drive(p, [1.0, 1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6])
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]


def test_plateau_keras_counting_and_cooldown():
    """keras reduces on the patience-th bad evaluation. Its cooldown counter is decremented
    before "in cooldown" is judged, so with cooldown=1 the evaluation right after a reduction
    already counts: bad at 2, 3 -> reduce at 3; bad at 4, 5 -> reduce at 5."""
    p = S.ReduceLROnPlateau(factor=0.5, patience=2, threshold=0.0, counting="keras", cooldown=1)
    scales = drive(p, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert scales == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    q = S.ReduceLROnPlateau(factor=0.5, patience=2, threshold=0.0, counting="keras", cooldown=2)
    # reduce at 3; evaluation 4 is in cooldown (counter 2 -> 1); 5, 6 count -> reduce at 6
    assert drive(q, [1.0] * 6) == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_plateau_negative_zero_and_nan_metrics():
    p = S.ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.1)
    # From -1.0 an improvement must go below -1.1 (threshold relative to |best|).
    assert drive(p, [-1.0, -1.05]) == [1.0, 0.5]
    assert drive(p, [-1.2]) == [0.5]              # an improvement: no reduction
    assert drive(p, [float("nan")]) == [0.25]     # NaN is never an improvement
    assert p.best == -1.2
    z = S.ReduceLROnPlateau(mode="max", factor=0.5, patience=0, threshold_mode="abs",
                            threshold=0.0)
    assert drive(z, [0.0, 0.0, 1e-9]) == [1.0, 0.5, 0.5]


def test_plateau_increase_after_sustained_improvement():
    p = S.ReduceLROnPlateau(factor=0.5, patience=0, increase_factor=2.0, increase_patience=3,
                            max_lr=0.15, threshold=0.0)
    sched = S.constant(0.1) * p
    drive(p, [5.0, 4.0, 3.0])         # three improvements in a row
    assert p.scale == 2.0 and sched(0) == 0.15   # raised, capped at max_lr
    drive(p, [3.0])                    # no improvement: patience 0 -> reduce
    assert p.scale == 1.0 and sched(0) == 0.1


def test_plateau_composes_with_warmup_cosine_and_floors_at_min_lr():
    base = S.warmup_cosine(0.0, 0.1, 10, 1000)
    p = S.ReduceLROnPlateau(factor=0.1, patience=0, min_lr=1e-3)
    sched = base * p
    t = np.arange(1000)
    assert np.array_equal(sched(t), base(t))
    p.step(1.0)
    p.step(2.0)
    assert p.scale == pytest.approx(0.1)
    np.testing.assert_allclose(sched(t), np.maximum(base(t) * p.scale, 1e-3), rtol=1e-15)
    ref = R.schedule_values(sched.to_dict(), t)
    np.testing.assert_allclose(sched(t), ref, rtol=1e-12)


def test_plateau_state_dict_round_trip():
    kw = dict(factor=0.5, patience=1, cooldown=2)
    a = S.ReduceLROnPlateau(**kw)
    drive(a, [3.0, 3.0, 3.0, 2.0, 5.0])
    b = S.ReduceLROnPlateau(**kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest = [5.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    assert drive(a, rest) == drive(b, rest)
    with pytest.raises(ValueError, match="another configuration"):
        S.ReduceLROnPlateau(factor=0.3).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------------------------
# Optimizers driven by schedules
# --------------------------------------------------------------------------------------------

def test_optimizer_uses_schedule_at_step_count():
    s = S.warmup_cosine(0.0, 0.1, 5, 50)
    opt = lrfast.SGD([np.zeros(3)], lr=s)
    used = []
    for _ in range(20):
        opt.step([np.ones(3)])
        used.append(opt.last_lr)
    assert used == [s(t) for t in range(20)]


@pytest.mark.parametrize("k", [1, 37, 60])
def test_schedule_driven_optimizer_resumes_exactly(k):
    """Saved at step k and rebuilt in a new optimizer: bitwise the same rates and params."""
    s = S.warmup_cosine(0.0, 0.05, 10, 80, end_value=1e-4)
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(50)] for _ in range(80)]
    straight = lrfast.AdamW([np.linspace(-1, 1, 50)], lr=s)
    rates = []
    for g in grads:
        straight.step(g)
        rates.append(straight.last_lr)
    first = lrfast.AdamW([np.linspace(-1, 1, 50)], lr=s)
    for g in grads[:k]:
        first.step(g)
    saved = first.state_dict()
    again = lrfast.AdamW([first.params[0].copy()], lr=S.from_dict(s.to_dict()))
    again.load_state_dict(saved)
    resumed = rates[:k]
    for g in grads[k:]:
        again.step(g)
        resumed.append(again.last_lr)
    assert resumed == rates
    assert snapshot(again)[:3] == snapshot(straight)[:3]


@pytest.mark.parametrize("name, sched, boundaries", SCHEDULES, ids=IDS)
def test_portable_and_avx2_evaluators_agree_bitwise(name, sched, boundaries):
    from lrfast import _dispatch

    if len(_dispatch.SCHEDULE_BUILDS) < 2 or "avx2" not in _dispatch.available():
        pytest.skip("no AVX2 build or CPU here")
    t = steps_for(boundaries)
    results = []
    for module in _dispatch.SCHEDULE_BUILDS.values():
        builder = S._Builder()
        root = sched._emit(builder)
        evaluator = module.NativeSchedule()
        builder.install(evaluator, root)
        results.append(evaluator(t))
    assert np.array_equal(results[0], results[1])
