# Flush-to-zero for the calling thread, behind one small header: on x86 the MXCSR's FTZ and DAZ
# bits (subnormal results become zero, subnormal inputs read as zero), on AArch64 FPCR.FZ; on
# other targets the calls do nothing and LRFAST_HAVE_FTZ is 0. ``enter`` returns the previous
# state for ``leave``, so the caller's floating-point environment is always restored.

cdef extern from *:
    """
    #if defined(__SSE__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 1)
    #include <xmmintrin.h>
    #define LRFAST_HAVE_FTZ 1
    static inline unsigned long long lrfast_ftz_enter(void) {
        unsigned int old = _mm_getcsr();
        _mm_setcsr(old | 0x8040u);  /* FTZ (bit 15) | DAZ (bit 6) */
        return old;
    }
    static inline void lrfast_ftz_leave(unsigned long long old) { _mm_setcsr((unsigned int)old); }
    #elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
    #define LRFAST_HAVE_FTZ 1
    static inline unsigned long long lrfast_ftz_enter(void) {
        unsigned long long old;
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(old));
        __asm__ __volatile__("msr fpcr, %0" : : "r"(old | (1ULL << 24)));
        return old;
    }
    static inline void lrfast_ftz_leave(unsigned long long old) {
        __asm__ __volatile__("msr fpcr, %0" : : "r"(old));
    }
    #else
    #define LRFAST_HAVE_FTZ 0
    static inline unsigned long long lrfast_ftz_enter(void) { return 0; }
    static inline void lrfast_ftz_leave(unsigned long long old) { (void)old; }
    #endif
    """
    bint LRFAST_HAVE_FTZ
    unsigned long long lrfast_ftz_enter() noexcept nogil
    void lrfast_ftz_leave(unsigned long long old) noexcept nogil
