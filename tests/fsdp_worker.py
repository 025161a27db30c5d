"""The FSDP2 tests' per-rank work (tests/test_torch_fsdp.py), in a module of its own so that
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


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that waits longer than this fails the rank (and so the test) instead of
    # hanging it: pytest-timeout is not a test dependency.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))


def _leave(rank, out):
    # Every rank leaves together: a rank exiting while gloo still serves another can abort
    # ("terminate called without an active exception").
    dist.barrier()
    # Past the barrier every rank has done all its work: say so, for the test to tell an
    # abort in gloo's teardown (which the barrier makes rarer, not impossible) from a failure
    # of the steps.
    open(f"{out}.rank{rank}.done", "w").close()


def small(rank, world):
    """The small model (``model()``) with CPUOffloadPolicy(pin_memory=False), AdamW, STEPS
    steps on this rank's half of ``data()``: its full params (on every rank) and the type of
    each param's exp_avg."""
    import lrfast.torch as lt
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
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
    return full, states


# -- a deep model: 50 blocks, 202 tensors, float64 ----------------------------------------

DIM = 8
BLOCKS = 50
STAGE = 5  # blocks per FSDP unit: 10 units (each all-gather costs a collective per pass)
BATCH = 12  # split evenly over 2 and over 3 ranks
DEEP_STEPS = 4
SAVED_AT = 2  # the checkpoint's step: saved on 2 ranks, loaded on 3, trained to DEEP_STEPS
MAX_NORM = 0.05  # below the gradients' norm at every step: the clipping acts
SCALER_STEPS = 3  # the loss-scaler runs' steps (2 ranks)
INF_AT = 1  # ... and the one whose gradient holds an inf in rank 0's shard only

# (name, class, keywords): each trained on the deep model by lrfast.torch's class, against
# torch.optim's of the same name (for-loop path) on one process.
CONFIGS = [
    ("AdamW", "AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam-amsgrad", "Adam", dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    ("SGD-nesterov", "SGD", dict(lr=0.003, momentum=0.9, nesterov=True, weight_decay=0.01)),
]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(DIM, DIM)
        self.norm = torch.nn.LayerNorm(DIM)

    def forward(self, x):
        return x + torch.tanh(self.norm(self.lin(x)))


class Deep(torch.nn.Module):
    """50 residual blocks (Linear + LayerNorm) in 10 stages, and a head of 2 outputs: 202
    tensors. On 3 ranks an 8-row tensor shards as 3, 3, 2 rows and the head's 2 rows as 1, 1,
    0 (one rank holds empty shards)."""

    def __init__(self):
        super().__init__()
        self.stages = torch.nn.ModuleList(
            torch.nn.Sequential(*(Block() for _ in range(STAGE))) for _ in range(BLOCKS // STAGE))
        self.head = torch.nn.Linear(DIM, 2)

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return self.head(x)


def deep():
    torch.manual_seed(0)
    return Deep().double()


def deep_data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, DIM, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 2, generator=g, dtype=torch.float64))


def reference(cls_name, kw, steps=DEEP_STEPS, clip=None, skip=()):
    """One process, the whole batch, the model unsharded, torch.optim's class (for-loop):
    the params after the last step, and the gradient norm clip_grad_norm_ returned at each.
    ``skip``: steps not taken at all (a loss scaler's step with a non-finite gradient)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the tensors are tiny: a second thread only waits)
    try:
        return _reference(cls_name, kw, steps, clip, skip)
    finally:
        torch.set_num_threads(threads)


def _reference(cls_name, kw, steps, clip, skip):
    net = deep()
    opt = getattr(torch.optim, cls_name)(net.parameters(), foreach=False, **kw)
    x, y = deep_data()
    norms = []
    for step in range(steps):
        if step in skip:
            continue
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip)))
        opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}, norms


def _shard_deep(net, mesh, pol, stages=None):
    """fully_shard each stage and the root; with ``stages``, those stages only (each then
    its own FSDP root) and not the root: the other stages and the head stay plain tensors."""
    from torch.distributed.fsdp import fully_shard
    for i, s in enumerate(net.stages):
        if stages is None or i in stages:
            fully_shard(s, mesh=mesh, offload_policy=pol)
    if stages is None:
        fully_shard(net, mesh=mesh, offload_policy=pol)
    return net


def _batch(rank, world):
    x, y = deep_data()
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _train(net, opt, xs, ys, steps, clip=None, plain=()):
    """``steps`` steps on this rank's batch; ``plain``: params outside FSDP, whose gradients
    are averaged over the ranks here (as DDP would). Returns clip_grad_norm_'s norms."""
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(xs), ys).backward()
        for p in plain:
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())
        if clip is not None:
            n = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            norms.append(float(n.full_tensor() if hasattr(n, "full_tensor") else n))
        opt.step()
    return norms


def _scaled_train(net, opt, scaler, xs, ys):
    """SCALER_STEPS steps through ``scaler``; at step INF_AT, after the backward pass (so
    after FSDP's reduce-scatter), an inf written into one element of rank 0's shard of the
    first block's weight gradient, and nowhere else. Per step, every rank's record: whether
    its local gradients held a non-finite value before scaler.step, how many of its local
    param shards the step changed, and the scale after update()."""
    target = net.stages[0][0].lin.weight
    rows = []
    for step in range(SCALER_STEPS):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(net(xs), ys)).backward()
        if step == INF_AT and dist.get_rank() == 0:
            with torch.no_grad():
                target.grad.to_local()[0, 0] = float("inf")
        local_inf = any(not bool(torch.isfinite(p.grad.to_local()).all())
                        for p in net.parameters())
        before = [p.to_local().clone() for p in net.parameters()]
        scaler.step(opt)
        scaler.update()
        changed = sum(not torch.equal(b, p.to_local()) for b, p in zip(before, net.parameters()))
        rows.append((local_inf, changed, float(scaler.get_scale())))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, rows)
    return every


def _full(net):
    """Every param's full value, on rank 0 (None on the others), in one collective (a
    full_tensor() per param is one each): FSDP2 shards dim 0 as torch.chunk splits it, with
    no padding in the local shards, so the ranks' shards joined on dim 0 are the param."""
    from torch.distributed.tensor import Shard
    local = {n: (p.to_local() if _is_dtensor(p) else p).detach().clone()
             for n, p in net.named_parameters()}
    rank = dist.get_rank()
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    if rank != 0:
        return None
    full = {}
    for n, p in net.named_parameters():
        if _is_dtensor(p):
            assert tuple(p.placements) == (Shard(0),), p.placements
            full[n] = torch.cat([part[n] for part in parts])
            assert full[n].shape == p.shape, (n, full[n].shape, p.shape)
        else:
            full[n] = local[n]
    return full


def _state_problems(opt, net):
    """What is wrong with the state's form: every buffer a DTensor of its param's shape,
    placements and mesh; the step a plain 0-d tensor as torch.optim keeps it."""
    bad = []
    for n, p in net.named_parameters():
        st = opt.state[p]
        if not st:
            bad.append(f"{n}: no state")
        for k, v in st.items():
            if k == "step":
                if type(v) is not torch.Tensor or v.dim() != 0:
                    bad.append(f"{n}.step: {type(v).__name__} {tuple(v.shape)}")
            elif not _is_dtensor(v):
                bad.append(f"{n}.{k}: a {type(v).__name__}")
            elif (v.placements != p.placements or v.device_mesh != p.device_mesh
                  or v.shape != p.shape or v.to_local().shape != p.to_local().shape):
                bad.append(f"{n}.{k}: {v.placements} on {v.device_mesh}, shape {v.shape} "
                           f"versus {p.placements} on {p.device_mesh}, shape {p.shape}")
    return bad


def _layout(sd):
    """An optimizer state dict's form: per key, the value's type, dtype and shape."""
    def form(v):
        if isinstance(v, torch.Tensor):
            return (type(v).__name__, str(v.dtype), tuple(v.shape))
        return (type(v).__name__,)
    return ({name: {k: form(v) for k, v in st.items()} for name, st in sd["state"].items()},
            [sorted(k for k in g if k != "params") for g in sd["param_groups"]])


def run_deep(rank, world, port, out, ckpt):
    """The deep model's checks on ``world`` ranks (rank 0 saves the results in ``out``).

    On both: every CONFIGS optimizer trained DEEP_STEPS steps, and the state's form. On 2
    ranks, with CPUOffloadPolicy(pin_memory=False): the small model; AdamW's run saves a
    checkpoint after SAVED_AT steps, whose optimizer state dict's form is compared with
    torch.optim.AdamW's; AdamW after clip_grad_norm_; AdamW through
    torch.amp.GradScaler and through ShardedGradScaler, an inf in one rank's gradient shard at
    one step (_scaled_train). On 3 ranks, with no offload policy:
    the checkpoint loaded into a fresh model and optimizer and trained to DEEP_STEPS; AdamW in
    one group mixing FSDP's DTensor params and plain ones. (Spread so: in each process the
    first DTensor norm, checkpoint and sharding take seconds of warm-up.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    import lrfast.torch as lt
    # One thread per process: 2 or 3 processes share this machine's cores.
    torch.set_num_threads(1)
    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        pol = CPUOffloadPolicy(pin_memory=False) if world == 2 else None
        xs, ys = _batch(rank, world)
        adamw = CONFIGS[0][2]
        res = {"trained": {}, "problems": {}}
        if world == 2:
            res["small"] = small(rank, world)
        # One sharded model for every run (sharding is slow): a run from the initial
        # weights first writes them back into the params' local shards.
        net = _shard_deep(deep(), mesh, pol)
        res["ntensors"] = len(list(net.parameters()))
        start = {n: p.to_local().clone() for n, p in net.named_parameters()}

        def fresh():
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.to_local().copy_(start[n])
            return net

        if world == 3:
            # the checkpoint saved on 2 ranks, into this fresh model and a fresh optimizer
            opt = lt.AdamW(net.parameters(), **adamw)
            sd = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(net, sd["model"])
            set_optimizer_state_dict(net, opt, sd["optim"])
            res["loaded_steps"] = sorted({float(st["step"]) for st in opt.state.values()})
            _train(net, opt, xs, ys, DEEP_STEPS - SAVED_AT)
            res["resumed"] = _full(net)
            res["resumed_problems"] = _state_problems(opt, net)

        for name, cls, kw in CONFIGS:
            opt = getattr(lt, cls)(fresh().parameters(), **kw)
            if world == 2 and name == "AdamW":
                _train(net, opt, xs, ys, SAVED_AT)
                osd = get_optimizer_state_dict(net, opt)
                dcp.save({"model": get_model_state_dict(net), "optim": osd},
                         checkpoint_id=ckpt)
                form = _layout(osd)
                _train(net, opt, xs, ys, DEEP_STEPS - SAVED_AT)
            else:
                _train(net, opt, xs, ys, DEEP_STEPS)
            res["trained"][name] = _full(net)
            res["problems"][name] = _state_problems(opt, net)

        if world == 2:
            # the state dict's form against torch.optim's after the same steps
            ropt = torch.optim.AdamW(fresh().parameters(), foreach=False, **adamw)
            _train(net, ropt, xs, ys, SAVED_AT)
            res["layout"] = (form, _layout(get_optimizer_state_dict(net, ropt)))
            # clip_grad_norm_ over the DTensor grads, then lrfast's step
            opt = lt.AdamW(fresh().parameters(), **adamw)
            res["clip_norms"] = _train(net, opt, xs, ys, DEEP_STEPS, clip=MAX_NORM)
            res["clipped"] = _full(net)
            # A non-finite value in one rank's gradient shard, through each loss scaler
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            res["scalers"] = {}
            for kind, make in (("GradScaler", lambda: torch.amp.GradScaler("cpu")),
                               ("ShardedGradScaler", lambda: ShardedGradScaler("cpu"))):
                opt = lt.AdamW(fresh().parameters(), **adamw)
                rows = _scaled_train(net, opt, make(), xs, ys)
                res["scalers"][kind] = (rows, _full(net))
        else:
            # one group of DTensors (the even stages, sharded) and plain tensors (the odd
            # stages and the head, replicated, their grads averaged here)
            mixed = _shard_deep(deep(), mesh, pol, stages=range(0, BLOCKS // STAGE, 2))
            params = list(mixed.parameters())
            opt = lt.AdamW(params, **adamw)
            plain = [p for p in params if type(p) is torch.nn.Parameter]
            _train(mixed, opt, xs, ys, DEEP_STEPS, plain=plain)
            res["mixed"] = _full(mixed)
            res["mixed_kinds"] = sorted({type(p).__name__ for p in params})
            res["mixed_state"] = [n for n, p in mixed.named_parameters()
                                  if _is_dtensor(opt.state[p]["exp_avg"]) != _is_dtensor(p)]
        if rank == 0:
            torch.save(res, out)
        _leave(rank, out)
    finally:
        dist.destroy_process_group()


def _is_dtensor(t):
    return type(t).__name__ == "DTensor"
