# Updates from outside torch.optim: Lion (Chen et al., 2023), ADOPT (Taniguchi et al., 2024).
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call); ADOPT adds a second pass for caution (_register_passes, see its section).

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
#
# caution=True scales the step by the mean of a mask over the whole tensor (timm: mask =
# [m g > 0], m the new exp_avg; the step is m * mask / max(mean(mask), 1e-3), the stored
# exp_avg unmasked), so ADOPT is registered as a two-pass update (_register_passes): pass 1
# counts each block's kept elements, the between function turns each tensor's count into its
# factor, pass 2 is the update. Without caution, and at the first step (which only fills v),
# pass 1 is the whole update, the loop of a one-pass ADOPT.
#
# Memory traffic per element (float32 bytes; float64 twice that): the plain step reads p, g,
# m, v and writes p, m, v: 28 bytes (Adam's). With caution, pass 1 reads g, m, v (12 bytes;
# p too, 16, with coupled decay, which enters g) and writes nothing; pass 2 is the plain step:
# 40 bytes in all (44 with coupled decay). The first step reads g, v (p with coupled decay)
# and writes v, with or without caution. Half-precision buffers go through the tile driver,
# whose read-only pass also writes back the (unchanged) half values of the rows other than
# the grads.

cdef enum:
    # ADOPT's slots per block: caution's count of kept elements, then the per-tensor factor
    # 1 / max(count / numel, 1e-3) the between function writes into every block of a tensor.
    ADOPT_COUNT = 0
    ADOPT_CM = 1
    ADOPT_SLOTS = 2

cdef struct AdoptHyper:
    double beta1
    double beta2
    double eps
    double clip_exp  # NaN: no clipping
    double weight_decay
    double decoupled
    double corrected_weight_decay
    double caution
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
    bint caution
    bint fused  # pass 1 is the whole step: no caution, or the first step (no m, no mask)


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
    a.caution = h.caution != 0
    a.fused = not a.caution or a.first_step


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
                             Py_ssize_t n, const AdoptArgs* a, floating cm, bint small_w,
                             bint coupled, bint decoupled, bint cautious) noexcept nogil:
    # ``small_w``, ``coupled``, ``decoupled`` and ``cautious`` arrive as constants (see
    # _adopt_typed). ``cm``: caution's factor for this tensor (read only when ``cautious``).
    cdef floating gf = <floating>a.grad_factor, wd = <floating>a.weight_decay
    cdef floating neg_decay = <floating>a.neg_decay, eps = <floating>a.eps
    cdef floating hi = <floating>a.bound
    cdef floating lo = -hi
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    cdef floating neg_lr = <floating>a.neg_lr
    cdef floating zero = 0
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
        if cautious:
            # timm: exp_avg * mask, the mask 1/max(mean, 1e-3) where m g > 0, else 0 (so a
            # NaN or infinite m still gives NaN, as its product with 0 does in timm)
            mi = mi * (cm if mi * gi > 0 else zero)
        p[i] = pi + neg_lr * mi
        v[i] = vi * beta2 + (omb2 * gi) * gi


cdef inline double _adopt_count_loop(const floating* p, const floating* g, const floating* m,
                                     const floating* v, Py_ssize_t n, const AdoptArgs* a,
                                     bint small_w, bint coupled) noexcept nogil:
    # Caution's pass 1: each element's new m by _adopt_loop's operations (so bitwise the m
    # pass 2 computes), and the number of elements where it agrees in sign with g; nothing is
    # written. The 0s and 1s go a tile at a time into a local array that _sumsq adds up (the
    # sum of their squares is the count, exact in double): both loops vectorise in every
    # build, where an integer count of float64 compares did not in the SSE2 one.
    cdef floating gf = <floating>a.grad_factor, wd = <floating>a.weight_decay
    cdef floating eps = <floating>a.eps
    cdef floating hi = <floating>a.bound
    cdef floating lo = -hi
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating zero = 0, one = 1
    cdef floating kept[SUM_TILE]
    cdef floating gi, mi, d, ni
    cdef double count = 0
    cdef Py_ssize_t i, k, start = 0, size
    while start < n:
        size = n - start if n - start < SUM_TILE else SUM_TILE
        for k in range(size):
            i = start + k
            gi = gf * g[i]
            if coupled:
                gi = gi + wd * p[i]
            d = _sqrt(v[i])
            if d < eps:
                d = eps
            ni = gi / d
            if ni > hi:
                ni = hi
            if ni < lo:
                ni = lo
            mi = _lerp(m[i], ni, w, omw, small_w)
            kept[k] = one if mi * gi > 0 else zero
        count += _sumsq(kept, size)
        start += size
    return count


cdef inline void _adopt_steps(floating* p, const floating* g, floating* m, floating* v,
                              Py_ssize_t n, const AdoptArgs* a, floating cm,
                              bint cautious) noexcept nogil:
    # The update loop's variants, each its own branch-free loop.
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    if small_w:
        if a.coupled:
            _adopt_loop(p, g, m, v, n, a, cm, True, True, False, cautious)
        elif a.decoupled:
            _adopt_loop(p, g, m, v, n, a, cm, True, False, True, cautious)
        else:
            _adopt_loop(p, g, m, v, n, a, cm, True, False, False, cautious)
    elif a.coupled:
        _adopt_loop(p, g, m, v, n, a, cm, False, True, False, cautious)
    elif a.decoupled:
        _adopt_loop(p, g, m, v, n, a, cm, False, False, True, cautious)
    else:
        _adopt_loop(p, g, m, v, n, a, cm, False, False, False, cautious)


cdef inline void _adopt_typed(floating* p, const floating* g, floating* m, floating* v,
                              Py_ssize_t n, const AdoptArgs* a, double* acc,
                              bint last) noexcept nogil:
    # ``last``: the pass after the between function (caution's pass 2), which reads the factor.
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    if a.first_step:
        if a.coupled:
            _adopt_first_loop(p, g, v, n, a, True)
        else:
            _adopt_first_loop(p, g, v, n, a, False)
    elif a.fused:
        _adopt_steps(p, g, m, v, n, a, 1, False)
    elif last:
        _adopt_steps(p, g, m, v, n, a, <floating>acc[ADOPT_CM], True)
    elif small_w:
        if a.coupled:
            acc[ADOPT_COUNT] += _adopt_count_loop(p, g, m, v, n, a, True, True)
        else:
            acc[ADOPT_COUNT] += _adopt_count_loop(p, g, m, v, n, a, True, False)
    elif a.coupled:
        acc[ADOPT_COUNT] += _adopt_count_loop(p, g, m, v, n, a, False, True)
    else:
        acc[ADOPT_COUNT] += _adopt_count_loop(p, g, m, v, n, a, False, False)


cdef inline void _adopt_stage(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                              bint last) noexcept nogil:
    cdef const AdoptArgs* a = <const AdoptArgs*>args
    if a.storage == STORE_F64:
        _adopt_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                     <double*>ptrs[3], n, a, acc, last)
    else:
        _adopt_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                     <float*>ptrs[3], n, a, acc, last)


cdef int _adopt_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                        Py_ssize_t first) noexcept nogil:
    # Pass 1: the whole step (fused), or caution's count.
    _adopt_stage(ptrs, n, args, acc, False)
    return 0


cdef int _adopt_apply_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                              Py_ssize_t first) noexcept nogil:
    # Caution's pass 2: the step, with the factor the between function wrote.
    _adopt_stage(ptrs, n, args, acc, True)
    return 0


cdef int _adopt_between(double* slots, Py_ssize_t nslots, const Py_ssize_t* blockbase,
                        const Py_ssize_t* offsets, Py_ssize_t ntensors, int done,
                        void* args) noexcept nogil:
    # After caution's count: each tensor's factor, from its count summed over its blocks
    # (exact: whole numbers), in the tensor's precision as timm takes the mean.
    cdef AdoptArgs* a = <AdoptArgs*>args
    cdef Py_ssize_t k, b0, b1
    cdef double count, n, value
    if done != 0 or a.fused:
        return 0
    for k in range(ntensors):
        b0 = blockbase[k]
        b1 = blockbase[k + 1]
        count = _tensor_sum(slots, nslots, b0, b1, ADOPT_COUNT)
        n = <double>(offsets[k + 1] - offsets[k])
        if a.storage == STORE_F64:
            value = _mask_factor(<double>count, <double>n)
        else:
            value = _mask_factor(<float>count, <float>n)
        _tensor_set(slots, nslots, b0, b1, ADOPT_CM, value)
    return 1


_register("adopt", ("beta1", "beta2", "eps", "clip_exp", "weight_decay", "decoupled",
                    "corrected_weight_decay", "caution", "maximize", "max_lr"),
          _adopt_segment, _adopt_prepare, MIN_PER_THREAD_ADOPT, sizeof(AdoptHyper),
          sizeof(AdoptArgs))
_register_passes("adopt", _adopt_apply_segment, NULL, _adopt_between, ADOPT_SLOTS)
