"""Element types (src/_storage.pxi): the half-precision conversions the kernels use, held to
independent conversions (NumPy's float16 cast, ml_dtypes' bfloat16) and to lrfast.reference bit
for bit, and stochastic rounding checked for bias and reproducibility."""
import numpy as np
import pytest

from lrfast import _dispatch
from lrfast import reference as R

K = _dispatch.kernels
HALF = ["bfloat16", "float16"]


def _convert(x, storage, rounding="nearest", **kw):
    out = np.empty(x.size, np.uint16)
    K._convert(np.ascontiguousarray(x, np.float32), out, storage, rounding, **kw)
    return out


def _widen(bits, storage):
    out = np.empty(bits.size, np.float32)
    K._widen_to(np.ascontiguousarray(bits, np.uint16), out, storage)
    return out


def _same_bits(a, b):
    """Bitwise equal, except that any NaN matches any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _interesting_floats(rng):
    """Random bit patterns (every exponent, NaN, inf, subnormals), scaled normals, ties and
    the edges of float16's range."""
    raw = rng.integers(0, 2**32, size=300_000, dtype=np.uint64).astype(np.uint32)
    scaled = rng.standard_normal(100_000) * np.exp2(rng.integers(-40, 20, 100_000))
    # Exact ties: a half's value plus half its gap.
    ties_bf16 = (np.arange(0, 2**16, 7, dtype=np.uint32) << 16) | np.uint32(0x8000)
    edges = [65504, 65519.99, 65520, 65536, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14,
             2.0**-14 - 2.0**-25, 6e-8, -0.0, 0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45]
    return np.concatenate([raw.view(np.float32), scaled.astype(np.float32),
                           ties_bf16.view(np.float32), np.array(edges, np.float32)])


@pytest.mark.parametrize("storage", HALF)
def test_every_half_widens_exactly(storage):
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    got = _widen(bits, storage)
    if storage == "float16":
        expected = bits.view(np.float16).astype(np.float32)
    else:  # the bits are the top half of a float32
        expected = (bits.astype(np.uint32) << 16).view(np.float32)
    assert _same_bits(got, expected).all()
    assert _same_bits(got, R.widen(bits, storage)).all()


def test_float16_rounds_as_numpy():
    x = _interesting_floats(np.random.default_rng(0))
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    got = _convert(x, "float16")
    nan = np.isnan(x)
    assert (got[~nan] == expected[~nan]).all()
    # A NaN becomes the quiet NaN 0x7e00 with its sign.
    assert ((got[nan] & 0x7FFF) == 0x7E00).all()
    assert (got == R.narrow(x, "float16")).all()


def test_bfloat16_rounds_as_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = _interesting_floats(np.random.default_rng(1))
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    got = _convert(x, "bfloat16")
    nan = np.isnan(x)
    assert (got[~nan] == expected[~nan]).all()
    assert ((got[nan] & 0x7F80) == 0x7F80).all() and ((got[nan] & 0x7F) != 0).all()
    assert (got == R.narrow(x, "bfloat16")).all()


@pytest.mark.parametrize("storage", HALF)
def test_stochastic_rounding_is_the_reference_bit_for_bit(storage):
    x = _interesting_floats(np.random.default_rng(2))
    for seed, step, stream, first in [(0, 1, 0, 0), (7, 12, 3, 1000), (2**64 - 1, 2**40, 255,
                                                                         2**33 - 5)]:
        kw = dict(seed=seed, step=step, stream=stream, first=first)
        got = _convert(x, storage, "stochastic", **kw)
        assert (got == R.narrow(x, storage, "stochastic", **kw)).all(), kw


@pytest.mark.parametrize("storage", HALF)
def test_stochastic_rounding_lands_on_a_neighbour(storage):
    """Each result is one of the two halves around the value (in sign-magnitude bits, the
    nearest one and the one next to it on the value's side); exactly representable values,
    inf and NaN are kept."""
    x = _interesting_floats(np.random.default_rng(3))
    x = x[np.isfinite(x) & (np.abs(x) < 65504)]
    nearest = _convert(x, storage)
    wide = R.widen(nearest, storage)
    other = np.where(np.abs(wide) < np.abs(x), nearest.astype(np.int64) + 1,
                     nearest.astype(np.int64) - 1)
    other = np.where(wide == x, nearest, other).astype(np.uint16)
    got = _convert(x, storage, "stochastic", seed=5, step=1)
    assert ((got == nearest) | (got == other)).all()
    assert (got == other).any() and (got == nearest).any()
    again = _convert(wide, storage, "stochastic", seed=9, step=4)
    assert (again == nearest).all()
    special = np.array([np.inf, -np.inf, np.nan], np.float32)
    assert _same_bits(R.widen(_convert(special, storage, "stochastic"), storage), special).all()


@pytest.mark.parametrize("storage, value", [
    (s, v) for s in HALF for v in (1 + 2.0**-9 / 3, -3e-6, 1e-7, 7.3e-9, 1234.567, 3e-12)]
    + [("bfloat16", 1e-30), ("bfloat16", -2.5e-38)])
def test_stochastic_rounding_is_unbiased(storage, value):
    """The mean of many roundings of one value is the value: within 5 standard errors of the
    Bernoulli choice between its two neighbours. (float16 values below about 2^-48 round to
    zero, a documented limit far below its smallest subnormal 2^-24.)"""
    n = 400_000
    x = np.full(n, value, np.float32)
    got = R.widen(_convert(x, storage, "stochastic", seed=11, step=3), storage).astype(np.float64)
    lo, hi = got.min(), got.max()
    assert hi - lo <= 2 * abs(float(x[0])) + 1e-7  # two neighbours at most
    p = 0.0 if hi == lo else (float(x[0]) - lo) / (hi - lo)
    err = 5 * np.sqrt(max(p * (1 - p), 1.0 / n) / n) * (hi - lo)
    assert abs(got.mean() - float(x[0])) <= err + 1e-12 * abs(float(x[0]))
    if storage == "bfloat16" or abs(value) >= 6e-8:
        assert hi > lo  # the value is not representable: both neighbours occur


def test_stochastic_bits_depend_on_seed_step_stream_and_index():
    x = np.full(4096, 1 + 2.0**-9, np.float32)
    base = _convert(x, "bfloat16", "stochastic", seed=1, step=1, stream=0)
    assert (base == _convert(x, "bfloat16", "stochastic", seed=1, step=1, stream=0)).all()
    for kw in [dict(seed=2, step=1, stream=0), dict(seed=1, step=2, stream=0),
               dict(seed=1, step=1, stream=2)]:
        assert (base != _convert(x, "bfloat16", "stochastic", **kw)).mean() > 0.3
    # ``first`` numbers the elements: a shifted window is the same bits, shifted.
    shifted = _convert(x, "bfloat16", "stochastic", seed=1, step=1, stream=0, first=100)
    assert (shifted[:-100] == base[100:]).all()


def test_random_bits_look_uniform():
    r = R.random_bits(np.arange(1 << 18), seed=3, step=1, stream=0)
    for shift in (0, 8, 16, 24):
        counts = np.bincount((r >> np.uint32(shift)) & np.uint32(0xFF), minlength=256)
        chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
        assert chi2 < 400  # 255 degrees of freedom: p(chi2 > 400) ~ 1e-8


def test_conversion_helpers_refuse_bad_input():
    with pytest.raises(ValueError):
        K._convert(np.zeros(2, np.float32), np.zeros(3, np.uint16), "float16")
    with pytest.raises(ValueError):
        K._convert(np.zeros(2, np.float32), np.zeros(2, np.uint16), "float32")
    with pytest.raises(ValueError):
        K._convert(np.zeros(2, np.float32), np.zeros(2, np.uint16), "float16", "up")
