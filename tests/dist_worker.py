"""Per-rank code of tests/test_torch_distributed.py (lrfast.torch under DistributedDataParallel
and ZeroRedundancyOptimizer on a gloo group), in a module of its own so that the processes
torch.multiprocessing spawns can import it by name (tests/ is on sys.path).

Also the single-process references the test compares against: torch.optim's classes trained
on the whole batch, built here so that both sides share one model and one data set."""
import copy
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

BATCH = 12      # splits evenly over 2 and 3 ranks
STEPS = 6       # RAdam's rectified branch starts at step 6 with torch's default betas
# DDP's table: torch.optim's name and arguments, given alike to lrfast.torch's class of that name
TABLE = (
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("RAdam", dict(lr=1e-2)),
    ("NAdam", dict(lr=1e-2, weight_decay=1e-2)),
)
ZERO_ARGS = dict(lr=1e-2, weight_decay=0.1)   # ZeroRedundancyOptimizer with AdamW
RESUME_AT = 3      # ZeRO: steps before the checkpoint, then STEPS - RESUME_AT after it
FREEZE_STEP = 2    # ZeRO bucket rebind: the step at which one param is frozen
FROZEN = 2         # ... that param's index in model().parameters()
INF_STEP = 2       # GradScaler: the step at which the last rank's targets hold an inf
FAIL_STEP = 2      # faults: the step before whose backward rank FAILING raises
FAILING = 1


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 3, generator=g, dtype=torch.float64))


def shard(rank, world):
    x, y = data()
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def reference(name, kwargs, steps, freeze=None, skip=()):
    """torch.optim's ``name`` trained on the whole batch (mean loss) for ``steps`` steps, on
    one process. ``freeze``: (step, param index) frozen for that step (no gradient, so torch
    skips it); ``skip``: steps whose update is not taken (GradScaler's inf step)."""
    net = model()
    ps = list(net.parameters())
    opt = getattr(torch.optim, name)(ps, foreach=False, **kwargs)
    x, y = data()
    for step in range(steps):
        if step in skip:
            continue
        if freeze is not None:
            ps[freeze[1]].requires_grad_(step != freeze[0])
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    return params_of(net), opt.state_dict()


def _init(rank, world, port, seconds):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that waits longer than this fails the rank instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=seconds))
    # two cores on the test machine: one thread per rank
    torch.set_num_threads(1)
    import lrfast
    lrfast.set_num_threads(1)


def _ddp(net, **options):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(net, **options)


def _zero(params, bucket_view, cls=None):
    import lrfast.torch as lt
    from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer(params, optimizer_class=cls or lt.AdamW,
                                   parameters_as_bucket_view=bucket_view, **ZERO_ARGS)


def _train(ddp, opt, xs, ys, steps):
    for _ in steps:
        opt.zero_grad()
        F.mse_loss(ddp(xs), ys).backward()
        opt.step()


def ddp_table(rank, world):
    """Every optimizer of TABLE under DDP: the params after STEPS steps."""
    import lrfast.torch as lt
    xs, ys = shard(rank, world)
    out = {}
    runs = [(name, kwargs, {}) for name, kwargs in TABLE]
    # the gradients as views into DDP's reduction buckets (moved each step: zero_grad sets
    # them to None)
    runs.append(("AdamW", dict(TABLE)["AdamW"], {"gradient_as_bucket_view": True}))
    for name, kwargs, options in runs:
        net = model()
        ddp = _ddp(net, **options)
        opt = getattr(lt, name)(ddp.parameters(), **kwargs)
        _train(ddp, opt, xs, ys, range(STEPS))
        out[(name, bool(options))] = params_of(net)
    return out


def zero_resume(rank, world, bucket_view):
    """ZeRO-1 with lrfast.torch.AdamW under DDP: RESUME_AT steps, the state consolidated on
    rank 0 and loaded into a fresh model and ZeRO optimizer on every rank, then the rest."""
    xs, ys = shard(rank, world)
    net = model()
    ps = list(net.parameters())
    # The memory the params had when the optimizer was built: with the bucket view ZeRO moves
    # them into its buckets after building lrfast's optimizer; this must stay untouched.
    before = [p.data for p in ps]
    before_values = [t.clone() for t in before]
    ddp = _ddp(net)
    zero = _zero(ddp.parameters(), bucket_view)
    moved = [p.data_ptr() != t.data_ptr() for p, t in zip(ps, before)]
    _train(ddp, zero, xs, ys, range(RESUME_AT))
    zero.consolidate_state_dict(to=0)
    # (a deep copy: rank 0's state dict holds its optimizer's live tensors)
    saved = copy.deepcopy(zero.state_dict()) if rank == 0 else None
    box = [saved]
    dist.broadcast_object_list(box, src=0)
    mid = params_of(net)
    net2 = model()
    net2.load_state_dict(net.state_dict())
    ddp2 = _ddp(net2)
    zero2 = _zero(ddp2.parameters(), bucket_view)
    # (a copy: ZeRO's load_state_dict sets the other ranks' entries of its argument to None)
    zero2.load_state_dict(copy.deepcopy(box[0]))
    _train(ddp2, zero2, xs, ys, range(RESUME_AT, STEPS))
    untouched = all(torch.equal(a, b) for a, b in zip(before, before_values))
    return dict(saved=saved, mid=mid, final=params_of(net2), moved=moved,
                old_memory_untouched=untouched)


def zero_rebind(rank, world):
    """ZeRO with the bucket view, gradients averaged by hand (DDP cannot lose a param's
    gradient mid-run): freezing a param at step FREEZE_STEP, and thawing it after, makes ZeRO
    rebuild its buckets, so every param's memory moves after lrfast.torch has laid out its
    step. The old buckets are kept alive here: a stale write would show in them."""
    xs, ys = shard(rank, world)
    net = model()
    ps = list(net.parameters())
    zero = _zero(ps, True)
    moves = []
    untouched = []
    for step in range(STEPS):
        ps[FROZEN].requires_grad_(step != FREEZE_STEP)
        old = [b for per_rank in zero._buckets for b in per_rank]
        old_values = [b.clone() for b in old]
        ptrs = [p.data_ptr() for p in ps]
        zero.zero_grad()
        F.mse_loss(net(xs), ys).backward()
        for p in ps:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        zero.step()
        moves.append(sum(p.data_ptr() != q for p, q in zip(ps, ptrs)))
        untouched.append(all(torch.equal(a, b) for a, b in zip(old, old_values))
                         if moves[-1] else None)
    return dict(final=params_of(net), moves=moves, old_buckets_untouched=untouched)


def zero_bad_state(rank, world):
    """A ZeRO state dict whose buffers do not fit the params (every exp_avg cut to one
    element), loaded: ZeRO writes it into the local optimizer's state directly, bypassing
    lrfast.torch's load_state_dict checks; the step must refuse it and change nothing."""
    xs, ys = shard(rank, world)
    net = model()
    ddp = _ddp(net)
    zero = _zero(ddp.parameters(), False)
    _train(ddp, zero, xs, ys, range(1))
    zero.consolidate_state_dict(to=0)
    box = [copy.deepcopy(zero.state_dict()) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    sd = box[0]
    for st in sd["state"].values():
        st["exp_avg"] = st["exp_avg"].flatten()[:1].clone()
    zero.load_state_dict(sd)
    zero.zero_grad()
    F.mse_loss(ddp(xs), ys).backward()
    before = params_of(net)
    try:
        zero.step()
        error = None
    except ValueError as e:
        error = str(e)
    return dict(error=error, unchanged=all(torch.equal(a, b)
                                           for a, b in zip(before, params_of(net))))


def scaler_run(rank, world, use_zero):
    """torch.amp.GradScaler("cpu") under DDP (lrfast.torch.AdamW, or ZeRO over it): the last
    rank's targets hold an inf at step INF_STEP. The params and the scale after every step."""
    import lrfast.torch as lt
    xs, ys = shard(rank, world)
    net = model()
    ddp = _ddp(net)
    opt = _zero(ddp.parameters(), False) if use_zero else lt.AdamW(ddp.parameters(),
                                                                   **ZERO_ARGS)
    scaler = torch.amp.GradScaler("cpu")
    after, scales = [params_of(net)], []
    for step in range(STEPS):
        y = ys.clone()
        if step == INF_STEP and rank == world - 1:
            y[0, 0] = float("inf")
        opt.zero_grad()
        scaler.scale(F.mse_loss(ddp(xs), y)).backward()
        scaler.step(opt)
        scaler.update()
        after.append(params_of(net))
        scales.append(scaler.get_scale())
    return dict(after=after, scales=scales)


def run(rank, world, port, out):
    """Everything the test checks for one world size, in one spawn; each rank saves its
    results to ``out.rank{rank}``."""
    _init(rank, world, port, 90)
    try:
        res = dict(ddp=ddp_table(rank, world),
                   zero={bv: zero_resume(rank, world, bv) for bv in (False, True)},
                   rebind=zero_rebind(rank, world),
                   bad_state=zero_bad_state(rank, world),
                   scaler={z: scaler_run(rank, world, z) for z in (False, True)})
        torch.save(res, f"{out}.rank{rank}")
        # All ranks leave together (a rank exiting while gloo still serves another can abort).
        dist.barrier()
        # Past the barrier all the work is done: the test tells an abort in gloo's teardown
        # from a failure by these files.
        open(f"{out}.rank{rank}.done", "w").close()
    finally:
        dist.destroy_process_group()


def run_fault(rank, world, port, out, seconds):
    """lrfast.torch.AdamW with the gradients averaged by an all_reduce per param (DDP's
    reduction without DDP, whose import of torch._dynamo costs seconds per process); rank
    FAILING raises before its backward at FAIL_STEP, so the others wait in their all_reduce.
    It then stays alive with its sockets open (as a rank stuck in error handling would) until
    the others have failed, so they learn of it only by the group's timeout (a rank whose
    process exits at once closes its sockets, and the others fail sooner: gloo's "Connection
    closed by peer"). Each rank writes what it raised, and after how many seconds from the
    start of that step, to ``out.rank{rank}.err``."""
    import lrfast.torch as lt
    _init(rank, world, port, seconds)
    xs, ys = shard(rank, world)
    net = model()
    ps = list(net.parameters())
    opt = lt.AdamW(ps, **ZERO_ARGS)
    t0 = None
    try:
        for step in range(STEPS):
            if step == FAIL_STEP:
                t0 = time.monotonic()
            opt.zero_grad()
            loss = F.mse_loss(net(xs), ys)
            if step == FAIL_STEP and rank == FAILING:
                raise RuntimeError(f"rank {rank} fails before backward at step {step}")
            loss.backward()
            for p in ps:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            opt.step()
    except Exception as e:
        waited = time.monotonic() - (t0 or time.monotonic())
        with open(f"{out}.rank{rank}.err", "w") as f:
            f.write(f"{type(e).__name__}\n{waited:.2f}\n{e}")
        if rank == FAILING:
            others = [f"{out}.rank{r}.err" for r in range(world) if r != rank]
            deadline = time.monotonic() + 6 * seconds
            while (time.monotonic() < deadline
                   and not all(os.path.exists(o) for o in others)):
                time.sleep(0.1)
        raise
