"""Sparse COO gradients in lrfast.torch (SGD, Adagrad, SparseAdam) against torch.optim, in
lockstep over several steps: params and every state buffer after each step, state dicts
between the two, and the inputs both refuse (or lrfast refuses where torch would write out of
bounds). One table of configs, one of bad inputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import lrfast.torch as LT  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

ROWS, DIM, STEPS = 40, 6, 5


def _zipf_rows(rng, n, rows=ROWS):
    """Lookups skewed as real ones are: a few rows seen many times, duplicates in a batch."""
    return torch.from_numpy((rng.zipf(1.3, n) - 1) % rows).long()


class Model(torch.nn.Module):
    """``kind``: where the sparse gradient comes from.
    embedding / bag_sum / bag_mean: a real backward pass through nn.Embedding(sparse=True) or
    nn.EmbeddingBag(sparse=True); mixed: nn.Embedding(sparse=True) and a dense Linear in one
    optimizer; raw: uncoalesced Zipf gradients set by hand, every third batch empty; flat: a
    1-D param with a sparse gradient of scalars; grid: a 2-D param whose gradient is sparse
    in both dimensions."""

    def __init__(self, kind, dtype):
        super().__init__()
        self.kind = kind
        torch.manual_seed(0)
        if kind in ("embedding", "mixed", "raw"):
            self.table = torch.nn.Embedding(ROWS, DIM, sparse=True)
        elif kind.startswith("bag"):
            self.table = torch.nn.EmbeddingBag(ROWS, DIM, sparse=True, mode=kind[4:])
        elif kind == "flat":
            self.table = torch.nn.Parameter(torch.randn(ROWS))
        else:
            self.table = torch.nn.Parameter(torch.randn(8, 5))
        if kind == "mixed":
            self.head = torch.nn.Linear(DIM, 3)
        self.to(dtype)

    @property
    def weight(self):
        return self.table.weight if isinstance(self.table, torch.nn.Module) else self.table

    def feed(self, step):
        """Set the gradients of batch ``step`` (the same for every model made alike)."""
        rng = np.random.default_rng(100 + step)
        for p in self.parameters():
            p.grad = None
        w = self.weight
        if self.kind in ("raw", "flat", "grid"):
            n = 0 if step % 3 == 2 else 12
            if self.kind == "grid":
                idx = torch.stack([torch.from_numpy(rng.integers(0, s, n)).long()
                                   for s in w.shape])
                shape = (n,)
            else:
                idx = _zipf_rows(rng, n, w.shape[0])[None]
                shape = (n,) + tuple(w.shape[1:])
            vals = torch.from_numpy(rng.standard_normal(shape)).to(w.dtype)
            w.grad = torch.sparse_coo_tensor(idx, vals, w.shape)
            return
        x = _zipf_rows(rng, 15).reshape(3, 5)
        out = self.table(x)
        if self.kind == "mixed":
            out = self.head(out)
        (out.pow(2).sum() + out.sum()).backward()


# (class name, kwargs, model kind)
CONFIGS = [
    ("SGD", dict(lr=0.05), "embedding"),
    ("SGD", dict(lr=0.05, maximize=True), "raw"),
    ("SGD", dict(lr=0.05), "bag_sum"),
    ("SGD", dict(lr=0.05), "bag_mean"),
    ("SGD", dict(lr=0.02, momentum=0.9), "mixed"),
    ("SGD", dict(lr=0.02, momentum=0.8, dampening=0.1, nesterov=False), "raw"),
    ("SGD", dict(lr=0.02, momentum=0.9, nesterov=True), "embedding"),
    ("SGD", dict(lr=0.05), "mixed"),
    ("SGD", dict(lr=0.05, foreach=True), "flat"),
    ("SGD", dict(lr=0.05), "grid"),
    ("Adagrad", dict(lr=0.1), "embedding"),
    ("Adagrad", dict(lr=0.1, lr_decay=0.3, initial_accumulator_value=0.5), "raw"),
    ("Adagrad", dict(lr=0.1, maximize=True, eps=1e-6), "bag_sum"),
    ("Adagrad", dict(lr=0.1), "bag_mean"),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1), "mixed"),
    ("Adagrad", dict(lr=0.1, foreach=True), "flat"),
    ("Adagrad", dict(lr=0.1), "grid"),
    ("SparseAdam", dict(lr=0.01), "embedding"),
    ("SparseAdam", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, maximize=True), "raw"),
    ("SparseAdam", dict(lr=0.01), "bag_sum"),
    ("SparseAdam", dict(lr=0.01), "bag_mean"),
    ("SparseAdam", dict(lr=0.01), "flat"),
    ("SparseAdam", dict(lr=0.01), "grid"),
]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _case_id(c):
    name, kw, kind = c
    return f"{name}-{kind}-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _pair(name, kw, kind, dtype):
    torch_model, our_model = Model(kind, dtype), Model(kind, dtype)
    return (torch_model, getattr(torch.optim, name)(torch_model.parameters(), **kw),
            our_model, getattr(LT, name)(our_model.parameters(), **kw))


def _dense(t):
    return t.to_dense() if isinstance(t, torch.Tensor) and t.is_sparse else t


def _assert_close(a, b, tol, what):
    if isinstance(a, torch.Tensor) and a.dim() > 0:
        a, b = _dense(a), _dense(b)
        assert a.shape == b.shape and a.dtype == b.dtype, what
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=what)
    else:
        av = a.item() if isinstance(a, torch.Tensor) else a
        bv = b.item() if isinstance(b, torch.Tensor) else b
        assert av == bv and type(a) is type(b), f"{what}: {a!r} versus {b!r}"


def _compare(tm, topt, om, oopt, tol, when):
    for (n, a), (_, b) in zip(tm.named_parameters(), om.named_parameters()):
        _assert_close(a.detach(), b.detach(), tol, f"{n} {when}")
    for (n, a), (_, b) in zip(tm.named_parameters(), om.named_parameters()):
        ts, os_ = topt.state.get(a, {}), oopt.state.get(b, {})
        assert sorted(ts) == sorted(os_), f"state keys of {n} {when}"
        for key in ts:
            _assert_close(ts[key], os_[key], tol, f"state {key!r} of {n} {when}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=_case_id)
def test_lockstep_with_torch(config, dtype):
    tm, topt, om, oopt = _pair(*config, dtype)
    for step in range(STEPS):
        tm.feed(step)
        om.feed(step)
        topt.step()
        oopt.step()
        _compare(tm, topt, om, oopt, TOL[dtype], f"after step {step + 1}")
    # the updates did something: no config may pass by leaving the table alone
    assert not torch.equal(om.weight.detach(), Model(config[2], dtype).weight.detach())


@pytest.mark.parametrize("config", CONFIGS, ids=_case_id)
def test_state_dict_round_trip(config):
    """Three steps in torch, its state dict loaded here, three more here; and the other way;
    both against torch's six steps."""
    name, kw, kind = config
    dtype = torch.float64
    ref, ref_opt, _, _ = _pair(name, kw, kind, dtype)
    for step in range(6):
        ref.feed(step)
        ref_opt.step()
    for first, second in ((torch.optim, LT), (LT, torch.optim)):
        m1 = Model(kind, dtype)
        o1 = getattr(first, name)(m1.parameters(), **kw)
        for step in range(3):
            m1.feed(step)
            o1.step()
        m2 = copy.deepcopy(m1)
        o2 = getattr(second, name)(m2.parameters(), **kw)
        o2.load_state_dict(copy.deepcopy(o1.state_dict()))
        for step in range(3, 6):
            m2.feed(step)
            o2.step()
        where = f"{first.__name__} -> {second.__name__}"
        for (n, a), (_, b) in zip(ref.named_parameters(), m2.named_parameters()):
            _assert_close(a.detach(), b.detach(), 1e-12, f"{n}, {where}")
        for a, b in zip(ref.parameters(), m2.parameters()):
            for key, value in ref_opt.state.get(a, {}).items():
                _assert_close(value, o2.state[b][key], 1e-12, f"state {key!r}, {where}")


def _oor(w):
    return torch.sparse_coo_tensor(torch.tensor([[1, w.shape[0]]]),
                                   torch.ones((2,) + tuple(w.shape[1:]), dtype=w.dtype), w.shape)


def _negative(w):
    return torch.sparse_coo_tensor(torch.tensor([[-1, 2]]),
                                   torch.ones((2,) + tuple(w.shape[1:]), dtype=w.dtype), w.shape)


def _ok(w):
    return torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]),
                                   torch.ones((3,) + tuple(w.shape[1:]), dtype=w.dtype), w.shape)


def _dense_grad(w):
    return torch.ones_like(w)


# (id, class name, kwargs, gradient of the table, expected error, message pattern, torch too)
# "torch too": torch.optim raises the same on the same input (lrfast's message is torch's).
BAD = [
    ("sgd-out-of-range", "SGD", dict(lr=0.1), _oor, IndexError, "out of range", False),
    ("sgd-negative", "SGD", dict(lr=0.1), _negative, IndexError, "out of range", False),
    ("adagrad-out-of-range", "Adagrad", dict(lr=0.1), _oor, IndexError, "out of range", False),
    ("adam-out-of-range", "SparseAdam", dict(lr=0.1), _oor, IndexError, "out of range", False),
    ("sgd-momentum-out-of-range", "SGD", dict(lr=0.1, momentum=0.9), _oor, IndexError,
     "out of range", False),
    ("sgd-weight-decay", "SGD", dict(lr=0.1, weight_decay=0.01), _ok, RuntimeError,
     r"add\(sparse, dense\) is not supported", True),
    ("sgd-weight-decay-momentum", "SGD", dict(lr=0.1, weight_decay=0.01, momentum=0.9), _ok,
     RuntimeError, r"add\(sparse, dense\) is not supported", True),
    ("adagrad-weight-decay", "Adagrad", dict(lr=0.1, weight_decay=0.01), _ok, RuntimeError,
     "weight_decay option is not compatible with sparse gradients", True),
    ("sgd-fused", "SGD", dict(lr=0.1, fused=True), _ok, RuntimeError,
     "does not support sparse gradients", True),
    ("adagrad-fused", "Adagrad", dict(lr=0.1, fused=True), _ok, RuntimeError,
     "does not support sparse grad", True),
    ("adam-dense-grad", "SparseAdam", dict(lr=0.1), _dense_grad, RuntimeError,
     "SparseAdam does not support dense gradients", True),
]


def _state_copy(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for p, st in opt.state.items()}


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input_changes_nothing(bad):
    _, name, kw, make, error, pattern, torch_too = bad
    model = Model("mixed", torch.float64)
    opt = getattr(LT, name)([model.weight] if name == "SparseAdam" else model.parameters(),
                            **kw)
    # a good step first, so that there is state to keep (the dense head's only, where the
    # table's sparse gradient is refused whatever it is)
    model.feed(0)
    if name == "SparseAdam":
        model.head.weight.grad = model.head.bias.grad = None
    elif "fused" in kw or "weight_decay" in kw:
        model.weight.grad = None
    opt.step()
    model.feed(1)
    model.weight.grad = make(model.weight)
    before = [p.detach().clone() for p in model.parameters()]
    state = _state_copy(opt)
    with pytest.raises(error, match=pattern):
        opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b.detach())
    after = _state_copy(opt)
    assert state.keys() == after.keys()
    for key, st in state.items():
        for name_, v in st.items():
            w = after[key][name_]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    if torch_too:
        t_opt = getattr(torch.optim, name)([model.weight], **kw)
        with pytest.raises(error, match=pattern):
            t_opt.step()


@pytest.mark.parametrize("kw, message", [
    (dict(lr=0.0), "Invalid learning rate: 0.0"),
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=0.0), "Invalid epsilon value: 0.0"),
    (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), r"Invalid beta parameter at index 1: -0.1"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
])
def test_sparse_adam_constructor_checks(kw, message):
    w = torch.nn.Parameter(torch.zeros(4, 2))
    for cls in (torch.optim.SparseAdam, LT.SparseAdam):
        with pytest.raises(ValueError, match=message):
            cls([w], **kw)


def test_sparse_adam_refuses_sparse_and_complex_params():
    sparse = torch.zeros(4, 2).to_sparse().requires_grad_()
    cplx = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.complex64))
    for cls in (torch.optim.SparseAdam, LT.SparseAdam):
        with pytest.raises(ValueError, match=r"Sparse params at indices \[\[0, 0\]\]"):
            cls([sparse])
        with pytest.raises(ValueError, match=r"Complex params at indices \[\[0, 0\]\]"):
            cls([cplx])


def test_sparse_adam_empty_batch_counts_a_step():
    w_t = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    w_o = torch.nn.Parameter(w_t.detach().clone())
    opts = [torch.optim.SparseAdam([w_t]), LT.SparseAdam([w_o])]
    empty = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long),
                                    torch.zeros((0, 3), dtype=torch.float64), (5, 3))
    for w, opt in zip((w_t, w_o), opts):
        w.grad = empty
        opt.step()
        assert opt.state[w]["step"] == 1 and type(opt.state[w]["step"]) is int
        assert not opt.state[w]["exp_avg"].any()
    torch.testing.assert_close(w_o.detach(), w_t.detach(), rtol=0, atol=0)


def test_non_contiguous_param_written_back():
    """A transposed param with a sparse gradient is updated through a contiguous copy."""
    base = torch.randn(3, 6, dtype=torch.float64)
    w_t = torch.nn.Parameter(base.t().contiguous())
    w_o = torch.nn.Parameter(base.clone()).t()  # a view: non-contiguous, shape (6, 3)
    w_o.retain_grad()
    grad = torch.sparse_coo_tensor(torch.tensor([[0, 4, 4]]),
                                   torch.randn(3, 3, dtype=torch.float64), (6, 3))
    w_t.grad = grad
    w_o.grad = grad
    torch.optim.Adagrad([w_t], lr=0.1).step()
    LT.Adagrad([w_o], lr=0.1).step()
    torch.testing.assert_close(w_o.detach(), w_t.detach(), rtol=1e-12, atol=1e-12)


def test_half_param_with_sparse_grad_is_refused():
    w = torch.nn.Parameter(torch.zeros(5, 2, dtype=torch.bfloat16))
    w.grad = _ok(w)
    with pytest.raises(RuntimeError, match="float32 and float64 params only"):
        LT.SGD([w], lr=0.1).step()
    assert not w.detach().any()


def test_other_optimizers_still_refuse_sparse_grads():
    w = torch.nn.Parameter(torch.zeros(5, 2))
    w.grad = _ok(w)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        LT.Adam([w]).step()


def test_exported():
    assert "SparseAdam" in LT.__all__
    assert issubclass(LT.SparseAdam, torch.optim.Optimizer)
