# Learning-rate schedules as flat programs, evaluated in closed form.
#
# Included by _schedules.pyx (portable build) and _schedules_avx2.pyx (-mavx2), like the
# optimizer kernels; lrfast/_dispatch.py picks one at import. Neither fuses multiply-adds, so
# both compute the same bits.
#
# A schedule, however composed, is compiled once (in lrfast/schedules.py) into a flat array of
# nodes: each node is a closed-form formula of the step count or a combinator (join, product,
# clamp, plateau factor) that refers to other nodes by index. Evaluating it is a short recursion
# over that array in C: no Python per step, no recurrence that drifts. ``s(t)`` with an int takes
# the scalar path; ``s(steps)`` with an integer array runs the same evaluator over the array in
# an OpenMP ``prange``. All arithmetic is in double; step counts are int64.

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport ceil, cos, exp, floor, fmax, fmin, log, pow, sqrt, M_PI
from libc.stdint cimport int64_t, intptr_t

from _openmp_helpers cimport omp_get_max_threads

import numpy as np

cnp.import_array()

cdef enum Kind:
    CONST = 0
    EXPONENTIAL = 1
    NATURAL_EXP = 2
    INVERSE_TIME = 3
    POLYNOMIAL = 4
    COSINE = 5
    COSINE_RESTARTS = 6
    ONE_CYCLE = 7
    CYCLIC = 8
    PIECEWISE_CONSTANT = 9
    PIECEWISE_INTERP = 10
    INVERSE_SQRT = 11
    SQRT_DECAY = 12
    JOIN = 13
    PRODUCT = 14
    CLAMP = 15
    PLATEAU = 16
    NKINDS = 17

# Node kinds by name, for the Python builder.
KINDS = {
    "const": CONST, "exponential": EXPONENTIAL, "natural_exp": NATURAL_EXP,
    "inverse_time": INVERSE_TIME, "polynomial": POLYNOMIAL, "cosine": COSINE,
    "cosine_restarts": COSINE_RESTARTS, "one_cycle": ONE_CYCLE, "cyclic": CYCLIC,
    "piecewise_constant": PIECEWISE_CONSTANT, "piecewise_interp": PIECEWISE_INTERP,
    "inverse_sqrt": INVERSE_SQRT, "sqrt_decay": SQRT_DECAY, "join": JOIN, "product": PRODUCT,
    "clamp": CLAMP, "plateau": PLATEAU,
}
cdef enum:
    NIP = 4   # integer parameters per node
    NFP = 6   # float parameters per node

N_INT_PARAMS = NIP
N_FLOAT_PARAMS = NFP

# Vector calls below this many steps stay on one thread.
cdef Py_ssize_t MIN_STEPS_PER_THREAD = 4096


cdef struct Program:
    const int* kind
    const int64_t* ip      # NIP per node
    const double* fp       # NFP per node
    const int64_t* ibuf    # boundaries, child lists, flags
    const double* fbuf     # values


cdef struct PlateauFactor:
    double scale           # multiplies the wrapped schedule
    double min_lr          # floor on the product while scale < 1
    double max_lr          # ceiling on the product while scale > 1


cdef extern from *:
    """
    /* sin(pi v) for 0 <= v <= 1/2: its Taylor series to the v^23 term (the next term is below
       6e-21), coefficients (-1)^k pi^(2k+1) / (2k+1)! rounded to double, evaluated in z = v^2
       by Estrin's scheme (short dependency chains; the terms fall fast, so the error stays
       about 1 ulp). Forced inline so that loops over blocks of steps vectorise. */
    #if defined(__GNUC__)
    #define LRFAST_ALWAYS_INLINE static inline __attribute__((always_inline))
    #else
    #define LRFAST_ALWAYS_INLINE static __forceinline
    #endif
    LRFAST_ALWAYS_INLINE double lrfast_sinpi(double v) {
        double z = v * v, z2 = z * z, z4 = z2 * z2, z8 = z4 * z4;
        double q0 = (3.141592653589793 + -5.16771278004997 * z)
                    + z2 * (2.5501640398773455 + -0.5992645293207921 * z);
        double q1 = (0.08214588661112823 + -0.0073704309457143504 * z)
                    + z2 * (0.00046630280576761255 + -2.1915353447830217e-05 * z);
        double q2 = (7.952054001475513e-07 + -2.2948428997269873e-08 * z)
                    + z2 * (5.392664662608129e-10 + -1.0518471716932065e-11 * z);
        return v * ((q0 + z4 * q1) + z8 * q2);
    }
    /* (1 + cos(pi f)) / 2 for 0 <= f <= 2, as cos(pi f / 2)^2 = sin(pi (1 - f) / 2)^2 with
       exact folding (2 - f is exact here), so it keeps full relative precision near 0 where
       1 + cos would cancel. No branch: loops over blocks vectorise. */
    LRFAST_ALWAYS_INLINE double lrfast_half_cosine(double f) {
        double x = f > 1.0 ? 2.0 - f : f;
        double c = lrfast_sinpi(0.5 - 0.5 * x);
        return c * c;
    }
    /* (double)s for 0 <= s < 2^52, without the int64 -> double instruction that SSE2 and AVX2
       lack in vector form: 2^52 + s has s as its mantissa bits, and subtracting 2^52 is exact. */
    LRFAST_ALWAYS_INLINE double lrfast_small_i2d(int64_t s) {
        union { int64_t i; double d; } bits;
        bits.i = s | (int64_t)0x4330000000000000LL;
        return bits.d - 4503599627370496.0;
    }
    """
    double _half_cosine "lrfast_half_cosine"(double frac) noexcept nogil
    double _small_i2d "lrfast_small_i2d"(int64_t s) noexcept nogil


cdef inline double _anneal(double start, double end, double pct, int64_t cosine) noexcept nogil:
    """torch OneCycleLR's annealing from ``start`` to ``end`` as ``pct`` goes 0 -> 1."""
    if cosine:
        return end + (start - end) / 2.0 * (1.0 + cos(M_PI * pct))
    return (end - start) * pct + start


cdef inline double _restart_start(int64_t period, double mult, int64_t k) noexcept nogil:
    """First step of restart period ``k`` when period lengths grow by ``mult``."""
    return <double>period * (pow(mult, <double>k) - 1.0) / (mult - 1.0)


cdef Py_ssize_t _upper_bound(const int64_t* b, Py_ssize_t n, int64_t t, bint strict) noexcept nogil:
    """How many boundaries ``t`` has passed: #{b <= t}, or #{b < t} when ``strict``."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if (b[mid] < t) if strict else (b[mid] <= t):
            lo = mid + 1
        else:
            hi = mid
    return lo


# Each closed-form kind is an inline function of (node parameters, step); the scalar evaluator
# and the block evaluator below both call them, so the two paths compute the same bits.

cdef inline double _at_const(const Program* P, const int64_t* ip, const double* fp,
                            int64_t t) noexcept nogil:
    return fp[0]


cdef inline double _at_exponential(const Program* P, const int64_t* ip, const double* fp,
                                  int64_t t) noexcept nogil:
    cdef int64_t s
    cdef double x, v
    # init * rate^(s / T), s = t - transition_begin, staircase: floor(s / T); end bound.
    s = t - ip[1]
    if s <= 0:
        return fp[0]
    if ip[2]:
        x = <double>(s // ip[0])
    else:
        x = <double>s / <double>ip[0]
    v = fp[0] * pow(fp[1], x)
    if ip[3]:
        v = fmax(v, fp[2]) if fp[1] < 1.0 else fmin(v, fp[2])
    return v


cdef inline double _at_natural_exp(const Program* P, const int64_t* ip, const double* fp,
                                  int64_t t) noexcept nogil:
    return fp[0] * exp(-fp[1] * <double>t)


cdef inline double _at_inverse_time(const Program* P, const int64_t* ip, const double* fp,
                                   int64_t t) noexcept nogil:
    cdef double x
    if ip[2]:
        x = <double>(t // ip[0])
    else:
        x = <double>t / <double>ip[0]
    return fp[0] / (1.0 + fp[1] * x)


cdef inline double _at_polynomial(const Program* P, const int64_t* ip, const double* fp,
                                 int64_t t) noexcept nogil:
    cdef int64_t s, n
    cdef double frac, cycle
    # (init - end) * (1 - s / T)^power + end, s clipped to [0, T] (keras cycle: T grows).
    s = t - ip[1]
    if s < 0:
        s = 0
    n = ip[0]
    if ip[2]:
        if s > 0:
            n = n * ((s + n - 1) // n)
    elif s > n:
        s = n
    frac = 1.0 - <double>s / <double>n
    if fp[2] != 1.0:
        frac = pow(frac, fp[2])
    return (fp[0] - fp[1]) * frac + fp[1]


cdef inline double _cosine_pos(const int64_t* ip, int64_t t) noexcept nogil:
    """Steps into the decay: clipped to [0, T], or reduced modulo 2T when periodic."""
    cdef int64_t s = t - ip[1]
    if s < 0:
        s = 0
    if ip[2]:
        s = s % (2 * ip[0])     # the cosine's period is 2T: exact for any step
    elif s > ip[0]:
        s = ip[0]
    return <double>s


cdef inline double _cosine_frac(const int64_t* ip, int64_t t) noexcept nogil:
    """Where step ``t`` is in the decay, as a fraction of T (in [0, 2) when periodic)."""
    return _cosine_pos(ip, t) / <double>ip[0]


cdef inline double _cosine_value(const double* fp, double frac) noexcept nogil:
    """end + (init - end) * ((1 + cos(pi frac)) / 2)^exponent."""
    cdef double v = _half_cosine(frac)
    if fp[2] != 1.0:
        v = pow(v, fp[2])
    return fp[1] + (fp[0] - fp[1]) * v


cdef inline double _at_cosine(const Program* P, const int64_t* ip, const double* fp,
                             int64_t t) noexcept nogil:
    return _cosine_value(fp, _cosine_frac(ip, t))


cdef inline double _at_cosine_restarts(const Program* P, const int64_t* ip, const double* fp,
                                      int64_t t) noexcept nogil:
    cdef int64_t k, period
    cdef double x, v
    # SGDR: periods T0, T0*m, T0*m^2, ...; the peak is multiplied by ``decay`` per restart.
    # fp: peak, end, m, decay; ip: T0.
    period = ip[0]
    if fp[2] == 1.0:
        k = t // period
        x = <double>(t - k * period)          # steps into the current period
        v = <double>period                    # its length
    else:
        # Cycle index from the geometric sum, then corrected against rounding.
        k = <int64_t>fmax(0.0, floor(log(1.0 + <double>t / <double>period * (fp[2] - 1.0))
                                     / log(fp[2])))
        while k > 0 and _restart_start(period, fp[2], k) > <double>t:
            k -= 1
        while _restart_start(period, fp[2], k + 1) <= <double>t:
            k += 1
        x = <double>t - _restart_start(period, fp[2], k)
        v = <double>period * pow(fp[2], <double>k)
    return fp[1] + (fp[0] * pow(fp[3], <double>k) - fp[1]) * _half_cosine(x / v)


cdef inline double _at_one_cycle(const Program* P, const int64_t* ip, const double* fp,
                                int64_t t) noexcept nogil:
    cdef double x
    # torch OneCycleLR. fp: initial, max, min, end of phase 1 (pct_start * total - 1), end of
    # phase 2 in the three-phase form (2 * pct_start * total - 2); ip: total_steps,
    # three_phase, cosine. Steps past total_steps - 1 keep the final value.
    x = <double>(t if t < ip[0] - 1 else ip[0] - 1)
    if x <= fp[3]:
        return _anneal(fp[0], fp[1], x / fp[3], ip[2])
    if ip[1]:
        if x <= fp[4]:
            return _anneal(fp[1], fp[0], (x - fp[3]) / (fp[4] - fp[3]), ip[2])
        return _anneal(fp[0], fp[2], (x - fp[4]) / (<double>(ip[0] - 1) - fp[4]), ip[2])
    return _anneal(fp[1], fp[2], (x - fp[3]) / (<double>(ip[0] - 1) - fp[3]), ip[2])


cdef inline double _at_cyclic(const Program* P, const int64_t* ip, const double* fp,
                             int64_t t) noexcept nogil:
    cdef int64_t n
    cdef double x, frac, v, cycle
    # torch CyclicLR. fp: base, max, gamma; ip: step_up, step_down, mode (0 triangular,
    # 1 triangular2, 2 exp_range).
    n = ip[0] + ip[1]
    cycle = floor(1.0 + <double>t / <double>n)
    x = 1.0 + <double>t / <double>n - cycle
    frac = <double>ip[0] / <double>n
    if x <= frac:
        v = x / frac
    else:
        v = (x - 1.0) / (frac - 1.0)
    v = (fp[1] - fp[0]) * v
    if ip[2] == 1:
        v = v * (1.0 / pow(2.0, cycle - 1.0))
    elif ip[2] == 2:
        v = v * pow(fp[2], <double>t)
    return fp[0] + v


cdef inline double _at_piecewise_constant(const Program* P, const int64_t* ip, const double* fp,
                                         int64_t t) noexcept nogil:
    cdef int64_t n
    # values[j] after j boundaries; ip: boundaries offset, values offset, n, strict.
    return P.fbuf[ip[1] + _upper_bound(P.ibuf + ip[0], ip[2], t, ip[3] != 0)]


cdef inline double _at_piecewise_interp(const Program* P, const int64_t* ip, const double* fp,
                                       int64_t t) noexcept nogil:
    cdef int64_t n, k
    cdef double frac
    cdef const int64_t* b
    cdef const double* vals
    # Points (b[j], values[j]); before the first / after the last: flat. ip[3]: 1 cosine.
    b = P.ibuf + ip[0]
    vals = P.fbuf + ip[1]
    n = ip[2]
    if t <= b[0]:
        return vals[0]
    if t >= b[n - 1]:
        return vals[n - 1]
    k = _upper_bound(b, n, t, False) - 1
    frac = <double>(t - b[k]) / <double>(b[k + 1] - b[k])
    if ip[3]:
        return vals[k + 1] + (vals[k] - vals[k + 1]) * _half_cosine(frac)
    return vals[k] + (vals[k + 1] - vals[k]) * frac


cdef inline double _at_inverse_sqrt(const Program* P, const int64_t* ip, const double* fp,
                                   int64_t t) noexcept nogil:
    cdef int64_t s
    # init / sqrt(max(t, T) / T): flat until T, then ~ 1 / sqrt(t).
    s = t if t > ip[0] else ip[0]
    return fp[0] / sqrt(<double>s / <double>ip[0])


cdef inline double _at_sqrt_decay(const Program* P, const int64_t* ip, const double* fp,
                                 int64_t t) noexcept nogil:
    cdef int64_t s
    # end + (init - end) * (1 - sqrt(min(t, T) / T)) (the "1-sqrt" cooldown of WSD).
    s = t if t < ip[0] else ip[0]
    return fp[1] + (fp[0] - fp[1]) * (1.0 - sqrt(<double>s / <double>ip[0]))


cdef double _eval(const Program* P, Py_ssize_t i, int64_t t) noexcept nogil:
    """Value of node ``i`` at step ``t``. One if/elif chain on the kind (a C switch); a join
    moves to its piece in the same loop instead of calling itself."""
    cdef const int64_t* ip
    cdef const double* fp
    cdef int kind
    cdef int64_t n, k
    cdef double v
    cdef const int64_t* b
    cdef const PlateauFactor* pf

    while True:
        ip = P.ip + i * NIP
        fp = P.fp + i * NFP
        kind = P.kind[i]
        if kind == CONST:
            return _at_const(P, ip, fp, t)
        elif kind == EXPONENTIAL:
            return _at_exponential(P, ip, fp, t)
        elif kind == NATURAL_EXP:
            return _at_natural_exp(P, ip, fp, t)
        elif kind == INVERSE_TIME:
            return _at_inverse_time(P, ip, fp, t)
        elif kind == POLYNOMIAL:
            return _at_polynomial(P, ip, fp, t)
        elif kind == COSINE:
            return _at_cosine(P, ip, fp, t)
        elif kind == COSINE_RESTARTS:
            return _at_cosine_restarts(P, ip, fp, t)
        elif kind == ONE_CYCLE:
            return _at_one_cycle(P, ip, fp, t)
        elif kind == CYCLIC:
            return _at_cyclic(P, ip, fp, t)
        elif kind == PIECEWISE_CONSTANT:
            return _at_piecewise_constant(P, ip, fp, t)
        elif kind == PIECEWISE_INTERP:
            return _at_piecewise_interp(P, ip, fp, t)
        elif kind == INVERSE_SQRT:
            return _at_inverse_sqrt(P, ip, fp, t)
        elif kind == SQRT_DECAY:
            return _at_sqrt_decay(P, ip, fp, t)
        elif kind == JOIN:
            # ibuf[ip0 .. +k): children; then k-1 boundaries; then k "local step" flags.
            n = ip[1]
            b = P.ibuf + ip[0]
            k = _upper_bound(b + n, n - 1, t, False)
            if b[2 * n - 1 + k] and k > 0:
                t = t - b[n + k - 1]
            i = b[k]
            continue                    # evaluate the piece without a nested call
        elif kind == PRODUCT:
            return _eval(P, ip[0], t) * _eval(P, ip[1], t)
        elif kind == CLAMP:
            v = _eval(P, ip[0], t)
            return fmin(fmax(v, fp[0]), fp[1])
        elif kind == PLATEAU:
            pf = <const PlateauFactor*><intptr_t>ip[1]
            v = _eval(P, ip[0], t) * pf.scale
            if pf.scale < 1.0 and v < pf.min_lr:
                v = pf.min_lr
            elif pf.scale > 1.0 and v > pf.max_lr:
                v = pf.max_lr
            return v
        else:
            return 0.0 / 0.0  # unreachable for programs built by lrfast.schedules


cdef enum:
    BLOCK = 256        # steps evaluated together by one kind's tight loop
    MAX_DEPTH = 8      # nested joins handled block-wise (deeper ones go element by element)


cdef void _eval_block(const Program* P, Py_ssize_t i, const int64_t* t, double* out,
                      Py_ssize_t n, int64_t* scratch, int depth) noexcept nogil:
    """``out[j] = _eval(P, i, t[j])`` for a block of ``n <= BLOCK`` steps, bit for bit, with the
    kind dispatched once per block instead of once per step."""
    cdef const int64_t* ip = P.ip + i * NIP
    cdef const double* fp = P.fp + i * NFP
    cdef int kind = P.kind[i]
    cdef Py_ssize_t j, k, nb, outside
    cdef int64_t lo, hi, shift
    cdef double frac[BLOCK]
    cdef double period
    cdef const int64_t* b
    cdef const PlateauFactor* pf
    cdef double v
    if kind == CONST:
        for j in range(n):
            out[j] = _at_const(P, ip, fp, t[j])
    elif kind == EXPONENTIAL:
        for j in range(n):
            out[j] = _at_exponential(P, ip, fp, t[j])
    elif kind == NATURAL_EXP:
        for j in range(n):
            out[j] = _at_natural_exp(P, ip, fp, t[j])
    elif kind == INVERSE_TIME:
        for j in range(n):
            out[j] = _at_inverse_time(P, ip, fp, t[j])
    elif kind == POLYNOMIAL:
        for j in range(n):
            out[j] = _at_polynomial(P, ip, fp, t[j])
    elif kind == COSINE and not ip[2] and fp[2] == 1.0 and ip[0] < (<int64_t>1 << 52):
        # The common case in one branch-free loop that vectorises: clip, exact small-integer
        # conversion, half cosine. Bit for bit what _at_cosine computes step by step.
        lo = ip[1]
        hi = ip[0]
        period = <double>ip[0]
        for j in range(n):
            shift = t[j] - lo
            shift = 0 if shift < 0 else shift
            shift = hi if shift > hi else shift
            out[j] = fp[1] + (fp[0] - fp[1]) * _half_cosine(_small_i2d(shift) / period)
    elif kind == COSINE:
        # Integer part per step, then the cosine over the block in a loop the compiler vectorises.
        for j in range(n):
            frac[j] = _cosine_pos(ip, t[j])
        period = <double>ip[0]
        if fp[2] == 1.0:
            for j in range(n):
                out[j] = fp[1] + (fp[0] - fp[1]) * _half_cosine(frac[j] / period)
        else:
            for j in range(n):
                out[j] = _cosine_value(fp, frac[j] / period)
    elif kind == COSINE_RESTARTS:
        for j in range(n):
            out[j] = _at_cosine_restarts(P, ip, fp, t[j])
    elif kind == ONE_CYCLE:
        for j in range(n):
            out[j] = _at_one_cycle(P, ip, fp, t[j])
    elif kind == CYCLIC:
        for j in range(n):
            out[j] = _at_cyclic(P, ip, fp, t[j])
    elif kind == PIECEWISE_CONSTANT:
        for j in range(n):
            out[j] = _at_piecewise_constant(P, ip, fp, t[j])
    elif kind == PIECEWISE_INTERP:
        for j in range(n):
            out[j] = _at_piecewise_interp(P, ip, fp, t[j])
    elif kind == INVERSE_SQRT:
        for j in range(n):
            out[j] = _at_inverse_sqrt(P, ip, fp, t[j])
    elif kind == SQRT_DECAY:
        for j in range(n):
            out[j] = _at_sqrt_decay(P, ip, fp, t[j])
    elif kind == JOIN and depth > 0:
        # If every step of the block falls in one piece, evaluate that piece block-wise.
        nb = ip[1]
        b = P.ibuf + ip[0]
        k = _upper_bound(b + nb, nb - 1, t[0], False)
        lo = b[nb + k - 1] if k > 0 else 0
        hi = b[nb + k] if k < nb - 1 else 0x7FFFFFFFFFFFFFFF
        outside = 0
        for j in range(n):
            outside += (t[j] < lo) | (t[j] >= hi)
        if outside:
            for j in range(n):
                out[j] = _eval(P, i, t[j])
        elif b[2 * nb - 1 + k] and k > 0:
            shift = b[nb + k - 1]
            for j in range(n):
                scratch[j] = t[j] - shift
            _eval_block(P, b[k], scratch, out, n, scratch + BLOCK, depth - 1)
        else:
            _eval_block(P, b[k], t, out, n, scratch, depth - 1)
    elif kind == CLAMP:
        _eval_block(P, ip[0], t, out, n, scratch, depth)
        for j in range(n):
            out[j] = fmin(fmax(out[j], fp[0]), fp[1])
    else:
        for j in range(n):
            out[j] = _eval(P, i, t[j])


cdef int64_t _eval_span(const Program* P, Py_ssize_t root, const int64_t* t, double* out,
                        Py_ssize_t n) noexcept nogil:
    """Evaluate a contiguous span of steps block by block (one thread's share); returns the
    smallest step seen (checked while the block is in cache, not in a pass of its own)."""
    cdef int64_t scratch[BLOCK * MAX_DEPTH]
    cdef Py_ssize_t start = 0, m, j
    cdef int64_t smallest = 0
    while start < n:
        m = n - start if n - start < BLOCK else BLOCK
        for j in range(m):
            smallest = t[start + j] if t[start + j] < smallest else smallest
        _eval_block(P, root, t + start, out + start, m, scratch, MAX_DEPTH)
        start += m
    return smallest


cdef class PlateauCell:
    """The multiplicative factor a plateau controller owns, readable by compiled schedules."""

    cdef PlateauFactor f

    def __cinit__(self):
        self.f.scale = 1.0
        self.f.min_lr = 0.0
        self.f.max_lr = float("inf")

    @property
    def address(self):
        return <intptr_t>&self.f

    @property
    def scale(self):
        return self.f.scale

    @scale.setter
    def scale(self, double value):
        self.f.scale = value

    @property
    def min_lr(self):
        return self.f.min_lr

    @min_lr.setter
    def min_lr(self, double value):
        self.f.min_lr = value

    @property
    def max_lr(self):
        return self.f.max_lr

    @max_lr.setter
    def max_lr(self, double value):
        self.f.max_lr = value


cdef class NativeSchedule:
    """Base of every schedule: holds the compiled program and evaluates it.

    ``s(t)`` with an int returns a float; ``s(steps)`` with an integer array returns a float64
    array of the same shape. Steps count the updates already done (the first update uses
    ``s(0)``) and must be >= 0.
    """

    cdef Program prog
    cdef Py_ssize_t root
    cdef object _arrays       # keeps the program's buffers (and plateau cells) alive

    def _load_program(self, kind, ip, fp, ibuf, fbuf, Py_ssize_t root, keep=()):
        """Install a program built by lrfast.schedules (arrays are copied, then frozen)."""
        cdef cnp.ndarray k = np.ascontiguousarray(kind, dtype=np.intc).copy()
        cdef cnp.ndarray i = np.ascontiguousarray(ip, dtype=np.int64).reshape(-1).copy()
        cdef cnp.ndarray f = np.ascontiguousarray(fp, dtype=np.float64).reshape(-1).copy()
        cdef cnp.ndarray ib = np.ascontiguousarray(ibuf, dtype=np.int64).copy()
        cdef cnp.ndarray fb = np.ascontiguousarray(fbuf, dtype=np.float64).copy()
        cdef Py_ssize_t n = k.shape[0]
        if n == 0 or not 0 <= root < n:
            raise ValueError("empty program or root out of range")
        if i.shape[0] != n * NIP or f.shape[0] != n * NFP:
            raise ValueError("node parameter arrays do not match the node count")
        if np.any((k < 0) | (k >= NKINDS)):
            raise ValueError("unknown node kind")
        # Keep one element in the side buffers so their data pointers are valid.
        if ib.shape[0] == 0:
            ib = np.zeros(1, np.int64)
        if fb.shape[0] == 0:
            fb = np.zeros(1, np.float64)
        self._arrays = (k, i, f, ib, fb, tuple(keep))
        self.prog.kind = <const int*>cnp.PyArray_DATA(k)
        self.prog.ip = <const int64_t*>cnp.PyArray_DATA(i)
        self.prog.fp = <const double*>cnp.PyArray_DATA(f)
        self.prog.ibuf = <const int64_t*>cnp.PyArray_DATA(ib)
        self.prog.fbuf = <const double*>cnp.PyArray_DATA(fb)
        self.root = root

    def __call__(self, t, out=None):
        cdef int64_t step
        if out is not None:
            if not isinstance(t, cnp.ndarray):
                raise TypeError("out is only used with an array of steps")
            return self._vector(t, out, self._num_threads())
        if type(t) is int:
            if t < 0:
                raise ValueError(f"step must be >= 0, got {t}")
            if t > 0x7FFFFFFFFFFFFFFF:
                raise ValueError(f"step {t} does not fit in 64 bits")
            step = t
            if self._arrays is None:
                raise RuntimeError("schedule has no program")
            return _eval(&self.prog, self.root, step)
        if isinstance(t, cnp.ndarray):
            return self._vector(t, None, self._num_threads())
        if isinstance(t, np.integer):
            return self(int(t))
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"step must be an int or an integer NumPy array, got {type(t).__name__}")
        return self(int(t))

    def _num_threads(self):
        """The thread count that ``s(steps)`` passes to ``_vector``: here 0, OpenMP's default.
        lrfast.schedules.Schedule overrides it with lrfast's own setting (lrfast.threads), so
        this module needs nothing from the Python package."""
        return 0

    def _vector(self, cnp.ndarray steps, object out_arg, int nthreads):
        """The array path: ``steps`` evaluated on at most ``nthreads`` threads (``<= 0``: as
        many as OpenMP's default, ``omp_get_max_threads()``), fewer for short arrays. The
        values do not depend on the thread count."""
        if steps.dtype.kind not in "iu":
            raise TypeError(f"steps must be an integer array, got dtype {steps.dtype}")
        if steps.dtype.kind == "u" and steps.dtype.itemsize == 8 and steps.size and \
                steps.max() > 0x7FFFFFFFFFFFFFFF:
            raise ValueError("steps do not fit in 64 bits")
        cdef cnp.ndarray s64 = np.ascontiguousarray(steps, dtype=np.int64)
        cdef cnp.ndarray out
        if out_arg is None:
            out = np.empty((<object>steps).shape, dtype=np.float64)
        else:
            if not isinstance(out_arg, cnp.ndarray) or out_arg.dtype != np.float64 or \
                    out_arg.shape != (<object>steps).shape or \
                    not out_arg.flags.c_contiguous or not out_arg.flags.writeable:
                raise ValueError("out must be a writeable, C-contiguous float64 array with the "
                                 "shape of steps")
            if np.shares_memory(out_arg, steps):
                raise ValueError("out must not share memory with steps")
            out = out_arg
        cdef Py_ssize_t n = s64.size, j
        if n == 0:
            return out
        cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(s64)
        cdef double* op = <double*>cnp.PyArray_DATA(out)
        cdef int64_t smallest = 0
        if out_arg is not None:
            # The caller's array must stay untouched if a step is bad: check them all first.
            with nogil:
                for j in range(n):
                    smallest = sp[j] if sp[j] < smallest else smallest
            if smallest < 0:
                raise ValueError(f"steps must be >= 0, got {smallest}")
        if self._arrays is None:
            raise RuntimeError("schedule has no program")
        cdef int team = nthreads if nthreads > 0 else omp_get_max_threads()
        if n // MIN_STEPS_PER_THREAD < team:
            team = <int>(n // MIN_STEPS_PER_THREAD) if n >= MIN_STEPS_PER_THREAD else 1
        cdef const Program* P = &self.prog
        cdef Py_ssize_t root = self.root
        cdef int tid
        cdef cnp.ndarray mins = np.zeros(team if team > 1 else 1, dtype=np.int64)
        cdef int64_t* mp = <int64_t*>cnp.PyArray_DATA(mins)
        if team <= 1:
            with nogil:
                mp[0] = _eval_span(P, root, sp, op, n)
        else:
            with nogil:
                for tid in prange(team, num_threads=team, schedule='static'):
                    mp[tid] = _eval_span(P, root, sp + n * tid // team, op + n * tid // team,
                                         n * (tid + 1) // team - n * tid // team)
        smallest = mins.min()
        if smallest < 0:
            raise ValueError(f"steps must be >= 0, got {smallest}")
        return out
