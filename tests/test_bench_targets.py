"""How the bench judges its speed targets (lrfast/_bench/targets.py and verdicts.py): the
median's interval, per-round pairing, the verdicts, and the target table's consistency with the
bench's cases.

Expected values are hand calculations (binomial sums, per-round ratios worked out below) or a
simulation of the interval's coverage; no timing is involved.
"""
import math
import random

import pytest

from lrfast._bench import spread as _bench_spread
from lrfast._bench.cases import Case, all_cases
from lrfast._bench.peers import AVERAGE_PEERS, EMBEDDING_PEERS, LOWP_PEERS, PEERS, STATE_PEERS
from lrfast._bench.run import analyse
from lrfast._bench.targets import TARGETS, Part, parts_of
from lrfast._bench.verdicts import (
    CONFIDENCE, evaluate, estimate, median_ci, paired, references, verdict)


def ok(samples, rounds=None, **extra):
    rounds = list(range(len(samples))) if rounds is None else rounds
    s = sorted(samples)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return {"status": "ok", "median_s": median, "samples_s": list(samples), "rounds": rounds,
            **extra}


def case(name, **results):
    kind = "threads" if "threads" in name else "flat" if name.endswith("flat") else "optim"
    words = name.split()
    c = Case(name, kind, words[0], words[1], words[2])
    c.results = dict(results)
    return c


# ---------------------------------------------------------------------------- median_ci

@pytest.mark.parametrize("n, k, below", [
    # k: the interval is the k-th smallest to the k-th largest; below = P(B <= k-1), B~Bin(n, 1/2)
    (5, 1, 1 / 32),                 # no 95% interval at n=5: [min, max], 93.75%
    (6, 1, 1 / 64),                 # 96.9%
    (9, 2, (1 + 9) / 512),          # P(B<=1) = 10/512 <= 2.5% < P(B<=2) = 46/512
    (11, 2, (1 + 11) / 2048),       # P(B<=2) = 67/2048 = 3.3% > 2.5%
    (20, 6, (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20),   # P(B<=5) = 2.07%, P(B<=6) = 5.8%
])
def test_median_interval_order_statistics(n, k, below):
    values = [float(v) for v in random.Random(n).sample(range(1, 1000), n)]
    med, lo, hi, conf = median_ci(values)
    s = sorted(values)
    assert med == (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)
    assert (lo, hi) == (s[k - 1], s[n - k])
    assert conf == pytest.approx(1 - 2 * below)


def test_median_interval_small_and_empty():
    assert median_ci([2.0]) == (2.0, 2.0, 2.0, 0.0)
    assert median_ci([1.0, 3.0]) == (2.0, 1.0, 3.0, 0.5)
    with pytest.raises(ValueError):
        median_ci([])


@pytest.mark.parametrize("n", [6, 11, 25, 43])
def test_median_interval_covers_the_median(n):
    """Over many samples of a skewed distribution, the interval holds the true median at least
    as often as it claims (ln 2 for the unit exponential)."""
    rng = random.Random(1000 + n)
    trials, hits, claimed = 3000, 0, None
    for _ in range(trials):
        _, lo, hi, claimed = median_ci([rng.expovariate(1.0) for _ in range(n)])
        hits += lo <= math.log(2) <= hi
    assert claimed >= CONFIDENCE
    # binomial sd of the hit rate at 95%: 0.4%; allow 4 of them below the claim
    assert hits / trials >= claimed - 0.016


# ---------------------------------------------------------------------------- pairing

def test_paired_matches_rounds_not_positions():
    a = ok([1.0, 2.0, 3.0, 4.0, 5.0], rounds=[0, 1, 2, 5, 6])   # lrfast: main rounds + 2 extra
    b = ok([10.0, 20.0, 30.0], rounds=[0, 1, 2])                 # a peer not in the extra rounds
    c = ok([40.0, 50.0], rounds=[5, 6])
    assert paired(a, b) == ([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
    assert paired(a, c) == ([4.0, 5.0], [40.0, 50.0])


def test_ratio_is_the_median_of_per_round_ratios():
    # Per round peer/lrfast: 2, 3, 1, 4, 2, 2 -> median 2 (the ratio of medians would be 11/5).
    lr = [1.0, 1.0, 4.0, 1.0, 2.0, 5.0]
    peer = [2.0, 3.0, 4.0, 4.0, 4.0, 10.0]
    c = case("adam f32 1k", lrfast=ok(lr), **{"torch-loop": ok(peer)})
    part = Part("adam f32 1k", "ratio", 25.0, "torch-loop", family="1k")
    med, lo, hi, conf = estimate(c, part)
    assert (med, lo, hi) == (2.0, 1.0, 4.0) and conf == pytest.approx(1 - 2 / 64)


def test_floor_is_per_round_with_the_probe():
    c = case("adam f32 16M", lrfast=ok([0.010, 0.020, 0.010, 0.010, 0.010, 0.010]))
    # Adam f32 moves 7 * 4 bytes per element; the probe moves 1e9 bytes per call.
    c.probe = ok([0.010, 0.010, 0.012, 0.010, 0.010, 0.008], bytes=1e9)
    step_bytes = 7 * 4 * 16 * 2**20
    assert c.bytes_per_step == step_bytes
    want = sorted(100 * step_bytes * p / 1e9 / t for t, p in
                  zip(c.results["lrfast"]["samples_s"], c.probe["samples_s"]))
    med, lo, hi, _ = estimate(c, Part("adam f32 16M", "floor", 90.0))
    assert (lo, hi) == (want[0], want[-1])
    assert med == pytest.approx((want[2] + want[3]) / 2)
    assert references(c, Part("adam f32 16M", "floor", 90.0)) == ["floor"]
    c.probe = None
    assert estimate(c, Part("adam f32 16M", "floor", 90.0)) == "no floor probe"
    assert references(c, Part("adam f32 16M", "floor", 90.0)) is None


def test_unpaired_peer_takes_the_conservative_interval():
    # A flat row's peer was timed in its list twin's rounds: no pairs.
    lr = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0]
    peer = [100.0 + i for i in range(11)]
    c = case("adam f32 1000x256 flat", lrfast=ok(lr),
             **{"torch-fused": ok(peer, shared_with="adam f32 1000x256")})
    each = math.sqrt(CONFIDENCE)
    tm, tlo, thi, tc = median_ci(lr, each)
    pm, plo, phi, pc = median_ci(peer, each)
    got = estimate(c, Part(c.name, "ratio", 30.0, "torch-fused", family="multi-tensor"))
    assert got == (pm / tm, plo / thi, phi / tlo, tc * pc)
    assert got[3] >= CONFIDENCE - 1e-12


def test_torch_fastest_takes_the_smallest_median():
    c = case("sgd f32 16M", lrfast=ok([1.0] * 6), **{"torch-loop": ok([3.0] * 6),
                                                     "torch-fused": ok([2.0] * 6),
                                                     "torch-foreach": {"status": "skipped"}})
    part = Part("sgd f32 16M", "ratio", 1.0, "torch-fastest")
    assert references(c, part) == ["torch-fused"]
    assert estimate(c, part)[:3] == (2.0, 2.0, 2.0)


# ---------------------------------------------------------------------------- verdicts

@pytest.fixture
def spread(monkeypatch):
    """Give the parts these tests make a known between-run spread of 1.5."""
    monkeypatch.setattr(_bench_spread, "PARTS", {
        "x: torch-fused/lrfast": 1.5, "x: Adam.step": 1.5, "x: floor": 1.5})


@pytest.mark.parametrize("est, want", [
    ((1.10, 1.00, 1.20), "PASS"),     # the whole interval meets 1.0
    ((1.00, 0.95, 1.05), "NOISE"),    # holds the threshold
    ((0.80, 0.75, 0.85), "NOISE"),    # misses, but 0.85 * 1.5 >= 1: runs vary that much
    ((0.60, 0.55, 0.66), "FAIL"),     # 0.66 * 1.5 = 0.99 < 1
])
def test_verdict_at_least(spread, est, want):
    part = Part("x", "ratio", 1.0, "torch-fused")
    assert part.spread == 1.5
    assert verdict(part, (*est, 0.96)) == want


@pytest.mark.parametrize("est, want", [
    ((2.0e-6, 1.5e-6, 2.9e-6), "PASS"),
    ((3.0e-6, 2.5e-6, 3.5e-6), "NOISE"),
    ((4.4e-6, 4.4e-6, 5.0e-6), "NOISE"),   # 4.4 / 1.5 = 2.93 <= 3
    ((5.0e-6, 4.6e-6, 6.0e-6), "FAIL"),    # 4.6 / 1.5 = 3.07 > 3
])
def test_verdict_at_most(spread, est, want):
    part = Part("x", "time", 3e-6, label="Adam.step", family="1k")
    assert verdict(part, (*est, 0.96)) == want


def test_verdict_skip():
    assert verdict(Part("x", "ratio", 1.0, "torch-fused"), "skipped") == "SKIP"


def test_a_target_takes_its_worst_part(spread, monkeypatch):
    # floor FAILs (hi 50% * 1.5 < 90%) while the ratio passes: the target FAILs, and the
    # detail marks which part.
    c = case("adam f32 16M", lrfast=ok([0.010] * 11), **{"torch-fused": ok([0.012] * 11)})
    c.probe = ok([0.002] * 11, bytes=c.bytes_per_step)     # 20% of the floor every round
    monkeypatch.setattr(_bench_spread, "PARTS", {})
    rows = {name: (st, detail, parts) for st, name, detail, parts in evaluate([c])}
    st, detail, parts = rows["Adam f32 16M >= 1.0x torch fused, >= 90% floor"]
    assert st == "FAIL"
    assert [p["status"] for p in parts] == ["PASS", "FAIL"]
    assert "torch-fused/lrfast 1.20x [1.20x, 1.20x] (>= 1x)" in detail
    assert "floor 20.0% [20.0%, 20.0%] (>= 90%; runs vary x" in detail and detail.endswith("FAIL")
    # a target with an unmeasured part: SKIP unless another part is worse
    st, detail, _ = rows["every optimizer f32 16M >= 8x numpy-ref"]
    assert st == "SKIP" and "SGD skipped" in detail


# ---------------------------------------------------------------------------- the table

def test_every_target_part_names_a_case_the_bench_has():
    kinds = {c.name: c.kind for c in all_cases(quick=False)}
    names = set(kinds)
    quick = {c.name for c in all_cases(quick=True)}
    peers_of = {"lowp": LOWP_PEERS, "average": AVERAGE_PEERS, "state": STATE_PEERS,
                "embedding": EMBEDDING_PEERS}
    for t in TARGETS:
        for p in t.parts:
            assert p.case in names, (t.name, p.case)
            assert p.measure in ("ratio", "floor", "time", "speedup", "cost", "bytes")
            if p.measure in ("ratio", "cost"):
                # a peer that the part's case times (torch's fastest path: a ratio's only)
                assert p.peer in peers_of.get(kinds[p.case], PEERS) or (
                    p.peer == "torch-fastest" and p.measure == "ratio"), p.key
            assert p.spread >= 1.1, p.key
            assert p.family in _bench_spread.FAMILIES
        assert any(p.case in quick for p in t.parts) or "f64 16M" in t.parts[0].case
    keys = [p.key for t in TARGETS for p in t.parts]
    assert len(keys) == len(set(keys))
    # every measured spread belongs to a part that still exists
    assert set(_bench_spread.PARTS) <= set(keys)


def test_parts_of_a_case():
    assert [p.measure for p in parts_of("adam f32 16M")] == ["ratio", "floor", "ratio"]
    assert parts_of("schedule scalar") == []


def test_more_rounds_only_where_they_can_decide(spread):
    from lrfast._bench.verdicts import undecided
    part = parts_of("adam f32 1k")[1]            # torch-loop/lrfast >= 25x

    def with_ratios(ratios):
        return case("adam f32 1k", lrfast=ok([1.0] * len(ratios)), **{"torch-loop": ok(ratios)})

    _bench_spread.PARTS[part.key] = 1.5          # the fixture's dict, restored after the test
    assert undecided(with_ratios([24.0, 25.0, 26.0, 24.5, 25.5, 26.5])) == [part]  # holds 25
    assert undecided(with_ratios([16.0, 17.0, 16.5, 17.5, 16.2, 16.8])) == [part]  # holds 25/1.5
    assert undecided(with_ratios([20.0, 21.0, 20.5, 21.5, 20.2, 20.8])) == []      # stays NOISE
    assert undecided(with_ratios([30.0] * 6)) == []                                 # PASS
    assert undecided(with_ratios([10.0] * 6)) == []                                 # FAIL


# ---------------------------------------------------------------------------- weight averages

def average_case(name, **results):
    words = name.split()
    c = Case(name, "average", "ema" if words[0] == "ema" else "adam", words[1], words[2])
    c.results = dict(results)
    return c


def test_average_cases_bytes_per_step():
    # The EMA alone: read average and param, write average (12 B per float32 element). Fused
    # into Adam's step: Adam's 28 B plus a read and a write of the average (36 B).
    by = {c.name: c for c in all_cases(quick=True)}
    assert by["ema f32 16M"].bytes_per_step == 12 * 16 * 2**20
    assert by["adam+ema f32 16M"].bytes_per_step == 36 * 16 * 2**20
    transformer = by["ema f32 transformer"]
    assert len(transformer.sizes) == 110
    assert transformer.bytes_per_step == 12 * sum(transformer.sizes)
    assert {c.kind for c in by.values() if "ema" in c.name} == {"average"}


def test_cost_is_the_median_of_per_round_lrfast_over_peer(spread, monkeypatch):
    # Per round lrfast/no-ema: 1.3, 1.2, 1.5, 1.25, 1.4, 1.3 -> median 1.3; n = 6: [min, max].
    lr = [1.3, 2.4, 1.5, 1.25, 2.8, 1.3]
    plain = [1.0, 2.0, 1.0, 1.0, 2.0, 1.0]
    part = Part("x", "cost", 1.3, "no-ema", "ema= cost")
    monkeypatch.setattr(_bench_spread, "PARTS", {"x: ema= cost": 1.5})
    c = average_case("adam+ema f32 16M", lrfast=ok(lr), **{"no-ema": ok(plain)})
    med, lo, hi, conf = estimate(c, part)
    assert (med, lo, hi) == (pytest.approx(1.3), pytest.approx(1.2), pytest.approx(1.5))
    assert conf == pytest.approx(1 - 2 / 64)
    assert not part.at_least and references(c, part) == ["no-ema"]
    assert verdict(part, (med, lo, hi, conf)) == "NOISE"          # holds 1.3
    assert verdict(part, (1.1, 1.05, 1.2, 0.97)) == "PASS"
    assert verdict(part, (2.2, 2.0, 2.4, 0.97)) == "FAIL"         # 2.0 / 1.5 > 1.3
    assert verdict(part, (1.8, 1.7, 1.9, 0.97)) == "NOISE"        # 1.7 / 1.5 <= 1.3
    assert (part.fmt(1.3, True), part.fmt(1.234), part.fmt(0.95)) == ("+30%", "+23.4%", "-5.0%")
    c.results["no-ema"] = {"status": "skipped", "reason": "x"}
    assert estimate(c, part) == "skipped" and references(c, part) is None


def test_extra_cost_of_ema_and_of_a_separate_update():
    # per round: ema= / no-ema = 1.25, 1.5, 1.25 -> median 1.25; separate / no-ema = 1.5, 1.5,
    # 1.25 -> 1.5. Bytes: Adam moves 7 float32 per element, ema= 9 (+2/7), separate 10 (+3/7).
    c = average_case("adam+ema f32 16M", lrfast=ok([5.0, 6.0, 5.0]),
                     **{"no-ema": ok([4.0, 4.0, 4.0]), "separate": ok([6.0, 6.0, 5.0])})
    a = analyse(c, None)
    assert a["extra_cost_pct"] == {"ema=": pytest.approx(25.0), "separate": pytest.approx(50.0)}
    assert a["extra_bytes_pct"] == {"ema=": pytest.approx(200 / 7),
                                    "separate": pytest.approx(300 / 7)}
    assert a["ratios"]["no-ema"] == pytest.approx(4.0 / 5.0)
    c.results["no-ema"] = {"status": "error", "reason": "x"}
    assert "extra_cost_pct" not in analyse(c, None)
    assert "extra_cost_pct" not in analyse(average_case("ema f32 16M", lrfast=ok([1.0])), None)


def test_average_targets_in_the_report(monkeypatch):
    monkeypatch.setattr(_bench_spread, "PARTS", {})
    c = average_case("adam+ema f32 16M", lrfast=ok([1.2] * 11), **{"no-ema": ok([1.0] * 11)})
    rows = {name: (st, detail) for st, name, detail, _ in evaluate([c])}
    st, detail = rows["Adam with ema= f32 16M <= +30% over Adam alone"]
    assert st == "PASS" and detail == "ema= cost +20.0% [+20.0%, +20.0%] (<= +30%)"
    t = average_case("ema f32 transformer", lrfast=ok([1.0] * 11),
                     **{"torch-ema-fn": ok([6.0] * 11), "timm-ema-v3": {"status": "skipped"}})
    rows = {name: (st, detail) for st, name, detail, _ in evaluate([t])}
    (st, detail), = [v for k, v in rows.items() if k.startswith("EMA update, 110-tensor")]
    assert st == "SKIP" and detail.startswith("torch-ema-fn/lrfast 6.00x") and \
        detail.endswith("timm-ema-v3/lrfast skipped")


# ---------------------------------------------------------------------------- state bytes

def state_case(name, **results):
    words = name.split()
    c = Case(name, "state", words[0], words[1].removeprefix("state-"), words[2])
    c.results = dict(results)
    return c


@pytest.mark.parametrize("held, want", [
    (2 * 16 * 2**20 + 2 * 4 * 16 * 2**20 // 256, "PASS"),    # int8 codes + scales: 2.03125 B
    (int(2.05 * 16 * 2**20), "PASS"),                         # just under the threshold
    (int(2.06 * 16 * 2**20), "FAIL"),                         # a count: no noise, no spread
    (None, "SKIP"),
])
def test_state_bytes_part_is_exact(held, want):
    extra = {} if held is None else {"state_bytes": held}
    c = state_case("adam state-int8 16M", lrfast=ok([0.02] * 11, **extra))
    (part,) = [p for p in parts_of(c.name) if p.measure == "bytes"]
    assert part.threshold == 2.05 and not part.at_least and references(c, part) == []
    est = estimate(c, part)
    if held is None:
        assert est == "state bytes not measured"
    else:
        v = held / 2**24
        assert est == (v, v, v, 1.0)
    assert verdict(part, est) == want
    rows = {name: (st, detail) for st, name, detail, _ in evaluate([c])}
    st, detail = rows["Adam int8 state 16M <= 2.05 bytes of state per param"]
    assert st == want
    if want == "PASS" and held == 2 * 2**24 + 2**19:
        assert detail == "state B/param 2.031 B (<= 2.05 B)"
    if want == "FAIL":
        assert detail == "state B/param 2.060 B (<= 2.05 B)"


def test_state_cases_bytes_per_step():
    # Read p, g (4 + 4), m, v; write p (4), m, v. float32 moments: 28 B per element; bf16: 20;
    # int8: 16, plus each moment's float32 scale per 256 elements read and written (16/256 B).
    by = {c.name: c for c in all_cases(quick=True)}
    n = 16 * 2**20
    assert by["adam state-f32 16M"].bytes_per_step == 28 * n
    assert by["adam state-bf16 16M"].bytes_per_step == 20 * n
    assert by["adam state-bf16-sr 16M"].bytes_per_step == 20 * n
    assert by["adam state-int8 16M"].bytes_per_step == 16 * n + 16 * (n // 256)
    assert by["adam state-int8 1M"].bytes_per_step == 16 * 2**20 + 16 * 2**12
    # the peers of one size share one cache entry; lrfast's fp32-state step does not
    a, b = by["adam state-int8 16M"], by["adam state-bf16 16M"]
    assert a.key("bnb-adam8bit") == b.key("bnb-adam8bit")
    assert a.key("lrfast-f32") != b.key("lrfast-f32")
    assert a.key("bnb-adam8bit") != by["adam state-int8 1M"].key("bnb-adam8bit")


def test_state_ratio_against_fp32_state():
    # per round f32-state / int8-state: 1.5, 1.2, 1.4, 1.3, 1.6, 1.1 -> median 1.35
    c = state_case("adam state-int8 16M", lrfast=ok([10.0] * 6),
                   **{"lrfast-f32": ok([15.0, 12.0, 14.0, 13.0, 16.0, 11.0])})
    part = next(p for p in parts_of(c.name) if p.peer == "lrfast-f32")
    med, lo, hi, _ = estimate(c, part)
    assert (med, lo, hi) == (pytest.approx(1.35), pytest.approx(1.1), pytest.approx(1.6))
    assert verdict(part, (med, lo, hi, 0.97)) == "NOISE"
