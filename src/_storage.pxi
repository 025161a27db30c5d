# Element types: what the buffers hold, and how the update loops, written over the math types
# float32 and float64 only, run over buffers of other types.
#
#   float32   math float32, read and written in place
#   float64   math float64, read and written in place (a float64 step is float64 throughout)
#   bfloat16  math float32: the 16 bits are the top half of a float32
#   float16   math float32: IEEE binary16
#
# A step whose buffers are not all its math type (bf16/fp16 params or state, half grads into
# float32 master weights, a half copy of the params written out) runs through
# ``_mixed_segment``: the span is cut into tiles of TILE elements; each half buffer's tile is
# widened into a float32 scratch tile on the stack (L1-resident: the wide copy never reaches
# memory), the update's own float32 loop runs on the tile, and the written buffers are narrowed
# back, rounded to nearest even or stochastically. float32 buffers are passed through in place.
# So every update, present and future, takes every element type without a loop of its own, and
# its arithmetic is exactly its float32 loop's.
#
# Stochastic rounding draws its bits from a counter-based hash of (seed, step, buffer, element
# index in the plan), never from a generator's state: a run is reproducible for any number of
# threads and any tiling. lrfast.reference.random_bits is the same function in NumPy.

cdef enum:
    STORE_F32 = 0
    STORE_F64 = 1
    STORE_BF16 = 2
    STORE_F16 = 3
    NUM_STORAGES = 4
    # 8-bit blockwise state (see "8-bit blockwise state" below): codes through the signed
    # and the unsigned dynamic map. Only state rows hold them.
    STORE_Q8S = 4
    STORE_Q8U = 5
    # Elements per scratch tile: 8 buffers x 256 x 4 bytes fit in L1 with room to spare.
    TILE = 256
    # The largest quantisation block (a tile of a plan with 8-bit state is one block).
    MAX_QBLOCK = 2048
    # The stream of the half copy of the params (buffer rows use their row number).
    OUT_STREAM = 255

STORAGE_CODES = {"float32": STORE_F32, "float64": STORE_F64, "bfloat16": STORE_BF16,
                 "float16": STORE_F16}
STORAGE_ITEMSIZE = {STORE_F32: 4, STORE_F64: 8, STORE_BF16: 2, STORE_F16: 2}
cdef Py_ssize_t[NUM_STORAGES + 2] _ITEMSIZE = [4, 8, 2, 2, 1, 1]
# The 8-bit state's element types, by the name a plan's ``rows`` give them.
QUANT_CODES = {"int8s": STORE_Q8S, "int8u": STORE_Q8U}

ROUNDING_MODES = ("nearest", "stochastic")


cdef inline uint32_t _bits(float f) noexcept nogil:
    cdef uint32_t u
    memcpy(&u, &f, 4)
    return u


cdef inline float _float(uint32_t u) noexcept nogil:
    cdef float f
    memcpy(&f, &u, 4)
    return f


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------

cdef inline float _bf16_to_f32(uint16_t b) noexcept nogil:
    return _float((<uint32_t>b) << 16)


cdef inline uint16_t _f32_to_bf16(float f) noexcept nogil:
    # Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate. A NaN
    # keeps its top bits with the quiet bit set (rounding could otherwise carry it to inf). Both
    # results are formed and one selected, so the loop around this stays branch-free.
    cdef uint32_t u = _bits(f)
    # A NaN is truncated instead, with the quiet bit set (rounding could carry it to inf). The
    # test is a float comparison (f != f: NaN), which needs no constants: this loop runs inside
    # the updates' loops, where a few more vector constants spill registers.
    cdef uint32_t nan = 0xffffffffu if f != f else 0u
    cdef uint32_t bias = (0x7fffu + ((u >> 16) & 1u)) & ~nan
    return <uint16_t>(((u + bias) >> 16) | (nan & 0x40u))


cdef inline uint16_t _f32_to_bf16_sr(float f, uint32_t r) noexcept nogil:
    # Stochastic: add 16 uniform bits below the cut and truncate. Rounds up with probability
    # (distance to the lower neighbour) / (gap), so the result is unbiased. inf has zeros below
    # the cut and stays inf; the largest finite values may round up to inf.
    cdef uint32_t u = _bits(f)
    cdef uint32_t rounded = (u + (r & 0xffffu)) >> 16
    cdef uint32_t quiet = (u >> 16) | 0x40u
    return <uint16_t>(quiet if (u & 0x7fffffffu) > 0x7f800000u else rounded)


# --------------------------------------------------------------------------------------------
# float16 (IEEE binary16), in integer and float32 operations only: no F16C needed, and no
# float32 subnormal is formed, so flush-to-zero does not change the conversions
# --------------------------------------------------------------------------------------------

cdef inline float _f16_to_f32(uint16_t h) noexcept nogil:
    # Exponent and mantissa moved into float32 position and the exponent rebiased (+112).
    # inf/NaN get the rest of the rebias (+112 again, to 255); zero and subnormals are
    # renormalised by a float subtraction: (2^-14 + m 2^-24) - 2^-14 = m 2^-24, exactly.
    cdef uint32_t em = (<uint32_t>h & 0x7fffu) << 13
    cdef uint32_t e = em & 0x0f800000u
    cdef uint32_t sign = (<uint32_t>h & 0x8000u) << 16
    cdef uint32_t normal = em + (112u << 23)
    cdef uint32_t special = normal + (112u << 23)
    cdef uint32_t small = _bits(_float(normal + (1u << 23)) - _float(113u << 23))
    cdef uint32_t out = special if e == 0x0f800000u else (small if e == 0 else normal)
    return _float(out | sign)


cdef inline uint16_t _f32_to_f16(float f) noexcept nogil:
    # Round to nearest, ties to even, the rounding done by one float addition (the method of
    # the FP16 library and torch's c10::Half). base = |f| * 2^112 * 2^-110 is 4|f|, or inf when
    # |f| >= 2^16. With e = max(f's exponent, -14), the sum 2^(e+15) + 4|f| has its last place
    # at 2^(e-8), which is where a half of exponent e rounds 4|f|: the hardware rounds it to
    # nearest even. The sum's mantissa is then the half's 11-bit significand k, and its low
    # exponent bits are e + 14; (e + 14) << 10 plus k (whose implicit 1 carries the exponent
    # to e + 15) is the half. Below 2^-14 the sum is 2 plus the subnormal's count of 2^-22.
    # No float32 subnormal is formed, so flush-to-zero changes nothing.
    cdef uint32_t w = _bits(f)
    cdef uint32_t sign = (w >> 16) & 0x8000u
    cdef float base = (fabsf(f) * <float>5.192296858534828e+33) * <float>7.703719777548943e-34
    cdef uint32_t bias = (w + w) & 0xff000000u
    bias = bias if bias > 0x71000000u else 0x71000000u
    base = _float((bias >> 1) + 0x07800000u) + base
    cdef uint32_t b = _bits(base)
    cdef uint32_t nonsign = ((b >> 13) & 0x7c00u) + (b & 0x0fffu)
    return <uint16_t>(sign | (0x7e00u if f != f else nonsign))


cdef inline uint16_t _f32_to_f16_sr(float f, uint32_t r) noexcept nogil:
    # Stochastic: as _f32_to_f16 but adding uniform bits below the cut instead of a half.
    # Normal results cut 13 bits. Subnormal results are the 24-bit significand shifted right by
    # s = 126 - exponent bits (>= 14); past 31 it is pre-shifted, so values below ~2^-48 round
    # to zero (the bias this leaves is below 2^-24 of the smallest subnormal).
    cdef uint32_t u = _bits(f)
    cdef uint32_t sign = (u >> 16) & 0x8000u
    cdef uint32_t a = u & 0x7fffffffu
    cdef uint32_t special = 0x7e00u if a > 0x7f800000u else 0x7c00u
    cdef uint32_t ex = a >> 23
    cdef uint32_t sig = (a & 0x7fffffu) | (0x800000u if ex != 0 else 0u)
    cdef uint32_t s = 126u - ex if ex < 113u else 14u
    cdef uint32_t pre = s - 31u if s > 31u else 0u
    cdef uint32_t cut = s if s < 31u else 31u
    cdef uint32_t small
    sig = sig >> pre if pre < 32u else 0u
    small = (sig + (r & ((1u << cut) - 1u))) >> cut
    cdef uint32_t normal = (a - (112u << 23) + (r & 0x1fffu)) >> 13
    cdef uint32_t out = special if a >= (143u << 23) else (small if a < (113u << 23) else normal)
    return <uint16_t>(out | sign)


# --------------------------------------------------------------------------------------------
# Random bits for stochastic rounding: a counter-based hash
# --------------------------------------------------------------------------------------------

cdef inline uint32_t _mix32(uint32_t x) noexcept nogil:
    # A 32-bit integer finaliser (xor-shift-multiply, two rounds): each input bit flips about
    # half the output bits.
    x = x ^ (x >> 16)
    x = x * 0x7feb352du
    x = x ^ (x >> 15)
    x = x * 0x846ca68bu
    x = x ^ (x >> 16)
    return x


cdef inline void _stream_keys(uint64_t seed, uint64_t step, uint32_t stream,
                              uint32_t* k1, uint32_t* k2) noexcept nogil:
    """The two keys of one buffer's stream at one step."""
    cdef uint32_t h = 0x9e3779b9u
    h = _mix32(h ^ <uint32_t>seed)
    h = _mix32(h ^ <uint32_t>(seed >> 32))
    h = _mix32(h ^ <uint32_t>step)
    h = _mix32(h ^ <uint32_t>(step >> 32))
    h = _mix32(h ^ stream)
    k1[0] = h
    k2[0] = _mix32(h ^ 0x85ebca6bu)


cdef inline uint32_t _random_bits(uint64_t i, uint32_t k1, uint32_t k2) noexcept nogil:
    """32 random bits for element ``i`` of a stream."""
    return _mix32(_mix32(<uint32_t>i + k1 + <uint32_t>(i >> 32) * 0x85ebca77u) ^ k2)


# --------------------------------------------------------------------------------------------
# Widening and narrowing loops (each vectorises: no branches, no calls)
# --------------------------------------------------------------------------------------------

cdef void _widen(const char* src, int storage, float* dst, Py_ssize_t n) noexcept nogil:
    cdef const uint16_t* h = <const uint16_t*>src
    cdef Py_ssize_t i
    if storage == STORE_BF16:
        for i in range(n):
            dst[i] = _bf16_to_f32(h[i])
    else:
        for i in range(n):
            dst[i] = _f16_to_f32(h[i])


cdef void _narrow(const float* src, char* dst, int storage, Py_ssize_t n, bint stochastic,
                  uint64_t first, uint32_t k1, uint32_t k2) noexcept nogil:
    """Round ``src`` into the half buffer ``dst``; ``first`` is the index of element 0 in the
    plan (the counter of the random bits)."""
    cdef uint16_t* h = <uint16_t*>dst
    cdef Py_ssize_t i
    if storage == STORE_BF16:
        if stochastic:
            for i in range(n):
                h[i] = _f32_to_bf16_sr(src[i], _random_bits(first + <uint64_t>i, k1, k2))
        else:
            for i in range(n):
                h[i] = _f32_to_bf16(src[i])
    elif stochastic:
        for i in range(n):
            h[i] = _f32_to_f16_sr(src[i], _random_bits(first + <uint64_t>i, k1, k2))
    else:
        for i in range(n):
            h[i] = _f32_to_f16(src[i])


# --------------------------------------------------------------------------------------------
# 8-bit blockwise state
# --------------------------------------------------------------------------------------------
#
# A state row of STORE_Q8S or STORE_Q8U holds one uint8 code per element, and a float32 scale
# per block of ``qblock`` elements (blocks counted from the tensor's start) in a row of its own
# after the update's rows. Element i reads as map[code[i]] * scale[i // qblock], where map is
# one of two 256-entry tables of values in [-1, 1] built by lrfast.quantization (bitsandbytes'
# dynamic maps: the signed one for moments of either sign, the unsigned one for non-negative
# ones) and installed once by ``install_quant_maps``.
#
# Writing a block: its scale is its largest magnitude (the maximum of the float bits with the
# sign cleared, so a NaN, whose bits beat every number's, makes the scale NaN and the whole
# block reads NaN); each value is multiplied by 1/scale (0 when the scale is 0) and stored as
# the code of the nearest map value, a tie going to the smaller magnitude.
#
# The nearest code without a search: a normalised magnitude's float bits shifted right by
# QKEY_SHIFT are its key (exponent and top 8 mantissa bits). No key's range holds more than
# one of the midpoints between neighbouring map magnitudes (lrfast.quantization checks it when
# it builds the tables). So, per sign, ``lut[key]`` holds in its low 9 bits the number of
# midpoints below the key's range and above them the low QKEY_SHIFT bits of the midpoint inside
# the range (2^QKEY_SHIFT when there is none): one integer comparison of the magnitude's low
# bits completes the count, with a single table read. The count is how many steps from the
# code of 0 the nearest code lies: up for positive values, down for negative ones.

cdef enum:
    QKEY_SHIFT = 15          # a key keeps 8 mantissa bits
    QKEY_FIRST = 101 << 8    # the key of 2^-26: smaller magnitudes share key 0
    QKEYS = 27 << 8          # keys up to the binade [1, 2); larger magnitudes share the last

QUANT_KEY_SHIFT = QKEY_SHIFT
QUANT_KEY_FIRST = QKEY_FIRST
QUANT_KEYS = QKEYS
QUANT_MAX_BLOCK = MAX_QBLOCK


cdef struct QMap:
    float values[256]       # code -> value
    int lut[2 * QKEYS]      # positive magnitudes' keys, then negative ones' (see above)
    int zero                # the code of 0


cdef QMap _qmaps[2]         # [0] signed (STORE_Q8S), [1] unsigned (STORE_Q8U)
cdef bint _qmaps_installed = False


def install_quant_maps(maps):
    """Install the two 8-bit maps, signed then unsigned, each as lrfast.quantization builds
    it: (values float32[256], lut int32[2 * QUANT_KEYS], zero)."""
    global _qmaps_installed
    cdef Py_ssize_t i, j
    cdef const float[::1] values
    cdef const int[::1] lut
    if len(maps) != 2:
        raise ValueError("install_quant_maps takes the signed and the unsigned map")
    for i in range(2):
        values, lut, zero = maps[i]
        if values.shape[0] != 256 or lut.shape[0] != 2 * QKEYS:
            raise ValueError("a quantisation map has the wrong table sizes")
        if not 0 <= zero < 256:
            raise ValueError("the code of 0 must be in [0, 256)")
        for j in range(2 * QKEYS):
            if not 0 <= (lut[j] & 0x1ff) <= 256 or not 0 <= (lut[j] >> 9) <= (1 << QKEY_SHIFT):
                raise ValueError("a quantisation lookup entry is out of range")
        for j in range(256):
            _qmaps[i].values[j] = values[j]
        for j in range(2 * QKEYS):
            _qmaps[i].lut[j] = lut[j]
        _qmaps[i].zero = zero
    _qmaps_installed = True


# The two loops in C, each cut in phases: the arithmetic in loops the compiler vectorises, and
# the table reads in loops of their own: AVX2 gathers in the _optim_avx2 build, scalar loads
# otherwise (the compiler is kept from turning them into gathers of its own choosing). Every
# build computes the same float32 products and integer operations, so all store the same codes.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && !defined(__clang__)
    #define LRFAST_SCALAR_LOADS __attribute__((optimize("no-tree-vectorize")))
    #else
    #define LRFAST_SCALAR_LOADS
    #endif
    #if defined(__AVX2__)
    #include <immintrin.h>
    #endif

    static LRFAST_SCALAR_LOADS void lrfast_q8_lookup_keys(const int32_t* lut, int32_t* keys,
                                                          Py_ssize_t n) {
        Py_ssize_t i = 0;
    #if defined(__AVX2__)
        for (; i + 8 <= n; i += 8) {
            __m256i k = _mm256_loadu_si256((const __m256i*)(keys + i));
            _mm256_storeu_si256((__m256i*)(keys + i), _mm256_i32gather_epi32((const int*)lut, k, 4));
        }
    #endif
        for (; i < n; i++)
            keys[i] = lut[keys[i]];
    }

    static LRFAST_SCALAR_LOADS void lrfast_q8_lookup_values(const float* values,
                                                            const uint8_t* codes, float* x,
                                                            Py_ssize_t n) {
        Py_ssize_t i = 0;
    #if defined(__AVX2__)
        for (; i + 8 <= n; i += 8) {
            __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + i)));
            _mm256_storeu_ps(x + i, _mm256_i32gather_ps(values, c, 4));
        }
    #endif
        for (; i < n; i++)
            x[i] = values[codes[i]];
    }

    /* n <= 2048 (MAX_QBLOCK) */
    static void lrfast_q8_quantize(const float* x, uint8_t* codes, float* scale, Py_ssize_t n,
                                   const int32_t* lut, int zero, int shift, int first,
                                   int nkeys) {
        int32_t keys[2048];
        uint32_t m = 0, low = (1u << shift) - 1u;
        float amax, inv;
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, &x[i], 4);
            u &= 0x7fffffffu;
            m = u > m ? u : m;
        }
        memcpy(&amax, &m, 4);
        inv = amax != 0.0f ? 1.0f / amax : 0.0f;
        *scale = amax;
    #if defined(__AVX2__)
        {
            /* One pass, eight at a time: key, the table entry by a gather, the count, the code,
               the low bytes packed to 8 codes. */
            const __m256 vinv = _mm256_set1_ps(inv);
            const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
            const __m256i vfirst = _mm256_set1_epi32(first);
            const __m256i vzero = _mm256_setzero_si256();
            const __m256i vlast = _mm256_set1_epi32(nkeys - 1);
            const __m256i vnkeys = _mm256_set1_epi32(nkeys);
            const __m256i vlow = _mm256_set1_epi32((int)low);
            const __m256i vcount = _mm256_set1_epi32(0x1ff);
            const __m256i vcode0 = _mm256_set1_epi32(zero);
            const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                                  -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1,
                                                  -1, -1, -1, -1, -1, -1, -1, -1);
            for (i = 0; i + 8 <= n; i += 8) {
                __m256i u = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
                __m256i neg = _mm256_srai_epi32(u, 31);
                __m256i a = _mm256_and_si256(u, absmask);
                __m256i key = _mm256_sub_epi32(_mm256_srli_epi32(a, shift), vfirst);
                key = _mm256_min_epi32(_mm256_max_epi32(key, vzero), vlast);
                key = _mm256_add_epi32(key, _mm256_and_si256(neg, vnkeys));
                __m256i e = _mm256_i32gather_epi32((const int*)lut, key, 4);
                __m256i up = _mm256_cmpgt_epi32(_mm256_and_si256(a, vlow),
                                                _mm256_srli_epi32(e, 9));
                __m256i g = _mm256_sub_epi32(_mm256_and_si256(e, vcount), up);
                g = _mm256_sub_epi32(_mm256_xor_si256(g, neg), neg);
                __m256i c = _mm256_shuffle_epi8(_mm256_add_epi32(vcode0, g), pick);
                uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(c));
                uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(c, 1));
                memcpy(codes + i, &lo, 4);
                memcpy(codes + i + 4, &hi, 4);
            }
            x += i;
            codes += i;
            n -= i;
        }
    #endif
        for (i = 0; i < n; i++) {
            float v = x[i] * inv;
            uint32_t u;
            int key;
            memcpy(&u, &v, 4);
            key = (int)((u & 0x7fffffffu) >> shift) - first;
            key = key < 0 ? 0 : key;
            key = key > nkeys - 1 ? nkeys - 1 : key;
            keys[i] = key + ((u >> 31) ? nkeys : 0);
        }
        lrfast_q8_lookup_keys(lut, keys, n);
        for (i = 0; i < n; i++) {
            float v = x[i] * inv;
            uint32_t u;
            int32_t e = keys[i], g;
            memcpy(&u, &v, 4);
            g = (e & 0x1ff) + ((int32_t)(u & low) > (e >> 9) ? 1 : 0);
            codes[i] = (uint8_t)(zero + ((u >> 31) ? -g : g));
        }
    }

    static void lrfast_q8_dequantize(const uint8_t* codes, float scale, float* x, Py_ssize_t n,
                                     const float* values) {
        lrfast_q8_lookup_values(values, codes, x, n);
        for (Py_ssize_t i = 0; i < n; i++)
            x[i] *= scale;
    }
    """
    void lrfast_q8_quantize(const float* x, uint8_t* codes, float* scale, Py_ssize_t n,
                            const int* lut, int zero, int shift, int first,
                            int nkeys) noexcept nogil
    void lrfast_q8_dequantize(const uint8_t* codes, float scale, float* x, Py_ssize_t n,
                              const float* values) noexcept nogil


cdef inline void _quantize(const float* x, uint8_t* codes, float* scale, Py_ssize_t n,
                           const QMap* q) noexcept nogil:
    """One block: its scale into ``scale[0]`` and each value's nearest code into ``codes``."""
    lrfast_q8_quantize(x, codes, scale, n, q.lut, q.zero, QKEY_SHIFT, QKEY_FIRST, QKEYS)


cdef inline void _dequantize(const uint8_t* codes, float scale, float* x, Py_ssize_t n,
                             const QMap* q) noexcept nogil:
    lrfast_q8_dequantize(codes, scale, x, n, q.values)


def _quantize_blocks(const float[::1] x, uint8_t[::1] codes, float[::1] scales, bint signed,
                     Py_ssize_t block):
    """Quantise ``x`` block by block as the kernels do (testing and conversions)."""
    cdef Py_ssize_t n = x.shape[0], b, m
    if not _qmaps_installed:
        raise RuntimeError("the quantisation maps are not installed")
    if codes.shape[0] != n or block < 1 or scales.shape[0] != (n + block - 1) // block:
        raise ValueError("codes must match x, and scales hold one value per block")
    with nogil:
        b = 0
        while b * block < n:
            m = n - b * block if n - b * block < block else block
            _quantize(&x[b * block], &codes[b * block], &scales[b], m, &_qmaps[0 if signed else 1])
            b += 1


def _dequantize_blocks(const uint8_t[::1] codes, const float[::1] scales, float[::1] x,
                       bint signed, Py_ssize_t block):
    """Dequantise block by block as the kernels do (testing and conversions)."""
    cdef Py_ssize_t n = x.shape[0], b, m
    if not _qmaps_installed:
        raise RuntimeError("the quantisation maps are not installed")
    if codes.shape[0] != n or block < 1 or scales.shape[0] != (n + block - 1) // block:
        raise ValueError("codes must match x, and scales hold one value per block")
    with nogil:
        b = 0
        while b * block < n:
            m = n - b * block if n - b * block < block else block
            _dequantize(&codes[b * block], scales[b], &x[b * block], m,
                        &_qmaps[0 if signed else 1])
            b += 1


# --------------------------------------------------------------------------------------------
# Element types for fused loops: an update may also have loops written over these, which load
# and convert in registers instead of through the tiles (its ``fast`` entry, see _updates.pxi)
# --------------------------------------------------------------------------------------------

# The half types as stored: structs, so that each is a type of its own for the fused types (a
# bare uint16_t would be any 16-bit integer).
cdef struct bfloat16:
    uint16_t bits

cdef struct float16:
    uint16_t bits

# One fused type per role, so that a loop's params, grads, state and half copy can each be of
# their own type. Cython specialises a function for every combination; the C compiler only
# compiles those a dispatcher calls.
ctypedef fused param_t:
    float
    bfloat16
    float16

ctypedef fused grad_t:
    float
    bfloat16
    float16

ctypedef fused state_t:
    float
    bfloat16
    float16

ctypedef fused out_t:
    bfloat16
    float16

ctypedef fused any_t:
    float
    bfloat16
    float16


cdef inline float _ld(const any_t* x, Py_ssize_t i) noexcept nogil:
    """Element ``i`` of ``x`` as a float32."""
    if any_t is bfloat16:
        return _bf16_to_f32(x[i].bits)
    elif any_t is float16:
        return _f16_to_f32(x[i].bits)
    else:
        return x[i]


cdef inline void _st(any_t* x, Py_ssize_t i, float v) noexcept nogil:
    """Write ``v`` to element ``i`` of ``x``, rounded to nearest even."""
    if any_t is bfloat16:
        x[i].bits = _f32_to_bf16(v)
    elif any_t is float16:
        x[i].bits = _f32_to_f16(v)
    else:
        x[i] = v


# --------------------------------------------------------------------------------------------
# The mixed-type driver: an update's float32 loop over tiles of other element types
# --------------------------------------------------------------------------------------------

# A fused loop over rows of the types ``types`` (and a half copy of type ``out_type`` >= 0 in
# row ``nrows``): returns 1 when the update has one for this combination and its arguments,
# 0 to run through the tiles.
ctypedef int (*fast_fn)(char** ptrs, Py_ssize_t n, const void* args, const int* types,
                        int nrows, int out_type) noexcept nogil


cdef struct MixedArgs:
    segment_fn inner       # the update's segment (its float32 loop)
    fast_fn fast           # its fused loops, or NULL
    const void* inner_args
    int nrows              # the rows the update sees: params, grads, state
    int types[MAX_BUFFERS]  # each row's storage (STORE_F32 for rows the update does not read)
    int out_type           # the half copy's storage, or -1; its row is ``nrows``
    bint stochastic
    uint32_t k1[MAX_BUFFERS + 1]  # the rows' random streams this step; [nrows]: the copy's
    uint32_t k2[MAX_BUFFERS + 1]
    Py_ssize_t tile        # elements per tile: TILE, or the quantisation block of 8-bit state
    int scale_rows[MAX_BUFFERS]  # per 8-bit state row, the table row of its block scales


cdef int _mixed_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                        Py_ssize_t first) noexcept nogil:
    # With 8-bit state a tile is one quantisation block, and the segment starts on a block
    # boundary (Plan._run cuts the threads' spans there): tile j's scales are scale[j].
    cdef const MixedArgs* a = <const MixedArgs*>args
    cdef float scratch[MAX_ROWS * MAX_QBLOCK]
    cdef char* rows[MAX_BUFFERS]
    cdef Py_ssize_t start = 0, m, r, tile = a.tile
    cdef int t
    if a.fast != NULL and not a.stochastic:
        if a.fast(ptrs, n, a.inner_args, a.types, a.nrows, a.out_type):
            return 0
    while start < n:
        m = n - start if n - start < tile else tile
        for r in range(a.nrows):
            t = a.types[r]
            if t == STORE_F32:
                rows[r] = ptrs[r] + start * 4
            elif t >= STORE_Q8S:
                _dequantize(<const uint8_t*>ptrs[r] + start,
                            (<const float*>ptrs[a.scale_rows[r]])[start // tile],
                            &scratch[r * tile], m, &_qmaps[t - STORE_Q8S])
                rows[r] = <char*>&scratch[r * tile]
            else:
                _widen(ptrs[r] + start * 2, t, &scratch[r * tile], m)
                rows[r] = <char*>&scratch[r * tile]
        a.inner(rows, m, a.inner_args, acc, first + start)
        # Row 1, the grads, is read only; every other row the update may have written.
        for r in range(a.nrows):
            t = a.types[r]
            if r == 1 or t == STORE_F32:
                continue
            if t >= STORE_Q8S:
                _quantize(<const float*>rows[r], <uint8_t*>ptrs[r] + start,
                          <float*>ptrs[a.scale_rows[r]] + start // tile, m,
                          &_qmaps[t - STORE_Q8S])
            else:
                _narrow(<const float*>rows[r], ptrs[r] + start * 2, t, m, a.stochastic,
                        <uint64_t>(first + start), a.k1[r], a.k2[r])
        if a.out_type >= 0:
            _narrow(<const float*>rows[0], ptrs[a.nrows] + start * 2, a.out_type, m,
                    a.stochastic, <uint64_t>(first + start), a.k1[a.nrows], a.k2[a.nrows])
        start += m
    return 0


# --------------------------------------------------------------------------------------------
# Python access to the conversions, for the tests and the reference's cross-check
# --------------------------------------------------------------------------------------------

def _convert(const float[::1] src, uint16_t[::1] dst, str storage, str rounding="nearest",
             uint64_t seed=0, uint64_t step=0, uint32_t stream=0, uint64_t first=0):
    """Round float32 ``src`` into the half ``dst`` as the kernels do (testing only)."""
    cdef uint32_t k1, k2
    cdef int code = STORAGE_CODES[storage]
    if code not in (STORE_BF16, STORE_F16) or rounding not in ROUNDING_MODES:
        raise ValueError("storage must be bfloat16 or float16, rounding nearest or stochastic")
    if src.shape[0] != dst.shape[0]:
        raise ValueError("src and dst must have the same length")
    _stream_keys(seed, step, stream, &k1, &k2)
    if src.shape[0]:
        _narrow(&src[0], <char*>&dst[0], code, src.shape[0], rounding == "stochastic", first,
                k1, k2)


def _widen_to(const uint16_t[::1] src, float[::1] dst, str storage):
    """Widen the half ``src`` into float32 ``dst`` as the kernels do (testing only)."""
    cdef int code = STORAGE_CODES[storage]
    if code not in (STORE_BF16, STORE_F16):
        raise ValueError("storage must be bfloat16 or float16")
    if src.shape[0] != dst.shape[0]:
        raise ValueError("src and dst must have the same length")
    if src.shape[0]:
        _widen(<const char*>&src[0], code, &dst[0], src.shape[0])
