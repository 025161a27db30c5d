"""Weight averages (EMA, decay 0.999): lrfast.Averager and Adam's step with ``ema=`` against
torch's and timm's EMA, float32. The steppers are those of ``python -m lrfast bench``'s
"average" cases (``lrfast._bench.peers``), so both layers time the same calls.

Groups:

* ``ema-f32-transformer``: the 110 parameter tensors of the bench's transformer (77k
  elements). lrfast is ``Averager.update()`` over NumPy views of the model's tensors; peers:
  the NumPy reference, torch's ``get_ema_multi_avg_fn(decay)`` on the param lists (one
  ``torch._foreach_lerp_``), timm's ``ModelEmaV3.update(model)``, and
  ``lrfast.torch.ema_multi_avg_fn`` where lrfast.torch has it. Target: >= 5x torch and timm.
* ``ema-f32-16M``: one 16M-element tensor. Target: >= 90% of the memory floor at 12 bytes per
  element (the bench reports the % of floor).
* ``adam+ema-f32-16M``: ``lrfast.Adam(params, ema=Averager(params)).step`` (the average in the
  step's pass), the step alone (``no-ema``), the step then ``update()`` (``separate``), and
  torch's fused Adam followed by torch's EMA function. Target: ema= <= +30% over the step
  alone (its bytes: +29%); a separate pass moves +43%.

    pytest bench/test_bench_averaging.py --benchmark-only --benchmark-columns=median,iqr
    pytest bench/test_bench_averaging.py --benchmark-disable     # smoke run
"""
from __future__ import annotations

import pytest

from lrfast._bench.cases import DTYPES, all_cases
from lrfast._bench.peers import Data, Peers, Skip, make_stepper, plan

CASES = {c.name: c for c in all_cases(quick=True) if c.kind == "average"}
# case -> (implementations, rounds, warmup rounds)
RUNS = {
    "ema f32 transformer": (("lrfast", "numpy-ref", "torch-ema-fn", "timm-ema-v3",
                             "lrfast.torch"), 30, 2),
    "ema f32 16M": (("lrfast", "numpy-ref", "torch-ema-fn", "lrfast.torch"), 9, 1),
    "adam+ema f32 16M": (("lrfast", "no-ema", "separate", "torch-fused+ema"), 9, 1),
}


@pytest.fixture(scope="module")
def peers():
    return Peers(no_optax=True, no_deepspeed=True)


@pytest.fixture(scope="module")
def data():
    cache: dict[str, Data] = {}

    def get(case):
        if case.name not in cache:
            cache[case.name] = Data(case.sizes, DTYPES[case.dtype])
        return cache[case.name]
    yield get
    cache.clear()


@pytest.mark.parametrize("name, impl", [
    pytest.param(name, impl, marks=pytest.mark.benchmark(
        group=name.replace(" ", "-")))
    for name, (impls, _, _) in RUNS.items() for impl in impls])
def test_average(benchmark, peers, data, name, impl):
    case = CASES[name]
    plan([case], peers, quick=False)
    skip = case.impls[impl]
    if skip is not None:
        pytest.skip(str(skip))
    try:
        fn, args = make_stepper(case, impl, data(case), peers)
    except Skip as e:
        pytest.skip(str(e))
    fn(*args)             # untimed: the first update copies the params, Adam's state is made
    _, rounds, warmup = RUNS[name]
    benchmark.extra_info.update(case=name, implementation=impl, tensors=len(case.sizes),
                                elements=int(case.elements), bytes_per_step=case.bytes_per_step)
    benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=warmup, iterations=1)
