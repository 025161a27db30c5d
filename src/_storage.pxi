# Element types: how an update's element loop reads and writes the tensors it is given.
#
# An update's loop is written once, over a fused *storage* type (what the buffers hold) and the
# fused ``floating`` *math* type (what the arithmetic runs in); ``_load`` and ``_store`` convert
# between the two and compile to nothing when they are the same type. Each (storage, math) pair
# the segment function asks for is its own specialisation of the same source, so a new element
# type is a new member of ``store_t`` with its two conversions here, never a copied loop:
#
#   float32 storage   float32 math    (identity)
#   float64 storage   float64 math    (identity)
#   bfloat16 storage  float32 math    (load: the 16 bits are the top half of a float32;
#                                       store: round to nearest even, NaN stays a quiet NaN)
#
# Which storage a call has travels as a code in its argument block (STORE_*), with the element
# size the driver steps by.

cdef enum:
    STORE_F32 = 0
    STORE_F64 = 1
    STORE_BF16 = 2

STORAGE_CODES = {"float32": STORE_F32, "float64": STORE_F64, "bfloat16": STORE_BF16}
STORAGE_ITEMSIZE = {STORE_F32: 4, STORE_F64: 8, STORE_BF16: 2}


# bfloat16 as stored: the upper 16 bits of a float32. A struct, so that it is a type of its own
# for the fused type (a bare uint16_t would be any 16-bit integer).
cdef struct bfloat16:
    uint16_t bits


ctypedef fused store_t:
    float
    double
    bfloat16


cdef inline float _bf16_to_f32(uint16_t b) noexcept nogil:
    cdef uint32_t u = (<uint32_t>b) << 16
    cdef float f
    memcpy(&f, &u, 4)
    return f


cdef inline uint16_t _f32_to_bf16(float f) noexcept nogil:
    # Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate. A NaN
    # keeps its top bits with the quiet bit set (rounding could otherwise carry it to inf). Both
    # results are formed and one selected, so the loop around this stays branch-free.
    cdef uint32_t u
    memcpy(&u, &f, 4)
    cdef uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16
    cdef uint32_t quiet = (u >> 16) | 0x40u
    return <uint16_t>(quiet if (u & 0x7fffffffu) > 0x7f800000u else rounded)


cdef inline floating _load(const store_t* x, Py_ssize_t i, floating like) noexcept nogil:
    """Element ``i`` of ``x`` in the math type (``like`` only selects that type)."""
    if store_t is bfloat16:
        return <floating>_bf16_to_f32(x[i].bits)
    else:
        return <floating>x[i]


cdef inline void _store(store_t* x, Py_ssize_t i, floating v) noexcept nogil:
    """Write ``v`` to element ``i`` of ``x``, rounded to the storage type."""
    if store_t is bfloat16:
        x[i].bits = _f32_to_bf16(<float>v)
    else:
        x[i] = <store_t>v
