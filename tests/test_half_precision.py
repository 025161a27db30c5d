"""Half precision in the NumPy API: every optimizer over bfloat16/float16 params, grads and state,
float32 master weights with half grads and a half copy out, rounded to nearest or
stochastically. Each run is held bit for bit to lrfast.reference.mixed_, which widens to
float32, runs the NumPy reference update and rounds back in NumPy."""
import numpy as np
import pytest

import lrfast
from lrfast import functional as F
from lrfast import reference as R
from lrfast._specs import OPTIMIZERS as SPECS

from cases import CONFIGS, OPTIMIZERS, config_id, environment, step_kwargs

try:
    import ml_dtypes
except ImportError:  # the uint16-bits form is tested either way
    ml_dtypes = None

SHAPES = [(7, 5), (300,), (2, 3, 4)]

# (params, grads, state, half copy): the combinations of offloaded and half-precision training.
COMBOS = [
    ("bfloat16", "bfloat16", "bfloat16", None),
    ("float16", "float16", "float16", None),
    ("bfloat16", "bfloat16", "float32", None),
    ("float16", "float16", "float32", None),
    ("float32", "bfloat16", "float32", "bfloat16"),
    ("float32", "float16", "float32", "float16"),
    ("float32", "bfloat16", "float32", None),
    ("float32", "float32", "float32", "bfloat16"),
]


def combo_id(c):
    return "-".join("none" if x is None else x.replace("float", "f").replace("bf", "bf")
                    for x in c)


class Arrays:
    """Arrays of one element type as the API takes them (ml_dtypes or uint16 bits) and as the
    reference takes them (float32 arrays, or the same memory viewed as uint16 bits)."""

    def __init__(self, storage, bits):
        self.storage = storage
        self.bits = bits

    def make(self, x):
        x = np.asarray(x, np.float32)
        if self.storage == "float32":
            return x.copy()
        if self.storage == "float16":
            return R.narrow(x.ravel(), "float16").view(np.float16).reshape(x.shape)
        b = R.narrow(x.ravel(), "bfloat16").reshape(x.shape)
        return b if self.bits else b.view(ml_dtypes.bfloat16)

    def zeros(self, shape):
        return self.make(np.zeros(shape, np.float32))

    def ref(self, a):
        """The reference's view of an array made here."""
        return a if self.storage == "float32" else a.view(np.uint16)


def _bits_modes():
    return [True] if ml_dtypes is None else [False, True]


def _grads(rng, grad_type, t):
    return [grad_type.make(rng.standard_normal(s) * (0.5 + t)) for s in SHAPES]


def _run_both(name, hyper, combo, rounding, bits, steps=3, threads=None):
    """Step ``name`` with the NumPy API and lrfast.reference.mixed_ on the same data; return
    (optimizer, its params, half copy, reference params, state, half copy)."""
    ps, gs, ss, out = combo
    P, G, S = Arrays(ps, bits), Arrays(gs, bits), Arrays(ss, bits)
    O = None if out is None else Arrays(out, bits)
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s) for s in SHAPES]
    params = [P.make(x) for x in start]
    half = None if O is None else [O.zeros(s) for s in SHAPES]
    opt = OPTIMIZERS[name](params, **hyper, state_dtype="float32" if ss != ps else None,
                           half_out=half, rounding=rounding, seed=1234, bfloat16_bits=bits)
    # The reference's own copies: params of the params' type, state as the optimizer allocates
    # it (zeros, Adagrad's sum at initial_accumulator_value).
    spec = SPECS[name]
    values = spec.validate(hyper)
    update = spec.update
    active = update.state_buffers(values)
    ref_params = [P.ref(P.make(x)) for x in start]

    def first_value(b, s, x):
        if b.starts_as_param:  # a copy of the param (schedule-free's z), in the state's type
            p = P.make(x)
            return p.astype(np.float32) if ps == "float32" else R.widen(P.ref(p), ps)
        return np.full(s, update.initial_value(b.name, values))

    ref_state = {b.argname: [S.ref(S.make(first_value(b, s, x))) for s, x in zip(SHAPES, start)]
                 if b.name in active else None
                 for b in update.buffers}
    ref_half = None if O is None else [O.ref(O.zeros(s)) for s in SHAPES]
    kwargs = {h.name: values[h.name] for h in update.hypers if h.functional}
    # scalar state (NAdam, ASGD): one 0-d float32 array per call, as the optimizer keeps it
    kwargs.update({b.argname: np.array(update.initial_value(b.name, values), np.float32)
                   for b in update.scalar_state})
    storages = {"param": ps, "grad": gs, **{b.argname: ss for b in update.buffers}}
    grng = np.random.default_rng(1)
    scalar_state: dict = {}
    # With ``threads``, one element per thread at least: these small tensors are then split
    # over that many threads (by default they are below every update's threshold).
    with environment(lrfast._dispatch.name, threads or lrfast.get_num_threads(),
                     1 if threads else None):
        for t in range(1, steps + 1):
            grads = _grads(grng, G, t)
            assert opt.step(grads)
            R.mixed_(getattr(R, update.name + "_"),
                     {"param": ref_params, "grad": [G.ref(g) for g in grads], **ref_state},
                     storages, step=t, rounding=rounding, seed=1234, out=ref_half,
                     out_storage=out, **{**kwargs, **step_kwargs(update, values, t, scalar_state)})
    return opt, params, half, ref_params, ref_state, ref_half, P, S, O


def _assert_bitwise(got, expected, what):
    got = np.ascontiguousarray(got).view(np.uint8)
    expected = np.ascontiguousarray(expected).view(np.uint8)
    assert np.array_equal(got, expected), what


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_every_optimizer_and_type_combination_is_bitwise_the_reference(case, combo, rounding):
    name, hyper, _ = case
    if name == "Adafactor":
        pytest.skip("Adafactor updates float32/float64 only: its per-tensor passes do not run "
                    "through the half-precision tile driver (refusal tested in test_factored)")
    bits = ml_dtypes is None or hash((name, combo, rounding)) % 2 == 0
    opt, params, half, rp, rstate, rhalf, P, S, O = _run_both(name, hyper, combo, rounding, bits)
    sd = opt.state_dict()["state"]
    update = SPECS[name].update
    for k in range(len(SHAPES)):
        _assert_bitwise(P.ref(params[k]), rp[k], f"param {k}")
        for b in update.buffers:
            if rstate[b.argname] is not None:
                _assert_bitwise(S.ref(sd[k][b.name]), rstate[b.argname][k], f"{b.name} {k}")
        if half is not None:
            _assert_bitwise(O.ref(half[k]), rhalf[k], f"half_out {k}")
            if rounding == "nearest":  # the copy is the new float32 params rounded
                _assert_bitwise(O.ref(half[k]).ravel(), R.narrow(params[k].ravel(), O.storage),
                                "half_out is the rounded params")


@pytest.mark.parametrize("combo", [COMBOS[0], COMBOS[4]], ids=combo_id)
def test_stochastic_rounding_is_the_same_for_any_thread_count(combo):
    runs = [_run_both("Adam", dict(lr=0.01), combo, "stochastic", True, threads=n)
            for n in (1, 2)]
    for a, b in zip(runs[0][1], runs[1][1]):
        _assert_bitwise(a, b, "params")
    # and the seed matters: another seed gives other bits
    P = Arrays(combo[0], True)
    rng = np.random.default_rng(0)
    params = [P.make(rng.standard_normal(s)) for s in SHAPES]
    opt = lrfast.Adam(params, lr=0.01, rounding="stochastic", seed=99, bfloat16_bits=True,
                      state_dtype="float32" if combo[2] != combo[0] else None,
                      half_out=None if combo[3] is None else [np.zeros(s, np.uint16)
                                                              for s in SHAPES])
    grng = np.random.default_rng(1)
    opt.step(_grads(grng, Arrays(combo[1], True), 1))
    differs = [not np.array_equal(P.ref(a), P.ref(b)) for a, b in zip(params, runs[0][1])]
    if combo[0] != "float32":
        assert any(differs)


@pytest.mark.parametrize("bits", _bits_modes())
def test_half_state_checkpoint_resumes_bit_exactly(bits):
    P = Arrays("bfloat16", bits)
    rng = np.random.default_rng(3)
    start = [rng.standard_normal(s) for s in SHAPES]

    def make():
        return lrfast.AdamW([P.make(x) for x in start], lr=0.01, rounding="stochastic", seed=5,
                            bfloat16_bits=bits)

    grads = [_grads(np.random.default_rng(t), P, t) for t in range(6)]
    straight = make()
    for g in grads:
        straight.step(g)
    first = make()
    for g in grads[:3]:
        first.step(g)
    saved = first.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    for p, q in zip(resumed.params, first.params):
        p[...] = q
    for g in grads[3:]:
        resumed.step(g)
    for a, b in zip(straight.params, resumed.params):
        _assert_bitwise(a, b, "params after resume")


def test_grads_may_change_element_type_between_steps():
    """float32 master weights take float32 grads one step and bf16/fp16 ones the next: the
    update follows (each step held to the reference with that step's grad type)."""
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params = [x.copy() for x in start]
    ref = [x.copy() for x in start]
    m = [np.zeros(s, np.float32) for s in SHAPES]
    v = [np.zeros(s, np.float32) for s in SHAPES]
    opt = lrfast.Adam(params, lr=0.01, bfloat16_bits=True)
    for t, gtype in enumerate(["bfloat16", "float32", "float16", "bfloat16"], start=1):
        G = Arrays(gtype, True)
        grads = _grads(rng, G, t)
        opt.step(grads)
        R.mixed_(R.adam_, {"param": ref, "grad": [G.ref(g) for g in grads], "exp_avg": m,
                           "exp_avg_sq": v}, {"param": "float32", "grad": gtype,
                                              "exp_avg": "float32", "exp_avg_sq": "float32"},
                 step=t, lr=0.01)
        for a, b in zip(params, ref):
            _assert_bitwise(a, b, f"step {t} ({gtype} grads)")


def test_stochastic_rounding_keeps_bfloat16_training_from_stalling():
    """Plain SGD on a quadratic, everything in bfloat16. Near the optimum each update
    (lr * gradient ~ 1e-4) is far below half the spacing of bfloat16 numbers near 1 (2^-8),
    so rounding to nearest gives back the same weights every step: training stalls. Rounded
    stochastically, each update moves the weight up with the probability its size warrants,
    and the expected trajectory is the exact one."""
    n = 20_000
    target = np.float32(1.0 + 0.3 * 2.0**-7)  # between two bfloat16 numbers
    lr, steps = 0.05, 400
    results = {}
    for rounding in ("nearest", "stochastic"):
        w = R.narrow(np.full(n, 1.02, np.float32), "bfloat16")
        opt = lrfast.SGD([w], lr=lr, rounding=rounding, seed=7, bfloat16_bits=True)
        for _ in range(steps):
            grad = R.narrow(R.widen(w, "bfloat16") - target, "bfloat16")
            opt.step([grad])
        results[rounding] = R.widen(w, "bfloat16").astype(np.float64)
    # Exact SGD: w - target shrinks by (1 - lr) each step, to 0.02 * 0.95^400 ~ 1e-11.
    stalled = np.abs(results["nearest"] - target).mean()
    moving = np.abs(results["stochastic"].mean() - target)
    assert stalled > 1e-3           # round-to-nearest stopped about 2^-8 * 0.3 .. 0.7 away
    assert moving < stalled / 20    # the stochastic run's mean reached the target


@pytest.mark.parametrize("bits", _bits_modes())
def test_flat_params_with_a_half_twin_and_half_grads(bits):
    flat = lrfast.FlatParams({"w": (4, 3), "b": (5,)}, half="bfloat16", grad_dtype=np.float16,
                             bfloat16_bits=bits, init={"w": np.ones((4, 3))})
    assert flat.grad.dtype == np.float16 and flat.halves["w"].shape == (4, 3)
    flat.grads["w"][...] = 0.5
    flat.grads["b"][...] = -2.0
    ref = flat.param.copy()
    m, v = np.zeros_like(ref), np.zeros_like(ref)
    opt = lrfast.Adam(flat, lr=0.1)
    opt.step()
    R.mixed_(R.adam_, {"param": [ref], "grad": [flat.grad.view(np.uint16)], "exp_avg": [m],
                       "exp_avg_sq": [v]},
             {"param": "float32", "grad": "float16", "exp_avg": "float32",
              "exp_avg_sq": "float32"}, step=1, lr=0.1)
    _assert_bitwise(flat.param, ref, "params")
    _assert_bitwise(flat.half.view(np.uint16), R.narrow(ref, "bfloat16"), "half twin")


def test_bfloat16_flat_params_save_and_load(tmp_path):
    if ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed")
    flat = lrfast.FlatParams({"w": (3,)}, dtype="bfloat16", init={"w": np.array([1.5, -2, 3])})
    flat.save(tmp_path / "f.npz")
    back = lrfast.FlatParams.load(tmp_path / "f.npz")
    assert back.dtype == flat.dtype
    _assert_bitwise(back.param, flat.param, "param")


def test_functional_half_out_and_mixed_types_match_the_reference():
    rng = np.random.default_rng(8)
    p = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    g = [R.narrow(rng.standard_normal(s).ravel().astype(np.float32), "bfloat16").reshape(s)
         for s in SHAPES]
    buf = [np.zeros(s, np.float32) for s in SHAPES]
    out = [np.zeros(s, np.float16) for s in SHAPES]
    rp, rbuf = [x.copy() for x in p], [x.copy() for x in buf]
    rout = [np.zeros(s, np.uint16) for s in SHAPES]
    for t in (1, 2):
        F.sgd_(p, g, buf, step=t, lr=0.1, momentum=0.9, half_out=out, bfloat16_bits=True)
        R.mixed_(R.sgd_, {"param": rp, "grad": g, "momentum_buffer": rbuf},
                 {"param": "float32", "grad": "bfloat16", "momentum_buffer": "float32"},
                 step=t, lr=0.1, momentum=0.9, out=rout, out_storage="float16")
    for a, b, o, ro in zip(p, rp, out, rout):
        _assert_bitwise(a, b, "params")
        _assert_bitwise(o.view(np.uint16), ro, "half_out")


def test_skip_nonfinite_reads_half_grads():
    p = [R.narrow(np.ones(64, np.float32), "bfloat16")]
    opt = lrfast.Adam(p, lr=0.1, skip_nonfinite=True, bfloat16_bits=True)
    before = p[0].copy()
    g = R.narrow(np.ones(64, np.float32), "bfloat16")
    g[17] = 0x7FC0  # NaN
    assert opt.step([g]) is False and opt.skipped_steps == 1
    _assert_bitwise(p[0], before, "nothing written")
    g[17] = 0x7F80  # inf
    assert opt.step([g]) is False
    g[17] = 0x4080  # 4.0
    # a finite grad that overflows once unscaled is caught too (grad_scale < 1): 4e38 > max
    assert opt.step([g], grad_scale=1e-38) is False
    assert opt.step([g], grad_scale=1e-37) is True


def _f32(n=8):
    return [np.ones(n, np.float32)]


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: lrfast.Adam([np.ones(4, np.uint16)], lr=0.1), TypeError, "bfloat16_bits=True"),
    (lambda: lrfast.Adam([np.ones(4)], lr=0.1, state_dtype="float32"), ValueError,
     "state_dtype=float32 is not available for float64"),
    (lambda: lrfast.Adam([np.ones(4)], lr=0.1, state_dtype="int8"), ValueError,
     "state_dtype=int8 is not available for float64"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, state_dtype="int4"), ValueError, "state_dtype must"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, rounding="up"), ValueError, "rounding must"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, seed=-1), ValueError, "seed must"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, seed=2**64), ValueError, "seed must"),
    (lambda: lrfast.Adam([np.ones(4)], lr=0.1, half_out=[np.ones(4, np.float16)]), TypeError,
     "from float32 params"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, half_out=[np.ones(4, np.float16)]), ValueError,
     "shape"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, half_out=[np.ones(8, np.float32)]), TypeError,
     "bfloat16 or float16"),
    (lambda: lrfast.Adam(_f32(), lr=0.1, half_out=[np.ones(8, np.float16)] * 2), ValueError,
     "half_out has 2"),
    (lambda: lrfast.FlatParams({"w": 3}, half="float32"), TypeError, "half twin"),
    (lambda: lrfast.FlatParams({"w": 3}, dtype=np.float16, grad_dtype=np.float32), TypeError,
     "grad_dtype"),
])
def test_bad_options_are_refused(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_a_grad_of_a_type_its_params_do_not_take_changes_nothing():
    p = [np.ones(8, np.float16)]
    opt = lrfast.Adam(p, lr=0.1)
    before = p[0].copy()
    with pytest.raises(TypeError, match="dtype"):
        opt.step([np.ones(8, np.float32)])  # half params take grads of their own type only
    with pytest.raises(TypeError, match="dtype"):
        opt.step([np.ones(8, np.uint16)])
    _assert_bitwise(p[0], before, "nothing written")
    assert opt.step_count == 0
    # half copies must not overlap what the step writes
    q = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        lrfast.Adam([q], lr=0.1, half_out=[q.view(np.float16)[:8]])
