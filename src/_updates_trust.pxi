# Per-tensor trust ratios: LAMB and LARS (a norm pass per tensor, then the update).
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call), plus a second registry entry (_register_passes, in _updates.pxi) naming
# its further passes and the "between passes" function that turns the per-tensor sums of one
# pass into the per-tensor factors the next one reads. Plan runs the passes with the block
# driver of _partition.pxi: every pass is one parallel region over all tensors of the plan, and
# the per-tensor sums are bitwise the same for any number of threads.
#
# Memory traffic per element (float32 bytes; float64 twice that), the floor a bench can state:
#   LAMB   pass 1 reads p, g, m, v and writes the new m, v (24 bytes); pass 2 reads p, m, v and
#          writes p (16 bytes): 40 bytes in all (10 accesses). caution adds a pass between them
#          that reads p, g, m, v (16 bytes), and its last pass reads g too: 60. max_grad_norm
#          adds a read of g before pass 1 (4 bytes). With weight_decay 0 and neither
#          always_adapt nor caution there is no ratio: one pass of 28 bytes (Adam's traffic).
#          When a buffer is of a half type (the tile driver), passes before the last write
#          nothing and each pass computes m and v again from the old values: 44 bytes.
#   LARS   pass 1 reads p, g (8 bytes); pass 2 reads p, g, momentum_buffer and writes p and
#          the buffer (20 bytes): 28 bytes in all (20 without momentum). Without a ratio
#          (weight_decay 0, always_adapt off) it is momentum SGD in one pass: 20 bytes (12
#          without momentum).
#   Half-precision buffers go through the tile driver, whose read-only passes also write back
#   the (unchanged) half values of the rows other than the grads.

# --------------------------------------------------------------------------------------------
# LAMB (timm's Lamb, its single-tensor formulas)
# --------------------------------------------------------------------------------------------

cdef enum:
    MIN_PER_THREAD_LAMB = 4096
    MIN_PER_THREAD_LARS = 16384
    # LAMB's slots per block: sum p^2, sum u^2, caution's count of agreeing signs, and the
    # per-tensor factors: caution's 1/mean(mask), the trust ratio.
    LAMB_SP = 0
    LAMB_SU = 1
    LAMB_COUNT = 2
    LAMB_CM = 3
    LAMB_TR = 4
    LAMB_SLOTS = 5

cdef struct LambHyper:
    double bias_correction
    double beta1
    double beta2
    double eps
    double weight_decay
    double grad_averaging
    double max_grad_norm  # 0: no clipping (None)
    double trust_clip
    double always_adapt
    double caution
    double decoupled_decay
    double corrected_weight_decay
    double max_lr  # 0: none

cdef struct LambArgs:
    int storage
    double grad_factor  # 1/grad_scale
    double clip  # the grads' divisor, max(global norm / max_grad_norm, 1)
    double beta1
    double beta2
    double beta3
    double bc1
    double bc2_sqrt
    double eps
    double weight_decay
    double decay  # the decoupled decay's factor, -wd_scale * weight_decay
    double neg_lr
    bint clipping
    bint lerp  # beta3 == 1 - beta1: the first moment is a lerp
    bint coupled
    bint decoupled
    bint adapt  # the trust ratio applies (weight_decay != 0 or always_adapt)
    bint trust_clip
    bint caution
    bint fused  # no per-tensor factor: pass 1 is the whole update
    # (not fused) the first pass writes the new m and v and the later ones read them: every
    # pass then writes or reads state once, and the last reads g only for caution. Not when
    # the buffers go through the mixed-type tiles, which would round m and v in between.
    bint stored


cdef void _lamb_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef LambHyper h
    cdef LambArgs* a = <LambArgs*>out
    cdef double wd_scale, norm
    memcpy(&h, hyper, sizeof(LambHyper))
    a.storage = s.storage
    a.grad_factor = s.inv_scale
    a.clipping = h.max_grad_norm > 0
    a.clip = 1.0
    if a.clipping:
        # timm: (global norm / max_grad_norm).clamp_(min=1) (NaN stays NaN)
        norm = sqrt(s.grad_sumsq)  # (the grads were scaled before they were squared)
        a.clip = norm / h.max_grad_norm
        if a.clip < 1.0:
            a.clip = 1.0
    a.beta1 = h.beta1
    a.beta2 = h.beta2
    a.beta3 = 1.0 - h.beta1 if h.grad_averaging != 0 else 1.0
    a.lerp = a.beta3 == 1.0 - h.beta1
    if h.bias_correction != 0:
        a.bc1 = 1.0 - pow(h.beta1, <double>s.step)
        a.bc2_sqrt = sqrt(1.0 - pow(h.beta2, <double>s.step))
    else:
        a.bc1 = 1.0
        a.bc2_sqrt = 1.0
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    wd_scale = s.lr
    if h.corrected_weight_decay != 0 and h.max_lr > 0:
        wd_scale = s.lr * s.lr / h.max_lr
    a.decay = -wd_scale * h.weight_decay
    a.neg_lr = -s.lr
    a.decoupled = h.weight_decay != 0 and h.decoupled_decay != 0
    a.coupled = h.weight_decay != 0 and h.decoupled_decay == 0
    a.adapt = h.weight_decay != 0 or h.always_adapt != 0
    a.trust_clip = h.trust_clip != 0
    a.caution = h.caution != 0
    a.fused = not a.adapt and not a.caution
    a.stored = not a.fused and not s.tiled


cdef inline floating _lamb_grad(const floating* g, Py_ssize_t i, floating f, floating clip,
                                bint clipping) noexcept nogil:
    cdef floating gi = f * g[i]
    if clipping:
        gi = gi / clip
    return gi


cdef inline floating _lamb_dir(floating mi, floating vi, floating bc1, floating bc2s,
                               floating eps) noexcept nogil:
    """timm: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)."""
    return (mi / bc1) / (_sqrt(vi) / bc2s + eps)


cdef enum:
    # What a LAMB pass does with each element's update (passed as constants, one loop each).
    LAMB_SUMS = 0  # pass 1: sum p^2, and sum u^2 or caution's count
    LAMB_CAUTION = 1  # pass 2 of 3: sum u^2 of the cautious update
    LAMB_APPLY = 2  # the last pass (the only one without factors): write m, v and p


# The element loops' switches as types: each combination of a fused ``lerp_k`` and
# ``decay_k`` (and of ``floating``) is compiled by Cython as a function of its own, with the
# other branches left out, so every loop is branch-free whatever gcc inlines.
cdef struct LerpSmall:  # m <- lerp(m, g, 1 - beta1), torch.lerp's form for a weight < 0.5
    char unused
cdef struct LerpLarge:  # its form for a weight >= 0.5
    char unused
cdef struct LerpNone:  # m <- beta1 m + beta3 g (grad_averaging=False)
    char unused
cdef struct DecayNone:
    char unused
cdef struct DecayCoupled:  # u <- u + wd p
    char unused
cdef struct DecayDecoupled:  # p <- p + decay p, before the norms
    char unused

ctypedef fused lerp_k:
    LerpSmall
    LerpLarge
    LerpNone

ctypedef fused decay_k:
    DecayNone
    DecayCoupled
    DecayDecoupled

# Where the last pass takes m and v from (and whether it reads g), and whether the passes
# before it store m and v (``LambArgs.stored``).
cdef struct FromGrads:  # computes them from g and the old values, and writes them
    char unused
cdef struct FromState:  # reads the new values a sums pass stored; g unread
    char unused
cdef struct FromStateMasked:  # reads them, and g for caution's mask
    char unused
cdef struct StoreOff:
    char unused
cdef struct StoreOn:
    char unused

ctypedef fused src_k:
    FromGrads
    FromState
    FromStateMasked

ctypedef fused store_k:
    StoreOff
    StoreOn


cdef void _lamb_apply_loop(floating* p, const floating* g, floating* m, floating* v,
                           Py_ssize_t n, const LambArgs* a, const double* acc, lerp_k lk,
                           decay_k dk, src_k sk) noexcept nogil:
    # The last pass: the step. FromGrads (the fused one-pass update, or after sums passes
    # that stored nothing) computes m and v from g and writes m, v and p; after a sums pass
    # that stored them it reads the new m and v (bitwise what it would compute again) and
    # writes p alone, reading g only for caution's mask. Caution's mask multiplies by cm or 0
    # (FromGrads without caution: by 1 or 1, exact); the trust ratio is 1 without adaptation
    # (exact too).
    cdef floating f = <floating>a.grad_factor
    cdef floating clip = <floating>a.clip if a.clipping else 1
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta1 = <floating>a.beta1, beta3 = <floating>a.beta3
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    cdef floating bc1 = <floating>a.bc1, bc2s = <floating>a.bc2_sqrt, eps = <floating>a.eps
    cdef floating wd = <floating>a.weight_decay, decay = <floating>a.decay
    cdef floating neg_lr = <floating>a.neg_lr
    cdef floating cm = <floating>acc[LAMB_CM] if a.caution else 1
    cdef floating off = 0 if a.caution else 1
    cdef floating tr = <floating>acc[LAMB_TR] if a.adapt else 1
    cdef floating gi, mi, vi, pi, ui
    cdef Py_ssize_t i
    for i in range(n):
        if src_k is FromGrads:
            gi = (f * g[i]) / clip
            if lerp_k is LerpSmall:
                mi = _lerp(m[i], gi, w, omw, True)
            elif lerp_k is LerpLarge:
                mi = _lerp(m[i], gi, w, omw, False)
            else:
                mi = m[i] * beta1 + beta3 * gi
            vi = v[i] * beta2 + (omb2 * gi) * gi
        else:
            mi = m[i]
            vi = v[i]
        pi = p[i]
        if decay_k is DecayDecoupled:
            pi = pi + decay * pi
        # timm: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)
        ui = (mi / bc1) / (_sqrt(vi) / bc2s + eps)
        if src_k is FromGrads:
            ui = ui * (cm if ui * gi > 0 else off)
        elif src_k is FromStateMasked:
            gi = (f * g[i]) / clip
            ui = ui * (cm if ui * gi > 0 else off)
        if decay_k is DecayCoupled:
            ui = ui + wd * pi
        if src_k is FromGrads:
            m[i] = mi
            v[i] = vi
        p[i] = pi + neg_lr * (ui * tr)


cdef struct SumsPlain:  # pass 1 without caution: sum p^2, sum u^2
    char unused
cdef struct SumsCount:  # pass 1 with caution: sum p^2, the count of agreeing signs
    char unused
cdef struct SumsMasked:  # caution's pass 2 of 3: sum u^2 of the masked update
    char unused

ctypedef fused sums_k:
    SumsPlain
    SumsCount
    SumsMasked


cdef void _lamb_sums_loop(const floating* p, const floating* g, floating* m, floating* v,
                          Py_ssize_t n, const LambArgs* a, double* acc, sums_k sk, lerp_k lk,
                          decay_k dk, store_k tk) noexcept nogil:
    # The passes before the last: the element's update by _lamb_apply_loop's operations (so
    # bitwise its values), a tile at a time into local arrays, whose squares are then summed (a
    # count is the sum of the squares of 0s and 1s). With ``a.stored`` the first pass also
    # writes the new m and v, which the later passes read instead of computing them again.
    cdef floating f = <floating>a.grad_factor
    cdef floating clip = <floating>a.clip if a.clipping else 1
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta1 = <floating>a.beta1, beta3 = <floating>a.beta3
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    cdef floating bc1 = <floating>a.bc1, bc2s = <floating>a.bc2_sqrt, eps = <floating>a.eps
    cdef floating wd = <floating>a.weight_decay, decay = <floating>a.decay
    cdef floating cm = <floating>acc[LAMB_CM], zero = 0, one = 1
    cdef floating pt[SUM_TILE]
    cdef floating ut[SUM_TILE]
    cdef double sp = 0, su = 0
    cdef floating gi, mi, vi, pi, ui
    cdef Py_ssize_t i, k, start = 0, count
    while start < n:
        count = n - start if n - start < SUM_TILE else SUM_TILE
        for k in range(count):
            i = start + k
            gi = (f * g[i]) / clip
            if sums_k is SumsMasked and store_k is StoreOn:
                mi = m[i]
                vi = v[i]
            else:
                if lerp_k is LerpSmall:
                    mi = _lerp(m[i], gi, w, omw, True)
                elif lerp_k is LerpLarge:
                    mi = _lerp(m[i], gi, w, omw, False)
                else:
                    mi = m[i] * beta1 + beta3 * gi
                vi = v[i] * beta2 + (omb2 * gi) * gi
                if sums_k is not SumsMasked and store_k is StoreOn:
                    m[i] = mi
                    v[i] = vi
            pi = p[i]
            if decay_k is DecayDecoupled:
                pi = pi + decay * pi
            ui = (mi / bc1) / (_sqrt(vi) / bc2s + eps)
            pt[k] = pi
            if sums_k is SumsCount:
                ut[k] = one if ui * gi > 0 else zero
            else:
                if sums_k is SumsMasked:
                    ui = ui * (cm if ui * gi > 0 else zero)
                if decay_k is DecayCoupled:
                    ui = ui + wd * pi
                ut[k] = ui
        if sums_k is not SumsMasked:
            sp += _sumsq(pt, count)
        su += _sumsq(ut, count)
        start += count
    if sums_k is SumsPlain:
        acc[LAMB_SP] += sp
        acc[LAMB_SU] += su
    elif sums_k is SumsCount:
        acc[LAMB_SP] += sp
        acc[LAMB_COUNT] += su
    else:
        acc[LAMB_SU] += su


cdef inline void _lamb_sums(floating* p, const floating* g, floating* m, floating* v,
                            Py_ssize_t n, const LambArgs* a, double* acc, int stage,
                            lerp_k lk, decay_k dk, store_k tk) noexcept nogil:
    cdef SumsPlain plain
    cdef SumsCount count
    cdef SumsMasked masked
    if stage == LAMB_CAUTION:
        _lamb_sums_loop(p, g, m, v, n, a, acc, masked, lk, dk, tk)
    elif a.caution:
        _lamb_sums_loop(p, g, m, v, n, a, acc, count, lk, dk, tk)
    else:
        _lamb_sums_loop(p, g, m, v, n, a, acc, plain, lk, dk, tk)


cdef inline void _lamb_run(floating* p, const floating* g, floating* m, floating* v,
                           Py_ssize_t n, const LambArgs* a, double* acc, int stage, lerp_k lk,
                           decay_k dk) noexcept nogil:
    cdef FromGrads grads
    cdef FromState state
    cdef FromStateMasked masked
    cdef StoreOff off
    cdef StoreOn on
    if stage == LAMB_APPLY:
        if not a.stored:
            _lamb_apply_loop(p, g, m, v, n, a, acc, lk, dk, grads)
        elif a.caution:
            _lamb_apply_loop(p, g, m, v, n, a, acc, lk, dk, masked)
        else:
            _lamb_apply_loop(p, g, m, v, n, a, acc, lk, dk, state)
    elif a.stored:
        _lamb_sums(p, g, m, v, n, a, acc, stage, lk, dk, on)
    else:
        _lamb_sums(p, g, m, v, n, a, acc, stage, lk, dk, off)


cdef inline void _lamb_decay(floating* p, const floating* g, floating* m, floating* v,
                             Py_ssize_t n, const LambArgs* a, double* acc, int stage,
                             lerp_k lk) noexcept nogil:
    cdef DecayNone none
    cdef DecayCoupled coupled
    cdef DecayDecoupled decoupled
    if a.coupled:
        _lamb_run(p, g, m, v, n, a, acc, stage, lk, coupled)
    elif a.decoupled:
        _lamb_run(p, g, m, v, n, a, acc, stage, lk, decoupled)
    else:
        _lamb_run(p, g, m, v, n, a, acc, stage, lk, none)


cdef inline void _lamb_typed(floating* p, const floating* g, floating* m, floating* v,
                             Py_ssize_t n, const LambArgs* a, double* acc,
                             int stage) noexcept nogil:
    cdef LerpSmall small
    cdef LerpLarge large
    cdef LerpNone plain
    if not a.lerp:
        _lamb_decay(p, g, m, v, n, a, acc, stage, plain)
    elif <floating>(1.0 - a.beta1) < 0.5:
        _lamb_decay(p, g, m, v, n, a, acc, stage, small)
    else:
        _lamb_decay(p, g, m, v, n, a, acc, stage, large)


cdef inline void _lamb_stage(char** ptrs, Py_ssize_t n, const LambArgs* a, double* acc,
                             int stage) noexcept nogil:
    if a.storage == STORE_F64:
        _lamb_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                    <double*>ptrs[3], n, a, acc, stage)
    else:
        _lamb_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                    <float*>ptrs[3], n, a, acc, stage)


cdef int _lamb_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                       Py_ssize_t first) noexcept nogil:
    # Pass 1: the sums, or, without per-tensor factors, the whole update.
    cdef const LambArgs* a = <const LambArgs*>args
    if a.fused:
        _lamb_stage(ptrs, n, a, acc, LAMB_APPLY)
    else:
        _lamb_stage(ptrs, n, a, acc, LAMB_SUMS)
    return 0


cdef int _lamb_caution_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                               Py_ssize_t first) noexcept nogil:
    _lamb_stage(ptrs, n, <const LambArgs*>args, acc, LAMB_CAUTION)
    return 0


cdef int _lamb_apply_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                             Py_ssize_t first) noexcept nogil:
    _lamb_stage(ptrs, n, <const LambArgs*>args, acc, LAMB_APPLY)
    return 0


cdef inline floating _lamb_ratio(floating w, floating u, bint clip) noexcept nogil:
    """timm's _lamb_trust_ratio: ||p|| / ||u||, 1 unless both are > 0, at most 1 (clip)."""
    cdef floating one = 1
    cdef floating r = w / u
    if not (w > 0) or not (u > 0):
        r = one
    if clip and r > one:
        r = one
    return r


cdef int _lamb_between(double* slots, Py_ssize_t nslots, const Py_ssize_t* blockbase,
                       const Py_ssize_t* offsets, Py_ssize_t ntensors, int done,
                       void* args) noexcept nogil:
    cdef LambArgs* a = <LambArgs*>args
    cdef Py_ssize_t k, b0, b1
    cdef double w, u, value, n
    cdef bint f64 = a.storage == STORE_F64
    if done == 0 and a.fused:
        return 0
    if done == 2:
        return 0
    for k in range(ntensors):
        b0 = blockbase[k]
        b1 = blockbase[k + 1]
        if done == 0 and a.caution:
            value = _tensor_sum(slots, nslots, b0, b1, LAMB_COUNT)
            n = <double>(offsets[k + 1] - offsets[k])
            if f64:
                value = _mask_factor(<double>value, <double>n)
            else:
                value = _mask_factor(<float>value, <float>n)
            _tensor_set(slots, nslots, b0, b1, LAMB_CM, value)
        if a.adapt and (done == 1 or not a.caution):
            w = sqrt(_tensor_sum(slots, nslots, b0, b1, LAMB_SP))
            u = sqrt(_tensor_sum(slots, nslots, b0, b1, LAMB_SU))
            if f64:
                value = _lamb_ratio(<double>w, <double>u, a.trust_clip)
            else:
                value = _lamb_ratio(<float>w, <float>u, a.trust_clip)
            _tensor_set(slots, nslots, b0, b1, LAMB_TR, value)
        elif not a.adapt:
            _tensor_set(slots, nslots, b0, b1, LAMB_TR, 1.0)
    if done == 0 and a.caution and a.adapt:
        return 1
    return 2


_register("lamb", ("bias_correction", "beta1", "beta2", "eps", "weight_decay", "grad_averaging",
                   "max_grad_norm", "trust_clip", "always_adapt", "caution", "decoupled_decay",
                   "corrected_weight_decay", "max_lr"),
          _lamb_segment, _lamb_prepare, MIN_PER_THREAD_LAMB, sizeof(LambHyper), sizeof(LambArgs))
_register_passes("lamb", _lamb_caution_segment, _lamb_apply_segment, _lamb_between, LAMB_SLOTS,
                 "max_grad_norm")


# --------------------------------------------------------------------------------------------
# LARS (timm's Lars, its single-tensor formulas)
# --------------------------------------------------------------------------------------------

cdef enum:
    # LARS's slots per block: sum p^2, sum g^2, and the per-tensor trust ratio.
    LARS_SP = 0
    LARS_SG = 1
    LARS_TR = 2
    LARS_SLOTS = 3

cdef struct LarsHyper:
    double momentum
    double dampening
    double weight_decay
    double nesterov
    double trust_coeff
    double eps
    double trust_clip
    double always_adapt

cdef struct LarsArgs:
    int storage
    double grad_factor  # 1/grad_scale
    double neg_lr
    double lr
    double weight_decay
    double momentum
    double one_minus_dampening
    double trust_coeff
    double eps
    bint nesterov
    bint first_step
    bint adapt
    bint trust_clip


cdef void _lars_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef LarsHyper h
    cdef LarsArgs* a = <LarsArgs*>out
    memcpy(&h, hyper, sizeof(LarsHyper))
    a.storage = s.storage
    a.grad_factor = s.inv_scale
    a.neg_lr = -s.lr
    a.lr = s.lr
    a.weight_decay = h.weight_decay
    a.momentum = h.momentum
    a.one_minus_dampening = 1.0 - h.dampening
    a.trust_coeff = h.trust_coeff
    a.eps = h.eps
    a.nesterov = h.nesterov != 0
    # The momentum buffer starts as the first (adapted) gradient.
    a.first_step = s.step == 1
    a.adapt = h.weight_decay != 0 or h.always_adapt != 0
    a.trust_clip = h.trust_clip != 0


cdef inline void _lars_norms_loop(const floating* p, const floating* g, Py_ssize_t n,
                                  const LarsArgs* a, double* acc) noexcept nogil:
    # sum p^2 and sum (g / grad_scale)^2 in double, a tile of each array in turn (_sumsq's
    # loop vectorises over one array; alternating tiles keeps both streams in flight, which
    # a read-only pass needs to approach the bandwidth of one that writes).
    cdef floating f = <floating>a.grad_factor
    cdef double sp = 0, sg = 0
    cdef Py_ssize_t start = 0, count
    while start < n:
        count = n - start if n - start < SUM_TILE else SUM_TILE
        sp += _sumsq(p + start, count)
        sg += _sumsq_scaled(g + start, count, f)
        start += count
    acc[LARS_SP] += sp
    acc[LARS_SG] += sg


cdef inline void _lars_loop(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                            const LarsArgs* a, floating tr, bint adapt,
                            bint has_mom) noexcept nogil:
    cdef floating f = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, mom = <floating>a.momentum
    cdef floating omd = <floating>a.one_minus_dampening, neg_lr = <floating>a.neg_lr
    cdef bint first = a.first_step, nesterov = a.nesterov
    cdef floating gi, bi
    cdef Py_ssize_t i
    for i in range(n):
        gi = f * g[i]
        if adapt:
            gi = (gi + wd * p[i]) * tr
        if has_mom:
            if first:
                bi = gi
            else:
                bi = buf[i] * mom + omd * gi
            buf[i] = bi
            if nesterov:
                gi = gi + mom * bi
            else:
                gi = bi
        p[i] = p[i] + neg_lr * gi


cdef inline void _lars_typed(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                             const LarsArgs* a, double* acc, bint last) noexcept nogil:
    cdef floating tr = <floating>acc[LARS_TR]
    if not last and a.adapt:
        _lars_norms_loop(p, g, n, a, acc)
    elif a.adapt:
        if a.momentum != 0:
            _lars_loop(p, g, buf, n, a, tr, True, True)
        else:
            _lars_loop(p, g, buf, n, a, tr, True, False)
    elif a.momentum != 0:
        _lars_loop(p, g, buf, n, a, tr, False, True)
    else:
        _lars_loop(p, g, buf, n, a, tr, False, False)


cdef int _lars_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                       Py_ssize_t first) noexcept nogil:
    # Pass 1: the norms, or, without a trust ratio, the whole update.
    cdef const LarsArgs* a = <const LarsArgs*>args
    if a.storage == STORE_F64:
        _lars_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a, acc,
                    False)
    else:
        _lars_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a, acc, False)
    return 0


cdef int _lars_apply_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                             Py_ssize_t first) noexcept nogil:
    cdef const LarsArgs* a = <const LarsArgs*>args
    if a.storage == STORE_F64:
        _lars_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a, acc,
                    True)
    else:
        _lars_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a, acc, True)
    return 0


cdef inline floating _lars_ratio(floating w, floating g, floating coeff, floating wd,
                                 floating eps, floating lr, bint clip) noexcept nogil:
    """timm's _lars_trust_ratio, in the tensor's precision."""
    cdef floating one = 1
    cdef floating r = coeff * w / (g + w * wd + eps)
    if not (w > 0) or not (g > 0):
        r = one
    if clip:
        r = r / lr
        if r > one:
            r = one
    return r


cdef int _lars_between(double* slots, Py_ssize_t nslots, const Py_ssize_t* blockbase,
                       const Py_ssize_t* offsets, Py_ssize_t ntensors, int done,
                       void* args) noexcept nogil:
    cdef LarsArgs* a = <LarsArgs*>args
    cdef Py_ssize_t k, b0, b1
    cdef double w, g, value
    if done != 0 or not a.adapt:
        return 0
    for k in range(ntensors):
        b0 = blockbase[k]
        b1 = blockbase[k + 1]
        w = sqrt(_tensor_sum(slots, nslots, b0, b1, LARS_SP))
        g = sqrt(_tensor_sum(slots, nslots, b0, b1, LARS_SG))
        if a.storage == STORE_F64:
            value = _lars_ratio(<double>w, <double>g, <double>a.trust_coeff,
                                <double>a.weight_decay, <double>a.eps, <double>a.lr,
                                a.trust_clip)
        else:
            value = _lars_ratio(<float>w, <float>g, <float>a.trust_coeff,
                                <float>a.weight_decay, <float>a.eps, <float>a.lr, a.trust_clip)
        _tensor_set(slots, nslots, b0, b1, LARS_TR, value)
    return 1


_register("lars", ("momentum", "dampening", "weight_decay", "nesterov", "trust_coeff", "eps",
                   "trust_clip", "always_adapt"),
          _lars_segment, _lars_prepare, MIN_PER_THREAD_LARS, sizeof(LarsHyper),
          sizeof(LarsArgs))
_register_passes("lars", _lars_apply_segment, NULL, _lars_between, LARS_SLOTS)
