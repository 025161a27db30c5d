"""Where does a 2-thread step start beating a 1-thread one? (sets the kernels' work threshold)

    python bench/thresholds.py [--repeats 31] [--min-log2 9] [--max-log2 20]

For float32 single tensors of 2**9 ... 2**20 elements, times one step of every update (with its
defaults: plain SGD is the cheapest, where threading pays off last) with 1 and with 2 threads,
through the kernel's plan so that Python-side checks do not blur the small sizes. The kernels' threshold is
lowered to 1 element per thread for the measurement, so the 2-thread column really runs two
threads at every size. 1- and 2-thread samples are interleaved, so slow drift hits both. Prints
medians, speedups, the crossover for each update, and the per-thread threshold it implies.
Run it on an otherwise idle machine: a busy core makes every 2-thread step wait for it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
_BUILT = any((_ROOT / "lrfast" / ("_optim" + s)).exists() for s in EXTENSION_SUFFIXES)
if _BUILT and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # the checkout, built in place (not just its .pyi stubs)

import lrfast  # noqa: E402
from lrfast import _dispatch, _layout, _openmp  # noqa: E402
from lrfast._specs import UPDATES  # noqa: E402

# Every update of the spec table, with its defaults (SGD: no momentum, the cheapest update).
KERNELS = tuple(UPDATES)
ELEMENTS_PER_SAMPLE = 2**18  # each sample repeats the step to cover about this many elements


def problem(kind, n, rng):
    """The kernel call for one float32 tensor of ``n`` elements, its state zero."""
    update = UPDATES[kind]
    h = update.validate({})
    used = update.state_buffers(h)
    arrays = [rng.standard_normal(n, dtype=np.float32) for _ in range(2)]
    rows = [[_layout.address(a)] for a in arrays]
    for b in update.buffers:
        if b.name in used:
            arrays.append(np.zeros(n, np.float32))
            rows.append([_layout.address(arrays[-1])])
        else:
            rows.append(None)
    table, offsets = _layout.table(rows, [n])
    plan = _layout.plan(kind, table, offsets, "float32")
    plan.set_hyper(update.kernel_values(h, _dispatch.kernels))

    def call(nthreads):
        return lambda: plan.run(h["lr"], 10, nthreads)

    return call, (arrays, table, offsets)


def sample(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def paired_medians(fa, fb, inner, repeats):
    for f in (fa, fb):
        sample(f, inner)
    ta, tb = [], []
    for r in range(repeats):
        first, second = ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta))
        first[1].append(sample(first[0], inner))
        second[1].append(sample(second[0], inner))
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--min-log2", type=int, default=9)
    ap.add_argument("--max-log2", type=int, default=20)
    args = ap.parse_args(argv)
    if not _openmp.openmp_enabled():
        print("lrfast was built without OpenMP: every step is serial, nothing to compare.")
        return 1
    kernels = _dispatch.kernels
    saved = kernels.get_min_elements_per_thread()
    print(f"lrfast {lrfast.__version__} ({_dispatch.name} kernels), float32 single tensor, "
          f"cpus={os.cpu_count()}; medians of {args.repeats} samples; current thresholds "
          f"{saved} elements per thread\n")
    rng = np.random.default_rng(0)
    kernels.set_min_elements_per_thread(1)
    crossings = {}
    try:
        for kind in KERNELS:
            print(f"{kind}: {'size':>9} {'1 thread us':>12} {'2 threads us':>13} {'speedup':>8}")
            rows = []
            for k in range(args.min_log2, args.max_log2 + 1):
                n = 2**k
                call, _keep = problem(kind, n, rng)
                inner = max(1, ELEMENTS_PER_SAMPLE // n)
                t1, t2 = paired_medians(call(1), call(2), inner, args.repeats)
                rows.append((n, t1, t2))
                print(f"{'':>{len(kind) + 1}} {n:>10} {t1 * 1e6:>12.2f} {t2 * 1e6:>13.2f} {t1 / t2:>8.2f}")
            stays = [n for n, _, _ in rows if all(t2 < t1 for m, t1, t2 in rows if m >= n)]
            crossings[kind] = stays[0] if stays else None
            print(f"{'':>{len(kind) + 1}} 2 threads faster from {crossings[kind]} elements\n")
    finally:
        kernels.set_min_elements_per_thread(None)
    print("implied thresholds (crossover / 2 elements per thread): " + ", ".join(
        f"{kind} {c // 2 if c else 'none'}" for kind, c in crossings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
