"""Is a low-precision Adam step bound by memory or by arithmetic? Its time per element where
the data stays in cache (16K elements: no memory traffic to speak of) against the 16M case, for
lrfast on 1 and 2 threads and torch's fused Adam, in interleaved rounds (medians).

If lrfast's cache-resident time on one thread, halved for two, is above the floor's time per
element (bytes per element / floor bandwidth, from ``python -m lrfast bench``), the step cannot
reach the floor on this machine's cores, whatever the memory does.

    python bench/lowp_bound.py [--rounds 9] [--floor-gbs 25.6]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import lrfast
from lrfast._bench import peers as P
from lrfast._bench.cases import SIZES, VARIANTS, Case


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--floor-gbs", type=float, help="floor bandwidth (GB/s) for the last column")
    args = ap.parse_args()
    SIZES.setdefault("16K", (16 * 1024,))
    peers = P.Peers(no_optax=True, no_deepspeed=True, threads=2)
    fns = {}
    for var in ("bf16", "f16", "bf16 f32-state", "offload", "f32"):
        for size in ("16K", "16M"):
            c = Case(f"adam {var} {size}", "lowp", "adam", var, size)
            data = P.Data(c.sizes, np.float32)
            impls = ["lrfast"] + (["torch-fused"] if var in ("bf16", "f16", "f32")
                                  and peers.torch is not None else [])
            for impl in impls:
                fn, fargs = P.make_stepper(c, impl, data, peers)
                fn(*fargs)
                reps = 1 if size == "16M" else 2000
                for nt in ((1, 2) if impl == "lrfast" else (2,)):
                    fns[(var, size, impl, nt)] = (fn, fargs, reps, c.elements)
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, (fn, fargs, reps, n) in fns.items():
            with lrfast.threads(k[3]):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(*fargs)
                times[k].append((time.perf_counter() - t0) / reps / n * 1e9)
    print(f"{'variant':15} {'size':4} {'impl':12} thr  ns/element (median, min)"
          + ("   floor ns/element" if args.floor_gbs else ""))
    for (var, size, impl, nt), v in times.items():
        floor = (f"   {VARIANTS[var].bytes_per_element / args.floor_gbs:.3f}"
                 if args.floor_gbs else "")
        print(f"{var:15} {size:4} {impl:12} {nt}t   {statistics.median(v):7.3f} {min(v):7.3f}{floor}")


if __name__ == "__main__":
    main()
