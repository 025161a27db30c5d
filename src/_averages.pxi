# Weight averages (EMA, SWA/Polyak): an average buffer per param moved toward the param.
#
#   lerp   a = lerp(a, p, w): a + w (p - a) for w < 0.5, else p - (p - a)(1 - w), with w and
#          1 - w in the math type (torch.lerp's two forms; no fused multiply-add, so torch's
#          _foreach_lerp_ is matched bitwise on its baseline kernels, and to rounding on its
#          AVX2/AVX-512 ones, which fuse it)
#   copy   a = p (before the averaging starts, and its first sample)
#   swap   a <-> p (evaluating with the average, and back)
#
# The average has its param's element type; half-precision ones compute in float32 and are
# rounded to nearest even. One routine per element range (``_average_elements``) serves the
# standalone multi-tensor calls (``average_update``, ``average_swap``: rows 0 the averages and
# 1 the params of an address table) and the update fused into an optimizer's step
# (``_fused_average_segment``), which runs the update a tile at a time and averages each tile
# while its params are still in cache: the step reads the params once.

cdef enum:
    AVG_NONE = 0
    AVG_LERP = 1
    AVG_COPY = 2
    AVG_SWAP = 3
    # Elements per tile of the fused update: a tile of every buffer of the update (Adam: 5 of
    # them, 320 KB in float32) stays in L2 until its average is taken. Measured with
    # `python -m lrfast bench --cases adam+ema` (Adam, 16M float32, 2 threads, EPYC with 512 KB
    # of L2 per core): ema= cost +30% over the step alone with 1024-element tiles (the update
    # called 16k times per step), +27..30% with 4096, +24..25% with 16384, +21..29% with 65536.
    FUSE_TILE = 16384
    # As cheap per element as plain SGD (12 bytes moved, no arithmetic to speak of): a second
    # thread pays only for large tensors, and on a loaded machine it waits for a busy core (the
    # 110-tensor model's 77k elements took 6-12 ms instead of 30 us on two threads while
    # another process ran).
    MIN_PER_THREAD_AVERAGE = 65536

_MIN_PER_THREAD["average"] = MIN_PER_THREAD_AVERAGE

AVERAGE_MODES = {"none": AVG_NONE, "lerp": AVG_LERP, "copy": AVG_COPY}


cdef struct AverageArgs:
    int mode  # AVG_LERP, AVG_COPY or AVG_SWAP
    int storage  # the element type of the averages and the params
    double weight  # lerp's weight


cdef inline void _lerp_typed(floating* a, const floating* p, Py_ssize_t n,
                             double weight) noexcept nogil:
    cdef floating w = <floating>weight
    cdef floating omw = 1 - w
    cdef Py_ssize_t i
    if w < 0.5:
        for i in range(n):
            a[i] = a[i] + w * (p[i] - a[i])
    else:
        for i in range(n):
            a[i] = p[i] - (p[i] - a[i]) * omw


cdef inline void _swap_bytes(char* a, char* b, Py_ssize_t nbytes) noexcept nogil:
    cdef char tmp[4096]
    cdef Py_ssize_t at = 0, m
    while at < nbytes:
        m = nbytes - at if nbytes - at < 4096 else 4096
        memcpy(tmp, a + at, m)
        memcpy(a + at, b + at, m)
        memcpy(b + at, tmp, m)
        at += m


cdef void _average_elements(char* a, char* p, Py_ssize_t n,
                            const AverageArgs* args) noexcept nogil:
    """Elements [0, n) of one average ``a`` and its param ``p`` (both of args.storage)."""
    cdef int t = args.storage
    cdef Py_ssize_t size = _ITEMSIZE[t], start = 0, m
    cdef float ta[TILE]
    cdef float tp[TILE]
    if args.mode == AVG_COPY:
        memcpy(a, p, n * size)
    elif args.mode == AVG_SWAP:
        _swap_bytes(a, p, n * size)
    elif t == STORE_F64:
        _lerp_typed(<double*>a, <const double*>p, n, args.weight)
    elif t == STORE_F32:
        _lerp_typed(<float*>a, <const float*>p, n, args.weight)
    else:
        while start < n:
            m = n - start if n - start < TILE else TILE
            _widen(a + start * 2, t, ta, m)
            _widen(p + start * 2, t, tp, m)
            _lerp_typed(ta, <const float*>tp, m, args.weight)
            _narrow(ta, a + start * 2, t, m, False, 0, 0, 0)
            start += m


cdef int _average_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                          Py_ssize_t first) noexcept nogil:
    _average_elements(ptrs[0], ptrs[1], n, <const AverageArgs*>args)
    return 0


cdef struct FusedAverageArgs:
    segment_fn inner  # the update's segment (or the mixed-type driver)
    const void* inner_args
    const intptr_t* averages  # per tensor, the address of its average
    const Py_ssize_t* offsets
    Py_ssize_t ntensors
    Py_ssize_t nbuf
    const Py_ssize_t* sizes  # per row of the update's table
    AverageArgs average


cdef int _fused_average_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                                Py_ssize_t first) noexcept nogil:
    """The update over [first, first + n) (within one tensor) a tile at a time, each tile's
    average taken right after its params were written."""
    cdef const FusedAverageArgs* f = <const FusedAverageArgs*>args
    cdef char* rows[MAX_BUFFERS]
    cdef Py_ssize_t k = _tensor_at(f.offsets, f.ntensors, first)
    cdef Py_ssize_t psize = f.sizes[0], start = 0, m, r
    cdef char* avg = <char*>f.averages[k] + (first - f.offsets[k]) * psize
    cdef int count = 0
    while start < n:
        m = n - start if n - start < FUSE_TILE else FUSE_TILE
        for r in range(f.nbuf):
            rows[r] = _at(<intptr_t>ptrs[r], start, f.sizes[r])
        count += f.inner(rows, m, f.inner_args, acc, first + start)
        _average_elements(avg + start * psize, rows[0], m, &f.average)
        start += m
    return count


cdef int _average_table(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, str storage,
                        int nthreads, AverageArgs* args) except -1:
    cdef Py_ssize_t ntensors = table.shape[1], size
    cdef Py_ssize_t sizes[2]
    if storage not in STORAGE_CODES:
        raise ValueError(f"unknown element type {storage!r}")
    if table.shape[0] != 2 or offsets.shape[0] != ntensors + 1:
        raise ValueError("table must be (2, tensors): averages, params; offsets one longer")
    args.storage = STORAGE_CODES[storage]
    size = _ITEMSIZE[args.storage]
    sizes[0] = sizes[1] = size
    if ntensors == 0:
        return 0
    with nogil:
        _run(_average_segment, &table[0, 0], 2, &offsets[0], ntensors, sizes, nthreads,
             MIN_PER_THREAD_AVERAGE, args, False)
    return 0


def average_update(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, str storage, str mode,
                   double weight, int nthreads):
    """Every average (row 0 of ``table``) toward its param (row 1), all of ``storage``:
    ``mode`` "lerp" (with ``weight``) or "copy". One parallel region over all tensors."""
    cdef AverageArgs args
    if mode not in ("lerp", "copy"):
        raise ValueError(f"mode must be 'lerp' or 'copy', got {mode!r}")
    args.mode = AVERAGE_MODES[mode]
    args.weight = weight
    _average_table(table, offsets, storage, nthreads, &args)


def average_swap(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, str storage, int nthreads):
    """Exchange every average (row 0) with its param (row 1), in place."""
    cdef AverageArgs args
    args.mode = AVG_SWAP
    args.weight = 0
    _average_table(table, offsets, storage, nthreads, &args)
