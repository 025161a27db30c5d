"""One float32 Adam step: lrfast vs. its NumPy reference vs. torch.optim.Adam (CPU).

Cases (one benchmark group each):

* ``adam-f32-16M``: a single tensor of 16 * 2**20 elements (memory-bandwidth bound);
* ``adam-f32-1000x256``: 1000 tensors of 256 elements (per-tensor overhead bound);
* ``adam-f32-200x10k``: 200 tensors of 10,000 elements;
* ``adam-f32-1k``: one tensor of 1,000 elements (the whole Python call).

``lrfast-flat`` runs the same tensors through ``lrfast.FlatParams``. ``python -m lrfast bench``
covers every optimizer and float64 as well; this suite tracks the Adam float32 cases over time.

Every implementation starts from the same random parameters and gradients (fixed seed) and
uses the default hyper-parameters (lr=1e-3, betas=(0.9, 0.999), eps=1e-8). One untimed step
is taken first, so lazily created state (torch's ``exp_avg`` etc.) is not part of the timing.
Threads: lrfast and torch both use their defaults (all cores unless OMP_NUM_THREADS is set).

    pytest bench/ --benchmark-only       # timings
    pytest bench/ --benchmark-disable    # smoke run, each case once
"""
from __future__ import annotations

import numpy as np
import pytest

import lrfast
from lrfast import reference

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8

# name -> (tensor sizes, rounds, warmup rounds)
CASES = {
    "1k": ([1000], 200, 20),
    "16M": ([16 * 2**20], 9, 1),
    "1000x256": ([256] * 1000, 25, 2),
    "200x10k": ([10_000] * 200, 25, 2),
}


def _lrfast(params, grads):
    opt = lrfast.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS)
    return lambda: opt.step(grads)


def _lrfast_flat(params, grads):
    """The same tensors allocated through lrfast.FlatParams: one loop over one buffer."""
    flat = lrfast.FlatParams({f"t{i}": p.shape for i, p in enumerate(params)}, params[0].dtype)
    flat.assign({f"t{i}": p for i, p in enumerate(params)})
    for i, g in enumerate(grads):
        flat.grads[f"t{i}"][...] = g
    opt = lrfast.Adam(flat, lr=LR, betas=(BETA1, BETA2), eps=EPS)
    return opt.step


def _reference(params, grads):
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    count = [0]

    def step():
        count[0] += 1
        reference.adam_(params, grads, exp_avg, exp_avg_sq, step=count[0], lr=LR,
                        beta1=BETA1, beta2=BETA2, eps=EPS)

    return step


def _torch(**flags):
    def make(params, grads):
        torch = pytest.importorskip("torch")
        tensors = [torch.from_numpy(p) for p in params]  # shares memory with the numpy copies
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        opt = torch.optim.Adam(tensors, lr=LR, betas=(BETA1, BETA2), eps=EPS, **flags)
        return opt.step

    return make


IMPLS = {
    "lrfast": _lrfast,
    "lrfast-flat": _lrfast_flat,
    "numpy-reference": _reference,
    "torch-loop": _torch(foreach=False),
    "torch-fused": _torch(fused=True),
}


def _threads_info():
    info = {"lrfast_threads": lrfast.get_num_threads()}
    try:
        import torch
    except ImportError:
        pass
    else:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_version"] = torch.__version__
    return info


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "case",
    [pytest.param(name, marks=pytest.mark.benchmark(group=f"adam-f32-{name}")) for name in CASES],
)
def test_adam_step(benchmark, adam_data, case, impl):
    sizes, rounds, warmup = CASES[case]
    params, grads = adam_data(sizes)
    step = IMPLS[impl](params, grads)  # skips here when torch is missing
    step()  # untimed: creates any lazily allocated optimizer state
    benchmark.extra_info.update(
        case=case, implementation=impl, tensors=len(sizes), elements=int(sum(sizes)),
        **_threads_info(),
    )
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert all(np.isfinite(p[:1024]).all() for p in params[:8])
