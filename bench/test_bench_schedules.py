"""Learning-rate schedules: one scalar evaluation, and 1e7 steps at once.

Groups:

* ``schedule-scalar``: the time of one call ``s(12345)`` for a few lrfast schedules, against a
  plain Python ``lr0 * math.exp(-k * t)`` and against one ``scheduler.step()`` of torch's
  ``ExponentialLR``, ``CosineAnnealingLR`` and ``OneCycleLR`` (the step updates the lr in a
  dummy SGD optimizer's param group). Each round makes ``ITERATIONS`` calls, so the reported
  times are per call.
* ``schedule-vector-1e7``: ``warmup_cosine`` (init 0, peak 0.1, 1000 warmup steps, 1e7 decay
  steps) over the steps 0 .. 1e7-1: lrfast's OpenMP path ``s(np.arange(10**7))`` (default
  threads; float64), optax's schedule under ``jax.jit`` on ``jnp.arange(10**7)`` (float32 and
  int32 steps, jax's defaults; compiled before timing; ``block_until_ready``), and the NumPy
  reference ``lrfast.reference.schedule_values``.

torch and optax/jax are optional: their cases are skipped without them.

    pytest bench/test_bench_schedules.py --benchmark-only      # timings
    pytest bench/test_bench_schedules.py --benchmark-disable   # smoke run, each case once
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import lrfast
from lrfast import reference
from lrfast import schedules as S

T = 12345
ITERATIONS = 1000  # calls per round in the scalar group
SCALAR_ROUNDS, SCALAR_WARMUP = 40, 3
HUGE = 10**12  # horizon of the torch schedulers: they never run out of steps here

N = 10**7
WARMUP_STEPS, PEAK = 1000, 0.1
# name -> (rounds, warmup rounds)
VECTOR_ROUNDS = {"lrfast": (15, 2), "optax-jit": (15, 2), "numpy-reference": (5, 1)}

LR0, K = 0.1, 1e-5


# ------------------------------------------------------------------------------------------
# schedule-scalar: each factory returns (callable, args, check) where check() validates once.
# ------------------------------------------------------------------------------------------

def _lrfast(build):
    def make():
        s = build()
        want = float(reference.schedule_values(s.to_dict(), np.array([T]))[0])
        return s, (T,), lambda: math.isclose(s(T), want, rel_tol=1e-12, abs_tol=1e-300)

    return make


def _python_exp():
    f = lambda t: LR0 * math.exp(-K * t)  # noqa: E731 - the baseline is a plain lambda
    return f, (T,), lambda: f(T) > 0.0


def _torch(scheduler):
    def make():
        torch = pytest.importorskip("torch")
        param = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([param], lr=LR0)
        sched = scheduler(torch, opt)
        opt.step()  # no gradient: a no-op, but torch then does not warn about the call order
        sched.step()
        group = opt.param_groups[0]
        return sched.step, (), lambda: math.isfinite(group["lr"]) and group["lr"] > 0.0

    return make


SCALAR = {
    "lrfast-exponential_decay": _lrfast(lambda: S.exponential_decay(LR0, 0.96, 1000)),
    "lrfast-cosine_decay": _lrfast(lambda: S.cosine_decay(LR0, 100_000)),
    "lrfast-warmup_cosine": _lrfast(lambda: S.warmup_cosine(0.0, LR0, 1000, 100_000)),
    "lrfast-one_cycle": _lrfast(lambda: S.one_cycle(LR0, 100_000)),
    "python-lambda-exp": _python_exp,
    # gamma so close to 1 that the rate stays far from denormals over every round here.
    "torch-ExponentialLR": _torch(
        lambda torch, opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.0 - 1e-7)),
    "torch-CosineAnnealingLR": _torch(
        lambda torch, opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=HUGE)),
    "torch-OneCycleLR": _torch(
        lambda torch, opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR0,
                                                               total_steps=HUGE)),
}


def _versions():
    info = {"lrfast_threads": lrfast.get_num_threads()}
    for mod in ("torch", "jax", "optax"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            pass
    return info


@pytest.mark.benchmark(group="schedule-scalar")
@pytest.mark.parametrize("impl", list(SCALAR))
def test_schedule_scalar(benchmark, impl):
    fn, args, check = SCALAR[impl]()  # skips here when torch is missing
    benchmark.extra_info.update(implementation=impl, step=T, calls_per_round=ITERATIONS,
                                **_versions())
    benchmark.pedantic(fn, args=args, rounds=SCALAR_ROUNDS, warmup_rounds=SCALAR_WARMUP,
                       iterations=ITERATIONS)
    assert check()


# ------------------------------------------------------------------------------------------
# schedule-vector-1e7
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vector_case():
    sched = S.warmup_cosine(0.0, PEAK, WARMUP_STEPS, N)
    steps = np.arange(N, dtype=np.int64)
    probe = np.array([0, 1, WARMUP_STEPS - 1, WARMUP_STEPS, 123_456, N // 2, N - 1])
    return sched, steps, probe


def _vector_lrfast(sched, steps, probe):
    return lambda: sched(steps), lambda out: out


def _vector_reference(sched, steps, probe):
    spec = sched.to_dict()
    return lambda: reference.schedule_values(spec, steps), lambda out: out


def _vector_optax(sched, steps, probe):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    fn = jax.jit(optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=PEAK, warmup_steps=WARMUP_STEPS, decay_steps=N,
        end_value=0.0))
    x = jnp.arange(N)
    fn(x).block_until_ready()  # compile outside the timing
    return (lambda: fn(x).block_until_ready()), (lambda out: np.asarray(out, dtype=np.float64))


VECTOR = {
    "lrfast": _vector_lrfast,
    "optax-jit": _vector_optax,
    "numpy-reference": _vector_reference,
}


@pytest.mark.benchmark(group="schedule-vector-1e7")
@pytest.mark.parametrize("impl", list(VECTOR))
def test_schedule_vector(benchmark, vector_case, impl):
    sched, steps, probe = vector_case
    run, to_numpy = VECTOR[impl](sched, steps, probe)  # skips here when optax is missing
    rounds, warmup = VECTOR_ROUNDS[impl]
    benchmark.extra_info.update(implementation=impl, steps=N, **_versions())
    out = to_numpy(benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1))
    assert out.shape == (N,)
    want = sched(probe)
    # optax computes in float32; lrfast and its reference in float64.
    tol = 1e-6 if impl == "optax-jit" else 1e-12
    np.testing.assert_allclose(out[probe], want, rtol=tol, atol=tol * PEAK)
