"""lrfast.Averager (EMA, SWA) on its own and fused into every optimizer's step (``ema=``).

Expected values: hand calculations, lrfast.reference.average_ (torch.lerp's formula in NumPy),
and, for the fused path, the same optimizer without ``ema=`` followed by a standalone update
(which the reference checks): the fused pass must give bitwise the same params, state and
averages. Peers (torch, timm, ema-pytorch) are in tests/test_torch_averaging.py.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import lrfast
from lrfast import reference
from cases import CONFIGS, OPTIMIZERS, config_id

# (35001,): more than two of the fused update's tiles (FUSE_TILE, src/_averages.pxi), and a rest
SHAPES = [(3000,), (17, 5), (), (0,), (35001,)]


def _params(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _grads(params, rng):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


# -- the step rule, by hand ------------------------------------------------------------------

def test_ema_steps_by_hand():
    # start_step=2, update_every=1, decay 0.75: steps 1..3 copy (e = t - 3 <= 0), then
    # a <- a + 0.25 (p - a).
    w = np.zeros(1)
    ema = lrfast.Averager([w], decay=0.75, start_step=2)
    seen = []
    for p in (4.0, 8.0, 12.0, 16.0, 20.0):
        w[0] = p
        ema.update()
        seen.append(float(ema.averages[0][0]))
    # copies 4, 8, 12; then 12 + 0.25 * 4 = 13; 13 + 0.25 * 7 = 14.75
    assert seen == [4.0, 8.0, 12.0, 13.0, 14.75]
    assert ema.step_count == 5 and ema.num_averaged == 3 and ema.last_weight == 0.25


def test_swa_with_update_every_by_hand():
    # update_every=2: steps 1, 3, 5, 7 touch the average (t - 1 even); the first copies, then
    # the running mean of the samples 1, 3, 5, 7 (the params at those steps).
    w = np.zeros(1)
    swa = lrfast.Averager([w], kind="swa", update_every=2)
    for t in range(1, 8):
        w[0] = t
        swa.update()
    assert swa.averages[0][0] == (1 + 3 + 5 + 7) / 4
    assert swa.num_averaged == 4 and swa.step_count == 7


def test_decay_schedules_by_hand():
    d = lrfast.warmup_decay(0.99, inv_gamma=2.0, power=1.0)
    # 1 - (1 + e/2)^-1 = e / (e + 2)
    assert d(2) == 0.5 and d(6) == 0.75 and d(10**6) == 0.99
    d = lrfast.warmup_decay(0.999, min_decay=0.3, power=1.0)
    assert d(1) == 0.5 and d(0.1) == 0.3
    d = lrfast.num_updates_decay(0.9)
    assert d(0) == 0.1 and d(8) == 0.5 and d(1000) == 0.9
    # a schedule drives the EMA: e = 1 uses decay(1)
    w = np.zeros(1)
    ema = lrfast.Averager([w], lrfast.warmup_decay(0.99, power=1.0))  # decay(1) = 0.5
    w[0] = 2.0
    ema.update()   # copy
    w[0] = 4.0
    ema.update()   # 2 + 0.5 * 2
    assert ema.averages[0][0] == 3.0 and ema.last_weight == 0.5


def test_asgd_average_is_swa_from_t0():
    # ASGD's ax (checked against torch.optim.ASGD in the parity tests) is the uniform mean of
    # the iterates from step t0 + 2 on: the swa Averager with start_step = t0 + 1.
    t0 = 4
    params = _params(np.float64, shapes=[(50,), (3, 4)])
    opt = lrfast.ASGD(params, lr=0.05, t0=t0, lambd=1e-3)
    swa = lrfast.Averager(params, kind="swa", start_step=t0 + 1)
    rng = np.random.default_rng(1)
    for _ in range(12):
        assert opt.step(_grads(params, rng))
        swa.update()
    for k, avg in enumerate(swa.averages):
        np.testing.assert_allclose(avg, opt.state_dict()["state"][k]["ax"], rtol=1e-13,
                                   atol=1e-15)


# -- the kernel against the reference --------------------------------------------------------

def _half(storage):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16) if storage == "bfloat16" else np.dtype(np.float16)


@pytest.mark.parametrize("storage", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("weight", [0.001, 0.3, 0.5, 0.9])
def test_lerp_matches_reference(storage, weight):
    dtype = _half(storage) if storage in ("bfloat16", "float16") else np.dtype(storage)
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in SHAPES]
    ema = lrfast.Averager(params, decay=1.0 - weight)
    ema.update()  # the first step copies
    expected = [a.copy() for a in ema.averages]
    for p in params:
        p += np.asarray(rng.standard_normal(p.shape), dtype=np.float32).astype(dtype)
    ema.update()
    half = storage if storage in ("bfloat16", "float16") else None
    w = ema.last_weight
    for exp, p in zip(expected, params):
        if half:
            bits = exp.view(np.uint16)
            reference.average_(bits, p.view(np.uint16), mode="lerp", weight=w, storage=half)
        else:
            reference.average_(exp, p, mode="lerp", weight=w)
    for got, exp in zip(ema.averages, expected):
        assert got.tobytes() == exp.tobytes()


def test_swap_exchanges_and_restores():
    params = _params(np.float32)
    before = [p.copy() for p in params]
    ema = lrfast.Averager(params, decay=0.5)
    for p in params:
        p += 1
    ema.update()
    ema.update()
    trained = [p.copy() for p in params]
    averages = [a.copy() for a in ema.averages]
    with pytest.raises(ZeroDivisionError):
        with ema.averaged():
            assert ema.swapped
            for p, a in zip(params, averages):
                assert p.tobytes() == a.tobytes()
            1 / 0
    assert not ema.swapped
    for p, t in zip(params, trained):
        assert p.tobytes() == t.tobytes()
    assert any(not np.array_equal(b, t) for b, t in zip(before, trained) if b.size)


# -- fused into the optimizers' steps -------------------------------------------------------

def _run_pair(name, hyper, dtype, steps=4, ema_kwargs=None, **opt_kwargs):
    """(fused optimizer, its averager, twin optimizer, twin's standalone averager) after
    ``steps`` steps on the same grads."""
    ema_kwargs = ema_kwargs or dict(decay=0.8, start_step=1)
    cls = OPTIMIZERS[name]
    a, b = _params(dtype), _params(dtype)
    ema_a = lrfast.Averager(a, **ema_kwargs)
    ema_b = lrfast.Averager(b, **ema_kwargs)
    opt_a = cls(a, **hyper, ema=ema_a, **opt_kwargs)
    opt_b = cls(b, **hyper, **opt_kwargs)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        g = _grads(a, rng)
        assert opt_a.step(g) == opt_b.step(g)
        ema_b.update()
    return opt_a, ema_a, opt_b, ema_b


def _assert_same(opt_a, ema_a, opt_b, ema_b):
    for pa, pb in zip(opt_a.params, opt_b.params):
        assert pa.tobytes() == pb.tobytes()
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for k in sb["state"]:
        assert set(sa["state"][k]) == set(sb["state"][k]) | {"average"}
        for buf, arr in sb["state"][k].items():
            assert sa["state"][k][buf].tobytes() == arr.tobytes(), (k, buf)
    for x, y in zip(ema_a.averages, ema_b.averages):
        assert x.tobytes() == y.tobytes()
    assert (ema_a.step_count, ema_a.num_averaged) == (ema_b.step_count, ema_b.num_averaged)


@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_equals_separate_pass(case, dtype):
    name, hyper, _ = case
    _assert_same(*_run_pair(name, hyper, dtype))


@pytest.mark.parametrize("name", ["Adam", "Lamb", "SGD"])
def test_fused_is_thread_invariant(name):
    lrfast._dispatch.kernels.set_min_elements_per_thread(64)
    try:
        runs = []
        for n in (1, 2):
            with lrfast.threads(n):
                opt, ema, _, _ = _run_pair(name, dict(lr=0.01), np.float32)
            runs.append(([p.tobytes() for p in opt.params], [a.tobytes() for a in ema.averages]))
        assert runs[0] == runs[1]
    finally:
        lrfast._dispatch.kernels.set_min_elements_per_thread(None)


def test_fused_swa_and_update_every():
    _assert_same(*_run_pair("AdamW", dict(lr=0.01), np.float32, steps=7,
                            ema_kwargs=dict(kind="swa", start_step=2, update_every=2)))


@pytest.mark.parametrize("variant", ["bf16 params, f32 state", "bf16 everything",
                                     "f32 params, bf16 grads, bf16 copy"])
def test_fused_mixed_precision(variant):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(5)
    shapes = [(20000,), (7, 3)]  # (more than one fused tile)
    pdtype = np.float32 if variant.startswith("f32") else bf16
    gdtype = bf16
    kwargs = {"state_dtype": "float32"} if variant == "bf16 params, f32 state" else {}
    runs = []
    for fused in (True, False):
        params = [rng.standard_normal(s).astype(np.float32).astype(pdtype) for s in shapes] \
            if not runs else [p.copy() for p in runs[0][3]]
        start = [p.copy() for p in params]
        out = [np.zeros(s, bf16) for s in shapes] if pdtype == np.float32 else None
        ema = lrfast.Averager(params, decay=0.7)
        opt = lrfast.Adam(params, lr=0.01, ema=ema if fused else None, half_out=out, **kwargs)
        grng = np.random.default_rng(11)
        for _ in range(3):
            opt.step([grng.standard_normal(s).astype(np.float32).astype(gdtype)
                      for s in shapes])
            if not fused:
                ema.update()
        runs.append(([p.tobytes() for p in params], [a.tobytes() for a in ema.averages],
                     None if out is None else [o.tobytes() for o in out], start))
    assert runs[0][:3] == runs[1][:3]


@pytest.mark.parametrize("name", ["Adam", "Lamb"])  # whole buffer; per named view
def test_fused_flat_params(name):
    def run(fused):
        flat = lrfast.FlatParams({"w": (40, 30), "b": (30,), "s": ()}, dtype=np.float32,
                                 init={"w": np.full((40, 30), 0.5), "b": np.arange(30.0)})
        ema = lrfast.Averager(flat, decay=0.9)
        opt = OPTIMIZERS[name](flat, lr=0.01, ema=ema if fused else None)
        rng = np.random.default_rng(2)
        for _ in range(3):
            flat.grad[...] = rng.standard_normal(flat.grad.size)
            opt.step()
            if not fused:
                ema.update()
        return flat.param.tobytes(), ema.flat_average.tobytes(), ema.averages["b"].tobytes()
    assert run(True) == run(False)


def test_skipped_step_leaves_the_average_alone():
    params = _params(np.float32)
    ema = lrfast.Averager(params, decay=0.5)
    opt = lrfast.Adam(params, lr=0.1, ema=ema, skip_nonfinite=True)
    rng = np.random.default_rng(0)
    assert opt.step(_grads(params, rng))
    averages = [a.copy() for a in ema.averages]
    bad = _grads(params, rng)
    bad[0][5] = np.nan
    assert opt.step(bad) is False
    assert ema.step_count == 1 and opt.skipped_steps == 1
    for x, y in zip(ema.averages, averages):
        assert x.tobytes() == y.tobytes()
    # the next good step is the averager's second (a lerp, not a second copy)
    assert opt.step(_grads(params, rng))
    assert ema.step_count == 2 and ema.last_weight == 0.5


# -- state -----------------------------------------------------------------------------------

def test_state_dict_round_trip():
    params = _params(np.float64)
    ema = lrfast.Averager(params, lrfast.warmup_decay(0.999), start_step=1)
    rng = np.random.default_rng(4)
    for _ in range(3):
        for p in params:
            p += rng.standard_normal(p.shape)
        ema.update()
    sd = ema.state_dict()
    copy = lrfast.Averager([p.copy() for p in params], lrfast.warmup_decay(0.999), start_step=1)
    copy.load_state_dict(sd)
    assert (copy.step_count, copy.num_averaged, copy.last_weight) == \
        (ema.step_count, ema.num_averaged, ema.last_weight)
    for x, y in zip(copy.averages, ema.averages):
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("name", ["Adam", "Lion", "Adafactor"])
def test_checkpoint_resume_is_bitwise(name):
    hyper = dict(lr=0.01)

    def build(params):
        ema = lrfast.Averager(params, decay=0.9, start_step=1)
        return OPTIMIZERS[name](params, **hyper, ema=ema), ema

    rng = np.random.default_rng(9)
    grads = [_grads(_params(np.float32, shapes=[(300,), (20, 10)]), rng) for _ in range(6)]
    params = _params(np.float32, shapes=[(300,), (20, 10)])
    opt, ema = build(params)
    for g in grads:
        opt.step(g)
    with tempfile.TemporaryDirectory() as folder:
        resumed_params = _params(np.float32, shapes=[(300,), (20, 10)])
        first, _ = build(resumed_params)
        for g in grads[:3]:
            first.step(g)
        path = os.path.join(folder, "run.npz")
        lrfast.save_checkpoint(path, first)
        fresh_params = _params(np.float32, seed=5, shapes=[(300,), (20, 10)])
        resumed, resumed_ema = build(fresh_params)
        lrfast.load_checkpoint(path, resumed)
    assert resumed_ema.step_count == 3
    for g in grads[3:]:
        resumed.step(g)
    for x, y in zip(resumed_ema.averages, ema.averages):
        assert x.tobytes() == y.tobytes()
    for x, y in zip(fresh_params, params):
        assert x.tobytes() == y.tobytes()


def test_optimizer_state_dict_needs_the_averager_entry():
    params = _params(np.float32)
    opt = lrfast.SGD(params, lr=0.1, ema=lrfast.Averager(params))
    sd = opt.state_dict()
    before = [a.copy() for a in opt.ema.averages]
    bad = dict(sd)
    del bad["averager"]
    with pytest.raises(ValueError, match="averager"):
        opt.load_state_dict(bad)
    bad = dict(sd, state={k: {n: a for n, a in v.items() if n != "average"}
                          for k, v in sd["state"].items()})
    with pytest.raises(ValueError, match="average"):
        opt.load_state_dict(bad)
    bad = dict(sd, state={k: dict(v, average=np.zeros(3, np.float32))
                          for k, v in sd["state"].items()})
    with pytest.raises(ValueError, match="average"):
        opt.load_state_dict(bad)
    for x, y in zip(opt.ema.averages, before):
        assert x.tobytes() == y.tobytes()


# -- bad input: a clear error, nothing changed ----------------------------------------------

BAD_AVERAGERS = [
    (dict(decay=1.5), ValueError, "decay"),
    (dict(decay=-0.1), ValueError, "decay"),
    (dict(decay="0.9"), TypeError, "decay"),
    (dict(kind="swa", decay=0.9), ValueError, "kind='ema'"),
    (dict(kind="polyak"), ValueError, "kind"),
    (dict(start_step=-1), ValueError, "start_step"),
    (dict(update_every=0), ValueError, "update_every"),
    (dict(update_every=1.5), TypeError, "update_every"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_AVERAGERS, ids=lambda x: str(x))
def test_bad_averager_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lrfast.Averager(_params(np.float32), **kwargs)


def test_bad_averager_params():
    with pytest.raises(ValueError, match="empty"):
        lrfast.Averager([])
    with pytest.raises(TypeError, match="ndarray"):
        lrfast.Averager([[1.0, 2.0]])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        lrfast.Averager([ro])
    base = np.zeros(10)
    with pytest.raises(ValueError, match="shares memory"):
        lrfast.Averager([base[:6], base[4:]])
    with pytest.raises(TypeError, match="dtype"):
        lrfast.Averager([np.zeros(3, np.int32)])


def test_bad_schedule_value_changes_nothing():
    params = _params(np.float32)
    ema = lrfast.Averager(params, decay=lambda e: 2.0)
    opt = lrfast.SGD(params, lr=0.1, ema=ema)
    rng = np.random.default_rng(0)
    assert opt.step(_grads(params, rng))  # the first step copies: no decay needed
    before = [p.copy() for p in params], [a.copy() for a in ema.averages]
    with pytest.raises(ValueError, match="decay schedule returned 2.0"):
        opt.step(_grads(params, rng))
    assert opt.step_count == 1 and ema.step_count == 1
    for x, y in zip(params + ema.averages, before[0] + before[1]):
        assert x.tobytes() == y.tobytes()


def test_ema_misuse():
    params = _params(np.float32)
    other = _params(np.float32)
    with pytest.raises(ValueError, match="does not average params"):
        lrfast.Adam(params, ema=lrfast.Averager(other))
    with pytest.raises(TypeError, match="Averager"):
        lrfast.Adam(params, ema=0.999)
    ema = lrfast.Averager(params)
    opt = lrfast.Adam(params, ema=ema)
    with pytest.raises(ValueError, match="already updated"):
        lrfast.SGD(params, lr=0.1, ema=ema)
    with pytest.raises(RuntimeError, match="do not call update"):
        ema.update()
    ema.swap()
    snap = [p.copy() for p in params]
    with pytest.raises(RuntimeError, match="swapped"):
        opt.step(_grads(params, np.random.default_rng(0)))
    with pytest.raises(RuntimeError, match="swapped"):
        opt.state_dict()
    for x, y in zip(params, snap):
        assert x.tobytes() == y.tobytes()
    ema.swap()
    assert opt.step_count == 0 and ema.step_count == 0


def test_averager_load_state_dict_checks_first():
    params = _params(np.float32)
    ema = lrfast.Averager(params)
    sd = ema.state_dict()
    with pytest.raises(ValueError, match="'swa'"):
        lrfast.Averager(params, kind="swa").load_state_dict(sd)
    bad = dict(sd, averages={**sd["averages"], 0: np.zeros(2, np.float32)})
    before = [a.copy() for a in ema.averages]
    sd["averages"][1][...] = 7
    with pytest.raises(ValueError, match="the average is float32"):
        ema.load_state_dict(bad)
    with pytest.raises(ValueError, match="step_count"):
        ema.load_state_dict(dict(sd, step_count=-1))
    for x, y in zip(ema.averages, before):
        assert x.tobytes() == y.tobytes()
    assert ema.step_count == 0


# -- fuzz: the kernel against the reference on hard values -----------------------------------

def test_fuzz_average_matches_reference():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st
    from hypothesis.extra import numpy as hnp

    special = st.sampled_from([0.0, -0.0, 1e-40, -1e-45, 3e38, -3e38, np.inf, -np.inf, np.nan,
                               1.0, -2.5])
    values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), special)

    @settings(max_examples=150, deadline=None)
    @given(dtype=st.sampled_from([np.float32, np.float64]),
           n=st.integers(0, 3000),
           weight=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 1.0, 1e-30])),
           mode=st.sampled_from(["lerp", "copy"]),
           threads=st.sampled_from([1, 2]),
           data=st.data())
    def check(dtype, n, weight, mode, threads, data):
        a = data.draw(hnp.arrays(dtype, n, elements=values))
        p = data.draw(hnp.arrays(dtype, n, elements=values))
        with np.errstate(all="ignore"):
            expected = reference.average_(a.copy(), p, mode=mode, weight=weight)
        table, offsets = lrfast._layout.table([[lrfast._layout.address(a)],
                                               [lrfast._layout.address(p)]], [n])
        lrfast._dispatch.kernels.set_min_elements_per_thread(16)
        try:
            lrfast._dispatch.kernels.average_update(table, offsets, np.dtype(dtype).name, mode,
                                                    weight, threads)
        finally:
            lrfast._dispatch.kernels.set_min_elements_per_thread(None)
        np.testing.assert_array_equal(a, expected)  # NaN-aware, and +-0 alike

    check()
