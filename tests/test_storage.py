"""The storage template of the kernels (src/_storage.pxi): one element loop, specialised per
(storage, math) type. SGD runs over bfloat16 storage with float32 math through the private
``lrfast.functional._bfloat16_sgd_``; it must be bitwise the NumPy reference, which loads to
float32, runs ``reference.sgd_`` and rounds back to nearest even."""
import numpy as np
import pytest

from lrfast import functional as F
from lrfast import reference as R

CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True),
]


def _bf16(rng, n, scale=1.0):
    return R.float32_to_bfloat16((rng.standard_normal(n) * scale).astype(np.float32))


@pytest.mark.parametrize("hyper", CONFIGS, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("n", [1, 37, 4096 + 13, 200_003])
def test_bfloat16_sgd_is_bitwise_the_reference(hyper, n):
    rng = np.random.default_rng(n)
    p = _bf16(rng, n)
    buf = np.zeros(n, np.uint16)
    rp, rbuf = p.copy(), buf.copy()
    for t in range(1, 6):
        g = _bf16(rng, n, 0.1)
        F._bfloat16_sgd_(p, g, buf, step=t, **hyper)
        R._bfloat16_sgd_(rp, g, rbuf, step=t, **hyper)
        assert np.array_equal(p, rp), f"param differs at step {t}"
        assert np.array_equal(buf, rbuf), f"momentum buffer differs at step {t}"
    # the update did something: not a loop that leaves the bits alone
    assert not np.array_equal(p, _bf16(np.random.default_rng(n), n))


def test_bfloat16_rounding_matches_an_independent_implementation():
    """The reference's float32 -> bfloat16 rounding against torch's (round to nearest even),
    on ties, NaN, infinities, subnormals and random values."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    special = np.array([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x7F7FFFFF, 0x00000001,
                        0x80008000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001],
                       dtype=np.uint32).view(np.float32)
    x = np.concatenate([special, rng.standard_normal(10_000).astype(np.float32) * 1e3])
    ours = R.float32_to_bfloat16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = np.isfinite(x) | np.isinf(x)
    assert np.array_equal(ours[finite], theirs[finite])
    # NaN stays NaN (the exact payload is not a contract)
    back = R.bfloat16_to_float32(ours)
    assert np.array_equal(np.isnan(back), np.isnan(x))


def test_bfloat16_sgd_checks_before_writing():
    p = np.zeros(4, np.uint16)
    with pytest.raises(TypeError, match="uint16 array of bfloat16 bits"):
        F._bfloat16_sgd_(p, np.zeros(4, np.float32), step=1, lr=0.1)
    with pytest.raises(ValueError, match="needs a momentum_buffer"):
        F._bfloat16_sgd_(p, np.zeros(4, np.uint16), step=1, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="shares memory"):
        F._bfloat16_sgd_(p, p, step=1, lr=0.1)
    assert not p.any()


def test_other_updates_refuse_a_storage_they_have_no_loop_for():
    from lrfast import _dispatch, _layout

    table, offsets = _layout.table([[0], None, [0], [0], [0]], [1])
    with pytest.raises(ValueError, match="no loop for bfloat16"):
        _layout.plan("adam", table, offsets, "bfloat16")
    assert _dispatch.kernels.UPDATE_STORAGES["sgd"] == ("float32", "float64", "bfloat16")
