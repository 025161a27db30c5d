# Schedule-free AdamW and SGD (Defazio et al., 2024), as the schedulefree package's
# AdamWScheduleFree and SGDScheduleFree compute them.
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).
#
# Three sequences: z (the base iterates, kept in the state), x (their weighted average, the
# point to evaluate at) and y = lerp(z, x, beta), the point the gradient is taken at. During
# training the params hold y and x is not stored: each step moves y and z in one pass,
#
#   y <- lerp(y, z, ckp1) + lr (beta (1 - ckp1) - 1) d,    z <- z - lr d,
#
# with d the (normalised, weight-decayed) gradient. The Python layer keeps the group's scalar
# state (k, lr_max, weight_sum) and derives, per step, the warmup-scheduled lr (StepValues.lr)
# and the averaging weight ckp1 = weight_k / weight_sum (StepValues.scalars[0]). train() and
# eval() move the params between y and x with ``schedule_free_interpolate`` below.

cdef enum:
    # About Adam's work per element (AdamW's) and a little less (SGD's: no square root).
    MIN_PER_THREAD_SCHEDULE_FREE = 4096
    # One read, one lerp, one write: SGD's threshold.
    MIN_PER_THREAD_INTERPOLATE = 32768


cdef struct ScheduleFreeArgs:
    int storage
    double grad_factor  # 1/grad_scale
    double ckp1  # torch.lerp's weight: y <- lerp(y, z, ckp1)
    double y_lr  # lr (beta (1 - ckp1) - 1): the gradient's factor in y
    double neg_lr  # the gradient's factor in z
    double weight_decay
    double beta2
    double one_minus_beta2
    double bias_correction2


# --------------------------------------------------------------------------------------------
# AdamWScheduleFree
# --------------------------------------------------------------------------------------------

cdef struct AdamWScheduleFreeHyper:
    double beta1
    double beta2
    double eps
    double weight_decay

cdef struct AdamWScheduleFreeArgs:
    ScheduleFreeArgs sf
    double eps


cdef void _adamw_schedule_free_prepare(void* out, const double* hyper,
                                       const StepValues* s) noexcept nogil:
    cdef AdamWScheduleFreeHyper h
    cdef AdamWScheduleFreeArgs* a = <AdamWScheduleFreeArgs*>out
    cdef double ckp1 = s.scalars[0]
    memcpy(&h, hyper, sizeof(AdamWScheduleFreeHyper))
    a.sf.storage = s.storage
    a.sf.grad_factor = s.inv_scale
    a.sf.ckp1 = ckp1
    # In double, as the package computes them in Python (s.step is k + 1).
    a.sf.y_lr = s.lr * (h.beta1 * (1.0 - ckp1) - 1.0)
    a.sf.neg_lr = -s.lr
    a.sf.weight_decay = h.weight_decay
    a.sf.beta2 = h.beta2
    a.sf.one_minus_beta2 = 1.0 - h.beta2
    a.sf.bias_correction2 = 1.0 - pow(h.beta2, <double>s.step)
    a.eps = h.eps


cdef inline void _adamw_schedule_free_loop(floating* y, const floating* g, floating* z,
                                           floating* v, Py_ssize_t n,
                                           const AdamWScheduleFreeArgs* a, bint small_w,
                                           bint has_wd) noexcept nogil:
    # ``small_w`` and ``has_wd`` arrive as constants (see _adamw_schedule_free_typed), so each
    # variant is its own branch-free loop. The package's order, operation by operation:
    # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2); denom = exp_avg_sq / bc2, sqrt, + eps;
    # g / denom; + decay y; y.lerp_(z, ckp1); y += y_lr g; z -= lr g.
    cdef floating sign = <floating>a.sf.grad_factor
    cdef floating w = <floating>a.sf.ckp1
    cdef floating omw = 1 - w
    cdef floating y_lr = <floating>a.sf.y_lr, neg_lr = <floating>a.sf.neg_lr
    cdef floating wd = <floating>a.sf.weight_decay
    cdef floating beta2 = <floating>a.sf.beta2, omb2 = <floating>a.sf.one_minus_beta2
    cdef floating bc2 = <floating>a.sf.bias_correction2, eps = <floating>a.eps
    cdef floating gi, vi, yi, zi
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        vi = v[i] * beta2 + (omb2 * gi) * gi
        v[i] = vi
        gi = gi / (_sqrt(vi / bc2) + eps)
        yi = y[i]
        zi = z[i]
        if has_wd:
            gi = gi + wd * yi
        yi = _lerp(yi, zi, w, omw, small_w)
        y[i] = yi + y_lr * gi
        z[i] = zi + neg_lr * gi


cdef inline void _adamw_schedule_free_typed(floating* y, const floating* g, floating* z,
                                            floating* v, Py_ssize_t n,
                                            const AdamWScheduleFreeArgs* a) noexcept nogil:
    # torch.lerp takes its first form for |weight| < 0.5, the weight rounded to the math type.
    cdef bint small_w = fabs(<double>(<floating>a.sf.ckp1)) < 0.5
    if small_w:
        if a.sf.weight_decay != 0:
            _adamw_schedule_free_loop(y, g, z, v, n, a, True, True)
        else:
            _adamw_schedule_free_loop(y, g, z, v, n, a, True, False)
    elif a.sf.weight_decay != 0:
        _adamw_schedule_free_loop(y, g, z, v, n, a, False, True)
    else:
        _adamw_schedule_free_loop(y, g, z, v, n, a, False, False)


cdef int _adamw_schedule_free_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                                      Py_ssize_t first) noexcept nogil:
    cdef const AdamWScheduleFreeArgs* a = <const AdamWScheduleFreeArgs*>args
    if a.sf.storage == STORE_F64:
        _adamw_schedule_free_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                                   <double*>ptrs[3], n, a)
    else:
        _adamw_schedule_free_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                                   <float*>ptrs[3], n, a)
    return 0


_register("adamw_schedule_free", ("beta1", "beta2", "eps", "weight_decay"),
          _adamw_schedule_free_segment, _adamw_schedule_free_prepare,
          MIN_PER_THREAD_SCHEDULE_FREE, sizeof(AdamWScheduleFreeHyper),
          sizeof(AdamWScheduleFreeArgs), NULL, ("ckp1",))


# --------------------------------------------------------------------------------------------
# SGDScheduleFree
# --------------------------------------------------------------------------------------------

cdef struct SGDScheduleFreeHyper:
    double momentum
    double weight_decay


cdef void _sgd_schedule_free_prepare(void* out, const double* hyper,
                                     const StepValues* s) noexcept nogil:
    cdef SGDScheduleFreeHyper h
    cdef ScheduleFreeArgs* a = <ScheduleFreeArgs*>out
    cdef double ckp1 = s.scalars[0]
    memcpy(&h, hyper, sizeof(SGDScheduleFreeHyper))
    a.storage = s.storage
    a.grad_factor = s.inv_scale
    a.ckp1 = ckp1
    a.y_lr = s.lr * (h.momentum * (1.0 - ckp1) - 1.0)
    a.neg_lr = -s.lr
    a.weight_decay = h.weight_decay


cdef inline void _sgd_schedule_free_loop(floating* y, const floating* g, floating* z,
                                         Py_ssize_t n, const ScheduleFreeArgs* a, bint small_w,
                                         bint has_wd) noexcept nogil:
    # The package's order: g + decay y; y.lerp_(z, ckp1); y += y_lr g; z -= lr g.
    cdef floating sign = <floating>a.grad_factor
    cdef floating w = <floating>a.ckp1
    cdef floating omw = 1 - w
    cdef floating y_lr = <floating>a.y_lr, neg_lr = <floating>a.neg_lr
    cdef floating wd = <floating>a.weight_decay
    cdef floating gi, yi, zi
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        yi = y[i]
        zi = z[i]
        if has_wd:
            gi = gi + wd * yi
        yi = _lerp(yi, zi, w, omw, small_w)
        y[i] = yi + y_lr * gi
        z[i] = zi + neg_lr * gi


cdef inline void _sgd_schedule_free_typed(floating* y, const floating* g, floating* z,
                                          Py_ssize_t n, const ScheduleFreeArgs* a) noexcept nogil:
    cdef bint small_w = fabs(<double>(<floating>a.ckp1)) < 0.5
    if small_w:
        if a.weight_decay != 0:
            _sgd_schedule_free_loop(y, g, z, n, a, True, True)
        else:
            _sgd_schedule_free_loop(y, g, z, n, a, True, False)
    elif a.weight_decay != 0:
        _sgd_schedule_free_loop(y, g, z, n, a, False, True)
    else:
        _sgd_schedule_free_loop(y, g, z, n, a, False, False)


cdef int _sgd_schedule_free_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                                    Py_ssize_t first) noexcept nogil:
    cdef const ScheduleFreeArgs* a = <const ScheduleFreeArgs*>args
    if a.storage == STORE_F64:
        _sgd_schedule_free_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                                 n, a)
    else:
        _sgd_schedule_free_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


_register("sgd_schedule_free", ("momentum", "weight_decay"),
          _sgd_schedule_free_segment, _sgd_schedule_free_prepare,
          MIN_PER_THREAD_SCHEDULE_FREE, sizeof(SGDScheduleFreeHyper), sizeof(ScheduleFreeArgs),
          NULL, ("ckp1",))


# --------------------------------------------------------------------------------------------
# train() / eval(): params <- lerp(params, z, weight) over every tensor, in one pass
# --------------------------------------------------------------------------------------------

cdef struct InterpolateArgs:
    int storage
    double weight


cdef inline void _interpolate_loop(floating* p, const floating* z, Py_ssize_t n, floating w,
                                   bint small_w) noexcept nogil:
    cdef floating omw = 1 - w
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = _lerp(p[i], z[i], w, omw, small_w)


cdef inline void _interpolate_typed(floating* p, const floating* z, Py_ssize_t n,
                                    double weight) noexcept nogil:
    cdef floating w = <floating>weight
    if fabs(<double>w) < 0.5:
        _interpolate_loop(p, z, n, w, True)
    else:
        _interpolate_loop(p, z, n, w, False)


cdef int _interpolate_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                              Py_ssize_t first) noexcept nogil:
    cdef const InterpolateArgs* a = <const InterpolateArgs*>args
    if a.storage == STORE_F64:
        _interpolate_typed(<double*>ptrs[0], <const double*>ptrs[1], n, a.weight)
    else:
        _interpolate_typed(<float*>ptrs[0], <const float*>ptrs[1], n, a.weight)
    return 0


_MIN_PER_THREAD["schedule_free_interpolate"] = MIN_PER_THREAD_INTERPOLATE


def schedule_free_interpolate(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, str storage,
                              str z_storage, double weight, int nthreads, out=None,
                              str rounding="nearest", uint64_t seed=0, uint64_t step=0):
    """``p <- lerp(p, z, weight)`` for every tensor of ``table``, as torch.lerp computes it with
    a scalar weight, in one parallel pass: schedule-free's train() (weight ``1 - beta``: x to
    y) and eval() (weight ``1 - 1/beta``: y to x).

    ``table`` is (rows, tensors) of addresses: row 0 the params (element type ``storage``),
    row 1 their z (``z_storage``, read only) and, when ``out`` names a half type, row 2 a copy
    of the new params rounded to it (float32 params only). ``offsets``: prefix sums of the
    tensor sizes. Half buffers are computed in float32 and rounded as the updates round them
    (``rounding``, with the random bits of (``seed``, ``step``, row)).
    """
    cdef InterpolateArgs ia
    cdef MixedArgs mixed
    cdef Py_ssize_t sizes[MAX_BUFFERS]
    cdef Py_ssize_t ntensors = table.shape[1], nbuf = table.shape[0]
    cdef int pt, zt, ot = -1, math, r
    cdef bint is_mixed
    known = ", ".join(STORAGE_CODES)
    if storage not in STORAGE_CODES or z_storage not in STORAGE_CODES:
        raise ValueError(f"unknown element type {storage!r} or {z_storage!r}; known: {known}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    pt = STORAGE_CODES[storage]
    zt = STORAGE_CODES[z_storage]
    if (pt == STORE_F64) != (zt == STORE_F64):
        raise ValueError("float64 does not mix with other element types "
                         f"(params {storage}, z {z_storage})")
    if out is not None:
        if out not in ("bfloat16", "float16") or pt != STORE_F32:
            raise ValueError(f"the half copy must be bfloat16 or float16 of float32 params, "
                             f"got {out!r} of {storage}")
        ot = STORAGE_CODES[out]
    if nbuf != 2 + (ot >= 0):
        raise ValueError(f"table must have {2 + (ot >= 0)} rows, got {nbuf}")
    if offsets.shape[0] != ntensors + 1:
        raise ValueError("offsets must have one entry more than the table has columns")
    if ntensors == 0:
        return
    math = STORE_F64 if pt == STORE_F64 else STORE_F32
    ia.storage = math
    ia.weight = weight
    sizes[0] = _ITEMSIZE[pt]
    sizes[1] = _ITEMSIZE[zt]
    sizes[2] = _ITEMSIZE[ot] if ot >= 0 else 0
    is_mixed = pt != math or zt != math or ot >= 0
    if not is_mixed:
        with nogil:
            _run(_interpolate_segment, &table[0, 0], nbuf, &offsets[0], ntensors, sizes,
                 nthreads, MIN_PER_THREAD_INTERPOLATE, &ia, False)
        return
    mixed.inner = _interpolate_segment
    mixed.fast = NULL
    mixed.inner_args = &ia
    mixed.nrows = 2
    mixed.out_type = ot
    mixed.stochastic = rounding == "stochastic"
    mixed.tile = TILE
    mixed.types[0] = pt
    mixed.types[1] = zt
    for r in range(nbuf):
        _stream_keys(seed, step, OUT_STREAM if r == 2 else <uint32_t>r,
                     &mixed.k1[r], &mixed.k2[r])
    with nogil:
        _run(_mixed_segment, &table[0, 0], nbuf, &offsets[0], ntensors, sizes, nthreads,
             MIN_PER_THREAD_INTERPOLATE, &mixed, False)
