# Updates from outside torch.optim: Lion (Chen et al., 2023), ADOPT (Taniguchi et al., 2024).
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

# Below this many elements per thread a second thread does not pay (see _updates.pxi): Lion
# reads and writes as many bytes per element as Adagrad, ADOPT as many as Adam.
cdef enum:
    MIN_PER_THREAD_LION = 8192
    MIN_PER_THREAD_ADOPT = 4096


# --------------------------------------------------------------------------------------------
# Lion (lion-pytorch's update_fn)
# --------------------------------------------------------------------------------------------

cdef struct LionHyper:
    double beta1
    double beta2
    double weight_decay
    double decoupled_weight_decay
    double init_lr  # NaN: the step's lr

cdef struct LionArgs:
    int storage
    double grad_factor  # 1/grad_scale
    double param_scale  # 1 - lr * decay
    double neg_lr
    double beta1
    double one_minus_beta1
    double beta2
    double one_minus_beta2


cdef void _lion_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef LionHyper h
    cdef LionArgs* a = <LionArgs*>out
    memcpy(&h, hyper, sizeof(LionHyper))
    cdef double init_lr = h.init_lr if h.init_lr == h.init_lr else s.lr
    a.storage = s.storage
    a.grad_factor = s.inv_scale
    if h.decoupled_weight_decay == 0:
        a.param_scale = 1.0 - s.lr * h.weight_decay
    elif init_lr > 0:
        # lion-pytorch divides the decay by the initial lr, then scales the param by
        # 1 - lr * decay (both in double).
        a.param_scale = 1.0 - s.lr * (h.weight_decay / init_lr)
    else:
        # lr 0 (a schedule's) standing for the initial lr too: their ratio is taken as 1.
        a.param_scale = 1.0 - h.weight_decay
    a.neg_lr = -s.lr
    a.beta1 = h.beta1
    a.one_minus_beta1 = 1.0 - h.beta1
    a.beta2 = h.beta2
    a.one_minus_beta2 = 1.0 - h.beta2


cdef inline void _lion_loop(floating* p, const floating* g, floating* m, Py_ssize_t n,
                            const LionArgs* a) noexcept nogil:
    cdef floating gf = <floating>a.grad_factor, scale = <floating>a.param_scale
    cdef floating neg_lr = <floating>a.neg_lr
    cdef floating b1 = <floating>a.beta1, omb1 = <floating>a.one_minus_beta1
    cdef floating b2 = <floating>a.beta2, omb2 = <floating>a.one_minus_beta2
    cdef floating gi, mi, ci, si
    cdef Py_ssize_t i
    for i in range(n):
        gi = gf * g[i]
        mi = m[i]
        # sign(beta1 m + (1 - beta1) g) as torch.sgn: 1, -1 or 0 (and 0 for NaN)
        ci = mi * b1 + omb1 * gi
        si = <floating>(ci > 0) - <floating>(ci < 0)
        # the decay first (lion-pytorch multiplies even by 1, which is exact), then the step
        p[i] = p[i] * scale + neg_lr * si
        m[i] = mi * b2 + omb2 * gi


cdef int _lion_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                       Py_ssize_t first) noexcept nogil:
    cdef const LionArgs* a = <const LionArgs*>args
    if a.storage == STORE_F64:
        _lion_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a)
    else:
        _lion_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


_register("lion", ("beta1", "beta2", "weight_decay", "decoupled_weight_decay", "init_lr"),
          _lion_segment, _lion_prepare, MIN_PER_THREAD_LION, sizeof(LionHyper),
          sizeof(LionArgs))


# --------------------------------------------------------------------------------------------
# ADOPT (timm's _single_tensor_adopt)
# --------------------------------------------------------------------------------------------

cdef struct AdoptHyper:
    double beta1
    double beta2
    double eps
    double clip_exp  # NaN: no clipping
    double weight_decay
    double decoupled
    double corrected_weight_decay
    double caution  # always 0 (refused in Python)
    double maximize
    double max_lr  # NaN: the step's lr

cdef struct AdoptArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double weight_decay
    double neg_decay  # -(lr or lr**2/max_lr) * weight_decay, the decoupled decay's factor
    double eps
    double bound  # (step - 1)**clip_exp, or infinity
    double beta1
    double beta2
    double neg_lr
    bint first_step
    bint coupled
    bint decoupled


cdef void _adopt_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef AdoptHyper h
    cdef AdoptArgs* a = <AdoptArgs*>out
    memcpy(&h, hyper, sizeof(AdoptHyper))
    cdef double scale = s.lr
    if h.corrected_weight_decay != 0 and h.max_lr == h.max_lr:
        scale = s.lr * s.lr / h.max_lr
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.weight_decay = h.weight_decay
    a.neg_decay = -scale * h.weight_decay
    a.eps = h.eps
    # No clip: a bound of infinity, which the two comparisons of the loop never cross.
    a.bound = pow(<double>(s.step - 1), h.clip_exp) if h.clip_exp == h.clip_exp else DBL_MAX * 2
    a.beta1 = h.beta1
    a.beta2 = h.beta2
    a.neg_lr = -s.lr
    a.first_step = s.step == 1
    a.coupled = h.weight_decay != 0 and h.decoupled == 0
    a.decoupled = h.weight_decay != 0 and h.decoupled != 0


cdef inline void _adopt_first_loop(floating* p, const floating* g, floating* v, Py_ssize_t n,
                                   const AdoptArgs* a, bint coupled) noexcept nogil:
    # The first step only accumulates the squared gradient (weight decay included).
    cdef floating gf = <floating>a.grad_factor, wd = <floating>a.weight_decay
    cdef floating gi
    cdef Py_ssize_t i
    for i in range(n):
        gi = gf * g[i]
        if coupled:
            gi = gi + wd * p[i]
        v[i] = v[i] + gi * gi


cdef inline void _adopt_loop(floating* p, const floating* g, floating* m, floating* v,
                             Py_ssize_t n, const AdoptArgs* a, bint small_w, bint coupled,
                             bint decoupled) noexcept nogil:
    # ``small_w``, ``coupled`` and ``decoupled`` arrive as constants (see _adopt_typed).
    cdef floating gf = <floating>a.grad_factor, wd = <floating>a.weight_decay
    cdef floating neg_decay = <floating>a.neg_decay, eps = <floating>a.eps
    cdef floating hi = <floating>a.bound
    cdef floating lo = -hi
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    cdef floating neg_lr = <floating>a.neg_lr
    cdef floating gi, pi, mi, vi, d, ni
    cdef Py_ssize_t i
    for i in range(n):
        gi = gf * g[i]
        pi = p[i]
        if coupled:
            gi = gi + wd * pi
        if decoupled:
            pi = pi + neg_decay * pi
        vi = v[i]
        # torch.clamp(sqrt(v), eps) and clamp(n, -bound, bound): NaN passes through both
        d = _sqrt(vi)
        if d < eps:
            d = eps
        ni = gi / d
        if ni > hi:
            ni = hi
        if ni < lo:
            ni = lo
        mi = _lerp(m[i], ni, w, omw, small_w)
        m[i] = mi
        p[i] = pi + neg_lr * mi
        v[i] = vi * beta2 + (omb2 * gi) * gi


cdef inline void _adopt_typed(floating* p, const floating* g, floating* m, floating* v,
                              Py_ssize_t n, const AdoptArgs* a) noexcept nogil:
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    if a.first_step:
        if a.coupled:
            _adopt_first_loop(p, g, v, n, a, True)
        else:
            _adopt_first_loop(p, g, v, n, a, False)
    elif small_w:
        if a.coupled:
            _adopt_loop(p, g, m, v, n, a, True, True, False)
        elif a.decoupled:
            _adopt_loop(p, g, m, v, n, a, True, False, True)
        else:
            _adopt_loop(p, g, m, v, n, a, True, False, False)
    elif a.coupled:
        _adopt_loop(p, g, m, v, n, a, False, True, False)
    elif a.decoupled:
        _adopt_loop(p, g, m, v, n, a, False, False, True)
    else:
        _adopt_loop(p, g, m, v, n, a, False, False, False)


cdef int _adopt_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                        Py_ssize_t first) noexcept nogil:
    cdef const AdoptArgs* a = <const AdoptArgs*>args
    if a.storage == STORE_F64:
        _adopt_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                     <double*>ptrs[3], n, a)
    else:
        _adopt_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                     <float*>ptrs[3], n, a)
    return 0


_register("adopt", ("beta1", "beta2", "eps", "clip_exp", "weight_decay", "decoupled",
                    "corrected_weight_decay", "caution", "maximize", "max_lr"),
          _adopt_segment, _adopt_prepare, MIN_PER_THREAD_ADOPT, sizeof(AdoptHyper),
          sizeof(AdoptArgs))
