"""Weight averages with torch: lrfast.torch's multi_avg_fns and the ``ema=`` fused into the step,
against torch's AveragedModel functions, timm's ModelEmaV3, ema-pytorch's EMA, torch's ASGD, and
lrfast.Averager on NumPy views of the same params.

Rounding. lrfast's lerp (``a + w (p - a)`` for ``w < 0.5``, else ``p - (p - a)(1 - w)``) never
fuses a multiply-add. torch's CPU lerp does where its kernels are built for FMA (AVX2, AVX-512:
``fma(w, p - a, a)``, ``fma(w - 1, p - a, p)``), and does not in its baseline build
(``ATEN_CPU_CAPABILITY=default``). So against torch's own kernels the comparisons are bitwise
where they can be: when torch runs unfused (probed below, and forced in a subprocess by one
test), and when the lerp weight is a power of two (then ``w (p - a)`` is exact and fusing changes
nothing: the EMA decays 0.9375 and 0.75 here). Elsewhere they allow the rounding of one product
per update (below 2^-24 resp. 2^-53 of the values' scale, per update), and say so.
Everything lrfast computes on both sides (the multi_avg_fns, ``ema=``, lrfast.Averager) is
compared bitwise.
"""
from __future__ import annotations

import copy
import platform
import textwrap

import numpy as np
import pytest

import lrfast
from cases import run_python

torch = pytest.importorskip("torch")
LT = pytest.importorskip("lrfast.torch")
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn  # noqa: E402

DTYPES = [torch.float32, torch.float64]
# An exact-weight EMA (1 - decay = 1/16) and a general one.
EXACT_DECAY, DECAY = 0.9375, 0.99


# -- models and training ------------------------------------------------------------------

def small_model(dtype):
    """Linear, BatchNorm1d (float buffers and the int64 num_batches_tracked), LayerNorm."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).to(dtype)


def small_input(gen, dtype):
    return torch.randn(16, 6, generator=gen, dtype=dtype)


def transformer(dtype):
    """The bench's transformer stack: 9 encoder layers of width 32 and a linear head, 110
    parameter tensors (lrfast._bench.cases.TRANSFORMER_LAYER)."""
    torch.manual_seed(0)
    blocks = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
              for _ in range(9)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(32, 8)).to(dtype)


def transformer_input(gen, dtype):
    return torch.randn(4, 5, 32, generator=gen, dtype=dtype)


MODELS = {"small": (small_model, small_input), "transformer": (transformer, transformer_input)}


def train(model_name, dtype, steps, after, seed=1):
    """Train a model with torch.optim.AdamW, calling ``after(model, t)`` after step t."""
    make, data = MODELS[model_name]
    model = make(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        opt.zero_grad()
        model(data(gen, dtype)).pow(2).mean().backward()
        opt.step()
        after(model, t)
    return model


# -- comparisons ----------------------------------------------------------------------------

def _probe_torch_lerp_fused():
    """Does torch's CPU lerp fuse its multiply-add here? (Compared with the unfused formula
    written as separate tensor ops.)"""
    gen = torch.Generator().manual_seed(0)
    a, p = torch.randn(4096, generator=gen), torch.randn(4096, generator=gen)
    w = torch.tensor(0.3)
    lerped = a.clone()
    torch._foreach_lerp_([lerped], [p], 0.3)
    return not torch.equal(lerped, a + w * (p - a))


TORCH_FUSES = _probe_torch_lerp_fused()


def assert_bitwise(ours, theirs, what=""):
    for name, x in ours.items():
        y = theirs[name]
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name)
        assert torch.equal(x, y), f"{what} {name}: max diff {(x - y).abs().max().item()}"


def assert_rounding(ours, theirs, updates, what="", exact=False):
    """Equal, or (torch fusing its lerp and ``exact`` False) within the rounding of one
    product per update: ``updates`` times 2^-24 (float32) or 2^-53 (float64) of the tensor's
    scale (its largest magnitude, at least 1)."""
    if exact or not TORCH_FUSES:
        assert_bitwise(ours, theirs, what)
        return
    for name, x in ours.items():
        y = theirs[name]
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name)
        if not x.is_floating_point():
            assert torch.equal(x, y), (what, name)
            continue
        eps = 2.0 ** (-24 if x.dtype == torch.float32 else -53)
        scale = max(1.0, y.abs().max().item())
        diff = (x - y).abs().max().item()
        assert diff <= updates * eps * scale, f"{what} {name}: {diff} > {updates} ulp of {scale}"


def averaged_state(avg):
    """An AveragedModel's module: params and buffers by name, cloned."""
    return {k: v.detach().clone() for k, v in avg.module.state_dict().items()}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """torch's intra-op threads pinned to 1 here: the models are tiny, and on a loaded machine
    each of torch's parallel regions waits for a descheduled thread (a 16x16 batch_norm was
    measured at 47 ms with 2 threads on 2 busy cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# -- 1. the multi_avg_fns against torch's ----------------------------------------------------

FN_CASES = [("ema", EXACT_DECAY), ("ema", DECAY), ("swa", None)]


def make_fns(kind, decay):
    if kind == "ema":
        return LT.ema_multi_avg_fn(decay), get_ema_multi_avg_fn(decay)
    return LT.swa_multi_avg_fn(), get_swa_multi_avg_fn()


FN_PARAMS = [("small", kind, decay, use_buffers, dtype)
             for kind, decay in FN_CASES for use_buffers in (False, True) for dtype in DTYPES
             # (torch's SWA raises on BatchNorm's int64 buffer: see the next test)
             if not (kind == "swa" and use_buffers)]
# The transformer (no buffers) once per function, in both dtypes between them.
FN_PARAMS += [("transformer", "ema", EXACT_DECAY, False, torch.float32),
              ("transformer", "ema", DECAY, False, torch.float64),
              ("transformer", "swa", None, False, torch.float32)]


@pytest.mark.parametrize("model_name,kind,decay,use_buffers,dtype", FN_PARAMS,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_multi_avg_fn_matches_torch(model_name, kind, decay, use_buffers, dtype):
    ours_fn, torch_fn = make_fns(kind, decay)
    avgs = {}

    def after(model, t):
        if not avgs:
            avgs["ours"] = AveragedModel(model, multi_avg_fn=ours_fn, use_buffers=use_buffers)
            avgs["torch"] = AveragedModel(model, multi_avg_fn=torch_fn, use_buffers=use_buffers)
        avgs["ours"].update_parameters(model)
        avgs["torch"].update_parameters(model)

    steps = 20
    train(model_name, dtype, steps, after)
    assert avgs["ours"].n_averaged.item() == avgs["torch"].n_averaged.item() == steps
    assert_rounding(averaged_state(avgs["ours"]), averaged_state(avgs["torch"]), steps,
                    exact=decay == EXACT_DECAY)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swa_fn_raises_on_integer_buffers_as_torch(dtype):
    """use_buffers=True over BatchNorm: torch's SWA function raises on num_batches_tracked
    (an integer addcdiv), and so does ours, having written nothing of its own."""
    model = small_model(dtype)
    errors = []
    for fn in (LT.swa_multi_avg_fn(), get_swa_multi_avg_fn()):
        avg = AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
        avg.update_parameters(model)
        with pytest.raises(RuntimeError) as info:
            avg.update_parameters(model)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_multi_avg_fn_tensor_by_tensor():
    """One call with tensors the kernel takes (float32, float64, bfloat16, float16, empty) and
    ones torch's function takes (non-contiguous, complex, int64): each tensor as torch's
    function averages it, by its own dtype."""
    gen = torch.Generator().manual_seed(3)

    def pair(make):
        return make(), make()

    cases = [
        pair(lambda: torch.randn(40, generator=gen)),
        pair(lambda: torch.randn(5, 7, generator=gen, dtype=torch.float64)),
        pair(lambda: torch.randn(33, generator=gen).to(torch.bfloat16)),
        pair(lambda: torch.randn(33, generator=gen).to(torch.float16)),
        pair(lambda: torch.zeros(0)),
        pair(lambda: torch.randn(6, 4, generator=gen).t()),
        pair(lambda: torch.randn(9, generator=gen, dtype=torch.complex64)),
        pair(lambda: torch.randint(0, 1000, (8,), generator=gen)),
    ]
    # a weight that is a power of two (exact whether torch fuses or not)
    for ours_fn, torch_fn, n in [(LT.ema_multi_avg_fn(0.75), get_ema_multi_avg_fn(0.75), 0),
                                 (LT.swa_multi_avg_fn(), get_swa_multi_avg_fn(), 3)]:
        if ours_fn.kind == "swa":  # (torch's SWA raises on integers: below)
            cases = cases[:-1]
        ours = [(a.clone(), p) for a, p in cases]
        ours_fn([a for a, _ in ours], [p for _, p in ours], n)
        for (a0, p), (a, _) in zip(cases, ours):
            expected = a0.clone()
            torch_fn([expected], [p], n)
            assert torch.equal(a, expected), (a.dtype, a.shape)
    ints = torch.arange(4), torch.arange(4, 8)
    with pytest.raises(RuntimeError) as ours_error:
        LT.swa_multi_avg_fn()([ints[0]], [ints[1]], 3)
    with pytest.raises(RuntimeError) as torch_error:
        get_swa_multi_avg_fn()([ints[0].clone()], [ints[1]], 3)
    assert str(ours_error.value) == str(torch_error.value)
    assert ints[0].tolist() == [0, 1, 2, 3]


def test_multi_avg_fn_refusals():
    with pytest.raises(ValueError, match="decay must be a real number in"):
        LT.ema_multi_avg_fn(1.5)
    with pytest.raises(ValueError, match="decay must be a real number in"):
        LT.ema_multi_avg_fn(float("nan"))
    with pytest.raises(ValueError, match="decay must be a real number in"):
        LT.ema_multi_avg_fn(True)
    a, p = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="they go in pairs"):
        LT.ema_multi_avg_fn(0.5)([a], [p, p], 1)
    assert torch.equal(a, torch.zeros(3))
    assert repr(LT.ema_multi_avg_fn(0.5)) == "lrfast.torch.ema_multi_avg_fn(0.5)"
    assert repr(LT.swa_multi_avg_fn()) == "lrfast.torch.swa_multi_avg_fn()"


def test_multi_avg_fn_overlap_goes_to_torch():
    """A call where an average shares memory with another of its tensors is left to torch's
    function as a whole: it refuses a partial overlap (the call raises its error, nothing
    written) and takes an average that is its own current tensor."""
    buf = torch.arange(8.0)
    errors = []
    for fn in (LT.ema_multi_avg_fn(0.5), get_ema_multi_avg_fn(0.5)):
        with pytest.raises(RuntimeError) as info:
            fn([buf[:4]], [buf[2:6]], 1)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert buf.tolist() == list(range(8))
    x, y, q = torch.arange(4.0), torch.zeros(5), torch.full((5,), 4.0)
    LT.ema_multi_avg_fn(0.75)([x, y], [x, q], 1)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0] and y.tolist() == [1.0] * 5


def test_multi_avg_fn_layout_follows_memory():
    """The cached tables follow the tensors' memory: a tensor replaced by another between two
    calls is the one averaged."""
    fn = LT.ema_multi_avg_fn(0.75)
    a, p = torch.zeros(5), torch.full((5,), 4.0)
    fn([a], [p], 1)
    assert a.tolist() == [1.0] * 5
    a2, p2 = torch.zeros(5), torch.full((5,), 8.0)
    fn([a2], [p2], 1)
    assert a2.tolist() == [2.0] * 5 and a.tolist() == [1.0] * 5
    # deepcopy (AveragedModel's) and pickling keep the function, not its tables
    assert repr(copy.deepcopy(fn)) == repr(fn)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ATEN_CPU_CAPABILITY=default names torch's unfused x86 build")
def test_bitwise_with_torch_unfused():
    """With torch's baseline CPU kernels (no fused multiply-add), lrfast's functions and
    torch's agree bit for bit for any decay and for SWA, float32 and float64."""
    script = textwrap.dedent("""
        import torch, lrfast.torch as LT
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for dtype in (torch.float32, torch.float64):
            for ours, theirs in ((LT.ema_multi_avg_fn(0.99), get_ema_multi_avg_fn(0.99)),
                                 (LT.swa_multi_avg_fn(), get_swa_multi_avg_fn())):
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.LayerNorm(64),
                                            torch.nn.Linear(64, 4)).to(dtype)
                a, b = (AveragedModel(model, multi_avg_fn=f) for f in (ours, theirs))
                for t in range(12):
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(torch.randn_like(p))
                    a.update_parameters(model)
                    b.update_parameters(model)
                for x, y in zip(a.parameters(), b.parameters()):
                    assert torch.equal(x, y), (dtype, (x - y).abs().max())
        print("bitwise")
    """)
    # (from an empty folder: a source checkout in the working directory must not shadow the
    # lrfast this process imported, as in CI's installed runs)
    out = run_python(script, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    assert out.returncode == 0 and "bitwise" in out.stdout, out.stderr[-2000:]


# -- 2. lrfast.Averager on NumPy views of the same params --------------------------------------

def views(tensors):
    return [t.detach().numpy() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_numpy_averager_matches_averaged_model(kind, dtype):
    """Both sides are lrfast's kernel with the same weights: bitwise. (For SWA in float64 the
    weight is torch's: see the next test.)"""
    fn = LT.ema_multi_avg_fn(DECAY) if kind == "ema" else LT.swa_multi_avg_fn()
    state = {}

    def after(model, t):
        if not state:
            state["avg"] = AveragedModel(model, multi_avg_fn=fn)
            params = views(model.parameters())
            state["np"] = (lrfast.Averager(params, DECAY) if kind == "ema"
                           else lrfast.Averager(params, kind="swa"))
        state["avg"].update_parameters(model)
        state["np"].update()

    train("transformer", dtype, 15, after)
    ours = {str(i): torch.from_numpy(a) for i, a in enumerate(state["np"].averages)}
    theirs = {str(i): p.detach() for i, p in enumerate(state["avg"].module.parameters())}
    assert state["np"].num_averaged == state["avg"].n_averaged.item() == 15
    if kind == "swa" and dtype == torch.float64:
        # AveragedModel's weight 1/(n + 1) is a float32 tensor (torch's default dtype), the
        # Averager's a double: they differ by the float32 rounding of the weight, < 2^-24 of
        # it, which moves a mean of 15 samples by < 15 * 2^-24 of the params' scale.
        for k, x in ours.items():
            y = theirs[k]
            scale = max(1.0, y.abs().max().item())
            assert (x - y).abs().max().item() <= 15 * 2.0 ** -24 * scale
    else:
        assert_bitwise(ours, theirs)


def test_numpy_averager_swa_float64_default_dtype(default_float64):
    """With torch's default dtype float64, AveragedModel's SWA weight is a double too, and the
    Averager's float64 mean equals it bit for bit."""
    state = {}

    def after(model, t):
        if not state:
            state["avg"] = AveragedModel(model, multi_avg_fn=LT.swa_multi_avg_fn())
            state["np"] = lrfast.Averager(views(model.parameters()), kind="swa")
        state["avg"].update_parameters(model)
        state["np"].update()

    train("small", torch.float64, 15, after)
    assert_bitwise({str(i): torch.from_numpy(a) for i, a in enumerate(state["np"].averages)},
                   {str(i): p.detach() for i, p in enumerate(state["avg"].module.parameters())})


# -- 3. timm's ModelEmaV3 and ema-pytorch's EMA -----------------------------------------------

def timm_model_ema():
    """timm's ModelEmaV3, imported as the bench and the optimizer parity tests import timm's
    modules (without timm's package __init__, which needs torchvision)."""
    from lrfast._bench import peer_imports

    try:
        return peer_imports.timm_model_ema()
    except ImportError:
        pytest.skip("timm is not installed")


def float_state(model):
    """The float entries of a state dict (params and float buffers), by name."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


TIMM_CASES = {
    # (ModelEmaV3 keywords, the Averager's decay and start_step)
    "warmup": (dict(decay=0.999, min_decay=0.1, use_warmup=True, warmup_gamma=2.0,
                    warmup_power=0.75, update_after_step=3),
               lambda: lrfast.warmup_decay(0.999, inv_gamma=2.0, power=0.75, min_decay=0.1), 3),
    "fixed": (dict(decay=EXACT_DECAY, update_after_step=2), lambda: EXACT_DECAY, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_model_ema_v3(case, dtype):
    """ModelEmaV3 updated with ``step=t`` (its default: params and float buffers lerped, the
    int64 buffer copied): lrfast.Averager over the same float tensors. float64 within 1e-12
    (its decay in double, as the Averager's; only torch's fused lerp rounds differently),
    float32 within 1e-6 of the scale; bitwise for the fixed exact decay."""
    ModelEmaV3 = timm_model_ema()
    keywords, decay, start = TIMM_CASES[case]
    state = {}

    def after(model, t):
        if not state:
            state["timm"] = ModelEmaV3(model, **keywords)
            state["names"] = list(float_state(model))
            state["np"] = lrfast.Averager(views(float_state(model).values()), decay(),
                                          start_step=start)
        state["timm"].update(model, step=t)
        state["np"].update()

    train("small", dtype, 20, after)
    ours = dict(zip(state["names"], map(torch.from_numpy, state["np"].averages)))
    theirs = float_state(state["timm"].module)
    if case == "fixed" or not TORCH_FUSES:
        assert_bitwise(ours, theirs)
    else:
        rtol = 1e-12 if dtype == torch.float64 else 1e-6
        for k, x in ours.items():
            scale = max(1.0, theirs[k].abs().max().item())
            assert (x - theirs[k]).abs().max().item() <= rtol * scale, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_pytorch(dtype):
    """ema-pytorch's EMA (params and float buffers lerped; num_batches_tracked left alone):
    lrfast.Averager with warmup_decay(beta, inv_gamma, power, min_decay=min_value),
    start_step=update_after_step, update_every.

    Tolerance: ema-pytorch computes its decay in float32 tensors (the step counter is an int64
    tensor; its clamp(min=0.) makes the warmup float32) and hands lerp ``1 - decay.item()``:
    the decay is off by up to half a float32 ulp (2^-25 relative, < 3e-8), so each update
    moves the average by up to 3e-8 * |p - a| more or less than the Averager's double decay.
    Over 12 updates that stays below 1e-6 of the values' scale (measured: 6e-8 in float32,
    1.5e-9 in float64), where a wrong schedule (start_step or update_every off by one, power
    2/3 for 3/4) was measured to move them by 8e-3 or more."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    hyper = dict(beta=0.99, update_after_step=3, update_every=2, inv_gamma=2.0, power=0.75,
                 min_value=0.2)
    state = {}

    def after(model, t):
        if not state:
            state["ema"] = ema_pytorch.EMA(model, **hyper)
            state["names"] = list(float_state(model))
            state["np"] = lrfast.Averager(
                views(float_state(model).values()),
                lrfast.warmup_decay(0.99, inv_gamma=2.0, power=0.75, min_decay=0.2),
                start_step=3, update_every=2)
        state["ema"].update()
        state["np"].update()

    train("small", dtype, 24, after)
    ours = dict(zip(state["names"], map(torch.from_numpy, state["np"].averages)))
    theirs = float_state(state["ema"].ema_model)
    for k, x in ours.items():
        scale = max(1.0, theirs[k].abs().max().item())
        assert (x - theirs[k]).abs().max().item() <= 1e-6 * scale, k


def test_asgd_ax(default_float64):
    """torch ASGD's ``ax`` (the mean of the iterates from step t0 + 2 on) is
    lrfast.Averager(kind="swa", start_step=t0 + 1) updated after each step. With torch's
    default dtype float64, ASGD's mu (1/k) is a double, as the Averager's weight; the two
    differ only in torch's ``ax + (p - ax) mu`` against the lerp's second form at mu = 1/2."""
    t0 = 5
    model = small_model(torch.float64)
    params = list(model.parameters())
    opt = torch.optim.ASGD(params, lr=0.02, t0=t0, foreach=False)
    avg = lrfast.Averager(views(params), kind="swa", start_step=t0 + 1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        opt.zero_grad()
        model(small_input(gen, torch.float64)).pow(2).mean().backward()
        opt.step()
        avg.update()
    for p, a in zip(params, avg.averages):
        np.testing.assert_allclose(a, opt.state[p]["ax"].numpy(), rtol=1e-12, atol=1e-15)


# -- 4. ema= : the average fused into an lrfast.torch optimizer's step --------------------------

OPTIMIZERS = {
    "Adam": dict(lr=0.01),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "SGD": dict(lr=0.05, momentum=0.9),
    "Lion": dict(lr=0.001, weight_decay=0.1),
    "Lamb": dict(lr=0.01),  # two native passes: the average takes a pass of its own
    "Adafactor": dict(lr=0.01),  # its own plans: averaged after the step
}
EMA_CASES = [("ema", False), ("ema", True), ("swa", False)]


def groups_of(model):
    """Two groups, and the last bias in none (torch's AveragedModel averages it anyway)."""
    params = list(model.parameters())
    return [{"params": params[:-3]}, {"params": params[-3:-1], "weight_decay": 0.0}]


def fused_lockstep(name, kind, use_buffers, dtype, steps=12, model_name="small",
                   drop_grad=True):
    """Model A: the optimizer, then AveragedModel.update_parameters; model B: the same
    optimizer with ema=. B gets A's gradients and buffers at each step (so the two updates
    see the same numbers); on odd steps one param has no gradient."""
    make, data = MODELS[model_name]
    fn = LT.ema_multi_avg_fn(DECAY) if kind == "ema" else LT.swa_multi_avg_fn()
    model_a, model_b = make(dtype), make(dtype)
    avg_a = AveragedModel(model_a, multi_avg_fn=fn, use_buffers=use_buffers)
    avg_b = AveragedModel(model_b, multi_avg_fn=fn, use_buffers=use_buffers)
    cls = getattr(LT, name)
    opt_a = cls(groups_of(model_a), **OPTIMIZERS.get(name, {}))
    opt_b = cls(groups_of(model_b), **OPTIMIZERS.get(name, {}), ema=(avg_b, model_b))
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        opt_a.zero_grad()
        model_a(data(gen, dtype)).pow(2).mean().backward()
        if drop_grad and t % 2:
            next(model_a.parameters()).grad = None
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        with torch.no_grad():
            for b, c in zip(model_a.buffers(), model_b.buffers()):
                c.copy_(b)
        opt_a.step()
        avg_a.update_parameters(model_a)
        opt_b.step()
    return (model_a, avg_a), (model_b, avg_b), opt_b


def assert_lockstep(a, b):
    (model_a, avg_a), (model_b, avg_b) = a, b
    assert_bitwise(dict(model_b.state_dict()), dict(model_a.state_dict()), "model")
    assert_bitwise(dict(avg_b.state_dict()), dict(avg_a.state_dict()), "average")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,use_buffers", EMA_CASES, ids=["ema", "ema-buffers", "swa"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_ema_equals_update_parameters(name, kind, use_buffers, dtype):
    a, b, opt = fused_lockstep(name, kind, use_buffers, dtype)
    assert_lockstep(a, b)
    assert opt.ema is b[1]
    if name != "Adafactor":  # (the others' plans take the averages in their pass)
        assert any(plan.fused for plan in opt._plans.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ema_transformer(dtype):
    a, b, opt = fused_lockstep("AdamW", "ema", False, dtype, steps=10,
                               model_name="transformer", drop_grad=False)
    assert_lockstep(a, b)
    # every param of the optimizer is averaged in the step's pass (the head's bias, outside
    # the optimizer, after it)
    assert sum(len(plan.fused) for plan in opt._plans.values()) == 109


def test_fused_ema_half_and_cpuadam():
    """bfloat16 params (the kernel's float32 math, rounded), and CPUAdam (float32 master
    params writing bfloat16 copies in the same pass)."""
    a, b, _ = fused_lockstep("Adam", "ema", False, torch.bfloat16, steps=6)
    assert_lockstep(a, b)
    a, b, _ = fused_lockstep("CPUAdam", "swa", False, torch.float32, steps=6)
    assert_lockstep(a, b)


def test_fused_ema_memory_moved():
    """When the averaged module's memory moves (a param's .data replaced), the next step
    writes the new memory."""
    model = small_model(torch.float32)
    ref_model = copy.deepcopy(model)
    fn = LT.ema_multi_avg_fn(DECAY)
    avg, ref = AveragedModel(model, multi_avg_fn=fn), AveragedModel(ref_model, multi_avg_fn=fn)
    opt = LT.Adam(model.parameters(), lr=0.01, ema=(avg, model))
    ref_opt = LT.Adam(ref_model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        x = small_input(gen, torch.float32)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        if t == 3:
            w = avg.module[0].weight
            w.data = w.data.clone()
        opt.step()
        ref_opt.step()
        ref.update_parameters(ref_model)
    assert_bitwise(dict(avg.state_dict()), dict(ref.state_dict()))


def test_skipped_steps_leave_the_average():
    """A GradScaler step with an inf gradient does not call step(): nothing changes. A step
    that raises changes nothing either. The next applied step averages as usual."""
    model = small_model(torch.float32)
    avg = AveragedModel(model, multi_avg_fn=LT.ema_multi_avg_fn(DECAY))
    opt = LT.AdamW(model.parameters(), lr=0.01, ema=(avg, model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(1)

    def backward():
        opt.zero_grad()
        scaler.scale(model(small_input(gen, torch.float32)).pow(2).mean()).backward()

    backward()
    scaler.step(opt)
    scaler.update()
    assert avg.n_averaged.item() == 1
    before = averaged_state(avg)
    backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert avg.n_averaged.item() == 1
    assert_bitwise(averaged_state(avg), before)
    # a sparse gradient: the step raises before anything is written
    backward()
    scaler.unscale_(opt)
    first = next(model.parameters())
    good = first.grad
    first.grad = good.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert avg.n_averaged.item() == 1
    assert_bitwise(averaged_state(avg), before)
    first.grad = good
    scaler.step(opt)
    scaler.update()
    assert avg.n_averaged.item() == 2
    with torch.no_grad():
        w = (1 - DECAY) * 1.0
        expected = before["0.weight"] + w * (first - before["0.weight"])
    assert torch.allclose(avg.module[0].weight, expected, rtol=1e-6, atol=1e-7)


def test_ema_misuse():
    model = small_model(torch.float32)
    params = list(model.parameters())
    ours = AveragedModel(model, multi_avg_fn=LT.ema_multi_avg_fn(0.9))
    with pytest.raises(TypeError, match=r"a pair \(averaged_model, model\)"):
        LT.Adam(params, ema=ours)
    with pytest.raises(TypeError, match=r"a pair \(averaged_model, model\)"):
        LT.Adam(params, ema=(model, ours))
    for other, said in [(AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)),
                         "torch's get_ema_multi_avg_fn"),
                        (AveragedModel(model), "torch's default SWA"),
                        (AveragedModel(model, avg_fn=lambda a, p, n: a), "avg_fn=")]:
        with pytest.raises(ValueError, match="lrfast.torch.ema_multi_avg_fn") as info:
            LT.Adam(params, ema=(other, model))
        assert said in str(info.value)
    other_model = torch.nn.Sequential(torch.nn.Linear(6, 16))
    with pytest.raises(ValueError, match="the averaged module has 2 parameters, the model 8"):
        LT.Adam(params, ema=(AveragedModel(other_model, multi_avg_fn=LT.swa_multi_avg_fn()),
                             model))
    with pytest.raises(ValueError, match="parameter 0 of group 0 is not a parameter of the "
                                         "model"):
        LT.Adam([torch.nn.Parameter(torch.zeros(2))], ema=(ours, model))
    doubled = AveragedModel(model, multi_avg_fn=LT.ema_multi_avg_fn(0.9)).double()
    with pytest.raises(ValueError, match="parameter '0.weight' is .* torch.float64, the "
                                         "model's .* torch.float32"):
        LT.Adam(params, ema=(doubled, model))
    with pytest.raises(ValueError, match="torch's SWA raises on integer tensors"):
        LT.Adam(params, ema=(AveragedModel(model, multi_avg_fn=LT.swa_multi_avg_fn(),
                                           use_buffers=True), model))
    shared = AveragedModel(model, multi_avg_fn=LT.ema_multi_avg_fn(0.9))
    shared.module = model
    with pytest.raises(ValueError, match="shares memory with the model"):
        LT.Adam(params, ema=(shared, model))
    # a group added later must hold model params too; a refused one is not added
    opt = LT.Adam(params[:2], ema=(ours, model))
    with pytest.raises(ValueError, match="parameter 0 of group 1 is not a parameter"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:]})
    # the AveragedModel's function swapped for torch's after the fact: refused at the step,
    # before anything is written
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    ours.multi_avg_fn = get_swa_multi_avg_fn()
    with pytest.raises(ValueError, match="lrfast.torch.swa_multi_avg_fn"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert ours.n_averaged.item() == 0
    # a copy of the optimizer has no ema (it would update the old model's average)
    assert copy.deepcopy(opt).ema is None
