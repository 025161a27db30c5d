"""lrfast.torch with 8-bit state (``state_dtype="int8"`` or an ``Int8State``) and with
bfloat16/float16 state for float32 params.

The expected values come from lrfast.reference run in float32 on the state as the optimizer
reads it, with lrfast.quantization's NumPy rule around it: before each step every 8-bit buffer
is dequantised (``dequantize_blockwise``), the reference function updates the params and the
float32 state, and the state is quantised back (``quantize_blockwise``). Half state is the
same with ``reference.mixed_`` (every written half buffer rounded back after the float32 math).
Params, codes and scales are compared bit for bit."""
import copy
import inspect

import numpy as np
import pytest

from cases import CONFIGS, ReferenceRun, config_id, environment

torch = pytest.importorskip("torch")
import lrfast.torch as lt  # noqa: E402
from lrfast import _dispatch, reference  # noqa: E402
from lrfast._specs import OPTIMIZERS as SPECS  # noqa: E402
from lrfast.quantization import (Int8State, dequantize_blockwise,  # noqa: E402
                                 quantize_blockwise)

SHAPES = [(5000,), (70, 90), (100,)]  # the last below min_size: float32 state
STEPS = 5
# The element-wise updates with moments (CONFIGS' configurations of them)
INT8_NAMES = ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "RAdam", "NAdam",
              "Adadelta", "Lion")


def _int8_case(case):
    """A configuration of these classes that keeps a moment (not SGD without momentum) and
    that lrfast.torch's class takes (not Adagrad's lrfast-only eps_inside_sqrt)."""
    name, hyper, _ = case
    if name not in INT8_NAMES or not hasattr(lt, name):
        return False
    spec = SPECS[name]
    if not set(hyper) <= set(inspect.signature(getattr(lt, name)).parameters):
        return False
    return any(b.quant for b in spec.update.buffers
               if b.name in spec.update.state_buffers(spec.validate(hyper)))


INT8_CONFIGS = [c for c in CONFIGS if _int8_case(c)]
HALF = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def quant_of(name, buffer):
    return next(b.quant for b in SPECS[name].update.buffers if b.name == buffer)


def bits(t):
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, rng):
    grads = [rng.standard_normal(tuple(p.shape)).astype(np.float32) for p in params]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.copy()).to(p.dtype)
    return grads


class Int8Run:
    """lrfast.reference's update (``cases.ReferenceRun``) with the 8-bit state kept as
    (codes, scales) between steps: dequantised before each step, quantised after."""

    def __init__(self, name, hyper, params, settings):
        self.name = name
        self.settings = settings
        self.run = ReferenceRun(name, hyper, [p.detach().numpy() for p in params])
        self.codes = {}  # (buffer, k) -> (codes, scales)
        for buf, arrays in self.run.state.items():
            quant = quant_of(name, buf) if buf in dict.fromkeys(
                b.name for b in SPECS[name].update.buffers) else ""
            for k, a in enumerate(arrays):
                if quant and settings.quantizes(a.size):
                    self.codes[buf, k] = quantize_blockwise(a, quant == "signed",
                                                            settings.block_size)

    def step(self, grads):
        for (buf, k), (c, s) in self.codes.items():
            self.run.state[buf][k] = dequantize_blockwise(
                c, s, quant_of(self.name, buf) == "signed", self.settings.block_size)
        self.run.step(grads)
        for (buf, k) in self.codes:
            self.codes[buf, k] = quantize_blockwise(
                self.run.state[buf][k], quant_of(self.name, buf) == "signed",
                self.settings.block_size)

    def check(self, opt, params):
        for k, p in enumerate(params):
            np.testing.assert_array_equal(p.detach().numpy(), self.run.params[k],
                                          err_msg=f"param {k}")
            st = opt.state[p]
            for buf, arrays in self.run.state.items():
                if not isinstance(arrays, list) or arrays[k] is None or arrays[k].ndim == 0:
                    continue  # (scalar state: NAdam's mu_product)
                if (buf, k) in self.codes:
                    c, s = self.codes[buf, k]
                    assert st[buf].dtype == torch.uint8, (buf, k, st[buf].dtype)
                    np.testing.assert_array_equal(st[buf].numpy(), c, err_msg=f"{buf}[{k}]")
                    np.testing.assert_array_equal(st[buf + "_absmax"].numpy(), s,
                                                  err_msg=f"{buf}_absmax[{k}]")
                else:
                    assert st[buf].dtype == torch.float32 and buf + "_absmax" not in st
                    np.testing.assert_array_equal(st[buf].numpy(), arrays[k],
                                                  err_msg=f"{buf}[{k}]")


def int8_run(name, hyper, settings, state_dtype, shapes=SHAPES, steps=STEPS):
    params = make_params(shapes)
    run = Int8Run(name, hyper, params, settings)
    opt = getattr(lt, name)(params, state_dtype=state_dtype, **hyper)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        grads = set_grads(params, rng)
        opt.step()
        run.step(grads)
    return run, opt, params


@pytest.mark.parametrize("case", INT8_CONFIGS, ids=config_id)
def test_int8_state_matches_reference_bitwise(case):
    name, hyper, _ = case
    run, opt, params = int8_run(name, hyper, Int8State(), "int8")
    assert run.codes, "no buffer was kept in 8 bits"
    run.check(opt, params)


@pytest.mark.parametrize("case", [("Adam", dict(lr=0.01, amsgrad=True), True),
                                  ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True), True),
                                  ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True), True),
                                  ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1),
                                   True)],
                         ids=config_id)
def test_int8_block_size_64_and_min_size(case):
    name, hyper, _ = case
    settings = Int8State(block_size=64, min_size=100)  # the (100,) param is 8-bit too
    run, opt, params = int8_run(name, hyper, settings, settings)
    assert any(k == 2 for _, k in run.codes)
    run.check(opt, params)
    # blocks of 64: ceil(5000 / 64) = 79 scales
    buf = next(b for b in opt.state[params[0]] if b.endswith("_absmax"))
    assert opt.state[params[0]][buf].shape == (79,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_state_of_half_params_matches_reference_bitwise(dtype):
    """bfloat16/float16 params: the update in float32 on the widened param and the dequantised
    state, the param rounded back to nearest (reference.mixed_), the state quantised."""
    shapes = [(4100,), (64, 80)]
    params = make_params(shapes, dtype)
    opt = lt.AdamW(params, lr=0.01, weight_decay=0.1, state_dtype="int8")
    values = SPECS["AdamW"].validate(dict(lr=0.01, weight_decay=0.1))
    p_bits = [bits(p) for p in params]
    codes = {(n, k): quantize_blockwise(np.zeros(s, np.float32), n == "exp_avg")
             for n in ("exp_avg", "exp_avg_sq") for k, s in enumerate(shapes)}
    rng = np.random.default_rng(2)
    kwargs = {h.name: values[h.name] for h in SPECS["AdamW"].update.hypers if h.functional}
    for t in range(1, STEPS + 1):
        set_grads(params, rng)
        opt.step()
        state = {n: [dequantize_blockwise(*codes[n, k], n == "exp_avg")
                     for k in range(len(shapes))] for n in ("exp_avg", "exp_avg_sq")}
        g_bits = [bits(p.grad) for p in params]
        reference.mixed_(reference.adam_, {"param": p_bits, "grad": g_bits,
                                           "exp_avg": state["exp_avg"],
                                           "exp_avg_sq": state["exp_avg_sq"]},
                         {"param": HALF[dtype], "grad": HALF[dtype], "exp_avg": "float32",
                          "exp_avg_sq": "float32"}, step=t, **kwargs)
        for n in state:
            for k in range(len(shapes)):
                codes[n, k] = quantize_blockwise(state[n][k], n == "exp_avg")
    for k, p in enumerate(params):
        np.testing.assert_array_equal(bits(p), p_bits[k])
        for n in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(opt.state[p][n].numpy(), codes[n, k][0])
            np.testing.assert_array_equal(opt.state[p][n + "_absmax"].numpy(), codes[n, k][1])


@pytest.mark.parametrize("value", [0.0, 0.1, 3.0])
def test_int8_initial_state_is_the_quantised_initial_value(value):
    """Adagrad makes its state when params are added: every block the quantised constant (0:
    the code of 0 and zero scales), as the state a float32 Adagrad starts with, quantised."""
    w = torch.zeros(5000, requires_grad=True)
    opt = lt.Adagrad([w], lr=0.1, initial_accumulator_value=value, state_dtype="int8")
    c, s = quantize_blockwise(np.full(5000, value, np.float32), False)
    assert torch.equal(opt.state[w]["sum"], torch.from_numpy(c))
    assert torch.equal(opt.state[w]["sum_absmax"], torch.from_numpy(s))
    m = torch.zeros(70, 90, requires_grad=True)
    opt = lt.SGD([m], lr=0.1, momentum=0.9, state_dtype="int8")
    m.grad = torch.zeros(70, 90)
    opt.step()  # (a zero gradient: the buffer reads as zeros)
    c, s = quantize_blockwise(np.zeros((70, 90), np.float32), True)
    assert torch.equal(opt.state[m]["momentum_buffer"], torch.from_numpy(c))
    assert torch.equal(opt.state[m]["momentum_buffer_absmax"], torch.from_numpy(s))


def test_int8_same_for_any_thread_count_and_survives_deepcopy():
    """Threads split the work at block boundaries: 1, 2 and 3 threads (each splitting even
    small tensors) give the same bits."""
    results = []
    for n in (1, 2, 3):
        with environment(_dispatch.name, n, 1):
            opt, params = trained(Int8State(block_size=32), steps=3, name="RMSprop",
                                  hyper=dict(lr=0.01, momentum=0.5, centered=True))
        results.append(([p.detach().numpy().tobytes() for p in params],
                        state_bytes(opt, params)))
    assert results[0] == results[1] == results[2]
    c = copy.deepcopy(opt)
    assert c._state_dtype == Int8State(block_size=32)
    assert state_bytes(c, c.param_groups[0]["params"]) == state_bytes(opt, params)


def test_int8_keeps_float32_state_where_nothing_is_a_moment():
    """Rprop's step sizes and ASGD's average are not moments: accepted, kept in float32."""
    for name in ("Rprop", "ASGD"):
        params = make_params([(5000,)])
        opt = getattr(lt, name)(params, lr=0.01, state_dtype="int8")
        set_grads(params, np.random.default_rng(0))
        opt.step()
        for n, v in opt.state[params[0]].items():
            if v.dim():
                assert v.dtype == torch.float32, (name, n, v.dtype)
            assert not n.endswith("_absmax")


# ------------------------------------------------------------------------------------------
# bfloat16 / float16 state for float32 params
# ------------------------------------------------------------------------------------------

def half_state_run(name, hyper, sdtype, rounding="nearest", seed=0, steps=STEPS):
    shapes = [(1027,), (33, 17), (5,)]
    params = make_params(shapes)
    opt = getattr(lt, name)(params, state_dtype=sdtype, rounding=rounding, seed=seed, **hyper)
    update = SPECS[name].update
    values = SPECS[name].validate(hyper)
    sst = HALF[sdtype]
    ref_params = [p.detach().numpy().copy() for p in params]
    state = {b: [reference.narrow(np.full(s, update.initial_value(b, values), np.float32)
                                  .reshape(-1), sst).reshape(s) for s in shapes]
             for b in update.state_buffers(values)}
    kwargs = {h.name: values[h.name] for h in update.hypers if h.functional}
    rng = np.random.default_rng(4)
    for t in range(1, steps + 1):
        grads = set_grads(params, rng)
        opt.step()
        buffers = {"param": ref_params, "grad": grads}
        storages = {"param": "float32", "grad": "float32"}
        for b in update.buffers:
            buffers[b.argname] = state.get(b.name)
            storages[b.argname] = sst
        # SGD keeps no step: its hash step is 1 at the buffer's first step, else calls + 1
        hash_step = (1 if t == 1 else t + 1) if name == "SGD" else t
        reference.mixed_(getattr(reference, update.name + "_"), buffers, storages,
                         step=hash_step, rounding=rounding, seed=seed, **kwargs)
    for k, p in enumerate(params):
        np.testing.assert_array_equal(p.detach().numpy(), ref_params[k], err_msg=f"param {k}")
        for b, arrays in state.items():
            assert opt.state[p][b].dtype == sdtype
            np.testing.assert_array_equal(bits(opt.state[p][b]), arrays[k], err_msg=f"{b}[{k}]")
    return opt, params


@pytest.mark.parametrize("case", [("Adam", dict(lr=0.01), True),
                                  ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True), True),
                                  ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), True),
                                  ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True), True),
                                  ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1), True),
                                  ("Lion", dict(lr=0.01, weight_decay=0.1), False)],
                         ids=config_id)
def test_bfloat16_state_of_float32_params_matches_reference_bitwise(case):
    name, hyper, _ = case
    half_state_run(name, hyper, torch.bfloat16)


def test_half_state_of_float32_params_stochastic_and_float16():
    half_state_run("Adam", dict(lr=0.01, amsgrad=True), torch.bfloat16, "stochastic", 99)
    half_state_run("SGD", dict(lr=0.05, momentum=0.9), torch.bfloat16, "stochastic", 7)
    half_state_run("Adam", dict(lr=0.01), torch.float16)


# ------------------------------------------------------------------------------------------
# state_dict: round trip, resume, conversions
# ------------------------------------------------------------------------------------------

def trained(state_dtype, steps=3, name="Adam", hyper=None, seed=0):
    params = make_params(SHAPES, seed=seed)
    opt = getattr(lt, name)(params, state_dtype=state_dtype, **(hyper or dict(lr=0.01)))
    rng = np.random.default_rng(seed + 10)
    for _ in range(steps):
        set_grads(params, rng)
        opt.step()
    return opt, params


def state_bytes(opt, params):
    return [{n: (v.dtype, v.numpy().tobytes()) for n, v in opt.state[p].items()}
            for p in params]


def test_state_dict_round_trip_is_bit_exact_and_resume_continues_identically():
    # uninterrupted: 5 steps
    full, fparams = trained("int8", steps=5)
    # interrupted after 3: params and the state dict saved, loaded into a new optimizer
    part, pparams = trained("int8", steps=3)
    sd = copy.deepcopy(part.state_dict())
    saved_params = [p.detach().clone() for p in pparams]
    names = [list(part.state[p]) for p in pparams]
    assert names[0] == ["exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax", "step"]
    new_params = [p.clone().requires_grad_() for p in saved_params]
    opt = lt.Adam(new_params, lr=0.01, state_dtype="int8")
    opt.load_state_dict(sd)
    assert state_bytes(opt, new_params) == state_bytes(part, pparams)
    assert opt.state_dict()["state"].keys() == sd["state"].keys()
    # ... and it continues as the uninterrupted run (the same grads: the rng replayed)
    rng = np.random.default_rng(10)
    for _ in range(3):
        set_grads(new_params, rng)  # (skipping the first three steps' grads)
    for _ in range(2):
        set_grads(new_params, rng)
        opt.step()
    for a, b in zip(new_params, fparams):
        assert torch.equal(a, b)
    assert state_bytes(opt, new_params) == state_bytes(full, fparams)


def test_float32_state_loads_into_int8_quantised():
    src, params = trained(None)
    opt = lt.Adam(params, lr=0.01, state_dtype="int8")
    opt.load_state_dict(src.state_dict())
    for k, p in enumerate(params):
        for n, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            x = src.state[p][n].numpy()
            if k < 2:
                c, s = quantize_blockwise(x, signed)
                assert torch.equal(opt.state[p][n], torch.from_numpy(c))
                assert torch.equal(opt.state[p][n + "_absmax"], torch.from_numpy(s))
            else:  # below min_size: float32, as it was
                assert torch.equal(opt.state[p][n], src.state[p][n])
                assert n + "_absmax" not in opt.state[p]
    set_grads(params, np.random.default_rng(0))
    opt.step()  # and it steps


def test_int8_state_loads_into_float32_dequantised_and_other_block_sizes_requantised():
    src, params = trained("int8")
    sd = src.state_dict()
    for state_dtype in (None, torch.float32, torch.bfloat16):
        opt = lt.Adam(params, lr=0.01, state_dtype=state_dtype)
        opt.load_state_dict(sd)
        want = state_dtype or torch.float32
        for k, p in enumerate(params):
            assert not any(n.endswith("_absmax") for n in opt.state[p])
            for n, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                st = src.state[p]
                x = (dequantize_blockwise(st[n].numpy(), st[n + "_absmax"].numpy(), signed)
                     if k < 2 else st[n].numpy())
                assert opt.state[p][n].dtype == want
                assert torch.equal(opt.state[p][n], torch.from_numpy(x).to(want))
    # into blocks of 64: dequantised with the dict's blocks (read from the count of scales),
    # quantised with the optimizer's
    opt = lt.Adam(params, lr=0.01, state_dtype=Int8State(block_size=64))
    opt.load_state_dict(sd)
    st = src.state[params[1]]
    x = dequantize_blockwise(st["exp_avg"].numpy(), st["exp_avg_absmax"].numpy(), True)
    c, s = quantize_blockwise(x, True, 64)
    assert torch.equal(opt.state[params[1]]["exp_avg"], torch.from_numpy(c))
    assert torch.equal(opt.state[params[1]]["exp_avg_absmax"], torch.from_numpy(s))
    set_grads(params, np.random.default_rng(0))
    opt.step()


def test_bad_8bit_state_is_refused_with_nothing_changed():
    opt, params = trained("int8")
    before = state_bytes(opt, params)
    good = opt.state_dict()

    def bad(edit):
        sd = copy.deepcopy(good)
        edit(sd["state"][0])
        return sd

    cases = [
        (lambda e: e.__setitem__("exp_avg", e["exp_avg"][:-1]), "8-bit codes"),
        (lambda e: e.__setitem__("exp_avg_absmax", e["exp_avg_absmax"].double()),
         "block scales"),
        (lambda e: e.__setitem__("exp_avg_absmax", e["exp_avg_absmax"][:7]), "no block size"),
        (lambda e: e.pop("exp_avg_absmax"), "block scales of 'exp_avg'"),
        (lambda e: e.pop("exp_avg"), "has no 'exp_avg'"),
        (lambda e: e.__setitem__("exp_avg", torch.zeros(4999)), "must be 8-bit codes"),
        (lambda e: (e.pop("exp_avg_absmax"), e.__setitem__("exp_avg", torch.zeros(4999))),
         "does not match its parameter"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad(edit))
        assert state_bytes(opt, params) == before
    # state assigned directly (as ZeroRedundancyOptimizer does) is checked at the step
    st = opt.state[params[0]]
    keep = st["exp_avg_absmax"]
    st["exp_avg_absmax"] = torch.zeros(3)
    p0 = [p.detach().clone() for p in params]
    set_grads(params, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not fit 8-bit state"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(p0, params))
    st["exp_avg_absmax"] = keep
    opt.step()


# ------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------

def test_int8_refusals():
    f64 = torch.zeros(5000, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="not available for parameter 0 of group 0 of dtype "
                                         "torch.float64"):
        lt.Adam([f64], state_dtype="int8")
    c64 = torch.zeros(5000, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16 params only"):
        lt.Adam([c64], state_dtype="int8")
    # a float64 group added later: refused, the optimizer as it was
    w = torch.zeros(5000, requires_grad=True)
    opt = lt.Adam([w], state_dtype="int8")
    with pytest.raises(ValueError, match="parameter 0 of group 1 of dtype torch.float64"):
        opt.add_param_group({"params": [f64]})
    assert len(opt.param_groups) == 1
    # not element-wise, or several passes over the state
    for name in ("Lamb", "Lars", "Adopt"):
        with pytest.raises(ValueError, match=f"not available for lrfast.torch.{name}: its "
                                             "update reads each tensor's whole state"):
            getattr(lt, name)([w], state_dtype="int8")
    for name in ("Adafactor", "AdamWScheduleFree", "SGDScheduleFree"):
        with pytest.raises(ValueError, match=f"not available for lrfast.torch.{name}: its "
                                             "update is not a one-pass element-wise"):
            getattr(lt, name)([w], state_dtype=Int8State())
    for bad in (100, 16, 4096, 0, 256.0):
        with pytest.raises(ValueError, match="block_size must be a power of two"):
            lt.Adam([w], state_dtype=Int8State(block_size=bad))
    with pytest.raises(ValueError, match="state_dtype must be None"):
        lt.Adam([w], state_dtype="int4")
    with pytest.raises(ValueError, match="state_dtype=torch.bfloat16 is not available"):
        lt.Adam([f64], state_dtype=torch.bfloat16)
    # a float32 optimizer refuses 8-bit codes assigned into its state
    opt = lt.Adam([w], lr=0.01)
    opt.state[w].update(step=torch.tensor(0.0), exp_avg=torch.zeros(5000, dtype=torch.uint8),
                        exp_avg_absmax=torch.zeros(20), exp_avg_sq=torch.zeros(5000))
    w.grad = torch.ones(5000)
    with pytest.raises(ValueError, match="holds 8-bit codes"):
        opt.step()
    assert bool((w == 0).all())


def test_memory_per_param():
    """State bytes per element of a 1M-element Adam param (buffers only; the 0-d step aside):
    2 codes + 2 scales per 256 elements with 8-bit state, 2 x 2 with bfloat16, 2 x 4 float32."""
    n = 1 << 20
    out = {}
    for sd in ("int8", torch.bfloat16, None):
        w = torch.zeros(n, requires_grad=True)
        opt = lt.Adam([w], lr=0.01, state_dtype=sd)
        w.grad = torch.ones(n)
        opt.step()
        out[str(sd)] = sum(v.numel() * v.element_size()
                           for k, v in opt.state[w].items() if k != "step") / n
    assert out["int8"] <= 2.05 and out["int8"] == 2 + 2 * 4 / 256, out
    assert out["torch.bfloat16"] == 4 and out["None"] == 8, out


def test_docstrings_name_the_new_values():
    for cls in (lt.Adam, lt.SGD, lt.Lion):
        assert "'int8'" in cls.__doc__ and "Int8State" in cls.__doc__
        assert "torch.bfloat16" in cls.__doc__
    assert "int8" in lt.__doc__
