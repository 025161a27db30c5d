"""Weight averages: an exponential moving average (EMA) or the uniform running mean of SWA and
Polyak averaging, kept beside the params and moved toward them after each step.

One :class:`Averager` holds an average buffer per param (same shape and element type) and
updates all of them in one native call per element type, in parallel. Given to an optimizer
as ``ema=``, its update is fused into the optimizer's step: each tile of params is averaged
right after it is written, so the step reads the params once.

Step ``t`` (1-based: the number of updates the averager has seen, this one included) does:

* nothing, unless ``(t - 1) % update_every == 0``;
* with ``e = t - start_step - 1``: a copy of the params when ``e <= 0`` (before the averaging
  starts, and its first sample: the average then equals the params, as torch's
  ``AveragedModel``, timm's ``ModelEmaV3`` and ema-pytorch's ``EMA`` do);
* else ``average = lerp(average, param, w)`` with
  ``w = 1 - decay(e)`` (``kind="ema"``; ``decay`` a number or a function of ``e``), or
  ``w = 1 / (n + 1)`` (``kind="swa"``, where ``n`` is the number of samples in the mean).

``lerp`` is torch's: ``a + w (p - a)`` for ``w < 0.5``, else ``p - (p - a)(1 - w)``, with ``w``
rounded to the params' precision, and without fused multiply-adds: bitwise torch's
``_foreach_lerp_(averages, params, w)`` on torch's baseline CPU kernels, and within rounding of
its AVX2/AVX-512 kernels, which fuse the multiply-add (equal again when ``w`` is a power of
two). Half-precision averages compute in float32 and round to nearest.

The peers map onto it as follows (``t``: the averager's step):

* torch ``AveragedModel`` with ``get_ema_multi_avg_fn(decay)``: ``Averager(params, decay)``;
  with its default ``avg_fn`` (SWA): ``Averager(params, kind="swa")``;
* timm ``ModelEmaV3(decay, min_decay, use_warmup, warmup_gamma, warmup_power,
  update_after_step)`` updated with ``step=t``: ``Averager(params, warmup_decay(decay,
  inv_gamma=warmup_gamma, power=warmup_power, min_decay=min_decay),
  start_step=update_after_step)`` (a fixed ``decay`` without warmup);
* ema-pytorch ``EMA(beta, update_after_step, update_every, inv_gamma, power, min_value)``:
  the same with ``update_every``;
* TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``: :func:`num_updates_decay`;
* torch ``ASGD``'s ``ax`` (the average of the iterates from step ``t0 + 2`` on):
  ``Averager(params, kind="swa", start_step=t0 + 1)``.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Mapping

import numpy as np

from . import _dispatch, _layout
from ._threads import get_num_threads
from ._validation import as_named, check_array, check_bool, check_choice, check_count, \
    check_disjoint, check_real, label
from .flat import FlatParams

__all__ = ["Averager", "warmup_decay", "num_updates_decay"]

KINDS = ("ema", "swa")


class _Decay:
    """A decay schedule of the averaging step ``e`` (>= 1); checked once, at construction."""

    def __init__(self, fn, description):
        self._fn = fn
        self._description = description

    def __call__(self, e):
        return self._fn(e)

    def __repr__(self):
        return self._description


def warmup_decay(decay=0.9999, *, inv_gamma=1.0, power=2 / 3, min_decay=0.0):
    """The EMA decay warmup of timm (``use_warmup``) and ema-pytorch:
    ``decay(e) = clip(1 - (1 + e / inv_gamma) ** -power, min_decay, decay)``.

    ``power=2/3`` reaches 0.999 near 31.6k steps and 0.9999 near 1M; ``power=3/4``, 0.999 near
    10k and 0.9999 near 215k.

    >>> d = warmup_decay(0.999, power=1.0)
    >>> d(1), d(3), d(10**6)
    (0.5, 0.75, 0.999)
    """
    decay = check_real(decay, "decay", low=0.0, high=1.0)
    inv_gamma = check_real(inv_gamma, "inv_gamma", low=0.0, low_open=True)
    power = check_real(power, "power", low=0.0, low_open=True)
    min_decay = check_real(min_decay, "min_decay", low=0.0, high=1.0)
    if min_decay > decay:
        raise ValueError(f"min_decay ({min_decay}) must not exceed decay ({decay})")

    def fn(e):
        return max(min(1.0 - (1.0 + e / inv_gamma) ** -power, decay), min_decay)
    return _Decay(fn, f"warmup_decay({decay}, inv_gamma={inv_gamma}, power={power}, "
                      f"min_decay={min_decay})")


def num_updates_decay(decay=0.9999):
    """TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``:
    ``decay(e) = min(decay, (1 + e) / (10 + e))``.

    >>> d = num_updates_decay(0.99)
    >>> d(1), d(8), d(10**6)
    (0.18181818181818182, 0.5, 0.99)
    """
    decay = check_real(decay, "decay", low=0.0, high=1.0)
    return _Decay(lambda e: min(decay, (1.0 + e) / (10.0 + e)), f"num_updates_decay({decay})")


def _decay_value(decay, e):
    if not callable(decay):
        return decay
    value = decay(e)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0 <= float(value) <= 1:
        raise ValueError(f"the decay schedule returned {value!r} at averaging step {e}; a decay "
                         "must be a real number in [0, 1]")
    return float(value)


class Averager:
    """An average of ``params`` (list, dict or :class:`FlatParams`) kept in buffers of their
    shapes and element types, updated in place by :meth:`update` or fused into an optimizer's
    step (``ema=``).

    Parameters
    ----------
    params : list, tuple or dict of arrays, or a FlatParams
        The arrays to average (float32, float64, float16 or bfloat16; C-contiguous). The
        averages start as copies of them.
    decay : float in [0, 1] or callable ``e -> decay``, default 0.9999
        The EMA's decay (``kind="ema"`` only): a number, or a schedule of the averaging step
        ``e = t - start_step - 1`` (:func:`warmup_decay`, :func:`num_updates_decay`, or any
        function returning a number in [0, 1]).
    kind : "ema" (default) or "swa"
        "swa": the uniform mean of the params sampled since the averaging started (SWA,
        Polyak-Ruppert averaging, ASGD's average).
    start_step : int >= 0, default 0
        Steps ``t <= start_step + 1`` copy the params into the averages (see the module).
    update_every : int >= 1, default 1
        Only steps with ``(t - 1) % update_every == 0`` touch the averages.
    bfloat16_bits : bool, default False
        uint16 arrays hold bfloat16 bits.

    Examples
    --------
    An EMA with decay 0.5 of a param that steps 0 -> 2 -> 4: the first update copies (the
    average starts as the params), the second moves halfway:

    >>> import numpy as np
    >>> import lrfast
    >>> w = np.zeros(2)
    >>> ema = lrfast.Averager([w], decay=0.5)
    >>> w += 2; ema.update(); ema.averages[0].tolist()
    [2.0, 2.0]
    >>> w += 2; ema.update(); ema.averages[0].tolist()
    [3.0, 3.0]

    Evaluate with the averaged weights, then return to the trained ones:

    >>> with ema.averaged():
    ...     w.tolist()
    [3.0, 3.0]
    >>> w.tolist()
    [4.0, 4.0]

    The uniform mean (SWA) of the same values:

    >>> w[...] = 0; swa = lrfast.Averager([w], kind="swa")
    >>> for _ in range(3):
    ...     w += 2; swa.update()
    >>> swa.averages[0].tolist(), swa.num_averaged
    ([4.0, 4.0], 3)
    """

    def __init__(self, params, decay=None, *, kind="ema", start_step=0, update_every=1,
                 bfloat16_bits=False):
        self._kind = check_choice(kind, "kind", KINDS)
        if kind == "swa":
            if decay is not None:
                raise ValueError("decay is for kind='ema'; the uniform mean (kind='swa') has "
                                 "none")
        elif decay is None:
            decay = 0.9999
        elif not callable(decay):
            decay = check_real(decay, "decay", low=0.0, high=1.0)
        self._decay = decay
        self._start_step = check_count(start_step, "start_step", low=0)
        self._update_every = check_count(update_every, "update_every", low=1)
        self._bits = check_bool(bfloat16_bits, "bfloat16_bits")
        self._flat = params if isinstance(params, FlatParams) else None
        if self._flat is not None:
            flat = self._flat
            self._bits = self._bits or flat.bfloat16_bits
            keys, arrays, is_dict = list(flat.names), [flat.params[k] for k in flat.names], True
            whole = [flat.param]
        else:
            keys, arrays, is_dict = as_named(params, "params")
            whole = arrays
        if not arrays:
            raise ValueError("Averager got an empty parameter list")
        labels = [label("params", k) for k in keys]
        storages = [check_array(a, what, writeable=True, bfloat16_bits=self._bits)
                    for a, what in zip(arrays, labels)]
        check_disjoint(arrays, labels)
        self._keys, self._params, self._is_dict = keys, arrays, is_dict
        # The averages, as copies of the params: one buffer per element type (FlatParams: one
        # laid out as its param buffer, with named views).
        if self._flat is not None:
            self._flat_average = self._flat.param.copy()
            views = self._flat.views(self._flat_average)
            self._averages = [views[k] for k in keys]
            pairs = [(self._flat.param, self._flat_average)]
            tensor_storages = [storages[0]] if storages else []
        else:
            self._flat_average = None
            self._averages = [None] * len(arrays)
            for storage in dict.fromkeys(storages):
                idx = [i for i, s in enumerate(storages) if s == storage]
                buf = np.empty(sum(arrays[i].size for i in idx), dtype=arrays[idx[0]].dtype)
                at = 0
                for i in idx:
                    p = arrays[i]
                    self._averages[i] = buf[at:at + p.size].reshape(p.shape)
                    np.copyto(self._averages[i], p)
                    at += p.size
            pairs = list(zip(whole, self._averages))
            tensor_storages = storages
        # One native table (averages, params) per element type.
        self._tables = []
        for storage in dict.fromkeys(tensor_storages):
            sel = [pair for pair, s in zip(pairs, tensor_storages) if s == storage]
            table, offsets = _layout.table(
                [[_layout.address(a) for _, a in sel], [_layout.address(p) for p, _ in sel]],
                [p.size for p, _ in sel])
            self._tables.append((storage, table, offsets))
        # {(address, nbytes, dtype) of a param array: its average}: how an optimizer over the
        # same arrays (or a FlatParams' whole buffer) finds the average of each of its tensors.
        self._lookup = {(_layout.address(p), p.nbytes, p.dtype): a
                        for p, a in list(zip(arrays, self._averages)) + pairs}
        self._step_count = 0
        self._num_averaged = 0
        self._last_weight = None
        self._swapped = False
        self._owner = None
        self._busy = threading.Lock()

    # -- what a step does ------------------------------------------------------------------

    def _next(self):
        """(mode, weight, samples after it) for the next step: mode "none", "copy" or "lerp"."""
        t = self._step_count + 1
        if (t - 1) % self._update_every:
            return "none", 0.0, self._num_averaged
        e = t - self._start_step - 1
        if e <= 0:
            return "copy", 1.0, 1
        if self._kind == "swa":
            return "lerp", 1.0 / (self._num_averaged + 1), self._num_averaged + 1
        return "lerp", 1.0 - _decay_value(self._decay, e), self._num_averaged + 1

    def _commit(self, step):
        mode, weight, n = step
        self._step_count += 1
        self._num_averaged = n
        if mode != "none":
            self._last_weight = weight

    def _run(self, mode, weight):
        nthreads = get_num_threads()
        for storage, table, offsets in self._tables:
            _dispatch.kernels.average_update(table, offsets, storage, mode, weight, nthreads)

    def _check_not_swapped(self, what):
        if self._swapped:
            raise RuntimeError(f"cannot {what} while the averages are swapped into the params; "
                               "call swap() again (or leave the averaged() block) first")

    def _average_of(self, arr):
        """The average of ``arr`` (one of the params, or a FlatParams' whole buffer)."""
        return self._lookup.get((_layout.address(arr), arr.nbytes, arr.dtype))

    # -- public API ------------------------------------------------------------------------

    def update(self) -> None:
        """Take step ``t = step_count + 1``: move every average toward its param (or copy it,
        or nothing; see the module), in one native call per element type.

        Call it after each optimizer step that was applied (``if opt.step(grads):``), so that
        a step skipped for a non-finite gradient leaves the average alone; an averager given
        to an optimizer as ``ema=`` is updated by its steps instead.
        """
        if self._owner is not None:
            raise RuntimeError(f"this Averager is updated by the steps of {self._owner}; do not "
                               "call update() as well")
        self._check_not_swapped("update the averages")
        with self._lock("update"):
            step = self._next()
            if step[0] != "none":
                self._run(step[0], step[1])
            self._commit(step)

    @contextlib.contextmanager
    def _lock(self, what):
        if not self._busy.acquire(False):
            raise RuntimeError(f"Averager.{what}() is already running in another thread")
        try:
            yield
        finally:
            self._busy.release()

    def swap(self) -> None:
        """Exchange the params and the averages, in place (no memory is allocated): after one
        call the params hold the averaged weights; a second call restores them."""
        with self._lock("swap"):
            nthreads = get_num_threads()
            for storage, table, offsets in self._tables:
                _dispatch.kernels.average_swap(table, offsets, storage, nthreads)
            self._swapped = not self._swapped

    @contextlib.contextmanager
    def averaged(self):
        """A ``with`` block in which the params hold the averaged weights (evaluation); they
        are swapped back when it ends, also on an exception."""
        self._check_not_swapped("enter averaged()")
        self.swap()
        try:
            yield self
        finally:
            self.swap()

    @property
    def swapped(self) -> bool:
        """Do the params hold the averages now (between two ``swap()`` calls)?"""
        return self._swapped

    @property
    def averages(self):
        """The average buffers, laid out as the params (list or dict; a FlatParams' names)."""
        if self._is_dict:
            return dict(zip(self._keys, self._averages))
        return list(self._averages)

    @property
    def flat_average(self):
        """For a FlatParams: the whole average buffer (laid out as ``flat.param``), else None."""
        return self._flat_average

    @property
    def step_count(self) -> int:
        """Steps seen (each ``update()``, or each applied step of the owning optimizer)."""
        return self._step_count

    @property
    def num_averaged(self) -> int:
        """Samples in the average since it last copied the params (torch's ``n_averaged``
        counts the same for ``start_step=0, update_every=1``)."""
        return self._num_averaged

    @property
    def last_weight(self):
        """The lerp weight of the last update that touched the averages (1.0: a copy)."""
        return self._last_weight

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def decay(self):
        return self._decay

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters and copies of the averages: everything needed to resume bitwise."""
        self._check_not_swapped("save the averages")
        return {"averager": self._kind, **self._counters(),
                "averages": {k: a.copy() for k, a in zip(self._keys, self._averages)}}

    def _counters(self) -> dict:
        return {"step_count": self._step_count, "num_averaged": self._num_averaged,
                "last_weight": self._last_weight}

    def load_state_dict(self, state_dict) -> None:
        """Restore a ``state_dict()``; everything is checked before anything changes."""
        self._check_not_swapped("load averages")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if state_dict.get("averager") != self._kind:
            raise ValueError(f"state_dict holds a {state_dict.get('averager')!r} average, this "
                             f"Averager keeps {self._kind!r}")
        counters = self._check_counters(state_dict, "state_dict")
        saved = state_dict.get("averages")
        if not isinstance(saved, Mapping) or set(saved) != set(self._keys):
            raise ValueError(f"state_dict['averages'] must have one entry per parameter "
                             f"{self._keys}")
        for key, avg in zip(self._keys, self._averages):
            self._check_average(saved[key], avg, f"state_dict['averages'][{key!r}]")
        self._commit_counters(counters)
        for key, avg in zip(self._keys, self._averages):
            np.copyto(avg, saved[key])

    def _check_counters(self, d, what) -> tuple:
        for key in ("step_count", "num_averaged", "last_weight"):
            if key not in d:
                raise ValueError(f"{what} is missing {key!r}")
        steps = check_count(d["step_count"], f"{what}['step_count']", low=0)
        n = check_count(d["num_averaged"], f"{what}['num_averaged']", low=0)
        w = d["last_weight"]
        if w is not None:
            w = check_real(w, f"{what}['last_weight']", low=0.0, high=1.0)
        return steps, n, w

    def _commit_counters(self, counters) -> None:
        self._step_count, self._num_averaged, self._last_weight = counters

    @staticmethod
    def _check_average(arr, avg, what) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{what} must be a numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != avg.shape or arr.dtype != avg.dtype:
            raise ValueError(f"{what} is {arr.dtype} {arr.shape}, the average is {avg.dtype} "
                             f"{avg.shape}")

    def __repr__(self):
        what = f"decay={self._decay!r}, " if self._kind == "ema" else ""
        return (f"Averager({len(self._params)} tensors, kind={self._kind!r}, {what}"
                f"start_step={self._start_step}, update_every={self._update_every})")
