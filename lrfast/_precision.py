"""Element types of the NumPy API, and the options that choose them.

The kernels know four element types (src/_storage.pxi): float32, float64, bfloat16 and float16.
NumPy has float16 natively; bfloat16 arrive either as ``ml_dtypes.bfloat16`` arrays (the dtype
JAX and TensorFlow use; detected by name, so ml_dtypes is never required) or as uint16 arrays
holding bfloat16 bit patterns, which an optimizer or function reads as bfloat16 only when told
so with ``bfloat16_bits=True``.

The options every optimizer (and lrfast.functional) takes, checked here once:

``state_dtype``   the state buffers' element type: None (the params'), float32 for
                  bfloat16/float16 params (fp32 state, as DeepSpeed's fp32_optimizer_states),
                  bfloat16/float16 for float32 params, or "int8" / an Int8State (8-bit
                  blockwise moments, lrfast.quantization)
``half_out``      arrays (like the params) receiving a bfloat16/float16 copy of the updated
                  float32 params, written in the same pass
``rounding``      "nearest" (to nearest, ties to even) or "stochastic", for every value
                  rounded into a half-precision buffer
``seed``          the stochastic rounding's seed, 0 <= seed < 2**64
``bfloat16_bits`` uint16 arrays hold bfloat16 bits
"""
from __future__ import annotations

import numbers

import numpy as np

STORAGES = ("float32", "float64", "bfloat16", "float16")
HALF = ("bfloat16", "float16")
ROUNDINGS = ("nearest", "stochastic")

_NATIVE = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64",
           np.dtype(np.float16): "float16"}
_UINT16 = np.dtype(np.uint16)


def storage_of(dtype, bfloat16_bits=False):
    """The kernels' name for arrays of ``dtype``, or None when lrfast cannot update them."""
    dtype = np.dtype(dtype)
    name = _NATIVE.get(dtype)
    if name is not None:
        return name
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        return "bfloat16"
    if bfloat16_bits and dtype == _UINT16:
        return "bfloat16"
    return None


def numpy_dtype(value, bfloat16_bits=False, what="dtype"):
    """(NumPy dtype, element type) for ``value``: a dtype-like, or the name "bfloat16", which
    is ``ml_dtypes.bfloat16`` when ml_dtypes is installed and uint16 bits with
    ``bfloat16_bits=True``."""
    if isinstance(value, str) and value == "bfloat16":
        if bfloat16_bits:
            return _UINT16, "bfloat16"
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"{what}='bfloat16' needs the ml_dtypes package (pip install "
                            "ml_dtypes), or bfloat16_bits=True for uint16 arrays of bfloat16 "
                            "bits") from None
        return np.dtype(ml_dtypes.bfloat16), "bfloat16"
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise TypeError(f"{what} must be a NumPy dtype or 'bfloat16', got {value!r}") from None
    storage = storage_of(dtype, bfloat16_bits)
    if storage is None:
        raise TypeError(f"{what} must be float32, float64, float16 or bfloat16, got {dtype}")
    return dtype, storage


def dtype_message(what, dtype):
    return (f"{what} has dtype {dtype}; lrfast updates float32, float64, float16 and bfloat16 "
            "arrays (bfloat16: ml_dtypes.bfloat16, or uint16 bits with bfloat16_bits=True)")


def bits(arr):
    """The array as the kernels read it: half types as their uint16 bits."""
    return arr.view(np.uint16) if arr.dtype.itemsize == 2 else arr


def full(n, value, dtype):
    """A 1-D buffer of ``n`` elements of ``dtype``, all ``value`` rounded to nearest even
    (uint16: bfloat16 bits)."""
    dtype = np.dtype(dtype)
    if dtype == _UINT16:
        from .reference import narrow
        return np.full(n, narrow(np.array([value], np.float32), "bfloat16")[0], dtype=_UINT16)
    return np.full(n, value, dtype=dtype)


def state_storage(state_dtype, param_storage):
    """The state's element type for params of ``param_storage`` (validated ``state_dtype``; for
    8-bit state, the type of the buffers it does not quantise: float32)."""
    from .quantization import Int8State
    if state_dtype is None:
        return param_storage
    if isinstance(state_dtype, Int8State):
        if param_storage == "float64":
            raise ValueError("state_dtype=int8 is not available for float64 params: 8-bit "
                             "state is kept for float32, bfloat16 and float16 params")
        return "float32"
    if state_dtype == param_storage:
        return state_dtype
    wide = state_dtype == "float64" or param_storage == "float64"
    if wide or (param_storage in HALF and state_dtype in HALF):
        raise ValueError(f"state_dtype={state_dtype} is not available for {param_storage} "
                         "params: state is kept in the params' type, in float32 for "
                         "bfloat16/float16 params, or in bfloat16/float16 for float32 params")
    return state_dtype


def check_state_dtype(value):
    """None, the element type named by a string, NumPy dtype or torch dtype, or the 8-bit
    state's settings (an :class:`lrfast.Int8State`; the string "int8" is its defaults)."""
    from .quantization import Int8State
    if value is None or isinstance(value, Int8State):
        return value
    if isinstance(value, str) and value == "int8":
        return Int8State()
    text = str(value).removeprefix("torch.")
    if isinstance(value, str) or text in STORAGES:
        name = text
    else:
        try:
            name = storage_of(value) or ""
        except TypeError:
            name = ""
    if name not in STORAGES:
        raise ValueError(f"state_dtype must be None, 'int8', an lrfast.Int8State or one of "
                         f"{', '.join(STORAGES)}, got {value!r}")
    return name


def check_rounding(value):
    if value not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {value!r}")
    return value


def check_seed(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= int(value) < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {value!r}")
    return int(value)
