"""ZeRO-1 over MPI: per-rank time of the optimizer update and of each collective, on 1, 2 and
3 ranks (medians over rounds), for Adam on one float32 FlatParams of 16M elements.

Per rank and round: the update of the rank's slice (``ShardedOptimizer.optimizer.step``), the
``Reduce_scatter`` of the gradient, the ``Allgatherv`` of the params, and for comparison the
``Allreduce`` of the whole gradient (``allreduce_grad``; with ``--bf16`` also its bfloat16 form,
``allreduce_grad(dtype="bfloat16")``: rounding, an ``Alltoallv`` and an ``Allgatherv`` of 2-byte
values, the sums in float32, widening back; the column includes all of it). Ranks
are lined up with a barrier before each timed call. The table reports, per rank count, the
median over rounds of the slowest rank's time.

    python bench/distributed_mpi.py [--ranks 1 2 3] [--rounds 9] [--size 16777216]
                                    [--threads 1] [--bf16]

It starts ``mpiexec -n N python -m mpi4py`` on itself for each N (the mpiexec beside this
Python, else the first on PATH). Needs mpi4py and an MPI: pip install mpi4py mpich.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np


def worker(args):
    from mpi4py import MPI

    import lrfast
    from lrfast import distributed as dist

    comm = MPI.COMM_WORLD
    lrfast.set_num_threads(args.threads)
    flat = lrfast.FlatParams({"w": (args.size,)}, np.float32)
    rng = np.random.default_rng(comm.Get_rank())
    flat.param[...] = 0.01
    grad = rng.standard_normal(args.size, dtype=np.float32)
    opt = dist.ShardedOptimizer(flat, lrfast.Adam, comm, lr=1e-3)

    def timed(fn):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rows = {"update": [], "reduce_scatter": [], "allgatherv": [], "allreduce": []}
    if args.bf16:
        rows["allreduce_bf16"] = []
    for r in range(args.rounds + 1):  # the first round warms up and is dropped
        np.copyto(flat.grad, grad)
        times = {"reduce_scatter": timed(opt.reduce_grad),
                 "update": timed(lambda: opt.optimizer.step([opt.grad_shard])),
                 "allgatherv": timed(opt.gather_params)}
        np.copyto(flat.grad, grad)
        times["allreduce"] = timed(lambda: dist.allreduce_grad(flat, comm))
        if args.bf16:
            np.copyto(flat.grad, grad)
            times["allreduce_bf16"] = timed(
                lambda: dist.allreduce_grad(flat, comm, dtype="bfloat16"))
        slowest = {k: comm.allreduce(v, op=MPI.MAX) for k, v in times.items()}
        if r:
            for k, v in slowest.items():
                rows[k].append(v)
    if comm.Get_rank() == 0:
        print(json.dumps({k: statistics.median(v) for k, v in rows.items()}))


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--size", type=int, default=16 * 2**20)
    ap.add_argument("--threads", type=int, default=1, help="lrfast threads per rank")
    ap.add_argument("--bf16", action="store_true", help="also time the bfloat16 all-reduce")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    mpiexec = _mpiexec()
    if mpiexec is None:
        raise SystemExit("no mpiexec found: pip install mpi4py mpich")
    n, b = args.size, 4
    print(f"Adam, float32, {n} elements, {args.threads} lrfast thread(s) per rank, "
          f"median of {args.rounds} rounds of the slowest rank (ms)")
    cols = ["update", "reduce_scatter", "allgatherv", "allreduce"] + ["allreduce_bf16"] * args.bf16
    print(f"{'ranks':>5} " + " ".join(f"{c:>15}" for c in cols))
    for p in args.ranks:
        cmd = [mpiexec, "-n", str(p), sys.executable, "-m", "mpi4py", os.path.abspath(__file__),
               "--worker", "--rounds", str(args.rounds), "--size", str(n),
               "--threads", str(args.threads)] + ["--bf16"] * args.bf16
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode:
            raise SystemExit(f"mpiexec -n {p} failed:\n{out.stdout}\n{out.stderr}")
        med = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{p:>5} " + " ".join(f"{med[c] * 1e3:>15.2f}" for c in cols))
    print(f"bytes sent per rank per step (bandwidth-optimal algorithms, p ranks, n = {n}, "
          f"b = {b}): Reduce_scatter and Allgatherv (p-1)/p*n*b each, Allreduce 2(p-1)/p*n*b"
          + (", allreduce_bf16 2(p-1)/p*n*2 (Alltoallv + Allgatherv)" if args.bf16 else ""))


if __name__ == "__main__":
    main()
