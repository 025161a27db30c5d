# OpenMP behind one small header: with OpenMP the real runtime, without it serial stand-ins, so
# every kernel compiles either way. Cython's prange is already serial when _OPENMP is undefined.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define LRFAST_HAVE_OPENMP 1
    #else
    #define LRFAST_HAVE_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline void omp_set_num_threads(int n) { (void)n; }
    static inline int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint LRFAST_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
    int omp_get_thread_num() noexcept nogil
