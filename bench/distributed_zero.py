"""ZeroRedundancyOptimizer (ZeRO-1) on gloo on this machine: the optimizer step's time per
rank with lrfast.torch.AdamW as its optimizer_class, against torch.optim.AdamW (foreach=True,
and fused=True where it runs), on 1, 2 and 3 processes.

The model: 9 ``TransformerEncoderLayer``s of width 256 (4 heads, feed-forward 512) and a
linear head, float32: 110 parameter tensors, about 4.75M elements (the layer shapes of
lrfast._bench's 110-tensor transformer, 8x wider). Every param gets a fixed random gradient
once; no forward or backward runs. Each rank times ``zero.step()`` (its shard's update, then
the broadcast of every shard to every rank) and, inside it, the shard's update alone (the
wrapped ``optimizer_class`` step), after a barrier, over ``--steps`` steps after
``--warmup``; the table shows the slowest rank's median. Threads per rank (torch's and
lrfast's): the machine's cores divided by the process count, at least 1.

    python bench/distributed_zero.py [--steps 30] [--warmup 5] [--worlds 1,2,3] [--width 256]

With more processes than cores the ranks share cores (3 ranks on 2 cores): their times
then include waiting for one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

HEAD = 8
LAYERS = 9


def _model(width):
    import torch
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0,
                                               batch_first=True) for _ in range(LAYERS)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, HEAD))


def _variants():
    import torch
    import lrfast.torch as lt
    return (("lrfast.torch.AdamW", lt.AdamW, {}),
            ("torch AdamW foreach", torch.optim.AdamW, {"foreach": True}),
            ("torch AdamW fused", torch.optim.AdamW, {"fused": True}))


def _rank(rank, world, port, args, out):
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    import lrfast
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    lrfast.set_num_threads(threads)
    results = {}
    try:
        for label, cls, extra in _variants():
            net = _model(args.width)
            ps = list(net.parameters())
            g = torch.Generator().manual_seed(1)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            try:
                zero = ZeroRedundancyOptimizer(ps, optimizer_class=cls, lr=1e-3,
                                               weight_decay=0.01, **extra)
                zero.step()
                error = None
            except Exception as e:  # (fused=True where this torch has no CPU kernel)
                error = f"{type(e).__name__}: {e}"
            # every rank agrees on whether this variant runs before any rank times it
            errors = [None] * world
            dist.all_gather_object(errors, error)
            if any(errors):
                results[label] = {"error": next(e for e in errors if e)}
                continue
            local_times = []
            inner = zero.optim.step

            def timed(*a, **k):
                t = time.perf_counter()
                r = inner(*a, **k)
                local_times.append(time.perf_counter() - t)
                return r

            zero.optim.step = timed
            step_times = []
            for i in range(args.warmup + args.steps):
                dist.barrier()
                t = time.perf_counter()
                zero.step()
                if i >= args.warmup:
                    step_times.append(time.perf_counter() - t)
            local_times = local_times[args.warmup:]
            own = sum(p.numel() for grp in zero.optim.param_groups for p in grp["params"])
            mine = {"step_ms": 1e3 * statistics.median(step_times),
                    "local_ms": 1e3 * statistics.median(local_times),
                    "elements": own, "tensors": sum(len(grp["params"])
                                                    for grp in zero.optim.param_groups)}
            per_rank = [None] * world
            dist.all_gather_object(per_rank, mine)
            results[label] = {"ranks": per_rank}
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"threads": threads, "results": results}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    import torch
    import torch.multiprocessing as mp
    net = _model(args.width)
    ps = list(net.parameters())
    print(f"model: {len(ps)} tensors, {sum(p.numel() for p in ps) / 1e6:.2f}M float32 "
          f"elements; {os.cpu_count()} cores; torch {torch.__version__}; median of "
          f"{args.steps} steps after {args.warmup}")
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for world in worlds:
            out = os.path.join(d, f"world{world}.json")
            t = time.perf_counter()
            mp.spawn(_rank, args=(world, _free_port(), args, out), nprocs=world, join=True)
            with open(out) as f:
                runs[world] = json.load(f)
            print(f"  {world} process(es): {time.perf_counter() - t:.0f} s, "
                  f"{runs[world]['threads']} thread(s) per rank", file=sys.stderr)
    labels = [label for label, _, _ in _variants()]
    base = runs[worlds[0]]["results"]
    lr = labels[0]
    print(f"\n{'procs':>5}  {'optimizer':<20} {'elements/rank':>14} {'step ms':>8} "
          f"{'local ms':>9} {'step vs ' + str(worlds[0]) + 'p':>10} {'torch/lrfast':>13}")
    print("       (slowest rank's median; step = zero.step(), local = the shard's update; "
          "torch/lrfast: step, local)")
    for world in worlds:
        res = runs[world]["results"]
        for label in labels:
            r = res[label]
            if "error" in r:
                print(f"{world:>5}  {label:<20} did not run: {r['error'][:80]}")
                continue
            step = max(x["step_ms"] for x in r["ranks"])
            local = max(x["local_ms"] for x in r["ranks"])
            elems = "/".join(f"{x['elements'] / 1e6:.2f}M" for x in r["ranks"])
            vs1 = ""
            if "ranks" in base.get(label, {}):
                vs1 = f"{step / max(x['step_ms'] for x in base[label]['ranks']):.2f}x"
            cmp = ""
            if label != lr and "ranks" in res.get(lr, {}):
                ls = max(x["step_ms"] for x in res[lr]["ranks"])
                ll = max(x["local_ms"] for x in res[lr]["ranks"])
                cmp = f"{step / ls:.2f}x, {local / ll:.2f}x"
            print(f"{world:>5}  {label:<20} {elems:>14} {step:8.2f} {local:9.2f} "
                  f"{vs1:>10} {cmp:>13}")


if __name__ == "__main__":
    main()
