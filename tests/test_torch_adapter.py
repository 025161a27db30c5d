"""lrfast.torch against torch.optim: parity on a real model, torch's API, and refusals.

Parity is lockstep: a transformer stack with 110 parameter tensors is trained by
torch.optim (for-loop path) for 100 steps with torch lr schedulers attached; at every step its
gradients are given to a copy of the model whose optimizer is lrfast.torch's, and afterwards
every param and every state buffer of the two must agree. (The optimizers' own recurrences carry
any rounding difference forward; the gradients do not, so the comparison measures the optimizer
and not the chaos of training two models apart.)
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from cases import CONFIGS

torch = pytest.importorskip("torch")
LT = pytest.importorskip("lrfast.torch")

TORCH_CONFIGS = [(name, hyper) for name, hyper, has_torch in CONFIGS if has_torch]
IDS = [name + "-" + "-".join(f"{k}={v}" for k, v in h.items()) for name, h in TORCH_CONFIGS]

# float32: torch's CPU kernels fuse the multiply-add of add(alpha=) (lrfast never fuses, so that
# every build rounds alike). Where the math cancels, as in RMSprop's weight-decay term g + wd*p
# when g is near -wd*p, one step differs by far more than an ulp in those elements, and 100
# steps of momentum carry it on. Measured over 100 steps for this configuration: params 2.3e-5,
# momentum buffer 6.5e-5 (every other float32 configuration stays below 3e-6).
FLOAT32_LOOSER = {
    ("RMSprop", (("lr", 0.01), ("momentum", 0.9), ("weight_decay", 0.01))): (5e-5, 2e-4),
}


def _tolerances(name, hyper, dtype):
    """(params, state) relative tolerances: 1e-10 in float64, 1e-5 in float32 but for the one
    configuration above."""
    if dtype == torch.float64:
        return 1e-10, 1e-10
    return FLOAT32_LOOSER.get((name, tuple(hyper.items())), (1e-5, 1e-5))


def transformer(dtype, layers=9):
    """9 encoder layers of width 32 and a linear head: 110 parameter tensors, 77k elements."""
    torch.manual_seed(0)
    blocks = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
              for _ in range(layers)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(32, 8)).to(dtype)


def warmup_cosine(opt, total=100):
    return torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, 10),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - 10, 1e-4)], [10])


def rel_diff(a, b):
    """max |a - b| / max |b| over one tensor (0 when both are all zero)."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def lockstep(name, hyper, dtype, steps=100, model=transformer, scheduler=warmup_cosine,
             groups=None):
    """Train with torch.optim, feed the same gradients to lrfast.torch; return both sides."""
    ref, ours = model(dtype), model(dtype)
    p_ref, p_ours = list(ref.parameters()), list(ours.parameters())
    make_groups = groups or (lambda ps: ps)
    opt_ref = getattr(torch.optim, name)(make_groups(p_ref), foreach=False, **hyper)
    opt_ours = getattr(LT, name)(make_groups(p_ours), **hyper)
    scheds = [scheduler(opt_ref), scheduler(opt_ours)] if scheduler else []
    sign = -1.0 if hyper.get("maximize") else 1.0  # maximise -loss: a stable run either way
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 10, 32, generator=gen, dtype=dtype)
        y = torch.randn(16, 10, 8, generator=gen, dtype=dtype)
        opt_ref.zero_grad()
        (sign * torch.nn.functional.mse_loss(ref(x), y)).backward()
        opt_ours.zero_grad()
        for a, b in zip(p_ref, p_ours):
            b.grad = None if a.grad is None else a.grad.clone()
        opt_ref.step()
        opt_ours.step()
        for s in scheds:
            s.step()
    return (p_ref, opt_ref), (p_ours, opt_ours)


def assert_same(ref, ours, tol_params, tol_state):
    (p_ref, opt_ref), (p_ours, opt_ours) = ref, ours
    worst = max(rel_diff(b, a) for a, b in zip(p_ref, p_ours))
    assert worst <= tol_params, f"params differ by {worst:.3g} (relative)"
    for k, (a, b) in enumerate(zip(p_ref, p_ours)):
        sa, sb = opt_ref.state[a], opt_ours.state[b]
        assert set(sa) == set(sb), (k, sorted(sa), sorted(sb))
        for key in sa:
            if key == "step":
                assert float(sa[key]) == float(sb[key]), (k, float(sa[key]), float(sb[key]))
                assert sb[key].dtype == sa[key].dtype and sb[key].dim() == 0
            else:
                d = rel_diff(sb[key], sa[key])
                assert d <= tol_state, f"state {key!r} of param {k} differs by {d:.3g}"
    for ga, gb in zip(opt_ref.param_groups, opt_ours.param_groups):
        assert set(ga) == set(gb) and ga["lr"] == gb["lr"]


def test_the_model_has_over_100_parameter_tensors():
    assert len(list(transformer(torch.float32).parameters())) == 110


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, hyper", TORCH_CONFIGS, ids=IDS)
def test_lockstep_parity_on_a_transformer(name, hyper, dtype):
    ref, ours = lockstep(name, hyper, dtype)
    assert_same(ref, ours, *_tolerances(name, hyper, dtype))


def test_one_cycle_rewrites_betas_each_step():
    """OneCycleLR cycles Adam's beta1 through group['betas']: the kernel must read it anew."""
    def one_cycle(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=40)
    ref, ours = lockstep("AdamW", {"lr": 0.01}, torch.float64, steps=40, scheduler=one_cycle)
    assert ours[1].param_groups[0]["betas"][0] != 0.9  # the schedule did move beta1
    assert_same(ref, ours, 1e-10, 1e-10)


@pytest.mark.parametrize("name, hyper", [
    ("Adam", {"lr": 0.01, "weight_decay": 0.01}), ("AdamW", {"lr": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}), ("RMSprop", {"lr": 0.01}),
    ("Adagrad", {"lr": 0.1})])
def test_param_groups_with_their_own_hyper_parameters(name, hyper):
    """Two groups (weights with weight decay and a higher lr; biases and norms without)."""
    def groups(ps):
        return [{"params": [p for p in ps if p.dim() > 1], "lr": hyper["lr"] * 2,
                 "weight_decay": 0.05},
                {"params": [p for p in ps if p.dim() <= 1], "weight_decay": 0.0}]
    ref, ours = lockstep(name, hyper, torch.float64, steps=30, groups=groups)
    assert_same(ref, ours, 1e-10, 1e-10)


def small_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3),
                               torch.nn.Linear(3, 3, bias=False)).to(dtype)


@pytest.mark.parametrize("name, hyper", TORCH_CONFIGS, ids=IDS)
def test_params_without_gradients_and_late_groups(name, hyper):
    """A param whose .grad is None is skipped (its step count stays behind, as torch's does),
    and a group added after 5 steps starts at step 0: the step counts then differ within the
    optimizer, and the update must still match torch's."""
    dtype = torch.float64
    ref, ours = small_model(dtype), small_model(dtype)
    p_ref, p_ours = list(ref.parameters()), list(ours.parameters())
    opt_ref = getattr(torch.optim, name)(p_ref[:3], foreach=False, **hyper)
    opt_ours = getattr(LT, name)(p_ours[:3], **hyper)
    gen = torch.Generator().manual_seed(3)
    for t in range(12):
        if t == 5:
            opt_ref.add_param_group({"params": p_ref[3:]})
            opt_ours.add_param_group({"params": p_ours[3:]})
        x = torch.randn(8, 6, generator=gen, dtype=dtype)
        opt_ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x), x[:, :3]).backward()
        if t % 3 == 1:
            p_ref[1].grad = None  # the first bias sits this step out
        for a, b in zip(p_ref, p_ours):
            b.grad = None if a.grad is None else a.grad.clone()
        opt_ref.step()
        opt_ours.step()
    assert_same((p_ref, opt_ref), (p_ours, opt_ours), 1e-12, 1e-12)


def test_a_param_that_never_has_a_gradient_is_untouched():
    p = torch.nn.Parameter(torch.ones(5))
    q = torch.nn.Parameter(torch.ones(5))
    opt = LT.Adam([p, q], lr=0.1)
    q.grad = torch.ones(5)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(5)) and len(opt.state[p]) == 0
    assert not torch.equal(q.detach(), torch.ones(5))


def test_the_update_is_in_place_without_copies():
    p = torch.nn.Parameter(torch.zeros(1000))
    view = p.detach().numpy()  # shares p's memory
    ptr = p.data_ptr()
    opt = LT.SGD([p], lr=0.5)
    p.grad = torch.ones(1000)
    opt.step()
    assert p.data_ptr() == ptr and np.all(view == -0.5)


@pytest.mark.parametrize("name, hyper", TORCH_CONFIGS, ids=IDS)
def test_state_dicts_cross_between_torch_and_lrfast(name, hyper):
    """torch.optim's state dict loads into lrfast.torch and lrfast.torch's into torch.optim;
    each then continues exactly as the original would."""
    dtype = torch.float64
    if name in ("NAdam", "ASGD") and torch.get_default_dtype() != dtype:
        # Their scalar state is in torch's default dtype, cast to the param's on load: torch's
        # own run would then part from its unloaded twin. With float64 state from the start,
        # the load changes nothing.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return test_state_dicts_cross_between_torch_and_lrfast(name, hyper)
        finally:
            torch.set_default_dtype(previous)
    models = [small_model(dtype) for _ in range(3)]
    params = [list(m.parameters()) for m in models]
    torch_opt = getattr(torch.optim, name)(params[0], foreach=False, **hyper)
    ours = getattr(LT, name)(params[1], **hyper)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 6, generator=gen, dtype=dtype) for _ in range(10)]

    def train(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), x[:, :3]).backward()
            opt.step()

    train(models[0], torch_opt, batches[:5])
    # torch -> lrfast: params copied, then the state dict (through a deep copy, like a file).
    with torch.no_grad():
        for a, b in zip(params[0], params[1]):
            b.copy_(a)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    sd_ours = ours.state_dict()
    sd_torch = torch_opt.state_dict()
    assert sd_ours["param_groups"] == sd_torch["param_groups"]
    assert {k: sorted(v) for k, v in sd_ours["state"].items()} == \
        {k: sorted(v) for k, v in sd_torch["state"].items()}
    # lrfast -> torch: a third copy, driven by torch.optim, loaded from lrfast's state dict.
    with torch.no_grad():
        for a, c in zip(params[0], params[2]):
            c.copy_(a)
    torch_again = getattr(torch.optim, name)(params[2], foreach=False, **hyper)
    torch_again.load_state_dict(copy.deepcopy(ours.state_dict()))
    train(models[0], torch_opt, batches[5:])
    train(models[1], ours, batches[5:])
    train(models[2], torch_again, batches[5:])
    assert_same((params[0], torch_opt), (params[1], ours), 1e-12, 1e-12)
    assert_same((params[0], torch_opt), (params[2], torch_again), 1e-12, 1e-12)


def test_hooks_zero_grad_and_closure():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LT.AdamW([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and float(loss.detach()) == 3.0
    assert opt.state[p]["step"].item() == 1.0
    opt.zero_grad()
    assert p.grad is None


def test_reduce_lr_on_plateau_and_lr_tensors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LT.SGD([p], lr=torch.tensor(0.5))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for loss in (1.0, 2.0, 3.0):
        p.grad = torch.ones(3)
        opt.step()
        sched.step(loss)
    assert float(opt.param_groups[0]["lr"]) == 0.125
    # lr was 0.5, 0.5, then 0.25 (reduced after the second loss): 1 - 0.5 - 0.5 - 0.25
    assert torch.allclose(p.detach(), torch.full((3,), -0.25))


def test_non_contiguous_gradient_and_replaced_param_memory():
    """A non-contiguous grad is used correctly (through a contiguous copy); a param whose
    .data is replaced between steps is updated in its new memory; both as torch does."""
    def run(cls, **kw):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
        opt = cls([p], lr=0.1, **kw)
        for t in range(6):
            p.grad = torch.randn(6, 4, dtype=torch.float64).t()  # strides (1, 4)
            if t == 3:
                p.data = p.data.clone() * 0.5
            opt.step()
        return p.detach().clone(), opt
    a, _ = run(torch.optim.Adam, foreach=False)
    b, _ = run(LT.Adam)
    assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_replaced_state_tensor_is_used():
    """Writing a new tensor into opt.state[p] between steps is honoured, as in torch."""
    def run(cls, **kw):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
        opt = cls([p], lr=0.1, momentum=0.9, **kw)
        for t in range(5):
            p.grad = torch.randn(50, dtype=torch.float64)
            if t == 3:
                opt.state[p]["momentum_buffer"] = torch.zeros(50, dtype=torch.float64)
            opt.step()
        return p.detach().clone()
    assert torch.allclose(run(torch.optim.SGD, foreach=False), run(LT.SGD), rtol=1e-13, atol=0)


def test_mixed_dtypes_in_one_group():
    def run(mod):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(30, dtype=torch.float32))
        b = torch.nn.Parameter(torch.randn(30, dtype=torch.float64))
        opt = mod.Adam([a, b], lr=0.05, **({"foreach": False} if mod is torch.optim else {}))
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            a.grad = torch.randn(30, generator=gen).float()
            b.grad = torch.randn(30, generator=gen, dtype=torch.float64)
            opt.step()
        return a.detach().clone(), b.detach().clone()
    (a1, b1), (a2, b2) = run(torch.optim), run(LT)
    assert torch.allclose(a1, a2, rtol=1e-6, atol=1e-7)
    assert torch.allclose(b1, b2, rtol=1e-12, atol=0)


# --- refused, clearly, and nothing changed ---------------------------------------------------

BAD_PARAMS = [
    ("meta device", lambda: torch.nn.Parameter(torch.zeros(3, device="meta")), ValueError,
     "CPU tensors only"),
    # bfloat16/float16 are updated now (tests/test_torch_half.py); float8 is not
    ("float8", lambda: torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn),
                                          requires_grad=False), TypeError,
     "float32, float64, bfloat16 and float16"),
    ("sparse", lambda: torch.nn.Parameter(torch.zeros(3, 3).to_sparse()), ValueError,
     "dense tensors only"),
]


@pytest.mark.parametrize("what, make, exc, message", BAD_PARAMS,
                         ids=[b[0] for b in BAD_PARAMS])
@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_unsupported_params_are_refused_at_construction(name, what, make, exc, message):
    with pytest.raises(exc, match=message):
        getattr(LT, name)([make()])
    good = torch.nn.Parameter(torch.zeros(3))
    opt = getattr(LT, name)([good])
    with pytest.raises(exc, match=message):
        opt.add_param_group({"params": [make()]})
    assert len(opt.param_groups) == 1  # the bad group was not added


def fake_param():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.zeros(3)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_tensor_subclasses_without_own_memory_are_refused(name, tmp_path):
    """FSDP2's DTensor params: data_ptr() is 0, so a kernel would write through a null pointer
    (the process died with SIGSEGV). Fake tensors are refused when added; a DTensor is
    accepted and stepped on its local shard (tests/test_torch_fsdp.py), never through its own
    null address."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        assert sharded.data_ptr() == 0     # what made the kernel crash
        opt = getattr(LT, name)([sharded], lr=0.1)
        before = sharded.to_local().clone()
        sharded.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)])
        opt.step()
        assert not torch.equal(sharded.to_local(), before)  # its shard was updated
        for bad in (fake_param(),):
            with pytest.raises(ValueError, match="not its own memory"):
                getattr(LT, name)([bad])
            opt = getattr(LT, name)([torch.nn.Parameter(torch.zeros(3))])
            with pytest.raises(ValueError, match="not its own memory"):
                opt.add_param_group({"params": [bad]})
            assert len(opt.param_groups) == 1
    finally:
        dist.destroy_process_group()


BAD_OPTIONS = [
    ("Adam", {"differentiable": True}, "differentiable=True"),
    ("Adam", {"capturable": True}, "capturable=True"),
    ("AdamW", {"capturable": True}, "capturable=True"),
    ("RMSprop", {"capturable": True}, "capturable=True"),
    ("SGD", {"differentiable": True}, "differentiable=True"),
    ("Adagrad", {"differentiable": True}, "differentiable=True"),
    ("Adam", {"lr": -1.0}, "Invalid learning rate"),
    ("Adam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ("SGD", {"momentum": -0.5}, "Invalid momentum value"),
    ("SGD", {"nesterov": True}, "Nesterov momentum requires"),
    ("RMSprop", {"alpha": -0.1}, "Invalid alpha value"),
    ("Adagrad", {"lr_decay": -1.0}, "Invalid lr_decay value"),
]


@pytest.mark.parametrize("name, kwargs, message", BAD_OPTIONS,
                         ids=[f"{n}-{next(iter(k))}" for n, k, _ in BAD_OPTIONS])
def test_unsupported_options_are_refused(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(LT, name)([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_sparse_gradient_is_refused_and_nothing_changes():
    dense = torch.nn.Parameter(torch.ones(4))
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = LT.Adam([dense, p], lr=0.1)
    dense.grad = torch.ones(4)
    p.grad = torch.ones(3, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(4)) and len(opt.state) == 0


def test_group_edited_to_bad_values_is_refused_at_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LT.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.param_groups[0]["eps"] = -1.0
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_mismatched_state_dict_is_refused_and_nothing_changes():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LT.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    other = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.2)
    other.param_groups[0]["params"][0].grad = torch.ones(3)
    other.step()
    bad = copy.deepcopy(other.state_dict())
    bad["state"][0]["exp_avg"] = torch.ones(4)
    with pytest.raises(ValueError, match="does not match its parameter"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


def test_threads_give_identical_results():
    import lrfast

    results = []
    for n in (1, 2):
        with lrfast.threads(n):
            _, ours = lockstep("AdamW", {"lr": 0.01}, torch.float32, steps=5,
                                 model=lambda d: transformer(d, layers=2), scheduler=None)
        results.append([p.detach().clone() for p in ours[0]])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_demo_torch_trains_like_torch():
    """``python -m lrfast demo --torch``: lrfast.torch.AdamW and torch's three AdamW paths,
    trained from the same start on the same batches, end at the same loss."""
    from cases import run_python

    out = run_python("import sys; from lrfast.__main__ import main; "
                     "sys.exit(main(['demo', '--torch', '--steps', '12']))")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()
            if line.startswith(("lrfast.torch", "torch AdamW"))]
    assert [r[0] for r in rows] == ["lrfast.torch.AdamW", "torch", "torch", "torch"]
    losses = [float(r[1]) if r[0].startswith("lrfast") else float(r[3]) for r in rows]
    assert max(losses) - min(losses) <= 1e-5 * max(losses), losses
    assert "110 parameter tensors" in out.stdout
