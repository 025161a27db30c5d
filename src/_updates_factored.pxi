# Factored second moments: Adafactor (per-row and per-column statistics of 2-D params).
#
# Adafactor is not element-wise, so it does not run through a Plan: each tensor needs the norm
# of its param, the mean squares of each row and each column of its grad, the mean of its row
# factor and the RMS of its update before the param can be written. ``AdafactorPlan`` runs
# those passes over all tensors of one element type (float32 or float64) in a few parallel
# regions per step:
#
#   A  (grad, param read)  row sums of g^2 -> row_var lerped in place; per-unit partial column
#      sums of g^2 and of p^2. Unfactored tensors (0-D, 1-D): variance lerped in place and the
#      partial sums of p^2 and of the update's squares in the same pass.
#   B  (small)             per 2-D slice: column partials summed in unit order -> col_var
#      lerped; mean of row_var, clamped to eps1.
#   C  (grad read)         partial sums of the update's squares (factored tensors).
#   -  (serial, tiny)      per tensor: the partials in unit order -> the param's RMS, the
#      update's RMS -> one coefficient.
#   D  (param, grad read; param written)  p <- p (1 - lr wd) + coefficient * update.
#
# Bytes moved per element (s = the element size, 4 or 8): factored tensors read p and g in A,
# g in C, p and g in D and write p in D: 6 s (plus the column partials, 8 bytes per column
# per unit); unfactored ones read p, g, v and write v in A, then read p, g, v and write p in
# D: 8 s.
#
# Work is cut into units fixed by the shapes alone (a run of whole rows of one 2-D slice, or
# a run of elements of an unfactored tensor); every partial sum belongs to one unit and is
# combined in unit order, so results do not depend on the number of threads. The clamps
# (eps1^2 of the estimate, eps1 of the row factor's mean) pass NaN through, as torch's clamp_
# does; the per-tensor maxima (of eps2 and the RMS, of 1 and the update's RMS) are Python's
# max, as in torch, so a NaN RMS gives eps2 and 1. Sums of squares
# are accumulated in double in a fixed lane order; the element arithmetic follows torch's
# _single_tensor_adafactor operation by operation in the tensor's own precision.

from libc.float cimport DBL_EPSILON, FLT_EPSILON

# Each unit holds about this many elements: at least ``AF_UNIT`` (rows of a slice are
# grouped until then), and a slice is cut into at most ``AF_MAX_BLOCKS`` row blocks, which
# bounds the column partials to AF_MAX_BLOCKS doubles per column.
cdef enum:
    AF_UNIT = 32768
    AF_MAX_BLOCKS = 64
    MIN_PER_THREAD_ADAFACTOR = 16384

_MIN_PER_THREAD["adafactor"] = MIN_PER_THREAD_ADAFACTOR

# The registry entry: the names and order of the hyper-parameters (UPDATE_ARGS) that the
# Python layers read. A Plan made for "adafactor" would run this no-op segment: the update
# runs through AdafactorPlan below, never through Plan.

cdef struct AdafactorHyper:
    double beta2_decay
    double eps1
    double eps2
    double d
    double weight_decay
    double maximize


cdef void _adafactor_prepare(void* out, const double* hyper,
                             const StepValues* s) noexcept nogil:
    pass


cdef int _adafactor_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                            Py_ssize_t first) noexcept nogil:
    return 0


_register("adafactor", ("beta2_decay", "eps1", "eps2", "d", "weight_decay", "maximize"),
          _adafactor_segment, _adafactor_prepare, MIN_PER_THREAD_ADAFACTOR,
          sizeof(AdafactorHyper), sizeof(AdafactorHyper))


# --------------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------------

cdef struct AFStep:
    # tensors: addresses (param, grad, row_var or variance, col_var) and shapes
    const intptr_t* table  # (4, ntensors)
    const Py_ssize_t* shape  # (4, ntensors): slices, rows, cols, factored
    Py_ssize_t ntensors
    # units
    const Py_ssize_t* uk  # tensor
    const Py_ssize_t* ub  # slice
    const Py_ssize_t* ulo  # first row (factored) or element
    const Py_ssize_t* uhi
    const Py_ssize_t* ufirst  # the first unit of the slice (factored)
    const Py_ssize_t* uscr  # offset of the unit's column partials in ``scratch``
    const Py_ssize_t* tu  # units of tensor k: [tu[k], tu[k+1])
    double* scratch
    double* accp  # per unit: sum of p^2
    double* accu  # per unit: sum of update^2
    double* mean  # per first unit of a slice: mean(row_var) clamped to eps1
    double* coef  # per tensor: -alpha / denominator
    int* bad  # per unit: non-finite grads found
    # step values
    double fac  # the grads' factor: 1/grad_scale, negated to maximize
    double w  # 1 - beta2_t = step ** beta2_decay
    double eps1
    double decay  # 1 - lr * weight_decay
    bint f64
    bint ftz  # the passes run with flush-to-zero on


cdef inline double _af_row(const floating* g, Py_ssize_t n, floating fac,
                           double* col) noexcept nogil:
    """Sum over a grad row of (fac g)^2 in double; each square is also added to ``col``."""
    cdef double t
    cdef Py_ssize_t i
    for i in range(n):
        t = <double>(fac * g[i])
        col[i] += t * t
    return _sumsq_scaled(g, n, fac)  # the row again, from cache


cdef inline floating _af_lerp(floating start, floating end, floating w) noexcept nogil:
    # torch.lerp with a scalar weight, in the tensor's precision
    if w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (1 - w)


cdef void _af_pass_a(const AFStep* s, Py_ssize_t u, floating dummy) noexcept nogil:
    cdef Py_ssize_t k = s.uk[u], b = s.ub[u], lo = s.ulo[u], hi = s.uhi[u]
    cdef Py_ssize_t R = s.shape[s.ntensors + k], C = s.shape[2 * s.ntensors + k]
    cdef Py_ssize_t r, j, i, n
    cdef floating* p = <floating*>s.table[k]
    cdef const floating* g = <const floating*>s.table[s.ntensors + k]
    cdef floating* a = <floating*>s.table[2 * s.ntensors + k]
    cdef floating fac = <floating>s.fac, w = <floating>s.w, eps1 = <floating>s.eps1
    cdef floating eps1sq = <floating>(s.eps1 * s.eps1)
    cdef floating gi, vi
    cdef floating ut[SUM_TILE]
    cdef double* col
    cdef double t, su = 0.0
    cdef Py_ssize_t start, count
    if s.shape[3 * s.ntensors + k]:
        # factored: rows [lo, hi) of slice b
        col = s.scratch + s.uscr[u]
        for j in range(C):
            col[j] = 0.0
        p = p + b * R * C
        g = g + b * R * C
        a = a + b * R
        for r in range(lo, hi):
            t = _af_row(g + r * C, C, fac, col)
            a[r] = _af_lerp(a[r], <floating>(t / C), w)
        s.accp[u] = _sumsq(p + lo * C, (hi - lo) * C)
        return
    # unfactored: elements [lo, hi); variance lerped, and the update's squares
    n = hi - lo
    p = p + lo
    g = g + lo
    a = a + lo
    # a tile of updates at a time into ``ut``, whose squares _sumsq then adds
    start = 0
    while start < n:
        count = n - start if n - start < SUM_TILE else SUM_TILE
        for j in range(count):
            i = start + j
            gi = fac * g[i]
            vi = _af_lerp(a[i], gi * gi, w)
            a[i] = vi
            vi = eps1sq if vi < eps1sq else vi
            ut[j] = (1 / _sqrt(vi)) * gi
        su += _sumsq(ut, count)
        start += count
    s.accu[u] = su
    s.accp[u] = _sumsq(p, n)


cdef void _af_pass_b(const AFStep* s, Py_ssize_t u, floating dummy) noexcept nogil:
    """The first unit of each factored slice: col_var and the clamped mean of row_var."""
    cdef Py_ssize_t k = s.uk[u], b = s.ub[u], v, j, r, last
    if not s.shape[3 * s.ntensors + k] or s.ufirst[u] != u:
        return
    cdef Py_ssize_t R = s.shape[s.ntensors + k], C = s.shape[2 * s.ntensors + k]
    cdef const floating* rv = <const floating*>s.table[2 * s.ntensors + k] + b * R
    cdef floating* cv = <floating*>s.table[3 * s.ntensors + k] + b * C
    cdef floating w = <floating>s.w, m
    cdef double total
    cdef double* col
    # the units of this slice are u, u+1, ... while ufirst says so
    last = u + 1
    while last < s.tu[k + 1] and s.ufirst[last] == u:
        last += 1
    cdef double* first = s.scratch + s.uscr[u]
    for v in range(u + 1, last):
        col = s.scratch + s.uscr[v]
        for j in range(C):
            first[j] += col[j]
    for j in range(C):
        cv[j] = _af_lerp(cv[j], <floating>(first[j] / R), w)
    total = 0.0
    for r in range(R):
        total += <double>rv[r]
    m = <floating>(total / R)
    s.mean[u] = <double>(<floating>s.eps1 if m < <floating>s.eps1 else m)


cdef inline floating _af_update(floating gi, floating r, floating c, floating m,
                                floating eps1sq) noexcept nogil:
    cdef floating v = (r * c) / m
    v = eps1sq if v < eps1sq else v
    return (1 / _sqrt(v)) * gi


cdef void _af_pass_c(const AFStep* s, Py_ssize_t u, floating dummy) noexcept nogil:
    """Sum of the update's squares over a factored unit."""
    cdef Py_ssize_t k = s.uk[u], b = s.ub[u], lo = s.ulo[u], hi = s.uhi[u], r, i, j
    if not s.shape[3 * s.ntensors + k]:
        return
    cdef Py_ssize_t R = s.shape[s.ntensors + k], C = s.shape[2 * s.ntensors + k]
    cdef const floating* g = <const floating*>s.table[s.ntensors + k] + b * R * C
    cdef const floating* rv = <const floating*>s.table[2 * s.ntensors + k] + b * R
    cdef const floating* cv = <const floating*>s.table[3 * s.ntensors + k] + b * C
    cdef floating fac = <floating>s.fac, m = <floating>s.mean[s.ufirst[u]]
    cdef floating eps1sq = <floating>(s.eps1 * s.eps1), ri
    cdef floating ut[SUM_TILE]
    cdef double su = 0.0
    cdef Py_ssize_t start, count
    cdef const floating* gr
    for r in range(lo, hi):
        gr = g + r * C
        ri = rv[r]
        # a tile of the row's updates at a time into ``ut``, whose squares _sumsq then adds
        start = 0
        while start < C:
            count = C - start if C - start < SUM_TILE else SUM_TILE
            for j in range(count):
                i = start + j
                ut[j] = _af_update(fac * gr[i], ri, cv[i], m, eps1sq)
            su += _sumsq(ut, count)
            start += count
    s.accu[u] = su


cdef void _af_pass_d(const AFStep* s, Py_ssize_t u, floating dummy) noexcept nogil:
    """p <- p (1 - lr wd) + coef * update."""
    cdef Py_ssize_t k = s.uk[u], b = s.ub[u], lo = s.ulo[u], hi = s.uhi[u], r, i
    cdef Py_ssize_t R = s.shape[s.ntensors + k], C = s.shape[2 * s.ntensors + k]
    cdef floating* p = <floating*>s.table[k]
    cdef const floating* g = <const floating*>s.table[s.ntensors + k]
    cdef const floating* a = <const floating*>s.table[2 * s.ntensors + k]
    cdef const floating* cv
    cdef floating fac = <floating>s.fac, coef = <floating>s.coef[k]
    cdef floating decay = <floating>s.decay, eps1sq = <floating>(s.eps1 * s.eps1)
    cdef floating m, ri, vi, gi
    cdef floating* pr
    cdef const floating* gr
    if s.shape[3 * s.ntensors + k]:
        cv = <const floating*>s.table[3 * s.ntensors + k] + b * C
        m = <floating>s.mean[s.ufirst[u]]
        for r in range(lo, hi):
            pr = p + (b * R + r) * C
            gr = g + (b * R + r) * C
            ri = a[b * R + r]
            for i in range(C):
                pr[i] = pr[i] * decay + coef * _af_update(fac * gr[i], ri, cv[i], m, eps1sq)
        return
    for i in range(lo, hi):
        gi = fac * g[i]
        vi = eps1sq if a[i] < eps1sq else a[i]
        p[i] = p[i] * decay + coef * ((1 / _sqrt(vi)) * gi)


cdef void _af_finite(const AFStep* s, Py_ssize_t u, floating dummy) noexcept nogil:
    """Count the unit's grads that are NaN or infinite once multiplied by the factor."""
    cdef Py_ssize_t k = s.uk[u], lo = s.ulo[u], hi = s.uhi[u], i
    cdef Py_ssize_t R = s.shape[s.ntensors + k], C = s.shape[2 * s.ntensors + k]
    cdef const floating* g = <const floating*>s.table[s.ntensors + k]
    cdef floating fac = <floating>s.fac
    cdef floating big = DBL_MAX if floating is double else FLT_MAX
    cdef int ok = 1
    if s.shape[3 * s.ntensors + k]:
        g = g + (s.ub[u] * R + lo) * C
        hi = (hi - lo) * C
    else:
        g = g + lo
        hi = hi - lo
    for i in range(hi):
        ok = ok & (fabs(g[i] * fac) <= big)
    s.bad[u] = 1 - ok


ctypedef void (*af_pass)(const AFStep* s, Py_ssize_t u) noexcept nogil

cdef void _af_a32(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_a(s, u, <float>0)

cdef void _af_a64(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_a(s, u, <double>0)

cdef void _af_b32(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_b(s, u, <float>0)

cdef void _af_b64(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_b(s, u, <double>0)

cdef void _af_c32(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_c(s, u, <float>0)

cdef void _af_c64(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_c(s, u, <double>0)

cdef void _af_d32(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_d(s, u, <float>0)

cdef void _af_d64(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_pass_d(s, u, <double>0)

cdef void _af_f32(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_finite(s, u, <float>0)

cdef void _af_f64(const AFStep* s, Py_ssize_t u) noexcept nogil:
    _af_finite(s, u, <double>0)


cdef inline void _af_call(af_pass fn, const AFStep* s, Py_ssize_t u) noexcept nogil:
    """``fn`` on unit ``u``, with flush-to-zero on in this thread for it when asked."""
    cdef unsigned long long saved
    if not s.ftz:
        fn(s, u)
        return
    saved = lrfast_ftz_enter()
    fn(s, u)
    lrfast_ftz_leave(saved)


cdef void _af_parallel(af_pass fn, const AFStep* s, Py_ssize_t nunits,
                       int nthreads) noexcept nogil:
    """Run ``fn`` on every unit: a static split of the units over ``nthreads`` threads."""
    cdef Py_ssize_t u
    if nthreads <= 1:
        for u in range(nunits):
            _af_call(fn, s, u)
        return
    for u in prange(nunits, schedule="static", num_threads=nthreads):
        _af_call(fn, s, u)


cdef class AdafactorPlan:
    """The Adafactor step over tensors of one element type (float32 or float64).

    ``shapes``: each tensor's shape. A tensor of two or more dimensions is factored: its
    leading dimensions are its slices, its last two its rows and columns; its state is
    ``row_var`` (slices x rows, laid out as torch's (..., R, 1)) and ``col_var`` (slices x
    columns, torch's (..., 1, C)). Other tensors (0-D, 1-D) keep ``variance``, shaped as the
    param. ``table`` (written by the caller, (4, tensors) np.intp): the addresses of param,
    grad, row_var or variance, col_var (0 for unfactored tensors), each C-contiguous.

    The units of work and their scratch are fixed here, from the shapes alone.
    """

    cdef object _keep
    cdef AFStep s
    cdef Py_ssize_t nunits, total
    cdef bint f64
    cdef double hyper[6]
    cdef bint ready

    def __init__(self, shapes, bint f64, cnp.ndarray table):
        cdef Py_ssize_t n = len(shapes), k
        if table.dtype != np.intp or not table.flags.c_contiguous or table.ndim != 2 \
                or table.shape[0] != 4 or table.shape[1] != n:
            raise ValueError("table must be a (4, tensors) C-contiguous np.intp array")
        shape = np.zeros((4, n), dtype=np.intp)
        uk, ub, ulo, uhi, ufirst, uscr = [], [], [], [], [], []
        tu = [0]
        nscr = 0
        total = 0
        for k, sh in enumerate(shapes):
            sh = tuple(int(x) for x in sh)
            numel = 1
            for x in sh:
                numel *= x
            total += numel
            if len(sh) >= 2:
                R, C = sh[len(sh) - 2], sh[len(sh) - 1]
                B = 1
                for x in sh[:len(sh) - 2]:
                    B *= x
                shape[:, k] = (B, R, C, 1)
                if numel:
                    rows = max(1, -(-AF_UNIT // C), -(-R // AF_MAX_BLOCKS))
                    for b in range(B):
                        first = len(uk)
                        for lo in range(0, R, rows):
                            uk.append(k); ub.append(b); ulo.append(lo)
                            uhi.append(min(R, lo + rows)); ufirst.append(first)
                            uscr.append(nscr)
                            nscr += C
            else:
                shape[:, k] = (1, 1, numel, 0)
                for lo in range(0, numel, AF_UNIT):
                    uk.append(k); ub.append(0); ulo.append(lo)
                    uhi.append(min(numel, lo + AF_UNIT)); ufirst.append(len(uk) - 1)
                    uscr.append(0)
            tu.append(len(uk))
        self.nunits = len(uk)
        self.total = total
        self.f64 = f64
        units = np.array([uk, ub, ulo, uhi, ufirst, uscr], dtype=np.intp).reshape(6, -1)
        units = np.ascontiguousarray(units)
        tu_arr = np.array(tu, dtype=np.intp)
        scratch = np.zeros(max(nscr, 1), dtype=np.float64)
        accs = np.zeros((4, max(self.nunits, 1)), dtype=np.float64)
        coef = np.zeros(max(n, 1), dtype=np.float64)
        bad = np.zeros(max(self.nunits, 1), dtype=np.intc)
        self._keep = (table, shape, units, tu_arr, scratch, accs, coef, bad)
        self.s.table = <const intptr_t*>cnp.PyArray_DATA(table)
        self.s.shape = <const Py_ssize_t*>cnp.PyArray_DATA(shape)
        self.s.ntensors = n
        cdef Py_ssize_t* up = <Py_ssize_t*>cnp.PyArray_DATA(units)
        cdef Py_ssize_t m = self.nunits
        self.s.uk = up
        self.s.ub = up + m
        self.s.ulo = up + 2 * m
        self.s.uhi = up + 3 * m
        self.s.ufirst = up + 4 * m
        self.s.uscr = up + 5 * m
        self.s.tu = <const Py_ssize_t*>cnp.PyArray_DATA(tu_arr)
        self.s.scratch = <double*>cnp.PyArray_DATA(scratch)
        cdef double* ap = <double*>cnp.PyArray_DATA(accs)
        cdef Py_ssize_t stride = max(self.nunits, 1)
        self.s.accp = ap
        self.s.accu = ap + stride
        self.s.mean = ap + 2 * stride
        self.s.coef = <double*>cnp.PyArray_DATA(coef)
        self.s.bad = <int*>cnp.PyArray_DATA(bad)
        self.s.f64 = f64
        self.s.ftz = False
        self.ready = False

    def set_options(self, bint flush_subnormals):
        """``flush_subnormals``: the passes run with flush-to-zero on (as Plan's option)."""
        if flush_subnormals and not LRFAST_HAVE_FTZ:
            raise ValueError("flush_subnormals is not supported on this CPU architecture")
        self.s.ftz = flush_subnormals

    @property
    def units(self):
        """The number of units of work (fixed by the shapes)."""
        return self.nunits

    def set_hyper(self, values):
        """beta2_decay, eps1 (< 0: the element type's machine epsilon), eps2, d,
        weight_decay, maximize (0 or 1): UPDATE_ARGS["adafactor"]'s order."""
        cdef int j
        if len(values) != 6:
            raise ValueError(f"Adafactor takes 6 hyper-parameters, got {len(values)}")
        for j in range(6):
            self.hyper[j] = values[j]
        self.ready = True

    cdef int _threads(self, int nthreads) noexcept:
        cdef Py_ssize_t per = _override_per_thread if _override_per_thread > 0 \
            else MIN_PER_THREAD_ADAFACTOR
        cdef Py_ssize_t most = self.total // per
        if nthreads < 1:
            nthreads = 1
        if most < nthreads:
            nthreads = <int>most if most > 1 else 1
        if nthreads > self.nunits:
            nthreads = <int>self.nunits if self.nunits > 1 else 1
        return nthreads

    def all_finite(self, double inv_scale, int nthreads):
        """Are all grads of the table, times ``inv_scale`` (negated to maximize), finite?"""
        cdef Py_ssize_t u
        cdef int nbad = 0
        cdef int nth = self._threads(nthreads)
        self.s.fac = inv_scale
        with nogil:
            _af_parallel(_af_f64 if self.f64 else _af_f32, &self.s, self.nunits, nth)
            for u in range(self.nunits):
                nbad += self.s.bad[u]
        return nbad == 0

    def run(self, double lr, long long step, int nthreads, double inv_scale=1.0):
        """One step (``step`` is 1-based, the same for every tensor) with the table's grads."""
        cdef double beta2_decay = self.hyper[0], eps1 = self.hyper[1], eps2 = self.hyper[2]
        cdef double d = self.hyper[3], wd = self.hyper[4]
        cdef double rho, alpha, denom, numel, t = <double>step
        cdef double sp, su
        cdef Py_ssize_t k, u, n = self.s.ntensors
        cdef int nth = self._threads(nthreads)
        if not self.ready:
            raise RuntimeError("set_hyper() must be called before the plan runs")
        if step < 1:
            raise ValueError("step must be >= 1")
        if eps1 < 0:
            eps1 = DBL_EPSILON if self.f64 else <double>FLT_EPSILON
        self.s.fac = -inv_scale if self.hyper[5] != 0 else inv_scale
        self.s.w = pow(t, beta2_decay)
        self.s.eps1 = eps1
        self.s.decay = 1.0 - lr * wd
        rho = 1.0 / pow(t, 0.5)  # torch: min(lr, 1 / step ** 0.5)
        rho = lr if lr < rho else rho
        with nogil:
            if self.f64:
                _af_parallel(_af_a64, &self.s, self.nunits, nth)
                _af_parallel(_af_b64, &self.s, self.nunits, nth)
                _af_parallel(_af_c64, &self.s, self.nunits, nth)
            else:
                _af_parallel(_af_a32, &self.s, self.nunits, nth)
                _af_parallel(_af_b32, &self.s, self.nunits, nth)
                _af_parallel(_af_c32, &self.s, self.nunits, nth)
            for k in range(n):
                sp = 0.0
                su = 0.0
                for u in range(self.s.tu[k], self.s.tu[k + 1]):
                    sp += self.s.accp[u]
                    su += self.s.accu[u]
                numel = <double>(self.s.shape[k] * self.s.shape[n + k] *
                                 self.s.shape[2 * n + k])
                if numel == 0:
                    self.s.coef[k] = 0.0
                    continue
                alpha = sqrt(sp) / pow(numel, 0.5)
                alpha = (alpha if alpha > eps2 else eps2) * rho
                denom = sqrt(su) / (pow(numel, 0.5) * d)
                denom = denom if denom > 1.0 else 1.0
                self.s.coef[k] = -alpha / denom
            if self.f64:
                _af_parallel(_af_d64, &self.s, self.nunits, nth)
            else:
                _af_parallel(_af_d32, &self.s, self.nunits, nth)
