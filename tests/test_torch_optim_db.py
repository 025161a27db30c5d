"""lrfast.torch against torch.optim, driven by torch's own optimizer registry.

``torch.testing._internal.common_optimizers.optim_db`` is what PyTorch's test_optim.py runs on:
per optimizer, the configurations torch tests (``optim_inputs_func``) and the bad inputs with
the exception and message torch gives (``optim_error_inputs_func``). Reading them here means a
configuration that a new torch release adds is tested against lrfast.torch without anyone
writing it. For every class lrfast.torch provides:

* every CPU configuration (but ``differentiable``/``capturable``, refused by design) in float32,
  float64 and complex64 (updated on the real view, as torch does; not with ``fused``, which
  torch's complex params lack): a dozen lockstep steps with the same gradients, one param
  without a gradient on some steps, then every param and state buffer against torch's own
  class;
* every bad input: the same exception type, a message matching torch's regex;
* state dicts both ways (torch to lrfast and back), from an older torch (the flags removed),
  and Adam's loaded into AdamW and back;
* non-contiguous params (a strided slice, a transposed matrix) next to a contiguous one, in
  every configuration.
"""
from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
LT = pytest.importorskip("lrfast.torch")
common = pytest.importorskip("torch.testing._internal.common_optimizers")

from lrfast._specs import OPTIMIZERS as SPECS  # noqa: E402

# Every lrfast.torch class that is a torch.optim class of the same name.
NAMES = tuple(name for name, spec in SPECS.items()
              if spec.torch is not None and spec.torch.cls == name)
INFOS = {info.optim_cls.__name__: info for info in common.optim_db
         if info.optim_cls.__name__ in NAMES and info.optim_cls.__module__.startswith("torch.")}
# torch.optim's classes that refuse complex params (at the step): no complex lockstep for them
# (the refusal itself is one of their registry error inputs).
REAL_ONLY = {"Adafactor"}
FLAGS = ("maximize", "foreach", "differentiable", "fused", "capturable",
         "decoupled_weight_decay")


def configs(name):
    """(id, kwargs) of torch's CPU configurations for ``name`` that lrfast.torch accepts."""
    out = []
    for k, oi in enumerate(INFOS[name].optim_inputs_func(device="cpu")):
        kw = dict(oi.kwargs)
        if kw.get("differentiable") or kw.get("capturable"):
            continue
        out.append((f"{name}-{k}-{oi.desc or 'default'}".replace(" ", "_"), name, kw))
    return out


CONFIGS = [c for name in NAMES if name in INFOS for c in configs(name)]
ERRORS = [(f"{name}-{k}", name, e) for name in NAMES if name in INFOS
          for k, e in enumerate(INFOS[name].optim_error_inputs_func(device="cpu",
                                                                    dtype=torch.float32))]


def fresh(kwargs):
    """A copy of a configuration's kwargs (tensor hyper-parameters cloned)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else
                tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in v)
                if isinstance(v, tuple) else v)
            for k, v in kwargs.items()}


def make_params(dtype, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if not contiguous:    # as torch's test_forloop_goes_right_direction, and a transpose
        return [torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0].requires_grad_(),
                torch.randn(10, 2, generator=g, dtype=dtype)[..., 0].requires_grad_(),
                torch.randn(4, 3, generator=g, dtype=dtype).t().requires_grad_()]
    return [torch.randn(10, 5, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(10, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(3, 4, generator=g, dtype=dtype).requires_grad_()]


def rel_diff(a, b):
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def lockstep(name, kwargs, dtype, steps=12, ours=None, theirs=None, contiguous=True):
    """Run torch's and lrfast's class on the same gradients; return both optimizers."""
    tp, lp = make_params(dtype, contiguous=contiguous), make_params(dtype, contiguous=contiguous)
    theirs = theirs or getattr(torch.optim, name)(tp, **fresh(kwargs))
    ours = ours or getattr(LT, name)(lp, **fresh(kwargs))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for k, (a, b) in enumerate(zip(theirs.param_groups[0]["params"],
                                       ours.param_groups[0]["params"])):
            if k == 2 and step % 4 == 1:        # no gradient on some steps
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    return theirs, ours


def assert_same(theirs, ours, dtype):
    tol = 1e-12 if dtype in (torch.float64, torch.complex128) else 1e-5
    tparams = [p for g in theirs.param_groups for p in g["params"]]
    lparams = [p for g in ours.param_groups for p in g["params"]]
    for k, (a, b) in enumerate(zip(tparams, lparams)):
        assert rel_diff(b, a) <= tol, f"param {k}: {rel_diff(b, a)}"
        ta, tb = theirs.state.get(a, {}), ours.state.get(b, {})
        assert set(ta) == set(tb), f"param {k}: state {sorted(tb)} versus torch's {sorted(ta)}"
        for n in ta:
            if torch.is_tensor(ta[n]):
                assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, (k, n)
                assert rel_diff(tb[n], ta[n]) <= tol, f"param {k}: {n}: {rel_diff(tb[n], ta[n])}"
            else:
                assert ta[n] == tb[n], (k, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex64],
                         ids=["f64", "f32", "c64"])
@pytest.mark.parametrize("cid, name, kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_registry_config_matches_torch(cid, name, kwargs, dtype):
    if dtype.is_complex and kwargs.get("fused"):
        pytest.skip("torch's fused kernels take no complex params")
    if dtype.is_complex and name in REAL_ONLY:
        pytest.skip(f"torch's {name} refuses complex params")
    theirs, ours = lockstep(name, kwargs, dtype)
    assert_same(theirs, ours, dtype)
    # Same state dict layout: the same keys per param and the same group entries.
    ts, ls = theirs.state_dict(), ours.state_dict()
    assert {k: sorted(v) for k, v in ts["state"].items()} == \
        {k: sorted(v) for k, v in ls["state"].items()}
    assert [sorted(g) for g in ts["param_groups"]] == [sorted(g) for g in ls["param_groups"]]


@pytest.mark.parametrize("eid, name, error", ERRORS, ids=[e[0] for e in ERRORS])
def test_every_registry_error_input_is_refused_as_torch_does(eid, name, error):
    oi = error.optimizer_error_input
    params = oi.params
    before = [p.detach().clone() for p in params] if isinstance(params, list) and \
        all(isinstance(p, torch.Tensor) for p in params) else None
    cls = getattr(LT, name)
    enum = common.OptimizerErrorEnum
    if error.error_on == enum.CONSTRUCTION_ERROR:
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                cls(params, **oi.kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                cls(params, **oi.kwargs)
    else:
        opt = cls(params, **oi.kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            opt.step()
    if before is not None:
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b)


def older(state_dict, drop_step_tensors=False):
    """A state dict as an older torch wrote it: no flags in the groups (and plain-number steps)."""
    sd = copy.deepcopy(state_dict)
    for group in sd["param_groups"]:
        for flag in FLAGS:
            group.pop(flag, None)
    if drop_step_tensors:
        for st in sd["state"].values():
            if "step" in st:
                st["step"] = float(st["step"])
    return sd


@pytest.mark.parametrize("numbers", [False, True], ids=["tensor-steps", "number-steps"])
@pytest.mark.parametrize("cid, name, kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_older_state_dicts_load_and_continue_as_in_torch(cid, name, kwargs, numbers):
    if name == "Adafactor":
        pytest.skip("torch's Adafactor cannot step after loading a state dict without "
                    "'maximize' (its __setstate__ gives no default)")
    dtype = torch.float64
    theirs, ours = lockstep(name, kwargs, dtype, steps=3)
    saved = older(theirs.state_dict(), numbers)
    t2 = getattr(torch.optim, name)(make_params(dtype), **fresh(kwargs))
    l2 = getattr(LT, name)(make_params(dtype), **fresh(kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2.load_state_dict(copy.deepcopy(saved))
    l2.load_state_dict(copy.deepcopy(saved))
    for a, b in zip(t2.param_groups, l2.param_groups):
        assert {k: v for k, v in a.items() if k != "params"} == \
            {k: v for k, v in b.items() if k != "params"}
    with torch.no_grad():
        for a, b in zip(t2.param_groups[0]["params"], theirs.param_groups[0]["params"]):
            a.copy_(b)
        for a, b in zip(l2.param_groups[0]["params"], theirs.param_groups[0]["params"]):
            a.copy_(b)
    theirs, ours = lockstep(name, kwargs, dtype, steps=3, ours=l2, theirs=t2)
    assert_same(theirs, ours, dtype)


@pytest.mark.parametrize("source, target", [("Adam", "AdamW"), ("AdamW", "Adam"),
                                            ("AdamW-old", "AdamW")])
def test_adam_and_adamw_state_dicts_cross_as_in_torch(source, target):
    """AdamW stays AdamW whatever it loads (an Adam's dict, or an AdamW's from before the
    decoupled_weight_decay flag), as torch's AdamW does; Adam loads AdamW's as torch does."""
    dtype = torch.float64
    kwargs = dict(lr=0.1, weight_decay=0.5)
    src = getattr(torch.optim, source.split("-")[0])(make_params(dtype), **kwargs)
    for p in src.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    src.step()
    saved = src.state_dict()
    if source.endswith("old"):
        saved = copy.deepcopy(saved)
        for g in saved["param_groups"]:
            g.pop("decoupled_weight_decay")
    t2 = getattr(torch.optim, target)(make_params(dtype), **kwargs)
    l2 = getattr(LT, target)(make_params(dtype), **kwargs)
    t2.load_state_dict(copy.deepcopy(saved))
    l2.load_state_dict(copy.deepcopy(saved))
    assert l2.param_groups[0]["decoupled_weight_decay"] == \
        t2.param_groups[0]["decoupled_weight_decay"]
    theirs, ours = lockstep(target, kwargs, dtype, steps=2, ours=l2, theirs=t2)
    assert_same(theirs, ours, dtype)


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, weight_decay=0.1),
                                    dict(lr=0.1, maximize=True)])
def test_sgd_without_momentum_keeps_no_state(kwargs):
    theirs, ours = lockstep("SGD", kwargs, torch.float64, steps=2)
    assert theirs.state_dict()["state"] == {} == ours.state_dict()["state"]
    assert len(ours.state) == 0


def test_hyper_parameters_are_checked_before_params_are_read():
    """torch checks the hyper-parameters first: a bad one is reported as such even when
    ``params`` is no iterable at all."""
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0"):
        LT.Adam(None, betas=(1.0, 0.0))
    with pytest.raises(ValueError, match="Invalid momentum value"):
        LT.SGD(None, momentum=-0.5)
    with pytest.raises(ValueError, match="Invalid lr_decay value"):
        LT.Adagrad(None, lr_decay=-0.5)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        LT.RMSprop(None, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors"):
        LT.Adam(make_params(torch.float32), betas=(0.9, torch.tensor(0.99)))
    with pytest.raises(ValueError, match="lr as a Tensor is not supported"):
        LT.AdamW(make_params(torch.float32), lr=torch.tensor(0.01), foreach=True)
    # SGD and Adagrad accept a tensor lr with foreach=True, as torch's do.
    LT.SGD(make_params(torch.float32), lr=torch.tensor(0.01), foreach=True)
    LT.Adagrad(make_params(torch.float32), lr=torch.tensor(0.01), foreach=True)


@pytest.mark.parametrize("name", NAMES)
def test_complex_params_update_as_their_real_view(name):
    """A complex param and its real view (a float param) follow the same trajectory, with
    complex state buffers, as in torch's test_complex; a float param may share the group."""
    if name in REAL_ONLY:
        pytest.skip(f"torch's {name} refuses complex params")
    kwargs = dict(lr=0.01, weight_decay=0.1) if name != "SGD" else dict(lr=0.01, momentum=0.9)
    if "weight_decay" not in SPECS[name].arguments:     # (Rprop)
        kwargs.pop("weight_decay")
    gen = torch.Generator().manual_seed(3)
    cplx = [torch.randn(10, 5, generator=gen, dtype=torch.complex64).requires_grad_(),
            torch.randn(4, generator=gen, dtype=torch.float32).requires_grad_()]
    real = [torch.view_as_real(cplx[0]).detach().clone().requires_grad_(),
            cplx[1].detach().clone().requires_grad_()]
    oc, orl = getattr(LT, name)(cplx, **kwargs), getattr(LT, name)(real, **kwargs)
    for _ in range(5):
        for c, r in zip(cplx, real):
            g = torch.randn(c.shape, generator=gen, dtype=c.dtype)
            c.grad = g
            r.grad = torch.view_as_real(g).clone() if g.is_complex() else g.clone()
        oc.step()
        orl.step()
    assert torch.equal(torch.view_as_real(cplx[0]).detach(), real[0].detach())
    assert torch.equal(cplx[1].detach(), real[1].detach())
    scalar_state = [b.name for b in SPECS[name].update.scalar_state]
    for n, buf in oc.state[cplx[0]].items():
        if n in scalar_state:  # 0-d real tensors, as torch keeps them
            assert torch.equal(buf, orl.state[real[0]][n])
        elif n != "step":
            assert buf.dtype == torch.complex64
            assert torch.equal(torch.view_as_real(buf), orl.state[real[0]][n])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cid, name, kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_non_contiguous_params_match_torch(cid, name, kwargs, dtype):
    """Strided slices and a transpose, updated through contiguous copies, written back into the
    params' own memory (the views stay views of their bases)."""
    theirs, ours = lockstep(name, kwargs, dtype, contiguous=False)
    assert_same(theirs, ours, dtype)
    for p in ours.param_groups[0]["params"]:
        assert not p.is_contiguous()


def test_contiguous_params_are_still_updated_in_place_beside_a_strided_one():
    base = torch.zeros(6, 2, dtype=torch.float64)
    strided = base[:, 0].requires_grad_()
    plain = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = LT.SGD([strided, plain], lr=0.5)
    ptr = plain.data_ptr()
    strided.grad = torch.ones(6, dtype=torch.float64)
    plain.grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    assert plain.data_ptr() == ptr and torch.equal(plain.detach(), torch.full((5,), -0.5,
                                                                              dtype=torch.float64))
    assert torch.equal(base[:, 0], torch.full((6,), -0.5, dtype=torch.float64))
    assert torch.equal(base[:, 1], torch.zeros(6, dtype=torch.float64))   # untouched


@pytest.mark.parametrize("cid, name, kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_state_dicts_go_both_ways(cid, name, kwargs):
    """After a few lockstep steps, lrfast's state dict continues in torch's class and torch's in
    lrfast's: all four optimizers then stay together."""
    dtype = torch.float64
    if SPECS[name].update.scalar_state and torch.get_default_dtype() != dtype:
        # torch keeps NAdam's and ASGD's scalar state in the default dtype and casts it to the
        # param's on load, so torch's own run would then part from its unloaded twin: run
        # with the state in float64 from the start.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return test_state_dicts_go_both_ways(cid, name, kwargs)
        finally:
            torch.set_default_dtype(previous)
    theirs, ours = lockstep(name, kwargs, dtype, steps=3)
    to_torch = getattr(torch.optim, name)(make_params(dtype), **fresh(kwargs))
    to_ours = getattr(LT, name)(make_params(dtype), **fresh(kwargs))
    to_torch.load_state_dict(copy.deepcopy(ours.state_dict()))
    to_ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    with torch.no_grad():
        for opt, src in ((to_torch, ours), (to_ours, theirs)):
            for a, b in zip(opt.param_groups[0]["params"], src.param_groups[0]["params"]):
                a.copy_(b)
    a, b = lockstep(name, kwargs, dtype, steps=3, ours=to_ours, theirs=to_torch)
    assert_same(a, b, dtype)
    c, d = lockstep(name, kwargs, dtype, steps=3, ours=ours, theirs=theirs)
    assert_same(c, d, dtype)
    assert_same(a, d, dtype)
