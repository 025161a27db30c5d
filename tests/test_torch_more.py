"""Adamax, RAdam, Adadelta and Rprop: against torch.optim's single-tensor path (foreach=False)
on a model of 100+ tensors in two param groups of different options, state dicts between
torch and lrfast.torch, the NumPy classes bit for bit against lrfast.reference, and what is
particular to each (RAdam's switch, Adamax's and Rprop's NaN handling, Rprop's lr)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import lrfast
from lrfast import functional as F
from lrfast import reference as R

from cases import CONFIGS, ReferenceRun, config_id, make_grads, make_params, snapshot

NAMES = ("Adamax", "RAdam", "Adadelta", "Rprop")
OURS = [c for c in CONFIGS if c[0] in NAMES]

# Two param groups per optimizer, with different options (every option of each at least once).
GROUPS = {
    "Adamax": (dict(lr=0.01, weight_decay=0.1),
               dict(lr=0.003, betas=(0.3, 0.99), eps=1e-6, maximize=True)),
    "RAdam": (dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
              dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.05, maximize=True)),
    "Adadelta": (dict(lr=1.0, weight_decay=0.01),
                 dict(lr=0.5, rho=0.8, eps=1e-5, maximize=True)),
    "Rprop": (dict(lr=0.01),
              dict(lr=0.002, etas=(0.3, 1.5), step_sizes=(1e-4, 0.5), maximize=True)),
}


def model_shapes(layers=9, d=16):
    """A small transformer's tensors: embedding, per layer two norms, attention and MLP (12
    tensors), final norm and head: 12 * layers + 4 tensors."""
    shapes = [(50, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,), (10, d), (10,)]


def _torch():
    try:
        import torch
        import lrfast.torch as LT
    except ImportError:
        pytest.skip("torch is not installed")
    return torch, LT


def _groups(params, options):
    """Matrices in the first group, vectors (biases, norms) in the second."""
    return [dict(params=[p for p in params if p.dim() > 1], **options[0]),
            dict(params=[p for p in params if p.dim() == 1], **options[1])]


def _model(torch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in model_shapes()]


def _set_grads(torch, models, gen, dtype, step):
    """The same gradients on every model: random, with exact zeros in some of them, and none
    for one tensor on every fourth step."""
    for k, ps in enumerate(zip(*models)):
        if k == 5 and step % 4 == 1:
            for p in ps:
                p.grad = None
            continue
        g = torch.randn(ps[0].shape, generator=gen, dtype=dtype)
        if k % 7 == 3:
            g[::3] = 0
        for p in ps:
            p.grad = g.clone()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def _max_rel(torch, theirs, ours):
    """The largest relative difference over every param and state buffer (and the state names
    and step counts must agree)."""
    worst = 0.0
    tp = [p for g in theirs.param_groups for p in g["params"]]
    lp = [p for g in ours.param_groups for p in g["params"]]
    assert len(tp) == len(lp) >= 100
    for a, b in zip(tp, lp):
        worst = max(worst, _rel(b, a))
        ta, tb = theirs.state.get(a, {}), ours.state.get(b, {})
        assert set(ta) == set(tb), (sorted(ta), sorted(tb))
        for n in ta:
            assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, n
            if n == "step":
                assert torch.equal(ta[n], tb[n])
            else:
                worst = max(worst, _rel(tb[n], ta[n]))
    return worst


TOL = {"float32": 1e-5, "float64": 1e-10}


def _lockstep(torch, opts, models, dtype, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        _set_grads(torch, models, gen, dtype, step)
        for o in opts:
            o.step()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_two_groups_of_a_model_match_torch_for_60_steps(name, dtype):
    torch, LT = _torch()
    dt = getattr(torch, dtype)
    tm, lm = _model(torch, dt), _model(torch, dt)
    theirs = getattr(torch.optim, name)(_groups(tm, GROUPS[name]), foreach=False)
    ours = getattr(LT, name)(_groups(lm, GROUPS[name]))
    _lockstep(torch, [theirs, ours], [tm, lm], dt, 60)
    worst = _max_rel(torch, theirs, ours)
    assert worst <= TOL[dtype], worst


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_goes_torch_to_lrfast_to_torch(name):
    """torch's state after 20 steps continues in lrfast.torch for 20, whose state continues in
    torch for 20: the same as torch all along."""
    torch, LT = _torch()
    dt = torch.float64
    ref_m, m = _model(torch, dt), _model(torch, dt)
    ref = getattr(torch.optim, name)(_groups(ref_m, GROUPS[name]), foreach=False)
    first = getattr(torch.optim, name)(_groups(m, GROUPS[name]), foreach=False)
    gen = torch.Generator().manual_seed(5)
    for step in range(20):
        _set_grads(torch, [ref_m, m], gen, dt, step)
        ref.step()
        first.step()
    # Into lrfast.torch, made with other options: the state dict's win, as in torch.
    ours = getattr(LT, name)(_groups(m, ({"lr": 0.5}, {"lr": 0.25})))
    ours.load_state_dict(copy.deepcopy(first.state_dict()))
    for step in range(20, 40):
        _set_grads(torch, [ref_m, m], gen, dt, step)
        ref.step()
        ours.step()
    assert _max_rel(torch, ref, ours) <= TOL["float64"]
    # ... and back into torch.
    last = getattr(torch.optim, name)(_groups(m, ({"lr": 0.5}, {"lr": 0.25})), foreach=False)
    last.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert [{k: v for k, v in g.items() if k != "params"} for g in last.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
    for step in range(40, 60):
        _set_grads(torch, [ref_m, m], gen, dt, step)
        ref.step()
        last.step()
    assert _max_rel(torch, ref, last) <= TOL["float64"]


# --------------------------------------------------------------------------------------------
# The NumPy classes and functions against lrfast.reference, bit for bit
# --------------------------------------------------------------------------------------------

SHAPES = [(0,), (1,), (7,), (3, 5), (40_001,), (33,)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", OURS, ids=config_id)
def test_numpy_class_is_bitwise_the_reference(case, dtype, threads):
    """The kernels do the reference's operations in the same order and precision: equal bits,
    for every thread count."""
    name, hyper, _ = case
    params = make_params(SHAPES, dtype)
    ref = ReferenceRun(name, hyper, params)
    opt = getattr(lrfast, name)(params, **hyper)
    rng = np.random.default_rng(3)
    with lrfast.threads(threads):
        for _ in range(30):
            grads = make_grads(SHAPES, dtype, rng)
            grads[3][0, :2] = 0  # exact zeros (Rprop's sign 0)
            opt.step(grads)
            ref.step(grads)
    sd = opt.state_dict()["state"]
    for k, (p, rp) in enumerate(zip(params, ref.params)):
        assert p.tobytes() == rp.tobytes(), f"param {k}"
        for n, bufs in ref.state.items():
            assert sd[k][n].tobytes() == bufs[k].tobytes(), f"{n}[{k}]"


@pytest.mark.parametrize("case", OURS, ids=config_id)
def test_functional_on_lists_is_bitwise_the_reference(case):
    name, hyper, _ = case
    dtype = np.float32
    ref = ReferenceRun(name, hyper, make_params(SHAPES, dtype))
    fast = ReferenceRun(name, hyper, make_params(SHAPES, dtype))
    rng = np.random.default_rng(4)
    for t in range(1, 11):
        grads = make_grads(SHAPES, dtype, rng)
        ref.step(grads)
        fast.t = t
        fast.call(F, grads)
    for a, b in zip(fast.params, ref.params):
        assert a.tobytes() == b.tobytes()
    for n in ref.state:
        for a, b in zip(fast.state[n], ref.state[n]):
            assert a.tobytes() == b.tobytes(), n


def test_reference_follows_the_formulas_by_hand():
    """One element, float64, each update's formula evaluated by hand."""
    # Adamax, two steps
    p, m, u = np.array([1.0]), np.zeros(1), np.zeros(1)
    R.adamax_(p, np.array([0.5]), m, u, step=1, lr=0.1)
    R.adamax_(p, np.array([-2.0]), m, u, step=2, lr=0.1)
    m2 = 0.9 * 0.05 + 0.1 * -2.0
    u2 = max(0.999 * (0.5 + 1e-8), 2.0 + 1e-8)
    assert u[0] == pytest.approx(u2, rel=1e-15)
    assert p[0] == pytest.approx(1 - 0.1 / 0.1 * 0.05 / (0.5 + 1e-8) - 0.1 / 0.19 * m2 / u2,
                                 rel=1e-14)
    # RAdam at step 6 (rectified) with beta2 = 0.999, from a chosen state
    b1, b2, t, lr, eps = 0.9, 0.999, 6, 0.1, 1e-8
    p, m, v = np.array([1.0]), np.array([0.3]), np.array([0.02])
    R.radam_(p, np.array([1.0]), m, v, step=t, lr=lr)
    m6, v6 = 0.9 * 0.3 + 0.1, 0.999 * 0.02 + 0.001
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
    rect = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    want = 1 - lr * m6 / (1 - b1 ** t) * np.sqrt(1 - b2 ** t) / (np.sqrt(v6) + eps) * rect
    assert p[0] == pytest.approx(want, rel=1e-14)
    # Adadelta, one step from a chosen state
    p, s, a = np.array([1.0]), np.array([0.5]), np.array([0.01])
    R.adadelta_(p, np.array([2.0]), s, a, lr=0.5, rho=0.9, eps=1e-6)
    s1 = 0.9 * 0.5 + 0.1 * 4
    d = np.sqrt(0.01 + 1e-6) / np.sqrt(s1 + 1e-6) * 2
    assert (s[0], a[0]) == pytest.approx((s1, 0.9 * 0.01 + 0.1 * d * d), rel=1e-15)
    assert p[0] == pytest.approx(1 - 0.5 * d, rel=1e-15)
    # Rprop: same sign, flipped sign, zero product, clamped above
    p = np.array([0.0, 0.0, 0.0, 0.0])
    prev = np.array([1.0, 1.0, 0.0, 1.0])
    ss = np.array([0.1, 0.1, 0.1, 0.1])
    R.rprop_(p, np.array([2.0, -2.0, -3.0, 1.0]), prev, ss, step_size_max=0.11)
    assert ss.tolist() == [0.11, 0.05, 0.1, 0.11]
    assert p.tolist() == [-0.11, 0.0, 0.1, -0.11]
    assert prev.tolist() == [2.0, 0.0, -3.0, 1.0]


# --------------------------------------------------------------------------------------------
# What is particular to each
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.5), (0.9, 0.8)])
def test_radam_switch_matches_torch_step_by_step(betas):
    """Step by step across the switch (rho_t > 5): beta2 = 0.999 switches at the sixth step,
    0.8 at the tenth and 0.5 never (rho_inf = 3)."""
    torch, LT = _torch()
    w0 = torch.linspace(-1, 1, 9, dtype=torch.float64)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    theirs = torch.optim.RAdam([a], lr=0.1, betas=betas, foreach=False)
    ours = LT.RAdam([b], lr=0.1, betas=betas)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        g = torch.randn(9, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        assert _rel(b, a) <= 1e-14
        for n in ("exp_avg", "exp_avg_sq"):
            assert _rel(ours.state[b][n], theirs.state[a][n]) <= 1e-14


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["Adamax", "Rprop", "Adadelta", "RAdam"])
def test_nonfinite_gradients_go_where_torch_takes_them(name, dtype):
    """NaN and infinite gradient elements, and a NaN in the state: the same NaNs, infinities
    and untouched elements as torch (Adamax's maximum propagates NaN; torch's sign of NaN is
    0, so Rprop leaves a NaN gradient's element in place)."""
    torch, LT = _torch()
    dt = getattr(torch, dtype)
    w0 = torch.linspace(-1, 1, 8, dtype=dt)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    theirs = getattr(torch.optim, name)([a], lr=0.1, foreach=False)
    ours = getattr(LT, name)([b], lr=0.1)
    nan, inf = float("nan"), float("inf")
    grads = [[1.0, -1.0, nan, 2.0, inf, 0.5, -inf, 1.0],
             [1.0, 1.0, 1.0, nan, 1.0, -0.5, 1.0, -inf],
             [nan, 1.0, -1.0, 1.0, 2.0, 0.5, 1.0, 1.0]]
    for g in grads:
        a.grad = torch.tensor(g, dtype=dt)
        b.grad = torch.tensor(g, dtype=dt)
        theirs.step()
        ours.step()
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        finite = ~torch.isnan(a)
        assert torch.allclose(a[finite], b[finite], rtol=1e-6, atol=0)
        for n, buf in theirs.state[a].items():
            mine = ours.state[b][n]
            assert torch.equal(torch.isnan(buf), torch.isnan(mine)), n
            ok = ~torch.isnan(buf)
            assert torch.allclose(buf[ok], mine[ok], rtol=1e-6, atol=0), n


def test_rprop_reads_lr_only_when_its_state_is_made():
    """torch's Rprop starts the step sizes at the group's lr at the first step and ignores
    it afterwards; lrfast.torch does the same."""
    torch, LT = _torch()
    a = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    theirs, ours = torch.optim.Rprop([a], lr=0.1), LT.Rprop([b], lr=0.1)
    for k in range(4):
        for opt in (theirs, ours):
            opt.param_groups[0]["lr"] = [0.3, 0.3, 7.0, 0.01][k]  # 0.3 at the first step
        g = torch.tensor([1.0, -1.0, 1.0, 0.5], dtype=torch.float64) * (-1) ** (k // 2)
        a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        assert torch.equal(a, b)
        assert torch.equal(theirs.state[a]["step_size"], ours.state[b]["step_size"])
    assert ours.state[b]["step_size"].max().item() < 1.0


def test_rprop_complex_param_starts_both_parts_at_lr():
    torch, LT = _torch()
    a = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    b = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    theirs, ours = torch.optim.Rprop([a], lr=0.1), LT.Rprop([b], lr=0.1)
    for k in range(3):
        g = torch.tensor([1 + 1j, -1 + 2j, 1j], dtype=torch.complex128) * (1j ** k)
        a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
        assert torch.equal(a, b)
        assert torch.equal(theirs.state[a]["step_size"], ours.state[b]["step_size"])


def test_numpy_rprop_starts_step_sizes_at_lr_and_refuses_a_schedule():
    p = [np.zeros(3, np.float32), np.zeros((2, 2), np.float64)]
    opt = lrfast.Rprop(p, lr=0.25)
    sd = opt.state_dict()["state"]
    assert sd[0]["step_size"].tolist() == [0.25] * 3
    assert sd[1]["step_size"].tolist() == [[0.25, 0.25]] * 2
    assert sd[0]["prev"].tolist() == [0.0] * 3
    with pytest.raises(TypeError, match="Rprop's lr only sets the initial step sizes"):
        lrfast.Rprop(p, lr=lambda step: 0.1)
    before = snapshot(opt)
    with pytest.raises(TypeError, match="not a schedule"):
        opt.lr = lambda step: 0.1
    assert snapshot(opt) == before and opt.lr == 0.25


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda p: lrfast.Rprop(p, etas=(1.0, 0.5)), ValueError, "Invalid eta values: 1.0, 0.5"),
    (lambda p: lrfast.Rprop(p, etas=(0.5, 1.0)), ValueError, "Invalid eta values: 0.5, 1.0"),
    (lambda p: lrfast.Rprop(p, etas=(0.0, 1.2)), ValueError, "Invalid eta values: 0.0, 1.2"),
    (lambda p: lrfast.Rprop(p, etas=(0.5,)), ValueError, "etas must be a pair"),
    (lambda p: lrfast.Rprop(p, step_sizes=(1.0, 0.5)), ValueError,
     "Invalid step_sizes values: 1.0, 0.5"),
    (lambda p: lrfast.Rprop(p, step_sizes=(-1.0, 0.5)), ValueError,
     "Invalid step_sizes values: -1.0, 0.5"),
    (lambda p: lrfast.Rprop(p, step_sizes=(float("nan"), 0.5)), ValueError,
     "Invalid step_sizes values: nan"),
    (lambda p: lrfast.Rprop(p, lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    (lambda p: lrfast.Rprop(p, etas=("a", 1.2)), TypeError, "etaminus must be a real number"),
    (lambda p: lrfast.Adadelta(p, rho=1.1), ValueError, "Invalid rho value: 1.1"),
    (lambda p: lrfast.Adadelta(p, rho=-0.1), ValueError, "Invalid rho value: -0.1"),
    (lambda p: lrfast.Adadelta(p, eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
    (lambda p: lrfast.Adadelta(p, weight_decay=-1.0), ValueError,
     "Invalid weight_decay value: -1.0"),
    (lambda p: lrfast.Adamax(p, betas=(0.0, 1.0)), ValueError,
     "Invalid beta parameter at index 1: 1.0"),
    (lambda p: lrfast.Adamax(p, eps=-1e-8), ValueError, "Invalid epsilon value"),
    (lambda p: lrfast.RAdam(p, betas=(1.0, 0.0)), ValueError,
     "Invalid beta parameter at index 0: 1.0"),
    (lambda p: lrfast.RAdam(p, weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
    (lambda p: lrfast.RAdam(p, decoupled_weight_decay=1), TypeError,
     "decoupled_weight_decay must be a bool"),
])
def test_bad_hyper_parameters_are_refused(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make([np.zeros(3, np.float32)])


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyper_parameters_in_a_later_group_change_nothing(name):
    """lrfast.torch: a group with a bad value is refused when added and the step is as
    before."""
    torch, LT = _torch()
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    opt = getattr(LT, name)([p], lr=0.1)
    bad = {"Adamax": dict(betas=(0.9, 1.5)), "RAdam": dict(eps=-1.0),
           "Adadelta": dict(rho=2.0), "Rprop": dict(etas=(0.5, 0.9))}[name]
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group(dict(params=[q], **bad))
    assert len(opt.param_groups) == 1


def test_functional_rprop_takes_the_step_sizes_not_lr():
    p, g = np.zeros(4), np.array([1.0, -1.0, 0.0, 2.0])
    prev, ss = np.zeros(4), np.full(4, 0.2)
    F.rprop_(p, g, prev, ss)
    assert p.tolist() == [-0.2, 0.2, 0.0, -0.2]
    with pytest.raises(TypeError):
        F.rprop_(p, g, prev, ss, lr=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="Invalid eta values"):
        F.rprop_(p, g, prev, ss, etaminus=1.5)
    assert p.tolist() == [-0.2, 0.2, 0.0, -0.2]
