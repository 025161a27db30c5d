"""NAdam and ASGD: updates whose per-param state includes scalars (NAdam's ``mu_product``,
ASGD's ``eta`` and ``mu``), advanced by the Python layer at each step that runs.

Against torch.optim (lrfast.torch, state dicts both ways), against lrfast.reference (the NumPy
classes, lrfast.functional), and the scalar state's own rules: it moves only when a step
really runs, is saved and restored exactly, and is checked on load."""
import copy
import math

import numpy as np
import pytest

import lrfast
from lrfast import functional as F
from lrfast import reference as R
from cases import ReferenceRun, make_grads, make_params, snapshot

# Two param groups of different options each; every option is set in one of them.
TORCH_CASES = {
    "NAdam": (dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.05),
              dict(lr=0.003, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.05,
                   decoupled_weight_decay=True, maximize=True)),
    "ASGD": (dict(lr=0.02, lambd=0.01, alpha=0.5, t0=5, weight_decay=0.1),
             dict(lr=0.005, lambd=0.001, t0=0, maximize=True)),
}
SCALARS = {"NAdam": ("mu_product",), "ASGD": ("eta", "mu")}


def _torch():
    return pytest.importorskip("torch")


def _model_shapes(n=120):
    """Shapes of a model of ``n`` tensors: matrices, vectors and a few odd sizes."""
    rng = np.random.default_rng(5)
    shapes = []
    for k in range(n):
        if k % 3 == 0:
            shapes.append((int(rng.integers(1, 40)), int(rng.integers(1, 20))))
        elif k % 3 == 1:
            shapes.append((int(rng.integers(1, 300)),))
        else:
            shapes.append((2, int(rng.integers(1, 6)), 3))
    shapes[7] = (0,)
    return shapes


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class _default_dtype:
    """torch's default dtype within the block (torch keeps NAdam's and ASGD's scalar state
    in it)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        torch = _torch()
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        _torch().set_default_dtype(self.previous)


def _lockstep(name, dtype, steps, theirs=None, ours=None, seed=0, params=None):
    """torch.optim's and lrfast.torch's class over the same 120-tensor model in two groups,
    stepped on the same gradients; param 3 (group 0) and param 70 (group 1) have no
    gradient on some steps, so they fall behind their groups' other params in step and
    scalar state. Returns (theirs, ours, torch params, lrfast params)."""
    torch = _torch()
    import lrfast.torch as LT
    shapes = _model_shapes()
    if theirs is None:
        gen = torch.Generator().manual_seed(seed)
        base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        tp = [b.clone().requires_grad_() for b in base]
        lp = [b.clone().requires_grad_() for b in base]
        g0, g1 = TORCH_CASES[name]
        theirs = getattr(torch.optim, name)(
            [dict(params=tp[:60], **g0), dict(params=tp[60:], **g1)], foreach=False)
        ours = getattr(LT, name)([dict(params=lp[:60], **g0), dict(params=lp[60:], **g1)])
    tp = [p for g in theirs.param_groups for p in g["params"]]
    lp = [p for g in ours.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for k, (a, b) in enumerate(zip(tp, lp)):
            if (k == 3 and step % 3 == 1) or (k == 70 and step % 5 in (0, 2)):
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    return theirs, ours, tp, lp


def _compare(theirs, ours, tp, lp, tol):
    """Params and every state entry (scalars included, with their dtypes) within ``tol``
    (relative); returns the largest relative difference."""
    worst = 0.0
    for k, (a, b) in enumerate(zip(tp, lp)):
        worst = max(worst, _rel(b.detach().numpy(), a.detach().numpy()))
        ta, tb = theirs.state[a], ours.state[b]
        assert set(ta) == set(tb), (k, sorted(ta), sorted(tb))
        for n in ta:
            assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, (k, n)
            d = _rel(tb[n].numpy(), ta[n].numpy())
            assert d <= tol, f"param {k}: state {n!r}: {d}"
            worst = max(worst, d)
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_torch_classes_match_torch_optim(name, dtype_name):
    """55 steps, 120 tensors, two groups: params and every state entry, scalars included. In
    float64 torch's default dtype is float64, so torch's scalars are float64 too."""
    torch = _torch()
    dtype = getattr(torch, dtype_name)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with _default_dtype(dtype):
        theirs, ours, tp, lp = _lockstep(name, dtype, 55)
        for st in (theirs.state[tp[0]], ours.state[lp[0]]):
            for n in SCALARS[name]:
                assert st[n].dim() == 0 and st[n].dtype == dtype
        # params 3 and 70 have lagged: their step and scalars differ from their groups'
        assert ours.state[lp[3]]["step"] != ours.state[lp[0]]["step"]
        assert ours.state[lp[70]][SCALARS[name][-1]] != ours.state[lp[60]][SCALARS[name][-1]] \
            or name == "ASGD"
        _compare(theirs, ours, tp, lp, tol)


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_torch_state_dict_to_lrfast_and_back(name):
    """torch's state dict loads into lrfast.torch's class, which continues with torch; its
    own state dict then loads into a fresh torch.optim class, which continues the same."""
    torch = _torch()
    import lrfast.torch as LT
    dtype = torch.float64
    with _default_dtype(dtype):
        theirs, ours, tp, lp = _lockstep(name, dtype, 7)
        # a fresh lrfast class over copies of torch's params, from torch's state dict
        g0, g1 = TORCH_CASES[name]
        fresh = [p.detach().clone().requires_grad_() for p in tp]
        loaded = getattr(LT, name)([dict(params=fresh[:60], **g0),
                                    dict(params=fresh[60:], **g1)])
        loaded.load_state_dict(copy.deepcopy(theirs.state_dict()))
        _compare(theirs, loaded, tp, fresh, 0.0)
        theirs, loaded, tp, fresh = _lockstep(name, dtype, 6, theirs, loaded, seed=10)
        _compare(theirs, loaded, tp, fresh, 1e-10)
        # and back into torch
        back_params = [p.detach().clone().requires_grad_() for p in fresh]
        back = getattr(torch.optim, name)([dict(params=back_params[:60], **g0),
                                           dict(params=back_params[60:], **g1)],
                                          foreach=False)
        back.load_state_dict(copy.deepcopy(loaded.state_dict()))
        _compare(back, loaded, back_params, fresh, 0.0)
        back, loaded, back_params, fresh = _lockstep(name, dtype, 6, back, loaded, seed=20)
        _compare(back, loaded, back_params, fresh, 1e-10)


def test_torch_number_scalars_of_an_older_state_dict_become_tensors():
    """A state dict whose mu_product is a Python number (as older torch saved it) loads, as
    in torch, and the run continues as torch's does."""
    torch = _torch()
    import lrfast.torch as LT
    w = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    src = torch.optim.NAdam(w, lr=0.1)
    for p in w:
        p.grad = torch.ones_like(p)
    src.step()
    sd = copy.deepcopy(src.state_dict())
    for st in sd["state"].values():
        st["mu_product"] = float(st["mu_product"])
    a = [p.detach().clone().requires_grad_() for p in w]
    b = [p.detach().clone().requires_grad_() for p in w]
    t2, l2 = torch.optim.NAdam(a, lr=0.1), LT.NAdam(b, lr=0.1)
    t2.load_state_dict(copy.deepcopy(sd))
    l2.load_state_dict(copy.deepcopy(sd))
    assert torch.is_tensor(l2.state[b[0]]["mu_product"])
    for p, q in zip(a, b):
        p.grad = q.grad = torch.full_like(p, 0.5)
    t2.step()
    l2.step()
    for p, q in zip(a, b):
        assert _rel(q.detach().numpy(), p.detach().numpy()) <= 1e-12
        assert float(l2.state[q]["mu_product"]) == float(t2.state[p]["mu_product"])


def test_torch_refuses_a_scalar_state_that_is_not_0d():
    torch = _torch()
    import lrfast.torch as LT
    w = torch.randn(4, requires_grad=True)
    opt = LT.ASGD([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["eta"] = torch.ones(4)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="'eta'.*0-d"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["eta"], before["state"][0]["eta"])


# ------------------------------------------------------------------------------------------
# The NumPy classes, lrfast.functional and lrfast.reference
# ------------------------------------------------------------------------------------------

CLASS_CASES = [
    ("NAdam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.05)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("ASGD", dict(lr=0.02, lambd=0.01, alpha=0.5, t0=5, weight_decay=0.1)),
    ("ASGD", dict(lr=0.01, t0=0, maximize=True)),
]
SHAPES = [(7, 5), (300,), (2, 3, 4), (0,)]


@pytest.mark.parametrize("name, hyper", CLASS_CASES)
def test_class_with_float32_and_float64_params_matches_the_reference(name, hyper):
    """float32 params keep float32 scalars, float64 params float64 ones: each dtype is its
    own reference run, and the state dict shows each param its dtype's scalars."""
    p32 = make_params(SHAPES, np.float32, seed=1)
    p64 = make_params(SHAPES, np.float64, seed=2)
    opt = getattr(lrfast, name)(p32 + p64, **hyper)
    r32, r64 = ReferenceRun(name, hyper, p32), ReferenceRun(name, hyper, p64)
    rng = np.random.default_rng(3)
    for _ in range(30):
        g32, g64 = make_grads(SHAPES, np.float32, rng), make_grads(SHAPES, np.float64, rng)
        assert opt.step(g32 + g64)
        r32.step(g32)
        r64.step(g64)
    sd = opt.state_dict()["state"]
    n = len(SHAPES)
    for k in range(n):
        for run, off, dtype in ((r32, 0, np.float32), (r64, n, np.float64)):
            np.testing.assert_array_equal(opt.params[off + k], run.params[k])
            for s in SCALARS[name]:
                got = sd[off + k][s]
                assert got.shape == () and got.dtype == dtype
                assert got == run.state[s][k], (s, got, run.state[s][k])
            for buf, arrays in run.state.items():
                np.testing.assert_array_equal(sd[off + k][buf], arrays[k])
    # the scalars differ between the two dtypes (they are rounded in their own)
    if name == "NAdam":
        assert float(sd[0]["mu_product"]) != float(sd[n]["mu_product"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("single", [True, False])
def test_functional_is_the_reference(dtype, single):
    rng = np.random.default_rng(4)
    shapes = SHAPES[:1] if single else SHAPES
    for fn, buffers, scalars, hyper in (
            ("nadam_", 2, (1.0,), dict(lr=0.01, weight_decay=0.1, momentum_decay=0.05)),
            ("asgd_", 1, (0.05, 1.0), dict(lr=0.05, lambd=0.01, t0=3, weight_decay=0.1))):
        runs = []
        for _ in range(2):
            params = make_params(shapes, dtype, seed=9)
            state = [[np.zeros_like(p) for p in params] for _ in range(buffers)]
            sc = [np.array(v, dtype) for v in scalars]
            runs.append((params, state, sc))
        for t in range(1, 21):
            grads = make_grads(shapes, dtype, rng)
            for module, (params, state, sc) in zip((F, R), runs):
                pick = (lambda x: x[0]) if single else (lambda x: x)
                getattr(module, fn)(pick(params), pick(grads), *[pick(s) for s in state], *sc,
                                    step=t, **hyper)
        (p1, s1, c1), (p2, s2, c2) = runs
        for a, b in zip(p1 + sum(s1, []), p2 + sum(s2, [])):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(c1, c2):
            assert a.dtype == dtype and a == b


def test_functional_checks_its_scalar_state_and_changes_nothing_on_error():
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="mu_product must be a 0-d"):
        F.nadam_(p, g, m, v, np.ones(1, np.float32), step=1, lr=0.1)
    with pytest.raises(TypeError, match="mu_product has dtype"):
        F.nadam_(p, g, m, v, np.array(1, np.int64), step=1, lr=0.1)
    with pytest.raises(TypeError, match="one dtype"):
        F.asgd_(p, g, m, np.array(0.1, np.float32), np.array(1.0), step=1, lr=0.1)
    product = np.array(1.0, np.float32)
    with pytest.raises(ValueError):  # a bad gradient: nothing runs, the product stays
        F.nadam_(p, np.ones(4, np.float32), m, v, product, step=1, lr=0.1)
    assert product == 1.0 and (p == 1).all() and (m == 0).all()
    F.nadam_(p, g, m, v, product, step=1, lr=0.1)
    assert product == np.float32(1.0) * np.float32(0.9 * (1 - 0.5 * 0.96 ** 0.004))


def test_asgd_average_is_the_mean_of_the_iterates():
    """With t0 = 0, mu_t = 1/max(1, t-1): ax is the param at steps 1 and 2, then the plain
    mean of the iterates from step 2 on (Polyak averaging), worked out by hand."""
    w = np.array([1.0, -2.0, 3.0])
    opt = lrfast.ASGD([w], lr=0.1, t0=0)
    rng = np.random.default_rng(0)
    iterates = []
    for t in range(1, 12):
        opt.step([rng.standard_normal(3)])
        iterates.append(w.copy())
        ax = opt.state_dict()["state"][0]["ax"]
        expected = iterates[-1] if t <= 2 else np.mean(iterates[1:], axis=0)
        np.testing.assert_allclose(ax, expected, rtol=1e-13, atol=1e-15)
    st = opt.state_dict()["state"][0]
    assert float(st["mu"]) == 1 / 11
    assert float(st["eta"]) == 0.1 / (1 + 1e-4 * 0.1 * 11) ** 0.75


def test_nadam_first_step_by_hand():
    """One step from zero state: m = 0.1 g, v = 0.001 g^2, so sqrt(v / (1 - beta2)) = |g|."""
    g = np.array([0.5, -3.0])
    w = np.array([1.0, -2.0])
    opt = lrfast.NAdam([w], lr=0.1)
    opt.step([g])
    mu1 = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
    mu2 = 0.9 * (1 - 0.5 * 0.96 ** 0.008)
    d = np.abs(g) + 1e-8
    expected = (np.array([1.0, -2.0]) - 0.1 * (1 - mu1) / (1 - mu1) * g / d
                - 0.1 * mu2 / (1 - mu1 * mu2) * (0.1 * g) / d)
    np.testing.assert_allclose(w, expected, rtol=1e-14)
    assert float(opt.state_dict()["state"][0]["mu_product"]) == mu1


@pytest.mark.parametrize("name, hyper", CLASS_CASES[::2])
def test_skipped_or_failed_steps_leave_the_scalar_state(name, hyper):
    params = make_params(SHAPES, np.float32) + make_params(SHAPES[:2], np.float64)
    opt = getattr(lrfast, name)(params, skip_nonfinite=True, **hyper)
    rng = np.random.default_rng(0)

    def grads():
        return make_grads(SHAPES, np.float32, rng) + make_grads(SHAPES[:2], np.float64, rng)

    for _ in range(3):
        assert opt.step(grads())
    before = snapshot(opt)
    bad = grads()
    bad[-1][0] = np.nan  # in the float64 bank: the float32 one is checked as well
    assert opt.step(bad) is False
    assert snapshot(opt) == before and opt.skipped_steps == 1
    wrong = grads()
    wrong[1] = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        opt.step(wrong)
    assert snapshot(opt) == before
    # and the next good step is the one a run without them makes
    ref = getattr(lrfast, name)([p.copy() for p in params], **hyper)
    ref.load_state_dict(opt.state_dict())
    g = grads()
    assert opt.step(g) and ref.step(g)
    assert snapshot(opt)[:2] == snapshot(ref)[:2]


@pytest.mark.parametrize("name, hyper", CLASS_CASES[::2])
def test_load_state_dict_checks_the_scalar_state(name, hyper):
    params = make_params(SHAPES, np.float32)
    opt = getattr(lrfast, name)(params, **hyper)
    opt.step(make_grads(SHAPES, np.float32, np.random.default_rng(0)))
    good = opt.state_dict()
    before = snapshot(opt)
    s = SCALARS[name][0]
    for change, error, pattern in (
            (lambda st: np.array([1.0], np.float32), ValueError, "0-d"),
            (lambda st: np.array(0.5, np.float64), TypeError, "dtype float64"),
            (lambda st: 0.5, TypeError, "numpy.ndarray")):
        sd = copy.deepcopy(good)
        sd["state"][1][s] = change(sd["state"][1][s])
        with pytest.raises(error, match=pattern):
            opt.load_state_dict(sd)
        assert snapshot(opt) == before
    sd = copy.deepcopy(good)  # params that step together share their scalars
    sd["state"][1][s] = np.array(0.123, np.float32)
    with pytest.raises(ValueError, match="step together"):
        opt.load_state_dict(sd)
    assert snapshot(opt) == before
    sd = copy.deepcopy(good)  # a consistent change is taken
    for st in sd["state"].values():
        st[s] = np.array(0.25, np.float32)
    opt.load_state_dict(sd)
    assert float(opt.state_dict()["state"][0][s]) == 0.25


@pytest.mark.parametrize("name, hyper", CLASS_CASES[::2])
def test_checkpoint_resume_is_exact(name, hyper, tmp_path):
    def build():
        return getattr(lrfast, name)({"a": make_params(SHAPES[:1], np.float32)[0],
                                      "b": make_params(SHAPES[1:2], np.float64)[0]}, **hyper)

    def grads(rng):
        return {"a": make_grads(SHAPES[:1], np.float32, rng)[0],
                "b": make_grads(SHAPES[1:2], np.float64, rng)[0]}

    full = build()
    rng = np.random.default_rng(0)
    for _ in range(10):
        full.step(grads(rng))
    part = build()
    rng = np.random.default_rng(0)
    for _ in range(4):
        part.step(grads(rng))
    lrfast.save_checkpoint(tmp_path / "run.npz", part)
    resumed = build()
    lrfast.load_checkpoint(tmp_path / "run.npz", resumed)
    for _ in range(6):
        resumed.step(grads(rng))
    assert snapshot(resumed)[:3] == snapshot(full)[:3]


def test_asgd_eta_starts_at_the_first_steps_lr():
    w = np.ones(2)
    opt = lrfast.ASGD([w], lr=0.1)
    opt.lr = 0.2  # before the first step: torch makes eta at the first step, from its lr
    assert float(opt.state_dict()["state"][0]["eta"]) == 0.2  # float64 params: float64 eta
    opt.step([np.ones(2)])
    opt.lr = 0.3  # after it: eta is state, and moves only by the update's rule
    assert float(opt.state_dict()["state"][0]["eta"]) == 0.2 / (1 + 1e-4 * 0.2) ** 0.75
    assert F.asgd_([], [], [], np.array(0.5), np.array(1.0), step=1, lr=0.1) is None
    eta = np.array(0.5)
    F.asgd_([], [], [], eta, np.array(1.0), step=1, lr=0.1)
    assert eta == 0.5  # no tensors, no step


def test_asgd_eta_starts_at_a_schedules_first_value():
    sched = lambda step: 0.1 / (1 + step)  # noqa: E731
    w = np.ones(2)
    opt = lrfast.ASGD([w], lr=sched)
    assert float(opt.state_dict()["state"][0]["eta"]) == 0.1
    opt.step([np.ones(2)])
    # the next eta is formed from this step's lr (0.1) and number (1)
    assert float(opt.state_dict()["state"][0]["eta"]) == 0.1 / (1 + 1e-4 * 0.1) ** 0.75
    opt.step([np.ones(2)])
    assert math.isclose(float(opt.state_dict()["state"][0]["eta"]),
                        0.05 / (1 + 1e-4 * 0.05 * 2) ** 0.75, rel_tol=1e-15)


@pytest.mark.parametrize("name, kwargs, message", [
    ("NAdam", dict(momentum_decay=-0.1), "Invalid momentum_decay value: -0.1"),
    ("NAdam", dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
    ("NAdam", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ("ASGD", dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    ("ASGD", dict(lr=-1.0), "Invalid learning rate: -1.0"),
])
def test_bad_hyper_parameters_are_torchs_errors(name, kwargs, message):
    w = np.ones(2)
    with pytest.raises(ValueError, match=message):
        getattr(lrfast, name)([w], **kwargs)
    try:
        import torch
        import lrfast.torch as LT
    except ImportError:
        return
    for cls in (getattr(torch.optim, name), getattr(LT, name)):
        with pytest.raises(ValueError, match=message):
            cls([torch.ones(2, requires_grad=True)], **kwargs)
