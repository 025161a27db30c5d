# Row-wise sparse updates of embedding tables (see lrfast/embedding.py).
#
# A batch touches a table (rows x dim) through ``n`` lookups: ``indices[i]`` is the row of
# lookup ``i`` and ``grads[i, :]`` its gradient. A step is two native calls:
#
#   rowwise_group    sorts the lookups by row (a stable LSD radix sort, parallel, on as many
#                    bits as the table has rows): ``order`` lists the lookups row by row, in
#                    their original order within a row; ``starts[u]`` is where unique row
#                    ``u`` begins in ``order`` and ``rows[u]`` its row (ascending).
#                    ``slot[i]`` is the unique row of lookup ``i``, bit-inverted (``~u``) for
#                    the first lookup of its row.
#   rowwise_update   two phases, parallel over unique rows: (1) each thread reads the lookups
#                    in their order and adds the gradient rows of the unique rows it owns into
#                    a buffer ``acc`` (one row per unique row; a row looked up once is read
#                    where it lies instead), so the sums are in lookup order, the same for any
#                    thread count, and the gradient is read front to back, not row by row;
#                    (2) it updates each of its table rows and their state from the sums.
#                    ``rowwise_merge`` is phase (1) alone, into its output.
#
# Unique rows are cut over threads by their number of lookups, not their count: a Zipf batch
# puts thousands of lookups on its first rows.

cdef enum:
    ROW_SGD = 0
    ROW_ADAGRAD = 1            # torch's sparse Adagrad: an accumulator per element
    ROW_ROWWISE_ADAGRAD = 2    # one accumulator per row: the mean of the squared gradient
    ROW_ADAM = 3               # torch's SparseAdam: both moments per element, touched rows only
    ROW_ROWWISE_ADAM = 4       # first moment per element, second moment per row
    # The radix digit: at most this many bits per pass.
    RADIX_BITS = 11
    # Below this many lookups a step runs on one thread.
    ROW_MIN_LOOKUPS_PER_THREAD = 4096

_MIN_PER_THREAD["rowwise"] = ROW_MIN_LOOKUPS_PER_THREAD

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define LRFAST_PREFETCH(p) __builtin_prefetch((const void*)(p))
    #else
    #define LRFAST_PREFETCH(p) ((void)0)
    #endif
    """
    void LRFAST_PREFETCH(const void* p) noexcept nogil

# How far ahead phase (2) asks for the rows it will read: unique rows lie far apart in the
# table, where the hardware prefetcher cannot guess the next address.
cdef enum:
    ROW_AHEAD = 2


cdef inline void _prefetch_row(const void* p, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t b
    for b in range(0, nbytes, 64):
        LRFAST_PREFETCH(<const char*>p + b)


cdef inline int _row_threads(Py_ssize_t n, int nthreads) noexcept nogil:
    cdef Py_ssize_t per = ROW_MIN_LOOKUPS_PER_THREAD
    if _override_per_thread > 0:
        per = _override_per_thread
    cdef Py_ssize_t most = n // per
    if most < 1:
        return 1
    if most < nthreads:
        return <int>most
    return nthreads


cdef void _radix_pass(const uint64_t* kin, const int64_t* pin, uint64_t* kout, int64_t* pout,
                      Py_ssize_t n, int shift, Py_ssize_t* hist, int nt) noexcept nogil:
    """One stable counting pass on the digit at ``shift``: thread ``t`` counts, then scatters,
    its own contiguous chunk; the offsets are laid out digit by digit, thread by thread."""
    cdef Py_ssize_t radix = 1 << RADIX_BITS
    cdef uint64_t mask = radix - 1
    cdef int t
    cdef Py_ssize_t i, lo, hi, d, run
    cdef Py_ssize_t* h
    for t in prange(nt, nogil=True, schedule='static', chunksize=1, num_threads=nt):
        h = hist + t * radix
        for d in range(radix):
            h[d] = 0
        lo = (n * t) // nt
        hi = (n * (t + 1)) // nt
        for i in range(lo, hi):
            h[(kin[i] >> shift) & mask] += 1
    run = 0
    for d in range(radix):
        for t in range(nt):
            i = hist[t * radix + d]
            hist[t * radix + d] = run
            run = run + i
    for t in prange(nt, nogil=True, schedule='static', chunksize=1, num_threads=nt):
        h = hist + t * radix
        lo = (n * t) // nt
        hi = (n * (t + 1)) // nt
        for i in range(lo, hi):
            d = (kin[i] >> shift) & mask
            kout[h[d]] = kin[i]
            pout[h[d]] = pin[i]
            h[d] += 1


def rowwise_work_size(Py_ssize_t n, int nthreads):
    """int64 elements of the work array ``rowwise_group`` needs for ``n`` lookups."""
    return 7 * n + 2 + (<Py_ssize_t>_row_threads(n, nthreads) << RADIX_BITS)


def rowwise_group(const int64_t[::1] indices, Py_ssize_t num_rows, int nthreads,
                  int64_t[::1] work):
    """Group lookups by row: ``(order, starts, rows, slot)``, see the top of this file, as views of
    ``work`` (at least ``rowwise_work_size`` elements: the caller keeps it from step to step, so
    a step does not fault in fresh pages). ``indices`` lie in [0, num_rows) (checked by the
    caller)."""
    cdef Py_ssize_t n = indices.shape[0]
    cdef int nt = _row_threads(n, nthreads)
    cdef int bits = 0
    while bits < 63 and (<Py_ssize_t>1 << bits) < num_rows:
        bits += 1
    cdef int passes = (bits + RADIX_BITS - 1) // RADIX_BITS
    if work.shape[0] < 7 * n + 2 + (<Py_ssize_t>nt << RADIX_BITS):
        raise ValueError("the work array is too small")
    cdef int64_t* base = &work[0]
    cdef uint64_t* kin = <uint64_t*>base
    cdef uint64_t* kout = <uint64_t*>(base + n)
    cdef int64_t* pin = base + 2 * n
    cdef int64_t* pout = base + 3 * n
    cdef int64_t* st = base + 4 * n
    cdef int64_t* rw = base + 5 * n + 1
    cdef int64_t* sl = base + 6 * n + 2
    cdef Py_ssize_t* hist = <Py_ssize_t*>(base + 7 * n + 2)
    cdef Py_ssize_t i, u = 0
    cdef int p, shift = 0
    cdef uint64_t* kt
    cdef int64_t* pt
    with nogil:
        for i in range(n):
            kin[i] = <uint64_t>indices[i]
            pin[i] = i
        for p in range(passes):
            _radix_pass(kin, pin, kout, pout, n, shift, hist, nt)
            kt = kin; kin = kout; kout = kt
            pt = pin; pin = pout; pout = pt
            shift += RADIX_BITS
        st[0] = 0
        if n > 0:
            rw[0] = <int64_t>kin[0]
            sl[pin[0]] = ~(<int64_t>0)
            u = 1
        for i in range(1, n):
            if kin[i] != kin[i - 1]:
                st[u] = i
                rw[u] = <int64_t>kin[i]
                sl[pin[i]] = ~(<int64_t>u)
                u += 1
            else:
                sl[pin[i]] = u - 1
        st[u] = n
    arr = np.asarray(work)
    order_at = (2 if passes % 2 == 0 else 3) * n
    return (arr[order_at:order_at + n], arr[4 * n:4 * n + u + 1], arr[5 * n + 1:5 * n + 1 + u],
            arr[6 * n + 2:7 * n + 2])


cdef void _cut_rows(const int64_t* starts, Py_ssize_t nu, int nt, Py_ssize_t* cuts) noexcept nogil:
    """Cut unique rows [0, nu) into ``nt`` runs of about equal work: each lookup costs one row
    add, each unique row about two more (its update)."""
    cdef Py_ssize_t total = starts[nu] + 2 * nu
    cdef Py_ssize_t lo, hi, mid, target
    cdef int t
    cuts[0] = 0
    for t in range(1, nt):
        target = (total * t) // nt
        lo = cuts[t - 1]
        hi = nu
        while lo < hi:
            mid = (lo + hi) // 2
            if starts[mid] + 2 * mid < target:
                lo = mid + 1
            else:
                hi = mid
        cuts[t] = lo
    cuts[nt] = nu


cdef void _row_step(int kind, floating* w, const floating* g, floating* s0, floating* s1,
                    Py_ssize_t dim, const double* h) noexcept nogil:
    """Update one table row ``w`` from its gradient ``g`` (summed, signed, decayed). ``s0``,
    ``s1``: the row's state (``dim`` values, or one for per-row state). ``h``: the lr-like
    factor (already negated), weight decay, eps, 1 - beta1, 1 - beta2."""
    cdef floating f = <floating>h[0]
    cdef floating eps = <floating>h[2]
    cdef floating omb1 = <floating>h[3]
    cdef floating omb2 = <floating>h[4]
    cdef Py_ssize_t j
    cdef floating old, upd, vn, denom, mult
    cdef floating mean = 0
    cdef double sq = 0.0
    if kind == ROW_ROWWISE_ADAGRAD or kind == ROW_ROWWISE_ADAM:
        for j in range(dim):
            sq += <double>g[j] * <double>g[j]
        mean = <floating>(sq / dim)
    if kind == ROW_SGD:
        for j in range(dim):
            w[j] = w[j] + f * g[j]
    elif kind == ROW_ADAGRAD:
        for j in range(dim):
            vn = s0[j] + g[j] * g[j]
            s0[j] = vn
            if floating is float:
                denom = sqrtf(vn) + eps
            else:
                denom = sqrt(vn) + eps
            w[j] = w[j] + f * (g[j] / denom)
    elif kind == ROW_ROWWISE_ADAGRAD:
        vn = s0[0] + mean
        s0[0] = vn
        if floating is float:
            mult = f / (sqrtf(vn) + eps)
        else:
            mult = f / (sqrt(vn) + eps)
        for j in range(dim):
            w[j] = w[j] + mult * g[j]
    elif kind == ROW_ADAM:
        for j in range(dim):
            old = s0[j]
            upd = (g[j] - old) * omb1
            s0[j] = old + upd
            upd = upd + old
            old = s1[j]
            vn = (g[j] * g[j] - old) * omb2 + old
            s1[j] = vn
            if floating is float:
                denom = sqrtf(vn) + eps
            else:
                denom = sqrt(vn) + eps
            w[j] = w[j] + (upd / denom) * f
    else:  # ROW_ROWWISE_ADAM
        old = s1[0]
        vn = (mean - old) * omb2 + old
        s1[0] = vn
        if floating is float:
            denom = sqrtf(vn) + eps
        else:
            denom = sqrt(vn) + eps
        for j in range(dim):
            old = s0[j]
            upd = (g[j] - old) * omb1
            s0[j] = old + upd
            upd = upd + old
            w[j] = w[j] + (upd / denom) * f


cdef void _accumulate(const floating* grads, const int64_t* slot, const int64_t* starts,
                      Py_ssize_t n, Py_ssize_t dim, Py_ssize_t lo, Py_ssize_t hi,
                      floating* acc, bint all_rows) noexcept nogil:
    """Phase (1) for the unique rows [lo, hi): acc[u] = the sum of u's gradient rows, in
    lookup order. Rows looked up once are skipped (read where they lie in phase 2) unless
    ``all_rows``."""
    cdef Py_ssize_t i, j
    cdef int64_t u
    cdef const floating* src
    cdef floating* dst
    for i in range(n):
        u = slot[i]
        if u < 0:  # the row's first lookup
            u = ~u
            if u < lo or u >= hi:
                continue
            if not all_rows and starts[u + 1] - starts[u] == 1:
                continue
            src = grads + i * dim
            dst = acc + u * dim
            for j in range(dim):
                dst[j] = src[j]
        else:
            if u < lo or u >= hi:
                continue
            src = grads + i * dim
            dst = acc + u * dim
            for j in range(dim):
                dst[j] = dst[j] + src[j]


cdef void _rowwise_run(int kind, floating* table, const floating* grads, const int64_t* order,
                       const int64_t* starts, const int64_t* rows, const int64_t* slot,
                       Py_ssize_t n, Py_ssize_t nu, Py_ssize_t dim, floating* s0,
                       Py_ssize_t s0_stride, floating* s1, Py_ssize_t s1_stride, floating* acc,
                       bint merge_only, const double* h, bint maximize, int nt) noexcept nogil:
    """Phase (1) into ``acc`` (nu x dim); then, unless ``merge_only``, phase (2): each unique
    row's sum, signed and decayed, updates its table row and state (``kind``)."""
    cdef Py_ssize_t cuts[257]
    cdef int t
    cdef Py_ssize_t u, j
    cdef int64_t r
    cdef floating* g
    cdef bint decay = h[1] != 0.0
    cdef floating wd = <floating>h[1]
    cdef floating sign = -1 if maximize else 1
    _cut_rows(starts, nu, nt, cuts)
    for t in prange(nt, nogil=True, schedule='static', chunksize=1, num_threads=nt):
        _accumulate(grads, slot, starts, n, dim, cuts[t], cuts[t + 1], acc, merge_only)
        if merge_only:
            if maximize:
                for u in range(cuts[t] * dim, cuts[t + 1] * dim):
                    acc[u] = -acc[u]
            continue
        for u in range(cuts[t], cuts[t + 1]):
            if u + ROW_AHEAD < cuts[t + 1]:
                r = rows[u + ROW_AHEAD]
                _prefetch_row(table + r * dim, dim * sizeof(floating))
                if starts[u + ROW_AHEAD + 1] - starts[u + ROW_AHEAD] == 1:
                    _prefetch_row(grads + order[starts[u + ROW_AHEAD]] * dim,
                                  dim * sizeof(floating))
                if s0 != NULL:
                    _prefetch_row(s0 + r * s0_stride, s0_stride * sizeof(floating))
                if s1 != NULL:
                    _prefetch_row(s1 + r * s1_stride, s1_stride * sizeof(floating))
            r = rows[u]
            g = acc + u * dim
            if starts[u + 1] - starts[u] == 1:
                if not maximize and not decay:
                    # alone and unchanged: the lookup's own gradient row
                    _row_step(kind, table + r * dim, grads + order[starts[u]] * dim,
                              s0 + r * s0_stride, s1 + r * s1_stride, dim, h)
                    continue
                for j in range(dim):
                    g[j] = grads[order[starts[u]] * dim + j]
            if maximize:
                for j in range(dim):
                    g[j] = -g[j]
            if decay:
                for j in range(dim):
                    g[j] = g[j] + wd * table[r * dim + j]
            _row_step(kind, table + r * dim, g, s0 + r * s0_stride, s1 + r * s1_stride,
                      dim, h)


cdef inline int _rowwise_threads(Py_ssize_t lookups, int nthreads) noexcept nogil:
    """Threads for a step of ``lookups`` lookups (at most 256: the cut table's size)."""
    cdef int nt = _row_threads(lookups, nthreads)
    return nt if nt < 256 else 256


def rowwise_update(int kind, floating[:, ::1] table, const floating[:, ::1] grads,
                   const int64_t[::1] order, const int64_t[::1] starts,
                   const int64_t[::1] rows, const int64_t[::1] slot, floating[::1] acc, s0, s1,
                   const double[::1] h, bint maximize, int nthreads):
    """Update the rows ``rows`` of ``table`` (see the top of this file). ``acc``: a buffer of
    at least ``len(rows) * dim`` elements. ``s0``/``s1``: the state arrays (rows x dim or
    rows, the table's dtype), or None where the update has none. All shapes and values were
    checked by the caller."""
    cdef Py_ssize_t nu = rows.shape[0]
    cdef Py_ssize_t dim = table.shape[1]
    cdef int nt = _rowwise_threads(grads.shape[0], nthreads)
    if nu == 0 or dim == 0:
        return
    if acc.shape[0] < nu * dim:
        raise ValueError("the sum buffer is too small")
    cdef floating[::1] s0_flat, s1_flat
    cdef floating* p0 = NULL
    cdef floating* p1 = NULL
    cdef Py_ssize_t st0 = 0, st1 = 0
    if s0 is not None:
        s0_flat = s0.reshape(-1)
        p0 = &s0_flat[0]
        st0 = 1 if s0.ndim == 1 else dim
    if s1 is not None:
        s1_flat = s1.reshape(-1)
        p1 = &s1_flat[0]
        st1 = 1 if s1.ndim == 1 else dim
    with nogil:
        _rowwise_run(kind, &table[0, 0], &grads[0, 0], &order[0], &starts[0], &rows[0],
                     &slot[0], grads.shape[0], nu, dim, p0, st0, p1, st1, &acc[0], False,
                     &h[0], maximize, nt)


def rowwise_merge(const floating[:, ::1] grads, const int64_t[::1] order,
                  const int64_t[::1] starts, const int64_t[::1] slot, floating[:, ::1] out,
                  bint maximize, int nthreads):
    """out[u] = the sum of the gradient rows of unique row ``u`` (negated when maximizing)."""
    cdef Py_ssize_t nu = out.shape[0]
    cdef Py_ssize_t dim = out.shape[1]
    cdef int nt = _rowwise_threads(grads.shape[0], nthreads)
    cdef double h0[2]
    h0[0] = 0.0
    h0[1] = 0.0
    if nu == 0 or dim == 0:
        return
    with nogil:
        _rowwise_run(ROW_SGD, NULL, &grads[0, 0], &order[0], &starts[0], NULL, &slot[0],
                     grads.shape[0], nu, dim, NULL, 0, NULL, 0, &out[0, 0], True, h0,
                     maximize, nt)


def rowwise_all_finite(const floating[::1] grads, int nthreads):
    """Are all of ``grads`` finite? (skip_nonfinite's check, before anything is written)."""
    cdef Py_ssize_t n = grads.shape[0]
    cdef int nt = _row_threads(n // 64, nthreads)
    cdef int t, bad = 0
    cdef Py_ssize_t lo, hi
    if n == 0:
        return True
    for t in prange(nt, nogil=True, schedule='static', chunksize=1, num_threads=nt):
        lo = (n * t) // nt
        hi = (n * (t + 1)) // nt
        if not _finite_loop(&grads[lo], hi - lo, 1):
            bad += 1
    return bad == 0
