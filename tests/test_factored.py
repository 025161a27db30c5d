"""Adafactor (factored second moments): lrfast.torch against torch.optim.Adafactor, the NumPy
class and lrfast.functional against lrfast.reference, thread-count independence, bad inputs
and state dicts."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import lrfast
from lrfast import _dispatch, functional as F, reference as R
from lrfast.flat import FlatParams

from cases import environment, snapshot

# 0-D, 1-D, 2-D and 3-D params: 26 of each, plus a few large enough to be cut into units.
SMALL = [(), (7,), (5, 6), (2, 3, 4)] * 26
LARGE = [(300, 200), (40_000,), (3, 70, 160)]
GROUP2 = dict(lr=0.05, beta2_decay=-0.6, eps=(1e-25, 1e-2), d=1.5, weight_decay=0.1,
              maximize=True)


def _params(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max() if b.size else 0.0
    diff = np.abs(a - b).max() if b.size else 0.0
    return diff / scale if scale else diff


# ------------------------------------------------------------------------------------------
# lrfast.torch against torch.optim.Adafactor
# ------------------------------------------------------------------------------------------

def _torch_pair(torch, dtype, seed=0):
    shapes = SMALL + LARGE
    arrays = _params(shapes, dtype, seed)
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
    lp = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
    half = len(shapes) // 2

    def groups(ps):
        return [{"params": ps[:half]}, {"params": ps[half:], **GROUP2}]
    return shapes, tp, lp, groups


def _lockstep(torch, theirs, ours, tp, lp, dtype, steps, seed=1, skip_some=True):
    gen = np.random.default_rng(seed)
    for step in range(steps):
        for k, (a, b) in enumerate(zip(tp, lp)):
            if skip_some and k % 9 == 4 and step % 5 == 2:  # no gradient on some steps
                a.grad = b.grad = None
                continue
            g = gen.standard_normal(tuple(a.shape)).astype(dtype)
            a.grad, b.grad = torch.tensor(g), torch.tensor(g.copy())
        theirs.step()
        ours.step()


def _assert_torch_close(theirs, ours, tp, lp, tol):
    worst = 0.0
    for k, (a, b) in enumerate(zip(tp, lp)):
        e = _rel(b.detach().numpy(), a.detach().numpy())
        assert e <= tol, f"param {k} {tuple(a.shape)}: {e}"
        worst = max(worst, e)
        ta, tb = theirs.state[a], ours.state[b]
        assert set(ta) == set(tb), (k, sorted(ta), sorted(tb))
        for n in ta:
            assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, (k, n)
            e = _rel(tb[n].numpy(), ta[n].numpy())
            assert e <= tol, f"param {k}: {n}: {e}"
            worst = max(worst, e)
    return worst


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)],
                         ids=["f32", "f64"])
def test_torch_class_matches_torch_optim_on_a_large_model(dtype, tol):
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    shapes, tp, lp, groups = _torch_pair(torch, dtype)
    assert len(shapes) >= 100
    theirs = torch.optim.Adafactor(groups(tp))
    ours = LT.Adafactor(groups(lp))
    _lockstep(torch, theirs, ours, tp, lp, dtype, steps=55)
    _assert_torch_close(theirs, ours, tp, lp, tol)
    # torch's state layout: row_var (..., R, 1) and col_var (..., 1, C), variance below 2-D
    st = ours.state[lp[3]]
    assert st["row_var"].shape == (2, 3, 1) and st["col_var"].shape == (2, 1, 4)
    assert set(ours.state[lp[0]]) == {"step", "variance"}
    assert ours.state_dict()["param_groups"][1]["eps"] == GROUP2["eps"]


def test_state_dicts_go_torch_to_lrfast_to_torch():
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    dtype = np.float64
    shapes, tp, lp, groups = _torch_pair(torch, dtype)
    theirs = torch.optim.Adafactor(groups(tp))
    ours = LT.Adafactor(groups(lp))
    _lockstep(torch, theirs, ours, tp, lp, dtype, steps=4)
    # torch's state dict into a fresh lrfast optimizer, then lrfast's into a fresh torch one
    _, tp2, lp2, _ = _torch_pair(torch, dtype)
    with torch.no_grad():
        for a, b, src in zip(tp2, lp2, tp):
            a.copy_(src)
            b.copy_(src)
    mid = LT.Adafactor(groups(lp2))
    mid.load_state_dict(copy.deepcopy(theirs.state_dict()))
    back = torch.optim.Adafactor(groups(tp2))
    back.load_state_dict(copy.deepcopy(mid.state_dict()))
    # all four continue together
    _lockstep(torch, back, mid, tp2, lp2, dtype, steps=4, seed=5)
    _lockstep(torch, theirs, ours, tp, lp, dtype, steps=4, seed=5)
    _assert_torch_close(back, mid, tp2, lp2, 1e-10)
    _assert_torch_close(theirs, mid, tp, lp2, 1e-10)


def test_a_loaded_buffer_of_the_wrong_shape_is_refused_and_nothing_kept():
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    w = torch.zeros(4, 3, requires_grad=True)
    opt = LT.Adafactor([w])
    w.grad = torch.ones(4, 3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["row_var"] = torch.zeros(4, 3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="row_var"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["row_var"], before["state"][0]["row_var"])


def test_torch_class_refuses_half_params_and_complex_at_the_step():
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    with pytest.raises(TypeError, match="float32 and float64"):
        LT.Adafactor([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)])
    w = torch.zeros(2, 3, requires_grad=True)
    opt = LT.Adafactor([w])
    w.grad_dtype = torch.bfloat16
    w.grad = torch.ones(2, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gradients of the param's dtype"):
        opt.step()
    assert torch.equal(w.detach(), torch.zeros(2, 3)) and len(opt.state) == 0
    c = torch.zeros(2, 3, dtype=torch.complex64, requires_grad=True)
    opt = LT.Adafactor([c])
    c.grad = torch.ones_like(c)
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        opt.step()
    assert torch.equal(c.detach(), torch.zeros_like(c)) and len(opt.state) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "Learning rate should be >= 0 but is: -1.0"),
    (dict(beta2_decay=0.5), "beta2_decay should be <= 0 but is: 0.5"),
    (dict(eps=(-1e-30, 1e-3)), "epsilon1 should be >= 0 but is: -1e-30"),
    (dict(eps=(None, -1.0)), "epsilon2 should be >= 0 but is: -1.0"),
    (dict(d=0.5), "Clipping threshold d should be >= 1 but is: 0.5"),
    (dict(weight_decay=-0.1), "weight_decay should be >= 0 but is: -0.1"),
])
def test_bad_hyper_parameters_have_torchs_messages(kwargs, message):
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    for cls in (torch.optim.Adafactor, LT.Adafactor):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            cls([torch.zeros(2, requires_grad=True)], **kwargs)
    w = np.ones((3, 2))
    with pytest.raises(ValueError, match=message):
        lrfast.Adafactor([w], **kwargs)
    # a class that exists keeps its values after a refused change
    opt = lrfast.Adafactor([w])
    if "lr" in kwargs:
        with pytest.raises(ValueError, match=message):
            opt.lr = kwargs["lr"]
        assert opt.lr == 1e-2


# ------------------------------------------------------------------------------------------
# The NumPy class and lrfast.functional against lrfast.reference
# ------------------------------------------------------------------------------------------

def _state(shapes, dtype):
    rows = [np.zeros(s[:-1] + (1,), dtype) if len(s) >= 2 else None for s in shapes]
    cols = [np.zeros(s[:-2] + (1, s[-1]), dtype) if len(s) >= 2 else None for s in shapes]
    var = [np.zeros(s, dtype) if len(s) < 2 else None for s in shapes]
    return rows, cols, var


@pytest.mark.parametrize("hyper", [{}, GROUP2], ids=["defaults", "options"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_class_and_functional_match_the_reference(dtype, hyper):
    shapes = SMALL[:8] + LARGE + [(0,), (0, 3)]
    params = _params(shapes, dtype)
    fparams = [p.copy() for p in params]
    rparams = [p.copy() for p in params]
    opt = lrfast.Adafactor(params, **hyper)
    fstate, rstate = _state(shapes, dtype), _state(shapes, dtype)
    flat = dict(hyper)
    eps1, eps2 = flat.pop("eps", (None, 1e-3))
    flat.update(eps1=eps1, eps2=eps2, lr=flat.get("lr", 1e-2))
    rng = np.random.default_rng(3)
    for t in range(1, 21):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        assert opt.step(grads)
        F.adafactor_(fparams, grads, *fstate, step=t, **flat)
        R.adafactor_(rparams, grads, *rstate, step=t, **flat)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    sd = opt.state_dict()["state"]
    for k, s in enumerate(shapes):
        np.testing.assert_allclose(params[k], rparams[k], err_msg=f"param {k}", **tol)
        np.testing.assert_allclose(fparams[k], rparams[k], err_msg=f"functional {k}", **tol)
        names = ("row_var", "col_var") if len(s) >= 2 else ("variance",)
        assert set(sd[k]) == set(names)
        for n, ref, fun in zip(("row_var", "col_var", "variance"), rstate, fstate):
            if ref[k] is None:
                continue
            np.testing.assert_allclose(sd[k][n], ref[k], err_msg=f"{n} {k}", **tol)
            np.testing.assert_allclose(fun[k], ref[k], err_msg=f"functional {n} {k}", **tol)
    # empty params are left alone (torch divides by their size)
    assert params[-1].size == 0 and sd[len(shapes) - 1]["col_var"].shape == (1, 3)


def test_hand_computed_first_step_of_a_matrix():
    # g = [[1, 2], [3, 4]]: row means of g^2 (2.5, 12.5), column means (5, 10), mean of the
    # rows 7.5, so V = R C / 7.5 = [[5/3, 10/3], [25/3, 50/3]] and U = g / sqrt(V); at the
    # first step (weight 1) the averages are the means themselves.
    w = np.array([[1.0, -1.0], [2.0, 0.5]])
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    v = np.array([[5 / 3, 10 / 3], [25 / 3, 50 / 3]])
    u = g / np.sqrt(v)
    rms_u = np.sqrt(np.mean(u * u))
    alpha = max(1e-3, np.sqrt(np.mean(w * w))) * min(0.01, 1.0)
    expected = w - alpha / max(1.0, rms_u) * u
    opt = lrfast.Adafactor([w])
    opt.step([g])
    np.testing.assert_allclose(w, expected, rtol=1e-14)
    sd = opt.state_dict()["state"][0]
    np.testing.assert_allclose(sd["row_var"], [[2.5], [12.5]], rtol=1e-15)
    np.testing.assert_allclose(sd["col_var"], [[5.0, 10.0]], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_the_number_of_threads(dtype):
    shapes = LARGE + [(2, 600, 300), (130_001,)] + SMALL[:8]
    runs = []
    for nthreads in (1, 2, 3):
        params = _params(shapes, dtype)
        with environment(_dispatch.name, nthreads, 1):
            opt = lrfast.Adafactor(params, **GROUP2)
            assert opt._af_plans[0][2].units > nthreads  # the work is cut into units
            rng = np.random.default_rng(4)
            for _ in range(5):
                opt.step([rng.standard_normal(s).astype(dtype) for s in shapes])
        runs.append(snapshot(opt))
    assert runs[0] == runs[1] == runs[2]


def test_grad_scale_and_skip_nonfinite():
    shapes = [(3, 4), (5,)]
    a, b = _params(shapes, np.float64), _params(shapes, np.float64)
    oa = lrfast.Adafactor(a, skip_nonfinite=True)
    ob = lrfast.Adafactor(b)
    rng = np.random.default_rng(5)
    for _ in range(3):
        g = [rng.standard_normal(s) for s in shapes]
        assert oa.step([x * 1024.0 for x in g], grad_scale=1024.0)
        assert ob.step(g)
    assert snapshot(oa)[:2] == snapshot(ob)[:2]
    before = snapshot(oa)
    bad = [np.ones((3, 4)), np.array([1.0, np.nan, 0, 0, 0])]
    assert oa.step(bad) is False and oa.skipped_steps == 1
    assert snapshot(oa) == before


def test_numpy_state_dict_round_trip_and_bad_loads():
    shapes = [(3, 4), (5,), (2, 2, 3)]
    a, b = _params(shapes, np.float32), _params(shapes, np.float32, seed=9)
    oa = lrfast.Adafactor(a, lr=0.05)
    rng = np.random.default_rng(6)
    for _ in range(3):
        oa.step([rng.standard_normal(s).astype(np.float32) for s in shapes])
    ob = lrfast.Adafactor(b, lr=0.05)
    for x, y in zip(b, a):
        x[...] = y
    ob.load_state_dict(oa.state_dict())
    g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    oa.step(g)
    ob.step(g)
    assert snapshot(oa) == snapshot(ob)
    sd = ob.state_dict()
    sd["state"][0]["row_var"] = np.zeros((3, 4), np.float32)
    before = snapshot(ob)
    with pytest.raises(ValueError, match=r"must be \(3, 1\)"):
        ob.load_state_dict(sd)
    sd = ob.state_dict()
    sd["state"][1]["row_var"] = np.zeros((5, 1), np.float32)
    with pytest.raises(ValueError, match="must hold"):
        ob.load_state_dict(sd)
    assert snapshot(ob) == before


def test_bad_inputs_change_nothing():
    w = [np.ones((3, 4), np.float32), np.ones(5, np.float32)]
    opt = lrfast.Adafactor(w)
    opt.step([np.ones((3, 4), np.float32), np.ones(5, np.float32)])
    before = snapshot(opt)
    bad = [
        ([np.ones((3, 4), np.float64), np.ones(5, np.float32)], TypeError, "dtype"),
        ([np.ones((4, 3), np.float32), np.ones(5, np.float32)], ValueError, "shape"),
        ([np.ones((4, 3), np.float32).T, np.ones(5, np.float32)], ValueError, "contiguous"),
        ([w[0], np.ones(5, np.float32)], ValueError, "shares memory"),
        ([np.ones((3, 4), np.float32)], ValueError, "expected 2 grads"),
    ]
    for grads, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            opt.step(grads)
        assert snapshot(opt) == before
    with pytest.raises(TypeError, match="float32 and float64"):
        lrfast.Adafactor([np.ones(3, np.float16)])
    with pytest.raises(ValueError, match="half twin"):
        lrfast.Adafactor(FlatParams({"a": (3, 4)}, dtype=np.float32, half=np.float16))
    with pytest.raises(ValueError, match="half_out"):
        lrfast.Adafactor([np.ones(3, np.float32)], half_out=[np.ones(3, np.float16)])


def test_flat_params_are_updated_through_their_named_views():
    shapes = {"w": (6, 5), "b": (5,), "s": ()}
    flat = FlatParams(shapes, dtype=np.float64)
    lists = _params(list(shapes.values()), np.float64)
    flat.assign(dict(zip(shapes, [x.copy() for x in lists])))
    of, ol = lrfast.Adafactor(flat, lr=0.05), lrfast.Adafactor(lists, lr=0.05)
    rng = np.random.default_rng(8)
    for _ in range(4):
        g = [rng.standard_normal(s) for s in shapes.values()]
        for k, x in zip(shapes, g):
            flat.grads[k][...] = x
        of.step()
        ol.step(g)
    for k, x in zip(shapes, lists):
        assert np.array_equal(flat.params[k], x)
    sd = of.state_dict()["state"]
    assert sd["w"]["row_var"].shape == (6, 1) and set(sd["b"]) == {"variance"}
    with pytest.raises(TypeError, match="grad buffer"):
        of.step([np.zeros(s) for s in shapes.values()])


def test_functional_bad_buffers_change_nothing():
    p, g = np.ones((3, 4)), np.ones((3, 4))
    r, c = np.zeros((3, 1)), np.zeros((1, 4))
    with pytest.raises(ValueError, match="needs row_var"):
        F.adafactor_(p, g, None, c, None, step=1, lr=0.01)
    with pytest.raises(ValueError, match=r"col_var must be float64 of shape \(1, 4\)"):
        F.adafactor_(p, g, r, np.zeros((3, 4)), None, step=1, lr=0.01)
    with pytest.raises(ValueError, match="variance must be None"):
        F.adafactor_(p, g, r, c, np.zeros((3, 4)), step=1, lr=0.01)
    assert (p == 1).all() and (r == 0).all() and (c == 0).all()
