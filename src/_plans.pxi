# Per-step gradient checks (GIL held, before any kernel runs) and the Plan that runs an update.

from libc.string cimport memset


# --------------------------------------------------------------------------------------------
# Gradient checks
# --------------------------------------------------------------------------------------------

# Codes returned by Plan.gather and Plan.step; lrfast._validation turns them into messages.
GATHER_OK = 0
GATHER_NOT_ARRAY = 1
GATHER_DTYPE = 2
GATHER_SHAPE = 3
GATHER_NOT_CONTIGUOUS = 4
GATHER_OVERLAP = 5
GATHER_MISALIGNED = 6
# Not a check's code: Plan.step's verdict when it skipped the step because a grad is not finite.
STEP_SKIPPED_NONFINITE = 7


cdef bint _overlaps(intptr_t start, intptr_t end, const intptr_t* wstart, const intptr_t* wend,
                    Py_ssize_t nw) noexcept nogil:
    """Does [start, end) meet one of the sorted, disjoint ranges [wstart[i], wend[i])?"""
    cdef Py_ssize_t lo = 0, hi = nw, mid
    if end <= start or nw == 0:
        return False
    # First written range that starts at or after ``end``; only the one before it can overlap.
    while lo < hi:
        mid = (lo + hi) // 2
        if wstart[mid] < end:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and wend[lo - 1] > start


cdef int _gather(object grads, int typenum, const Py_ssize_t* ndims, const Py_ssize_t* dims,
                 intptr_t* out, Py_ssize_t n, const intptr_t* ws, const intptr_t* we,
                 Py_ssize_t nw, Py_ssize_t* bad) except -1:
    """Check each of the ``n`` grads and write its data address into ``out``.

    ``grads`` is a list or tuple. Tensor ``k`` must be a NumPy array of type ``typenum``, with
    ``ndims[k]`` dimensions equal to the next entries of ``dims``, C-contiguous, aligned, and
    must not overlap any of the ``nw`` sorted, disjoint written ranges ``[ws[i], we[i])``.
    Returns GATHER_OK, or the code of the first bad grad with its index in ``bad``; ``out``
    may then be partly written but nothing else is.
    """
    cdef Py_ssize_t k, d, pos = 0, nd
    cdef cnp.ndarray arr
    cdef object item
    cdef cnp.npy_intp* shape
    cdef intptr_t start
    for k in range(n):
        bad[0] = k
        item = grads[k]
        if not isinstance(item, cnp.ndarray):
            return GATHER_NOT_ARRAY
        arr = <cnp.ndarray>item
        # The type number ignores byte order: a byte-swapped array would be misread.
        if cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_ISNOTSWAPPED(arr):
            return GATHER_DTYPE
        nd = ndims[k]
        if cnp.PyArray_NDIM(arr) != nd:
            return GATHER_SHAPE
        shape = cnp.PyArray_DIMS(arr)
        for d in range(nd):
            if shape[d] != dims[pos + d]:
                return GATHER_SHAPE
        pos += nd
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            return GATHER_NOT_CONTIGUOUS
        if not cnp.PyArray_ISALIGNED(arr):
            return GATHER_MISALIGNED
        start = <intptr_t>cnp.PyArray_DATA(arr)
        if _overlaps(start, start + cnp.PyArray_NBYTES(arr), ws, we, nw):
            return GATHER_OVERLAP
        out[k] = start
    bad[0] = -1
    return GATHER_OK


def collect_arrays(object arrays, intptr_t[::1] addrs, Py_ssize_t[::1] sizes,
                   int[::1] typenums, bint writeable):
    """Record each array's data address, size and type number, checking on the way that it is
    a C-contiguous, aligned (and, if asked, writeable) float32/float64 ndarray.

    Returns -1, or the index of the first array that is not (the caller builds the message).
    """
    cdef Py_ssize_t n = len(arrays), k
    cdef cnp.ndarray arr
    cdef object item
    cdef int t
    if addrs.shape[0] < n or sizes.shape[0] < n or typenums.shape[0] < n:
        raise ValueError("output arrays are too short")
    for k in range(n):
        item = arrays[k]
        if not isinstance(item, cnp.ndarray):
            return k
        arr = <cnp.ndarray>item
        t = cnp.PyArray_TYPE(arr)
        if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or not cnp.PyArray_ISNOTSWAPPED(arr):
            return k
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
            return k
        if writeable and not cnp.PyArray_ISWRITEABLE(arr):
            return k
        addrs[k] = <intptr_t>cnp.PyArray_DATA(arr)
        sizes[k] = cnp.PyArray_SIZE(arr)
        typenums[k] = t
    return -1


# --------------------------------------------------------------------------------------------
# Plans: an update's per-step work in one call
# --------------------------------------------------------------------------------------------

cdef intptr_t _no_range = 0


cdef int _no_update(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                    Py_ssize_t first) noexcept nogil:
    return 0


cdef struct GradSqArgs:
    int storage  # the grads' STORE_* code
    double inv_scale  # the grads' factor, applied to each before it is squared


cdef int _gradsq_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                         Py_ssize_t first) noexcept nogil:
    """acc[0] += sum (f g)^2 over the segment (row 1; f g rounded to the update's math type,
    as its loop computes it; half grads widened a tile at a time). Scaling before squaring
    keeps the sum finite for grads whose squares overflow until unscaled."""
    cdef const GradSqArgs* a = <const GradSqArgs*>args
    cdef int t = a.storage
    cdef float tile[TILE]
    cdef Py_ssize_t start = 0, m
    if t == STORE_F64:
        acc[0] += _sumsq_scaled(<const double*>ptrs[1], n, <double>a.inv_scale)
    elif t == STORE_F32:
        acc[0] += _sumsq_scaled(<const float*>ptrs[1], n, <float>a.inv_scale)
    else:
        while start < n:
            m = n - start if n - start < TILE else TILE
            _widen(ptrs[1] + start * 2, t, tile, m)
            acc[0] += _sumsq_scaled(<const float*>tile, m, <float>a.inv_scale)
            start += m
    return 0


cdef const Py_ssize_t* _intp_data(object a) except? NULL:
    cdef cnp.ndarray arr = <cnp.ndarray?>a
    if arr.dtype != np.intp or not arr.flags.c_contiguous or arr.ndim != 1:
        raise ValueError("plan arrays must be 1-D C-contiguous np.intp arrays")
    return <const Py_ssize_t*>cnp.PyArray_DATA(arr) if arr.shape[0] else NULL


cdef class Plan:
    """One group of tensors' share of a step, held as C values: the address table, what each
    grad must look like, the memory the step writes, the element type of each buffer, and the
    update with its hyper-parameters. A step is then one call: check the grads, record their
    addresses, run the update.

    ``update`` names an entry of UPDATE_IDS. ``table`` is (buffers, tensors): row 0 the params,
    row 1 the grads, then the update's state rows, and, when ``out`` is given, a last row for
    the half copy of the updated params; ``offsets`` are the prefix sums of the tensor sizes
    (in elements).

    Element types (keys of STORAGE_CODES): ``storage`` is the params'; ``rows``, when given,
    names one per row of the update (params, grads, state; None for a row the update does not
    read), else every row is ``storage``. A float64 plan is float64 throughout; otherwise each
    row is float32, bfloat16 or float16 and the update computes in float32. ``out`` (bfloat16
    or float16, float32 params only) asks for the half copy, written in the same pass.

    The grads reach the table in one of two ways. With ``typenum`` >= 0 (the NumPy layers),
    ``gather`` and ``step`` check each grad (a NumPy array of that type number, the shape given
    by ``ndims``/``dims``, C-contiguous, aligned, outside the sorted written ranges
    ``wstart``/``wend``) and record its address. With ``typenum`` -1 (lrfast.torch, where torch
    has checked the tensors) the caller writes the addresses into row 1 itself and calls ``run``.
    """

    cdef object _keep
    cdef intptr_t* table
    cdef const Py_ssize_t* offsets
    cdef const Py_ssize_t* ndims
    cdef const Py_ssize_t* dims
    cdef const intptr_t* ws
    cdef const intptr_t* we
    cdef Py_ssize_t ntensors, nbuf, nw
    cdef Py_ssize_t sizes[MAX_BUFFERS]
    cdef int types[MAX_BUFFERS]
    cdef int typenum, update, math, nrows, out_type
    # 8-bit state: the block size (0: none), and per state row the table row of its scales.
    cdef Py_ssize_t qblock
    cdef int scale_rows[MAX_BUFFERS]
    cdef unsigned long long seed
    cdef double hyper[MAX_HYPER]
    cdef bint ready, check, ftz, mixed, stochastic
    # Multi-pass updates (_PASSES): each tensor's first block, and the blocks' slots.
    cdef const Py_ssize_t* blockbase
    cdef double* slots
    cdef Py_ssize_t nblocks
    # A weight average fused into the step (set_averages): each tensor's average, and what
    # the next run does to it (set_average_step).
    cdef object _averages
    cdef const intptr_t* averages
    cdef int avg_mode
    cdef double avg_weight

    def __init__(self, str update, cnp.ndarray table, cnp.ndarray offsets, str storage,
                 int typenum=-1, ndims=None, dims=None, wstart=None, wend=None, rows=None,
                 out=None, Py_ssize_t qblock=0):
        cdef Py_ssize_t r, nq = 0, q
        if update not in UPDATE_IDS:
            raise ValueError(f"unknown update {update!r}; known: {sorted(UPDATE_IDS)}")
        if table.dtype != np.intp or not table.flags.c_contiguous or table.ndim != 2:
            raise ValueError("table must be a 2-D C-contiguous np.intp array")
        if table.shape[1] < 1 or table.shape[0] < 2 or table.shape[0] > MAX_BUFFERS:
            raise ValueError("table must be (buffers, tensors) with at least one tensor")
        self.offsets = _intp_data(offsets)
        if offsets.shape[0] != table.shape[1] + 1:
            raise ValueError("offsets must have one entry more than the table has columns")
        self.nbuf = table.shape[0]
        if rows is not None:
            nq = sum(1 for name in rows if name in QUANT_CODES)
        self.nrows = self.nbuf - (out is not None) - nq
        if self.nrows < 2 or self.nrows > MAX_ROWS:
            raise ValueError(f"the table has {self.nbuf} rows; with {nq} rows of 8-bit scales"
                             f"{' and the half copy' if out is not None else ''} that leaves "
                             f"{self.nrows} for the update (2 to {MAX_ROWS})")
        types = _row_types(storage, self.nrows, rows, out)
        self.update = UPDATE_IDS[update]
        self.qblock = 0
        if nq:
            if qblock < 32 or qblock > MAX_QBLOCK or qblock & (qblock - 1):
                raise ValueError(f"the 8-bit state's block size must be a power of two from 32 "
                                 f"to {MAX_QBLOCK}, got {qblock}")
            if _PASSES[self.update].npasses:
                raise ValueError(f"8-bit state is not available for the {update!r} update: it "
                                 "runs in several passes over the state")
            if not _qmaps_installed:
                raise RuntimeError("the quantisation maps are not installed")
            self.qblock = qblock
        self.math = STORE_F64 if types[0] == STORE_F64 else STORE_F32
        self.mixed = nq > 0
        q = self.nbuf - nq  # the next row of scales to hand out
        for r in range(self.nbuf):
            self.scale_rows[r] = -1
            if r >= self.nbuf - nq:
                # A row of block scales: float32, one per qblock elements.
                self.types[r] = STORE_F32
                self.sizes[r] = -qblock
                continue
            # A row the update does not read counts as the math type: nothing to convert.
            self.types[r] = self.math if types[r] < 0 else types[r]
            self.sizes[r] = _ITEMSIZE[self.types[r]]
            self.mixed = self.mixed or self.types[r] != self.math
            if self.types[r] >= STORE_Q8S:
                self.scale_rows[r] = q
                q += 1
        self.out_type = types[self.nrows] if out is not None else -1
        self.table = <intptr_t*>cnp.PyArray_DATA(table)
        self.ntensors = table.shape[1]
        self.typenum = typenum
        self.ndims = self.dims = NULL
        self.ws = self.we = &_no_range
        self.nw = 0
        if typenum >= 0:
            if ndims is None or dims is None or wstart is None or wend is None:
                raise ValueError("a plan that checks grads needs ndims, dims, wstart and wend")
            self.ndims = _intp_data(ndims)
            self.dims = _intp_data(dims)
            if ndims.shape[0] != self.ntensors or dims.shape[0] != ndims.sum():
                raise ValueError("ndims and dims must describe every tensor's shape")
            if wstart.shape[0] != wend.shape[0]:
                raise ValueError("wstart and wend must have the same length")
            self.nw = wstart.shape[0]
            if self.nw:
                self.ws = <const intptr_t*>_intp_data(wstart)
                self.we = <const intptr_t*>_intp_data(wend)
        self.blockbase = NULL
        self.slots = NULL
        self.nblocks = 0
        blocks = None
        if _PASSES[self.update].npasses:
            sizes = np.diff(offsets)
            base = np.zeros(self.ntensors + 1, dtype=np.intp)
            np.cumsum((sizes + PASS_BLOCK - 1) // PASS_BLOCK, out=base[1:])
            self.nblocks = base[self.ntensors]
            slots = np.zeros(max(self.nblocks, 1) * _PASSES[self.update].nslots, dtype=np.float64)
            self.blockbase = <const Py_ssize_t*>cnp.PyArray_DATA(base)
            self.slots = <double*>cnp.PyArray_DATA(slots)
            blocks = (base, slots)
        self._keep = (table, offsets, ndims, dims, wstart, wend, blocks)
        self.ready = False
        self.check = self.ftz = self.stochastic = False
        self.seed = 0
        self._averages = None
        self.averages = NULL
        self.avg_mode = AVG_NONE
        self.avg_weight = 0

    def set_hyper(self, values):
        """Store the update's hyper-parameters (validated by the caller), in the order of
        ``UPDATE_ARGS[update]``; booleans as 0 or 1."""
        cdef Py_ssize_t j, n = _UPDATES[self.update].nhyper
        if len(values) != n:
            raise ValueError(f"this update takes {n} hyper-parameters, got {len(values)}")
        for j in range(n):
            self.hyper[j] = values[j]
        self.ready = True

    def set_options(self, bint skip_nonfinite, bint flush_subnormals, str rounding="nearest",
                    seed=0):
        """``skip_nonfinite``: ``step`` checks the grads first and updates nothing when one is
        NaN or infinite. ``flush_subnormals``: the update runs with flush-to-zero on.
        ``rounding`` ("nearest" or "stochastic") and ``seed`` (0 <= seed < 2**64): how values
        are rounded into half-precision buffers (no effect on float32/float64 ones)."""
        if flush_subnormals and not LRFAST_HAVE_FTZ:
            raise ValueError("flush_subnormals is not supported on this CPU architecture")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
        self.check = skip_nonfinite
        self.ftz = flush_subnormals
        self.stochastic = rounding == "stochastic"
        self.seed = seed

    def set_averages(self, addresses):
        """Fuse a weight average into the step: ``addresses`` (np.intp, one per tensor) are
        the averages' data, each of its param's size and element type (the caller checks);
        None detaches it. What a run does to them is set by ``set_average_step``."""
        if addresses is None:
            self._averages = None
            self.averages = NULL
            self.avg_mode = AVG_NONE
            return
        if (addresses.dtype != np.intp or not addresses.flags.c_contiguous
                or addresses.shape != (self.ntensors,)):
            raise ValueError("addresses must be a C-contiguous np.intp array, one per tensor")
        self._averages = addresses
        self.averages = <const intptr_t*>cnp.PyArray_DATA(addresses)

    def set_average_step(self, str mode, double weight=0.0):
        """What the next runs do to the averages after the update: "none", "copy" (the
        params into them) or "lerp" (toward the params by ``weight``)."""
        if mode not in AVERAGE_MODES:
            raise ValueError(f"mode must be one of {tuple(AVERAGE_MODES)}, got {mode!r}")
        if mode != "none" and self.averages == NULL:
            raise RuntimeError("set_averages() must be called first")
        self.avg_mode = AVERAGE_MODES[mode]
        self.avg_weight = weight

    @property
    def storages(self):
        """The element type of each table row (including the half copy's, and "scales" for
        the rows of 8-bit state's block scales)."""
        names = {code: name for name, code in {**STORAGE_CODES, **QUANT_CODES}.items()}
        return tuple("scales" if self.sizes[r] < 0 else names[self.types[r]]
                     for r in range(self.nbuf))

    @property
    def quant_block(self):
        """The 8-bit state's block size (0: the plan has no 8-bit state)."""
        return self.qblock

    def gather(self, grads):
        """Check the grads and record their addresses: None, or (code, index) of the first bad."""
        cdef Py_ssize_t bad
        cdef int code = self._gather(grads, &bad)
        return (code, bad) if code else None

    def all_finite(self, double inv_scale, int nthreads):
        """Are all recorded grads, times ``inv_scale``, finite?"""
        return self._all_finite(inv_scale, nthreads)

    def run(self, double lr, long long step, int nthreads, double inv_scale=1.0,
            scalars=(), grad_sumsq=None):
        """Run the update with the recorded grads (``step`` is 1-based), unconditionally.
        ``scalars``: the update's per-step values, in the order of ``UPDATE_SCALARS``.
        ``grad_sumsq``: for an update that clips by the global grad norm (``PASS_UPDATES``),
        the sum of the squares of all the step's grads times ``inv_scale`` (None: of this
        plan's)."""
        cdef double vals[MAX_SCALARS]
        cdef double sumsq = 0
        if not self.ready:
            raise RuntimeError("set_hyper() must be called before the plan runs")
        self._scalars(scalars, vals)
        if self._reads_sumsq():
            sumsq = self._grad_sumsq(nthreads, inv_scale) if grad_sumsq is None else grad_sumsq
        self._run(lr, step, nthreads, inv_scale, vals, sumsq)

    def grad_sumsq(self, int nthreads, double inv_scale=1.0):
        """The sum of the squares of the recorded grads, each times ``inv_scale`` (plans of
        multi-pass updates), bitwise the same for any ``nthreads``."""
        if not _PASSES[self.update].npasses:
            raise ValueError("grad_sumsq is kept for multi-pass updates (PASS_UPDATES)")
        return self._grad_sumsq(nthreads, inv_scale)

    cdef bint _reads_sumsq(self) noexcept:
        """Does this step's update read the global grad norm (StepValues.grad_sumsq)?"""
        cdef int j = _PASSES[self.update].sumsq_hyper
        return _PASSES[self.update].npasses != 0 and j >= 0 and self.hyper[j] > 0

    cdef double _grad_sumsq(self, int nthreads, double inv_scale) noexcept:
        # Per block sums of (inv_scale g)^2 into each block's first slot, then added in block
        # order.
        cdef GradSqArgs ga
        cdef const MultiPass* mp = &_PASSES[self.update]
        cdef Py_ssize_t b
        cdef double s = 0
        ga.storage = self.types[1]
        ga.inv_scale = inv_scale
        with nogil:
            memset(self.slots, 0, self.nblocks * mp.nslots * sizeof(double))
            _run_blocks(_gradsq_segment, self.table, self.nbuf, self.offsets, self.ntensors,
                        self.sizes, self.blockbase, self.slots, mp.nslots, nthreads,
                        MIN_PER_THREAD_NORM, &ga, False)
            for b in range(self.nblocks):
                s += self.slots[b * mp.nslots]
        return s

    def step(self, grads, double lr, long long step, int nthreads, double inv_scale=1.0,
             scalars=()):
        """``gather``, the non-finite check when enabled, then ``run`` (see ``step_plans``).

        Returns None when the step ran, ``(code, index)`` for a bad grad, and
        ``(STEP_SKIPPED_NONFINITE, -1)`` when it was skipped for a non-finite grad; in both of
        the latter cases nothing was written.
        """
        out = _step_plans((self,), (grads,), lr, step, nthreads, inv_scale, scalars)
        return None if out is None else out[1:]

    cdef int _scalars(self, values, double* out) except -1:
        """The update's per-step scalars into ``out``; their number must be the update's."""
        cdef Py_ssize_t j, n = _UPDATES[self.update].nscalars
        if len(values) != n:
            raise ValueError(f"this update takes {n} per-step scalars, got {len(values)}")
        for j in range(MAX_SCALARS):
            out[j] = values[j] if j < n else 0.0
        return 0

    cdef int _gather(self, grads, Py_ssize_t* bad) except -1:
        if self.typenum < 0:
            raise RuntimeError("this plan's grads are written into its table by the caller")
        if len(grads) != self.ntensors:
            raise ValueError(f"expected {self.ntensors} grads, got {len(grads)}")
        return _gather(grads, self.typenum, self.ndims, self.dims, self.table + self.ntensors,
                       self.ntensors, self.ws, self.we, self.nw, bad)

    cdef bint _all_finite(self, double inv_scale, int nthreads) noexcept:
        cdef FiniteArgs fa
        cdef int nbad
        fa.storage = self.types[1]
        fa.factor = inv_scale
        fa.row = 1
        with nogil:
            nbad = _run(_finite_segment, self.table, self.nbuf, self.offsets, self.ntensors,
                        self.sizes, nthreads, MIN_PER_THREAD_FINITE, &fa, False)
        return nbad == 0

    cdef void _run(self, double lr, long long step, int nthreads, double inv_scale,
                   const double* scalars, double grad_sumsq=0) noexcept:
        # The one entry into every update: its registry entry derives the loop's arguments from
        # the hyper-parameters and this step's values, then the driver runs its segment, through
        # the mixed-type tiles when a buffer is not of the math type.
        cdef const UpdateKernel* kernel = &_UPDATES[self.update]
        cdef const MultiPass* mp = &_PASSES[self.update]
        cdef int done
        cdef StepValues values
        cdef double block[ARG_BLOCK]
        cdef MixedArgs mixed
        cdef FusedAverageArgs fused
        cdef bint ftz = self.ftz, averaged = self.avg_mode != AVG_NONE and self.averages != NULL
        cdef int r
        values.lr = lr
        values.step = step
        values.inv_scale = inv_scale
        values.storage = self.math
        memcpy(values.scalars, scalars, MAX_SCALARS * sizeof(double))
        values.grad_sumsq = grad_sumsq
        values.tiled = self.mixed
        if averaged:
            fused.averages = self.averages
            fused.offsets = self.offsets
            fused.ntensors = self.ntensors
            fused.nbuf = self.nbuf
            fused.sizes = self.sizes
            fused.average.mode = self.avg_mode
            fused.average.storage = self.types[0]
            fused.average.weight = self.avg_weight
        with nogil:
            kernel.prepare(block, self.hyper, &values)
            if self.mixed:
                mixed.inner = kernel.segment
                # The fused loops know no 8-bit state.
                mixed.fast = kernel.fast if self.qblock == 0 else NULL
                mixed.tile = self.qblock if self.qblock else TILE
                mixed.inner_args = block
                mixed.nrows = self.nrows
                mixed.out_type = self.out_type
                mixed.stochastic = self.stochastic
                for r in range(self.nbuf):
                    mixed.types[r] = self.types[r]
                    mixed.scale_rows[r] = self.scale_rows[r]
                    _stream_keys(self.seed, <uint64_t>step,
                                 OUT_STREAM if r == self.nrows else <uint32_t>r,
                                 &mixed.k1[r], &mixed.k2[r])
            if mp.npasses:
                # Per-tensor factors: pass after pass over all tensors, the sums of one turned
                # into the factors of the next by the update's between function.
                memset(self.slots, 0, self.nblocks * mp.nslots * sizeof(double))
                done = 0
                while True:
                    if self.mixed:
                        mixed.inner = mp.passes[done]
                        mixed.fast = NULL
                        _run_blocks(_mixed_segment, self.table, self.nbuf, self.offsets,
                                    self.ntensors, self.sizes, self.blockbase, self.slots,
                                    mp.nslots, nthreads, kernel.min_per_thread, &mixed, ftz)
                    else:
                        _run_blocks(mp.passes[done], self.table, self.nbuf, self.offsets,
                                    self.ntensors, self.sizes, self.blockbase, self.slots,
                                    mp.nslots, nthreads, kernel.min_per_thread, block, ftz)
                    done = mp.between(self.slots, mp.nslots, self.blockbase, self.offsets,
                                      self.ntensors, done, block)
                    if done <= 0:
                        break
                if averaged:
                    # The last pass is not known ahead: the average takes a pass of its own.
                    fused.inner = _no_update
                    fused.inner_args = NULL
                    _run(_fused_average_segment, self.table, self.nbuf, self.offsets,
                         self.ntensors, self.sizes, nthreads, MIN_PER_THREAD_AVERAGE, &fused,
                         False)
            elif averaged:
                fused.inner = _mixed_segment if self.mixed else kernel.segment
                fused.inner_args = <const void*>&mixed if self.mixed else <const void*>block
                _run_cut(_fused_average_segment, self.table, self.nbuf, self.offsets,
                         self.ntensors, self.sizes, nthreads, kernel.min_per_thread, &fused, ftz,
                         self.qblock)
            elif not self.mixed:
                _run(kernel.segment, self.table, self.nbuf, self.offsets, self.ntensors,
                     self.sizes, nthreads, kernel.min_per_thread, block, ftz)
            else:
                _run_cut(_mixed_segment, self.table, self.nbuf, self.offsets, self.ntensors,
                         self.sizes, nthreads, kernel.min_per_thread, &mixed, ftz, self.qblock)


def _row_types(str storage, Py_ssize_t nrows, rows, out):
    """Each row's STORAGE code (-1: not read), the half copy's last; raises on a combination
    the kernels do not run."""
    known = ", ".join(STORAGE_CODES)
    if storage not in STORAGE_CODES:
        raise ValueError(f"unknown element type {storage!r}; known: {known}")
    if rows is None:
        rows = (storage,) * nrows
    if len(rows) != nrows:
        raise ValueError(f"rows names {len(rows)} element types for {nrows} rows")
    if rows[0] != storage:
        raise ValueError("rows[0] is the params' element type and must equal storage")
    types = []
    for r, name in enumerate(rows):
        if name is None:
            if r < 2:
                raise ValueError("the params' and grads' rows are always read")
            types.append(-1)
        elif name in QUANT_CODES:
            if r < 2:
                raise ValueError("8-bit codes hold state only, not params or grads")
            if storage == "float64":
                raise ValueError("8-bit state is not kept for float64 params")
            types.append(QUANT_CODES[name])
        elif name not in STORAGE_CODES:
            raise ValueError(f"unknown element type {name!r}; known: {known}")
        else:
            types.append(STORAGE_CODES[name])
    wide = storage == "float64"
    for r, name in enumerate(rows):
        if name is not None and (name == "float64") != wide:
            raise ValueError("float64 does not mix with other element types in one plan "
                             f"(params {storage}, row {r} {name})")
    if out is not None:
        if out not in ("bfloat16", "float16"):
            raise ValueError(f"the half copy must be bfloat16 or float16, got {out!r}")
        if storage != "float32":
            raise ValueError(f"a half copy is written from float32 params, not {storage}")
        types.append(STORAGE_CODES[out])
    return types


def step_plans(plans, grads, double lr, long long step, int nthreads, double inv_scale=1.0,
               scalars=()):
    """One step over several plans (an optimizer's dtypes) as one: every plan's grads
    (``grads[i]`` for ``plans[i]``) are checked and recorded, then, when a plan skips non-finite
    steps, every grad is checked for NaN and infinity, and only then does any update run.
    ``scalars``: the update's per-step values (the same for every plan).

    Returns None when the step ran, ``(i, code, index)`` for the first bad grad (of plan ``i``)
    and ``(-1, STEP_SKIPPED_NONFINITE, -1)`` when the step was skipped; in both of the latter
    cases nothing was written.
    """
    if len(grads) != len(plans):
        raise ValueError("step_plans needs one list of grads per plan")
    return _step_plans(plans, grads, lr, step, nthreads, inv_scale, scalars)


cdef object _step_plans(plans, grads, double lr, long long step, int nthreads,
                        double inv_scale, scalars):
    # The step order, written once: check and record every grad, the finite check, the updates.
    cdef Plan plan
    cdef Py_ssize_t i, n = len(plans), bad
    cdef int code
    cdef bint check = False, global_sumsq = False
    cdef double vals[MAX_SCALARS]
    cdef double sumsq = 0
    for i in range(n):
        plan = <Plan?>plans[i]
        if not plan.ready:
            raise RuntimeError("set_hyper() must be called before the plan runs")
        plan._scalars(scalars, vals)
        code = plan._gather(grads[i], &bad)
        if code:
            return (i, code, bad)
        check = check or plan.check
        global_sumsq = global_sumsq or plan._reads_sumsq()
    if check:
        for i in range(n):
            plan = <Plan>plans[i]
            if not plan._all_finite(inv_scale, nthreads):
                return (-1, STEP_SKIPPED_NONFINITE, -1)
    if global_sumsq:
        # The global grad norm (LAMB's clipping) over every plan's grads, in plan order.
        for i in range(n):
            sumsq += (<Plan>plans[i])._grad_sumsq(nthreads, inv_scale)
    for i in range(n):
        plan = <Plan>plans[i]
        plan._run(lr, step, nthreads, inv_scale, vals, sumsq)
    return None
