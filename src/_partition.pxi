# The address table and the split of its elements over threads (see _optim_kernels.pxi).

cdef enum:
    # Thread spans start on multiples of this many elements, so threads do not share cache lines
    # of a tensor that they split.
    SPAN_ALIGN = 64
    # Table rows: an update's rows (params, grads, state: at most MAX_ROWS), the half copy, and
    # a row of block scales per 8-bit state row.
    MAX_ROWS = 8
    MAX_BUFFERS = 12

# Below this many elements per thread a parallel region costs more than it saves; each operation
# has its own count (the updates' in _updates.pxi, the reductions' in _reductions.pxi).
# 0: each operation's own count; > 0: one count for all (for measurements).
cdef Py_ssize_t _override_per_thread = 0

# {operation: its count}, filled as each operation is defined.
_MIN_PER_THREAD = {}


def get_min_elements_per_thread():
    """{operation: elements per thread below which it runs on fewer threads}."""
    if _override_per_thread > 0:
        return {k: _override_per_thread for k in _MIN_PER_THREAD}
    return dict(_MIN_PER_THREAD)


def set_min_elements_per_thread(overrides):
    """Use one threshold for every operation (an int >= 1), or the defaults again (None).

    For measurements only: results do not depend on the number of threads.
    """
    global _override_per_thread
    if overrides is None:
        _override_per_thread = 0
        return
    if isinstance(overrides, dict):
        raise TypeError("pass one int for all operations, or None")
    if overrides < 1:
        raise ValueError("the threshold must be at least 1 element")
    _override_per_thread = overrides

# A segment function updates ``n`` elements of every buffer from the pointers ``ptrs``; element
# 0 is element ``first`` of the concatenated tensors (only stochastic rounding needs to know).
# It may fold a value into ``acc[0]`` (reductions) and returns a count that the drivers add up
# (the non-finite check); the optimizer updates return 0 and leave ``acc`` alone.
ctypedef int (*segment_fn)(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                           Py_ssize_t first) noexcept nogil

# Per-row element sizes for tables whose rows all hold one type.
cdef Py_ssize_t[MAX_BUFFERS] _SIZES4 = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
cdef Py_ssize_t[MAX_BUFFERS] _SIZES8 = [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]


cdef inline char* _at(intptr_t base, Py_ssize_t elem, Py_ssize_t size) noexcept nogil:
    """The address of element ``elem`` of a row of ``size``-byte elements; ``size`` < 0 marks a
    row of float32 block scales, one per ``-size`` elements (``elem`` is then a block start)."""
    if size >= 0:
        return <char*>base + elem * size
    return <char*>base + (elem // -size) * 4


cdef inline const Py_ssize_t* _sizes(bint is64) noexcept nogil:
    if is64:
        return _SIZES8
    return _SIZES4

# --------------------------------------------------------------------------------------------
# Work partition
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _split(Py_ssize_t total, int part, int nparts) noexcept nogil:
    """Start of span ``part`` of ``nparts`` over [0, total), aligned to SPAN_ALIGN."""
    if part >= nparts:
        return total
    cdef Py_ssize_t at = <Py_ssize_t>((<double>total * part) / nparts)
    return at - at % SPAN_ALIGN


cdef int _run_span(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                   const Py_ssize_t* offsets, Py_ssize_t ntensors, const Py_ssize_t* itemsize,
                   Py_ssize_t begin, Py_ssize_t end, const void* args,
                   double* acc) noexcept nogil:
    """Apply ``fn`` to the elements [begin, end) of the concatenated tensors, tensor by
    tensor in index order; return the sum of its counts."""
    cdef char* ptrs[MAX_BUFFERS]
    cdef Py_ssize_t lo_k = 0, hi_k = ntensors, mid, k, a, b, j
    cdef int count = 0
    if begin >= end:
        return 0
    # The last tensor that starts at or before ``begin``.
    while hi_k - lo_k > 1:
        mid = (lo_k + hi_k) // 2
        if offsets[mid] <= begin:
            lo_k = mid
        else:
            hi_k = mid
    k = lo_k
    while k < ntensors and offsets[k] < end:
        a = begin if begin > offsets[k] else offsets[k]
        b = end if end < offsets[k + 1] else offsets[k + 1]
        if b > a:
            for j in range(nbuf):
                ptrs[j] = _at(table[j * ntensors + k], a - offsets[k], itemsize[j])
            count += fn(ptrs, b - a, args, acc, a)
        k += 1
    return count


cdef int _run_span_env(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                       const Py_ssize_t* offsets, Py_ssize_t ntensors,
                       const Py_ssize_t* itemsize, Py_ssize_t begin, Py_ssize_t end, const void* args,
                       bint ftz) noexcept nogil:
    """``_run_span`` with flush-to-zero on in this thread for its duration when ``ftz``."""
    cdef double unused = 0
    cdef unsigned long long saved
    cdef int count
    if not ftz:
        return _run_span(fn, table, nbuf, offsets, ntensors, itemsize, begin, end, args, &unused)
    saved = lrfast_ftz_enter()
    # ``fn`` is called through a pointer, so no floating-point work moves across these calls.
    count = _run_span(fn, table, nbuf, offsets, ntensors, itemsize, begin, end, args, &unused)
    lrfast_ftz_leave(saved)
    return count


cdef int _team_size(Py_ssize_t total, int nthreads, Py_ssize_t min_per_thread) noexcept nogil:
    """Threads worth starting for ``total`` elements: serial below the work threshold."""
    cdef Py_ssize_t useful
    if _override_per_thread > 0:
        min_per_thread = _override_per_thread
    useful = total // min_per_thread
    if useful < 1:
        useful = 1
    if nthreads < 1:
        nthreads = omp_get_max_threads()
    return <int>(useful if useful < nthreads else nthreads)


cdef inline Py_ssize_t _tensor_at(const Py_ssize_t* offsets, Py_ssize_t ntensors,
                                  Py_ssize_t at) noexcept nogil:
    """The last tensor starting at or before ``at`` (0 <= at < total): the one holding it."""
    cdef Py_ssize_t lo = 0, hi = ntensors, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if offsets[mid] <= at:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline Py_ssize_t _cut_at(const Py_ssize_t* offsets, Py_ssize_t ntensors, Py_ssize_t at,
                               Py_ssize_t block) noexcept nogil:
    """The first boundary of a ``block``-element block (counted from its tensor's start) at or
    after element ``at``."""
    cdef Py_ssize_t total = offsets[ntensors], k, r
    if at <= 0:
        return 0
    if at >= total:
        return total
    k = _tensor_at(offsets, ntensors, at)
    r = (at - offsets[k] + block - 1) // block * block
    return offsets[k] + r if offsets[k] + r < offsets[k + 1] else offsets[k + 1]


cdef int _run(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf, const Py_ssize_t* offsets,
              Py_ssize_t ntensors, const Py_ssize_t* itemsize, int nthreads,
              Py_ssize_t min_per_thread,
              const void* args, bint ftz) noexcept nogil:
    """Run ``fn`` over all elements, one contiguous span per thread; return the summed counts."""
    return _run_cut(fn, table, nbuf, offsets, ntensors, itemsize, nthreads, min_per_thread, args,
                    ftz, 0)


cdef int _run_cut(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                  const Py_ssize_t* offsets, Py_ssize_t ntensors, const Py_ssize_t* itemsize,
                  int nthreads, Py_ssize_t min_per_thread, const void* args, bint ftz,
                  Py_ssize_t block) noexcept nogil:
    """``_run``, with each thread's span starting on a ``block`` boundary when ``block`` > 0
    (8-bit state: a block is never shared between threads)."""
    cdef Py_ssize_t total = offsets[ntensors], begin, end
    cdef int team = _team_size(total, nthreads, min_per_thread), tid
    cdef int count = 0
    if team == 1:
        return _run_span_env(fn, table, nbuf, offsets, ntensors, itemsize, 0, total, args, ftz)
    for tid in prange(team, num_threads=team, schedule='static'):
        begin = _split(total, tid, team)
        end = _split(total, tid + 1, team)
        if block > 0:
            begin = _cut_at(offsets, ntensors, begin, block)
            end = _cut_at(offsets, ntensors, end, block)
        count += _run_span_env(fn, table, nbuf, offsets, ntensors, itemsize, begin, end, args,
                               ftz)
    return count


cdef int _launch(segment_fn fn, intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64,
                 int nthreads, Py_ssize_t min_per_thread, const void* args) except -1:
    cdef Py_ssize_t ntensors = table.shape[1]
    if table.shape[0] > MAX_BUFFERS:
        raise ValueError("too many buffers per tensor")
    if offsets.shape[0] != ntensors + 1:
        raise ValueError("offsets must have one entry more than the table has columns")
    if ntensors == 0:
        return 0
    with nogil:
        _run(fn, &table[0, 0], table.shape[0], &offsets[0], ntensors,
             _sizes(is64), nthreads, min_per_thread, args, False)
    return 0




# --------------------------------------------------------------------------------------------
# Block driver: passes that fold per-tensor values (trust ratios, the cautious mask's mean)
# --------------------------------------------------------------------------------------------
#
# Each tensor is cut into blocks of PASS_BLOCK elements from its own start; block ``j`` of
# tensor ``k`` has the index ``blockbase[k] + j``, and ``nslots`` doubles of ``slots`` from
# ``(blockbase[k] + j) * nslots`` on. A pass calls its segment once per block, whole, with
# ``acc`` pointing at the block's slots: a reduction adds its partial sums there, and an update
# reads there the per-tensor factors a "between passes" function wrote into every block of the
# tensor. The threads' spans are the usual element split moved forward to the next block
# boundary, so a block is never shared between threads and each partial is computed in the
# same order for any number of threads; combined in block order, the per-tensor sums are then
# bitwise the same for any number of threads. As for the other passes, there is one parallel
# region over all tensors of the table.

cdef enum:
    PASS_BLOCK = 4096


cdef inline Py_ssize_t _block_cut(const Py_ssize_t* offsets, Py_ssize_t ntensors,
                                  Py_ssize_t at) noexcept nogil:
    """The first block boundary at or after element ``at``."""
    return _cut_at(offsets, ntensors, at, PASS_BLOCK)


cdef inline Py_ssize_t _num_blocks(Py_ssize_t n) noexcept nogil:
    return (n + PASS_BLOCK - 1) // PASS_BLOCK


cdef void _run_blocks_span(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                           const Py_ssize_t* offsets, Py_ssize_t ntensors,
                           const Py_ssize_t* itemsize, const Py_ssize_t* blockbase,
                           double* slots, Py_ssize_t nslots, Py_ssize_t begin, Py_ssize_t end,
                           const void* args, bint ftz) noexcept nogil:
    """Apply ``fn`` block by block to the elements [begin, end) (both block boundaries)."""
    cdef char* ptrs[MAX_BUFFERS]
    cdef Py_ssize_t k, a, b, c, blk, j
    cdef unsigned long long saved = 0
    if begin >= end:
        return
    if ftz:
        saved = lrfast_ftz_enter()
    k = _tensor_at(offsets, ntensors, begin)
    while k < ntensors and offsets[k] < end:
        a = begin if begin > offsets[k] else offsets[k]
        b = end if end < offsets[k + 1] else offsets[k + 1]
        while a < b:
            blk = (a - offsets[k]) // PASS_BLOCK
            c = offsets[k] + (blk + 1) * PASS_BLOCK
            if c > b:
                c = b
            for j in range(nbuf):
                ptrs[j] = _at(table[j * ntensors + k], a - offsets[k], itemsize[j])
            fn(ptrs, c - a, args, slots + (blockbase[k] + blk) * nslots, a)
            a = c
        k += 1
    if ftz:
        lrfast_ftz_leave(saved)


cdef void _run_blocks(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                      const Py_ssize_t* offsets, Py_ssize_t ntensors, const Py_ssize_t* itemsize,
                      const Py_ssize_t* blockbase, double* slots, Py_ssize_t nslots,
                      int nthreads, Py_ssize_t min_per_thread, const void* args,
                      bint ftz) noexcept nogil:
    """One pass of ``fn`` over all elements by blocks, one span of whole blocks per thread."""
    cdef Py_ssize_t total = offsets[ntensors]
    cdef int team = _team_size(total, nthreads, min_per_thread), tid
    if team == 1:
        _run_blocks_span(fn, table, nbuf, offsets, ntensors, itemsize, blockbase, slots, nslots,
                         0, total, args, ftz)
        return
    for tid in prange(team, num_threads=team, schedule='static'):
        _run_blocks_span(fn, table, nbuf, offsets, ntensors, itemsize, blockbase, slots, nslots,
                         _block_cut(offsets, ntensors, _split(total, tid, team)),
                         _block_cut(offsets, ntensors, _split(total, tid + 1, team)), args, ftz)
