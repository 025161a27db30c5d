"""Per-rank script of tests/test_mpi.py, run as ``mpiexec -n N python -m mpi4py mpi_worker.py
MODE OUT [PATH]``. The test imports it too, for the shared model, data and settings (mpi4py is
imported only when it runs under mpiexec).

Modes:
  basic   allreduce_grad + Adam (float64), allreduce_grad in bfloat16 (mean and sum, every
          rank's result), ShardedOptimizer AdamW (float32, dyadic grads) and
          SGD (float64), skip_nonfinite with an infinity on the last rank only, the gathered
          state dict; rank 0 writes OUT/basic.npz
  save    ShardedOptimizer Adam with a schedule: SAVE_AT steps, then save_checkpoint(PATH)
  resume  load_checkpoint(PATH), then the remaining steps; rank 0 writes OUT/resume.npz
  fault   rank 1 raises inside its second step, between the collective calls
"""
import os
import sys

import numpy as np

SHAPES = {"w": (37, 11), "b": (11,), "v": (5,)}  # 423 elements: slices cross tensors
STEPS = 6
SAVE_AT = 3
NAN_STEP = 2  # skip_nonfinite run: the step at which the last rank's gradient has an inf
ADAM = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
ADAMW = dict(lr=3e-2, weight_decay=0.1, amsgrad=True)
SGD = dict(lr=0.1, momentum=0.9, nesterov=True)


def size():
    return sum(int(np.prod(s)) for s in SHAPES.values())


def init(dtype):
    rng = np.random.default_rng(7)
    return rng.standard_normal(size()).astype(dtype)


def grad(rank, step, dtype, dyadic=False):
    """Rank ``rank``'s gradient at ``step``. ``dyadic``: multiples of 1/256 below 2 in
    magnitude, so sums over a few ranks are exact in float32 in any order."""
    rng = np.random.default_rng([11, rank, step])
    if dyadic:
        return (rng.integers(-512, 512, size()) / 256).astype(dtype)
    return rng.standard_normal(size()).astype(dtype)


def bf16_grad(rank):
    """Rank ``rank``'s float32 gradient for the bfloat16 all-reduce: normal values, and at the
    start some exactly halfway between two bfloat16 numbers (ties; even and odd last kept
    bit), some just off a tie, tiny ones below the smallest normal float32, and two whose
    float32 sum over 3 ranks depends on the order of the additions: 1 + 2**-24 - 1 is 0 added
    left to right, 2**-24 in any other order."""
    g = grad(rank, 0, np.float32)
    bits = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x40418000, 0x3F808001, 0x3F807FFF,
                     0x00012345, 0x80008000], np.uint32)
    bits[:6] += np.uint32(rank << 17)  # other values on other ranks, still ties or near them
    g[:bits.size] = bits.view(np.float32)
    at = bits.size
    g[at:at + 2] = [(1.0, 2.0**-24, -1.0)[rank % 3], (-1.0, 2.0**-24, 1.0)[rank % 3]]
    return g


def schedule():
    import lrfast.schedules as s
    return s.cosine_decay(1e-2, decay_steps=STEPS)


def _flat(dtype):
    import lrfast
    flat = lrfast.FlatParams(SHAPES, dtype)
    flat.param[...] = init(dtype)
    return flat


def basic(comm, out):
    import lrfast
    from lrfast import distributed as dist
    rank, n = comm.Get_rank(), comm.Get_size()
    result = {}

    flat = _flat(np.float64)
    opt = lrfast.Adam(flat, **ADAM)
    for t in range(STEPS):
        flat.grad[...] = grad(rank, t, np.float64)
        dist.allreduce_grad(flat, comm)
        opt.step()
    result["allreduce_adam"] = flat.param.copy()

    flat = _flat(np.float32)
    for key, average in (("allreduce_bf16", True), ("allreduce_bf16_sum", False)):
        flat.grad[...] = bf16_grad(rank)
        dist.allreduce_grad(flat, comm, average=average, dtype="bfloat16")
        every = comm.gather(flat.grad.copy(), root=0)  # each rank's result, to compare
        if rank == 0:
            result[key] = np.stack(every)

    flat = _flat(np.float32)
    opt = dist.ShardedOptimizer(flat, lrfast.AdamW, comm, **ADAMW)
    for t in range(STEPS):
        flat.grad[...] = grad(rank, t, np.float32, dyadic=True)
        assert opt.step() is True
    result["zero_adamw"] = flat.param.copy()
    result["bounds"] = np.array(opt.bounds)
    sd = opt.state_dict(root=0)  # the gathered state, on rank 0
    if rank == 0:
        for key, entry in sd["state"].items():
            for buf, arr in entry.items():
                result[f"state/{key}/{buf}"] = arr
        result["state_steps"] = np.array(sd["step_count"])

    flat = _flat(np.float64)
    opt = dist.ShardedOptimizer(flat, lrfast.SGD, comm, skip_nonfinite=True, **SGD)
    applied = []
    for t in range(STEPS):
        g = grad(rank, t, np.float64)
        if t == NAN_STEP and rank == n - 1:
            g[0] = np.inf  # element 0: rank 0's slice; only the last rank sees it locally
        flat.grad[...] = g
        applied.append(opt.step())
    every = comm.gather((applied, opt.skipped_steps, opt.step_count), root=0)
    result["zero_sgd_skip"] = flat.param.copy()
    if rank == 0:
        result["applied"] = np.array([a for a, _, _ in every])
        result["skipped"] = np.array([s for _, s, _ in every])
        result["steps"] = np.array([c for _, _, c in every])
    # every rank ends with the same params
    params = comm.gather(result["zero_adamw"], root=0)
    if rank == 0:
        result["same_everywhere"] = np.array(all((p == params[0]).all() for p in params))
        np.savez(os.path.join(out, "basic.npz"), **result)


def save(comm, out, path):
    import lrfast
    from lrfast import distributed as dist
    rank = comm.Get_rank()
    flat = _flat(np.float64)
    opt = dist.ShardedOptimizer(flat, lrfast.Adam, comm, lr=schedule(), betas=(0.9, 0.99))
    for t in range(SAVE_AT):
        flat.grad[...] = grad(rank, t, np.float64)
        opt.step()
    opt.save_checkpoint(path)


def resume(comm, out, path):
    import lrfast
    from lrfast import distributed as dist
    rank = comm.Get_rank()
    flat = _flat(np.float64)
    flat.param[...] = 0  # the checkpoint brings the params
    opt = dist.ShardedOptimizer(flat, lrfast.Adam, comm, lr=schedule(), betas=(0.9, 0.99))
    opt.load_checkpoint(path)
    assert opt.step_count == SAVE_AT
    for t in range(SAVE_AT, STEPS):
        flat.grad[...] = grad(rank, t, np.float64)
        opt.step()
    sd = opt.state_dict(root=0)
    if rank == 0:
        np.savez(os.path.join(out, "resume.npz"), param=flat.param,
                 exp_avg=np.concatenate([sd["state"][k]["exp_avg"].ravel() for k in SHAPES]),
                 steps=np.array(opt.step_count))


def fault(comm, out):
    import lrfast
    from lrfast import distributed as dist
    rank = comm.Get_rank()
    flat = _flat(np.float64)
    opt = dist.ShardedOptimizer(flat, lrfast.Adam, comm)
    for t in range(3):
        flat.grad[...] = grad(rank, t, np.float64)
        if t == 1 and rank == 1:
            # after the Reduce_scatter, before the Allgatherv the other ranks wait in
            def broken(*args, **kwargs):
                raise RuntimeError("rank 1 fails mid-step")
            opt.optimizer.step = broken
        opt.step()
    open(os.path.join(out, f"finished.rank{rank}"), "w").close()


def main(argv):
    from mpi4py import MPI
    mode, out = argv[1], argv[2]
    comm = MPI.COMM_WORLD
    if mode == "basic":
        basic(comm, out)
    elif mode in ("save", "resume"):
        (save if mode == "save" else resume)(comm, out, argv[3])
    elif mode == "fault":
        fault(comm, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    comm.Barrier()


if __name__ == "__main__":
    main(sys.argv)
