"""The FSDP2 test's per-rank work (tests/test_torch_fsdp.py), in a module of its own so that
torch.multiprocessing's spawned processes can import it by name (tests/ is on sys.path; a
function of the test module itself pickles under a name the child cannot import)."""
import datetime
import os

import torch
import torch.distributed as dist

STEPS = 4


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 16, generator=g, dtype=torch.float64),
            torch.randn(8, 4, generator=g, dtype=torch.float64))


def run(rank, world, port, out):
    import lrfast.torch as lt
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that waits longer than this fails the rank (and so the test) instead of
    # hanging it: pytest-timeout is not a test dependency.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        net = model()
        pol = CPUOffloadPolicy(pin_memory=False)
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, offload_policy=pol)
        fully_shard(net, offload_policy=pol)
        opt = lt.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        x, y = data()
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(xs), ys).backward()
            opt.step()
        full = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
        states = {n: type(opt.state[p]["exp_avg"]).__name__ for n, p in net.named_parameters()}
        if rank == 0:
            torch.save((full, states), out)
        # Both ranks leave together: a rank exiting while gloo still serves the other can
        # abort ("terminate called without an active exception").
        dist.barrier()
        # Past the barrier every rank has done all its work: say so, for the test to tell an
        # abort in gloo's teardown (which the barrier makes rarer, not impossible) from a
        # failure of the steps.
        open(f"{out}.rank{rank}.done", "w").close()
    finally:
        dist.destroy_process_group()
