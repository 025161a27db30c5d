"""``python -m lrfast bench``'s options, and the run from them: select and plan the cases,
time them, report; the exit status says whether lrfast's own cases ran."""
from __future__ import annotations

import gc
import json
import re
import sys
import time
from contextlib import nullcontext

import lrfast

from .cases import MEMORY_BOUND, all_cases, select
from .machine import cpu_snapshot, machine_info, other_load
from .peers import Peers, plan
from .report import report, to_json, write_plot
from .run import EXTRA_BUDGET, TARGET_ROUNDS, Progress, analyse, count_tasks, run_case
from .timing import FloorProbe, measure_floor

MISSING_MATPLOTLIB = ('--plot needs matplotlib, which is not installed: '
                      'pip install "lrfast[plot]" (or pip install matplotlib)')


def add_arguments(p):
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats and cases (under a minute on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write raw medians, ratios and machine info")
    p.add_argument("--plot", metavar="FILE", help="bar chart of lrfast's speed-up per case "
                   "(needs matplotlib; format from the suffix)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for lrfast and torch (default: their defaults)")
    p.add_argument("--cases", metavar="REGEX",
                   help="run only cases whose name matches (case-insensitive search), "
                        "e.g. 'adam f32', '16M|1k', 'schedule', 'flat', 'ema'")
    p.add_argument("--repeats", type=int, metavar="R",
                   help="rounds per case (default 9, quick 5; a case a target judges gets at "
                        f"least {TARGET_ROUNDS}, and more while the target is within noise)")
    p.add_argument("--no-torch", action="store_true", help="do not run torch peers")
    p.add_argument("--no-optax", action="store_true", help="do not run optax/jax peers")
    p.add_argument("--no-deepspeed", action="store_true",
                   help="do not run DeepSpeedCPUAdam (its op's first build takes minutes)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")


def _error(msg):
    print(f"lrfast bench: error: {msg}", file=sys.stderr)


def main(args):
    """The ``bench`` subcommand; returns the exit status (2: bad options or no matplotlib for
    --plot, 1: an lrfast case failed or an output could not be written)."""
    if args.threads is not None and args.threads < 1:
        _error(f"--threads must be at least 1, got {args.threads}")
        return 2
    if args.repeats is not None and args.repeats < 1:
        _error(f"--repeats must be at least 1, got {args.repeats}")
        return 2
    try:
        cases = select(all_cases(args.quick), args.cases)
    except re.error as e:
        _error(f"--cases is not a valid regular expression: {e}")
        return 2
    if not cases:
        _error(f"--cases {args.cases!r} matches no case (see --list)")
        return 2
    if args.list:
        for c in cases:
            print(c.name)
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
        except ImportError:
            _error(MISSING_MATPLOTLIB)
            return 2
    start = time.perf_counter()
    cpu_before = cpu_snapshot()
    peers = Peers(args.no_torch, args.no_optax, args.threads, args.no_deepspeed)
    gc.collect()
    gc.freeze()   # torch's and jax's objects: keeps the per-case collections short
    with lrfast.threads(args.threads) if args.threads is not None else nullcontext():
        nthreads = lrfast.get_num_threads()
        mode = "quick" if args.quick else "full"
        repeats = args.repeats or (5 if args.quick else 9)
        most, extra_s = EXTRA_BUDGET[mode]
        settings = {"mode": mode, "repeats": repeats,
                    "target_rounds": max(repeats, TARGET_ROUNDS),
                    "max_rounds": max(repeats, most), "extra_s": extra_s,
                    "min_sample_s": 2e-3 if args.quick else 5e-3,
                    "cases": args.cases, "threads": nthreads}
        plan(cases, peers, args.quick)
        need_floor = any(c.bytes_per_step and c.elements >= MEMORY_BOUND for c in cases)
        progress = Progress(count_tasks(cases) + need_floor)
        floor = probe = None
        try:
            if need_floor:
                # The same probe in both modes, so that % of floor means the same thing.
                probe = FloorProbe(32 * 2**20, nthreads)
                progress.case("floor")
                progress.task(f"floor (triad, {probe.n // 2**20}M float32)")
                floor = measure_floor(probe, settings["repeats"])
                progress.advance()
            cache: dict[tuple, dict] = {}
            for c in cases:
                t0 = time.perf_counter()
                run_case(c, peers, settings, cache, progress, probe, floor)
                gc.collect()
                c.wall_s = time.perf_counter() - t0
        finally:
            progress.close()
            del probe
    for c in cases:
        c.analysis = analyse(c, floor)
    machine = machine_info(peers, nthreads)
    machine["other_processes_cores"] = other_load(cpu_before)
    report(cases, machine, floor, settings)
    wall = time.perf_counter() - start
    print(f"\nwall time: {wall:.1f} s")
    status = 0
    if any(r.get("status") == "error" for c in cases for k, r in c.results.items()
           if k.startswith("lrfast")):
        status = 1
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(to_json(cases, machine, floor, settings, wall), f, indent=1)
            print(f"wrote {args.json}")
        except OSError as e:
            _error(f"cannot write {args.json!r}: {e.strerror or e}")
            status = 1
    if args.plot:
        try:
            write_plot(cases, args.plot)
            print(f"wrote {args.plot}")
        except (OSError, ValueError) as e:
            _error(f"cannot write {args.plot!r}: {e}")
            status = 1
    return status
