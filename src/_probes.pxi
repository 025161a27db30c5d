# Build introspection and the bandwidth probe.

def has_flush_to_zero():
    """Can the kernels' threads flush subnormals to zero on this CPU architecture?"""
    return bool(LRFAST_HAVE_FTZ)


def _debug_index(Py_ssize_t[::1] a, Py_ssize_t i):
    """a[i] through a typed memoryview: IndexError out of range in a bounds-checked
    (LRFAST_DEBUG_CYTHON=1) build; only for the test that shows the switch works."""
    return a[i]

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


