"""8-bit optimizer state: the maps, the block-wise rule, and its NumPy reference.

With ``state_dtype="int8"`` (or an :class:`Int8State`), an optimizer keeps each moment buffer of
a large enough param as one uint8 code per element plus one float32 scale per block of
``block_size`` elements (counted from the param's start): 1 byte per element, plus 4 bytes per
block, instead of 4.

The rule, for one block ``x`` (float32) and a map ``M`` (256 float32 values in [-1, 1], sorted):

    scale    = max |x[i]|                       (NaN if one is NaN)
    n[i]     = x[i] * (1 / scale)               (float32; 0 when scale is 0)
    code[i]  = the index of the value of M nearest to n[i]; a tie goes to the smaller magnitude
    x'[i]    = M[code[i]] * scale               (what the next step reads)

Two maps, the dynamic maps of bitsandbytes' 8-bit optimizers (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", 2022), so that their codes and scales convert to
lrfast's without requantising:

``SIGNED`` (first moments: values of either sign)
    for k = 0..6: the midpoints of ``2**k + 1`` equally spaced points from 0.1 to 1, times
    ``10**(k - 6)``, and their negatives; then 0 and 1: 127 negative values, 0, 128 positive.
``UNSIGNED`` (second moments and other non-negative buffers)
    the same with ``2**(k + 1) + 1`` points and no negatives: 0, and 255 positive values.

Both are built in float32 exactly as bitsandbytes builds them with torch (its ``linspace``
computes ``start + step * i`` with one rounding below the middle point and
``end - step * (n - 1 - i)`` from it on; ``tests/test_quantization.py`` checks the tables bit for
bit against the formula evaluated by torch, and against bitsandbytes where it installs). A
round trip moves a value by at most half the largest gap between neighbouring map values,
times the block's scale: 0.70% of the scale with the signed map, 0.35% with the unsigned one
(relative to the value itself the error grows as the value falls below the scale: see
docs/memory.md); magnitudes below ``2.75e-7 * scale`` (signed) and ``1.625e-7 * scale``
(unsigned) read as 0.

The kernels (src/_storage.pxi) find the nearest code without a search: see ``kernel_tables``.
The functions here are the reference the kernels are tested against, bit for bit.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np

__all__ = ["SIGNED", "UNSIGNED", "Int8State", "dynamic_map", "quantize_blockwise",
           "dequantize_blockwise"]

#: The default block size, as bitsandbytes' and torchao's 8-bit optimizers use.
DEFAULT_BLOCK_SIZE = 256
#: Params with fewer elements keep float32 state (bitsandbytes' ``min_8bit_size``).
DEFAULT_MIN_SIZE = 4096


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: the step rounded once, each point rounded once."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64(np.float32((e - s) / np.float32(steps - 1)))
    i = np.arange(steps)
    low = (np.float64(s) + step * i).astype(np.float32)
    high = (np.float64(e) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def dynamic_map(signed: bool = True) -> np.ndarray:
    """bitsandbytes' dynamic quantisation map (8 bits, 7 exponent bits): 256 sorted float32
    values in [-1, 1] (``signed``) or [0, 1]."""
    parts = []
    for k in range(7):
        bounds = _linspace32(0.1, 1.0, 2 ** k + 1 if signed else 2 ** (k + 1) + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (k - 6))
        parts.append(scale * means)
        if signed:
            parts.append(-scale * means)
    values = np.sort(np.concatenate(parts + [np.array([0.0, 1.0], dtype=np.float32)]))
    assert values.shape == (256,) and values.dtype == np.float32
    values.flags.writeable = False
    return values


SIGNED = dynamic_map(True)
UNSIGNED = dynamic_map(False)


def _halves(values: np.ndarray):
    """Per sign: (magnitudes ascending from 0, float32 midpoints between neighbours), and the
    code of 0. The codes of one sign must be contiguous from 0's: a sorted map with one 0."""
    zero = np.flatnonzero(values == 0)
    if zero.shape != (1,) or np.any(np.diff(values) <= 0):
        raise ValueError("a map must be strictly increasing with exactly one 0")
    z = int(zero[0])
    pos = values[z:].astype(np.float64)
    neg = -values[:z + 1][::-1].astype(np.float64)
    mids = [((m[:-1] + m[1:]) / 2).astype(np.float32) for m in (pos, neg)]
    return mids, z


def _nearest(n: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The code of the map value nearest to each of ``n`` (ties: the smaller magnitude)."""
    (pos_mids, neg_mids), zero = _halves(values)
    negative = np.signbit(n)
    mag = np.abs(n)
    steps = np.where(negative, np.searchsorted(neg_mids, mag, side="left"),
                     np.searchsorted(pos_mids, mag, side="left"))
    return (zero + np.where(negative, -steps, steps)).astype(np.uint8)


def _check_block(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"block_size must be a power of two from 32 to 2048, got {block_size!r}")
    size = int(block_size)
    if size < 32 or size > 2048 or size & (size - 1):
        raise ValueError(f"block_size must be a power of two from 32 to 2048, got {block_size!r}")
    return size


def quantize_blockwise(x, signed: bool = True, block_size: int = DEFAULT_BLOCK_SIZE):
    """(codes uint8 of ``x``'s shape, scales float32 of one per block) for float32 ``x``,
    blocks of ``block_size`` elements in C order; the rule of the module docstring."""
    block_size = _check_block(block_size)
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    nblocks = -(-flat.size // block_size)
    # Zeros pad the last block: they change neither its largest magnitude nor its codes.
    blocks = np.zeros((nblocks, block_size), dtype=np.float32)
    blocks.reshape(-1)[:flat.size] = flat
    scales = (blocks.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1).view(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(scales != 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)
        n = blocks * inv[:, None]
    codes = _nearest(n.reshape(-1)[:flat.size], SIGNED if signed else UNSIGNED)
    return codes.reshape(x.shape), scales.reshape(nblocks)


def dequantize_blockwise(codes, scales, signed: bool = True,
                         block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """The float32 values that ``codes`` and ``scales`` stand for (shape of ``codes``)."""
    block_size = _check_block(block_size)
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    if codes.dtype != np.uint8 or scales.dtype != np.float32:
        raise TypeError(f"codes must be uint8 and scales float32, got {codes.dtype} and "
                        f"{scales.dtype}")
    if scales.shape != (-(-codes.size // block_size),):
        raise ValueError(f"{codes.size} codes in blocks of {block_size} need "
                         f"{-(-codes.size // block_size)} scales, got shape {scales.shape}")
    values = SIGNED if signed else UNSIGNED
    per_element = np.repeat(scales, block_size)[:codes.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return (values[codes.reshape(-1)] * per_element).reshape(codes.shape)


# ------------------------------------------------------------------------------------------
# The kernels' tables
# ------------------------------------------------------------------------------------------

def kernel_tables(values: np.ndarray, key_shift: int, key_first: int, nkeys: int):
    """(values, lut, zero) for the kernels' nearest-code rule (src/_storage.pxi).

    A normalised magnitude's key is its float32 bits >> ``key_shift``, minus ``key_first``,
    clamped to [0, nkeys). Per sign (positive keys first), ``lut[key]`` is the count of
    midpoints below the key's range, plus ``2**9`` times the low ``key_shift`` bits of the
    midpoint inside the range (``2**key_shift`` when none is): the kernel adds 1 to the count
    when the magnitude's low bits exceed them. That equals the reference's count of midpoints
    below the magnitude as long as no key's range holds two midpoints and the clamped first and
    last keys hold none, which is checked here.
    """
    halves, zero = _halves(values)
    lut = np.empty(2 * nkeys, dtype=np.int32)
    keys = np.arange(nkeys, dtype=np.int64)
    lows = ((keys + key_first) << key_shift).astype(np.uint32).view(np.float32)
    lows[0] = 0.0
    highs = np.append(lows[1:], np.float32(np.inf))
    none = 1 << key_shift
    for s, m in enumerate(halves):
        below = np.searchsorted(m, lows, side="left")
        inside = np.searchsorted(m, highs, side="left") - below
        if inside.max() > 1 or inside[0] or inside[-1]:
            raise ValueError("the map's midpoints are closer than the kernels' keys resolve")
        mid_bits = np.append(m, np.float32(np.inf)).view(np.uint32)[below].astype(np.int64)
        low_bits = np.where(inside == 1, mid_bits & (none - 1), none)
        lut[s * nkeys:(s + 1) * nkeys] = below + (low_bits << 9)
    return np.ascontiguousarray(values, dtype=np.float32), lut, zero


def install(module) -> None:
    """Give a kernel build its two maps' tables."""
    shape = (module.QUANT_KEY_SHIFT, module.QUANT_KEY_FIRST, module.QUANT_KEYS)
    module.install_quant_maps([kernel_tables(SIGNED, *shape), kernel_tables(UNSIGNED, *shape)])


# ------------------------------------------------------------------------------------------
# The option
# ------------------------------------------------------------------------------------------

class Int8State:
    """8-bit optimizer state with its settings: ``state_dtype=Int8State(block_size=128)``.

    ``state_dtype="int8"`` is ``Int8State()``. Each moment buffer of a param with at least
    ``min_size`` elements is kept as uint8 codes and float32 block scales (the module
    docstring's rule); smaller params, and buffers that are not moments (Rprop's step sizes,
    averages of the params), keep float32 state.

    Parameters
    ----------
    block_size : int, default 256
        Elements per scale, a power of two from 32 to 2048 (bytes per element: 1 + 4/block_size).
    min_size : int, default 4096
        Params with fewer elements keep float32 state.
    """

    __slots__ = ("block_size", "min_size")
    block_size: int
    min_size: int

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, min_size: int = DEFAULT_MIN_SIZE):
        self.block_size = _check_block(block_size)
        if (isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral)
                or min_size < 0):
            raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
        self.min_size = int(min_size)

    def quantizes(self, size: int) -> bool:
        """Does a param of ``size`` elements get 8-bit state?"""
        return size >= self.min_size and size > 0

    def nblocks(self, size: int) -> int:
        return -(-size // self.block_size)

    def __eq__(self, other):
        return (isinstance(other, Int8State) and other.block_size == self.block_size
                and other.min_size == self.min_size)

    def __hash__(self):
        return hash((Int8State, self.block_size, self.min_size))

    def __repr__(self):
        return f"Int8State(block_size={self.block_size}, min_size={self.min_size})"


def filled(size: int, nblocks: int, value: float, sign: str, settings: Int8State):
    """(codes, scales) of ``size`` elements that all read as ``value`` (a buffer's start)."""
    c, sc = quantize_blockwise(np.full(settings.block_size, value, dtype=np.float32),
                               sign == "signed", settings.block_size)
    return np.full(size, c[0], dtype=np.uint8), np.full(nblocks, sc[0], dtype=np.float32)


def scales_name(buffer: str) -> str:
    """The state entry holding an 8-bit buffer's block scales."""
    return buffer + "_absmax"


def split_state(entry: dict) -> dict:
    """{buffer: (codes, scales) or array} from a state entry with ``*_absmax`` entries."""
    out: dict = {}
    for name, arr in entry.items():
        if name.endswith("_absmax") and name[:-7] in entry:
            continue
        scales: Optional[np.ndarray] = entry.get(scales_name(name))
        out[name] = arr if scales is None else (arr, scales)
    return out
