# Thread-count queries and build facts for lrfast.show_config().
from _openmp_helpers cimport LRFAST_HAVE_OPENMP, omp_get_max_threads

cdef extern from *:
    """
    #ifndef LRFAST_BUILD_FLAGS
    #define LRFAST_BUILD_FLAGS ""
    #endif
    #if defined(__clang__)
    #define LRFAST_COMPILER "clang " __clang_version__
    #elif defined(__GNUC__)
    #define LRFAST_COMPILER "gcc " __VERSION__
    #elif defined(_MSC_VER)
    #define LRFAST_STR2(x) #x
    #define LRFAST_STR(x) LRFAST_STR2(x)
    #define LRFAST_COMPILER "msvc " LRFAST_STR(_MSC_VER)
    #else
    #define LRFAST_COMPILER "unknown"
    #endif
    static const char *lrfast_simd(void) {
        return ""
    #if defined(__AVX512F__)
            "AVX512F "
    #endif
    #if defined(__AVX2__)
            "AVX2 "
    #endif
    #if defined(__FMA__)
            "FMA "
    #endif
    #if defined(__AVX__)
            "AVX "
    #endif
    #if defined(__SSE4_2__)
            "SSE4.2 "
    #endif
    #if defined(__SSE2__) || defined(_M_X64)
            "SSE2 "
    #endif
    #if defined(__ARM_NEON)
            "NEON "
    #endif
            ;
    }
    """
    const char *LRFAST_BUILD_FLAGS
    const char *LRFAST_COMPILER
    const char *lrfast_simd()
    int LRFAST_DEBUG


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(LRFAST_HAVE_OPENMP)


def max_threads():
    """OpenMP's current default team size (honours OMP_NUM_THREADS and threadpoolctl)."""
    return omp_get_max_threads()


def build_info():
    """Facts fixed at compile time: compiler, flags, SIMD instruction sets, debug checks."""
    return {
        "compiler": LRFAST_COMPILER.decode(),
        "flags": LRFAST_BUILD_FLAGS.decode(),
        "simd": lrfast_simd().decode().split(),
        "openmp": bool(LRFAST_HAVE_OPENMP),
        "debug_checks": bool(LRFAST_DEBUG),
    }
