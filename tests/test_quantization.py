"""8-bit optimizer state: the maps, the kernels' quantise/dequantise against the NumPy reference
(bit for bit), every optimizer with 8-bit state in lockstep with the reference run on
dequantised state, state dicts and checkpoints, bfloat16 state for float32 params, bad input."""
from __future__ import annotations

import numpy as np
import pytest

import lrfast
from lrfast import _dispatch, quantization as Q, reference
from lrfast.quantization import Int8State

from cases import CONFIGS, OPTIMIZERS, SPECS, ReferenceRun, config_id, make_grads, make_params, \
    snapshot

BUILDS = list(_dispatch.BUILDS.items())
SHAPES = [(5000,), (70, 90), (100,)]  # the last is below min_size: float32 state


# ------------------------------------------------------------------------------------------
# The maps
# ------------------------------------------------------------------------------------------

def _dynamic_map_in_torch(torch, signed):
    """bitsandbytes' construction of its dynamic map, evaluated by torch (float32 tensors)."""
    data = []
    for k in range(7):
        points = torch.linspace(0.1, 1, (2 ** k if signed else 2 ** (k + 1)) + 1)
        means = (points[:-1] + points[1:]) / 2.0
        data += (10 ** (k - 6) * means).tolist()
        if signed:
            data += (-(10 ** (k - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data)).numpy()


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_the_construction_run_in_torch(signed):
    torch = pytest.importorskip("torch")
    want = _dynamic_map_in_torch(torch, signed)
    got = Q.SIGNED if signed else Q.UNSIGNED
    assert want.dtype == got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes(signed):
    functional = pytest.importorskip("bitsandbytes.functional")
    want = functional.create_dynamic_map(signed=signed).cpu().numpy()
    got = Q.SIGNED if signed else Q.UNSIGNED
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_map_layout():
    s, u = Q.SIGNED, Q.UNSIGNED
    assert s.shape == u.shape == (256,)
    assert np.all(np.diff(s) > 0) and np.all(np.diff(u) > 0)
    # signed: 127 negative values, 0, 128 positive ones up to 1; the most negative is -0.99297
    assert np.flatnonzero(s == 0).tolist() == [127] and s[-1] == 1.0
    assert s[0] == np.float32(-(0.98594 + 1.0) / 2) or abs(s[0] + 0.99297) < 1e-5
    # unsigned: 0 and 255 positive values up to 1
    assert u[0] == 0.0 and u[-1] == 1.0 and u[1] > 0
    # the smallest non-zero magnitudes: 0.55e-6 (signed), 0.325e-6 (unsigned)
    assert abs(s[128] - 0.55e-6) < 1e-12 and abs(u[1] - 0.325e-6) < 1e-12
    with pytest.raises(ValueError):
        s[0] = 0  # read-only


# ------------------------------------------------------------------------------------------
# The rule: reference and kernels
# ------------------------------------------------------------------------------------------

def test_reference_picks_the_nearest_value_and_ties_go_to_the_smaller_magnitude():
    rng = np.random.default_rng(0)
    for values in (Q.SIGNED, Q.UNSIGNED):
        n = rng.uniform(-1 if values[0] < 0 else 0, 1, 20000).astype(np.float32)
        codes = Q._nearest(n, values)
        dist = np.abs(n[:, None].astype(np.float64) - values[None, :])
        np.testing.assert_array_equal(dist[np.arange(n.size), codes], dist.min(axis=1))
        # exact float32 midpoints between neighbours: the smaller magnitude wins
        pos = values[values >= 0].astype(np.float64)
        mids = ((pos[:-1] + pos[1:]) / 2).astype(np.float32)
        exact = mids[(mids.astype(np.float64) * 2 == pos[:-1] + pos[1:])]
        assert exact.size > 10
        got = values[Q._nearest(exact, values)]
        assert np.all(got < exact)


def _edge_values(rng, n, block, signed):
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-25, 5, n))).astype(np.float32)
    if not signed:
        x = np.abs(x)
    x[:block] = 0                                 # an all-zero block: scale 0
    x[block:2 * block] = -0.0
    x[2 * block + 5] = np.nan                     # a NaN: its block reads NaN
    x[3 * block + 7] = np.inf
    x[4 * block:5 * block] = 1e-40                # subnormals
    x[5 * block + 1] = 3e38
    return x


@pytest.mark.parametrize("build, module", BUILDS, ids=[b for b, _ in BUILDS])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("block", [32, 256, 2048])
def test_kernels_quantize_and_dequantize_as_the_reference(build, module, signed, block):
    rng = np.random.default_rng(block)
    n = 7 * block + 123  # a partial last block
    x = _edge_values(rng, n, block, signed)
    codes = np.empty(n, np.uint8)
    scales = np.empty(-(-n // block), np.float32)
    module._quantize_blocks(x, codes, scales, signed, block)
    want_codes, want_scales = Q.quantize_blockwise(x, signed, block)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scales.view(np.uint32), want_scales.view(np.uint32))
    out = np.empty(n, np.float32)
    module._dequantize_blocks(codes, scales, out, signed, block)
    want = Q.dequantize_blockwise(want_codes, want_scales, signed, block)
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
    # what the rule promises: zeros stay zero, a NaN makes its block NaN, the largest
    # magnitude of a block reads back as itself (positive) or within 0.71% (negative)
    assert np.all(want[:2 * block] == 0) and want_scales[0] == 0
    assert np.all(np.isnan(want[2 * block:3 * block]))
    finite = x[6 * block:7 * block]
    big = np.argmax(np.abs(finite))
    back = want[6 * block + big]
    assert abs(back - finite[big]) <= 0.0071 * abs(finite[big])


def test_round_trip_error_bound():
    """Within a block, a value's error is at most half the largest gap between neighbouring
    map values times the scale: 0.70% of the scale (signed), 0.35% (unsigned)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4096).astype(np.float32)
    for signed in (True, False):
        v = x if signed else np.abs(x)
        codes, scales = Q.quantize_blockwise(v, signed)
        back = Q.dequantize_blockwise(codes, scales, signed)
        err = np.abs(back - v) / np.repeat(scales, 256)
        bound = 0.00704 if signed else 0.00352
        assert err.max() <= bound


def test_kernel_tables_refuse_a_map_too_dense_for_the_keys():
    dense = np.sort(np.concatenate([[0.0], np.linspace(0.5, 0.5 + 2e-4, 255)])).astype(np.float32)
    with pytest.raises(ValueError, match="closer than the kernels' keys resolve"):
        Q.kernel_tables(dense, 15, 101 << 8, 27 << 8)


def test_reference_module_mirrors_the_rule():
    assert reference.quantize_blockwise is Q.quantize_blockwise
    assert reference.dequantize_blockwise is Q.dequantize_blockwise


@pytest.mark.parametrize("bad", [0, 16, 100, 4096, True, 256.0])
def test_bad_block_sizes(bad):
    with pytest.raises(ValueError, match="block_size"):
        Int8State(block_size=bad)
    with pytest.raises(ValueError, match="block_size"):
        Q.quantize_blockwise(np.zeros(4, np.float32), True, bad)


# ------------------------------------------------------------------------------------------
# Optimizers with 8-bit state, in lockstep with the reference on dequantised state
# ------------------------------------------------------------------------------------------

def _quantizable(name):
    update = SPECS[name].update
    return not update.per_tensor and any(b.quant for b in update.buffers) \
        and OPTIMIZERS[name]._allocate is lrfast.Optimizer._allocate


def _has_8bit_state(case):
    name, hyper, _ = case
    if not _quantizable(name):
        return False
    update, values = SPECS[name].update, SPECS[name].validate(hyper)
    return any(b.quant and b.name in update.state_buffers(values) for b in update.buffers)


# Every configuration of the registry whose state has a moment (SGD without momentum has none).
CASES = [c for c in CONFIGS if _has_8bit_state(c)]


class QuantizedReference:
    """ReferenceRun whose 8-bit buffers are requantised after every step: the reference reads
    exactly what the kernels read (the dequantised codes)."""

    def __init__(self, name, hyper, params, settings):
        self.run = ReferenceRun(name, hyper, params)
        self.settings = settings
        self.sign = {b.name: b.quant == "signed" for b in SPECS[name].update.buffers
                     if b.quant and b.name in self.run.state}
        self.codes: dict = {}
        self._requantize()

    def _requantize(self):
        for name, signed in self.sign.items():
            for k, p in enumerate(self.run.params):
                if not self.settings.quantizes(p.size):
                    continue
                buf = self.run.state[name][k]
                codes = Q.quantize_blockwise(buf, signed, self.settings.block_size)
                self.codes[name, k] = codes
                buf[...] = Q.dequantize_blockwise(*codes, signed, self.settings.block_size)

    def step(self, grads):
        self.run.step(grads)
        self._requantize()

    def assert_equal(self, opt):
        for k, (p, rp) in enumerate(zip(opt.params, self.run.params)):
            np.testing.assert_array_equal(p, rp, err_msg=f"param {k}")
        sd = opt.state_dict()["state"]
        for (name, k), (codes, scales) in self.codes.items():
            np.testing.assert_array_equal(sd[k][name], codes, err_msg=f"{name}[{k}] codes")
            np.testing.assert_array_equal(sd[k][Q.scales_name(name)].view(np.uint32),
                                          scales.view(np.uint32), err_msg=f"{name}[{k}] scales")
        for name, bufs in self.run.state.items():
            for k, buf in enumerate(bufs):
                if (name, k) not in self.codes and buf is not None and buf.ndim:
                    np.testing.assert_array_equal(sd[k][name], buf, err_msg=f"{name}[{k}]")


@pytest.mark.parametrize("block", [256, 64])
@pytest.mark.parametrize("case", CASES, ids=[config_id(c) for c in CASES])
def test_lockstep_with_the_reference_bit_for_bit(case, block):
    name, hyper, _ = case
    settings = Int8State(block_size=block)
    params = make_params(SHAPES, np.float32)
    opt = OPTIMIZERS[name](params, **hyper, state_dtype=settings)
    ref = QuantizedReference(name, hyper, params, settings)
    assert ref.codes, "no buffer was kept in 8 bits"
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = make_grads(SHAPES, np.float32, rng)
        opt.step(grads)
        ref.step(grads)
        ref.assert_equal(opt)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_threads_do_not_change_8bit_results(nthreads):
    # Spans of threads start on block boundaries: the same codes for any thread count.
    shapes = [(100_003,), (300, 257)]
    results = []
    for threads in (1, nthreads):
        params = make_params(shapes, np.float32)
        opt = lrfast.Adam(params, lr=1e-2, state_dtype=Int8State(block_size=128))
        rng = np.random.default_rng(5)
        with lrfast.threads(threads), _per_thread(64):
            for _ in range(3):
                opt.step(make_grads(shapes, np.float32, rng))
        results.append(snapshot(opt))
    assert results[0] == results[1]


def _per_thread(n):
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        kernels = _dispatch.kernels
        kernels.set_min_elements_per_thread(n)
        try:
            yield
        finally:
            kernels.set_min_elements_per_thread(None)
    return ctx()


def test_ema_and_skip_nonfinite_with_8bit_state():
    # The average fused into an 8-bit step equals the average taken after it; a skipped step
    # changes nothing, codes and scales included.
    params = make_params(SHAPES, np.float32)
    fused_av = lrfast.Averager(params, decay=0.9)
    opt = lrfast.AdamW(params, lr=1e-2, state_dtype="int8", ema=fused_av, skip_nonfinite=True)
    plain = make_params(SHAPES, np.float32)
    plain_av = lrfast.Averager(plain, decay=0.9)
    twin = lrfast.AdamW(plain, lr=1e-2, state_dtype="int8")
    ref = QuantizedReference("AdamW", dict(lr=1e-2), params, Int8State())
    rng = np.random.default_rng(2)
    for t in range(3):
        grads = make_grads(SHAPES, np.float32, rng)
        if t == 1:
            before = snapshot(opt)
            bad = [g.copy() for g in grads]
            bad[0][17] = np.inf
            assert opt.step(bad) is False
            assert snapshot(opt) == before
        opt.step(grads)
        twin.step(grads)
        plain_av.update()
        ref.step(grads)
    ref.assert_equal(opt)
    for a, b in zip(fused_av.averages, plain_av.averages):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# State dicts, conversions, checkpoints, memory
# ------------------------------------------------------------------------------------------

def _trained(state_dtype, steps=3, seed=0):
    params = make_params(SHAPES, np.float32, seed)
    opt = lrfast.Adam(params, lr=1e-2, amsgrad=True, state_dtype=state_dtype)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        opt.step(make_grads(SHAPES, np.float32, rng))
    return opt


def test_state_dict_holds_codes_and_scales_and_resumes_bit_for_bit():
    opt = _trained("int8")
    sd = opt.state_dict()
    assert sd["quantization"] == {"block_size": 256, "min_size": 4096}
    entry = sd["state"][0]
    assert entry["exp_avg"].dtype == np.uint8 and entry["exp_avg"].shape == (5000,)
    assert entry["max_exp_avg_sq_absmax"].dtype == np.float32
    assert entry["max_exp_avg_sq_absmax"].shape == (20,)
    assert sd["state"][2]["exp_avg"].dtype == np.float32  # below min_size
    twin = lrfast.Adam(make_params(SHAPES, np.float32, 9), lr=1e-2, amsgrad=True,
                       state_dtype="int8")
    twin.load_state_dict(sd)
    for p, q in zip(twin.params, opt.params):
        p[...] = q
    rng = np.random.default_rng(11)
    for _ in range(2):
        grads = make_grads(SHAPES, np.float32, rng)
        opt.step(grads)
        twin.step(grads)
    assert snapshot(opt) == snapshot(twin)


def test_load_converts_between_8bit_and_float32_state():
    q = _trained("int8")
    sd = q.state_dict()
    f = lrfast.Adam(make_params(SHAPES, np.float32), lr=1e-2, amsgrad=True)
    f.load_state_dict(sd)
    got = f.state_dict()["state"]
    for k in (0, 1):
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            want = Q.dequantize_blockwise(sd["state"][k][name],
                                          sd["state"][k][Q.scales_name(name)], signed)
            np.testing.assert_array_equal(got[k][name], want)
    # and back: float32 state into an 8-bit optimizer of another block size
    q64 = lrfast.Adam(make_params(SHAPES, np.float32), lr=1e-2, amsgrad=True,
                      state_dtype=Int8State(block_size=64))
    q64.load_state_dict(f.state_dict())
    codes, scales = Q.quantize_blockwise(got[1]["exp_avg"], True, 64)
    np.testing.assert_array_equal(q64.state_dict()["state"][1]["exp_avg"], codes)
    np.testing.assert_array_equal(q64.state_dict()["state"][1]["exp_avg_absmax"], scales)
    # 8-bit blocks of 256 into blocks of 64: through float32
    q64.load_state_dict(sd)
    np.testing.assert_array_equal(q64.state_dict()["state"][1]["exp_avg"], codes)


def test_checkpoint_of_8bit_state_resumes_bit_for_bit(tmp_path):
    opt = _trained("int8")
    path = tmp_path / "ckpt.npz"
    lrfast.save_checkpoint(path, opt)
    twin = lrfast.Adam([p.copy() for p in opt.params], lr=1e-2, amsgrad=True, state_dtype="int8")
    lrfast.load_checkpoint(path, twin)
    assert snapshot(twin)[:3] == snapshot(opt)[:3]


@pytest.mark.parametrize("state_dtype, most", [(None, 8.0), ("bfloat16", 4.0), ("int8", 2.05),
                                               (Int8State(block_size=64), 2.13)])
def test_state_bytes_per_param(state_dtype, most):
    n = 1 << 20
    opt = lrfast.Adam([np.zeros(n, np.float32)], lr=1e-3, state_dtype=state_dtype)
    per_param = opt.state_bytes() / n
    assert per_param <= most
    if state_dtype == "int8":
        assert per_param == 2 + 2 * 4 / 256


# ------------------------------------------------------------------------------------------
# bfloat16 state for float32 params
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bfloat16_state_for_float32_params_as_the_reference(rounding):
    params = make_params(SHAPES, np.float32)
    opt = lrfast.Adam(params, lr=1e-2, state_dtype="bfloat16", rounding=rounding, seed=3,
                      bfloat16_bits=True)
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == np.uint16
    ref_p = [p.copy() for p in params]
    m = [np.zeros(s, np.uint16) for s in SHAPES]
    v = [np.zeros(s, np.uint16) for s in SHAPES]
    rng = np.random.default_rng(4)
    for t in range(1, 4):
        grads = make_grads(SHAPES, np.float32, rng)
        opt.step(grads)
        reference.mixed_(reference.adam_, {"param": ref_p, "grad": grads, "exp_avg": m,
                                           "exp_avg_sq": v},
                         {"param": "float32", "grad": "float32", "exp_avg": "bfloat16",
                          "exp_avg_sq": "bfloat16"}, step=t, rounding=rounding, seed=3, lr=1e-2)
    for p, rp in zip(opt.params, ref_p):
        np.testing.assert_array_equal(p, rp)
    sd = opt.state_dict()["state"]
    for k in range(3):
        np.testing.assert_array_equal(sd[k]["exp_avg"], m[k])
        np.testing.assert_array_equal(sd[k]["exp_avg_sq"], v[k])


# ------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing changed
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: lrfast.Adam([np.zeros(5000)], state_dtype="int8"), ValueError, "float64"),
    (lambda: lrfast.Lamb([np.zeros(5000, np.float32)], state_dtype="int8"), ValueError,
     "not available for Lamb"),
    (lambda: lrfast.Lars([np.zeros(5000, np.float32)], lr=0.1, state_dtype="int8"), ValueError,
     "not available for Lars"),
    (lambda: lrfast.Adafactor([np.zeros((100, 100), np.float32)], state_dtype="int8"),
     ValueError, "not available for Adafactor"),
    (lambda: lrfast.AdamWScheduleFree([np.zeros(5000, np.float32)], state_dtype="int8"),
     ValueError, "not available for AdamWScheduleFree"),
    (lambda: lrfast.Adam(lrfast.FlatParams({"w": (5000,)}), state_dtype="int8"), ValueError,
     "FlatParams"),
    (lambda: lrfast.Adam([np.zeros(8, np.float32)], state_dtype="int4"), ValueError,
     "state_dtype must"),
    (lambda: Int8State(min_size=-1), ValueError, "min_size"),
])
def test_bad_options_are_refused(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def _bad_dicts(sd):
    def edit(fn):
        out = {**sd, "state": {k: dict(v) for k, v in sd["state"].items()}}
        fn(out)
        return out

    return [
        (edit(lambda d: d["state"][0].__setitem__("exp_avg", d["state"][0]["exp_avg"]
                                                  .astype(np.int8))), TypeError, "uint8"),
        (edit(lambda d: d["state"][0].__setitem__("exp_avg_absmax", np.zeros(3, np.float32))),
         ValueError, "exp_avg_absmax"),
        (edit(lambda d: d["state"][0].__setitem__("exp_avg_absmax", np.zeros(20))), ValueError,
         "float32"),
        (edit(lambda d: d["state"][1].pop("exp_avg_sq_absmax")), TypeError, "8 bits"),
        (edit(lambda d: d.pop("quantization")), ValueError, "quantization"),
        (edit(lambda d: d.__setitem__("quantization", {"block_size": 100})), ValueError,
         "block_size"),
        (edit(lambda d: d["state"][2].__setitem__("exp_avg_absmax", np.zeros(1, np.float32))),
         TypeError, "uint8"),
    ]


def test_bad_state_dicts_change_nothing():
    source = _trained("int8", seed=1).state_dict()
    opt = _trained("int8")
    before = snapshot(opt)
    for bad, exc, pattern in _bad_dicts(source):
        with pytest.raises(exc, match=pattern):
            opt.load_state_dict(bad)
        assert snapshot(opt) == before
