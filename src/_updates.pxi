# The optimizer updates. Each is four pieces, in this order:
#
#   <Name>Hyper     its hyper-parameters as the Python layer passes them: one double each, in
#                   the order of the names given to _register (lrfast/_specs.py reads that
#                   order from UPDATE_ARGS, so the two cannot drift apart; booleans are 0 or 1)
#   <Name>Args      what the element loop reads, derived once per step by ``_<name>_prepare``
#                   from the hyper-parameters and the step's values (lr, step, grad scale)
#   _<name>_loop    the element loop, written once over the storage and math types
#   _<name>_segment the loop's specialisations, picked by the storage code
#
# and one _register call that puts them in the table ``Plan`` runs from (_plans.pxi); an update
# with per-tensor factors adds a _register_passes call (the multi-pass registry, below).

# --------------------------------------------------------------------------------------------
# Element helpers
# --------------------------------------------------------------------------------------------

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _lerp(floating start, floating end, floating w, floating one_minus_w,
                           bint small_w) noexcept nogil:
    """torch.lerp: start + w*(end-start) for |w| < 0.5, else end - (end-start)*(1-w)."""
    if small_w:
        return start + w * (end - start)
    return end - (end - start) * one_minus_w


cdef inline double _lanes_sum(const double* s) noexcept nogil:
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


cdef inline double _sumsq_scaled(const floating* x, Py_ssize_t n, floating f) noexcept nogil:
    """sum (f x)^2 in double (f x rounded in x's precision): eight running sums, lane i % 8,
    combined in a fixed order (they vectorise; one loop summing two arrays does not)."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, d
    cdef Py_ssize_t i, m = n - n % 8
    for i in range(0, m, 8):
        d = f * x[i]
        s0 += d * d
        d = f * x[i + 1]
        s1 += d * d
        d = f * x[i + 2]
        s2 += d * d
        d = f * x[i + 3]
        s3 += d * d
        d = f * x[i + 4]
        s4 += d * d
        d = f * x[i + 5]
        s5 += d * d
        d = f * x[i + 6]
        s6 += d * d
        d = f * x[i + 7]
        s7 += d * d
    for i in range(m, n):
        d = f * x[i]
        s0 += d * d
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


cdef enum:
    # A loop that sums the squares of values it computes writes a tile of them to a local
    # array, then _sumsq adds them: both loops vectorise, where one fused loop would not.
    SUM_TILE = 256


cdef inline double _sumsq(const floating* x, Py_ssize_t n) noexcept nogil:
    """sum x^2 in double, eight running sums combined in a fixed order (they vectorise)."""
    return _sumsq_scaled(x, n, <floating>1)


# --------------------------------------------------------------------------------------------
# The registry of updates
# --------------------------------------------------------------------------------------------

cdef enum:
    MAX_UPDATES = 32
    MAX_HYPER = 16
    MAX_SCALARS = 4
    # Room, in doubles, for any update's prepared arguments (checked by _register).
    ARG_BLOCK = 32

# The values of one step that every update may use.
cdef struct StepValues:
    double lr
    long long step  # the 1-based number of this update
    double inv_scale  # 1/grad_scale: the factor the grads are multiplied by
    int storage  # the math type the loop runs in: STORE_F32 or STORE_F64
    # Values the Python layer derives each step from scalar state it keeps (NAdam's
    # mu_product, ASGD's eta and mu, schedule-free's averaging weight), in the order of the
    # names given to _register (UPDATE_SCALARS); unused by most updates.
    double scalars[MAX_SCALARS]
    # The sum of the squares of all the step's grads, each times inv_scale first (every plan
    # of the optimizer), for the updates that clip by the global norm (LAMB), else 0.
    double grad_sumsq
    # The buffers go through the mixed-type tiles (some are not of the math type), where a
    # pass's writes are rounded to their storage type: a multi-pass update must not read in
    # one pass what an earlier one wrote.
    bint tiled

ctypedef void (*prepare_fn)(void* out, const double* hyper,
                            const StepValues* s) noexcept nogil

cdef struct UpdateKernel:
    segment_fn segment
    fast_fn fast  # fused loops for some mixed-type combinations, or NULL
    prepare_fn prepare
    Py_ssize_t min_per_thread
    int nhyper
    int nscalars

cdef UpdateKernel _UPDATES[MAX_UPDATES]
cdef int _num_updates = 0

# {update: its index in the table}, {update: names of its hyper-parameters, in order},
# {update: names of its per-step scalars (StepValues.scalars), in order}.
# Every update has a float32 and a float64 loop; other element types run through the float32
# loop (_storage.pxi), so there is no per-update list of storages.
UPDATE_IDS = {}
UPDATE_ARGS = {}
UPDATE_SCALARS = {}

cdef int _register(str name, tuple args, segment_fn segment, prepare_fn prepare,
                   Py_ssize_t min_per_thread, size_t hyper_size, size_t args_size,
                   fast_fn fast=NULL, tuple scalars=()) except -1:
    global _num_updates
    if _num_updates == MAX_UPDATES or len(args) > MAX_HYPER or len(scalars) > MAX_SCALARS:
        raise SystemError(f"update {name!r}: the registry is full")
    if hyper_size != len(args) * sizeof(double):
        raise SystemError(f"update {name!r}: its Hyper struct does not hold the {len(args)} "
                          "doubles its names say")
    if args_size > ARG_BLOCK * sizeof(double):
        raise SystemError(f"update {name!r}: its Args struct exceeds ARG_BLOCK")
    _UPDATES[_num_updates].segment = segment
    _UPDATES[_num_updates].fast = fast
    _UPDATES[_num_updates].prepare = prepare
    _UPDATES[_num_updates].min_per_thread = min_per_thread
    _UPDATES[_num_updates].nhyper = len(args)
    _UPDATES[_num_updates].nscalars = len(scalars)
    UPDATE_IDS[name] = _num_updates
    UPDATE_ARGS[name] = args
    UPDATE_SCALARS[name] = scalars
    _MIN_PER_THREAD[name] = min_per_thread
    _num_updates += 1
    return 0


# --------------------------------------------------------------------------------------------
# The registry of multi-pass updates
# --------------------------------------------------------------------------------------------
#
# An update that scales each tensor by a factor made from a reduction over that tensor (LAMB's
# and LARS's trust ratios, the cautious mask's mean of LAMB and ADOPT) registers, after its
# _register call, its further passes and the "between passes" function that turns the
# per-tensor sums of one pass into the factors the next one reads (_register_passes). Plan runs
# such an update with the block driver of _partition.pxi, pass after pass; its first pass is
# the registry's segment, which may also be the whole update when a step needs no factor.
# Defined here, with the one-pass registry, so that any family's file can register passes.

cdef enum:
    MAX_PASSES = 3

# After pass ``done`` has run, combine the per-block sums into per-tensor values (in block
# order), write the per-tensor factors into every block's slots, and return the next pass to
# run (0: the update is complete). ``offsets``: the tensors' prefix sums; ``args``: the
# update's prepared arguments, which it may read and change.
ctypedef int (*between_fn)(double* slots, Py_ssize_t nslots, const Py_ssize_t* blockbase,
                           const Py_ssize_t* offsets, Py_ssize_t ntensors, int done,
                           void* args) noexcept nogil

cdef struct MultiPass:
    int npasses  # 0: a one-pass update (the plain drivers run it)
    segment_fn passes[MAX_PASSES]  # passes[0] is the registry's segment
    between_fn between
    Py_ssize_t nslots  # doubles per block
    # The hyper-parameter (index into Plan.hyper) that, when > 0, makes the update read
    # StepValues.grad_sumsq (the global norm of the grads: LAMB's max_grad_norm), or -1.
    int sumsq_hyper

cdef MultiPass _PASSES[MAX_UPDATES]

# {update: (passes at most, the hyper-parameter that turns on its clipping by the global grad
# norm, or None)}
PASS_UPDATES = {}


cdef int _register_passes(str name, segment_fn second, segment_fn third, between_fn between,
                          Py_ssize_t nslots, str sumsq_hyper=None) except -1:
    cdef int u = UPDATE_IDS[name]
    _PASSES[u].npasses = 3 if third != NULL else 2
    _PASSES[u].passes[0] = _UPDATES[u].segment
    _PASSES[u].passes[1] = second
    _PASSES[u].passes[2] = third
    _PASSES[u].between = between
    _PASSES[u].nslots = nslots
    _PASSES[u].sumsq_hyper = -1 if sumsq_hyper is None else UPDATE_ARGS[name].index(sumsq_hyper)
    PASS_UPDATES[name] = (_PASSES[u].npasses, sumsq_hyper)
    return 0


# What between functions share: per-tensor sums and factors over the blocks' slots, and the
# cautious mask's factor.

cdef inline double _tensor_sum(const double* slots, Py_ssize_t nslots, Py_ssize_t b0,
                               Py_ssize_t b1, int j) noexcept nogil:
    """Slot ``j`` summed over blocks [b0, b1), in block order."""
    cdef double s = 0
    cdef Py_ssize_t b
    for b in range(b0, b1):
        s += slots[b * nslots + j]
    return s


cdef inline void _tensor_set(double* slots, Py_ssize_t nslots, Py_ssize_t b0, Py_ssize_t b1,
                             int j, double value) noexcept nogil:
    cdef Py_ssize_t b
    for b in range(b0, b1):
        slots[b * nslots + j] = value


cdef inline floating _mask_factor(floating count, floating n) noexcept nogil:
    """Caution's 1 / max(mean(mask), 1e-3), in the tensor's precision (timm's
    mask.div_(mask.mean().clamp_(min=1e-3)), from the count of kept elements)."""
    cdef floating mean = count / n
    cdef floating floor = <floating>1e-3
    cdef floating one = 1
    if mean < floor:
        mean = floor
    return one / mean


# Below this many elements per thread a second thread costs more than it saves. The cheaper the
# update per element, the more elements it takes to pay for waking a second thread. Measured
# with bench/thresholds.py on a 2-core x86-64 (float32; float64 has twice the bytes per element,
# so the same counts are on the safe side): 2 threads win from ~8k elements for Adam, ~16k for
# Adagrad and RMSprop, ~64k for plain SGD.
cdef enum:
    MIN_PER_THREAD_SGD = 32768
    MIN_PER_THREAD_ADAGRAD = 8192
    MIN_PER_THREAD_RMSPROP = 8192
    MIN_PER_THREAD_ADAM = 4096


# --------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------

cdef struct SGDHyper:
    double momentum
    double dampening
    double weight_decay
    double nesterov
    double maximize

cdef struct SGDArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double neg_lr
    double weight_decay
    double momentum
    double one_minus_dampening
    bint nesterov
    bint first_step


cdef void _sgd_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef SGDHyper h
    cdef SGDArgs* a = <SGDArgs*>out
    memcpy(&h, hyper, sizeof(SGDHyper))
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.neg_lr = -s.lr
    a.weight_decay = h.weight_decay
    a.momentum = h.momentum
    a.one_minus_dampening = 1.0 - h.dampening
    a.nesterov = h.nesterov != 0
    # torch starts the momentum buffer as the first gradient, without dampening.
    a.first_step = s.step == 1


cdef inline void _sgd_loop(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                           const SGDArgs* a, bint has_wd, bint has_mom) noexcept nogil:
    # ``has_wd`` and ``has_mom`` arrive as constants (see _sgd_typed), so each variant is its
    # own branch-free loop.
    # The gradient's factor: 1/grad_scale (unscaling, 1 by default: exact), negated to maximize.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, mom = <floating>a.momentum
    cdef floating omd = <floating>a.one_minus_dampening, neg_lr = <floating>a.neg_lr
    cdef bint first = a.first_step, nesterov = a.nesterov
    cdef floating gi, bi
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if has_wd:
            gi = gi + wd * p[i]
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


cdef inline void _sgd_typed(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                            const SGDArgs* a) noexcept nogil:
    if a.weight_decay != 0:
        if a.momentum != 0:
            _sgd_loop(p, g, buf, n, a, True, True)
        else:
            _sgd_loop(p, g, buf, n, a, True, False)
    elif a.momentum != 0:
        _sgd_loop(p, g, buf, n, a, False, True)
    else:
        _sgd_loop(p, g, buf, n, a, False, False)


cdef int _sgd_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                  Py_ssize_t first) noexcept nogil:
    cdef const SGDArgs* a = <const SGDArgs*>args
    if a.storage == STORE_F64:
        _sgd_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a)
    else:
        _sgd_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


_register("sgd", ("momentum", "dampening", "weight_decay", "nesterov", "maximize"),
          _sgd_segment, _sgd_prepare, MIN_PER_THREAD_SGD, sizeof(SGDHyper), sizeof(SGDArgs))


# --------------------------------------------------------------------------------------------
# Adagrad
# --------------------------------------------------------------------------------------------

cdef struct AdagradHyper:
    double lr_decay
    double weight_decay
    double eps
    double eps_inside_sqrt
    double maximize

cdef struct AdagradArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double neg_clr
    double weight_decay
    double eps
    bint eps_inside_sqrt


cdef void _adagrad_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef AdagradHyper h
    cdef AdagradArgs* a = <AdagradArgs*>out
    memcpy(&h, hyper, sizeof(AdagradHyper))
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.neg_clr = -(s.lr / (1.0 + (s.step - 1) * h.lr_decay))
    a.weight_decay = h.weight_decay
    a.eps = h.eps
    a.eps_inside_sqrt = h.eps_inside_sqrt != 0


cdef inline void _adagrad_loop(floating* p, const floating* g, floating* acc, Py_ssize_t n,
                               const AdagradArgs* a) noexcept nogil:
    # The gradient's factor: 1/grad_scale (unscaling, 1 by default: exact), negated to maximize.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, eps = <floating>a.eps
    cdef floating neg_clr = <floating>a.neg_clr
    cdef bint has_wd = a.weight_decay != 0, inside = a.eps_inside_sqrt
    cdef floating gi, si, std
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if has_wd:
            gi = gi + wd * p[i]
        si = acc[i] + gi * gi
        acc[i] = si
        if inside:
            std = _sqrt(si + eps)
        else:
            std = _sqrt(si) + eps
        p[i] = p[i] + (neg_clr * gi) / std


cdef int _adagrad_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                  Py_ssize_t first) noexcept nogil:
    cdef const AdagradArgs* a = <const AdagradArgs*>args
    if a.storage == STORE_F64:
        _adagrad_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a)
    else:
        _adagrad_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


_register("adagrad", ("lr_decay", "weight_decay", "eps", "eps_inside_sqrt", "maximize"),
          _adagrad_segment, _adagrad_prepare, MIN_PER_THREAD_ADAGRAD, sizeof(AdagradHyper),
          sizeof(AdagradArgs))


# --------------------------------------------------------------------------------------------
# RMSprop
# --------------------------------------------------------------------------------------------

cdef struct RMSpropHyper:
    double alpha
    double eps
    double weight_decay
    double momentum
    double centered
    double maximize

cdef struct RMSpropArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double neg_lr
    double alpha
    double eps
    double weight_decay
    double momentum
    bint centered


cdef void _rmsprop_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef RMSpropHyper h
    cdef RMSpropArgs* a = <RMSpropArgs*>out
    memcpy(&h, hyper, sizeof(RMSpropHyper))
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.neg_lr = -s.lr
    a.alpha = h.alpha
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    a.momentum = h.momentum
    a.centered = h.centered != 0


cdef inline void _rmsprop_loop(floating* p, const floating* g, floating* sq, floating* buf,
                               floating* gavg, Py_ssize_t n, const RMSpropArgs* a,
                               bint centered, bint has_mom) noexcept nogil:
    # ``centered`` and ``has_mom`` are passed as constants so that each of the four variants is
    # compiled as its own loop: gcc does not unswitch this many invariant branches by itself and
    # would leave the loop scalar.
    # The gradient's factor: 1/grad_scale (unscaling, 1 by default: exact), negated to maximize.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, eps = <floating>a.eps
    cdef floating alpha = <floating>a.alpha, neg_lr = <floating>a.neg_lr
    cdef floating mom = <floating>a.momentum
    # torch uses (1 - alpha) both as addcmul's value and as lerp's weight.
    cdef floating w = <floating>(1.0 - a.alpha)
    cdef floating omw = 1 - w
    cdef bint small_w = w < 0.5
    cdef bint has_wd = a.weight_decay != 0
    cdef floating gi, si, ai, avg
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * g[i]
        if has_wd:
            gi = gi + wd * p[i]
        si = sq[i] * alpha + (w * gi) * gi
        sq[i] = si
        if centered:
            ai = _lerp(gavg[i], gi, w, omw, small_w)
            gavg[i] = ai
            avg = _sqrt(si + (-ai) * ai) + eps
        else:
            avg = _sqrt(si) + eps
        if has_mom:
            ai = buf[i] * mom + gi / avg
            buf[i] = ai
            p[i] = p[i] + neg_lr * ai
        else:
            p[i] = p[i] + (neg_lr * gi) / avg


cdef inline void _rmsprop_typed(floating* p, const floating* g, floating* sq, floating* buf,
                                floating* gavg, Py_ssize_t n, const RMSpropArgs* a) noexcept nogil:
    cdef bint has_mom = a.momentum > 0
    if a.centered:
        if has_mom:
            _rmsprop_loop(p, g, sq, buf, gavg, n, a, True, True)
        else:
            _rmsprop_loop(p, g, sq, buf, gavg, n, a, True, False)
    elif has_mom:
        _rmsprop_loop(p, g, sq, buf, gavg, n, a, False, True)
    else:
        _rmsprop_loop(p, g, sq, buf, gavg, n, a, False, False)


cdef int _rmsprop_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                  Py_ssize_t first) noexcept nogil:
    cdef const RMSpropArgs* a = <const RMSpropArgs*>args
    if a.storage == STORE_F64:
        _rmsprop_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                       <double*>ptrs[3], <double*>ptrs[4], n, a)
    else:
        _rmsprop_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                       <float*>ptrs[3], <float*>ptrs[4], n, a)
    return 0


_register("rmsprop", ("alpha", "eps", "weight_decay", "momentum", "centered", "maximize"),
          _rmsprop_segment, _rmsprop_prepare, MIN_PER_THREAD_RMSPROP, sizeof(RMSpropHyper),
          sizeof(RMSpropArgs))


# --------------------------------------------------------------------------------------------
# Adam / AdamW
# --------------------------------------------------------------------------------------------

cdef struct AdamHyper:
    double beta1
    double beta2
    double eps
    double weight_decay
    double decoupled
    double amsgrad
    double maximize

cdef struct AdamArgs:
    int storage
    double grad_factor  # 1/grad_scale, negated when maximizing
    double beta1
    double beta2
    double eps
    double weight_decay
    double param_scale
    double neg_step_size
    double bc2_sqrt
    bint decoupled
    bint amsgrad


cdef void _adam_prepare(void* out, const double* hyper, const StepValues* s) noexcept nogil:
    cdef AdamHyper h
    cdef AdamArgs* a = <AdamArgs*>out
    memcpy(&h, hyper, sizeof(AdamHyper))
    # Bias corrections in double, from the 1-based step, as torch computes them.
    cdef double bc1 = 1.0 - pow(h.beta1, <double>s.step)
    cdef double bc2 = 1.0 - pow(h.beta2, <double>s.step)
    a.storage = s.storage
    a.grad_factor = -s.inv_scale if h.maximize != 0 else s.inv_scale
    a.beta1 = h.beta1
    a.beta2 = h.beta2
    a.eps = h.eps
    a.weight_decay = h.weight_decay
    a.param_scale = 1.0 - s.lr * h.weight_decay
    a.neg_step_size = -(s.lr / bc1)
    a.bc2_sqrt = sqrt(bc2)
    a.decoupled = h.decoupled != 0
    a.amsgrad = h.amsgrad != 0


cdef inline void _adam_loop(floating* p, const floating* g, floating* m, floating* v,
                            floating* vmax, Py_ssize_t n, const AdamArgs* a,
                            bint small_w, bint coupled, bint amsgrad) noexcept nogil:
    # ``small_w``, ``coupled`` and ``amsgrad`` arrive as constants (see _adam_typed), so each
    # variant is compiled as its own branch-free loop that gcc vectorises.
    # The gradient's factor: 1/grad_scale (unscaling, 1 by default: exact), negated to maximize.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay
    # Decoupled decay multiplies the param by 1 - lr*wd; otherwise by 1, which is exact.
    cdef floating scale = <floating>a.param_scale if a.decoupled else 1
    cdef floating w = <floating>(1.0 - a.beta1)
    cdef floating omw = 1 - w
    cdef floating beta2 = <floating>a.beta2, omb2 = <floating>(1.0 - a.beta2)
    # One division per element instead of two: torch's (-lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps)
    # equals (-lr sqrt(bc2)/bc1) m / (sqrt(v) + eps sqrt(bc2)), with both factors formed once in
    # double (Kingma and Ba's own "more efficient" ordering); it agrees with torch to rounding.
    cdef floating eps = <floating>(a.eps * a.bc2_sqrt)
    cdef floating neg_ss = <floating>(a.neg_step_size * a.bc2_sqrt)
    cdef floating gi, pi, mi, vi, vm
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
        if amsgrad:
            # torch.maximum: NaN if either is NaN (vi NaN stays; vm NaN is taken).
            vm = vmax[i]
            # (a bitwise | rather than ``or``: no branch, so the loop still vectorises)
            if (vm > vi) | (vm != vm):
                vi = vm
            vmax[i] = vi
        p[i] = pi + (neg_ss * mi) / (_sqrt(vi) + eps)


cdef inline void _adam_typed(floating* p, const floating* g, floating* m, floating* v,
                             floating* vmax, Py_ssize_t n, const AdamArgs* a) noexcept nogil:
    cdef bint small_w = <floating>(1.0 - a.beta1) < 0.5
    cdef bint coupled = a.weight_decay != 0 and not a.decoupled
    if small_w:
        if coupled:
            if a.amsgrad:
                _adam_loop(p, g, m, v, vmax, n, a, True, True, True)
            else:
                _adam_loop(p, g, m, v, vmax, n, a, True, True, False)
        elif a.amsgrad:
            _adam_loop(p, g, m, v, vmax, n, a, True, False, True)
        else:
            _adam_loop(p, g, m, v, vmax, n, a, True, False, False)
    elif coupled:
        if a.amsgrad:
            _adam_loop(p, g, m, v, vmax, n, a, False, True, True)
        else:
            _adam_loop(p, g, m, v, vmax, n, a, False, True, False)
    elif a.amsgrad:
        _adam_loop(p, g, m, v, vmax, n, a, False, False, True)
    else:
        _adam_loop(p, g, m, v, vmax, n, a, False, False, False)


cdef int _adam_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc,
                  Py_ssize_t first) noexcept nogil:
    cdef const AdamArgs* a = <const AdamArgs*>args
    if a.storage == STORE_F64:
        _adam_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                    <double*>ptrs[3], <double*>ptrs[4], n, a)
    else:
        _adam_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                    <float*>ptrs[3], <float*>ptrs[4], n, a)
    return 0


# Fused loops for the combinations of offloaded and half-precision training (round to nearest):
# bf16/fp16 params, grads and state; bf16/fp16 params with float32 state; float32 master
# weights with bf16/fp16 (or float32) grads and a bf16/fp16 copy written out. Each element is
# widened in registers, updated by the arithmetic of _adam_loop (bitwise the same), and rounded
# on its way out, so the step moves only the bytes the types need. Other combinations, AMSGrad
# and 1 - beta1 >= 0.5 run through the tiles.

cdef inline void _adam_fused_loop(param_t* p, const grad_t* g, state_t* m, state_t* v,
                                  out_t* out, Py_ssize_t n, const AdamArgs* a, bint coupled,
                                  bint has_out) noexcept nogil:
    cdef float sign = <float>a.grad_factor
    cdef float wd = <float>a.weight_decay
    cdef float scale = <float>a.param_scale if a.decoupled else 1
    cdef float w = <float>(1.0 - a.beta1)
    cdef float beta2 = <float>a.beta2, omb2 = <float>(1.0 - a.beta2)
    cdef float eps = <float>(a.eps * a.bc2_sqrt)
    cdef float neg_ss = <float>(a.neg_step_size * a.bc2_sqrt)
    cdef float gi, pi, mi, vi
    cdef Py_ssize_t i
    for i in range(n):
        gi = sign * _ld(g, i)
        pi = _ld(p, i) * scale
        if coupled:
            gi = gi + wd * pi
        mi = _ld(m, i)
        mi = mi + w * (gi - mi)
        _st(m, i, mi)
        vi = _ld(v, i) * beta2 + (omb2 * gi) * gi
        _st(v, i, vi)
        pi = pi + (neg_ss * mi) / (sqrtf(vi) + eps)
        _st(p, i, pi)
        if has_out:
            _st(out, i, pi)


cdef inline void _adam_fused(param_t* p, const grad_t* g, state_t* m, state_t* v, out_t* out,
                             Py_ssize_t n, const AdamArgs* a, bint has_out) noexcept nogil:
    if a.weight_decay != 0 and not a.decoupled:
        _adam_fused_loop(p, g, m, v, out, n, a, True, has_out)
    else:
        _adam_fused_loop(p, g, m, v, out, n, a, False, has_out)


cdef int _adam_fast(char** ptrs, Py_ssize_t n, const void* args, const int* types, int nrows,
                    int out_type) noexcept nogil:
    cdef const AdamArgs* a = <const AdamArgs*>args
    cdef int pt = types[0], gt = types[1], st = types[2]
    cdef char* o = ptrs[nrows] if out_type >= 0 else NULL
    if a.storage != STORE_F32 or a.amsgrad or not (<float>(1.0 - a.beta1) < 0.5) \
            or types[3] != st:
        return 0
    if out_type < 0:
        if pt == gt and pt == st and pt == STORE_BF16:
            _adam_fused(<bfloat16*>ptrs[0], <bfloat16*>ptrs[1], <bfloat16*>ptrs[2],
                        <bfloat16*>ptrs[3], <bfloat16*>o, n, a, False)
        elif pt == gt and pt == st and pt == STORE_F16:
            _adam_fused(<float16*>ptrs[0], <float16*>ptrs[1], <float16*>ptrs[2],
                        <float16*>ptrs[3], <bfloat16*>o, n, a, False)
        elif pt == gt and pt == STORE_BF16 and st == STORE_F32:
            _adam_fused(<bfloat16*>ptrs[0], <bfloat16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, False)
        elif pt == gt and pt == STORE_F16 and st == STORE_F32:
            _adam_fused(<float16*>ptrs[0], <float16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, False)
        elif pt == STORE_F32 and st == STORE_F32 and gt == STORE_BF16:
            _adam_fused(<float*>ptrs[0], <bfloat16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, False)
        elif pt == STORE_F32 and st == STORE_F32 and gt == STORE_F16:
            _adam_fused(<float*>ptrs[0], <float16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, False)
        else:
            return 0
        return 1
    if pt != STORE_F32 or st != STORE_F32:
        return 0
    if out_type == STORE_BF16:
        if gt == STORE_BF16:
            _adam_fused(<float*>ptrs[0], <bfloat16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, True)
        elif gt == STORE_F16:
            _adam_fused(<float*>ptrs[0], <float16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, True)
        else:
            _adam_fused(<float*>ptrs[0], <float*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <bfloat16*>o, n, a, True)
    else:
        if gt == STORE_BF16:
            _adam_fused(<float*>ptrs[0], <bfloat16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <float16*>o, n, a, True)
        elif gt == STORE_F16:
            _adam_fused(<float*>ptrs[0], <float16*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <float16*>o, n, a, True)
        else:
            _adam_fused(<float*>ptrs[0], <float*>ptrs[1], <float*>ptrs[2],
                        <float*>ptrs[3], <float16*>o, n, a, True)
    return 1


_register("adam", ("beta1", "beta2", "eps", "weight_decay", "decoupled", "amsgrad", "maximize"),
          _adam_segment, _adam_prepare, MIN_PER_THREAD_ADAM, sizeof(AdamHyper), sizeof(AdamArgs),
          _adam_fast)
