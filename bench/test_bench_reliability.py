"""The price of the reliability options, and gradient clipping against torch.

Groups:

* ``check-adam-f32-16M``: one float32 Adam step on 16M elements, with and without
  ``skip_nonfinite`` (the read-only pre-pass over the grads). Target: the check costs <= 10%.
* ``check-sgd-f32-16M``: the same for SGD with momentum (fewer bytes per element, so the
  pre-pass weighs more).
* ``subnormal-adam-f32-1M``: Adam on 1M elements with normal grads, with subnormal grads
  (and so subnormal moments), and with subnormal grads under ``flush_subnormals=True``;
  torch.optim.Adam (for-loop) on the same subnormal grads, without and with
  ``torch.set_flush_denormal(True)``.
* ``clip-f32-16M`` / ``clip-f32-1000x256``: ``lrfast.clip_grad_norm_`` vs
  ``torch.nn.utils.clip_grad_norm_`` (its default foreach path), with max_norm below the norm
  so that every call also scales the grads.

    pytest bench/test_bench_reliability.py --benchmark-only --benchmark-columns=median,iqr
"""
from __future__ import annotations

import numpy as np
import pytest

import lrfast

N16 = 16 * 2**20
N1 = 2**20


def _data(n, dtype=np.float32, subnormal=False, seed=3):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n).astype(dtype)
    if subnormal:
        g *= dtype(np.finfo(dtype).tiny / 64)  # every element subnormal (or zero)
    return np.ones(n, dtype), g


def _steady(fn):
    for _ in range(3):  # moments settle into their (subnormal, if so) range before timing
        fn()
    return fn


@pytest.mark.parametrize("check", [False, True], ids=["no-check", "skip_nonfinite"])
def test_adam_check_cost(benchmark, check):
    benchmark.group = "check-adam-f32-16M"
    p, g = _data(N16)
    opt = lrfast.Adam([p], skip_nonfinite=check)
    benchmark.pedantic(_steady(lambda: opt.step([g])), rounds=15, warmup_rounds=1)


@pytest.mark.parametrize("check", [False, True], ids=["no-check", "skip_nonfinite"])
def test_sgd_check_cost(benchmark, check):
    benchmark.group = "check-sgd-f32-16M"
    p, g = _data(N16)
    opt = lrfast.SGD([p], lr=1e-2, momentum=0.9, skip_nonfinite=check)
    benchmark.pedantic(_steady(lambda: opt.step([g])), rounds=15, warmup_rounds=1)


SUBNORMAL = {
    "lrfast-normal": (False, False),
    "lrfast-subnormal": (True, False),
    "lrfast-subnormal-flush": (True, True),
}


@pytest.mark.parametrize("impl", list(SUBNORMAL))
def test_subnormal_lrfast(benchmark, impl):
    benchmark.group = "subnormal-adam-f32-1M"
    subnormal, flush = SUBNORMAL[impl]
    p, g = _data(N1, subnormal=subnormal)
    opt = lrfast.Adam([p], flush_subnormals=flush)
    benchmark.pedantic(_steady(lambda: opt.step([g])), rounds=15, warmup_rounds=1)


@pytest.mark.parametrize("flush", [False, True], ids=["torch-subnormal", "torch-subnormal-flush"])
def test_subnormal_torch(benchmark, flush):
    torch = pytest.importorskip("torch")
    benchmark.group = "subnormal-adam-f32-1M"
    p, g = _data(N1, subnormal=True)
    t = torch.from_numpy(p)
    t.grad = torch.from_numpy(g)
    opt = torch.optim.Adam([t], foreach=False)
    torch.set_flush_denormal(flush)
    try:
        benchmark.pedantic(_steady(opt.step), rounds=15, warmup_rounds=1)
    finally:
        torch.set_flush_denormal(False)


CLIP = {"16M": [N16], "1000x256": [256] * 1000}


def _grads(sizes):
    rng = np.random.default_rng(5)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


@pytest.mark.parametrize("case", list(CLIP))
def test_clip_lrfast(benchmark, case):
    benchmark.group = f"clip-f32-{case}"
    grads = _grads(CLIP[case])
    # Half the norm: the first call halves the grads, every later one scales them by a factor
    # just below 1, so each call computes the norm and scales (clipping is active).
    max_norm = 0.5 * lrfast.reference.grad_norm(grads)
    benchmark.pedantic(lambda: lrfast.clip_grad_norm_(grads, max_norm), rounds=15,
                       warmup_rounds=1)


@pytest.mark.parametrize("case", list(CLIP))
def test_clip_torch(benchmark, case):
    torch = pytest.importorskip("torch")
    benchmark.group = f"clip-f32-{case}"
    params = []
    for g in _grads(CLIP[case]):
        t = torch.zeros(g.shape, requires_grad=True)
        t.grad = torch.from_numpy(g)
        params.append(t)
    max_norm = 0.5 * lrfast.reference.grad_norm([p.grad.numpy() for p in params])
    benchmark.pedantic(lambda: torch.nn.utils.clip_grad_norm_(params, max_norm), rounds=15,
                       warmup_rounds=1)
