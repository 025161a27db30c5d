"""One float32 Adam step: lrfast vs. its NumPy reference vs. torch.optim.Adam (CPU).

Cases (one benchmark group each):

* ``adam-f32-16M``: a single tensor of 16 * 2**20 elements (memory-bandwidth bound);
* ``adam-f32-1000x256``: 1000 tensors of 256 elements (per-tensor overhead bound);
* ``adam-f32-200x10k``: 200 tensors of 10,000 elements;
* ``adam-f32-1k``: one tensor of 1,000 elements (the whole Python call).

``lrfast-flat`` runs the same tensors through ``lrfast.FlatParams``. ``python -m lrfast bench``
covers every optimizer and float64 as well; this suite tracks the Adam float32 cases over time.

``adam-f32-state-16M``: one 16M tensor of float32 params with Adam's moments kept in float32,
bfloat16 (rounded to nearest or stochastically) or 8 bits (``state_dtype="int8"``), against
``torch.optim.Adam(fused=True)`` and the 8-bit optimizers of bitsandbytes (``Adam8bit``) and
torchao (``AdamW8bit``, weight decay 0), each skipped where its package is missing. A smoke run
(``--benchmark-disable``) steps a 64K tensor instead and leaves torchao out (torch.compile
builds its step on first use, tens of seconds).

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


# Adam's moments in fewer bits (python -m lrfast bench's "state" cases).
STATE_SIZE = 16 * 2**20
SMOKE_SIZE = 64 * 1024


def _lrfast_state(**kwargs):
    def make(params, grads):
        opt = lrfast.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, **kwargs)
        return lambda: opt.step(grads)

    return make


def _eight_bit(package, module, name):
    """An 8-bit torch optimizer from ``package`` (skipped where it is not installed)."""
    def make(params, grads):
        pytest.importorskip("torch")
        pytest.importorskip(package)
        import importlib

        import torch
        cls = getattr(importlib.import_module(module), name)
        tensors = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
        for t, g in zip(tensors, grads):
            t.grad = torch.from_numpy(g)
        opt = cls(tensors, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.0)
        return opt.step

    return make


STATE_IMPLS = {
    "lrfast-f32-state": _lrfast_state(),
    "lrfast-bf16-state": _lrfast_state(state_dtype="bfloat16"),
    "lrfast-bf16-sr-state": _lrfast_state(state_dtype="bfloat16", rounding="stochastic"),
    "lrfast-int8-state": _lrfast_state(state_dtype="int8"),
    "torch-fused": _torch(fused=True),
    "bnb-adam8bit": _eight_bit("bitsandbytes", "bitsandbytes.optim", "Adam8bit"),
    "torchao-adamw8bit": _eight_bit("torchao", "torchao.optim", "AdamW8bit"),
}
SLOW = ("bnb-adam8bit", "torchao-adamw8bit")       # on CPU: about a second per 16M step


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


@pytest.mark.benchmark(group="adam-f32-state-16M")
@pytest.mark.parametrize("impl", list(STATE_IMPLS))
def test_adam_state_step(benchmark, adam_data, impl):
    if benchmark.disabled and impl == "torchao-adamw8bit":
        pytest.skip("torch.compile builds its step on first use: timed runs only")
    size = SMOKE_SIZE if benchmark.disabled else STATE_SIZE
    params, grads = adam_data([size])
    step = STATE_IMPLS[impl](params, grads)  # skips here when a package is missing
    step()  # untimed: creates the lazily allocated state (and compiles torchao's step)
    benchmark.extra_info.update(case="state-16M", implementation=impl, tensors=1,
                                elements=size, **_threads_info())
    benchmark.pedantic(step, rounds=5 if impl in SLOW else 9, warmup_rounds=1, iterations=1)
    assert np.isfinite(params[0][:1024]).all()
