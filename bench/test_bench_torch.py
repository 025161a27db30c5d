"""lrfast.torch's optimizers against torch.optim's, on torch tensors with gradients.

Groups (float32, Adam, defaults):

* ``torch-api-transformer``: the 110 parameter tensors of a 9-layer transformer encoder of
  width 32 (77k elements). Target: lrfast.torch.Adam >= 3x faster than torch's fused Adam.
* ``torch-api-16M``: one 16M-element tensor. Target: no slower than torch fused.

Every implementation gets its own model and gradients, made from the same seed.

    pytest bench/test_bench_torch.py --benchmark-only --benchmark-columns=median,iqr
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
LT = pytest.importorskip("lrfast.torch")

IMPLS = {
    "lrfast.torch": lambda ps: LT.Adam(ps),
    "torch-loop": lambda ps: torch.optim.Adam(ps, foreach=False),
    "torch-foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch-fused": lambda ps: torch.optim.Adam(ps, fused=True),
}


def _transformer_params():
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
              for _ in range(9)]
    params = list(torch.nn.Sequential(*layers, torch.nn.Linear(32, 8)).parameters())
    assert len(params) == 110
    return params


def _with_grads(params):
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("impl", list(IMPLS))
def test_transformer(benchmark, impl):
    benchmark.group = "torch-api-transformer"
    opt = IMPLS[impl](_with_grads(_transformer_params()))
    opt.step()
    benchmark.pedantic(opt.step, rounds=30, iterations=20, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["lrfast.torch", "torch-fused"])
def test_one_16m_tensor(benchmark, impl):
    benchmark.group = "torch-api-16M"
    opt = IMPLS[impl](_with_grads([torch.nn.Parameter(torch.zeros(16 * 2**20))]))
    opt.step()
    benchmark.pedantic(opt.step, rounds=15, warmup_rounds=1)
