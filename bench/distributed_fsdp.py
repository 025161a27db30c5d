"""Per-rank optimizer step time under FSDP2: lrfast.torch.AdamW against torch.optim.AdamW's
foreach and fused paths, on the DTensor params of a float32 model sharded with fully_shard
over a gloo group of processes on this machine.

The model: ``--blocks`` blocks of Linear(dim, dim) + LayerNorm(dim) (4 tensors each) and a
Linear head, each block fully_shard-ed and the root too; the defaults make 242 tensors and
about 4M params (each rank holds 1/world of them). One forward and backward makes the
(DTensor) gradients; then each optimizer, made fresh on the same params, takes ``--warmup``
untimed steps and ``--steps`` timed ones with those gradients. Only ``step()`` is timed, on
each rank, the ranks started together by a barrier before every step; a row reports, per
rank, the median over the timed steps. Optimizers take turns in rounds (every round steps
each one ``--steps / --rounds`` times), so a machine that gets busier part-way touches them
all alike.

    python bench/distributed_fsdp.py                  # 2 and then 3 processes
    python bench/distributed_fsdp.py --worlds 2 --steps 60

It prints which lrfast it imported (from a source checkout, put the checkout first on
PYTHONPATH).

Threads: each process gets ``--threads`` (default: the cores divided among the processes,
at least 1) for torch and for lrfast. Timings mean something only on an otherwise idle
machine.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

OPTIMIZERS = ("lrfast AdamW", "torch AdamW foreach", "torch AdamW fused")


def _make(name, params, torch, lt):
    kw = dict(lr=1e-4, weight_decay=0.01)
    if name == "lrfast AdamW":
        return lt.AdamW(params, **kw)
    if name == "torch AdamW foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    return torch.optim.AdamW(params, fused=True, **kw)


def _worker(rank, world, port, args, out):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lrfast
    import lrfast.torch as lt
    torch.set_num_threads(args.threads)
    lrfast.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        blocks = [torch.nn.Sequential(torch.nn.Linear(args.dim, args.dim),
                                      torch.nn.LayerNorm(args.dim), torch.nn.Tanh())
                  for _ in range(args.blocks)]
        net = torch.nn.Sequential(*blocks, torch.nn.Linear(args.dim, 16))
        for b in blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(net, mesh=mesh)
        params = list(net.parameters())
        x = torch.randn(8, args.dim)
        net(x).square().mean().backward()
        info = (len(params), sum(p.numel() for p in params),
                sum(p.to_local().numel() for p in params))
        times = {}
        errors = {}
        opts = {}
        for name in OPTIMIZERS:
            try:
                opts[name] = _make(name, params, torch, lt)
                for _ in range(args.warmup):
                    opts[name].step()
                times[name] = []
            except Exception as e:  # noqa: BLE001  (reported in the table)
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                opts.pop(name, None)
        # every rank must agree on what runs (a failure on one rank only would hang the rest)
        ok = [sorted(opts)]
        every = [None] * world
        dist.all_gather_object(every, ok)
        if any(e != ok for e in every):
            raise RuntimeError(f"the ranks disagree on which optimizers run: {every}")
        per_round = max(1, args.steps // args.rounds)
        for _ in range(args.rounds):
            for name, opt in opts.items():
                for _ in range(per_round):
                    dist.barrier()
                    t = time.perf_counter()
                    opt.step()
                    times[name].append(time.perf_counter() - t)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, medians)
        if rank == 0:
            with open(out, "w") as f:
                f.write(repr((info, gathered, errors)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, args):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.txt")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        with open(out) as f:
            info, gathered, errors = ast.literal_eval(f.read())
    ntensors, nparams, nlocal = info
    print(f"\n{world} processes, {args.threads} thread(s) each: {ntensors} tensors, "
          f"{nparams / 1e6:.2f}M params float32 ({nlocal / 1e6:.2f}M on rank 0); "
          f"step() median of {max(1, args.steps // args.rounds) * args.rounds} steps, ms")
    head = f"{'optimizer':<22}" + "".join(f"{'rank ' + str(r):>10}" for r in range(world))
    print(head)
    for name in OPTIMIZERS:
        if name in errors:
            print(f"{name:<22}  does not run: {errors[name]}")
            continue
        print(f"{name:<22}" + "".join(f"{g[name] * 1e3:>10.2f}" for g in gathered))
    if "lrfast AdamW" in errors:
        return
    torch_names = [n for n in OPTIMIZERS if n != "lrfast AdamW" and n not in errors]
    if not torch_names:
        return
    # per rank: torch's fastest path over lrfast's; and the slowest rank of each (a step of
    # the job waits for its slowest rank)
    ratios = []
    for g in gathered:
        fastest = min(torch_names, key=lambda n: g[n])
        ratios.append(f"{g[fastest] / g['lrfast AdamW']:.2f}x ({fastest})")
    best = min(torch_names, key=lambda n: max(g[n] for g in gathered))
    slowest = max(g[best] for g in gathered) / max(g["lrfast AdamW"] for g in gathered)
    print("torch's fastest path / lrfast, per rank: " + ", ".join(ratios))
    print(f"slowest rank / slowest rank: {slowest:.2f}x ({best}); target >= 3x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--blocks", type=int, default=60)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per process (0: the cores divided among the processes)")
    args = ap.parse_args(argv)
    import lrfast
    print(f"lrfast {lrfast.__version__} from {os.path.dirname(lrfast.__file__)}")
    threads = args.threads
    for world in args.worlds:
        args.threads = threads if threads > 0 else max(1, (os.cpu_count() or 1) // world)
        run(world, args)


if __name__ == "__main__":
    sys.exit(main())
