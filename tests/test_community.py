"""Lion and ADOPT, the updates from outside torch.optim, against their reference packages:
lion-pytorch's ``Lion`` and timm's ``Adopt`` (parity over many steps, signatures, state dicts
both ways), optax's ``lion`` (its conventions mapped onto lion-pytorch's), and bad inputs.

The peers' tests skip when the peer is not installed."""
from __future__ import annotations

import contextlib
import copy
import inspect

import numpy as np
import pytest

import lrfast
from lrfast import functional, reference

torch = pytest.importorskip("torch")
import lrfast.torch as LT  # noqa: E402
from lrfast._bench import peer_imports  # noqa: E402

STEPS = 60
NTENSORS = 120
LRFAST_KEYWORDS = ("state_dtype", "rounding", "seed", "ema")  # lrfast.torch's own options


def _lion_peer():
    try:
        return peer_imports.lion()
    except ImportError:
        pytest.skip("lion-pytorch is not installed")


def _adopt_peer():
    try:
        return peer_imports.timm_optimizer("Adopt")
    except ImportError:
        pytest.skip("timm is not installed")


@contextlib.contextmanager
def _default_dtype(dtype):
    # The peers keep scalars (timm's step) in the default dtype: float64 runs use float64.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == torch.float64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _shapes():
    # 120 tensors of 1 to 40 elements, vectors, matrices and 3-d
    out = []
    for k in range(NTENSORS):
        if k % 3 == 0:
            out.append((1 + k % 13,))
        elif k % 3 == 1:
            out.append((1 + k % 5, 1 + k % 7))
        else:
            out.append((2, 1 + k % 3, 1 + k % 4))
    return out


def _twin_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in _shapes()]
    return ([torch.nn.Parameter(t.clone()) for t in base],
            [torch.nn.Parameter(t.clone()) for t in base])


def _set_grads(pa, pb, gen, step, absent=None):
    """The same random gradient on both twins; ``absent(step, k)``: param k has none."""
    for k, (a, b) in enumerate(zip(pa, pb)):
        if absent is not None and absent(step, k):
            a.grad = b.grad = None
            continue
        g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
        a.grad = g.clone()
        b.grad = g.clone()


def _max_rel(x, y):
    """max |x - y| / max(|y|, 1e-3): the relative error, but for values near 0 (whose
    relative error says nothing) the absolute error over 1e-3."""
    x = x.double()
    y = y.double()
    return float(((x - y).abs() / y.abs().clamp(min=1e-3)).max()) if x.numel() else 0.0


def _assert_same(ours, peer, pa, pb, dtype):
    """Params and every state entry of ``ours`` (on ``pb``) against ``peer``'s (on ``pa``);
    returns the largest relative difference."""
    tol = _tolerance(dtype)
    worst = 0.0
    for k, (a, b) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(b.detach(), a.detach(), msg=lambda m: f"param {k}: {m}", **tol)
        worst = max(worst, _max_rel(b.detach(), a.detach()))
        sa, sb = peer.state.get(a, {}), ours.state.get(b, {})
        assert set(sb) == set(sa), (k, sorted(sb), sorted(sa))
        for name in sa:
            if name == "step":
                assert float(sb[name]) == float(sa[name]), (k, name)
                assert sb[name].dtype == sa[name].dtype, (k, name)
                continue
            torch.testing.assert_close(sb[name], sa[name], msg=lambda m: f"{name}[{k}]: {m}",
                                       **tol)
            worst = max(worst, _max_rel(sb[name], sa[name]))
    return worst


def _run(peer, ours, pa, pb, steps, seed=1, absent=None, first=0):
    gen = torch.Generator().manual_seed(seed)
    for step in range(first, first + steps):
        _set_grads(pa, pb, gen, step, absent)
        peer.step()
        ours.step()


# ------------------------------------------------------------------------------------------
# Signatures: the peer's, plus lrfast's keyword-only options
# ------------------------------------------------------------------------------------------

def _bare(sig):
    """Names, kinds and defaults, in order (the peers annotate, lrfast does not)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name,peer", [("Lion", _lion_peer), ("Adopt", _adopt_peer)])
def test_torch_signature_is_the_peers(name, peer):
    theirs = inspect.signature(peer())
    ours = inspect.signature(getattr(LT, name))
    params = list(ours.parameters.values())
    k = len(LRFAST_KEYWORDS)
    assert [p.name for p in params[-k:]] == list(LRFAST_KEYWORDS)
    assert all(p.kind is p.KEYWORD_ONLY for p in params[-k:])
    assert _bare(ours.replace(parameters=params[:-k])) == _bare(theirs)


# ------------------------------------------------------------------------------------------
# Parity with lion-pytorch
# ------------------------------------------------------------------------------------------

def _lion_groups(params):
    return [dict(params=params[:70], weight_decay=0.1),
            dict(params=params[70:], lr=3e-3, betas=(0.8, 0.95), weight_decay=0.02)]


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lion_matches_lion_pytorch(dtype, decoupled, record_property):
    Lion = _lion_peer()
    with _default_dtype(dtype):
        pa, pb = _twin_params(dtype)
        # the constructor's lr differs from the second group's: decoupled decay divides by it
        peer = Lion(_lion_groups(pa), lr=1e-3, decoupled_weight_decay=decoupled)
        ours = LT.Lion(_lion_groups(pb), lr=1e-3, decoupled_weight_decay=decoupled)
        _run(peer, ours, pa, pb, STEPS)
        worst = _assert_same(ours, peer, pa, pb, dtype)
    record_property("max_rel_error", worst)
    print(f"Lion {dtype} decoupled={decoupled}: max relative error {worst:.3g}")


def test_lion_follows_an_lr_schedule_as_lion_pytorch():
    """Decoupled decay is divided by the constructor's lr, whatever the group's lr becomes."""
    Lion = _lion_peer()
    pa, pb = _twin_params(torch.float64)
    peer = Lion(pa, lr=1e-2, weight_decay=0.3, decoupled_weight_decay=True)
    ours = LT.Lion(pb, lr=1e-2, weight_decay=0.3, decoupled_weight_decay=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        for opt in (peer, ours):
            opt.param_groups[0]["lr"] = 1e-2 * 0.7 ** step
        _set_grads(pa, pb, gen, step)
        peer.step()
        ours.step()
    _assert_same(ours, peer, pa, pb, torch.float64)


# ------------------------------------------------------------------------------------------
# Parity with timm's Adopt
# ------------------------------------------------------------------------------------------

def _adopt_groups(params, cautious=None):
    """Two groups of different options; ``cautious``: the group (0 or 1) with caution=True
    (the first's decay is coupled, so it enters the mask's g; the second maximizes)."""
    groups = [dict(params=params[:60], weight_decay=0.1),
              dict(params=params[60:], lr=2e-3, betas=(0.8, 0.99), eps=1e-8, clip_exp=None,
                   weight_decay=0.05, decoupled=True, corrected_weight_decay=True,
                   maximize=True)]
    if cautious is not None:
        groups[cautious]["caution"] = True
    return groups


def _absent(step, k):
    # some params get their first gradient late, and one skips steps: timm's first step
    # (and its clip) are per param
    return (k % 17 == 0 and step < 5) or (k == 7 and step % 4 == 2)


@pytest.mark.parametrize("cautious", [None, 0, 1], ids=["plain", "caution0", "caution1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adopt_matches_timm(dtype, cautious, record_property):
    """60 steps on 120 tensors in two groups, params that get their first gradient late;
    ``cautious``: the group with caution=True (its mask's mean is each tensor's own)."""
    Adopt = _adopt_peer()
    with _default_dtype(dtype):
        pa, pb = _twin_params(dtype)
        peer = Adopt(_adopt_groups(pa, cautious), lr=4e-3, foreach=False)
        ours = LT.Adopt(_adopt_groups(pb, cautious), lr=4e-3, foreach=False)
        _run(peer, ours, pa, pb, STEPS, absent=_absent)
        worst = _assert_same(ours, peer, pa, pb, dtype)
        # the group entries are timm's (max_lr_snapshot included)
        for ga, gb in zip(peer.param_groups, ours.param_groups):
            assert {k: v for k, v in ga.items() if k != "params"} == \
                {k: v for k, v in gb.items() if k != "params"}
    record_property("max_rel_error", worst)
    print(f"Adopt {dtype} cautious group {cautious}: max relative error {worst:.3g}")


def test_adopt_first_step_leaves_the_param():
    """timm's first step fills exp_avg_sq with the (decayed) squared gradient only."""
    Adopt = _adopt_peer()
    pa, pb = _twin_params(torch.float64)
    peer = Adopt(pa, lr=0.1, weight_decay=0.5)
    ours = LT.Adopt(pb, lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in pb]
    _run(peer, ours, pa, pb, 1)
    for p, q in zip(pb, before):
        assert torch.equal(p.detach(), q)
        assert not ours.state[p]["exp_avg"].any()
        expected = (p.grad + 0.5 * p.detach()) ** 2
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], expected, rtol=0, atol=0)
    _assert_same(ours, peer, pa, pb, torch.float64)


# ------------------------------------------------------------------------------------------
# State dicts: the peer's loads into lrfast.torch's class and back
# ------------------------------------------------------------------------------------------

def _round_trip(make_peer, make_ours, absent=None):
    dtype = torch.float64
    pa, pb = _twin_params(dtype)
    peer, ours = make_peer(pa), make_ours(pb)
    gen = torch.Generator().manual_seed(5)
    for step in range(6):
        _set_grads(pa, pb, gen, step, absent)
        peer.step()
    for a, b in zip(pa, pb):
        b.data.copy_(a.data)
    # (deep copies: a state dict holds the optimizer's own tensors, which load_state_dict
    # keeps when dtype and device agree)
    saved = copy.deepcopy(peer.state_dict())
    ours.load_state_dict(saved)
    assert ours.state_dict()["param_groups"] == saved["param_groups"]
    _assert_same(ours, peer, pa, pb, dtype)
    for step in range(6, 12):
        _set_grads(pa, pb, gen, step, absent)
        peer.step()
        ours.step()
    _assert_same(ours, peer, pa, pb, dtype)
    # ... and back: lrfast's state dict into a fresh peer
    pc = [torch.nn.Parameter(b.detach().clone()) for b in pb]
    again = make_peer(pc)
    again.load_state_dict(copy.deepcopy(ours.state_dict()))
    for step in range(12, 18):
        _set_grads(pc, pb, gen, step, absent)
        again.step()
        ours.step()
    _assert_same(ours, again, pc, pb, dtype)


def test_lion_state_dict_round_trip():
    Lion = _lion_peer()
    _round_trip(lambda p: Lion(_lion_groups(p), lr=1e-3, decoupled_weight_decay=True),
                lambda p: LT.Lion(_lion_groups(p), lr=1e-3, decoupled_weight_decay=True))


@pytest.mark.parametrize("cautious", [None, 1])
def test_adopt_state_dict_round_trip(cautious):
    Adopt = _adopt_peer()
    with _default_dtype(torch.float64):
        _round_trip(lambda p: Adopt(_adopt_groups(p, cautious), lr=4e-3, foreach=False),
                    lambda p: LT.Adopt(_adopt_groups(p, cautious), lr=4e-3, foreach=False),
                    absent=_absent)


def test_lion_keeps_its_options_through_pickling():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LT.Lion([w], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    twin = copy.deepcopy(opt)
    assert twin.decoupled_wd is True and twin._init_lr == 0.1
    w.grad = torch.ones(3, dtype=torch.float64)
    twin.param_groups[0]["params"][0].grad = w.grad.clone()
    opt.step()
    twin.step()
    # decay 1 - 0.1 * 0.5 / 0.1 = 0.5, then -0.1 * sign(0.1)
    assert torch.equal(w.detach(), torch.full((3,), 0.4, dtype=torch.float64))
    assert torch.equal(twin.param_groups[0]["params"][0].detach(), w.detach())


# ------------------------------------------------------------------------------------------
# optax's lion: the same update under its conventions
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoupled", [False, True])
def test_lion_matches_optax(decoupled):
    """optax.lion(learning_rate=lr, b1, b2, weight_decay=wd) is lion-pytorch's Lion(lr,
    betas=(b1, b2), weight_decay=wd): same roles of b1 and b2, the decay term lr*wd*p taken
    in the update. With a constant lr, decoupled_weight_decay=True is optax's wd / lr."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    lr, b1, b2, wd = 0.01, 0.8, 0.95, 0.3
    rng = np.random.default_rng(0)
    shapes = [(7,), (3, 5), (2, 2, 3)]
    params = [rng.standard_normal(s) for s in shapes]
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        tx = optax.lion(learning_rate=lr, b1=b1, b2=b2,
                        weight_decay=wd / lr if decoupled else wd)
        jparams = [jnp.asarray(p) for p in params]
        state = tx.init(jparams)
        ours = [p.copy() for p in params]
        opt = lrfast.Lion(ours, lr=lr, betas=(b1, b2), weight_decay=wd,
                          decoupled_weight_decay=decoupled)
        for _ in range(30):
            grads = [rng.standard_normal(s) for s in shapes]
            updates, state = tx.update([jnp.asarray(g) for g in grads], state, jparams)
            jparams = optax.apply_updates(jparams, updates)
            opt.step(grads)
        for a, b in zip(ours, jparams):
            # the decay is rounded in another order (p - lr*(s + wd*p) against
            # p*(1 - lr*wd) - lr*s): equal to rounding
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-12, atol=1e-14)
        mu = state[0].mu
        for a, b in zip(opt.state_dict()["state"].values(), mu):
            np.testing.assert_allclose(a["exp_avg"], np.asarray(b), rtol=1e-13, atol=1e-15)
    finally:
        jax.config.update("jax_enable_x64", x64)


# ------------------------------------------------------------------------------------------
# Bad inputs: a clear error, and nothing changed
# ------------------------------------------------------------------------------------------

LION_BAD = [
    (dict(lr=0.0), ValueError, "Invalid learning rate"),
    (dict(lr=-1e-3), ValueError, "Invalid learning rate"),
    (dict(betas=(1.5, 0.9)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
    (dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay must be a bool"),
]
ADOPT_BAD = [
    (dict(lr=-1e-3), ValueError, "Invalid learning rate"),
    (dict(eps=-1.0), ValueError, "Invalid epsilon value"),
    (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
    (dict(clip_exp="big"), TypeError, "clip_exp must be a real number"),
    (dict(clip_exp=float("inf")), ValueError, "Invalid clip_exp value"),
    (dict(caution="yes"), TypeError, "caution must be a bool"),
    (dict(maximize=1), TypeError, "maximize must be a bool"),
]


@pytest.mark.parametrize("bad,exc,match", LION_BAD)
def test_lion_bad_hyper_parameters(bad, exc, match):
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(exc, match=match):
        LT.Lion([w], **bad)
    with pytest.raises(exc, match=match):
        lrfast.Lion([np.ones(3, np.float32)], **{"lr": 1e-3, **bad})
    _functional_unchanged("lion_", bad)
    if "decoupled_weight_decay" not in bad:  # (the optimizer's, not a group's: as lion-pytorch)
        _group_not_added(LT.Lion, bad)


@pytest.mark.parametrize("bad,exc,match", ADOPT_BAD)
def test_adopt_bad_hyper_parameters(bad, exc, match):
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(exc, match=match):
        LT.Adopt([w], **bad)
    with pytest.raises(exc, match=match):
        lrfast.Adopt([np.ones(3, np.float32)], **bad)
    _functional_unchanged("adopt_", bad)
    _group_not_added(LT.Adopt, bad)


def _functional_unchanged(name, bad):
    update = {"lion_": "lion", "adopt_": "adopt"}[name]
    from lrfast._specs import UPDATES

    spec = UPDATES[update]
    raw = dict(bad)
    if "betas" in raw:
        raw["beta1"], raw["beta2"] = raw.pop("betas")
    p = np.ones(4)
    g = np.full(4, 0.5)
    bufs = [np.full(4, 0.25) for _ in spec.buffers]
    kwargs = {"lr": raw.pop("lr", 1e-3), **raw}
    if spec.takes_step:
        kwargs["step"] = 3
    copies = [a.copy() for a in [p, *bufs]]
    with pytest.raises((ValueError, TypeError)):
        getattr(functional, name)(p, g, *bufs, **kwargs)
    for a, c in zip([p, *bufs], copies):
        assert np.array_equal(a, c)


def _group_not_added(cls, bad):
    w = torch.nn.Parameter(torch.ones(3))
    v = torch.nn.Parameter(torch.ones(2))
    opt = cls([w], lr=0.01)
    groups = [dict((k, val) for k, val in g.items() if k != "params") for g in opt.param_groups]
    with pytest.raises((ValueError, TypeError)):
        opt.add_param_group({"params": [v], **bad})
    assert [dict((k, val) for k, val in g.items() if k != "params")
            for g in opt.param_groups] == groups
    assert len(opt.param_groups) == 1


def test_lion_refuses_triton():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="use_triton=True"):
        LT.Lion([w], use_triton=True)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_adopt_refuses_torch_only_flags(flag):
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"{flag}=True"):
        LT.Adopt([w], **{flag: True})


def test_adopt_corrected_decay_needs_a_positive_lr():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Corrected weight decay requires a positive max lr"):
        LT.Adopt([w], lr=0.0, weight_decay=0.1, decoupled=True, corrected_weight_decay=True)


def test_adopt_bad_state_dict_changes_nothing():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LT.Adopt([w], lr=0.1)
    for _ in range(2):
        w.grad = torch.full((3,), 0.5, dtype=torch.float64)
        opt.step()
    saved = opt.state_dict()
    bad = opt.state_dict()
    bad["param_groups"][0]["caution"] = "yes"
    with pytest.raises(TypeError, match="caution must be a bool"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["caution"] is False
    now = opt.state_dict()
    assert now["param_groups"] == saved["param_groups"]
    for k in saved["state"]:
        for name, value in saved["state"][k].items():
            assert torch.equal(now["state"][k][name], value)


def test_reference_lion_by_hand():
    """One step by hand: decay 1 - 0.1*0.2 = 0.98, sign(0.1*g) = sign(g), m = 0.01*g."""
    p = np.array([1.0, -2.0, 3.0])
    g = np.array([0.5, -3.0, 0.0])
    m = np.zeros(3)
    reference.lion_(p, g, m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.2)
    np.testing.assert_allclose(p, [0.98 - 0.1, -1.96 + 0.1, 2.94], rtol=1e-15)
    np.testing.assert_allclose(m, 0.01 * g, rtol=1e-15)


def _adopt_by_hand_layers(p, g, m, v, **kw):
    """One ADOPT step of the kernel (lrfast.functional) and of lrfast.reference, each on copies
    of the same arrays: [(layer, p, m, v)]."""
    out = []
    for layer, module in (("functional", functional), ("reference", reference)):
        q, qm, qv = p.copy(), m.copy(), v.copy()
        module.adopt_(q, g, qm, qv, **kw)
        out.append((layer, q, qm, qv))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adopt_caution_by_hand(dtype):
    """Step 2 (the clip bound (2 - 1)**0.333 is 1), lr 0.1, beta1 0.9: n = clip(g/sqrt(v)),
    m' = m + 0.1 (n - m); the mask keeps the elements where m' g > 0, and the step is
    lr * m' * mask / max(mean(mask), 1e-3); m' is stored unmasked."""
    t = np.dtype(dtype).type
    p = np.array([1.0, -2.0, 3.0, 0.5], dtype)
    g = np.array([2.0, -1.0, -3.0, 0.5], dtype)
    m = np.array([0.5, 0.5, -0.5, -0.5], dtype)
    v = np.array([1.0, 4.0, 1.0, 16.0], dtype)
    kw = dict(step=2, lr=0.1, beta1=0.9, beta2=0.99, caution=True)
    # n = [2/1, -1/2, -3/1, 0.5/4] clipped to +-1 = [1, -0.5, -1, 0.125]
    # m' = [0.55, 0.4, -0.55, -0.4375]; m' g = [1.1, -0.4, 1.65, -0.21875]: kept 1 and 3
    # mean 0.5: the factor 2, the step 0.1 * [1.1, 0, -1.1, 0]
    want_m = np.array([0.55, 0.4, -0.55, -0.4375])
    want_p = np.array([1.0 - 0.11, -2.0, 3.0 + 0.11, 0.5])
    want_v = 0.99 * v.astype(np.float64) + 0.01 * g.astype(np.float64) ** 2
    tol = dict(rtol=1e-14, atol=0) if dtype == np.float64 else dict(rtol=1e-6, atol=0)
    for layer, q, qm, qv in _adopt_by_hand_layers(p, g, m, v, **kw):
        np.testing.assert_allclose(q, want_p, err_msg=layer, **tol)
        np.testing.assert_allclose(qm, want_m, err_msg=layer, **tol)
        np.testing.assert_allclose(qv, want_v, err_msg=layer, **tol)
        assert q[1] == p[1] and q[3] == p[3], layer  # masked: not moved at all
    # Without caution every element moves by lr * m'.
    q, qm, qv = p.copy(), m.copy(), v.copy()
    functional.adopt_(q, g, qm, qv, **dict(kw, caution=False))
    np.testing.assert_allclose(q, p - t(0.1) * want_m.astype(dtype), **tol)

    # The floor of the mean: 1 element kept of 2000 is a mean of 5e-4, taken as 1e-3, so the
    # kept element moves by lr * m' * 1000 (not * 2000). g = 1 and v = 1 give n = 1; m = -1
    # becomes m' = -0.8 (dropped), m = 1 stays 1 (kept).
    n = 2000
    p = np.zeros(n, dtype)
    g = np.ones(n, dtype)
    m = np.full(n, -1.0, dtype)
    m[7] = 1.0
    v = np.ones(n, dtype)
    want_p = np.zeros(n)
    want_p[7] = -0.1 * 1.0 * 1000
    want_m = np.full(n, -0.8)
    want_m[7] = 1.0
    for layer, q, qm, qv in _adopt_by_hand_layers(p, g, m, v, **kw):
        np.testing.assert_allclose(q, want_p, err_msg=layer, **tol)
        np.testing.assert_allclose(qm, want_m, err_msg=layer, **tol)

    # The first step only fills v, with or without caution.
    for layer, q, qm, qv in _adopt_by_hand_layers(p, g, np.zeros(n, dtype), np.zeros(n, dtype),
                                                  **dict(kw, step=1)):
        assert not q.any() and not qm.any(), layer
        np.testing.assert_array_equal(qv, np.ones(n), err_msg=layer)


def test_adopt_caution_class_and_timm_by_hand():
    """The NumPy class and lrfast.torch over three steps, against timm and the formula: the
    second step's m = 0.1 n agrees with g everywhere (the mean is 1), the third's does not."""
    p0 = np.array([1.0, -2.0, 3.0])
    grads = [np.array([1.0, 2.0, -1.0]), np.array([2.0, -1.0, -0.5]),
             np.array([-4.0, -1.0, 0.2])]
    w = [p0.copy()]
    opt = lrfast.Adopt(w, lr=0.1, clip_exp=None, caution=True)
    for gr in grads:
        opt.step([gr])
    # step 1: v = g1^2 = [1, 4, 1]. step 2: n = g2/sqrt(v) = [2, -0.5, -0.5], m = 0.1 n =
    # [0.2, -0.05, -0.05], all agreeing with g2 (factor 1): p -= 0.1 m; v = b2 v + (1-b2) g2^2.
    b2 = 0.9999
    v = b2 * grads[0] ** 2 + (1 - b2) * grads[1] ** 2
    m = np.array([0.2, -0.05, -0.05])
    p = p0 - 0.1 * m
    # step 3: n = g3/sqrt(v); m = m + 0.1 (n - m); elements 0 and 1 agree with g3 (m < 0,
    # g < 0), element 2 does not (m < 0, g > 0): factor 1/(2/3) = 1.5 on the two kept.
    n = grads[2] / np.sqrt(v)
    m = m + 0.1 * (n - m)
    assert list(m * grads[2] > 0) == [True, True, False]
    p = p - 0.1 * (m * np.array([1.5, 1.5, 0.0]))
    np.testing.assert_allclose(w[0], p, rtol=1e-13)
    np.testing.assert_allclose(opt.state_dict()["state"][0]["exp_avg"], m, rtol=1e-13)
    Adopt = _adopt_peer()
    a = torch.nn.Parameter(torch.tensor(p0))
    b = torch.nn.Parameter(torch.tensor(p0))
    with _default_dtype(torch.float64):
        peer = Adopt([a], lr=0.1, clip_exp=None, caution=True, foreach=False)
        ours = LT.Adopt([b], lr=0.1, clip_exp=None, caution=True, foreach=False)
        for gr in grads:
            a.grad, b.grad = torch.tensor(gr), torch.tensor(gr)
            peer.step()
            ours.step()
    np.testing.assert_allclose(a.detach().numpy(), p, rtol=1e-13)
    np.testing.assert_allclose(b.detach().numpy(), p, rtol=1e-13)


# ------------------------------------------------------------------------------------------
# The functional layer's extra values: Lion's init_lr, ADOPT's max_lr, against the reference
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("init_lr", [None, 0.05])
def test_functional_lion_init_lr(dtype, init_lr):
    rng = np.random.default_rng(2)
    p = rng.standard_normal(1000).astype(dtype)
    m = np.zeros_like(p)
    rp, rm = p.copy(), m.copy()
    for _ in range(5):
        g = rng.standard_normal(1000).astype(dtype)
        kw = dict(lr=0.01, beta1=0.7, beta2=0.9, weight_decay=0.2, decoupled_weight_decay=True,
                  init_lr=init_lr)
        functional.lion_(p, g, m, **kw)
        reference.lion_(rp, g, rm, **kw)
    tol = dict(rtol=1e-14, atol=0) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p, rp, **tol)
    np.testing.assert_allclose(m, rm, **tol)
    # and the decay was lion-pytorch's 1 - lr * wd / init_lr
    q, qm = rng.standard_normal(3), np.zeros(3)
    q0 = q.copy()
    functional.lion_(q, np.zeros(3), qm, lr=0.01, weight_decay=0.2,
                     decoupled_weight_decay=True, init_lr=init_lr)
    factor = 1 - 0.01 * (0.2 / (0.01 if init_lr is None else init_lr))
    np.testing.assert_allclose(q, q0 * factor, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_lr", [None, 0.04])
def test_functional_adopt_max_lr(dtype, max_lr):
    rng = np.random.default_rng(3)
    p = rng.standard_normal(1000).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    rp, rm, rv = p.copy(), m.copy(), v.copy()
    for step in range(1, 8):
        g = rng.standard_normal(1000).astype(dtype)
        kw = dict(step=step, lr=0.01, weight_decay=0.3, decoupled=True,
                  corrected_weight_decay=True, max_lr=max_lr)
        functional.adopt_(p, g, m, v, **kw)
        reference.adopt_(rp, g, rm, rv, **kw)
    tol = dict(rtol=1e-14, atol=0) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
    for a, b in ((p, rp), (m, rm), (v, rv)):
        np.testing.assert_allclose(a, b, **tol)
    # one decoupled step with a zero gradient after the first: the param decays by
    # lr**2/max_lr * wd (lr * wd without max_lr) and nothing else moves
    q, qm, qv = np.array([2.0, -1.0]), np.zeros(2), np.ones(2)
    functional.adopt_(q, np.zeros(2), qm, qv, step=2, lr=0.01, weight_decay=0.3,
                      decoupled=True, corrected_weight_decay=True, max_lr=max_lr)
    scale = 0.01 if max_lr is None else 0.01 ** 2 / max_lr
    np.testing.assert_allclose(q, np.array([2.0, -1.0]) * (1 - scale * 0.3), rtol=1e-15)


# ------------------------------------------------------------------------------------------
# Non-finite values and complex params, as the peers treat them
# ------------------------------------------------------------------------------------------

def _nonfinite_grid():
    import itertools

    vals = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-300, 3.0]
    pairs = list(itertools.product(vals, vals))
    return (torch.tensor([a for a, _ in pairs], dtype=torch.float64),
            torch.tensor([b for _, b in pairs], dtype=torch.float64))


def _same_or_both_nan(x, y):
    assert torch.equal(x.isnan(), y.isnan())
    keep = ~x.isnan()
    torch.testing.assert_close(x[keep], y[keep], rtol=1e-13, atol=0)


@pytest.mark.parametrize("name,peer,kw", [
    ("Lion", _lion_peer, dict(lr=0.1, weight_decay=0.1)),
    ("Adopt", _adopt_peer, dict(lr=0.1, weight_decay=0.1, foreach=False)),
    ("Adopt", _adopt_peer, dict(lr=0.1, weight_decay=0.1, decoupled=True, clip_exp=None,
                                foreach=False)),
    ("Adopt", _adopt_peer, dict(lr=0.1, weight_decay=0.1, caution=True, foreach=False)),
])
def test_nonfinite_values_as_the_peer(name, peer, kw):
    """NaN and infinities in params and grads end where the peer puts them (sign(NaN) = 0 in
    Lion; clamps that pass NaN on in ADOPT)."""
    cls = peer()
    with _default_dtype(torch.float64):
        P, G = _nonfinite_grid()
        a, b = torch.nn.Parameter(P.clone()), torch.nn.Parameter(P.clone())
        pa, pb = cls([a], **kw), getattr(LT, name)([b], **kw)
        for s in range(3):
            a.grad = G.roll(s).clone()
            b.grad = G.roll(s).clone()
            pa.step()
            pb.step()
        _same_or_both_nan(b.detach(), a.detach())
        for key, value in pa.state[a].items():
            _same_or_both_nan(pb.state[b][key], value)


@pytest.mark.parametrize("caution", [False, True])
def test_adopt_complex_params_as_timm(caution):
    """Updated on the real view, as timm does (with caution, the mask's mean is over the real
    view's elements, twice the param's)."""
    Adopt = _adopt_peer()
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(5, 3, generator=gen, dtype=torch.complex128)
    a, b = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    pa = Adopt([a], lr=0.01, weight_decay=0.1, caution=caution, foreach=False)
    pb = LT.Adopt([b], lr=0.01, weight_decay=0.1, caution=caution, foreach=False)
    with _default_dtype(torch.float64):
        for _ in range(6):
            g = torch.randn(5, 3, generator=gen, dtype=torch.complex128)
            a.grad, b.grad = g.clone(), g.clone()
            pa.step()
            pb.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(pb.state[b][key], pa.state[a][key], rtol=1e-12, atol=1e-14)


def test_lion_refuses_complex_params():
    """lion-pytorch's sign of a complex number is z/|z|, not element-wise on the real view."""
    w = torch.nn.Parameter(torch.ones(3))
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        LT.Lion([z])
    opt = LT.Lion([w])
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
