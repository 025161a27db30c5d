"""LAMB and LARS (timm's Lamb and Lars), and ADOPT with caution (timm's Adopt, whose mask is
scaled by its mean over each tensor): parity with timm on a many-tensor model, per-tensor sums
that do not depend on the thread count, a FlatParams' named views as tensors, the functional
form and the reference, bad inputs, and state dicts in both directions."""
import copy
import inspect

import numpy as np
import pytest

import lrfast
from lrfast import _dispatch
from lrfast import functional as F
from lrfast import reference as R
from cases import environment

try:
    import torch
except ImportError:  # the NumPy tests run without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def _timm(name):
    try:
        from lrfast._bench.peer_imports import timm_optimizer
        return timm_optimizer(name)
    except ImportError as exc:
        pytest.skip(f"timm is not available: {exc}")


def _ours(name):
    import lrfast.torch as lt
    return getattr(lt, name)


# 108 tensors: many small ones (several per thread span) and a few of more than one block
# (PASS_BLOCK is 4096 elements), plus an empty and a one-element tensor.
SHAPES = [[(i % 7 + 1, i % 5 + 2), (i % 11 + 1,), (3,), (2, 3, 2)][i % 4] for i in range(104)]
SHAPES += [(70, 90), (9000,), (0,), (1,)]
SPLIT = 54  # the first group's tensors

LAMB_CASES = [
    # max_grad_norm 1: the global norm of ~1000 N(0,1) grads clips at every step
    ({"lr": 1e-2}, [{}, {"lr": 5e-3, "betas": (0.8, 0.99), "weight_decay": 0.0, "caution": True,
                         "always_adapt": True, "trust_clip": True}]),
    ({"lr": 1e-2, "max_grad_norm": None},
     [{"decoupled_decay": True, "corrected_weight_decay": True, "weight_decay": 0.05},
      {"grad_averaging": False, "bias_correction": False, "weight_decay": 0.0, "eps": 1e-5}]),
    ({"lr": 1e-2, "max_grad_norm": 1e4, "weight_decay": 0.02},
     [{"caution": True, "decoupled_decay": True}, {"weight_decay": 0.0, "caution": True}]),
]
LARS_CASES = [
    ({"lr": 0.1}, [{"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
                   {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "always_adapt": True,
                    "trust_clip": True, "trust_coeff": 0.01}]),
    ({"lr": 0.1}, [{}, {"weight_decay": 1e-3, "eps": 1e-6, "trust_clip": True}]),
]
# ADOPT: caution in both groups, the first with coupled decay (in the mask's g), the second
# with torch.lerp's second branch (1 - beta1 = 0.7), decoupled corrected decay, maximize.
ADOPT_CASES = [
    ({"lr": 1e-2}, [{"caution": True, "weight_decay": 0.1},
                    {"lr": 5e-3, "betas": (0.3, 0.99), "caution": True, "weight_decay": 0.05,
                     "decoupled": True, "corrected_weight_decay": True, "maximize": True,
                     "clip_exp": None}]),
]
CASES = [("Lamb", c) for c in LAMB_CASES] + [("Lars", c) for c in LARS_CASES]
CASES += [("Adopt", c) for c in ADOPT_CASES]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _pair(name, case, dtype, steps, seed=0):
    """timm's class and lrfast.torch's, stepped in lockstep on the same model and grads."""
    defaults, groups = case
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]

    def param_groups(ps):
        return [dict(params=ps[:SPLIT], **groups[0]), dict(params=ps[SPLIT:], **groups[1])]

    ta = _timm(name)(param_groups(a), **defaults)
    tb = _ours(name)(param_groups(b), **defaults)
    for t in range(steps):
        for k, (x, y) in enumerate(zip(a, b)):
            g = torch.randn(x.shape, generator=gen, dtype=dtype)
            # a few tensors without a gradient at some steps (state made later, skipped)
            missing = (k == 3 and t < 2) or (k == SPLIT + 5 and t == 10)
            x.grad = None if missing else g.clone()
            y.grad = None if missing else g.clone()
        if t == steps // 2:  # corrected_weight_decay's lr ** 2 / max_lr now differs from lr
            for opt in (ta, tb):
                for group in opt.param_groups:
                    group["lr"] *= 0.5
        ta.step()
        tb.step()
    return a, b, ta, tb


def _max_rel(x, y):
    return float((x - y).norm() / max(float(x.norm()), 1e-300))


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{i}" for n, i in
                                                   [("Lamb", i) for i in range(3)]
                                                   + [("Lars", i) for i in range(2)]
                                                   + [("Adopt", i) for i in range(1)]])
def test_parity_with_timm_after_55_steps_on_108_tensors_in_two_groups(name, case, dtype):
    dtype = getattr(torch, dtype)
    a, b, ta, tb = _pair(name, case, dtype, 55)
    worst = 0.0
    for k, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(y.detach(), x.detach(), **_tol(dtype), msg=f"param {k}")
        worst = max(worst, _max_rel(x.detach(), y.detach()))
        sa, sb = ta.state.get(x, {}), tb.state.get(y, {})
        assert sorted(sa) == sorted(sb), (k, sorted(sa), sorted(sb))
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], **_tol(dtype), msg=f"{key} of {k}")
            worst = max(worst, _max_rel(sa[key], sb[key]))
    for ga, gb in zip(ta.param_groups, tb.param_groups):
        assert sorted(ga) == sorted(gb)
        if name == "Lamb":
            assert float(ga["step"]) == float(gb["step"]) == 55
            assert ga["max_lr_snapshot"] == gb["max_lr_snapshot"]
    print(f"{name} {case[0]} {dtype}: max normwise relative difference {worst:.2e}")


@needs_torch
def test_lamb_clipping_is_active_in_the_parity_cases():
    # The global norm of the first case's grads is far above max_grad_norm=1, so the clipped
    # and unclipped runs part ways: the parity test above covers clipping on and off.
    clipped = _pair("Lamb", LAMB_CASES[0], torch.float64, 3)[1]
    free = _pair("Lamb", ({"lr": 1e-2, "max_grad_norm": None}, LAMB_CASES[0][1]),
                 torch.float64, 3)[1]
    assert not all(torch.equal(x, y) for x, y in zip(clipped, free))


@needs_torch
@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_torch_signature_is_timms_plus_lrfast_keywords(name):
    theirs = inspect.signature(_timm(name)).parameters
    ours = inspect.signature(_ours(name)).parameters
    P = inspect.Parameter
    extra = {"state_dtype": None, "rounding": "nearest", "seed": 0, "ema": None}
    assert list(ours) == list(theirs) + list(extra)
    for key, p in theirs.items():
        assert (ours[key].kind, ours[key].default) == (p.kind, p.default), key
    for key, default in extra.items():
        assert (ours[key].kind, ours[key].default) == (P.KEYWORD_ONLY, default)


@needs_torch
@pytest.mark.parametrize("name,case", [CASES[0], CASES[1], CASES[3]], ids=["Lamb-0", "Lamb-1",
                                                                          "Lars-0"])
def test_state_dicts_load_both_ways_and_steps_go_on_identically(name, case):
    dtype = torch.float64
    a, b, ta, tb = _pair(name, case, dtype, 6)
    # timm -> lrfast.torch: a fresh lrfast optimizer over copies of timm's params
    c = [torch.nn.Parameter(x.detach().clone()) for x in a]
    defaults, groups = case
    tc = _ours(name)([dict(params=c[:SPLIT], **groups[0]), dict(params=c[SPLIT:], **groups[1])],
                     **defaults)
    tc.load_state_dict(copy.deepcopy(ta.state_dict()))  # (torch keeps the tensors)
    # lrfast.torch -> timm
    d = [torch.nn.Parameter(x.detach().clone()) for x in b]
    td = _timm(name)([dict(params=d[:SPLIT], **groups[0]), dict(params=d[SPLIT:], **groups[1])],
                     **defaults)
    td.load_state_dict(copy.deepcopy(tb.state_dict()))
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        for w in zip(a, b, c, d):
            g = torch.randn(w[0].shape, generator=gen, dtype=dtype)
            for x in w:
                x.grad = g.clone()
        for opt in (ta, tb, tc, td):
            opt.step()
    for x, y, z, u in zip(a, b, c, d):
        torch.testing.assert_close(z.detach(), x.detach(), **_tol(dtype))
        torch.testing.assert_close(u.detach(), y.detach(), **_tol(dtype))
        torch.testing.assert_close(u.detach(), x.detach(), **_tol(dtype))
    for x, z in zip(a, c):
        for key, buf in ta.state.get(x, {}).items():
            torch.testing.assert_close(tc.state[z][key], buf, **_tol(dtype))
    assert [sorted(g) for g in tc.param_groups] == [sorted(g) for g in ta.param_groups]


@needs_torch
def test_lamb_clips_with_the_optimizers_max_grad_norm_as_timm_does():
    # timm reads max_grad_norm from the defaults, whatever a group says.
    case = ({"lr": 1e-2, "max_grad_norm": 0.5}, [{"max_grad_norm": None}, {"max_grad_norm": 5}])
    a, b, _, _ = _pair("Lamb", case, torch.float64, 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), **_tol(torch.float64))


@needs_torch
def test_half_precision_torch_params_step_and_complex_ones_are_refused():
    w = torch.nn.Parameter(torch.randn(50, dtype=torch.bfloat16))
    opt = _ours("Lamb")([w], lr=0.1)
    w.grad = torch.randn(50, dtype=torch.bfloat16)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w.detach(), before)
    with pytest.raises(TypeError, match="complex"):
        _ours("Lars")([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


# --------------------------------------------------------------------------------------------
# NumPy layers
# --------------------------------------------------------------------------------------------

NP_SHAPES = {"a": (50_001,), "b": (3,), "c": (40_000,), "d": (7, 13), "e": (0,), "f": (4096,)}
NP_CASES = [
    ("Lamb", dict(lr=1e-2, caution=True, always_adapt=True, trust_clip=True)),
    ("Lamb", dict(lr=1e-2, decoupled_decay=True, max_grad_norm=3.0)),
    ("Lamb", dict(lr=1e-2, weight_decay=0.0, max_grad_norm=None)),
    ("Lars", dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_clip=True)),
    ("Adopt", dict(lr=1e-2, caution=True, weight_decay=0.1)),
    ("Adopt", dict(lr=1e-2, caution=True, betas=(0.3, 0.99), weight_decay=0.1, decoupled=True,
                   clip_exp=None)),
]


def _np_run(name, hyper, dtype, layout="list", steps=4, **options):
    rng = np.random.default_rng(0)
    init = {k: rng.standard_normal(s).astype(dtype) for k, s in NP_SHAPES.items()}
    cls = getattr(lrfast, name)
    if layout == "flat":
        flat = lrfast.FlatParams(NP_SHAPES, dtype, init=init)
        opt = cls(flat, **hyper, **options)
    else:
        params = [init[k].copy() for k in NP_SHAPES]
        opt = cls(params, **hyper, **options)
    grng = np.random.default_rng(1)
    for _ in range(steps):
        grads = [grng.standard_normal(s).astype(dtype) for s in NP_SHAPES.values()]
        if layout == "flat":
            for k, g in zip(NP_SHAPES, grads):
                flat.grads[k][...] = g
            opt.step()
        else:
            opt.step(grads)
    params = opt.params
    params = list(params.values()) if isinstance(params, dict) else params
    state = opt.state_dict()["state"]
    return [p.tobytes() for p in params], {str(k): {b: a.tobytes() for b, a in v.items()}
                                           for k, v in (state.items() if layout == "flat"
                                                        else zip(NP_SHAPES, state.values()))}


@pytest.mark.parametrize("build", list(_dispatch.BUILDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,hyper", NP_CASES, ids=[c[0] + str(i) for i, c in
                                                      enumerate(NP_CASES)])
def test_bitwise_the_same_for_1_2_3_threads_with_tensors_split_across_threads(name, hyper, dtype,
                                                                            build):
    runs = []
    for n in (1, 2, 3):
        # one element per thread is enough to split: every tensor of more than a block is cut
        with environment(build, n, 1):
            runs.append(_np_run(name, hyper, dtype))
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_grad_sum_of_squares_is_the_same_for_any_thread_count(dtype):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(dtype) for s in NP_SHAPES.values()]
    grads = [rng.standard_normal(s).astype(dtype) for s in NP_SHAPES.values()]
    opt = lrfast.Lamb(params)
    plan = opt._plans[0]
    assert plan.gather(grads) is None
    sums = []
    for n in (1, 2, 3):
        with environment(_dispatch.name, n, 1):
            sums.append(plan.grad_sumsq(n))
    assert sums[0] == sums[1] == sums[2]
    exact = sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads)
    assert sums[0] == pytest.approx(exact, rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,hyper", NP_CASES, ids=[c[0] + str(i) for i, c in
                                                      enumerate(NP_CASES)])
def test_flat_params_views_are_tensors_as_a_list_of_them_is(name, hyper, dtype):
    flat = _np_run(name, hyper, dtype, "flat")
    listed = _np_run(name, hyper, dtype, "list")
    assert flat[0] == listed[0]
    assert flat[1] == listed[1]


def test_flat_params_are_not_one_tensor_for_trust_ratios():
    # The whole buffer as one tensor would give one ratio for all; the views give one each.
    init = {"w": np.full((4, 4), 3.0), "b": np.full(4, 0.01)}
    flat = lrfast.FlatParams({"w": (4, 4), "b": (4,)}, np.float64, init=init)
    flat.grad[...] = 1.0
    lrfast.Lars(flat, lr=1.0, weight_decay=0.1).step()
    whole = np.concatenate([init["w"].ravel(), init["b"]])
    lrfast.Lars([whole], lr=1.0, weight_decay=0.1).step([np.ones(20)])
    views = [init["w"].ravel().copy(), init["b"].copy()]
    R.lars_(views, [np.ones(16), np.ones(4)], step=1, lr=1.0, weight_decay=0.1)
    np.testing.assert_allclose(flat.param, np.concatenate(views), rtol=1e-14)
    assert not np.allclose(flat.param, whole)
    sd = lrfast.Lamb(flat).state_dict()
    assert sorted(sd["state"]) == ["b", "w"]
    assert sd["state"]["w"]["exp_avg"].shape == (4, 4)


def test_flat_params_are_not_one_tensor_for_adopts_caution():
    # The mask's mean is per named view. At step 3, m = 0.1 everywhere; a gradient of -0.5
    # leaves m > 0 (0.9 * 0.1 - 0.1 * 0.5): w keeps all of its 4 elements (factor 1), b 1 of
    # its 4 (factor 4), where the whole buffer as one tensor would keep 5 of 8 (factor 1.6).
    init = {"w": np.zeros(4), "b": np.zeros(4)}
    flat = lrfast.FlatParams({"w": (4,), "b": (4,)}, np.float64, init=init)
    opt = lrfast.Adopt(flat, lr=0.1, caution=True)
    g1 = g2 = np.ones(8)
    g3 = np.array([1.0, 1.0, 1.0, 1.0, 1.0, -0.5, -0.5, -0.5])
    for g in (g1, g2, g3):
        flat.grad[...] = g
        opt.step()
    views = [np.zeros(4), np.zeros(4)]
    whole = [np.zeros(8)]
    state = {"views": ([np.zeros(4), np.zeros(4)], [np.zeros(4), np.zeros(4)]),
             "whole": ([np.zeros(8)], [np.zeros(8)])}
    for t, g in enumerate((g1, g2, g3), start=1):
        R.adopt_(views, [g[:4], g[4:]], *state["views"], step=t, lr=0.1, caution=True)
        R.adopt_(whole, [g], *state["whole"], step=t, lr=0.1, caution=True)
    np.testing.assert_allclose(flat.param, np.concatenate(views), rtol=1e-14)
    assert not np.allclose(flat.param, whole[0])


def test_numpy_lamb_corrects_the_decay_with_the_lr_it_was_made_with():
    rng = np.random.default_rng(5)
    shapes = [(30,), (4, 5)]
    params = [rng.standard_normal(s) for s in shapes]
    ref = [p.copy() for p in params]
    m = [np.zeros(s) for s in shapes]
    v = [np.zeros(s) for s in shapes]
    opt = lrfast.Lamb(params, lr=0.1, weight_decay=0.3, decoupled_decay=True,
                      corrected_weight_decay=True, max_grad_norm=2.0)
    for t in range(1, 6):
        grads = [rng.standard_normal(s) for s in shapes]
        lr = 0.1 if t < 3 else 0.025
        opt.lr = lr
        opt.step(grads)
        R.lamb_(ref, grads, m, v, step=t, lr=lr, weight_decay=0.3, decoupled_decay=True,
                corrected_weight_decay=True, max_lr=0.1, max_grad_norm=2.0)
    for p, q in zip(params, ref):
        np.testing.assert_allclose(p, q, rtol=1e-13, atol=1e-15)
    # ... which differs from the decay scaled by the lr itself
    plain = [p.copy() for p in ref]
    R.lamb_(plain, grads, [x.copy() for x in m], [x.copy() for x in v], step=6, lr=0.025,
            weight_decay=0.3, decoupled_decay=True, max_grad_norm=2.0)
    corrected = [p.copy() for p in ref]
    R.lamb_(corrected, grads, m, v, step=6, lr=0.025, weight_decay=0.3, decoupled_decay=True,
            corrected_weight_decay=True, max_lr=0.1, max_grad_norm=2.0)
    assert not np.allclose(plain[0], corrected[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,hyper", [
    ("lamb", dict(max_grad_norm=0.7, caution=True, decoupled_decay=True,
                  corrected_weight_decay=True, max_lr=0.2, weight_decay=0.1)),
    ("lamb", dict(grad_averaging=False, bias_correction=False, always_adapt=True,
                  weight_decay=0.0, max_grad_norm=None)),
    ("lars", dict(momentum=0.9, nesterov=True, weight_decay=0.01, trust_clip=True)),
    ("lars", dict(always_adapt=True, trust_coeff=0.02)),
    ("adopt", dict(caution=True, weight_decay=0.1)),
    ("adopt", dict(caution=True, beta1=0.3, weight_decay=0.1, decoupled=True, maximize=True,
                   clip_exp=None)),
])
def test_functional_matches_the_reference(name, hyper, dtype):
    rng = np.random.default_rng(2)
    shapes = [(9000,), (5,), (0,), (3, 7)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [p.copy() for p in params]
    nbuf = 2 if name in ("lamb", "adopt") else (1 if hyper.get("momentum") else 0)
    bufs = [[np.zeros(s, dtype) for s in shapes] for _ in range(nbuf)]
    rbufs = [[b.copy() for b in row] for row in bufs]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    for t in range(1, 8):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        getattr(F, name + "_")(params, grads, *bufs, step=t, lr=0.05, **hyper)
        getattr(R, name + "_")(ref, grads, *rbufs, step=t, lr=0.05, **hyper)
    for p, q in zip(params, ref):
        np.testing.assert_allclose(p, q, **tol)
    for row, rrow in zip(bufs, rbufs):
        for b, rb in zip(row, rrow):
            np.testing.assert_allclose(b, rb, **tol)


def test_grad_scale_unscales_before_the_norms():
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(100) for _ in range(3)]
    other = [p.copy() for p in params]
    a = lrfast.Lamb(params, lr=0.1, caution=True)
    b = lrfast.Lamb(other, lr=0.1, caution=True)
    for _ in range(3):
        grads = [rng.standard_normal(100) for _ in range(3)]
        a.step([g * 1024.0 for g in grads], grad_scale=1024.0)
        b.step(grads)
    for p, q in zip(params, other):
        np.testing.assert_array_equal(p, q)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

BAD = [
    ("Lamb", dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    ("Lamb", dict(eps=-1e-6), ValueError, "Invalid epsilon: -1e-06"),
    ("Lamb", dict(weight_decay=-0.1), ValueError, "Invalid weight_decay: -0.1"),
    ("Lamb", dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
    ("Lamb", dict(max_grad_norm=-2.0), ValueError, "Invalid max_grad_norm value"),
    ("Lamb", dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0"),
    ("Lamb", dict(caution="yes"), TypeError, "caution must be a bool"),
    ("Lamb", dict(lr=0.0, decoupled_decay=True, corrected_weight_decay=True), ValueError,
     "Corrected weight decay requires a positive max lr, got 0.0"),
    ("Lars", dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    ("Lars", dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    ("Lars", dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
    ("Lars", dict(nesterov=True), ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    ("Lars", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    ("Lars", dict(trust_coeff=-1.0), ValueError, "Invalid trust_coeff value"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", BAD)
def test_bad_hyper_parameters_are_refused_by_both_classes(name, kwargs, exc, match):
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        getattr(lrfast, name)([np.zeros(3)], **kwargs)
    if torch is None:
        return
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        _ours(name)([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@needs_torch
@pytest.mark.parametrize("name,kwargs,exc,match", [b for b in BAD if b[2] is ValueError
                                                   and "max_grad_norm" not in b[3]
                                                   and "trust_coeff" not in b[3]
                                                   and "beta" not in b[3]])
def test_the_messages_are_timms(name, kwargs, exc, match):
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        _timm(name)([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_numpy_lamb_refuses_corrected_decay_with_a_schedule():
    with pytest.raises(ValueError, match="peak lr as a number"):
        lrfast.Lamb([np.zeros(3)], lr=lambda t: 0.1, decoupled_decay=True,
                    corrected_weight_decay=True)


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
def test_a_bad_grad_changes_nothing(name):
    params = [np.ones(5), np.ones((2, 3))]
    opt = getattr(lrfast, name)(params, lr=0.1, weight_decay=0.1, momentum=0.9) \
        if name == "Lars" else lrfast.Lamb(params, lr=0.1)
    opt.step([np.ones(5), np.ones((2, 3))])
    before = ([p.copy() for p in params], opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(5), np.ones((3, 2))])
    with pytest.raises(TypeError, match="dtype"):
        opt.step([np.ones(5), np.ones((2, 3), np.float32)])
    for p, q in zip(params, before[0]):
        np.testing.assert_array_equal(p, q)
    after = opt.state_dict()
    assert after["step_count"] == before[1]["step_count"] == 1
    for k, bufs in before[1]["state"].items():
        for b, arr in bufs.items():
            np.testing.assert_array_equal(after["state"][k][b], arr)


def test_functional_lamb_bad_max_lr_and_missing_buffers():
    p, g = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="Invalid max_lr value"):
        F.lamb_(p, g, np.zeros(3), np.zeros(3), step=1, lr=0.1, max_lr=-1.0)
    with pytest.raises(ValueError, match="momentum != 0 needs a momentum_buffer"):
        F.lars_(p, g, step=1, lr=0.1, momentum=0.9)
    np.testing.assert_array_equal(p, 0.0)


def test_the_specs_per_tensor_updates_are_the_kernels_multi_pass_ones():
    from lrfast._specs import UPDATES
    passes = _dispatch.kernels.PASS_UPDATES
    assert {name for name, u in UPDATES.items() if u.per_tensor} == set(passes)
    assert passes["lamb"] == (3, "max_grad_norm") and passes["lars"] == (2, None)
    assert passes["adopt"] == (2, None)


def test_lamb_without_clipping_reads_no_global_norm():
    # max_grad_norm=None: a NaN grad elsewhere in the step cannot reach a tensor's update
    # through the global norm (it would with clipping on).
    params = [np.ones(4), np.ones(3)]
    opt = lrfast.Lamb(params, lr=0.1, max_grad_norm=None)
    opt.step([np.full(4, 0.5), np.array([np.nan, 1.0, 1.0])])
    assert np.isfinite(params[0]).all()
    clipped = [np.ones(4), np.ones(3)]
    lrfast.Lamb(clipped, lr=0.1).step([np.full(4, 0.5), np.array([np.nan, 1.0, 1.0])])
    assert np.isnan(clipped[0]).all()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_global_norm_scales_the_grads_before_squaring(weight_decay):
    """grad_scale's factor applies to each grad before its square enters the global norm: 1e155
    squared overflows double, times 1e-300 first it is 1e-145, and the clipped grads (hence the
    moments) are then as the reference's on the unscaled grads, not zero."""
    grads = [np.array([0.0, 0.0, 1.0, 1e155])]
    params = [np.array([0.5, -1.0, 2.0, 1.0])]
    opt = lrfast.Lamb([params[0].copy()], lr=0.1, weight_decay=weight_decay, max_grad_norm=1.0)
    assert opt.step(grads, grad_scale=1e300)
    ref_p, m, v = [params[0].copy()], [np.zeros(4)], [np.zeros(4)]
    R.lamb_(ref_p, [grads[0] * 1e-300], m, v, step=1, lr=0.1, weight_decay=weight_decay,
            max_grad_norm=1.0)
    state = opt.state_dict()["state"][0]
    # by hand: the global norm is 1e-145 (< 1: no clipping), m = (1 - 0.9) g
    assert state["exp_avg"][3] == pytest.approx(0.1 * 1e-145, rel=1e-12)
    np.testing.assert_allclose(state["exp_avg"], m[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(state["exp_avg_sq"], v[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(opt.params[0], ref_p[0], rtol=1e-12, atol=0)
