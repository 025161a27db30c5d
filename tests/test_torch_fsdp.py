"""lrfast.torch over FSDP2's sharded (DTensor) params, on gloo groups of 2 and 3 processes on
this machine, against the same model unsharded on one process with torch.optim's class of the
same name (its for-loop path), in float64.

Two spawns do all the distributed work (tests/fsdp_worker.py's run_deep; the tests below read
their results): 2 ranks with CPUOffloadPolicy(pin_memory=False), then 3 ranks without an
offload policy (both run on the CPU). Each trains a 202-tensor model (50 Linear + LayerNorm
blocks in 10 fully_shard-ed stages, and the root) with lrfast.torch's AdamW, Adam(amsgrad=True)
and SGD(nesterov). The 2-rank run also trains the small model, saves a
torch.distributed.checkpoint after 2 of AdamW's steps, clips with clip_grad_norm_ before
AdamW's steps, and steps AdamW through GradScaler and ShardedGradScaler with an inf in one
rank's gradient shard; the 3-rank run loads the checkpoint into a fresh model and optimizer
and trains on, and steps AdamW over one group mixing DTensor and plain params."""
import os
import socket
import tempfile

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import fsdp_worker as fw  # noqa: E402  (tests/ is on sys.path: pyproject's pythonpath)

RTOL, ATOL = 1e-10, 1e-12


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, out, *args):
    import torch.multiprocessing as mp
    try:
        mp.spawn(fw.run_deep, args=(world, _free_port(), out) + args, nprocs=world, join=True)
    except mp.ProcessExitedException:
        # A rank killed by a signal after every rank passed the final barrier died in gloo's
        # teardown (std::terminate in its destructors, seen once in CI), after all the work
        # these tests check; anything earlier is a failure.
        if not all(os.path.exists(f"{out}.rank{r}.done") for r in range(world)):
            raise
    return torch.load(out)


@pytest.fixture(scope="module")
def runs():
    """{world size: rank 0's results} of the 2-rank run, then the 3-rank one (which loads the
    2-rank run's checkpoint)."""
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "ckpt")
        two = _spawn(2, os.path.join(d, "two.pt"), ckpt)
        three = _spawn(3, os.path.join(d, "three.pt"), ckpt)
    return {2: two, 3: three}


def _assert_params(got, want):
    assert sorted(got) == sorted(want)
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")


def test_fsdp2_cpu_offload_matches_unsharded(runs):
    """The small model (two Linear layers) on 2 ranks with CPU offload, AdamW."""
    full, states = runs[2]["small"]
    # the optimizer state follows the params: DTensors, as torch.optim keeps it
    assert set(states.values()) == {"DTensor"}
    model = fw.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    x, y = fw.data()
    for _ in range(fw.STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(full[n], p.detach(), rtol=1e-10, atol=1e-12)


_REFS: dict = {}


def _ref(config, clip=None):
    """The unsharded one-process run of a CONFIGS entry (cached: every test compares with
    one of four)."""
    key = (config, clip)
    if key not in _REFS:
        _, cls, kw = next(c for c in fw.CONFIGS if c[0] == config)
        _REFS[key] = fw.reference(cls, kw, clip=clip)
    return _REFS[key]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("config", [c[0] for c in fw.CONFIGS])
def test_deep_model_matches_unsharded(runs, world, config):
    res = runs[world]
    assert res["ntensors"] == 202
    _assert_params(res["trained"][config], _ref(config)[0])


@pytest.mark.parametrize("world", [2, 3])
def test_state_is_dtensors_of_the_params_placements(runs, world):
    # every buffer a DTensor of its param's placements, mesh, shape and local shape; the
    # step a plain 0-d tensor (see fsdp_worker._state_problems)
    for config, problems in runs[world]["problems"].items():
        assert problems == [], config


def test_clip_grad_norm_over_dtensor_grads(runs):
    """torch.nn.utils.clip_grad_norm_ over the DTensor grads (2 ranks), then lrfast's step:
    the norms it returned and the params are the unsharded run's."""
    res = runs[2]
    want, norms = _ref("AdamW", fw.MAX_NORM)
    # the clipping acted at every step (else this would test AdamW alone)
    assert min(norms) > 10 * fw.MAX_NORM
    torch.testing.assert_close(torch.tensor(res["clip_norms"], dtype=torch.float64),
                               torch.tensor(norms, dtype=torch.float64), rtol=RTOL, atol=0)
    _assert_params(res["clipped"], want)


def test_checkpoint_saved_on_2_ranks_resumes_on_3(runs):
    """get/set_model_state_dict and get/set_optimizer_state_dict through dcp.save on 2 ranks
    (after 2 steps) and dcp.load on 3 into a fresh model and optimizer: the rest of the run
    is the uninterrupted one's."""
    res = runs[3]
    assert res["loaded_steps"] == [float(fw.SAVED_AT)]
    assert res["resumed_problems"] == []
    _assert_params(res["resumed"], _ref("AdamW")[0])


def test_state_dict_has_torch_optim_layout(runs):
    """get_optimizer_state_dict of lrfast.torch.AdamW and of torch.optim.AdamW after the same
    steps on the same sharded model: the same keys, and per value the same type (DTensor
    buffers, plain step tensors), dtype and shape."""
    ours, torchs = runs[2]["layout"]
    assert ours == torchs
    assert len(ours[0]) == 202


def test_group_mixing_dtensors_and_plain_tensors(runs):
    """One param group of FSDP's DTensors (the even stages) and plain tensors (the odd stages
    and the head, their grads averaged over the ranks by the worker): torch's foreach path
    refuses such a group ("got mixed torch.Tensor and DTensor"); lrfast.torch's kernels work
    on each tensor's local memory, so it steps it, each state buffer of its param's kind.
    (3 ranks: the sharded stages' 8-row tensors are split 3, 3, 2.)"""
    res = runs[3]
    assert res["mixed_kinds"] == ["DTensor", "Parameter"]
    assert res["mixed_state"] == []
    _assert_params(res["mixed"], _ref("AdamW")[0])


def _plain(t):
    """A DTensor's local shard (a group of 1: the whole tensor), any other tensor itself."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


def test_dtensor_group_layout_is_kept_between_steps(tmp_path):
    """In this process (a group of 1, FileStore rendezvous): one group of two DTensor params
    and a plain one, AdamW for 3 steps with new gradients each step (the layout made at the
    first step is reused after it, the gradients' addresses read anew at each step), against
    torch.optim.AdamW on plain copies. Then a DTensor param given a gradient that is not a
    DTensor: refused, nothing written."""
    if not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import lrfast.torch as lt
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(3)
        shapes = [(5, 3), (7,), (4, 2)]
        sharded = [True, False, True]
        values = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

        def as_ours(t, dt):
            return distribute_tensor(t.clone(), mesh, [Shard(0)]) if dt else t.clone()

        ours = [torch.nn.Parameter(as_ours(v, dt)) for v, dt in zip(values, sharded)]
        ref = [torch.nn.Parameter(v.clone()) for v in values]
        opt = lt.AdamW(ours, lr=0.1, weight_decay=0.1)
        topt = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.1, foreach=False)
        plans = []
        for _ in range(3):
            for p, r, dt in zip(ours, ref, sharded):
                r.grad = torch.randn(r.shape, generator=g, dtype=torch.float64)
                p.grad = as_ours(r.grad, dt)
            opt.step()
            topt.step()
            plans.append(opt._plans.get(0))
            for p, r in zip(ours, ref):
                torch.testing.assert_close(_plain(p), r.detach(), rtol=1e-13, atol=1e-15)
        assert plans[0] is not None and plans[1] is plans[0] and plans[2] is plans[0]

        before = [_plain(p).clone() for p in ours]
        state = [{k: _plain(v).clone() for k, v in opt.state[p].items()} for p in ours]
        ours[0].grad = None
        try:
            ours[0].grad = torch.ones(5, 3, dtype=torch.float64)
        except (RuntimeError, TypeError):
            pytest.skip("this torch refuses a plain gradient on a DTensor param itself")
        with pytest.raises(ValueError, match="both be DTensors or both plain tensors"):
            opt.step()
        for p, b, st in zip(ours, before, state):
            assert torch.equal(_plain(p), b)
            assert all(torch.equal(_plain(v), st[k]) for k, v in opt.state[p].items())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["GradScaler", "ShardedGradScaler"])
def test_inf_in_one_ranks_grad_shard_skips_the_step_on_every_rank(runs, kind):
    """FSDP2 leaves each rank only its shard of each gradient, so an inf in one rank's shard
    is seen by that rank alone unless the scaler's found_inf is reduced over the ranks. On 2
    ranks, lrfast.torch.AdamW through torch.amp.GradScaler("cpu") and through FSDP's
    ShardedGradScaler("cpu"), with an inf written after backward into one element of rank 0's
    shard of one weight gradient at step INF_AT: both skip that step on both ranks (measured
    with torch 2.13: DTensor reduces the found_inf of _amp_foreach_non_finite_check_and_unscale_
    over the mesh itself, so the plain GradScaler suffices; ShardedGradScaler's own
    all_reduce of it on top changes nothing), halve the scale on both, and the run goes on as
    the unsharded one with that step left out. (Checked by hand: with DTensor's handler for
    that op swapped for one running it on the local shards only, this fails for GradScaler,
    rank 1 stepping while rank 0 skips, and still passes for ShardedGradScaler.)"""
    rows, full = runs[2]["scalers"][kind]
    assert len(rows) == 2
    for step in range(fw.SCALER_STEPS):
        hit = step == fw.INF_AT
        # the inf was in rank 0's local gradients only (else this would not test the sync)
        assert [r[step][0] for r in rows] == [hit, False], step
        # no param shard changed on either rank at that step; every one at the others
        assert [r[step][1] for r in rows] == [0 if hit else 202] * 2, step
    # the scale: 2**16 to start, halved at the inf step (growth only after 2000 clean steps),
    # the same on both ranks
    want_scales = [2.0 ** 16 / (2 if s >= fw.INF_AT else 1) for s in range(fw.SCALER_STEPS)]
    assert [[r[2] for r in ranks] for ranks in rows] == [want_scales] * 2
    want, _ = fw.reference("AdamW", fw.CONFIGS[0][2], steps=fw.SCALER_STEPS, skip=(fw.INF_AT,))
    _assert_params(full, want)
