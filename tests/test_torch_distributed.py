"""lrfast.torch under torch.distributed on this machine (gloo, loopback, float64): its classes
in a DistributedDataParallel loop, as ZeroRedundancyOptimizer's optimizer_class (with and
without the bucket view, through a consolidated checkpoint), with GradScaler skipping an inf
step, and a rank failing mid-step. Expected values: torch.optim's classes trained on the
whole batch on one process (tests/dist_worker.py's ``reference``).

One spawn per world size (2 and 3) runs all the per-rank work of the parity tests (see
dist_worker.run); the fault tests spawn 2 ranks each."""
import os
import socket
import tempfile
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_worker as W  # noqa: E402  (tests/ is on sys.path: pyproject's pythonpath)

TOL = dict(rtol=0, atol=1e-12)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request):
    """Every rank's results of dist_worker.run for this world size."""
    import torch.multiprocessing as mp
    world = request.param
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result")
        try:
            mp.spawn(W.run, args=(world, _free_port(), out), nprocs=world, join=True)
        except mp.ProcessExitedException:
            # A rank killed by a signal after all passed the final barrier died in gloo's
            # teardown, after the work checked here; anything earlier is a failure.
            if not all(os.path.exists(f"{out}.rank{r}.done") for r in range(world)):
                raise
        return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def _close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def _same_on_all_ranks(per_rank):
    first = per_rank[0]
    for other in per_rank[1:]:
        assert len(other) == len(first)
        assert all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("name,kwargs,grad_view",
                         [(n, k, False) for n, k in W.TABLE]
                         + [("AdamW", dict(W.TABLE)["AdamW"], True)],
                         ids=[n for n, _ in W.TABLE] + ["AdamW-gradient_as_bucket_view"])
def test_ddp_matches_one_process(ranks, name, kwargs, grad_view):
    want, _ = W.reference(name, kwargs, W.STEPS)
    got = [r["ddp"][(name, grad_view)] for r in ranks]
    _same_on_all_ranks(got)
    _close(got[0], want)
    # (the run moved the params: parity is not the initial values twice)
    assert not torch.equal(want[0], W.params_of(W.model())[0])


@pytest.mark.parametrize("bucket_view", [False, True], ids=["plain", "bucket_view"])
def test_zero_checkpoint_resume_matches_uninterrupted(ranks, bucket_view):
    res = [r["zero"][bucket_view] for r in ranks]
    # the bucket view moved every param into ZeRO's buckets after lrfast.torch's optimizer
    # was built, and the memory they left was never written
    assert all(all(r["moved"]) == bucket_view and any(r["moved"]) == bucket_view
               for r in res)
    if bucket_view:
        assert all(r["old_memory_untouched"] for r in res)
    mid, state = W.reference("AdamW", W.ZERO_ARGS, W.RESUME_AT)
    _same_on_all_ranks([r["mid"] for r in res])
    _close(res[0]["mid"], mid)
    # the consolidated state dict is torch.optim.AdamW's, entry for entry
    saved = res[0]["saved"]
    assert sorted(saved["state"]) == sorted(state["state"])
    for i, st in state["state"].items():
        assert sorted(saved["state"][i]) == sorted(st)
        for k, v in st.items():
            torch.testing.assert_close(saved["state"][i][k].double(), v.double(), **TOL)
    final, _ = W.reference("AdamW", W.ZERO_ARGS, W.STEPS)
    _same_on_all_ranks([r["final"] for r in res])
    _close(res[0]["final"], final)


def test_zero_bucket_rebuild_after_layout(ranks):
    res = [r["rebind"] for r in ranks]
    for r in res:
        # ZeRO rebuilt its buckets at the freeze and at the thaw (every param moved), and
        # only then
        moves = r["moves"]
        n = len(r["final"])
        assert [m == n for m in moves] == [s in (W.FREEZE_STEP, W.FREEZE_STEP + 1)
                                           for s in range(W.STEPS)]
        assert all(m == 0 for s, m in enumerate(moves)
                   if s not in (W.FREEZE_STEP, W.FREEZE_STEP + 1))
        assert [u for u in r["old_buckets_untouched"] if u is not None] == [True, True]
    want, _ = W.reference("AdamW", W.ZERO_ARGS, W.STEPS, freeze=(W.FREEZE_STEP, W.FROZEN))
    _same_on_all_ranks([r["final"] for r in res])
    _close(res[0]["final"], want)


def test_zero_loaded_state_that_does_not_fit_is_refused(ranks):
    for r in ranks:
        bad = r["bad_state"]
        assert bad["error"] is not None and "exp_avg" in bad["error"]
        assert bad["unchanged"]


@pytest.mark.parametrize("use_zero", [False, True], ids=["ddp", "zero"])
def test_gradscaler_skips_inf_step_on_every_rank(ranks, use_zero):
    res = [r["scaler"][use_zero] for r in ranks]
    for step in range(W.STEPS + 1):
        _same_on_all_ranks([r["after"][step] for r in res])
    after = res[0]["after"]
    # after[s + 1] is the params after step s: unchanged by the inf step, moved by the others
    for s in range(W.STEPS):
        same = all(torch.equal(a, b) for a, b in zip(after[s], after[s + 1]))
        assert same == (s == W.INF_STEP)
    # the scale fell once, on every rank, at the inf step (GradScaler's backoff of 0.5)
    scales = res[0]["scales"]
    assert all(r["scales"] == scales for r in res)
    assert scales[W.INF_STEP] == scales[W.INF_STEP - 1] / 2
    assert len(set(scales)) == 2
    # the steps taken are torch.optim.AdamW's on the whole batch (powers of two scale and
    # unscale the gradients exactly)
    want, _ = W.reference("AdamW", W.ZERO_ARGS, W.STEPS, skip=(W.INF_STEP,))
    _close(after[-1], want)


FAULT_TIMEOUT = 5   # seconds: the process group's timeout in the fault tests
FAULT_BOUND = 60    # seconds: the whole spawn, torch's import included, must end within


def test_a_rank_failing_mid_step_ends_the_run():
    import torch.multiprocessing as mp
    world = 2
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "fault")
        start = time.monotonic()
        ctx = mp.spawn(W.run_fault, args=(world, _free_port(), out, FAULT_TIMEOUT),
                       nprocs=world, join=False)
        for p in ctx.processes:
            p.join(max(0.0, start + FAULT_BOUND - time.monotonic()))
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        assert not alive, f"{len(alive)} rank(s) still running after {FAULT_BOUND} s"
        # every rank ended with an exception
        assert all(p.exitcode != 0 for p in ctx.processes)
        errors = {}
        for r in range(world):
            with open(f"{out}.rank{r}.err") as f:
                kind, waited, message = f.read().split("\n", 2)
            errors[r] = (kind, float(waited), message)
    assert errors[W.FAILING][0] == "RuntimeError"
    assert "fails before backward" in errors[W.FAILING][2]
    kind, waited, message = errors[0]
    print(f"\nthe surviving rank raised {kind} after {waited:.1f} s: {message[:300]}")
    # The survivor's all_reduce failed with an error of its own, and only once the group's
    # timeout had passed: nothing else told it
    assert "fails before backward" not in message
    assert waited >= 0.8 * FAULT_TIMEOUT
