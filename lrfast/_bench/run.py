"""Running the cases: a progress line, each case's steppers timed in rounds (more rounds while
a target is within noise of its threshold), and the ratios and % of floor of the medians."""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import numpy as np

import lrfast

from .cases import DTYPES, MEMORY_BOUND, average_transfers
from .optimizers import OPTIMIZERS
from .peers import (Data, EmbeddingData, Skip, embedding_merge_step, lrfast_step, make_stepper,
                    measured_state_bytes)
from .targets import parts_of
from .timing import Rounds, short_error
from .verdicts import paired, references, undecided

TARGET_ROUNDS = 11            # rounds for a case a target judges (95% interval: 2nd to 10th)
EXTRA_ROUNDS = 8              # rounds added at a time while one of its targets is within noise
# mode -> (most rounds a judged case gets, most seconds of extra rounds per case)
EXTRA_BUDGET = {"quick": (43, 3.0), "full": (83, 10.0)}


class Progress:
    """``[####......] 12/40 adam f32 16M torch-fused`` on a terminal; one line per case otherwise."""

    def __init__(self, total, stream=None):
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        self.done = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = 0

    def case(self, name):
        if not self.tty:
            print(f"bench [{self.done}/{self.total}] {name}", file=self.stream, flush=True)

    def task(self, label):
        if self.tty:
            filled = int(20 * self.done / self.total)
            line = f"[{'#' * filled}{'.' * (20 - filled)}] {self.done + 1}/{self.total} {label}"
            self.stream.write("\r" + line.ljust(self.width))
            self.stream.flush()
            self.width = len(line)

    def advance(self):
        self.done += 1

    def close(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def count_tasks(cases):
    seen, n = set(), 0
    for c in cases:
        if c.impls.get("lrfast") is not None:
            continue
        for impl, skip in c.impls.items():
            if skip is None and (impl.startswith("lrfast") or c.key(impl) not in seen):
                seen.add(c.key(impl))
                n += 1
    return n


def run_case(case, peers, settings, cache, progress, probe=None, floor=None):
    """Time every implementation of ``case`` that runs, in interleaved rounds; a case that a
    target judges gets ``target_rounds`` rounds (with the floor probe among them when a part
    needs it), then more while one of its parts is within noise, up to the mode's budget."""
    progress.case(case.name)
    judged = parts_of(case.name)
    rounds = Rounds(settings["min_sample_s"])
    n = max(settings["repeats"], settings["target_rounds"]) if judged else settings["repeats"]
    if case.kind == "threads":
        progress.task(f"{case.name}")
        if case.opt == "merge":        # lrfast.merge_rows on an embedding case's lookups
            step, args = embedding_merge_step(case)
        else:
            step, args = lrfast_step(case, Data(case.sizes, DTYPES[case.dtype]))
        for nt in (1, 2):
            limit = lrfast.threads(nt)

            def stepper(*a, _limit=limit):
                with _limit:
                    step(*a)
            try:
                stepper(*args)
                rounds.add(f"lrfast-{nt}t", stepper, args)
            except Exception as e:
                case.results[f"lrfast-{nt}t"] = {"status": "error", "reason": short_error(e)}
        progress.advance()
        progress.advance()
    else:
        data: Data | EmbeddingData | None = None
        state_bytes: dict[str, int | None] = {}     # the state cases: bytes of state held
        if case.kind in ("optim", "flat", "average"):
            data = Data(case.sizes, DTYPES[case.dtype])
        elif case.kind in ("lowp", "state"):
            data = Data(case.sizes, np.float32)     # each implementation narrows its copy
        elif case.kind == "embedding":
            data = EmbeddingData(case.size)
            case.info = {"rows": data.rows, "dim": data.dim, "zipf_a": data.zipf,
                         "lookups": len(data.indices[0]), "batches": len(data.indices),
                         "unique_rows": statistics.mean(data.unique)}
        lrfast_skip = case.impls.get("lrfast")
        for impl, skip in case.impls.items():
            if skip is not None:
                case.results[impl] = {"status": skip.status, "reason": str(skip)}
                continue
            if lrfast_skip is not None:
                case.results[impl] = {"status": "skipped", "reason": "no lrfast result"}
                continue
            key = case.key(impl)
            if impl != "lrfast" and key in cache:
                case.results[impl] = dict(cache[key], shared_with=cache[key]["case"])
                continue
            progress.task(f"{case.name} {impl}")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn, args = make_stepper(case, impl, data, peers)
                    fn(*args)                               # untimed: allocates lazy state
                    if case.kind == "state":
                        state_bytes[impl] = measured_state_bytes(fn)
                    rounds.add(impl, fn, args)
            except Skip as e:
                case.results[impl] = {"status": e.status, "reason": str(e)}
            except Exception as e:
                case.results[impl] = {"status": "error", "reason": short_error(e)}
            progress.advance()
        if probe is not None and floor is not None and "lrfast" in rounds.fns \
                and any(p.measure == "floor" for p in judged):
            rounds.add("floor", probe.fn, probe.args(floor["inplace"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rounds.run(None, n)
        _collect(case, rounds, probe, floor)
        # Within noise of a target: more rounds of lrfast and what that target compares it with.
        most, seconds = settings["max_rounds"], settings["extra_s"]
        t0 = time.perf_counter()
        while rounds.count < most and time.perf_counter() - t0 < seconds:
            todo = undecided(case)
            if not todo:
                break
            names = {"lrfast"}
            for p in todo:
                names.update(references(case, p) or ())
            progress.task(f"{case.name}: {rounds.count} rounds, within noise of a target")
            rounds.run(sorted(names), min(EXTRA_ROUNDS, most - rounds.count))
            _collect(case, rounds, probe, floor)
    if case.kind == "state":
        for impl, nbytes in state_bytes.items():
            if nbytes is not None and case.results.get(impl, {}).get("status") == "ok":
                case.results[impl]["state_bytes"] = nbytes
    for impl in rounds.fns:
        if impl not in ("lrfast", "floor") and case.kind != "threads":
            cache[case.key(impl)] = dict(case.results[impl], case=case.name)
    case.rounds = rounds.count


def _collect(case, rounds, probe, floor):
    """Copy the rounds' results into ``case.results`` (the probe's into ``case.probe``)."""
    for name in rounds.fns:
        if name == "floor":
            case.probe = dict(rounds.result(name), bytes=probe.bytes(floor["inplace"]))
        else:
            case.results[name] = rounds.result(name)


def analyse(case, floor):
    """Ratios (peer / lrfast) and % of floor."""
    out = {}
    if case.kind == "threads":
        r1, r2 = case.results.get("lrfast-1t", {}), case.results.get("lrfast-2t", {})
        if r1.get("status") == "ok" and r2.get("status") == "ok":
            out["speedup"] = r1["median_s"] / r2["median_s"]
        return out
    base = case.results.get("lrfast", {})
    if base.get("status") != "ok":
        return out
    out["ratios"] = {p: r["median_s"] / base["median_s"] for p, r in case.results.items()
                     if p != "lrfast" and r.get("status") == "ok"}
    if floor and case.bytes_per_step and case.elements >= MEMORY_BOUND:
        floor_s = case.bytes_per_step / (floor["floor_gbs"] * 1e9)
        out["floor_s"] = floor_s
        out["pct_floor"] = 100.0 * floor_s / base["median_s"]
        if case.kind == "lowp":      # the peers' too: they move the same bytes per step
            out["pct_floor_peers"] = {p: 100.0 * floor_s / r["median_s"]
                                      for p, r in case.results.items()
                                      if p != "lrfast" and r.get("status") == "ok"}
    if case.kind == "average" and case.opt != "ema":
        out.update(extra_cost(case))
    if case.kind == "embedding" and case.info.get("unique_rows"):
        out.update(case.info)
        # time per unique row (mean over the batches): flat if the step is linear in them
        out["ns_per_unique_row"] = {p: 1e9 * r["median_s"] / case.info["unique_rows"]
                                    for p, r in case.results.items()
                                    if r.get("status") == "ok"}
    if case.kind == "state" and case.elements:
        out["state_bytes_per_param"] = {p: r["state_bytes"] / case.elements
                                        for p, r in case.results.items()
                                        if r.get("status") == "ok" and "state_bytes" in r}
    return out


def extra_cost(case):
    """Adam's step with ema= against the step alone ("no-ema"): the extra time of the fused
    average and of a separate Averager.update() after the step, in % of the step alone (the
    medians of per-round values, timed side by side), beside the extra bytes each moves."""
    base = case.results.get("no-ema", {})
    if base.get("status") != "ok":
        return {}
    plain = OPTIMIZERS[case.opt].transfers
    out: dict = {"extra_cost_pct": {}, "extra_bytes_pct": {}}
    for name, impl, separate in (("ema=", "lrfast", False), ("separate", "separate", True)):
        res = case.results.get(impl, {})
        if res.get("status") != "ok":
            continue
        xs, ys = paired(res, base)
        ratios = [x / y for x, y in zip(xs, ys)] or [res["median_s"] / base["median_s"]]
        out["extra_cost_pct"][name] = 100.0 * (statistics.median(ratios) - 1.0)
        out["extra_bytes_pct"][name] = 100.0 * (average_transfers(case.opt, separate) - plain) \
            / plain
    return out
