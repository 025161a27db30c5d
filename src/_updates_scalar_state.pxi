# Updates with per-step scalar state kept by the Python layer: NAdam (mu_product),
# ASGD (eta, mu). The kernel reads them from StepValues.scalars.
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

cdef enum:
    MIN_PER_THREAD_NADAM = 4096
    MIN_PER_THREAD_ASGD = 16384


# --------------------------------------------------------------------------------------------
# NAdam
# --------------------------------------------------------------------------------------------

cdef struct NAdamHyper:
    double beta1
    double beta2
    double eps
    double weight_decay
    double momentum_decay
    double decoupled_weight_decay
    double maximize

cdef struct NAdamArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double beta1
    double beta2
    double eps
    double weight_decay
    double param_scale  # 1 - lr * weight_decay (decoupled decay)
    double bc2  # 1 - beta2^t
    double grad_coef  # -lr (1 - mu_t) / (1 - prod_{i<=t} mu_i)
    double avg_coef  # -lr mu_{t+1} / (1 - prod_{i<=t+1} mu_i)
    bint decoupled


cdef void _nadam_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef NAdamHyper h
    cdef NAdamArgs* a = <NAdamArgs*>out
    memcpy(&h, hyper, sizeof(NAdamHyper))
    # In double, as torch forms them in Python floats. scalars[0] is this step's momentum
    # product, already multiplied by mu_t and rounded to the state's type by the Python layer.
    cdef double t = <double>s.step
    cdef double mu = h.beta1 * (1.0 - 0.5 * pow(0.96, t * h.momentum_decay))
    cdef double mu_next = h.beta1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * h.momentum_decay))
    cdef double product = s.scalars[0]
    cdef double product_next = product * mu_next
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.beta1 = h.beta1
    a.beta2 = h.beta2
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    a.param_scale = 1.0 - s.lr * h.weight_decay
    a.bc2 = 1.0 - pow(h.beta2, t)
    a.grad_coef = -s.lr * (1.0 - mu) / (1.0 - product)
    a.avg_coef = (-s.lr * mu_next) / (1.0 - product_next)
    a.decoupled = h.decoupled_weight_decay != 0


cdef inline void _nadam_loop(floating* p, const floating* g, floating* m, floating* v,
                             Py_ssize_t n, const NAdamArgs* a, bint small_w, bint coupled,
                             bint decoupled) noexcept nogil:
    # ``small_w``, ``coupled`` and ``decoupled`` arrive as constants (see _nadam_typed): one
    # branch-free loop per variant.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, scale = <floating>a.param_scale
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    cdef floating bc2 = <floating>a.bc2, eps = <floating>a.eps
    cdef floating gc = <floating>a.grad_coef, ac = <floating>a.avg_coef
    cdef floating gi, pi, mi, vi, den
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        pi = p[i]
        if decoupled:
            pi = pi * scale
        if coupled:
            gi = gi + wd * pi
        mi = _lerp(m[i], gi, w, omw, small_w)
        m[i] = mi
        vi = v[i] * beta2 + (omb2 * gi) * gi
        v[i] = vi
        # torch: sqrt(v / (1 - beta2^t)) + eps, then two addcdivs into the param
        den = _sqrt(vi / bc2) + eps
        pi = pi + (gc * gi) / den
        p[i] = pi + (ac * mi) / den


cdef inline void _nadam_typed(floating* p, const floating* g, floating* m, floating* v,
                              Py_ssize_t n, const NAdamArgs* a) noexcept nogil:
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    cdef bint has_wd = a.weight_decay != 0
    if small_w:
        if has_wd and a.decoupled:
            _nadam_loop(p, g, m, v, n, a, True, False, True)
        elif has_wd:
            _nadam_loop(p, g, m, v, n, a, True, True, False)
        else:
            _nadam_loop(p, g, m, v, n, a, True, False, False)
    elif has_wd and a.decoupled:
        _nadam_loop(p, g, m, v, n, a, False, False, True)
    elif has_wd:
        _nadam_loop(p, g, m, v, n, a, False, True, False)
    else:
        _nadam_loop(p, g, m, v, n, a, False, False, False)


cdef int _nadam_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                        Py_ssize_t first) noexcept nogil:
    cdef const NAdamArgs* a = <const NAdamArgs*>args
    if a.storage == STORE_F64:
        _nadam_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                     <double*>ptrs[3], n, a)
    else:
        _nadam_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                     <float*>ptrs[3], n, a)
    return 0


_register("nadam", ("beta1", "beta2", "eps", "weight_decay", "momentum_decay",
                    "decoupled_weight_decay", "maximize"),
          _nadam_segment, _nadam_prepare, MIN_PER_THREAD_NADAM, sizeof(NAdamHyper),
          sizeof(NAdamArgs), NULL, ("mu_product",))


# --------------------------------------------------------------------------------------------
# ASGD (averaged SGD: the ax buffer is the Polyak average of the iterates)
# --------------------------------------------------------------------------------------------

cdef struct ASGDHyper:
    double lambd
    double alpha
    double t0
    double weight_decay
    double maximize

cdef struct ASGDArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double weight_decay
    double decay  # 1 - lambd * eta
    double neg_eta
    double mu
    bint copy  # mu == 1: the average is the param itself


cdef void _asgd_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef ASGDHyper h
    cdef ASGDArgs* a = <ASGDArgs*>out
    memcpy(&h, hyper, sizeof(ASGDHyper))
    # scalars: eta and mu as the state holds them before this step (torch reads them, then
    # sets the next ones; the Python layer does the latter).
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.weight_decay = h.weight_decay
    a.decay = 1.0 - h.lambd * s.scalars[0]
    a.neg_eta = -s.scalars[0]
    a.mu = s.scalars[1]
    a.copy = s.scalars[1] == 1.0


cdef inline void _asgd_loop(floating* p, const floating* g, floating* ax, Py_ssize_t n,
                            const ASGDArgs* a, bint has_wd, bint copy) noexcept nogil:
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, decay = <floating>a.decay
    cdef floating neg_eta = <floating>a.neg_eta, mu = <floating>a.mu
    cdef floating gi, pi, xi
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        pi = p[i]
        if has_wd:
            gi = gi + wd * pi
        pi = pi * decay
        pi = pi + neg_eta * gi
        p[i] = pi
        if copy:
            ax[i] = pi
        else:
            xi = ax[i]
            ax[i] = xi + (pi - xi) * mu


cdef inline void _asgd_typed(floating* p, const floating* g, floating* ax, Py_ssize_t n,
                             const ASGDArgs* a) noexcept nogil:
    if a.weight_decay != 0:
        if a.copy:
            _asgd_loop(p, g, ax, n, a, True, True)
        else:
            _asgd_loop(p, g, ax, n, a, True, False)
    elif a.copy:
        _asgd_loop(p, g, ax, n, a, False, True)
    else:
        _asgd_loop(p, g, ax, n, a, False, False)


cdef int _asgd_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                       Py_ssize_t first) noexcept nogil:
    cdef const ASGDArgs* a = <const ASGDArgs*>args
    if a.storage == STORE_F64:
        _asgd_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a)
    else:
        _asgd_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


_register("asgd", ("lambd", "alpha", "t0", "weight_decay", "maximize"),
          _asgd_segment, _asgd_prepare, MIN_PER_THREAD_ASGD, sizeof(ASGDHyper),
          sizeof(ASGDArgs), NULL, ("eta", "mu"))
