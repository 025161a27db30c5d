"""``python -m lrfast bench``'s low-precision and offload cases: that they are listed, run in
quick mode with their peers, and that an absent or broken peer (DeepSpeed) is a skip with its
reason, never an error. No timing is asserted.
"""
import json

import pytest

from lrfast._bench.cases import SIZES, VARIANTS, Case, all_cases
from lrfast._bench.peers import LOWP_PEERS, Data, Peers, Skip, make_stepper, plan
from lrfast._bench.targets import TARGETS
from test_bench_cli import run_bench, table_row

HALF_1M = "^adam (bf16|f16|bf16 f32-state|offload) 1M$"


def test_variants_bytes_per_element():
    # read p, g, m, v; write p, m, v (and the half copy)
    assert VARIANTS["bf16"].bytes_per_element == 14
    assert VARIANTS["f16"].bytes_per_element == 14
    assert VARIANTS["bf16 f32-state"].bytes_per_element == 22
    assert VARIANTS["offload"].bytes_per_element == 28        # 4+2+4+4 read, 4+4+4+2 written
    assert VARIANTS["f32"].bytes_per_element == 28
    c = Case("adam offload 16M", "lowp", "adam", "offload", "16M")
    assert c.bytes_per_step == 28 * 16 * 2**20


def test_lowp_cases_listed_in_both_modes():
    for quick in (False, True):
        names = {c.name for c in all_cases(quick) if c.kind == "lowp"}
        assert names == {f"adam {v} {s}" for v in ("bf16", "f16", "bf16 f32-state", "offload")
                         for s in ("1M", "16M")} | {"adam f32 16M deepspeed",
                                                    "adam f32 1000x256 deepspeed"}
    lowp_targets = [p for t in TARGETS for p in t.parts if p.case.startswith("adam") and
                    "state-" not in p.case and     # the state cases' bf16 rows: their own kind
                    any(v in p.case for v in ("bf16", "f16", "offload", "deepspeed"))]
    assert {p.case for p in lowp_targets} == {
        "adam bf16 16M", "adam f16 16M", "adam bf16 f32-state 16M", "adam offload 16M",
        "adam f32 16M deepspeed", "adam f32 1000x256 deepspeed"}


def by_name(cases):
    return {c.name: c.impls for c in cases}


def test_plan_gives_each_peer_a_run_or_a_reason():
    peers = Peers(no_optax=True, no_deepspeed=True)
    cases = [c for c in all_cases(True) if c.kind == "lowp"]
    plan(cases, peers, True)
    by = {c.name: c.impls for c in cases}
    for impls in by.values():
        assert set(impls) == {"lrfast", *LOWP_PEERS} and impls["lrfast"] is None
        assert impls["deepspeed"] is None or str(impls["deepspeed"])
    assert str(by["adam f32 16M deepspeed"]["deepspeed"]) == "--no-deepspeed"
    peers.deepspeed_reason = None                 # as if installed: quick mode skips it at 1M
    plan(cases, peers, True)
    assert str(by_name(cases)["adam bf16 f32-state 1M"]["deepspeed"]) == "--quick"
    assert by_name(cases)["adam bf16 f32-state 16M"]["deepspeed"] is None
    assert by["adam bf16 16M"]["deepspeed"].status == "n/a"
    assert by["adam bf16 f32-state 16M"]["torch-fused"].status == "n/a"
    if peers.torch is not None:
        assert by["adam bf16 16M"]["torch-fused"] is None
        assert by["adam offload 16M"]["torch-offload"] is None
        assert by["adam offload 16M"]["torch-offload-prealloc"] is None


def test_quick_run_half_cases(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", HALF_1M, "--no-optax", "--no-deepspeed",
                     "--json", "out.json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "Low precision and offload" in out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert "torch-offload" in header and "%floor" in header
    data = json.loads((tmp_path / "out.json").read_text())
    cases = {c["name"]: c for c in data["cases"]}
    assert set(cases) == {"adam bf16 1M", "adam f16 1M", "adam bf16 f32-state 1M",
                          "adam offload 1M"}
    for name, c in cases.items():
        assert c["kind"] == "lowp"
        assert c["bytes_per_step"] == VARIANTS[c["dtype"]].bytes_per_element * 2**20
        assert c["results"]["lrfast"]["status"] == "ok", c["results"]["lrfast"]
        assert c["pct_floor"] > 0
        assert table_row(out, name)[len(name):].split()[1] in ("ns", "us", "ms")
        assert c["results"]["deepspeed"]["status"] in ("skipped", "n/a")
    torch = data["machine"]["versions"]["torch"]
    for name, peer in (("adam bf16 1M", "torch-fused"), ("adam f16 1M", "torch-fused"),
                       ("adam offload 1M", "torch-offload"),
                       ("adam offload 1M", "torch-offload-prealloc")):
        res = cases[name]["results"][peer]
        if torch:
            assert res["status"] == "ok", res
            assert cases[name]["ratios"][peer] > 0
            assert cases[name]["pct_floor_peers"][peer] == pytest.approx(
                cases[name]["pct_floor"] * cases[name]["ratios"][peer] ** -1)
        else:
            assert res["status"] == "skipped" and res["reason"]
    assert cases["adam bf16 f32-state 1M"]["results"]["deepspeed"]["reason"] == "--no-deepspeed"


def test_deepspeed_missing_is_a_skip_and_its_target_not_judged(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", "^adam f32 1000x256 deepspeed$",
                     "--no-optax", "--json", "out.json", hide=("deepspeed",))
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed: deepspeed not installed" in proc.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    (case,) = data["cases"]
    assert case["results"]["lrfast"]["status"] == "ok"
    assert case["results"]["deepspeed"] == {"status": "skipped",
                                            "reason": "deepspeed not installed"}
    (target,) = [t for t in data["targets"] if "1000x256 >= 3x DeepSpeed" in t["name"]]
    assert target["status"] == "SKIP" and "deepspeed/lrfast skipped" in target["detail"]


def test_deepspeed_op_that_does_not_build_is_a_skip():
    """A DeepSpeedCPUAdam whose constructor raises (its JIT build failed) makes the peer a skip
    with the reason, and is not tried again in later cases."""
    peers = Peers(no_optax=True, no_deepspeed=True)
    if peers.torch is None:
        pytest.skip("torch not installed")
    calls = []

    class Broken:
        def __init__(self, *args, **kwargs):
            calls.append(kwargs)
            raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped")

    peers._ds_cls, peers.deepspeed_reason = Broken, None
    case = Case("adam f32 1000x256 deepspeed", "lowp", "adam", "f32", "1000x256")
    data = Data(SIZES["1000x256"], "float32")
    for _ in range(2):
        with pytest.raises(Skip) as e:
            make_stepper(case, "deepspeed", data, peers)
        assert "Error building extension 'cpu_adam'" in str(e.value)
        assert e.value.status == "skipped"
    assert len(calls) == 1
    assert calls[0]["adamw_mode"] is False and calls[0]["fp32_optimizer_states"] is True


@pytest.mark.parametrize("variant, kwargs", [
    ("bf16", {}),
    ("f16", {}),
    ("bf16 f32-state", {"state_dtype": "float32"}),
    ("offload", {"half_out": True}),
])
def test_lrfast_side_is_the_half_precision_api(monkeypatch, variant, kwargs):
    """lrfast's side of a case is lrfast.Adam through its NumPy half-precision API: arrays of
    the variant's dtypes, bf16 as ml_dtypes.bfloat16 (or uint16 bits with
    ``bfloat16_bits=True``), ``state_dtype`` and ``half_out`` as the variant needs."""
    import lrfast
    from lrfast._bench import peers as P
    made = []

    class FakeAdam:
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, state_dtype=None,
                     half_out=None, rounding="nearest", seed=0, bfloat16_bits=False):
            made.append(dict(params=params, state_dtype=state_dtype, half_out=half_out,
                             bfloat16_bits=bfloat16_bits, lr=lr))

        def step(self, grads):
            made[-1]["grads"] = grads

    monkeypatch.setattr(lrfast, "Adam", FakeAdam)
    case = Case(f"adam {variant} 1M", "lowp", "adam", variant, "1M")
    fn, args = make_stepper(case, "lrfast", Data((64, 32), "float32"), None)
    fn(*args)
    (got,) = made
    v = VARIANTS[variant]
    bf16 = P._bf16_dtype()
    names = {"float32": "float32", "float16": "float16",
             "bfloat16": "bfloat16" if bf16 is not None else "uint16"}
    assert [p.dtype.name for p in got["params"]] == [names[v.param]] * 2
    assert [g.dtype.name for g in got["grads"]] == [names[v.grad]] * 2
    assert [p.size for p in got["params"]] == [64, 32]
    assert got["state_dtype"] == kwargs.get("state_dtype")
    assert got["bfloat16_bits"] == (bf16 is None and "bfloat16" in (v.param, v.grad, v.out))
    if "half_out" in kwargs:
        assert [o.dtype.name for o in got["half_out"]] == [names[v.out]] * 2
    else:
        assert got["half_out"] is None
