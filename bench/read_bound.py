"""Why do the two-pass updates (LAMB, LARS, Adafactor) sit below the bandwidth floor? Their
first passes only read (the per-tensor norms), and the floor is measured with a triad, which
reads and writes. This times, through lrfast's own kernels at 16M float32 elements and in
interleaved rounds (medians):

- the triad probe the bench's floor comes from (``a = a + s*c``: 2 reads, 1 write);
- a read-only pass over one array (``lrfast.grad_norm`` of one 16M grad) and over two;
- SGD without momentum (p read and written, g read: the same arrays as the two-array read);
- LARS without momentum (a read-only pass over p and g for the norms, then SGD's pass).

and prints each one's bytes per second. If a read-only pass moves bytes markedly slower than
the triad, an update with such a pass cannot reach "% of floor" figures that count its bytes at
the triad's rate, however its loops are written.

    python bench/read_bound.py [--rounds 11]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import lrfast
from lrfast._bench.timing import FloorProbe

N = 16 * 2**20


def _median_time(fn, rounds):
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal(N).astype(np.float32)
    probe = FloorProbe(N, lrfast.get_num_threads())
    sgd = lrfast.SGD([p.copy()], lr=1e-6)
    lars_p = p.copy()
    lars = lrfast.Lars([lars_p], lr=1e-6, momentum=0.0, weight_decay=1e-4)
    cases = [
        ("triad a = a + s*c (floor probe)", 12, lambda: probe.fn(*probe.args(True))),
        ("read 1 array (grad_norm)", 4, lambda: lrfast.grad_norm([g])),
        ("read 2 arrays (grad_norm)", 8, lambda: lrfast.grad_norm([p, g])),
        ("SGD: read p, g; write p", 12, lambda: sgd.step([g])),
        ("LARS: read p, g; then SGD's pass", 20, lambda: lars.step([g])),
    ]
    results = {name: [] for name, _, _ in cases}
    for _ in range(3):  # interleave: each case sees the same machine state
        for name, _, fn in cases:
            results[name].append(_median_time(fn, args.rounds))
    print(f"{N} float32 elements, {lrfast.get_num_threads()} threads; medians")
    for name, nbytes, _ in cases:
        t = statistics.median(results[name])
        print(f"  {name:36s} {t * 1e3:7.2f} ms  {nbytes * N / t / 1e9:6.1f} GB/s"
              f"  ({nbytes} B/element)")


if __name__ == "__main__":
    main()
