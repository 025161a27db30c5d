"""Where does a 2-thread Adam step start beating a 1-thread one?

    python bench/thresholds.py [--repeats 51] [--min-log2 10] [--max-log2 20]

For float32 single tensors of 2**10 ... 2**20 elements, times one Adam step with 1 and with 2
threads and prints the medians, the speedup and the crossover size.

The kernels themselves run serially when a thread would get fewer than
``lrfast._optim.min_elements_per_thread`` elements, so a 2-thread request only starts a second
thread from ``2 * min_elements_per_thread`` elements on; below that the "2 threads" column is
the serial kernel again (marked ``serial`` in the table) and cannot say where the true
crossover lies. For that the script also uses a simple model, t2(n) ~ t1(n) / 2 + overhead,
with the overhead read off the smallest size that does run on two threads (it also holds any
imperfect scaling there, so it overstates the fixed cost); two threads then win from about
n* = 2 * overhead / (t1(n) / n) elements. This is an estimate, not a measurement.

The step is timed through the raw kernel, ``lrfast._optim.adam_step`` (the call that
``lrfast.Adam.step`` makes after checking its gradients), with nthreads=1 and nthreads=2, so
the Python-side checks do not blur small sizes; their cost is printed separately. 1- and
2-thread runs are interleaved, so slow drift (another process, frequency changes) hits both.
Run it on an otherwise idle machine: a busy core makes every 2-thread step wait for it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
if any((_ROOT / "lrfast").glob("_optim.*")) and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # the checkout, built in place

import lrfast  # noqa: E402
from lrfast import _openmp, _optim  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
             amsgrad=False, maximize=False, step=10)
# Each timed sample runs the step enough times to cover about this many elements, so that the
# timer's resolution and one-off hiccups do not dominate at the small sizes.
ELEMENTS_PER_SAMPLE = 2**18


class Problem:
    """One float32 tensor with its gradient and Adam state, and the kernel's address table."""

    def __init__(self, n, rng):
        self.n = n
        self.param = rng.standard_normal(n, dtype=np.float32)
        self.grad = rng.standard_normal(n, dtype=np.float32)
        self.exp_avg = np.zeros(n, dtype=np.float32)
        self.exp_avg_sq = np.zeros(n, dtype=np.float32)
        arrays = (self.param, self.grad, self.exp_avg, self.exp_avg_sq)
        # Rows: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (unused without amsgrad).
        self.table = np.zeros((5, 1), dtype=np.intp)
        for row, a in enumerate(arrays):
            self.table[row, 0] = a.__array_interface__["data"][0]
        self.offsets = np.array([0, n], dtype=np.intp)

    def kernel(self, nthreads):
        table, offsets, step = self.table, self.offsets, _optim.adam_step
        return lambda: step(table, offsets, False, nthreads, **HYPER)


def sample(fn, inner):
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def paired_medians(fa, fb, inner, repeats):
    """Median seconds per call of ``fa`` and ``fb``, sampled alternately (order flipped each time)."""
    for f in (fa, fb):  # warm caches, pages and the OpenMP pool
        sample(f, inner)
    ta, tb = [], []
    for r in range(repeats):
        if r % 2:
            tb.append(sample(fb, inner))
            ta.append(sample(fa, inner))
        else:
            ta.append(sample(fa, inner))
            tb.append(sample(fb, inner))
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=51, help="samples per size and thread count (>= 21)")
    ap.add_argument("--min-log2", type=int, default=10)
    ap.add_argument("--max-log2", type=int, default=20)
    args = ap.parse_args(argv)
    if args.repeats < 21:
        ap.error("--repeats must be at least 21")
    if not _openmp.openmp_enabled():
        print("lrfast was built without OpenMP: every step is serial, nothing to compare.")
        return 1

    per_thread = _optim.min_elements_per_thread
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"lrfast {lrfast.__version__}, Adam float32, single tensor; cpus={os.cpu_count()}, "
          f"OpenMP max threads={_openmp.max_threads()}, load avg (1 min)={load:.2f}")
    print(f"min_elements_per_thread={per_thread}: 2 threads run only from {2 * per_thread} elements; "
          f"medians of {args.repeats} samples\n")
    if load > 0.5:
        print("note: the load average is not ~0 (it lags by minutes); if another process is still "
              "running, the 2-thread timings suffer.\n")

    rng = np.random.default_rng(0)
    rows = []
    print(f"{'size':>9} {'t1 med us':>10} {'t2 med us':>10} {'speedup':>8}  threads used")
    for k in range(args.min_log2, args.max_log2 + 1):
        n = 2**k
        prob = Problem(n, rng)
        inner = max(1, ELEMENTS_PER_SAMPLE // n)
        t1, t2 = paired_medians(prob.kernel(1), prob.kernel(2), inner, args.repeats)
        parallel = n >= 2 * per_thread
        rows.append((n, t1, t2, parallel))
        print(f"{n:>9} {t1 * 1e6:>10.2f} {t2 * 1e6:>10.2f} {t1 / t2:>8.2f}  "
              f"{'2' if parallel else '1 (serial)'}")

    measured = [(n, t1, t2) for n, t1, t2, parallel in rows if parallel]
    print()
    if not measured:
        print("no size here is large enough to run on 2 threads.")
        return 0
    wins = [n for n, t1, t2 in measured if t2 < t1]
    first_parallel = measured[0][0]
    if not wins:
        print(f"crossover: 2 threads never faster up to {rows[-1][0]} elements.")
    else:
        # The crossover is the smallest size from which 2 threads stay ahead.
        stays = [n for n, _, _ in measured if all(t2 < t1 for m, t1, t2 in measured if m >= n)]
        cross = stays[0] if stays else wins[0]
        note = (f" (the smallest size that runs on 2 threads; below {first_parallel} the kernel "
                "is serial, so the true crossover may be smaller)" if cross == first_parallel else "")
        print(f"crossover (measured): 2 threads faster from {cross} elements{note}.")

    # Model for the sizes the kernel keeps serial: t2(n) = t1(n) / 2 + overhead. The overhead is
    # read off the smallest size that runs on 2 threads (cache resident, so closest to the sizes
    # in question). It also holds any imperfect scaling there, so it overstates the fixed cost of
    # a parallel region, and n* errs towards larger sizes.
    n0, t1_0, t2_0 = measured[0]
    overhead = t2_0 - t1_0 / 2
    per_elem = t1_0 / n0
    print(f"OpenMP overhead estimate at {n0} elements: t2 - t1/2 = {overhead * 1e6:.2f} us per step "
          f"(serial cost {per_elem * 1e9:.3f} ns/element).")
    if overhead > 0:
        n_star = 2 * overhead / per_elem
        print(f"model crossover n* = 2 * overhead / cost = {n_star:,.0f} elements "
              f"(~{n_star / 2:,.0f} per thread; the kernel's threshold is {per_thread} per thread); "
              "an extrapolation, not a measurement.")
    else:
        print("model crossover: no overhead visible (t2 <= t1/2); 2 threads should win at any size.")

    # What the public API adds on top of the kernel (gradient checks, Python calls), at the
    # smallest size, where it matters most.
    n = rows[0][0]
    prob = Problem(n, rng)
    opt = lrfast.Adam([prob.param])
    grads = [prob.grad]
    inner = max(1, ELEMENTS_PER_SAMPLE // n)
    with lrfast.threads(1):
        t_api, t_raw = paired_medians(lambda: opt.step(grads), prob.kernel(1), inner, args.repeats)
    print(f"lrfast.Adam.step vs raw kernel at {n} elements, 1 thread: {t_api * 1e6:.2f} us vs "
          f"{t_raw * 1e6:.2f} us (Python-side cost {(t_api - t_raw) * 1e6:.2f} us).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
