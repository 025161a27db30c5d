# Optimizer kernels: one native call updates every tensor of a step in one parallel region.
#
# This file is included by two extension modules compiled with different flags: _optim.pyx
# (the portable baseline, SSE2 on x86-64) and _optim_avx2.pyx (-mavx2, chosen at import on CPUs
# that have it; see lrfast/_dispatch.py). Both are built without FMA contraction, so the two give
# bitwise the same results.
#
# Layout shared by all optimizers
# --------------------------------
# A step works on N tensors, each with several buffers (param, grad, state...). The Python layer
# gathers, once per optimizer, a table of base addresses: ``table[b, k]`` is the address of
# buffer ``b`` of tensor ``k`` (row 0 param, row 1 grad, then the state buffers), and the prefix
# sums ``offsets[k]`` of the tensor sizes. The concatenation of all tensors is one index space
# [0, total) that is cut into one contiguous span per thread: small tensors are batched into one
# thread's span, large ones are split across threads, and there is a single parallel region per
# step. Every update is element-wise, so results do not depend on the number of threads.
#
# Arithmetic follows torch.optim's single-tensor formulas operation by operation (the order of
# multiplications, where eps goes, lerp for running averages, bias corrections in double) and is
# carried out in the tensor's own precision, so float32 results match torch to rounding.
#
# Validation happens before any kernel runs, in Python and in ``_gather`` below (with the GIL
# held, as part of a Plan's step): the kernels trust their inputs.

from cython cimport floating
from cython.parallel cimport prange
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport fabs, pow, sqrt, sqrtf
from libc.stdint cimport int64_t, intptr_t, uint32_t

from _fpenv cimport LRFAST_HAVE_FTZ, lrfast_ftz_enter, lrfast_ftz_leave
from _openmp_helpers cimport omp_get_max_threads

import numpy as np

cdef enum:
    # Thread spans start on multiples of this many elements, so threads do not share cache lines
    # of a tensor that they split.
    SPAN_ALIGN = 64
    MAX_BUFFERS = 8

# Below this many elements per thread a parallel region costs more than it saves. The cheaper
# the update per element, the more elements it takes to pay for waking a second thread. Measured
# with bench/thresholds.py on a 2-core x86-64 (float32; float64 has twice the bytes per element,
# so the same counts are on the safe side): 2 threads win from ~8k elements for Adam, ~16k for
# Adagrad and RMSprop, ~64k for plain SGD.
cdef enum:
    MIN_PER_THREAD_SGD = 32768
    MIN_PER_THREAD_ADAGRAD = 8192
    MIN_PER_THREAD_RMSPROP = 8192
    MIN_PER_THREAD_ADAM = 4096

# 0: each optimizer's measured default; > 0: one threshold for all (for measurements).
cdef Py_ssize_t _override_per_thread = 0


def get_min_elements_per_thread():
    """{optimizer: elements per thread below which a step runs on fewer threads}."""
    if _override_per_thread > 0:
        return {k: _override_per_thread for k in ("sgd", "adagrad", "rmsprop", "adam")}
    return {"sgd": MIN_PER_THREAD_SGD, "adagrad": MIN_PER_THREAD_ADAGRAD,
            "rmsprop": MIN_PER_THREAD_RMSPROP, "adam": MIN_PER_THREAD_ADAM}


def set_min_elements_per_thread(overrides):
    """Use one threshold for every optimizer (an int >= 1), or the defaults again (None).

    For measurements only: results do not depend on the number of threads.
    """
    global _override_per_thread
    if overrides is None:
        _override_per_thread = 0
        return
    if isinstance(overrides, dict):
        raise TypeError("pass one int for all optimizers, or None")
    if overrides < 1:
        raise ValueError("the threshold must be at least 1 element")
    _override_per_thread = overrides

# A segment function updates ``n`` elements of every buffer from the pointers ``ptrs``. It may
# fold a value into ``acc[0]`` (reductions) and returns a count that the drivers add up
# (the non-finite check); the optimizer updates return 0 and leave ``acc`` alone.
ctypedef int (*segment_fn)(char** ptrs, Py_ssize_t n, const void* args,
                           double* acc) noexcept nogil


# --------------------------------------------------------------------------------------------
# Work partition
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _split(Py_ssize_t total, int part, int nparts) noexcept nogil:
    """Start of span ``part`` of ``nparts`` over [0, total), aligned to SPAN_ALIGN."""
    if part >= nparts:
        return total
    cdef Py_ssize_t at = <Py_ssize_t>((<double>total * part) / nparts)
    return at - at % SPAN_ALIGN


cdef int _run_span(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                   const Py_ssize_t* offsets, Py_ssize_t ntensors, Py_ssize_t itemsize,
                   Py_ssize_t begin, Py_ssize_t end, const void* args,
                   double* acc) noexcept nogil:
    """Apply ``fn`` to the elements [begin, end) of the concatenated tensors, tensor by
    tensor in index order; return the sum of its counts."""
    cdef char* ptrs[MAX_BUFFERS]
    cdef Py_ssize_t lo_k = 0, hi_k = ntensors, mid, k, a, b, j
    cdef int count = 0
    if begin >= end:
        return 0
    # The last tensor that starts at or before ``begin``.
    while hi_k - lo_k > 1:
        mid = (lo_k + hi_k) // 2
        if offsets[mid] <= begin:
            lo_k = mid
        else:
            hi_k = mid
    k = lo_k
    while k < ntensors and offsets[k] < end:
        a = begin if begin > offsets[k] else offsets[k]
        b = end if end < offsets[k + 1] else offsets[k + 1]
        if b > a:
            for j in range(nbuf):
                ptrs[j] = <char*>table[j * ntensors + k] + (a - offsets[k]) * itemsize
            count += fn(ptrs, b - a, args, acc)
        k += 1
    return count


cdef int _run_span_env(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf,
                       const Py_ssize_t* offsets, Py_ssize_t ntensors, Py_ssize_t itemsize,
                       Py_ssize_t begin, Py_ssize_t end, const void* args,
                       bint ftz) noexcept nogil:
    """``_run_span`` with flush-to-zero on in this thread for its duration when ``ftz``."""
    cdef double unused = 0
    cdef unsigned long long saved
    cdef int count
    if not ftz:
        return _run_span(fn, table, nbuf, offsets, ntensors, itemsize, begin, end, args, &unused)
    saved = lrfast_ftz_enter()
    # ``fn`` is called through a pointer, so no floating-point work moves across these calls.
    count = _run_span(fn, table, nbuf, offsets, ntensors, itemsize, begin, end, args, &unused)
    lrfast_ftz_leave(saved)
    return count


cdef int _team_size(Py_ssize_t total, int nthreads, Py_ssize_t min_per_thread) noexcept nogil:
    """Threads worth starting for ``total`` elements: serial below the work threshold."""
    cdef Py_ssize_t useful
    if _override_per_thread > 0:
        min_per_thread = _override_per_thread
    useful = total // min_per_thread
    if useful < 1:
        useful = 1
    if nthreads < 1:
        nthreads = omp_get_max_threads()
    return <int>(useful if useful < nthreads else nthreads)


cdef int _run(segment_fn fn, const intptr_t* table, Py_ssize_t nbuf, const Py_ssize_t* offsets,
              Py_ssize_t ntensors, Py_ssize_t itemsize, int nthreads, Py_ssize_t min_per_thread,
              const void* args, bint ftz) noexcept nogil:
    """Run ``fn`` over all elements, one contiguous span per thread; return the summed counts."""
    cdef Py_ssize_t total = offsets[ntensors]
    cdef int team = _team_size(total, nthreads, min_per_thread), tid
    cdef int count = 0
    if team == 1:
        return _run_span_env(fn, table, nbuf, offsets, ntensors, itemsize, 0, total, args, ftz)
    for tid in prange(team, num_threads=team, schedule='static'):
        count += _run_span_env(fn, table, nbuf, offsets, ntensors, itemsize,
                               _split(total, tid, team), _split(total, tid + 1, team), args, ftz)
    return count


cdef int _launch(segment_fn fn, intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64,
                 int nthreads, Py_ssize_t min_per_thread, const void* args) except -1:
    cdef Py_ssize_t ntensors = table.shape[1]
    if table.shape[0] > MAX_BUFFERS:
        raise ValueError("too many buffers per tensor")
    if offsets.shape[0] != ntensors + 1:
        raise ValueError("offsets must have one entry more than the table has columns")
    if ntensors == 0:
        return 0
    with nogil:
        _run(fn, &table[0, 0], table.shape[0], &offsets[0], ntensors,
             8 if is64 else 4, nthreads, min_per_thread, args, False)
    return 0


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


# --------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------

cdef struct SGDArgs:
    bint is64
    double grad_factor  # 1/grad_scale, negated when maximizing
    double neg_lr
    double weight_decay
    double momentum
    double one_minus_dampening
    bint nesterov
    bint maximize
    bint first_step


cdef inline void _sgd_loop(floating* p, const floating* g, floating* buf, Py_ssize_t n,
                           const SGDArgs* a) noexcept nogil:
    # The gradient's factor: 1/grad_scale (unscaling, 1 by default: exact), negated to maximize.
    cdef floating sign = <floating>a.grad_factor
    cdef floating wd = <floating>a.weight_decay, mom = <floating>a.momentum
    cdef floating omd = <floating>a.one_minus_dampening, neg_lr = <floating>a.neg_lr
    cdef bint has_wd = a.weight_decay != 0, has_mom = a.momentum != 0
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


cdef int _sgd_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    cdef const SGDArgs* a = <const SGDArgs*>args
    if a.is64:
        _sgd_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a)
    else:
        _sgd_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


def sgd_step(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads, *,
             double lr, double momentum, double dampening, double weight_decay, bint nesterov,
             bint maximize, bint first_step):
    """SGD over the tensors of ``table`` (rows: param, grad, momentum_buffer)."""
    cdef SGDArgs a
    _sgd_args(&a, is64, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
              1.0)
    _launch(_sgd_segment, table, offsets, is64, nthreads, MIN_PER_THREAD_SGD, &a)


cdef inline void _sgd_args(SGDArgs* a, bint is64, double lr, double momentum, double dampening,
                           double weight_decay, bint nesterov, bint maximize,
                           bint first_step, double inv_scale) noexcept nogil:
    a.is64 = is64
    a.grad_factor = -inv_scale if maximize else inv_scale
    a.neg_lr = -lr
    a.weight_decay = weight_decay
    a.momentum = momentum
    a.one_minus_dampening = 1.0 - dampening
    a.nesterov = nesterov
    a.maximize = maximize
    a.first_step = first_step


# --------------------------------------------------------------------------------------------
# Adagrad
# --------------------------------------------------------------------------------------------

cdef struct AdagradArgs:
    bint is64
    double grad_factor  # 1/grad_scale, negated when maximizing
    double neg_clr
    double weight_decay
    double eps
    bint eps_inside_sqrt
    bint maximize


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


cdef int _adagrad_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    cdef const AdagradArgs* a = <const AdagradArgs*>args
    if a.is64:
        _adagrad_loop(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2], n, a)
    else:
        _adagrad_loop(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2], n, a)
    return 0


def adagrad_step(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads, *,
                 double lr, double lr_decay, double weight_decay, double eps,
                 bint eps_inside_sqrt, bint maximize, long long step):
    """Adagrad over the tensors of ``table`` (rows: param, grad, sum); ``step`` counts from 1."""
    cdef AdagradArgs a
    _adagrad_args(&a, is64, lr, lr_decay, weight_decay, eps, eps_inside_sqrt, maximize, step,
                  1.0)
    _launch(_adagrad_segment, table, offsets, is64, nthreads, MIN_PER_THREAD_ADAGRAD, &a)


cdef inline void _adagrad_args(AdagradArgs* a, bint is64, double lr, double lr_decay,
                               double weight_decay, double eps, bint eps_inside_sqrt,
                               bint maximize, long long step, double inv_scale) noexcept nogil:
    a.is64 = is64
    a.grad_factor = -inv_scale if maximize else inv_scale
    a.neg_clr = -(lr / (1.0 + (step - 1) * lr_decay))
    a.weight_decay = weight_decay
    a.eps = eps
    a.eps_inside_sqrt = eps_inside_sqrt
    a.maximize = maximize


# --------------------------------------------------------------------------------------------
# RMSprop
# --------------------------------------------------------------------------------------------

cdef struct RMSpropArgs:
    bint is64
    double grad_factor  # 1/grad_scale, negated when maximizing
    double neg_lr
    double alpha
    double eps
    double weight_decay
    double momentum
    bint centered
    bint maximize


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


cdef int _rmsprop_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    cdef const RMSpropArgs* a = <const RMSpropArgs*>args
    if a.is64:
        _rmsprop_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                       <double*>ptrs[3], <double*>ptrs[4], n, a)
    else:
        _rmsprop_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                       <float*>ptrs[3], <float*>ptrs[4], n, a)
    return 0


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


def rmsprop_step(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads, *,
                 double lr, double alpha, double eps, double weight_decay, double momentum,
                 bint centered, bint maximize):
    """RMSprop over ``table`` (rows: param, grad, square_avg, momentum_buffer, grad_avg)."""
    cdef RMSpropArgs a
    _rmsprop_args(&a, is64, lr, alpha, eps, weight_decay, momentum, centered, maximize, 1.0)
    _launch(_rmsprop_segment, table, offsets, is64, nthreads, MIN_PER_THREAD_RMSPROP, &a)


cdef inline void _rmsprop_args(RMSpropArgs* a, bint is64, double lr, double alpha, double eps,
                               double weight_decay, double momentum, bint centered,
                               bint maximize, double inv_scale) noexcept nogil:
    a.is64 = is64
    a.grad_factor = -inv_scale if maximize else inv_scale
    a.neg_lr = -lr
    a.alpha = alpha
    a.eps = eps
    a.weight_decay = weight_decay
    a.momentum = momentum
    a.centered = centered
    a.maximize = maximize


# --------------------------------------------------------------------------------------------
# Adam / AdamW
# --------------------------------------------------------------------------------------------

cdef struct AdamArgs:
    bint is64
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
    bint maximize


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


cdef int _adam_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    cdef const AdamArgs* a = <const AdamArgs*>args
    if a.is64:
        _adam_typed(<double*>ptrs[0], <const double*>ptrs[1], <double*>ptrs[2],
                    <double*>ptrs[3], <double*>ptrs[4], n, a)
    else:
        _adam_typed(<float*>ptrs[0], <const float*>ptrs[1], <float*>ptrs[2],
                    <float*>ptrs[3], <float*>ptrs[4], n, a)
    return 0


def adam_step(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads, *,
              double lr, double beta1, double beta2, double eps, double weight_decay,
              bint decoupled, bint amsgrad, bint maximize, long long step):
    """Adam/AdamW over ``table`` (rows: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq).

    ``step`` is the 1-based number of this update, used for the bias corrections.
    """
    cdef AdamArgs a
    _adam_args(&a, is64, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, step,
               1.0)
    _launch(_adam_segment, table, offsets, is64, nthreads, MIN_PER_THREAD_ADAM, &a)


cdef inline void _adam_args(AdamArgs* a, bint is64, double lr, double beta1, double beta2,
                            double eps, double weight_decay, bint decoupled, bint amsgrad,
                            bint maximize, long long step, double inv_scale) noexcept nogil:
    # Bias corrections in double, from the 1-based step, as torch computes them.
    cdef double bc1 = 1.0 - pow(beta1, <double>step)
    cdef double bc2 = 1.0 - pow(beta2, <double>step)
    a.is64 = is64
    a.grad_factor = -inv_scale if maximize else inv_scale
    a.beta1 = beta1
    a.beta2 = beta2
    a.eps = eps
    a.weight_decay = weight_decay
    a.param_scale = 1.0 - lr * weight_decay
    a.neg_step_size = -(lr / bc1)
    a.bc2_sqrt = sqrt(bc2)
    a.decoupled = decoupled
    a.amsgrad = amsgrad
    a.maximize = maximize




# --------------------------------------------------------------------------------------------
# Non-finite check: a read-only pass over the grads, before a step writes anything
# --------------------------------------------------------------------------------------------

cdef enum:
    STREAMS = 8

cdef struct FiniteArgs:
    bint is64
    double factor  # the factor the update multiplies the grads by (1/grad_scale)
    Py_ssize_t row  # which buffer of the table holds the grads


cdef inline int _finite_loop(const floating* g, Py_ssize_t n, floating factor) noexcept nogil:
    # For factor > 1 (grad_scale < 1) a finite grad may overflow once unscaled, so the product
    # is checked: |x| <= MAX is false for inf and NaN alike, and the AND keeps the loop
    # branch-free so that it vectorises.
    cdef floating big = DBL_MAX if floating is double else FLT_MAX
    cdef int ok = 1
    cdef Py_ssize_t i
    for i in range(n):
        ok = ok & (fabs(g[i] * factor) <= big)
    return ok


cdef inline int _finite_bits32(const uint32_t* g, Py_ssize_t n) noexcept nogil:
    # For factor <= 1 the product is finite exactly when the grad is. A float32 is NaN or
    # infinite exactly when its bits without the sign are >= those of inf, so the check is an
    # unsigned max over integers, which vectorises. The span is read as STREAMS interleaved
    # sub-ranges: one core fetches several streams faster than one.
    cdef uint32_t m[STREAMS]
    cdef uint32_t x, top = 0
    cdef Py_ssize_t i, q = n // STREAMS, j
    for j in range(STREAMS):
        m[j] = 0
    for i in range(q):
        for j in range(STREAMS):
            x = g[j * q + i] & 0x7fffffffu
            m[j] = x if x > m[j] else m[j]
    for i in range(STREAMS * q, n):
        x = g[i] & 0x7fffffffu
        top = x if x > top else top
    for j in range(STREAMS):
        top = m[j] if m[j] > top else top
    return top < 0x7f800000u


cdef inline int _finite_bits64(const int64_t* g, Py_ssize_t n) noexcept nogil:
    # The float64 form of _finite_bits32; the masked bits are >= 0, so a signed max serves.
    cdef int64_t m[STREAMS]
    cdef int64_t x, top = 0
    cdef Py_ssize_t i, q = n // STREAMS, j
    for j in range(STREAMS):
        m[j] = 0
    for i in range(q):
        for j in range(STREAMS):
            x = g[j * q + i] & 0x7fffffffffffffffLL
            m[j] = x if x > m[j] else m[j]
    for i in range(STREAMS * q, n):
        x = g[i] & 0x7fffffffffffffffLL
        top = x if x > top else top
    for j in range(STREAMS):
        top = m[j] if m[j] > top else top
    return top < 0x7ff0000000000000LL


cdef int _finite_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    """1 when a grad element of the segment (times the factor) is NaN or infinite, else 0."""
    cdef const FiniteArgs* a = <const FiniteArgs*>args
    if a.factor <= 1.0:
        if a.is64:
            return 1 - _finite_bits64(<const int64_t*>ptrs[a.row], n)
        return 1 - _finite_bits32(<const uint32_t*>ptrs[a.row], n)
    if a.is64:
        return 1 - _finite_loop(<const double*>ptrs[a.row], n, <double>a.factor)
    return 1 - _finite_loop(<const float*>ptrs[a.row], n, <float>a.factor)


# --------------------------------------------------------------------------------------------
# Global gradient norm (deterministic) and in-place scaling, for clip_grad_norm_
# --------------------------------------------------------------------------------------------
#
# The concatenated grads are cut into fixed blocks of NORM_BLOCK elements, whatever the number
# of threads. Each block's partial (a sum of |x|^p in double, or a max of |x|) is computed in a
# fixed order; the partials are then combined serially in block order. The result is therefore
# bitwise the same for any number of threads.

cdef enum:
    NORM_BLOCK = 4096
    NORM_SUMSQ = 0
    NORM_SUMABS = 1
    NORM_MAX = 2
    NORM_POW = 3

cdef struct NormArgs:
    bint is64
    int kind
    double p


cdef inline double _nan_max(double m, double x) noexcept nogil:
    """max that keeps NaN: once NaN, always NaN."""
    if x > m or x != x:
        return x
    return m


cdef inline double _norm_loop(const floating* x, Py_ssize_t n, int kind, double p) noexcept nogil:
    # Eight running sums (the SLP vectoriser packs them into vectors); fixed lane order.
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, d
    cdef Py_ssize_t i, m = n - n % 8
    if kind == NORM_MAX:
        for i in range(n):
            s0 = _nan_max(s0, fabs(<double>x[i]))
        return s0
    if kind == NORM_POW:
        for i in range(n):
            s0 += pow(fabs(<double>x[i]), p)
        return s0
    if kind == NORM_SUMABS:
        for i in range(0, m, 8):
            s0 += fabs(<double>x[i])
            s1 += fabs(<double>x[i + 1])
            s2 += fabs(<double>x[i + 2])
            s3 += fabs(<double>x[i + 3])
            s4 += fabs(<double>x[i + 4])
            s5 += fabs(<double>x[i + 5])
            s6 += fabs(<double>x[i + 6])
            s7 += fabs(<double>x[i + 7])
        for i in range(m, n):
            s0 += fabs(<double>x[i])
    else:
        for i in range(0, m, 8):
            d = x[i]
            s0 += d * d
            d = x[i + 1]
            s1 += d * d
            d = x[i + 2]
            s2 += d * d
            d = x[i + 3]
            s3 += d * d
            d = x[i + 4]
            s4 += d * d
            d = x[i + 5]
            s5 += d * d
            d = x[i + 6]
            s6 += d * d
            d = x[i + 7]
            s7 += d * d
        for i in range(m, n):
            d = x[i]
            s0 += d * d
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


cdef int _norm_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    cdef const NormArgs* a = <const NormArgs*>args
    cdef double part
    if a.is64:
        part = _norm_loop(<const double*>ptrs[0], n, a.kind, a.p)
    else:
        part = _norm_loop(<const float*>ptrs[0], n, a.kind, a.p)
    if a.kind == NORM_MAX:
        acc[0] = _nan_max(acc[0], part)
    else:
        acc[0] += part
    return 0


cdef struct ScaleArgs:
    bint is64
    double factor


cdef inline void _scale_loop(floating* x, Py_ssize_t n, floating c) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        x[i] = x[i] * c


cdef int _scale_segment(char** ptrs, Py_ssize_t n, const void* args, double* acc) noexcept nogil:
    cdef const ScaleArgs* a = <const ScaleArgs*>args
    if a.is64:
        _scale_loop(<double*>ptrs[0], n, <double>a.factor)
    else:
        _scale_loop(<float*>ptrs[0], n, <float>a.factor)
    return 0


NORM_BLOCK_SIZE = NORM_BLOCK


def norm_kind(double norm_type):
    """(kind, p) for a norm order: 2 and 1 have fast paths, inf is a max, other p > 0 use pow."""
    if norm_type == 2.0:
        return NORM_SUMSQ
    if norm_type == 1.0:
        return NORM_SUMABS
    if norm_type == float("inf"):
        return NORM_MAX
    return NORM_POW


def grad_norm_reduce(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads,
                     double norm_type, double[::1] partials):
    """sum |x|^p over all tensors of ``table`` (row 0), or max |x| when p is inf.

    ``partials`` is scratch with at least ``ceil(total / NORM_BLOCK)`` entries. The result does
    not depend on ``nthreads`` (see the section comment).
    """
    cdef NormArgs a
    cdef Py_ssize_t ntensors = table.shape[1], total, nblocks, blk, end
    cdef int team
    cdef double out = 0
    if offsets.shape[0] != ntensors + 1:
        raise ValueError("offsets must have one entry more than the table has columns")
    if ntensors == 0:
        return 0.0
    total = offsets[ntensors]
    nblocks = (total + NORM_BLOCK - 1) // NORM_BLOCK
    if partials.shape[0] < nblocks:
        raise ValueError(f"partials needs {nblocks} entries")
    a.is64 = is64
    a.kind = norm_kind(norm_type)
    a.p = norm_type
    team = _team_size(total, nthreads, MIN_PER_THREAD_ADAGRAD)
    with nogil:
        for blk in prange(nblocks, num_threads=team, schedule='static'):
            partials[blk] = 0
            end = (blk + 1) * NORM_BLOCK
            _run_span(_norm_segment, &table[0, 0], 1, &offsets[0], ntensors, 8 if is64 else 4,
                      blk * NORM_BLOCK, end if end < total else total, &a, &partials[blk])
        for blk in range(nblocks):
            if a.kind == NORM_MAX:
                out = _nan_max(out, partials[blk])
            else:
                out += partials[blk]
    return out


def scale_(intptr_t[:, ::1] table, Py_ssize_t[::1] offsets, bint is64, int nthreads,
           double factor):
    """x *= factor (rounded to the tensors' dtype) over all tensors of ``table`` (row 0)."""
    cdef ScaleArgs a
    a.is64 = is64
    a.factor = factor
    _launch(_scale_segment, table, offsets, is64, nthreads, MIN_PER_THREAD_SGD, &a)


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


def has_flush_to_zero():
    """Can the kernels' threads flush subnormals to zero on this CPU architecture?"""
    return bool(LRFAST_HAVE_FTZ)


# --------------------------------------------------------------------------------------------
# Bandwidth probe: the floor that memory-bound kernels are measured against
# --------------------------------------------------------------------------------------------

cdef void _triad_span(floating* a, const floating* b, const floating* c, floating s,
                      Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        a[i] = b[i] + s * c[i]


def triad(floating[::1] a, const floating[::1] b, const floating[::1] c, double s, int nthreads):
    """STREAM's triad ``a = b + s * c`` over contiguous spans, one per thread, as the optimizer
    kernels split their work. Per element it reads b and c and writes a, and the write also
    reads a's cache line first (write-allocate): 4 transfers of the element size."""
    cdef Py_ssize_t n = a.shape[0]
    cdef int team = nthreads if nthreads > 0 else omp_get_max_threads(), tid
    if b.shape[0] != n or c.shape[0] != n:
        raise ValueError("a, b and c must have the same length")
    if n == 0:
        return
    if team <= 1:
        with nogil:
            _triad_span(&a[0], &b[0], &c[0], <floating>s, n)
        return
    with nogil:
        for tid in prange(team, num_threads=team, schedule='static'):
            _triad_span(&a[0] + _split(n, tid, team), &b[0] + _split(n, tid, team),
                        &c[0] + _split(n, tid, team), <floating>s,
                        _split(n, tid + 1, team) - _split(n, tid, team))


# --------------------------------------------------------------------------------------------
# Per-step gathering of gradient addresses (GIL held, before any kernel runs)
# --------------------------------------------------------------------------------------------

# Codes returned by gather_grads; lrfast._validation turns them into messages.
GATHER_OK = 0
GATHER_NOT_ARRAY = 1
GATHER_DTYPE = 2
GATHER_SHAPE = 3
GATHER_NOT_CONTIGUOUS = 4
GATHER_OVERLAP = 5
GATHER_MISALIGNED = 6
# Not a gather error: Plan.step's verdict for a step skipped because a grad is not finite.
GATHER_NONFINITE = 7


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


def gather_grads(object grads, int typenum, Py_ssize_t[::1] ndims, Py_ssize_t[::1] dims,
                 intptr_t[::1] out, intptr_t[::1] wstart, intptr_t[::1] wend):
    """Check each grad and write its data address into ``out`` (see ``_gather``).

    Returns ``(GATHER_OK, -1)`` or ``(code, k)`` for the first bad grad.
    """
    cdef Py_ssize_t n = out.shape[0], nw = wstart.shape[0], k, code, total = 0, j
    if ndims.shape[0] != n or wend.shape[0] != nw or len(grads) != n:
        raise ValueError("ndims, out and grads must have one entry per tensor")
    for j in range(n):
        total += ndims[j]
    if dims.shape[0] != total:
        raise ValueError("dims must hold every dimension of every tensor")
    code = _gather(grads, typenum, &ndims[0] if n else NULL, &dims[0] if total else NULL,
                   &out[0] if n else NULL, n, &wstart[0] if nw else NULL,
                   &wend[0] if nw else NULL, nw, &k)
    return (code, k) if code else (GATHER_OK, -1)


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


def _debug_index(Py_ssize_t[::1] a, Py_ssize_t i):
    """a[i] through a typed memoryview: IndexError out of range in a bounds-checked
    (LRFAST_DEBUG_CYTHON=1) build; only for the test that shows the switch works."""
    return a[i]


# --------------------------------------------------------------------------------------------
# Step plans: an optimizer's per-step work in one call
# --------------------------------------------------------------------------------------------

cdef enum:
    PLAN_SGD = 0
    PLAN_ADAGRAD = 1
    PLAN_RMSPROP = 2
    PLAN_ADAM = 3

PLAN_KINDS = {"sgd": PLAN_SGD, "adagrad": PLAN_ADAGRAD, "rmsprop": PLAN_RMSPROP,
              "adam": PLAN_ADAM}

cdef intptr_t _no_range = 0


cdef class Plan:
    """One dtype's share of an optimizer step, held as C values: the address table, what each
    grad must look like, the memory the step writes, and the update's hyper-parameters. A step
    is then one call: check the grads, record their addresses, run the kernel.

    ``hyper`` / ``flags`` per kind: sgd (momentum, dampening, weight_decay) / (nesterov,
    maximize); adagrad (lr_decay, weight_decay, eps) / (eps_inside_sqrt, maximize); rmsprop
    (alpha, eps, weight_decay, momentum) / (centered, maximize); adam (beta1, beta2, eps,
    weight_decay) / (decoupled, amsgrad, maximize).
    """

    cdef object _keep
    cdef intptr_t* table
    cdef const Py_ssize_t* offsets
    cdef const Py_ssize_t* ndims
    cdef const Py_ssize_t* dims
    cdef const intptr_t* ws
    cdef const intptr_t* we
    cdef Py_ssize_t ntensors, nbuf, nw
    cdef int typenum, kind
    cdef bint is64
    cdef double hp[4]
    cdef bint fl[3]
    cdef bint check, ftz

    def __init__(self, str kind, cnp.ndarray table, cnp.ndarray offsets, bint is64, int typenum,
                 cnp.ndarray ndims, cnp.ndarray dims, cnp.ndarray wstart, cnp.ndarray wend):
        arrays = (table, offsets, ndims, dims, wstart, wend)
        for a in arrays:
            if a.dtype != np.intp or not a.flags.c_contiguous:
                raise ValueError("plan arrays must be C-contiguous np.intp arrays")
        if table.ndim != 2 or table.shape[1] < 1 or table.shape[0] > MAX_BUFFERS:
            raise ValueError("table must be (buffers, tensors) with at least one tensor")
        if offsets.shape[0] != table.shape[1] + 1 or ndims.shape[0] != table.shape[1]:
            raise ValueError("offsets and ndims must match the table's tensors")
        if dims.shape[0] != ndims.sum() or wstart.shape[0] != wend.shape[0]:
            raise ValueError("dims or written ranges are inconsistent")
        self.kind = PLAN_KINDS[kind]
        self._keep = arrays
        self.table = <intptr_t*>cnp.PyArray_DATA(table)
        self.offsets = <const Py_ssize_t*>cnp.PyArray_DATA(offsets)
        self.ndims = <const Py_ssize_t*>cnp.PyArray_DATA(ndims)
        self.dims = <const Py_ssize_t*>cnp.PyArray_DATA(dims) if dims.shape[0] else NULL
        self.nw = wstart.shape[0]
        self.ws = <const intptr_t*>cnp.PyArray_DATA(wstart) if self.nw else &_no_range
        self.we = <const intptr_t*>cnp.PyArray_DATA(wend) if self.nw else &_no_range
        self.ntensors = table.shape[1]
        self.nbuf = table.shape[0]
        self.is64 = is64
        self.typenum = typenum

    def set_hyper(self, hyper, flags):
        """Store the update's hyper-parameters (validated by the caller)."""
        cdef Py_ssize_t j
        for j in range(4):
            self.hp[j] = hyper[j] if j < len(hyper) else 0.0
        for j in range(3):
            self.fl[j] = flags[j] if j < len(flags) else False

    def set_options(self, bint skip_nonfinite, bint flush_subnormals):
        """``skip_nonfinite``: ``step`` checks the grads first and updates nothing when one is
        NaN or infinite. ``flush_subnormals``: the update runs with flush-to-zero on."""
        if flush_subnormals and not LRFAST_HAVE_FTZ:
            raise ValueError("flush_subnormals is not supported on this CPU architecture")
        self.check = skip_nonfinite
        self.ftz = flush_subnormals

    def gather(self, grads):
        """Check the grads and record their addresses: None, or (code, index) of the first bad."""
        cdef Py_ssize_t bad
        if len(grads) != self.ntensors:
            raise ValueError(f"expected {self.ntensors} grads, got {len(grads)}")
        cdef int code = _gather(grads, self.typenum, self.ndims, self.dims,
                                self.table + self.ntensors, self.ntensors, self.ws, self.we,
                                self.nw, &bad)
        return (code, bad) if code else None

    def all_finite(self, double inv_scale, int nthreads):
        """Are all recorded grads, times ``inv_scale``, finite?"""
        return self._all_finite(inv_scale, nthreads)

    def run(self, double lr, long long step, int nthreads, double inv_scale=1.0):
        """Run the update with the recorded grads (``step`` is 1-based), unconditionally."""
        self._run(lr, step, nthreads, inv_scale)

    def step(self, grads, double lr, long long step, int nthreads, double inv_scale=1.0):
        """``gather``, the non-finite check when enabled, then ``run``.

        Returns None when the step ran, ``(code, index)`` for a bad grad, and
        ``(GATHER_NONFINITE, -1)`` when it was skipped for a non-finite grad; in both of the
        latter cases nothing was written.
        """
        cdef Py_ssize_t bad
        if len(grads) != self.ntensors:
            raise ValueError(f"expected {self.ntensors} grads, got {len(grads)}")
        cdef int code = _gather(grads, self.typenum, self.ndims, self.dims,
                                self.table + self.ntensors, self.ntensors, self.ws, self.we,
                                self.nw, &bad)
        if code:
            return (code, bad)
        if self.check and not self._all_finite(inv_scale, nthreads):
            return (GATHER_NONFINITE, -1)
        self._run(lr, step, nthreads, inv_scale)
        return None

    cdef bint _all_finite(self, double inv_scale, int nthreads) noexcept:
        cdef FiniteArgs fa
        cdef int nbad
        fa.is64 = self.is64
        fa.factor = inv_scale
        fa.row = 1
        with nogil:
            nbad = _run(_finite_segment, self.table, self.nbuf, self.offsets, self.ntensors,
                        8 if self.is64 else 4, nthreads, MIN_PER_THREAD_ADAGRAD, &fa, False)
        return nbad == 0

    cdef void _run(self, double lr, long long step, int nthreads, double inv_scale) noexcept:
        cdef SGDArgs sgd
        cdef AdagradArgs adagrad
        cdef RMSpropArgs rms
        cdef AdamArgs adam
        cdef Py_ssize_t size = 8 if self.is64 else 4
        cdef bint ftz = self.ftz
        with nogil:
            if self.kind == PLAN_SGD:
                _sgd_args(&sgd, self.is64, lr, self.hp[0], self.hp[1], self.hp[2], self.fl[0],
                          self.fl[1], step == 1, inv_scale)
                _run(_sgd_segment, self.table, self.nbuf, self.offsets, self.ntensors, size,
                     nthreads, MIN_PER_THREAD_SGD, &sgd, ftz)
            elif self.kind == PLAN_ADAGRAD:
                _adagrad_args(&adagrad, self.is64, lr, self.hp[0], self.hp[1], self.hp[2],
                              self.fl[0], self.fl[1], step, inv_scale)
                _run(_adagrad_segment, self.table, self.nbuf, self.offsets, self.ntensors, size,
                     nthreads, MIN_PER_THREAD_ADAGRAD, &adagrad, ftz)
            elif self.kind == PLAN_RMSPROP:
                _rmsprop_args(&rms, self.is64, lr, self.hp[0], self.hp[1], self.hp[2],
                              self.hp[3], self.fl[0], self.fl[1], inv_scale)
                _run(_rmsprop_segment, self.table, self.nbuf, self.offsets, self.ntensors, size,
                     nthreads, MIN_PER_THREAD_RMSPROP, &rms, ftz)
            else:
                _adam_args(&adam, self.is64, lr, self.hp[0], self.hp[1], self.hp[2], self.hp[3],
                           self.fl[0], self.fl[1], self.fl[2], step, inv_scale)
                _run(_adam_segment, self.table, self.nbuf, self.offsets, self.ntensors, size,
                     nthreads, MIN_PER_THREAD_ADAM, &adam, ftz)
