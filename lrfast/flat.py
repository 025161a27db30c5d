"""FlatParams: a model's parameters and gradients as views into two contiguous buffers.

With hundreds of small tensors, a step over separate arrays must visit each one; over one flat
buffer it is a single loop over one array. ``FlatParams`` allocates the buffers from a dict of
shapes, hands out named views (``flat.params[name]``, ``flat.grads[name]``) for the model to read
and for the backward pass to write, and optimizers given a ``FlatParams`` update the whole
buffer in one kernel call, with their state in one contiguous buffer too.
"""
from __future__ import annotations

import json
import numbers
import os

import numpy as np

from ._precision import HALF, numpy_dtype
from ._validation import check_bool

__all__ = ["FlatParams"]

_FORMAT = "lrfast.FlatParams/1"


def _shape(name, shape):
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape of {name!r} must be a tuple of ints, got {shape!r}")
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"shape of {name!r} must hold ints >= 0, got {tuple(shape)!r}")
        out.append(int(d))
    return tuple(out)


class FlatParams:
    """Named parameters and gradients living in two contiguous buffers.

    Parameters
    ----------
    shapes : dict name -> shape
        The tensors, in order. Names are strings; shapes tuples of ints (0-size allowed).
    dtype : float32 (default), float64, float16 or "bfloat16" (``ml_dtypes.bfloat16``, or
        uint16 bits with ``bfloat16_bits=True``)
    init : dict name -> array, optional
        Initial values (copied in); tensors not named start at zero.

    half : "bfloat16" or float16, optional
        Also keep a half twin of float32 params (``half``, ``halves``): optimizers over this
        FlatParams write the updated params into it, rounded, in the same pass (offloaded
        training's copy for the accelerator).
    grad_dtype : optional
        The grads' dtype: the params' (default), or for float32 params a half-precision one
        (float32 master weights with bf16/fp16 grads, widened inside the update).
    bfloat16_bits : bool, default False
        "bfloat16" buffers are uint16 arrays of bfloat16 bits (no ml_dtypes needed).

    Attributes
    ----------
    param, grad : 1-D arrays holding every tensor back to back
    params, grads : dict name -> view of the matching part, with its shape
    half, halves : the half twin and its views (None without ``half``)

    Examples
    --------
    Two tensors, a 2 x 2 weight starting as the identity and a bias starting at zero:

    >>> import numpy as np
    >>> import lrfast
    >>> flat = lrfast.FlatParams({"w": (2, 2), "b": (2,)}, init={"w": np.eye(2)})
    >>> flat
    FlatParams(2 tensors, 6 elements, float32)
    >>> flat.param.tolist()
    [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]

    The backward pass writes into the named gradient views, which share one buffer:

    >>> flat.grads["w"][...] = 1.0
    >>> flat.grads["b"][...] = 2.0
    >>> flat.grad.tolist()
    [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]

    An optimizer built over the FlatParams steps the whole buffer at once, with no argument
    to ``step``; plain SGD with ``lr=0.5`` subtracts half of each gradient:

    >>> opt = lrfast.SGD(flat, lr=0.5)
    >>> opt.step()
    True
    >>> print(flat.params["w"])
    [[ 0.5 -0.5]
     [-0.5  0.5]]
    >>> flat.params["b"].tolist()
    [-1.0, -1.0]
    >>> np.shares_memory(flat.params["w"], flat.param)
    True
    """

    def __init__(self, shapes, dtype=np.float32, init=None, *, half=None, grad_dtype=None,
                 bfloat16_bits=False):
        if not isinstance(shapes, dict) or not shapes:
            raise ValueError("shapes must be a non-empty dict name -> shape")
        self.bfloat16_bits = check_bool(bfloat16_bits, "bfloat16_bits")
        dtype, storage = numpy_dtype(dtype, self.bfloat16_bits, "dtype")
        grad_dtype, grad_storage = (dtype, storage) if grad_dtype is None else numpy_dtype(
            grad_dtype, self.bfloat16_bits, "grad_dtype")
        if grad_storage != storage and (storage != "float32" or grad_storage not in HALF):
            raise TypeError(f"grad_dtype {grad_dtype} with {dtype} params: grads have the "
                            "params' dtype, or a half-precision one for float32 params")
        if half is not None:
            half, half_storage = numpy_dtype(half, self.bfloat16_bits, "half")
            if half_storage not in HALF or storage != "float32":
                raise TypeError(f"half={half}: the half twin is bfloat16 or float16, of "
                                "float32 params")
        self.shapes = {}
        for name, shape in shapes.items():
            if not isinstance(name, str):
                raise TypeError(f"names must be strings, got {name!r}")
            self.shapes[name] = _shape(name, shape)
        self.dtype = dtype
        self.offsets = {}
        at = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = at
            at += int(np.prod(shape, dtype=np.int64))
        self.size = at
        self.param = np.zeros(at, dtype=dtype)
        self.grad = np.zeros(at, dtype=grad_dtype)
        self.params = self._views(self.param)
        self.grads = self._views(self.grad)
        # The half twin: the params rounded to half precision by each optimizer step.
        self.half = None if half is None else np.zeros(at, dtype=half)
        self.halves = None if half is None else self._views(self.half)
        if init is not None:
            self.assign(init)

    def _views(self, flat):
        views = {}
        for name, shape in self.shapes.items():
            at = self.offsets[name]
            views[name] = flat[at:at + int(np.prod(shape, dtype=np.int64))].reshape(shape)
        return views

    def views(self, flat):
        """Named views of another flat array laid out like ``param`` (e.g. optimizer state)."""
        if not isinstance(flat, np.ndarray) or flat.shape != (self.size,):
            raise ValueError(f"expected a 1-D array of {self.size} elements")
        return self._views(flat)

    @property
    def names(self):
        return list(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def __repr__(self):
        return f"FlatParams({len(self)} tensors, {self.size} elements, {self.dtype})"

    def zero_grad(self):
        """Set every gradient to zero (one fill over the flat buffer)."""
        self.grad.fill(0)

    def assign(self, values):
        """Copy ``values`` (dict name -> array of that shape) into the parameters; checked first."""
        if not isinstance(values, dict):
            raise TypeError("values must be a dict name -> array")
        arrays = {}
        for name, v in values.items():
            if name not in self.shapes:
                raise KeyError(f"unknown parameter {name!r}")
            a = np.asarray(v)
            if a.shape != self.shapes[name]:
                raise ValueError(f"{name!r} has shape {a.shape}, expected {self.shapes[name]}")
            arrays[name] = a
        for name, a in arrays.items():
            np.copyto(self.params[name], a, casting="same_kind")

    # -- saving -----------------------------------------------------------------------------

    def state_dict(self):
        """Names, shapes, dtype and a copy of the parameters."""
        return {"format": _FORMAT, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "dtype": self.dtype.name, "param": self.param.copy()}

    def load_state_dict(self, state):
        """Copy parameters saved by ``state_dict`` back; names, shapes and dtype must match."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a FlatParams state dict")
        shapes = {k: tuple(v) for k, v in state["shapes"].items()}
        if list(shapes.items()) != list(self.shapes.items()):
            raise ValueError("the saved parameters have other names or shapes")
        param = state["param"]
        if not isinstance(param, np.ndarray) or param.shape != (self.size,) \
                or param.dtype != self.dtype:
            raise ValueError(f"saved param must be a {self.dtype} array of {self.size} elements")
        np.copyto(self.param, param)

    def save(self, path):
        """Write names, shapes, dtype and parameters to an ``.npz`` file (no pickle)."""
        bf16 = self.dtype.name == "bfloat16" or self.bfloat16_bits and self.dtype == np.uint16
        header = json.dumps({"format": _FORMAT, "shapes": {k: list(v) for k, v in
                                                            self.shapes.items()},
                             "dtype": "bfloat16" if bf16 else self.dtype.name,
                             "bfloat16_bits": self.bfloat16_bits})
        # bfloat16 is written as its uint16 bits: .npz has no bfloat16 type.
        np.savez(path, header=np.array(header),
                 param=self.param.view(np.uint16) if bf16 else self.param)

    @classmethod
    def load(cls, path):
        """A new FlatParams from a file written by ``save``."""
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                header = json.loads(str(f["header"]))
                param = f["param"]
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path} is not a FlatParams file: {exc}") from None
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a FlatParams file")
        flat = cls({k: tuple(v) for k, v in header["shapes"].items()}, header["dtype"],
                   bfloat16_bits=bool(header.get("bfloat16_bits", False)))
        if header["dtype"] == "bfloat16" and param.dtype == np.uint16:
            param = param.view(flat.dtype)
        flat.load_state_dict({**header, "param": param})
        return flat
