# Reductions and other passes that are not updates: the non-finite check (read-only, before a
# step writes anything), the deterministic global gradient norm, and in-place scaling.

# Per-thread work thresholds (see _partition.pxi). These passes read one buffer and write at
# most that one, so their counts are of the same order as the cheapest updates': the finite
# check and the norm use Adagrad's, scaling uses SGD's (the values they were measured against
# when they shared those constants; bench/thresholds.py can measure them on their own).
cdef enum:
    MIN_PER_THREAD_FINITE = 8192
    MIN_PER_THREAD_NORM = 8192
    MIN_PER_THREAD_SCALE = 32768

_MIN_PER_THREAD["finite"] = MIN_PER_THREAD_FINITE
_MIN_PER_THREAD["norm"] = MIN_PER_THREAD_NORM
_MIN_PER_THREAD["scale"] = MIN_PER_THREAD_SCALE


# --------------------------------------------------------------------------------------------
# Non-finite check: a read-only pass over the grads, before a step writes anything
# --------------------------------------------------------------------------------------------

cdef enum:
    STREAMS = 8

cdef struct FiniteArgs:
    int storage  # STORE_* of the grads
    double factor  # the factor the update multiplies the grads by (1/grad_scale)
    Py_ssize_t row  # which buffer of the table holds the grads


cdef inline int _finite_loop(const floating* g, Py_ssize_t n, floating factor) noexcept nogil:
    # For factor > 1 (grad_scale < 1) a finite grad may overflow once unscaled, so the product
    # is checked: |x| <= MAX is false for inf and NaN alike, and the AND keeps the loop
    # branch-free so that it vectorises.
    cdef floating big = DBL_MAX if floating is double else FLT_MAX
    cdef int ok = 1
    cdef Py_ssize_t i
    for i in range(n):
        ok = ok & (fabs(g[i] * factor) <= big)
    return ok


cdef inline int _finite_bits32(const uint32_t* g, Py_ssize_t n) noexcept nogil:
    # For factor <= 1 the product is finite exactly when the grad is. A float32 is NaN or
    # infinite exactly when its bits without the sign are >= those of inf, so the check is an
    # unsigned max over integers, which vectorises. The span is read as STREAMS interleaved
    # sub-ranges: one core fetches several streams faster than one.
    cdef uint32_t m[STREAMS]
    cdef uint32_t x, top = 0
    cdef Py_ssize_t i, q = n // STREAMS, j
    for j in range(STREAMS):
        m[j] = 0
    for i in range(q):
        for j in range(STREAMS):
            x = g[j * q + i] & 0x7fffffffu
            m[j] = x if x > m[j] else m[j]
    for i in range(STREAMS * q, n):
        x = g[i] & 0x7fffffffu
        top = x if x > top else top
    for j in range(STREAMS):
        top = m[j] if m[j] > top else top
    return top < 0x7f800000u


cdef inline int _finite_bits64(const int64_t* g, Py_ssize_t n) noexcept nogil:
    # The float64 form of _finite_bits32; the masked bits are >= 0, so a signed max serves.
    cdef int64_t m[STREAMS]
    cdef int64_t x, top = 0
    cdef Py_ssize_t i, q = n // STREAMS, j
    for j in range(STREAMS):
        m[j] = 0
    for i in range(q):
        for j in range(STREAMS):
            x = g[j * q + i] & 0x7fffffffffffffffLL
            m[j] = x if x > m[j] else m[j]
    for i in range(STREAMS * q, n):
        x = g[i] & 0x7fffffffffffffffLL
        top = x if x > top else top
    for j in range(STREAMS):
        top = m[j] if m[j] > top else top
    return top < 0x7ff0000000000000LL


cdef inline int _finite_bits16(const uint16_t* g, Py_ssize_t n, uint16_t inf) noexcept nogil:
    # The half form of _finite_bits32: ``inf`` is the type's infinity (bfloat16 0x7f80,
    # float16 0x7c00); a value is NaN or infinite when its bits without the sign reach it.
    cdef uint16_t x, top = 0
    cdef Py_ssize_t i
    for i in range(n):
        x = g[i] & 0x7fffu
        top = x if x > top else top
    return top < inf


cdef inline int _finite_half(const uint16_t* g, Py_ssize_t n, int storage,
                             float factor) noexcept nogil:
    # factor > 1: widen a tile at a time and check the unscaled products in float32.
    cdef float tile[TILE]
    cdef Py_ssize_t start = 0, m
    cdef int ok = 1
    while start < n:
        m = n - start if n - start < TILE else TILE
        _widen(<const char*>(g + start), storage, tile, m)
        ok = ok & _finite_loop(<const float*>tile, m, factor)
        start += m
    return ok


cdef int _finite_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                         Py_ssize_t first) noexcept nogil:
    """1 when a grad element of the segment (times the factor) is NaN or infinite, else 0."""
    cdef const FiniteArgs* a = <const FiniteArgs*>args
    cdef int t = a.storage
    if t == STORE_BF16 or t == STORE_F16:
        if a.factor <= 1.0:
            return 1 - _finite_bits16(<const uint16_t*>ptrs[a.row], n,
                                      0x7f80u if t == STORE_BF16 else 0x7c00u)
        return 1 - _finite_half(<const uint16_t*>ptrs[a.row], n, t, <float>a.factor)
    if a.factor <= 1.0:
        if t == STORE_F64:
            return 1 - _finite_bits64(<const int64_t*>ptrs[a.row], n)
        return 1 - _finite_bits32(<const uint32_t*>ptrs[a.row], n)
    if t == STORE_F64:
        return 1 - _finite_loop(<const double*>ptrs[a.row], n, <double>a.factor)
    return 1 - _finite_loop(<const float*>ptrs[a.row], n, <float>a.factor)


# --------------------------------------------------------------------------------------------
# Global gradient norm (deterministic) and in-place scaling, for clip_grad_norm_
# --------------------------------------------------------------------------------------------
#
# The concatenated grads are cut into fixed blocks of NORM_BLOCK elements, whatever the number
# of threads. Each block's partial (a sum of |x|^p in double, or a max of |x|) is computed in a
# fixed order; the partials are then combined serially in block order. The result is therefore
# bitwise the same for any number of threads.

cdef enum:
    NORM_BLOCK = 4096
    NORM_SUMSQ = 0
    NORM_SUMABS = 1
    NORM_MAX = 2
    NORM_POW = 3

cdef struct NormArgs:
    bint is64
    int kind
    double p


cdef inline double _nan_max(double m, double x) noexcept nogil:
    """max that keeps NaN: once NaN, always NaN."""
    if x > m or x != x:
        return x
    return m


cdef inline double _norm_loop(const floating* x, Py_ssize_t n, int kind, double p) noexcept nogil:
    # Eight running sums (the SLP vectoriser packs them into vectors); fixed lane order.
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, d
    cdef Py_ssize_t i, m = n - n % 8
    if kind == NORM_MAX:
        for i in range(n):
            s0 = _nan_max(s0, fabs(<double>x[i]))
        return s0
    if kind == NORM_POW:
        for i in range(n):
            s0 += pow(fabs(<double>x[i]), p)
        return s0
    if kind == NORM_SUMABS:
        for i in range(0, m, 8):
            s0 += fabs(<double>x[i])
            s1 += fabs(<double>x[i + 1])
            s2 += fabs(<double>x[i + 2])
            s3 += fabs(<double>x[i + 3])
            s4 += fabs(<double>x[i + 4])
            s5 += fabs(<double>x[i + 5])
            s6 += fabs(<double>x[i + 6])
            s7 += fabs(<double>x[i + 7])
        for i in range(m, n):
            s0 += fabs(<double>x[i])
    else:
        return _sumsq(x, n)
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


cdef int _norm_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                  Py_ssize_t first) noexcept nogil:
    cdef const NormArgs* a = <const NormArgs*>args
    cdef double part
    if a.is64:
        part = _norm_loop(<const double*>ptrs[0], n, a.kind, a.p)
    else:
        part = _norm_loop(<const float*>ptrs[0], n, a.kind, a.p)
    if a.kind == NORM_MAX:
        acc[0] = _nan_max(acc[0], part)
    else:
        acc[0] += part
    return 0


cdef struct ScaleArgs:
    bint is64
    double factor


cdef inline void _scale_loop(floating* x, Py_ssize_t n, floating c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] * c


cdef int _scale_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                  Py_ssize_t first) noexcept nogil:
    cdef const ScaleArgs* a = <const ScaleArgs*>args
    if a.is64:
        _scale_loop(<double*>ptrs[0], n, <double>a.factor)
    else:
        _scale_loop(<float*>ptrs[0], n, <float>a.factor)
    return 0


NORM_BLOCK_SIZE = NORM_BLOCK


def norm_kind(double norm_type):
    """(kind, p) for a norm order: 2 and 1 have fast paths, inf is a max, other p > 0 use pow."""
    if norm_type == 2.0:
        return NORM_SUMSQ
    if norm_type == 1.0:
        return NORM_SUMABS
    if norm_type == float("inf"):
        return NORM_MAX
    return NORM_POW


def grad_norm_reduce(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads,
                     double norm_type, double[::1] partials):
    """sum |x|^p over all tensors of ``table`` (row 0), or max |x| when p is inf.

    ``partials`` is scratch with at least ``ceil(total / NORM_BLOCK)`` entries. The result does
    not depend on ``nthreads`` (see the section comment).
    """
    cdef NormArgs a
    cdef Py_ssize_t ntensors = table.shape[1], total, nblocks, blk, end
    cdef int team
    cdef double out = 0
    if offsets.shape[0] != ntensors + 1:
        raise ValueError("offsets must have one entry more than the table has columns")
    if ntensors == 0:
        return 0.0
    total = offsets[ntensors]
    nblocks = (total + NORM_BLOCK - 1) // NORM_BLOCK
    if partials.shape[0] < nblocks:
        raise ValueError(f"partials needs {nblocks} entries")
    a.is64 = is64
    a.kind = norm_kind(norm_type)
    a.p = norm_type
    team = _team_size(total, nthreads, MIN_PER_THREAD_NORM)
    cdef const Py_ssize_t* sizes = _sizes(is64)
    with nogil:
        for blk in prange(nblocks, num_threads=team, schedule='static'):
            partials[blk] = 0
            end = (blk + 1) * NORM_BLOCK
            _run_span(_norm_segment, &table[0, 0], 1, &offsets[0], ntensors, sizes,
                      blk * NORM_BLOCK, end if end < total else total, &a, &partials[blk])
        for blk in range(nblocks):
            if a.kind == NORM_MAX:
                out = _nan_max(out, partials[blk])
            else:
                out += partials[blk]
    return out


def scale_(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads,
           double factor):
    """x *= factor (rounded to the tensors' dtype) over all tensors of ``table`` (row 0)."""
    cdef ScaleArgs a
    a.is64 = is64
    a.factor = factor
    _launch(_scale_segment, table, offsets, is64, nthreads, MIN_PER_THREAD_SCALE, &a)


