"""``python -m lrfast bench``'s optimizer-state cases (kind "state"): lrfast.Adam on float32
params with int8, bf16 and float32 moments, against its own float32-state step and the 8-bit
optimizers of bitsandbytes and torchao. That the cases are listed and run in quick mode, that
the state bytes per param are measured (lrfast's from its arrays, a torch optimizer's from its
state tensors), and that a missing or failing 8-bit peer is a skip with its reason. No timing
is asserted.
"""
import json
import sys

import numpy as np
import pytest

from lrfast._bench.cases import STATE_VARIANTS, Case, all_cases
from lrfast._bench.peers import (STATE_PEERS, Data, Peers, Skip, make_stepper,
                                 measured_state_bytes, plan)
from test_bench_cli import run_bench, table_row

N1M = 2**20
STATE_1M = "^adam state-(int8|f32) 1M$"


def test_state_cases_listed_in_both_modes():
    for quick in (False, True):
        cases = [c for c in all_cases(quick) if c.kind == "state"]
        assert [c.name for c in cases] == [f"adam state-{v} {s}" for s in ("1M", "16M")
                                           for v in ("int8", "bf16", "bf16-sr", "f32")]
        assert {c.dtype for c in cases} == set(STATE_VARIANTS)


def test_plan_gives_each_peer_a_run_or_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)      # as if not installed
    peers = Peers(no_optax=True, no_deepspeed=True)
    cases = [c for c in all_cases(True) if c.kind == "state"]
    plan(cases, peers, True)
    by = {c.name: c.impls for c in cases}
    for impls in by.values():
        assert set(impls) == {"lrfast", *STATE_PEERS} and impls["lrfast"] is None
    assert by["adam state-f32 16M"]["lrfast-f32"].status == "n/a"
    assert by["adam state-int8 16M"]["lrfast-f32"] is None
    if peers.torch is None:
        assert str(by["adam state-int8 1M"]["bnb-adam8bit"]) == "torch not installed"
        return
    assert by["adam state-int8 1M"]["torch-fused"] is None
    assert str(by["adam state-int8 1M"]["bnb-adam8bit"]) == "bitsandbytes not installed"
    ao = by["adam state-int8 1M"]["torchao-adamw8bit"]
    assert ao is not None and ao.status == "skipped"
    assert str(ao).startswith("--quick") or str(ao) == "torchao not installed"
    peers.eight_bit_reasons["torchao-adamw8bit"] = None          # as if installed
    plan(cases, peers, False)
    assert {c.name: c.impls for c in cases}["adam state-int8 16M"]["torchao-adamw8bit"] is None


@pytest.mark.parametrize("variant, kwargs", [
    ("int8", {"state_dtype": "int8", "rounding": "nearest"}),
    ("bf16", {"state_dtype": "bfloat16", "rounding": "nearest"}),
    ("bf16-sr", {"state_dtype": "bfloat16", "rounding": "stochastic"}),
    ("f32", {}),
])
def test_lrfast_side_is_adam_with_state_dtype(monkeypatch, variant, kwargs):
    """The row's lrfast step is lrfast.Adam on float32 params with the variant's state_dtype
    and rounding; lrfast-f32 is the same optimizer with float32 state."""
    import lrfast
    made = []

    class FakeAdam:
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **kw):
            made.append(dict(params=params, lr=lr, **kw))

        def step(self, grads):
            made[-1]["grads"] = grads

    monkeypatch.setattr(lrfast, "Adam", FakeAdam)
    case = Case(f"adam state-{variant} 1M", "state", "adam", variant, "1M")
    for impl in ("lrfast", "lrfast-f32"):
        fn, args = make_stepper(case, impl, Data((64, 32), np.float32), None)
        fn(*args)
    row, f32 = made
    assert {k: v for k, v in row.items() if k not in ("params", "grads", "lr")} == kwargs
    assert set(f32) == {"params", "grads", "lr"} and row["lr"] == f32["lr"] == 1e-3
    for got in (row, f32):
        assert [p.dtype.name for p in got["params"]] == ["float32"] * 2
        assert [g.dtype.name for g in got["grads"]] == ["float32"] * 2
        assert [p.size for p in got["params"]] == [64, 32]


def test_state_bytes_of_lrfast():
    # int8: 1 byte per element and a float32 scale per 256 for each of the two moments;
    # bf16: 2 bytes each; float32: 4 bytes each.
    n = 4 * 4096
    case_of = {v: Case(f"adam state-{v} 1M", "state", "adam", v, "1M") for v in STATE_VARIANTS}
    want = {"int8": 2 * (n + 4 * n // 256), "bf16": 2 * 2 * n, "bf16-sr": 2 * 2 * n,
            "f32": 2 * 4 * n}
    for v, c in case_of.items():
        fn, args = make_stepper(c, "lrfast", Data((n,), np.float32), None)
        fn(*args)
        assert measured_state_bytes(fn) == want[v], v


def test_state_bytes_of_torch_optimizers():
    torch = pytest.importorskip("torch")
    peers = Peers(no_optax=True, no_deepspeed=True)
    n = 3 * 4096
    case = Case("adam state-int8 1M", "state", "adam", "int8", "1M")
    fn, args = make_stepper(case, "torch-fused", Data((n, 512), np.float32), peers)
    fn(*args)
    # exp_avg and exp_avg_sq in float32, and a float32 step count per param
    assert measured_state_bytes(fn) == 2 * 4 * (n + 512) + 2 * 4
    assert measured_state_bytes(lambda: None) is None

    class Inner:
        """A tensor subclass's shape as torchao's 8-bit state has it: data in inner tensors."""

        def __init__(self, **parts):
            self.__dict__.update(parts)

        def __tensor_flatten__(self):
            return list(self.__dict__), None

    qmap = torch.zeros(256)
    opt = torch.optim.SGD([torch.zeros(1)])
    opt.state[0] = {"exp_avg": Inner(codes=torch.zeros(1024, dtype=torch.uint8),
                                     scale=torch.zeros(4), qmap=qmap),
                    "exp_avg_sq": Inner(codes=torch.zeros(1024, dtype=torch.uint8),
                                        scale=torch.zeros(4), qmap=qmap),
                    "step": 3}
    # codes 2 * 1024, scales 2 * 4 * 4, the shared map once: 256 * 4
    assert measured_state_bytes(opt.step) == 2048 + 32 + 1024


def test_state_bytes_of_bitsandbytes():
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    peers = Peers(no_optax=True, no_deepspeed=True)
    n = 64 * 256
    case = Case("adam state-int8 1M", "state", "adam", "int8", "1M")
    try:
        fn, args = make_stepper(case, "bnb-adam8bit", Data((n,), np.float32), peers)
    except Skip as e:            # its CPU backend does not run here: the reason is kept
        assert "Adam8bit failed" in str(e) or "bitsandbytes" in str(e)
        return
    fn(*args)
    # blockwise 8-bit state: two uint8 code arrays, a float32 absmax per 256 elements of each,
    # and the two 256-entry float32 code maps (signed, unsigned)
    assert measured_state_bytes(fn) == 2 * n + 2 * 4 * (n // 256) + 2 * 256 * 4


def test_eight_bit_peer_that_fails_is_a_skip():
    """An 8-bit optimizer whose first step raises (a CPU backend missing, torch.compile unable
    to build) makes the peer a skip with the reason, and it is not tried again."""
    peers = Peers(no_optax=True, no_deepspeed=True)
    if peers.torch is None:
        pytest.skip("torch not installed")
    calls = []

    class Broken:
        def __init__(self, params, **kwargs):
            calls.append(kwargs)

        def step(self):
            raise RuntimeError("no CPU kernel for this op\nmore detail")

    peers._eight_bit_cls["bnb-adam8bit"] = Broken
    peers.eight_bit_reasons["bnb-adam8bit"] = None
    case = Case("adam state-int8 1M", "state", "adam", "int8", "1M")
    for _ in range(2):
        with pytest.raises(Skip) as e:
            make_stepper(case, "bnb-adam8bit", Data((300,), np.float32), peers)
        assert str(e.value) == "Adam8bit failed: RuntimeError: no CPU kernel for this op"
        assert e.value.status == "skipped"
    assert calls == [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)]


def test_quick_run_state_cases(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", STATE_1M, "--no-optax", "--no-deepspeed",
                     "--json", "out.json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "Optimizer state in 8 and 16 bits" in out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert "lrfast-f32" in header and "state B/param" in header and "%floor" in header
    assert table_row(out, "adam state-int8 1M").endswith("2.031")
    assert table_row(out, "adam state-f32 1M").endswith("8.000")
    assert "state-int8: 8-bit moments, a float32 scale per 256 elements, 16.0625 B/element" in out
    data = json.loads((tmp_path / "out.json").read_text())
    cases = {c["name"]: c for c in data["cases"]}
    int8, f32 = cases["adam state-int8 1M"], cases["adam state-f32 1M"]
    assert int8["kind"] == f32["kind"] == "state"
    assert int8["bytes_per_step"] == 16 * N1M + 16 * N1M // 256
    assert f32["bytes_per_step"] == 28 * N1M
    assert int8["state_bytes_per_param"]["lrfast"] == 2 + 8 / 256
    assert int8["state_bytes_per_param"]["lrfast-f32"] == 8.0
    assert f32["state_bytes_per_param"]["lrfast"] == 8.0
    assert int8["results"]["lrfast-f32"]["status"] == "ok" and int8["ratios"]["lrfast-f32"] > 0
    assert f32["results"]["lrfast-f32"]["status"] == "n/a"
    for c in (int8, f32):
        assert c["results"]["lrfast"]["status"] == "ok" and c["pct_floor"] > 0
        assert c["results"]["torchao-adamw8bit"]["status"] == "skipped"
    torch = data["machine"]["versions"]["torch"]
    if torch:
        fused = int8["results"]["torch-fused"]
        assert fused["status"] == "ok" and "shared_with" not in fused
        # the f32 row shares the peers timed in the int8 row
        assert f32["results"]["torch-fused"]["shared_with"] == "adam state-int8 1M"
        assert int8["state_bytes_per_param"]["torch-fused"] == pytest.approx(8.0, abs=1e-4)
        bnb = int8["results"]["bnb-adam8bit"]
        assert bnb["status"] in ("ok", "skipped"), bnb
        if bnb["status"] == "ok":
            assert int8["state_bytes_per_param"]["bnb-adam8bit"] == pytest.approx(
                2 + 8 / 256, abs=1e-2)
            assert "state B/param held by the peers (1M, from their state tensors): " \
                   "torch-fused 8.000, bnb-adam8bit 2.033" in out


def test_missing_eight_bit_peers_are_skipped(tmp_path):
    proc = run_bench(tmp_path, "--cases", "^adam state-int8 1M$", "--no-optax",
                     "--no-deepspeed", "--repeats", "3", "--json", "out.json",
                     hide=("bitsandbytes", "torchao"))
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads((tmp_path / "out.json").read_text())["cases"]
    assert case["results"]["lrfast"]["status"] == "ok"
    res = case["results"]
    if json.loads((tmp_path / "out.json").read_text())["machine"]["versions"]["torch"]:
        assert res["bnb-adam8bit"] == {"status": "skipped", "reason": "bitsandbytes not installed"}
        assert res["torchao-adamw8bit"] == {"status": "skipped", "reason": "torchao not installed"}
        assert "skipped: bnb-adam8bit: bitsandbytes not installed" in proc.stdout
        assert "skipped: torchao-adamw8bit: torchao not installed" in proc.stdout


def test_state_cases_without_torch(tmp_path):
    """Without torch lrfast's rows, and its float32-state step beside them, still run."""
    proc = run_bench(tmp_path, "--quick", "--cases", "^adam state-bf16 1M$", "--no-optax",
                     "--json", "out.json", hide=("torch",))
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads((tmp_path / "out.json").read_text())["cases"]
    res = case["results"]
    assert res["lrfast"]["status"] == res["lrfast-f32"]["status"] == "ok"
    assert {res[p]["status"] for p in ("torch-fused", "bnb-adam8bit", "torchao-adamw8bit")} == \
        {"skipped"}
    assert "torch-fused, bnb-adam8bit, torchao-adamw8bit: torch not installed" in proc.stdout
    assert case["state_bytes_per_param"] == {"lrfast": 4.0, "lrfast-f32": 8.0}
