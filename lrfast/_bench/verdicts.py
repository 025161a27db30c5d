"""How a noisy measurement of a target part is judged: PASS, FAIL, NOISE or SKIP.

In a case, lrfast, each peer and (for a floor part) the bandwidth probe are timed in
interleaved rounds: round i times one batch of each in turn, so the i-th samples saw the same
machine within milliseconds. Each round gives one value of the part's statistic (a ratio of two
times measured side by side), and the part is judged on the median of those values and its
distribution-free 95% confidence interval: the order statistics ``v_(k) <= median <=
v_(n+1-k)`` with k the largest for which ``P(Binomial(n, 1/2) < k) <= 2.5%`` (n >= 6; below
that the interval is [min, max], whose confidence is printed).

* ``PASS``: the whole interval meets the threshold;
* ``FAIL``: the whole interval misses it by more than the part's *spread*, a shortfall that
  neither this run's noise nor the difference between runs explains;
* ``NOISE``: otherwise: within noise of the target.

A ``bytes`` part (state bytes per param) is a count, not a timing: its interval is the value
itself and no spread applies, so it is PASS or FAIL.

The spread. On a shared 2-core machine the ratios move between runs by far more than within
one: the machine has slower and faster phases lasting tens of seconds (bandwidth, and how fast
two threads compute), which every case in a run may see alike. A 95% interval from one run
then says little about the next, and a quick run would FAIL a target that a full run minutes
later PASSes. So each part carries the factor by which its statistic was seen to vary between
runs on this project's machine (its max/min over repeated runs, at least 1.1; a part measured
in too few runs takes the largest factor of its family of cases), and a FAIL needs the
interval's far end, moved by that factor, still to miss the threshold. The factors live in
``spread.py``, written by ``bench/target_spread.py`` from the JSON of repeated runs.

A case with a part still in NOISE is given more rounds, up to a budget, before it is judged.
Where a peer was not timed with lrfast (a ``flat`` row reuses its list twin's peers) the part
takes the conservative interval ``[peer_lo / lrfast_hi, peer_hi / lrfast_lo]`` of the two
medians' own intervals.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from .targets import TARGETS, parts_of

CONFIDENCE = 0.95
TORCH_PATHS = ("torch-loop", "torch-foreach", "torch-fused")
STATUS_ORDER = ("FAIL", "NOISE", "SKIP", "PASS")   # a target takes its worst part's status


def median_ci(values, confidence=CONFIDENCE):
    """(median, lo, hi, achieved confidence) of ``values``: the distribution-free interval of
    the median from order statistics (exact under independence, whatever the distribution)."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        raise ValueError("no values")
    tail = (1.0 - confidence) / 2
    k, below = 1, 0.0                  # below: P(B <= k - 1) for B ~ Binomial(n, 1/2)
    cdf = 0.0
    for j in range(n // 2):
        cdf += math.comb(n, j) / 2.0 ** n
        if cdf > tail:
            break
        k, below = j + 1, cdf
    if k == 1:
        below = 1.0 / 2.0 ** n         # [min, max]
    return statistics.median(v), v[k - 1], v[n - k], max(0.0, 1.0 - 2.0 * below)


def paired(a, b):
    """The samples of two timed results that come from the same rounds, as two lists."""
    rb = dict(zip(b["rounds"], b["samples_s"]))
    xs, ys = [], []
    for r, s in zip(a["rounds"], a["samples_s"]):
        if r in rb:
            xs.append(s)
            ys.append(rb[r])
    return xs, ys


def _ok(res):
    return isinstance(res, dict) and res.get("status") == "ok"


def resolve_peer(case, part):
    """The peer a ratio or cost part compares with in ``case`` (None if it did not run)."""
    if part.peer != "torch-fastest":
        return part.peer if _ok(case.results.get(part.peer)) else None
    ran = [p for p in TORCH_PATHS if _ok(case.results.get(p))]
    return min(ran, key=lambda p: case.results[p]["median_s"]) if ran else None


def references(case, part):
    """Names of what a part's statistic needs timed beside lrfast in ``case`` (the floor probe
    is "floor"); None if something it needs did not run."""
    if part.measure == "speedup":
        return ["lrfast-1t", "lrfast-2t"]
    if part.measure in ("time", "bytes"):
        return []
    if part.measure == "floor":
        return ["floor"] if _ok(getattr(case, "probe", None)) else None
    peer = resolve_peer(case, part)
    return [peer] if peer else None


def estimate(case, part):
    """(median, lo, hi, confidence) of the part's statistic in ``case``, or a reason (str)."""
    res = case.results
    if part.measure == "speedup":
        one, two = res.get("lrfast-1t"), res.get("lrfast-2t")
        if not (_ok(one) and _ok(two)):
            return "not run"
        xs, ys = paired(one, two)
        return median_ci([x / y for x, y in zip(xs, ys)])
    base = res.get("lrfast")
    if not _ok(base):
        return "lrfast did not run"
    if part.measure == "time":
        return median_ci(base["samples_s"])
    if part.measure == "bytes":
        if "state_bytes" not in base or not case.elements:
            return "state bytes not measured"
        v = base["state_bytes"] / case.elements
        return v, v, v, 1.0
    if part.measure == "floor":
        probe = getattr(case, "probe", None)
        if probe is None or not _ok(probe) or not case.bytes_per_step:
            return "no floor probe"
        xs, ys = paired(base, probe)
        # Each round: the probe's bandwidth in that round, and the step's time at it.
        return median_ci([100.0 * case.bytes_per_step * p / probe["bytes"] / t
                          for t, p in zip(xs, ys)])
    peer = resolve_peer(case, part)
    if peer is None:
        return "skipped"
    other = res[peer]
    if part.measure == "cost":        # lrfast's time over the peer's: the ratio's inverse
        base, other = other, base
    if "shared_with" not in other and "shared_with" not in base:
        xs, ys = paired(base, other)
        if xs:
            return median_ci([p / t for t, p in zip(xs, ys)])
    # Not timed together: combine the two medians' intervals (each at sqrt of the confidence).
    each = math.sqrt(CONFIDENCE)
    tm, tlo, thi, tc = median_ci(base["samples_s"], each)
    pm, plo, phi, pc = median_ci(other["samples_s"], each)
    return pm / tm, plo / thi, phi / tlo, tc * pc


def verdict(part, est):
    """PASS, FAIL, NOISE or SKIP for one part's estimate (see the module's docstring)."""
    if isinstance(est, str):
        return "SKIP"
    _, lo, hi, _ = est
    thr, spread = part.threshold, part.spread
    if part.measure == "bytes":        # a count: no noise, no spread between runs
        spread = 1.0
    if part.at_least:
        good, bad = lo >= thr, hi * spread < thr
    else:
        good, bad = hi <= thr, lo / spread > thr
    return "PASS" if good else "FAIL" if bad else "NOISE"


def undecided(case):
    """The parts measured on ``case`` that more rounds could still decide: in NOISE with an
    interval that holds the threshold, or the threshold moved by the spread (an interval that
    lies between the two stays in NOISE however narrow it gets)."""
    out = []
    for p in parts_of(case.name):
        est = estimate(case, p)
        if verdict(p, est) != "NOISE":
            continue
        _, lo, hi, _ = est
        far = p.threshold / p.spread if p.at_least else p.threshold * p.spread
        if lo <= p.threshold <= hi or lo <= far <= hi:
            out.append(p)
    return out


def evaluate(cases):
    """One row per target whose cases ran: (status, name, detail, parts as dicts)."""
    by = {c.name: c for c in cases}
    rows = []
    for t in TARGETS:
        if not any(p.case in by for p in t.parts):
            continue
        details, statuses, parts = [], [], []
        for p in t.parts:
            c = by.get(p.case)
            est: Any = estimate(c, p) if c is not None else "not selected"
            st = verdict(p, est)
            statuses.append(st)
            op = ">=" if p.at_least else "<="
            label = p.name()
            if p.peer == "torch-fastest":
                label = f"{(resolve_peer(c, p) if c else None) or 'torch fastest'}/lrfast"
            if isinstance(est, str):
                details.append(f"{label} skipped")
                parts.append({"key": p.key, "case": p.case, "label": label, "status": st,
                              "reason": est})
                continue
            med, lo, hi, conf = est
            ci = f"[{p.fmt(lo)}, {p.fmt(hi)}]"
            if conf < CONFIDENCE - 1e-9:
                ci += f" at {100 * conf:.0f}%"
            cond = f"{op} {p.fmt(p.threshold, True)}"
            if st != "PASS" and p.measure != "bytes":
                cond += f"; runs vary x{p.spread:g}"
            note = ({"FAIL": " FAIL", "NOISE": " within noise"}.get(st, "")
                    if len(t.parts) > 1 else "")
            shown = f"{p.fmt(med)} {ci}" if p.measure != "bytes" else p.fmt(med)   # exact
            details.append(f"{label} {shown} ({cond}){note}")
            parts.append({"key": p.key, "case": p.case, "label": label, "status": st,
                          "value": med, "lo": lo, "hi": hi, "confidence": conf, "threshold": p.threshold, "op": op,
                          "family": p.family, "spread": p.spread})
        status = min(statuses, key=STATUS_ORDER.index)
        rows.append((status, t.name, "; ".join(details), parts))
    return rows
