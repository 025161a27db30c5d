"""lrfast.torch.AdamW over FSDP2's sharded (DTensor) params: fully_shard with
CPUOffloadPolicy(pin_memory=False) on a gloo group of 2 processes on this machine, against the
same model unsharded on one process with torch.optim.AdamW, in float64."""
import os
import socket
import tempfile

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 16, generator=g, dtype=torch.float64),
            torch.randn(8, 4, generator=g, dtype=torch.float64))


STEPS = 4


def _worker(rank, world, port, out):
    import lrfast.torch as lt
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        pol = CPUOffloadPolicy(pin_memory=False)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, offload_policy=pol)
        fully_shard(model, offload_policy=pol)
        opt = lt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        x, y = _data()
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        for _ in range(STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        states = {n: type(opt.state[p]["exp_avg"]).__name__ for n, p in model.named_parameters()}
        if rank == 0:
            torch.save((full, states), out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_fsdp2_cpu_offload_matches_unsharded():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        full, states = torch.load(out)
    # the optimizer state follows the params: DTensors, as torch.optim keeps it
    assert set(states.values()) == {"DTensor"}
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    x, y = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(full[n], p.detach(), rtol=1e-10, atol=1e-12)
