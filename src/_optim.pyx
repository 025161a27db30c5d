# The portable build of the optimizer kernels (see _optim_kernels.pxi), plus the CPU feature
# probe used to pick a kernel build at import.

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
