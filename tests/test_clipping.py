"""lrfast.clip_grad_norm_ / lrfast.grad_norm against torch.nn.utils.clip_grad_norm_ and against
lrfast.reference (math.fsum in float64), plus thread-count determinism, non-finite gradients and
rejected inputs.

Expected values come from torch or from lrfast.reference, never from lrfast itself (the
determinism tests compare lrfast with itself across thread counts by design, and also check the
value against the reference). Only the tests that need torch skip without it.

Tolerances
----------
lrfast sums |g|^p in double. torch sums float32 gradients in float32: its float32 norm is itself
off from the exact norm by up to ~7e-6 (relative) on the 100_003-element tensors used here
(measured with torch 2.13 for p = 1, 3, 0.5; p = 2 and inf are much closer). So for float32 the
tight comparison (norm rtol 1e-12, clipped grads rtol 2e-6) is against torch run on the same
values in float64 (``torch.nn.utils.get_total_norm`` on float64 copies, then
``torch.nn.utils.clip_grads_with_norm_`` on the float32 grads, which rounds the factor to
float32 as lrfast documents); the comparison with torch's all-float32 ``clip_grad_norm_`` uses
a tolerance that covers torch's own float32 accumulation error.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import lrfast
from lrfast import reference

INF = math.inf
NORM_TYPES = [2.0, 1.0, INF, 3.0, 0.5]
DTYPES = [np.float32, np.float64]

# Norm: lrfast (double accumulation, block order) vs an exact / double computation.
NORM_RTOL_EXACT = 1e-12
# Clipped grads when both sides use a double-precision norm: the factor may round differently
# in the last place only when the two norms straddle a rounding boundary.
GRAD_RTOL_EXACT = {np.float64: 1e-12, np.float32: 2e-6}
# torch's all-float32 norm (float32 accumulation) vs the exact norm: measured <= 7.1e-6.
TORCH_F32_NORM_RTOL = 2e-5
# ... and the clipped grads, whose factor inherits that error, plus two roundings.
TORCH_F32_GRAD_RTOL = 2.5e-5
# lrfast vs lrfast.reference on float32 grads: norms agree to ~1e-15, so the float32 factor is
# the same or one ulp apart, and each product is correctly rounded: <= 2 ulp.
REF_GRAD_RTOL = {np.float64: 1e-12, np.float32: 3e-7}


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------

def make(shapes, dtype, seed, scale=3.0):
    """Random gradients; ``dtype`` may be one dtype or a list (one per shape)."""
    rng = np.random.default_rng(seed)
    dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    return [np.ascontiguousarray((scale * rng.standard_normal(s)).astype(dt))
            for s, dt in zip(shapes, dtypes)]


def assert_bitwise(actual, expected, msg=""):
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype, msg
    assert actual.shape == expected.shape, msg
    assert actual.tobytes() == expected.tobytes(), f"{msg}: arrays differ bitwise"


def assert_all_bitwise(actual, expected, msg=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_bitwise(a, e, f"{msg} [tensor {i}]")


def assert_close_list(actual, expected, rtol, msg=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{msg} [tensor {i}]"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=0, err_msg=f"{msg} [tensor {i}]")


def assert_same_nonfinite(actual, expected, msg=""):
    """Equal with NaN == NaN, and the same sign on every non-NaN element (so -0.0 != 0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    np.testing.assert_array_equal(actual, expected, err_msg=msg)
    keep = ~np.isnan(expected)
    np.testing.assert_array_equal(np.signbit(actual[keep]), np.signbit(expected[keep]),
                                  err_msg=f"{msg} (signs)")


def torch_params(arrays, torch):
    params = []
    for a in arrays:
        p = torch.zeros(a.shape, dtype=torch.from_numpy(a).dtype, requires_grad=True)
        p.grad = torch.tensor(a)
        params.append(p)
    return params


def torch_clip(arrays, max_norm, norm_type, error_if_nonfinite=False):
    """torch.nn.utils.clip_grad_norm_ on copies: (norm as float, clipped grads as arrays)."""
    torch = pytest.importorskip("torch")
    params = torch_params(arrays, torch)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type,
                                           error_if_nonfinite=error_if_nonfinite, foreach=False)
    return float(total), [p.grad.numpy() for p in params]


def torch_clip_double_norm(arrays, max_norm, norm_type):
    """torch with the norm taken in float64 on the same values, the grads clipped in their own
    dtype by torch.nn.utils.clip_grads_with_norm_: (norm, clipped grads)."""
    torch = pytest.importorskip("torch")
    total = torch.nn.utils.get_total_norm(
        [torch.from_numpy(a.astype(np.float64)) for a in arrays], norm_type)
    assert total.dtype == torch.float64
    params = torch_params(arrays, torch)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return float(total), [p.grad.numpy() for p in params]


def torch_norm64(arrays, norm_type):
    torch = pytest.importorskip("torch")
    return float(torch.nn.utils.get_total_norm(
        [torch.from_numpy(a.astype(np.float64)) for a in arrays], norm_type))


def copies(arrays):
    return [a.copy() for a in arrays]


# ------------------------------------------------------------------------------------------
# 1. Parity with torch.nn.utils.clip_grad_norm_
# ------------------------------------------------------------------------------------------

# (id, shapes, pass as a single ndarray rather than a list)
TORCH_CASES = [
    ("size1", [(1,)], True),
    ("size7", [(7,)], True),
    ("size4097", [(4097,)], True),
    ("size100003", [(100_003,)], True),
    ("2d_64x33", [(64, 33)], True),
    ("0d", [()], True),
    ("list_mixed_shapes", [(1,), (7,), (3, 5), (4097,), (100_003,)], False),
    ("list_with_empty", [(7,), (0,), (4097,), (2, 0, 3)], False),  # no inf: torch can't
]
# max_norm as a multiple of the exact norm: 0 zeroes everything, 0.5 clips, 2 leaves untouched.
MAX_NORM_FACTORS = [0.0, 0.5, 2.0]


def _torch_params():
    out = []
    for cid, shapes, single in TORCH_CASES:
        for p in NORM_TYPES:
            if p == INF and any(0 in s for s in shapes):
                continue  # torch cannot take the inf norm of a zero-size tensor
            out.append(pytest.param(shapes, single, p, id=f"{cid}-p{p}"))
    return out


@pytest.mark.parametrize("factor", MAX_NORM_FACTORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shapes,single,norm_type", _torch_params())
def test_clip_matches_torch(shapes, single, norm_type, dtype, factor):
    pytest.importorskip("torch")
    grads = make(shapes, dtype, seed=zlib.crc32(repr((shapes, norm_type)).encode()))
    original = copies(grads)
    exact = torch_norm64(grads, norm_type)
    max_norm = factor * exact

    ours = copies(grads)
    total = lrfast.clip_grad_norm_(ours[0] if single else ours, max_norm, norm_type)
    assert type(total) is float

    t_norm, t_grads = torch_clip(grads, max_norm, norm_type)
    t64_norm, t64_grads = torch_clip_double_norm(grads, max_norm, norm_type)

    if dtype == np.float64:
        np.testing.assert_allclose(total, t_norm, rtol=NORM_RTOL_EXACT, atol=0)
    else:
        np.testing.assert_allclose(total, t64_norm, rtol=NORM_RTOL_EXACT, atol=0)
        np.testing.assert_allclose(total, t_norm, rtol=TORCH_F32_NORM_RTOL, atol=0)

    if factor >= 1.0:
        # Not clipped: the grads are left bitwise as they were (and torch agrees).
        assert_all_bitwise(ours, original, "unclipped grads changed")
        assert_all_bitwise(t_grads, original, "torch changed unclipped grads (test setup)")
    elif factor == 0.0:
        # Factor exactly 0: every element becomes +-0 with its sign, as in torch.
        for a, e in zip(ours, t_grads):
            assert_bitwise(a, e, "max_norm=0")
        assert not any(np.any(a) for a in ours)
    else:
        if dtype == np.float64:
            assert_close_list(ours, t_grads, GRAD_RTOL_EXACT[dtype], "vs torch f64")
        else:
            assert_close_list(ours, t64_grads, GRAD_RTOL_EXACT[dtype], "vs torch (f64 norm)")
            assert_close_list(ours, t_grads, TORCH_F32_GRAD_RTOL, "vs torch f32")
        # The clip did happen and reached max_norm (torch's own norm of the result).
        assert any(not np.array_equal(a, o) for a, o in zip(ours, original))
        np.testing.assert_allclose(torch_norm64(ours, norm_type),
                                   max_norm * exact / (exact + 1e-6), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_grad_norm_matches_torch_and_changes_nothing(norm_type, dtype):
    pytest.importorskip("torch")
    grads = make([(5,), (4097,), (31, 17), (100_003,)], dtype, seed=7)
    original = copies(grads)
    total = lrfast.grad_norm(grads, norm_type)
    assert type(total) is float
    np.testing.assert_allclose(total, torch_norm64(grads, norm_type), rtol=NORM_RTOL_EXACT, atol=0)
    t_norm, _ = torch_clip(grads, math.inf, norm_type)
    rtol = NORM_RTOL_EXACT if dtype == np.float64 else TORCH_F32_NORM_RTOL
    np.testing.assert_allclose(total, t_norm, rtol=rtol, atol=0)
    assert_all_bitwise(grads, original, "grad_norm modified its input")


@pytest.mark.parametrize("norm_type", [2, 1, "inf", np.float64(3.0), 0.5])
def test_norm_type_spellings_match_torch(norm_type):
    pytest.importorskip("torch")
    grads = make([(7,), (300,)], np.float64, seed=11)
    ours = copies(grads)
    total = lrfast.clip_grad_norm_(ours, 0.25, norm_type)
    t_norm, t_grads = torch_clip(grads, 0.25, norm_type if norm_type == "inf" else float(norm_type))
    np.testing.assert_allclose(total, t_norm, rtol=NORM_RTOL_EXACT, atol=0)
    assert_close_list(ours, t_grads, 1e-12)


def test_alias():
    assert lrfast.clip_grad_norm is lrfast.clip_grad_norm_
    grads = make([(50,)], np.float64, seed=1)
    ours = copies(grads)
    expected = copies(grads)
    total = lrfast.clip_grad_norm(ours, 1.0, 2.0)
    np.testing.assert_allclose(total, reference.clip_grad_norm_(expected, 1.0, 2.0),
                               rtol=NORM_RTOL_EXACT, atol=0)
    assert_close_list(ours, expected, 1e-12)


def test_empty_list_matches_torch():
    torch = pytest.importorskip("torch")
    # torch returns 0 for no gradients
    assert float(torch.nn.utils.clip_grad_norm_([], 1.0)) == 0.0
    assert lrfast.clip_grad_norm_([], 1.0) == 0.0
    assert lrfast.clip_grad_norm({}, 1.0, INF) == 0.0
    assert lrfast.grad_norm([]) == 0.0


# ------------------------------------------------------------------------------------------
# 2. Parity with lrfast.reference (zero-size tensors, mixed dtypes, dict and FlatParams)
# ------------------------------------------------------------------------------------------

REF_CASES = [
    ("size1", [(1,)], np.float32),
    ("size7_f64", [(7,)], np.float64),
    ("size4097", [(4097,)], np.float32),
    ("size100003_f64", [(100_003,)], np.float64),
    ("size100003_f32", [(100_003,)], np.float32),
    ("2d", [(64, 33), (3, 5)], np.float64),
    ("zero_size_only", [(0,)], np.float32),
    ("zero_size_2d_only", [(0, 4), (3, 0)], np.float64),
    ("with_zero_size", [(0,), (7,), (0, 3), (4097,), (0,)], np.float32),
    ("mixed_f32_f64", [(7,), (4097,), (100_003,), (3, 5), (0,), (1,)],
     [np.float32, np.float64, np.float32, np.float64, np.float32, np.float64]),
    ("mixed_f64_first", [(5000,), (9000,), (1,)], [np.float64, np.float32, np.float64]),
]


def _ref_params():
    return [pytest.param(shapes, dt, p, id=f"{cid}-p{p}")
            for cid, shapes, dt in REF_CASES for p in NORM_TYPES]


def _ref_check(ours, total, grads, max_norm, norm_type, msg):
    expected = copies(grads)
    expected_total = reference.clip_grad_norm_(expected, max_norm, norm_type)
    np.testing.assert_allclose(total, expected_total, rtol=NORM_RTOL_EXACT, atol=0, err_msg=msg)
    for a, e, g in zip(ours, expected, grads):
        if max_norm >= 2 * expected_total or expected_total == 0 and max_norm > 0:
            assert_bitwise(a, g, f"{msg}: unclipped grads changed")
        elif max_norm == 0:
            assert_bitwise(a, e, f"{msg}: max_norm=0 must give signed zeros")
        else:
            np.testing.assert_allclose(a, e, rtol=REF_GRAD_RTOL[a.dtype.type], atol=0, err_msg=msg)
            assert a.dtype == e.dtype


@pytest.mark.parametrize("factor", MAX_NORM_FACTORS)
@pytest.mark.parametrize("shapes,dtype,norm_type", _ref_params())
def test_clip_matches_reference(shapes, dtype, norm_type, factor):
    grads = make(shapes, dtype, seed=len(shapes) * 1000 + int(norm_type if norm_type != INF else 9))
    max_norm = factor * reference.grad_norm(grads, norm_type)
    ours = copies(grads)
    total = lrfast.clip_grad_norm_(ours, max_norm, norm_type)
    assert type(total) is float
    _ref_check(ours, total, grads, max_norm, norm_type, "list")
    if factor == 0.5 and sum(g.size for g in grads) > 0:
        assert any(not np.array_equal(a, g) for a, g in zip(ours, grads)), "nothing was clipped"

    # same grads as a tuple
    ours = tuple(copies(grads))
    total = lrfast.clip_grad_norm_(ours, max_norm, norm_type)
    _ref_check(ours, total, grads, max_norm, norm_type, "tuple")

    # grad_norm alone: same value, nothing modified
    frozen = copies(grads)
    np.testing.assert_allclose(lrfast.grad_norm(frozen, norm_type),
                               reference.grad_norm(grads, norm_type), rtol=NORM_RTOL_EXACT, atol=0)
    assert_all_bitwise(frozen, grads, "grad_norm modified its input")


@pytest.mark.parametrize("factor", MAX_NORM_FACTORS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_dict_matches_reference(norm_type, factor):
    shapes = {"w1": (40, 30), "b1": (30,), "empty": (0,), "w2": (4097,), "s": (1,)}
    dtypes = [np.float64, np.float32, np.float32, np.float32, np.float64]
    grads = dict(zip(shapes, make(list(shapes.values()), dtypes, seed=21)))
    values = list(grads.values())
    max_norm = factor * reference.grad_norm(values, norm_type)
    ours = {k: v.copy() for k, v in grads.items()}
    total = lrfast.clip_grad_norm_(ours, max_norm, norm_type)
    assert list(ours) == list(grads)
    _ref_check(list(ours.values()), total, values, max_norm, norm_type, "dict")
    np.testing.assert_allclose(lrfast.grad_norm(grads, norm_type),
                               reference.grad_norm(values, norm_type), rtol=NORM_RTOL_EXACT, atol=0)


@pytest.mark.parametrize("factor", MAX_NORM_FACTORS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_flatparams_matches_reference(norm_type, dtype, factor):
    flat = lrfast.FlatParams({"w": (3, 4), "b": (5,), "e": (0,), "big": (4099,)}, dtype)
    rng = np.random.default_rng(5)
    for name, view in flat.grads.items():
        view[...] = 2.0 * rng.standard_normal(view.shape)
    flat.param[:] = 7.0
    views = [v.copy() for v in flat.grads.values()]
    max_norm = factor * reference.grad_norm(views, norm_type)
    grad_before = flat.grad.copy()

    np.testing.assert_allclose(lrfast.grad_norm(flat, norm_type),
                               reference.grad_norm(views, norm_type), rtol=NORM_RTOL_EXACT, atol=0)
    assert_bitwise(flat.grad, grad_before, "grad_norm modified the FlatParams grad")

    total = lrfast.clip_grad_norm_(flat, max_norm, norm_type)
    _ref_check([v.copy() for v in flat.grads.values()], total, views, max_norm, norm_type, "flat")
    # the named views see the clipped buffer, and the parameters are untouched
    expected = copies(views)
    reference.clip_grad_norm_(expected, max_norm, norm_type)
    np.testing.assert_allclose(flat.grad, np.concatenate([e.ravel() for e in expected]),
                               rtol=REF_GRAD_RTOL[dtype], atol=0)
    assert np.all(flat.param == 7.0)


# ------------------------------------------------------------------------------------------
# 3. Determinism across thread counts (and kernel builds)
# ------------------------------------------------------------------------------------------

DET_SHAPES = [(1_000_003,), (1_234_567,), (4095,), (777, 1001), (13,)]  # ~3.0 M elements


@pytest.fixture(scope="module")
def det_grads():
    return {
        "f32": make(DET_SHAPES, np.float32, seed=99),
        "f64": make(DET_SHAPES, np.float64, seed=98),
        "mixed": make(DET_SHAPES, [np.float32, np.float64, np.float32, np.float64, np.float32],
                      seed=97),
    }


@pytest.mark.parametrize("kind", ["f32", "f64", "mixed"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_thread_count_does_not_change_bits(det_grads, kind, norm_type):
    grads = det_grads[kind]
    assert sum(g.size for g in grads) > 3_000_000
    assert all(g.size % 4096 for g in grads)
    ref_total = reference.grad_norm(grads, norm_type)
    max_norm = 0.3 * ref_total
    results = {}
    for n in (1, 2, 3):
        with lrfast.threads(n):
            assert lrfast.get_num_threads() == n
            norm_only = lrfast.grad_norm(grads, norm_type)
            ours = copies(grads)
            total = lrfast.clip_grad_norm_(ours, max_norm, norm_type)
        assert norm_only.hex() == total.hex()
        results[n] = (total, ours)
    base_total, base_grads = results[1]
    np.testing.assert_allclose(base_total, ref_total, rtol=NORM_RTOL_EXACT, atol=0)
    expected = copies(grads)
    reference.clip_grad_norm_(expected, max_norm, norm_type)
    for a, e in zip(base_grads, expected):
        np.testing.assert_allclose(a, e, rtol=REF_GRAD_RTOL[a.dtype.type], atol=0)
    for n in (2, 3):
        total, ours = results[n]
        assert total.hex() == base_total.hex(), f"norm differs with {n} threads"
        assert_all_bitwise(ours, base_grads, f"clipped grads differ with {n} threads")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.0])
def test_kernel_builds_give_the_same_bits(det_grads, norm_type):
    from lrfast import _dispatch

    builds = _dispatch.available()
    if len(builds) < 2:
        pytest.skip("only one kernel build on this machine")
    grads = det_grads["mixed"]
    max_norm = 0.3 * reference.grad_norm(grads, norm_type)
    out = {}
    for build in builds:
        with _dispatch.using(build), lrfast.threads(2):
            ours = copies(grads)
            out[build] = (lrfast.clip_grad_norm_(ours, max_norm, norm_type), ours)
    (t0, g0), (t1, g1) = out[builds[0]], out[builds[1]]
    assert t0.hex() == t1.hex()
    assert_all_bitwise(g1, g0, "kernel builds differ")


# ------------------------------------------------------------------------------------------
# 4. Non-finite gradients
# ------------------------------------------------------------------------------------------

NONFINITE_SHAPES = [(7,), (4097,), (3, 5), (100_003,)]


def _nonfinite_grads(dtype, bad, where):
    grads = make(NONFINITE_SHAPES, dtype, seed=31)
    if where == "first":
        grads[0][3] = bad
    else:
        grads[-1][100_000] = bad
    return grads


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_nonfinite_raises_and_changes_nothing(norm_type, dtype, bad, where):
    grads = _nonfinite_grads(dtype, bad, where)
    ours = copies(grads)
    for max_norm in (1.0, math.inf):
        with pytest.raises(RuntimeError, match=r"is (nan|inf)\b.*cannot be clipped"):
            lrfast.clip_grad_norm_(ours, max_norm, norm_type, error_if_nonfinite=True)
        assert_all_bitwise(ours, grads, "grads changed although clip_grad_norm_ raised")
    flat = lrfast.FlatParams({"a": (7,), "b": (3, 5)}, dtype)
    flat.grads["b"][...] = np.arange(15).reshape(3, 5)
    flat.grads["a"][2] = bad
    before = flat.grad.copy()
    with pytest.raises(RuntimeError, match=r"cannot be clipped"):
        lrfast.clip_grad_norm_(flat, 1.0, norm_type, error_if_nonfinite=True)
    assert_bitwise(flat.grad, before, "FlatParams grad changed although it raised")


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_nonfinite_default_matches_torch(norm_type, dtype, bad, where):
    pytest.importorskip("torch")
    grads = _nonfinite_grads(dtype, bad, where)
    # torch raises too with error_if_nonfinite (same decision)
    with pytest.raises(RuntimeError):
        torch_clip(grads, 1.0, norm_type, error_if_nonfinite=True)
    t_norm, t_grads = torch_clip(grads, 1.0, norm_type)
    ours = copies(grads)
    total = lrfast.clip_grad_norm_(ours, 1.0, norm_type)
    assert not math.isfinite(t_norm)
    if math.isnan(t_norm):
        assert math.isnan(total)
    else:
        assert total == t_norm
    for a, e in zip(ours, t_grads):
        assert_same_nonfinite(a, e, "vs torch")
    # grad_norm alone gives the same non-finite value as torch
    g = lrfast.grad_norm(grads, norm_type)
    assert (math.isnan(g) and math.isnan(t_norm)) or g == t_norm
    # and the reference agrees with torch as well
    expected = copies(grads)
    r = reference.clip_grad_norm_(expected, 1.0, norm_type)
    assert (math.isnan(r) and math.isnan(t_norm)) or r == t_norm
    for a, e in zip(expected, t_grads):
        assert_same_nonfinite(a, e, "reference vs torch")


@pytest.mark.parametrize("max_norm", [0.0, 1.0, math.inf])
def test_overflowing_norm_of_finite_grads_matches_torch(max_norm):
    """Squares of 1e200 overflow double: the norm is inf in torch too, the grads become 0
    (max_norm/inf = 0), or NaN when max_norm is inf too (inf/inf)."""
    pytest.importorskip("torch")
    grads = [np.full(10, 1e200), np.array([-3.0, 0.5])]
    t_norm, t_grads = torch_clip(grads, max_norm, 2.0)
    ours = copies(grads)
    assert lrfast.clip_grad_norm_(ours, max_norm) == t_norm == INF
    for a, e in zip(ours, t_grads):
        assert_same_nonfinite(a, e)
    ours = copies(grads)
    with pytest.raises(RuntimeError, match="cannot be clipped"):
        lrfast.clip_grad_norm_(ours, max_norm, error_if_nonfinite=True)
    assert_all_bitwise(ours, grads)


def test_small_p_norm_overflow_gives_inf_like_torch():
    pytest.importorskip("torch")
    grads = [np.array([1e308, 1e308])]
    t_norm, t_grads = torch_clip(grads, 1.0, 0.5)
    assert t_norm == INF
    ours = copies(grads)
    assert lrfast.clip_grad_norm_(ours, 1.0, 0.5) == INF
    assert_all_bitwise(ours, t_grads)


# ------------------------------------------------------------------------------------------
# 5. Rejected inputs: the right exception and message, nothing changed
# ------------------------------------------------------------------------------------------

def _big(dtype=np.float64, n=10):
    """A valid gradient whose norm (>= 3*sqrt(n)) exceeds max_norm=1: clipping would write it."""
    return np.full(n, 3.0, dtype)


def _misaligned():
    buf = np.zeros(8 * 10 + 1, dtype=np.uint8)
    a = np.frombuffer(buf, dtype=np.float64, offset=1, count=10)
    assert not a.flags.aligned and a.flags.writeable
    return a, buf


def _read_only():
    a = _big()
    a.setflags(write=False)
    return a


def _flat_and_view():
    flat = lrfast.FlatParams({"w": (3, 4), "b": (5,)}, np.float32)
    flat.grad[:] = 3.0
    return flat


_DEFAULT = object()


# Each builder returns (kwargs for clip_grad_norm_, arrays that must be unchanged afterwards).
def _case(grads=_DEFAULT, max_norm=1.0, norm_type=2.0, watch=None):
    if grads is _DEFAULT:
        grads = [_big(), _big(np.float32, 7)]
    kwargs = dict(grads=grads, max_norm=max_norm, norm_type=norm_type)
    if watch is None:
        if isinstance(grads, np.ndarray):
            watch = [grads]
        elif isinstance(grads, dict):
            watch = [v for v in grads.values() if isinstance(v, np.ndarray)]
        elif isinstance(grads, (list, tuple)):
            watch = [g for g in grads if isinstance(g, np.ndarray)]
        else:
            watch = []
    return kwargs, watch


def _views_overlap():
    base = _big(n=20)
    return _case([base[:12], base[8:]], watch=[base])


def _same_array_twice():
    a = _big()
    return _case([a, _big(np.float32), a])


def _flat_overlap():
    flat = _flat_and_view()
    return _case([flat.grad, flat.grads["w"]], watch=[flat.grad])


def _noncontig():
    base = _big(n=20)
    return _case([_big(), base[::2]], watch=[base])


def _transposed():
    base = np.full((4, 6), 3.0)
    return _case([_big(), base.T], watch=[base])


def _misaligned_case():
    a, buf = _misaligned()
    a[...] = 3.0  # a write by a kernel would show in buf
    return _case([_big(), a], watch=[buf])


# (id, builder, exception, message regex, also checked on grad_norm)
BAD_INPUTS = [
    ("max_norm_negative", lambda: _case(max_norm=-1.0), ValueError,
     r"max_norm must be >= 0, got -1\.0", False),
    ("max_norm_nan", lambda: _case(max_norm=math.nan), ValueError,
     r"max_norm must be >= 0, got nan", False),
    ("max_norm_minus_inf", lambda: _case(max_norm=-math.inf), ValueError,
     r"max_norm must be >= 0", False),
    ("max_norm_str", lambda: _case(max_norm="1.0"), TypeError,
     r"max_norm must be a real number, got str", False),
    ("max_norm_bool", lambda: _case(max_norm=True), TypeError,
     r"max_norm must be a real number, got bool", False),
    ("max_norm_none", lambda: _case(max_norm=None), TypeError,
     r"max_norm must be a real number, got NoneType", False),
    ("max_norm_array", lambda: _case(max_norm=np.array([1.0])), TypeError,
     r"max_norm must be a real number, got ndarray", False),
    ("norm_type_0", lambda: _case(norm_type=0), ValueError,
     r"norm_type must be > 0 \(or inf\), got 0", True),
    ("norm_type_-1", lambda: _case(norm_type=-1), ValueError,
     r"norm_type must be > 0 \(or inf\), got -1", True),
    ("norm_type_nan", lambda: _case(norm_type=math.nan), ValueError,
     r"norm_type must be > 0", True),
    ("norm_type_-inf", lambda: _case(norm_type=-math.inf), ValueError,
     r"norm_type must be > 0", True),
    ("norm_type_foo", lambda: _case(norm_type="foo"), TypeError,
     r"norm_type must be a real number or 'inf', got str", True),
    ("norm_type_none", lambda: _case(norm_type=None), TypeError,
     r"norm_type must be a real number or 'inf', got NoneType", True),
    ("norm_type_bool", lambda: _case(norm_type=True), TypeError,
     r"norm_type must be a real number or 'inf', got bool", True),
    ("int_array_single", lambda: _case(np.arange(5) * 10), TypeError,
     r"grads has dtype int64; lrfast updates float32, float64, float16 and bfloat16", True),
    ("int_array_in_list", lambda: _case([_big(), np.arange(5, dtype=np.int32) * 10]), TypeError,
     r"grads\[1\] has dtype int32", True),
    ("float16_array", lambda: _case([_big(), np.full(4, 3.0, np.float16)]), TypeError,
     r"grads\[1\] has dtype float16: gradient clipping takes float32 and float64", True),
    ("float16_in_dict", lambda: _case({"a": _big(), "h": np.full(4, 3.0, np.float16)}), TypeError,
     r"grads\['h'\] has dtype float16: gradient clipping", True),
    ("big_endian_f64", lambda: _case([_big(), np.full(4, 3.0, ">f8")]), TypeError,
     r"grads\[1\] has dtype >f8", True),
    ("big_endian_f32_single", lambda: _case(np.full(4, 3.0, ">f4")), TypeError,
     r"grads has dtype >f4", True),
    ("noncontiguous_view", _noncontig, ValueError, r"grads\[1\] is not C-contiguous", True),
    ("transposed_2d", _transposed, ValueError, r"grads\[1\] is not C-contiguous", True),
    ("misaligned", _misaligned_case, ValueError, r"grads\[1\] is not aligned", True),
    ("read_only", lambda: _case([_big(), _read_only()]), ValueError,
     r"grads\[1\] is read-only", False),
    ("read_only_single", lambda: _case(_read_only()), ValueError, r"grads is read-only", False),
    ("overlapping_views", _views_overlap, ValueError,
     r"grads\[1\] shares memory with grads\[0\]", False),
    ("same_array_twice", _same_array_twice, ValueError,
     r"grads\[2\] shares memory with grads\[0\]", False),
    ("flat_grad_and_its_view", _flat_overlap, ValueError, r"shares memory", False),
    ("list_with_list", lambda: _case([_big(), [3.0, 3.0]]), TypeError,
     r"grads\[1\] must be a numpy\.ndarray, got list", True),
    ("list_with_none", lambda: _case([_big(), None]), TypeError,
     r"grads\[1\] must be a numpy\.ndarray, got NoneType", True),
    ("dict_with_float", lambda: _case({"w": _big(), "b": 3.0}), TypeError,
     r"grads\['b'\] must be a numpy\.ndarray, got float", True),
    ("grads_str", lambda: _case("grads"), TypeError, r"list, tuple or dict of arrays", True),
    ("grads_none", lambda: _case(None), TypeError, r"list, tuple or dict", True),
    ("grads_scalar", lambda: _case(3.0), TypeError, r"list, tuple or dict of arrays, got float", True),
]


@pytest.mark.parametrize("builder,exc,match",
                         [pytest.param(b, e, m, id=i) for i, b, e, m, _ in BAD_INPUTS])
def test_bad_input_clip(builder, exc, match):
    kwargs, watch = builder()
    snapshot = [w.copy() for w in watch]
    with pytest.raises(exc, match=match):
        lrfast.clip_grad_norm_(**kwargs)
    for w, s in zip(watch, snapshot):
        assert_bitwise(w, s, "an input changed although the call raised")
    # the same call with error_if_nonfinite=True fails the same way
    with pytest.raises(exc, match=match):
        lrfast.clip_grad_norm_(**kwargs, error_if_nonfinite=True)
    for w, s in zip(watch, snapshot):
        assert_bitwise(w, s, "an input changed although the call raised")


@pytest.mark.parametrize("builder,exc,match",
                         [pytest.param(b, e, m, id=i) for i, b, e, m, g in BAD_INPUTS if g])
def test_bad_input_grad_norm(builder, exc, match):
    kwargs, watch = builder()
    snapshot = [w.copy() for w in watch]
    with pytest.raises(exc, match=match):
        lrfast.grad_norm(kwargs["grads"], kwargs["norm_type"])
    for w, s in zip(watch, snapshot):
        assert_bitwise(w, s)


def test_grad_norm_accepts_read_only_and_overlapping():
    """grad_norm writes nothing, so read-only and overlapping arrays are fine (each counted)."""
    base = np.linspace(-2, 3, 50)
    ro = base.copy()
    ro.setflags(write=False)
    grads = [ro, base[:30], base[20:]]
    for p in NORM_TYPES:
        np.testing.assert_allclose(lrfast.grad_norm(grads, p), reference.grad_norm(grads, p),
                                   rtol=NORM_RTOL_EXACT, atol=0)


def test_valid_edge_values_accepted():
    """The boundaries of the checks: max_norm 0 and inf, 'INF' spelt in capitals."""
    grads = make([(9,), (4,)], np.float64, seed=3)
    ours = copies(grads)
    assert lrfast.clip_grad_norm_(ours, math.inf, "INF") == reference.grad_norm(grads, INF)
    assert_all_bitwise(ours, grads)
    total = lrfast.clip_grad_norm_(ours, 0, 2)
    np.testing.assert_allclose(total, reference.grad_norm(grads, 2), rtol=NORM_RTOL_EXACT)
    assert all(not np.any(a) for a in ours)


# ------------------------------------------------------------------------------------------
# 6. Small API points
# ------------------------------------------------------------------------------------------

def test_generator_of_grads_is_accepted_as_torch_accepts_iterables():
    grads = [np.full(4, 3.0), np.full(5, 4.0)]
    want = [g.copy() for g in grads]
    want_norm = lrfast.reference.clip_grad_norm_(want, 1.0)
    assert lrfast.clip_grad_norm_((g for g in grads), 1.0) == pytest.approx(want_norm, rel=1e-15)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-15)


def test_error_if_nonfinite_must_be_bool():
    g = np.full(4, 3.0)
    with pytest.raises(TypeError, match="error_if_nonfinite"):
        lrfast.clip_grad_norm_(g, 1.0, error_if_nonfinite="no")
    assert (g == 3.0).all()


def test_reference_takes_a_single_array_like_lrfast():
    a, b = np.full(4, 3.0), np.full(4, 3.0)
    assert lrfast.reference.clip_grad_norm_(a, 1.0) == lrfast.clip_grad_norm_(b, 1.0) == 6.0
    np.testing.assert_allclose(a, b, rtol=1e-15)
    assert a[0] == pytest.approx(0.5, rel=1e-6)
