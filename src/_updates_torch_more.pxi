# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop.
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call). The arithmetic is torch's single-tensor code (foreach=False) operation by
# operation, every tensor operation rounded to the tensor's type and every Python scalar torch
# passes rounded to it too; the per-step scalars are derived once in double in the prepare
# functions, as torch derives them in Python.

cdef enum:
    # Elements per thread below which a second thread does not pay (see _updates.pxi): these
    # updates cost about what Adam costs per element (Rprop a little less).
    MIN_PER_THREAD_ADAMAX = 4096
    MIN_PER_THREAD_RADAM = 4096
    MIN_PER_THREAD_ADADELTA = 4096
    MIN_PER_THREAD_RPROP = 8192


cdef inline floating _tm_abs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


# --------------------------------------------------------------------------------------------
# Adamax
# --------------------------------------------------------------------------------------------

cdef struct AdamaxHyper:
    double beta1
    double beta2
    double eps
    double weight_decay
    double maximize

cdef struct AdamaxArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double beta1
    double beta2
    double eps
    double weight_decay
    double neg_clr  # -lr / (1 - beta1^t)


cdef void _adamax_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef AdamaxHyper h
    cdef AdamaxArgs* a = <AdamaxArgs*>out
    memcpy(&h, hyper, sizeof(AdamaxHyper))
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.beta1 = h.beta1
    a.beta2 = h.beta2
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    # torch: clr = lr / (1 - beta1 ** step), in double; addcdiv's value is -clr
    a.neg_clr = -(s.lr / (1.0 - pow(h.beta1, <double>s.step)))


cdef inline void _adamax_loop(floating* p, const floating* g, floating* m, floating* u,
                              Py_ssize_t n, const AdamaxArgs* a, bint small_w,
                              bint has_wd) noexcept nogil:
    # ``small_w`` and ``has_wd`` arrive as constants (see _adamax_typed): one branch-free loop
    # per variant.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, eps = <floating>a.eps
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta2 = <floating>a.beta2, neg_clr = <floating>a.neg_clr
    cdef floating gi, mi, ui, bi
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if has_wd:
            gi = gi + wd * p[i]
        mi = _lerp(m[i], gi, w, omw, small_w)
        m[i] = mi
        # torch.maximum(exp_inf * beta2, |g| + eps): NaN when either is NaN
        ui = u[i] * beta2
        bi = _tm_abs(gi) + eps
        if not ((ui > bi) | (ui != ui)):
            ui = bi
        u[i] = ui
        p[i] = p[i] + (neg_clr * mi) / ui


cdef inline void _adamax_typed(floating* p, const floating* g, floating* m, floating* u,
                               Py_ssize_t n, const AdamaxArgs* a) noexcept nogil:
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    if small_w:
        if a.weight_decay != 0:
            _adamax_loop(p, g, m, u, n, a, True, True)
        else:
            _adamax_loop(p, g, m, u, n, a, True, False)
    elif a.weight_decay != 0:
        _adamax_loop(p, g, m, u, n, a, False, True)
    else:
        _adamax_loop(p, g, m, u, n, a, False, False)


cdef int _adamax_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                         Py_ssize_t first) noexcept nogil:
    cdef const AdamaxArgs* a = <const AdamaxArgs*>args
    if a.storage == STORE_F64:
        _adamax_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                      <double*>ptrs[3], n, a)
    else:
        _adamax_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                      <float*>ptrs[3], n, a)
    return 0


_register("adamax", ("beta1", "beta2", "eps", "weight_decay", "maximize"),
          _adamax_segment, _adamax_prepare, MIN_PER_THREAD_ADAMAX, sizeof(AdamaxHyper),
          sizeof(AdamaxArgs))


# --------------------------------------------------------------------------------------------
# RAdam
# --------------------------------------------------------------------------------------------

cdef struct RAdamHyper:
    double beta1
    double beta2
    double eps
    double weight_decay
    double decoupled_weight_decay
    double maximize

cdef struct RAdamArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double beta1
    double beta2
    double eps
    double weight_decay
    double param_scale  # 1 - lr * weight_decay (decoupled), else 1
    double lr
    double bc1  # 1 - beta1^t
    double bc2_sqrt  # (1 - beta2^t) ** 0.5
    double rect  # the variance rectification term (when rectified)
    bint decoupled
    bint rectified  # rho_t > 5: the adaptive step; else the plain momentum step


cdef void _radam_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef RAdamHyper h
    cdef RAdamArgs* a = <RAdamArgs*>out
    memcpy(&h, hyper, sizeof(RAdamHyper))
    cdef double step = <double>s.step
    cdef double b2t = pow(h.beta2, step)
    cdef double bc2 = 1.0 - b2t
    # The length of the approximated simple moving average, its limit, and the switch, in
    # double and in torch's order of operations (Python's ``**`` is C's pow).
    cdef double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0
    cdef double rho_t = rho_inf - 2.0 * step * b2t / bc2
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.beta1 = h.beta1
    a.beta2 = h.beta2
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    a.decoupled = h.decoupled_weight_decay != 0
    a.param_scale = 1.0 - s.lr * h.weight_decay if a.decoupled and h.weight_decay != 0 else 1.0
    a.lr = s.lr
    a.bc1 = 1.0 - pow(h.beta1, step)
    a.bc2_sqrt = pow(bc2, 0.5)
    a.rectified = rho_t > 5.0
    a.rect = 1.0
    if a.rectified:
        a.rect = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                     / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)


cdef inline void _radam_loop(floating* p, const floating* g, floating* m, floating* v,
                             Py_ssize_t n, const RAdamArgs* a, bint small_w, bint coupled,
                             bint rectified) noexcept nogil:
    # ``small_w``, ``coupled`` and ``rectified`` arrive as constants (see _radam_typed).
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay
    # Decoupled decay multiplies the param by 1 - lr*wd; otherwise by 1, which is exact.
    cdef floating scale = <floating>a.param_scale
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    cdef floating eps = <floating>a.eps, bc1 = <floating>a.bc1, lr = <floating>a.lr
    cdef floating bc2_sqrt = <floating>a.bc2_sqrt, rect = <floating>a.rect
    # (a typed 1: Cython writes a literal 1 as the double 1.0, which would make the
    # reciprocal a double one)
    cdef floating one = 1
    cdef floating gi, pi, mi, vi, step
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        pi = p[i] * scale
        if coupled:
            gi = gi + wd * pi
        mi = _lerp(m[i], gi, w, omw, small_w)
        m[i] = mi
        vi = v[i] * beta2 + (omb2 * gi) * gi
        v[i] = vi
        # torch: (exp_avg / bc1) * lr [* (bc2 ** 0.5 / (sqrt(v) + eps)) * rect], where a
        # scalar over a tensor is the tensor's reciprocal times the scalar
        step = (mi / bc1) * lr
        if rectified:
            step = (step * ((one / (_sqrt(vi) + eps)) * bc2_sqrt)) * rect
        p[i] = pi - step


cdef inline void _radam_typed(floating* p, const floating* g, floating* m, floating* v,
                              Py_ssize_t n, const RAdamArgs* a) noexcept nogil:
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    cdef bint coupled = a.weight_decay != 0 and not a.decoupled
    if small_w:
        if coupled:
            if a.rectified:
                _radam_loop(p, g, m, v, n, a, True, True, True)
            else:
                _radam_loop(p, g, m, v, n, a, True, True, False)
        elif a.rectified:
            _radam_loop(p, g, m, v, n, a, True, False, True)
        else:
            _radam_loop(p, g, m, v, n, a, True, False, False)
    elif coupled:
        if a.rectified:
            _radam_loop(p, g, m, v, n, a, False, True, True)
        else:
            _radam_loop(p, g, m, v, n, a, False, True, False)
    elif a.rectified:
        _radam_loop(p, g, m, v, n, a, False, False, True)
    else:
        _radam_loop(p, g, m, v, n, a, False, False, False)


cdef int _radam_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                        Py_ssize_t first) noexcept nogil:
    cdef const RAdamArgs* a = <const RAdamArgs*>args
    if a.storage == STORE_F64:
        _radam_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                     <double*>ptrs[3], n, a)
    else:
        _radam_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                     <float*>ptrs[3], n, a)
    return 0


_register("radam", ("beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay",
                    "maximize"),
          _radam_segment, _radam_prepare, MIN_PER_THREAD_RADAM, sizeof(RAdamHyper),
          sizeof(RAdamArgs))


# --------------------------------------------------------------------------------------------
# Adadelta
# --------------------------------------------------------------------------------------------

cdef struct AdadeltaHyper:
    double rho
    double eps
    double weight_decay
    double maximize

cdef struct AdadeltaArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double rho
    double eps
    double weight_decay
    double neg_lr


cdef void _adadelta_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef AdadeltaHyper h
    cdef AdadeltaArgs* a = <AdadeltaArgs*>out
    memcpy(&h, hyper, sizeof(AdadeltaHyper))
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.rho = h.rho
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    a.neg_lr = -s.lr


cdef inline void _adadelta_loop(floating* p, const floating* g, floating* sq, floating* acc,
                                Py_ssize_t n, const AdadeltaArgs* a, bint has_wd) noexcept nogil:
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, eps = <floating>a.eps
    cdef floating rho = <floating>a.rho, omr = <floating>(1.0 - a.rho)
    cdef floating neg_lr = <floating>a.neg_lr
    cdef floating gi, si, di
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if has_wd:
            gi = gi + wd * p[i]
        si = sq[i] * rho + (omr * gi) * gi
        sq[i] = si
        # delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * grad
        di = (_sqrt(acc[i] + eps) / _sqrt(si + eps)) * gi
        acc[i] = acc[i] * rho + (omr * di) * di
        p[i] = p[i] + neg_lr * di


cdef int _adadelta_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                           Py_ssize_t first) noexcept nogil:
    cdef const AdadeltaArgs* a = <const AdadeltaArgs*>args
    if a.storage == STORE_F64:
        if a.weight_decay != 0:
            _adadelta_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                           <double*>ptrs[3], n, a, True)
        else:
            _adadelta_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                           <double*>ptrs[3], n, a, False)
    elif a.weight_decay != 0:
        _adadelta_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                       <float*>ptrs[3], n, a, True)
    else:
        _adadelta_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                       <float*>ptrs[3], n, a, False)
    return 0


_register("adadelta", ("rho", "eps", "weight_decay", "maximize"),
          _adadelta_segment, _adadelta_prepare, MIN_PER_THREAD_ADADELTA, sizeof(AdadeltaHyper),
          sizeof(AdadeltaArgs))


# --------------------------------------------------------------------------------------------
# Rprop
# --------------------------------------------------------------------------------------------

cdef struct RpropHyper:
    double etaminus
    double etaplus
    double step_size_min
    double step_size_max
    double maximize

cdef struct RpropArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double etaminus
    double etaplus
    double step_size_min
    double step_size_max


cdef void _rprop_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    # (the lr only started the step sizes, when the state was made)
    cdef RpropHyper h
    cdef RpropArgs* a = <RpropArgs*>out
    memcpy(&h, hyper, sizeof(RpropHyper))
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.etaminus = h.etaminus
    a.etaplus = h.etaplus
    a.step_size_min = h.step_size_min
    a.step_size_max = h.step_size_max


cdef inline void _rprop_loop(floating* p, const floating* g, floating* prev, floating* ss,
                             Py_ssize_t n, const RpropArgs* a) noexcept nogil:
    cdef floating sign = <floating>a.grad_factor
    cdef floating etaminus = <floating>a.etaminus, etaplus = <floating>a.etaplus
    cdef floating lo = <floating>a.step_size_min, hi = <floating>a.step_size_max
    cdef floating one = 1, zero = 0  # (typed: Cython's literals are doubles)
    cdef floating gi, x, f, si, sg
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        # torch: sign(grad * prev) -> etaplus, etaminus or 1 (torch.sign of NaN is 0)
        x = gi * prev[i]
        f = etaplus if x > 0 else (etaminus if x < 0 else one)
        # step_size * factor, clamped to [min, max] (NaN stays NaN, as torch.clamp)
        si = ss[i] * f
        if si < lo:
            si = lo
        if si > hi:
            si = hi
        ss[i] = si
        # where the sign flipped (the factor is etaminus) the gradient counts as zero
        if f == etaminus:
            gi = zero
        prev[i] = gi
        sg = <floating>(gi > 0) - <floating>(gi < 0)
        p[i] = p[i] + (-sg) * si


cdef int _rprop_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                        Py_ssize_t first) noexcept nogil:
    cdef const RpropArgs* a = <const RpropArgs*>args
    if a.storage == STORE_F64:
        _rprop_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                    <double*>ptrs[3], n, a)
    else:
        _rprop_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                    <float*>ptrs[3], n, a)
    return 0


_register("rprop", ("etaminus", "etaplus", "step_size_min", "step_size_max", "maximize"),
          _rprop_segment, _rprop_prepare, MIN_PER_THREAD_RPROP, sizeof(RpropHyper),
          sizeof(RpropArgs))
