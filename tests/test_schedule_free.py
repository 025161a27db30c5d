"""Schedule-free AdamW and SGD: lrfast.torch against the schedulefree package (params, every
state buffer and group entry, through eval()/train() cycles; state dicts both ways), the NumPy
classes against lrfast.reference (with the train/eval swaps and a schedule driving lr), bad
inputs, skipped steps, state dicts and checkpoints. The peer tests skip without schedulefree
(or torch)."""
import copy
import math

import numpy as np
import pytest

import lrfast
from lrfast import functional as F
from lrfast import reference as R

from cases import make_grads, make_params, snapshot

NAMES = ["AdamWScheduleFree", "SGDScheduleFree"]

# One group at the defaults but lr; the other with warmup, weight decay, r and
# weight_lr_power all away from their defaults.
GROUP_OPTIONS = {
    "AdamWScheduleFree": (dict(lr=0.01),
                          dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
                               warmup_steps=10, r=0.5, weight_lr_power=1.0)),
    "SGDScheduleFree": (dict(lr=0.05),
                        dict(lr=0.1, momentum=0.6, weight_decay=0.02, warmup_steps=10,
                             r=0.5, weight_lr_power=3.0)),
}
STEPS = 60
SWAP_AT = 25  # eval(), compare x, train() again
RTOL = {np.float64: 1e-10, np.float32: 1e-5}
ATOL = {np.float64: 1e-12, np.float32: 1e-6}


def _peer(name):
    pytest.importorskip("torch")
    try:
        from lrfast._bench.peer_imports import schedule_free
        return schedule_free(name)
    except ImportError:
        pytest.skip("schedulefree is not installed")


def _model_shapes():
    """120 tensors of assorted sizes (a few empty, one split over threads)."""
    rng = np.random.default_rng(11)
    shapes = []
    for i in range(120):
        kind = i % 6
        if kind == 0:
            shapes.append((int(rng.integers(1, 40)),))
        elif kind == 1:
            shapes.append((int(rng.integers(1, 9)), int(rng.integers(1, 9))))
        elif kind == 2:
            shapes.append((3, 2, int(rng.integers(1, 5))))
        elif kind == 3:
            shapes.append((0,) if i % 24 == 3 else (1,))
        elif kind == 4:
            shapes.append((int(rng.integers(50, 300)),))
        else:
            shapes.append((7, 13))
    shapes[5] = (40_003,)
    return shapes


def _close(actual, desired, dtype, msg):
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = max(1.0, float(np.abs(desired).max())) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=RTOL[dtype], atol=ATOL[dtype] * scale,
                               err_msg=msg)


def _rel_err(a, b):
    """max |a - b| / max |b| (the error relative to the array's scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or not np.abs(b).max():
        return 0.0
    return float(np.max(np.abs(a - b)) / np.abs(b).max())


def _torch_pair(name, dtype, foreach):
    """(lrfast.torch optimizer, its params, schedulefree optimizer, its params) over the same
    two-group model."""
    peer = _peer(name)  # skips first when torch or schedulefree is missing
    import torch

    import lrfast.torch as LT

    start = make_params(_model_shapes(), dtype, seed=3)
    ours = [torch.tensor(x.copy(), requires_grad=True) for x in start]
    theirs = [torch.tensor(x.copy(), requires_grad=True) for x in start]
    g0, g1 = GROUP_OPTIONS[name]
    half = len(start) // 2

    def groups(ps):
        return [dict(params=ps[:half], **g0), dict(params=ps[half:], **g1)]

    return (getattr(LT, name)(groups(ours), foreach=foreach), ours,
            peer(groups(theirs), foreach=foreach), theirs)


def _set_grads(params_a, params_b, rng, step):
    import torch

    for i, (a, b) in enumerate(zip(params_a, params_b)):
        if i == 7 and step % 3 == 1:  # a param without a gradient at some steps
            a.grad = b.grad = None
            continue
        g = rng.standard_normal(tuple(a.shape)) * (1 + 0.1 * (i % 5))
        a.grad = torch.tensor(g, dtype=a.dtype)
        b.grad = torch.tensor(g, dtype=b.dtype)  # (the package divides its grad in place)


def _compare(opt, params, peer, peer_params, dtype, where, errors=None):
    """Params, every state buffer and every group entry."""
    for k, (p, q) in enumerate(zip(params, peer_params)):
        _close(p.detach().numpy(), q.detach().numpy(), dtype, f"{where}: param {k}")
        if errors is not None:
            errors.append(_rel_err(p.detach().numpy(), q.detach().numpy()))
        mine, theirs = opt.state.get(p, {}), peer.state.get(q, {})
        assert set(mine) == set(theirs), (k, sorted(mine), sorted(theirs))
        for n in theirs:
            _close(mine[n].numpy(), theirs[n].numpy(), dtype, f"{where}: {n}[{k}]")
            if errors is not None:
                errors.append(_rel_err(mine[n].numpy(), theirs[n].numpy()))
    for gi, (g, h) in enumerate(zip(opt.param_groups, peer.param_groups)):
        # the package's entries, in its order ("params" sits where torch's load puts it)
        assert [k for k in g if k != "params"] == [k for k in h if k != "params"], (gi, g, h)
        for key in h:
            if key != "params":
                assert g[key] == h[key], (where, gi, key, g[key], h[key])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_torch_class_matches_schedulefree(name, dtype, foreach):
    opt, params, peer, peer_params = _torch_pair(name, dtype, foreach)
    # the package's groups, state names and mode: in eval mode until train()
    assert opt.param_groups[0]["train_mode"] is False
    with pytest.raises(Exception, match="not in train mode"):
        opt.step()
    opt.train()
    peer.train()
    rng = np.random.default_rng(5)
    errors: list = []
    for step in range(STEPS):
        _set_grads(params, peer_params, rng, step)
        opt.step()
        peer.step()
        if step == SWAP_AT:
            opt.eval()
            peer.eval()
            _compare(opt, params, peer, peer_params, dtype, f"eval at step {step}", errors)
            opt.eval()  # a second eval() changes nothing
            peer.eval()
            opt.train()
            peer.train()
            _compare(opt, params, peer, peer_params, dtype, f"train at step {step}")
    _compare(opt, params, peer, peer_params, dtype, "after the steps (y)", errors)
    opt.eval()
    peer.eval()
    _compare(opt, params, peer, peer_params, dtype, "at the end, eval mode (x)", errors)
    assert opt.param_groups[1]["k"] == STEPS
    print(f"{name} {np.dtype(dtype).name} foreach={foreach}: max relative error "
          f"{max(errors):.3g}")


@pytest.mark.parametrize("name", NAMES)
def test_schedulefree_state_dict_loads_into_lrfast_torch_and_back(name):
    torch = pytest.importorskip("torch")

    dtype = np.float64
    opt, params, peer, peer_params = _torch_pair(name, dtype, True)
    opt.train()
    peer.train()
    rng = np.random.default_rng(9)
    for step in range(8):
        _set_grads(params, peer_params, rng, step)
        peer.step()
    peer.eval()
    # lrfast.torch takes the package's state dict (and its params, saved in eval mode)
    with torch.no_grad():
        for p, q in zip(params, peer_params):
            p.copy_(q)
    # (deep copies: torch's load keeps the very tensors of a live optimizer's state dict)
    opt.load_state_dict(copy.deepcopy(peer.state_dict()))
    _compare(opt, params, peer, peer_params, dtype, "loaded from schedulefree")
    mine, theirs = opt.state_dict(), peer.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for i in theirs["state"]:
        assert mine["state"][i].keys() == theirs["state"][i].keys()
    opt.train()
    peer.train()
    for step in range(8, 14):
        _set_grads(params, peer_params, rng, step)
        opt.step()
        peer.step()
    _compare(opt, params, peer, peer_params, dtype, "stepped on after the load")
    # and back: the package takes lrfast.torch's state dict
    opt.eval()
    peer2_params = [torch.tensor(p.detach().numpy().copy(), requires_grad=True) for p in params]
    half = len(peer2_params) // 2
    g0, g1 = GROUP_OPTIONS[name]
    peer2 = type(peer)([dict(params=peer2_params[:half], **g0),
                        dict(params=peer2_params[half:], **g1)])
    peer2.load_state_dict(copy.deepcopy(opt.state_dict()))
    peer.eval()
    opt.train()
    peer2.train()
    for step in range(14, 20):
        _set_grads(params, peer2_params, rng, step)
        opt.step()
        peer2.step()
    _compare(opt, params, peer2, peer2_params, dtype, "the package stepped on from ours")


def _reference_run(name, hyper, params, grads_per_step, lr_of, swaps):
    """lrfast.reference's schedule-free steps, with eval()/train() at the steps in
    ``swaps``; returns (params, z, exp_avg_sq or None, lr_max, weight_sum)."""
    update = lrfast._specs.OPTIMIZERS[name].update
    h = lrfast._specs.OPTIMIZERS[name].validate(hyper)
    beta = h.get("beta1", h.get("momentum"))
    params = [p.copy() for p in params]
    z = [p.copy() for p in params]
    v = [np.zeros_like(p) for p in params] if update.name == "adamw_schedule_free" else None
    lr_max, weight_sum = -1.0, 0.0
    for k, grads in enumerate(grads_per_step):
        s = R.schedule_free_values(k, lr_of(k), warmup_steps=h["warmup_steps"], r=h["r"],
                                   weight_lr_power=h["weight_lr_power"], lr_max=lr_max,
                                   weight_sum=weight_sum)
        lr_max, weight_sum = s["lr_max"], s["weight_sum"]
        if v is not None:
            R.adamw_schedule_free_(params, grads, z, v, step=k + 1, ckp1=s["ckp1"], lr=s["lr"],
                                   beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
                                   weight_decay=h["weight_decay"])
        else:
            R.sgd_schedule_free_(params, grads, z, ckp1=s["ckp1"], lr=s["lr"],
                                 momentum=h["momentum"], weight_decay=h["weight_decay"])
        if k in swaps:
            R.schedule_free_interpolate_(params, z, 1 - 1 / beta)
            R.schedule_free_interpolate_(params, z, 1 - beta)
    R.schedule_free_interpolate_(params, z, 1 - 1 / beta)
    return params, z, v, lr_max, weight_sum


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_numpy_class_matches_reference_with_swaps_and_a_schedule(name, dtype):
    """A schedule drives lr (the warmup applies on top), eval()/train() in the middle, eval
    mode at the end: params, z, exp_avg_sq and the group scalars as lrfast.reference's."""
    shapes = [(0,), (1,), (33,), (4, 5), (70_001,)]
    hyper = dict(GROUP_OPTIONS[name][1])
    schedule = lrfast.schedules.cosine_decay(hyper["lr"], 40)
    hyper["lr"] = schedule
    params = make_params(shapes, dtype)
    start = [p.copy() for p in params]
    opt = getattr(lrfast, name)(params, **hyper)
    rng = np.random.default_rng(2)
    all_grads = [make_grads(shapes, dtype, rng) for _ in range(40)]
    for k, grads in enumerate(all_grads):
        assert opt.step(grads)
        if k in (12, 30):
            opt.eval()
            assert not opt.train_mode
            opt.train()
    opt.eval()
    ref_params, z, v, lr_max, weight_sum = _reference_run(
        name, hyper, start, all_grads, lambda k: float(schedule(k)), {12, 30})
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    sd = opt.state_dict()
    for k in range(len(shapes)):
        np.testing.assert_allclose(params[k], ref_params[k], err_msg=f"param {k}", **tol)
        np.testing.assert_allclose(sd["state"][k]["z"], z[k], err_msg=f"z {k}", **tol)
        if v is not None:
            np.testing.assert_allclose(sd["state"][k]["exp_avg_sq"], v[k], **tol)
    assert sd["schedule_free"]["lr_max"] == lr_max
    assert sd["schedule_free"]["weight_sum"] == weight_sum
    assert sd["schedule_free"]["train_mode"] is False


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_half_params_swap_as_the_reference_rounds(storage):
    """eval() on float16/bfloat16 params with float32 z: float32 lerp, rounded to nearest."""
    if storage == "bfloat16":
        params = [R.narrow(x.ravel(), "bfloat16").reshape(x.shape)
                  for x in make_params([(300,), (7, 5)], np.float32)]
        kwargs = dict(bfloat16_bits=True)
    else:
        params = [x.astype(np.float16) for x in make_params([(300,), (7, 5)], np.float32)]
        kwargs = {}
    opt = lrfast.AdamWScheduleFree(params, lr=0.05, state_dtype="float32", **kwargs)
    rng = np.random.default_rng(4)
    for _ in range(5):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        grads = [R.narrow(g.ravel(), storage).reshape(g.shape) if storage == "bfloat16"
                 else g.astype(np.float16) for g in grads]
        opt.step(grads)
    before = [p.copy() for p in params]
    z = [a.copy() for a in (opt.state_dict()["state"][k]["z"] for k in range(2))]
    opt.eval()
    expected = [b.view(np.uint16).copy() for b in before]
    R.mixed_(R.schedule_free_interpolate_, {"param": expected, "z": z},
             {"param": storage, "z": "float32"}, step=1, weight=1 - 1 / 0.9)
    for p, e in zip(params, expected):
        assert np.array_equal(p.view(np.uint16), e)


def test_flat_params_and_half_twin_follow_eval():
    flat = lrfast.FlatParams({"w": (3, 4), "b": (5,)}, init={"w": np.ones((3, 4))},
                             half="float16")
    opt = lrfast.SGDScheduleFree(flat, lr=0.1)
    rng = np.random.default_rng(0)
    for _ in range(4):
        flat.grad[...] = rng.standard_normal(flat.grad.shape)
        opt.step()
    y = flat.param.copy()
    z = opt.state_dict()["state"]["w"]["z"]
    opt.eval()
    expected = y[:12].reshape(3, 4).copy()
    R.schedule_free_interpolate_(expected, z.copy(), 1 - 1 / 0.9)
    np.testing.assert_array_equal(flat.params["w"], expected)
    np.testing.assert_array_equal(flat.half, flat.param.astype(np.float16))


@pytest.mark.parametrize("name", NAMES)
def test_step_in_eval_mode_is_refused_and_changes_nothing(name):
    params = make_params([(5,), (2, 3)], np.float64)
    opt = getattr(lrfast, name)(params, lr=0.1)
    grads = [np.ones_like(p) for p in params]
    opt.step(grads)
    opt.eval()
    before = snapshot(opt), opt.state_dict()["schedule_free"]
    with pytest.raises(RuntimeError, match="not in train mode when step is called"):
        opt.step(grads)
    assert snapshot(opt) == before[0]
    assert opt.state_dict()["schedule_free"] == before[1]


@pytest.mark.parametrize("name", NAMES)
def test_skipped_nonfinite_step_changes_nothing_not_even_the_group_scalars(name):
    shapes = [(6,), (3, 4)]
    a = getattr(lrfast, name)(make_params(shapes, np.float64), lr=0.1, warmup_steps=3,
                              skip_nonfinite=True)
    b = getattr(lrfast, name)(make_params(shapes, np.float64), lr=0.1, warmup_steps=3)
    rng = np.random.default_rng(3)
    g = make_grads(shapes, np.float64, rng)
    a.step(g)
    b.step(g)
    sd = a.state_dict()
    bad = [x.copy() for x in make_grads(shapes, np.float64, rng)]
    bad[1][2, 1] = np.nan
    assert a.step(bad) is False
    after = a.state_dict()
    assert after["schedule_free"] == sd["schedule_free"]
    assert after["step_count"] == 1 and a.skipped_steps == 1
    for k in sd["state"]:
        for n in sd["state"][k]:
            np.testing.assert_array_equal(after["state"][k][n], sd["state"][k][n])
    g = make_grads(shapes, np.float64, rng)
    a.step(g)
    b.step(g)
    for p, q in zip(a.params, b.params):
        np.testing.assert_array_equal(p, q)
    assert a.state_dict()["schedule_free"] == b.state_dict()["schedule_free"]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_checkpoint_round_trips(name, tmp_path):
    shapes = [(6,), (3, 4)]
    hyper = dict(lr=0.1, warmup_steps=4, r=0.5)
    straight = getattr(lrfast, name)(make_params(shapes, np.float64), **hyper)
    first = getattr(lrfast, name)(make_params(shapes, np.float64), **hyper)
    rng = np.random.default_rng(8)
    grads = [make_grads(shapes, np.float64, rng) for _ in range(10)]
    for g in grads[:5]:
        straight.step(g)
        first.step(g)
    first.eval()
    sd = first.state_dict()
    lrfast.save_checkpoint(tmp_path / "sf.npz", first)
    for how in ("state_dict", "checkpoint"):
        params = [p.copy() for p in first.params]
        second = getattr(lrfast, name)(params, **hyper)
        if how == "state_dict":
            second.load_state_dict(sd)
        else:
            lrfast.load_checkpoint(tmp_path / "sf.npz", second)
            np.testing.assert_array_equal(params[0], first.params[0])
        assert second.state_dict()["schedule_free"] == sd["schedule_free"]
        assert not second.train_mode
        second.train()
        copy = [g for g in grads[5:]]
        for g in copy:
            second.step(g)
        if how == "state_dict":
            for g in grads[5:]:
                straight.step(g)
        for p, q in zip(second.params, straight.params):
            np.testing.assert_allclose(p, q, rtol=1e-14, atol=1e-15)


BAD_ARGUMENTS = [
    ("AdamWScheduleFree", dict(lr=-1.0), ValueError, "Invalid learning rate"),
    ("AdamWScheduleFree", dict(betas=(0.0, 0.999)), ValueError, "index 0"),
    ("AdamWScheduleFree", dict(betas=(1.0, 0.999)), ValueError, "index 0"),
    ("AdamWScheduleFree", dict(betas=(0.9, 1.0)), ValueError, "index 1"),
    ("AdamWScheduleFree", dict(eps=-1e-8), ValueError, "Invalid epsilon"),
    ("AdamWScheduleFree", dict(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
    ("AdamWScheduleFree", dict(warmup_steps=-1), ValueError, "warmup_steps"),
    ("AdamWScheduleFree", dict(warmup_steps=2.5), TypeError, "warmup_steps"),
    ("AdamWScheduleFree", dict(warmup_steps=True), TypeError, "warmup_steps"),
    ("AdamWScheduleFree", dict(r=math.nan), ValueError, "r value"),
    ("AdamWScheduleFree", dict(weight_lr_power=-1.0), ValueError, "weight_lr_power"),
    ("AdamWScheduleFree", dict(weight_lr_power="2"), TypeError, "weight_lr_power"),
    ("SGDScheduleFree", dict(lr=-0.5), ValueError, "Invalid learning rate"),
    ("SGDScheduleFree", dict(momentum=0.0), ValueError, "Momentum must be between 0 and 1"),
    ("SGDScheduleFree", dict(momentum=1.0), ValueError, "Momentum must be between 0 and 1"),
    ("SGDScheduleFree", dict(weight_decay=-1.0), ValueError, "Invalid weight_decay"),
    ("SGDScheduleFree", dict(warmup_steps=-3), ValueError, "warmup_steps"),
]


@pytest.mark.parametrize("name, kwargs, exc, pattern", BAD_ARGUMENTS,
                         ids=[f"{n}-{k}" for n, k, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_by_every_layer(name, kwargs, exc, pattern):
    p = np.ones(3)
    with pytest.raises(exc, match=pattern):
        getattr(lrfast, name)([p], **kwargs)
    try:
        import torch

        import lrfast.torch as LT
    except ImportError:
        return
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(exc, match=pattern):
        getattr(LT, name)([w], **kwargs)
    opt = getattr(LT, name)([w])
    with pytest.raises(exc, match=pattern):
        opt.add_param_group(dict(params=[torch.ones(2, requires_grad=True)], **kwargs))
    assert len(opt.param_groups) == 1


def test_bad_state_dicts_are_refused_and_change_nothing():
    params = make_params([(5,)], np.float64)
    opt = lrfast.AdamWScheduleFree(params, lr=0.1)
    opt.step([np.ones(5)])
    good = opt.state_dict()
    before = snapshot(opt), good["schedule_free"]
    for bad, pattern in [
        ({k: v for k, v in good.items() if k != "schedule_free"}, "schedule_free"),
        (dict(good, schedule_free=dict(good["schedule_free"], lr_max="x")), "lr_max"),
        (dict(good, schedule_free=dict(good["schedule_free"], weight_sum=math.inf)),
         "weight_sum"),
        (dict(good, schedule_free=dict(good["schedule_free"], train_mode=1)), "train_mode"),
    ]:
        with pytest.raises((TypeError, ValueError), match=pattern):
            opt.load_state_dict(bad)
        assert snapshot(opt) == before[0]
        assert opt.state_dict()["schedule_free"] == before[1]


def test_torch_bad_group_entries_are_refused_and_change_nothing():
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    w = torch.ones(4, requires_grad=True)
    opt = LT.SGDScheduleFree([w], lr=0.1)
    opt.train()
    w.grad = torch.ones(4)
    opt.step()
    good = opt.state_dict()
    for key, value in [("k", -1), ("k", 1.5), ("weight_sum", "x"), ("train_mode", None)]:
        bad = {"state": good["state"],
               "param_groups": [dict(good["param_groups"][0], **{key: value})]}
        with pytest.raises(ValueError, match=key):
            opt.load_state_dict(bad)
        assert opt.param_groups[0]["k"] == 1 and opt.param_groups[0]["train_mode"] is True
    opt.eval()
    with pytest.raises(Exception, match="not in train mode"):
        opt.step()
    assert opt.param_groups[0]["k"] == 1


def test_functional_needs_the_per_step_values():
    p, g, z, v = np.ones(3), np.ones(3), np.ones(3), np.zeros(3)
    with pytest.raises(TypeError, match="ckp1"):
        F.adamw_schedule_free_(p, g, z, v, step=1, lr=0.1)
    with pytest.raises(TypeError, match="ckp1"):
        F.sgd_schedule_free_(p, g, z, lr=0.1, ckp1="half")
    assert p.tolist() == [1.0, 1.0, 1.0] and z.tolist() == [1.0, 1.0, 1.0]
    # the first step (ckp1 = 1) moves y and z together by -lr * g
    F.sgd_schedule_free_(p, g, z, lr=0.25, ckp1=1.0)
    assert p.tolist() == [0.75] * 3 and z.tolist() == [0.75] * 3


def test_schedule_free_values_by_hand():
    """Warmup 4, lr 0.2, r = 1, weight_lr_power = 2: lr_k = 0.05, 0.1, weights 1 * 0.05^2 and
    2 * 0.1^2, so ckp1 = 1, then 0.02 / 0.0225."""
    s = R.schedule_free_values(0, 0.2, warmup_steps=4, r=1.0, weight_lr_power=2.0)
    assert s["lr"] == pytest.approx(0.05) and s["ckp1"] == 1.0
    s = R.schedule_free_values(1, 0.2, warmup_steps=4, r=1.0, weight_lr_power=2.0,
                               lr_max=s["lr_max"], weight_sum=s["weight_sum"])
    assert s["lr"] == pytest.approx(0.1)
    assert s["ckp1"] == pytest.approx(0.02 / 0.0225)
    # lr = 0 with weight_lr_power > 0: no weight at all, ckp1 = 0 (the package's fallback)
    assert R.schedule_free_values(0, 0.0)["ckp1"] == 0.0
