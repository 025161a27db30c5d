# The portable build of the optimizer kernels, plus what is compiled once: the per-step gradient
# check and the CPU feature probe used to pick a kernel build at import.

cimport numpy as cnp
from libc.stdint cimport intptr_t

cnp.import_array()

include "_optim_kernels.pxi"


cdef extern from *:
    """
    #if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
    #include <intrin.h>
    #include <immintrin.h>
    #endif
    static int lrfast_cpu_has_avx2(void) {
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    #elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
        int r[4];
        __cpuid(r, 1);
        /* OSXSAVE and AVX, and the OS saves the YMM state */
        if (!((r[2] >> 27) & 1) || !((r[2] >> 28) & 1)) return 0;
        if ((_xgetbv(0) & 6) != 6) return 0;
        __cpuidex(r, 7, 0);
        return (r[1] >> 5) & 1;
    #else
        return 0;
    #endif
    }
    """
    int lrfast_cpu_has_avx2() noexcept nogil


def cpu_has_avx2():
    """Does this CPU (and OS) support AVX2?"""
    return bool(lrfast_cpu_has_avx2())


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
    """Check each grad and write its data address into ``out``.

    ``grads`` is a list or tuple of length ``out.shape[0]``. Tensor ``k`` must be a NumPy array of
    type ``typenum``, with ``ndims[k]`` dimensions equal to the next entries of ``dims``,
    C-contiguous, aligned, and must not overlap any of the sorted written ranges
    ``[wstart, wend)``. Returns ``(GATHER_OK, -1)`` or ``(code, k)`` for the first bad grad;
    ``out`` may then be partly written but nothing else is.
    """
    cdef Py_ssize_t n = out.shape[0], k, d, pos = 0, nd
    cdef cnp.ndarray arr
    cdef object item
    cdef cnp.npy_intp* shape
    cdef intptr_t start
    cdef Py_ssize_t nw = wstart.shape[0]
    cdef const intptr_t* ws = &wstart[0] if nw > 0 else NULL
    cdef const intptr_t* we = &wend[0] if nw > 0 else NULL
    for k in range(n):
        item = grads[k]
        if not isinstance(item, cnp.ndarray):
            return GATHER_NOT_ARRAY, k
        arr = <cnp.ndarray>item
        if cnp.PyArray_TYPE(arr) != typenum:
            return GATHER_DTYPE, k
        nd = ndims[k]
        if cnp.PyArray_NDIM(arr) != nd:
            return GATHER_SHAPE, k
        shape = cnp.PyArray_DIMS(arr)
        for d in range(nd):
            if shape[d] != dims[pos + d]:
                return GATHER_SHAPE, k
        pos += nd
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            return GATHER_NOT_CONTIGUOUS, k
        if not cnp.PyArray_ISALIGNED(arr):
            return GATHER_MISALIGNED, k
        start = <intptr_t>cnp.PyArray_DATA(arr)
        if _overlaps(start, start + cnp.PyArray_NBYTES(arr), ws, we, nw):
            return GATHER_OVERLAP, k
        out[k] = start
    return GATHER_OK, -1
