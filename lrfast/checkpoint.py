"""Save and restore a training run's optimizer side in one file: exact resume.

A checkpoint holds the parameters, every state buffer, the step and skip counters, the
hyper-parameters, the learning-rate schedule's description and the state of every
``ReduceLROnPlateau`` that drives it. Loaded into a freshly built optimizer (same parameter
names, shapes and dtypes, same optimizer class, same schedule), it continues bitwise as the run
that never stopped. The embedding-table optimizers of ``lrfast.embedding`` (``SparseAdam`` and
the others) are saved the same way: their table stands in for the parameters, under the key
``"table"``.

The file is a NumPy ``.npz`` archive read with ``allow_pickle=False``: arrays, and a JSON
header stored as bytes. No code is pickled. The header carries a SHA-256 digest of the header
and of every array, so a truncated or corrupted file is refused. The file is written to a
temporary name in the same directory and renamed over ``path`` only when complete, so a crash
while saving leaves the previous checkpoint intact.

Loading checks everything (file integrity, optimizer class, parameter keys, shapes, dtypes,
state buffers, schedule, plateau configuration) before changing anything: a load that raises
has changed nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np

from .embedding import _RowOptimizer
from .optim import Optimizer
from .plateau import ReduceLROnPlateau
from .schedules import Schedule

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT = "lrfast-checkpoint"
VERSION = 1
_HEADER = "header"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not fit the optimizer it is loaded into.

    A subclass of ValueError. When ``load_checkpoint`` raises it, nothing has been changed.

    Examples
    --------
    A file that is not a checkpoint is refused before anything is read into the optimizer:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import lrfast
    >>> opt = lrfast.SGD([np.zeros(2)], lr=0.1)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "notes.npz")
    ...     with open(path, "w") as f:
    ...         _ = f.write("not a checkpoint")
    ...     lrfast.load_checkpoint(path, opt)
    Traceback (most recent call last):
        ...
    lrfast.checkpoint.CheckpointError: '...notes.npz' is not a readable lrfast checkpoint
    (truncated or corrupted?): ...
    >>> issubclass(lrfast.CheckpointError, ValueError)
    True
    """


def _plateaus(lr, extra) -> list[ReduceLROnPlateau]:
    """The ReduceLROnPlateau controllers inside schedule ``lr`` (depth first), then ``extra``."""
    found: list[ReduceLROnPlateau] = []

    def walk(node):
        if isinstance(node, ReduceLROnPlateau):
            if not any(node is f for f in found):
                found.append(node)
        elif isinstance(node, Schedule):
            for v in node._params.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(lr)
    for p in extra:
        if not isinstance(p, ReduceLROnPlateau):
            raise TypeError(f"plateaus must be ReduceLROnPlateau objects, got {type(p).__name__}")
        walk(p)
    return found


def _structure(spec):
    """A schedule description without the plateau factors' current values (they are state,
    saved with the plateaus), to compare the saved schedule with the optimizer's."""
    if isinstance(spec, dict):
        return {k: _structure(v) for k, v in spec.items()
                if not (k == "scale" and spec.get("type") == "with_plateau")}
    if isinstance(spec, list):
        return [_structure(v) for v in spec]
    return spec


def _schedule_spec(lr):
    if isinstance(lr, Schedule):
        return {"kind": "schedule", "spec": _structure(lr.to_dict())}
    if callable(lr):
        return {"kind": "callable", "spec": None}
    return {"kind": "constant", "spec": None}


def _digest(header: dict, arrays: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _check_optimizer(optimizer):
    if not isinstance(optimizer, (Optimizer, _RowOptimizer)):
        raise TypeError(f"optimizer must be an lrfast optimizer, got {type(optimizer).__name__}")


def save_checkpoint(path, optimizer, *, plateaus=()) -> None:
    """Write ``optimizer``'s parameters and full state, its schedule and plateau state to ``path``.

    ``optimizer`` is any lrfast optimizer: a dense one (``lrfast.optim``) or an embedding-table
    one (``lrfast.SparseAdam`` and the other classes of ``lrfast.embedding``), whose table is
    saved as its one parameter. Plateau controllers that are part of the optimizer's schedule
    (``schedule * plateau``) are found and saved automatically; pass others (driven by hand) in
    ``plateaus``.

    Examples
    --------
    One step of SGD with momentum, saved; then a new optimizer over new arrays, built the
    same way, is loaded from the file:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import lrfast
    >>> params = {"w": np.array([1.0, 2.0])}
    >>> opt = lrfast.SGD(params, lr=0.5, momentum=0.5)
    >>> opt.step({"w": np.array([1.0, 1.0])})
    True
    >>> print(params["w"])
    [0.5 1.5]
    >>> new_params = {"w": np.zeros(2)}
    >>> resumed = lrfast.SGD(new_params, lr=0.5, momentum=0.5)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "run.npz")
    ...     lrfast.save_checkpoint(path, opt)
    ...     lrfast.load_checkpoint(path, resumed)
    >>> resumed.step_count
    1
    >>> print(new_params["w"])
    [0.5 1.5]

    The momentum buffer (1, 1) came back too, so the next step is the same in both: the
    buffer becomes 0.5 * 1 + 1 = 1.5 and each weight moves by 0.5 * 1.5 = 0.75 (without the
    buffer it would move by 0.5):

    >>> grads = {"w": np.array([1.0, 1.0])}
    >>> opt.step(grads), resumed.step(grads)
    (True, True)
    >>> print(params["w"], new_params["w"])
    [-0.25  0.75] [-0.25  0.75]

    An embedding-table optimizer: the table and its per-row state come back the same way.

    >>> table = np.zeros((3, 2))
    >>> emb = lrfast.SparseAdam(table, lr=0.1)
    >>> emb.step(np.array([2, 2]), np.ones((2, 2)))
    True
    >>> fresh = lrfast.SparseAdam(np.zeros((3, 2)), lr=0.1)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "emb.npz")
    ...     lrfast.save_checkpoint(path, emb)
    ...     lrfast.load_checkpoint(path, fresh)
    >>> np.array_equal(fresh.table, table), fresh.step_count
    (True, 1)
    """
    _check_optimizer(optimizer)
    plateaus = _plateaus(optimizer.lr, list(plateaus))
    named = optimizer._named_state()
    for key, _, _ in named:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"checkpoint parameter keys must be str or int, got {key!r}")
    sd = optimizer.state_dict()
    hyper = dict(sd["hyperparams"])
    if "betas" in hyper:
        hyper["betas"] = list(hyper["betas"])
    arrays = {}
    entries = []
    for i, (key, param, views) in enumerate(named):
        arrays[f"param_{i}"] = param
        for name in views:
            arrays[f"state_{i}_{name}"] = views[name]
        entries.append({"key": key, "shape": list(param.shape), "dtype": param.dtype.str,
                        "state": sorted(views)})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": sd["optimizer"],
        "step_count": sd["step_count"],
        "skipped_steps": sd["skipped_steps"],
        "hyperparams": hyper,
        "lr": _schedule_spec(optimizer.lr),
        "params": entries,
        "plateaus": [p.state_dict() for p in plateaus],
    }
    # Entries a class adds to its state dict (schedule-free's group scalars: numbers, bools),
    # kept as they are in the header.
    extra = {k: v for k, v in sd.items()
             if k not in ("optimizer", "step_count", "skipped_steps", "hyperparams", "state")}
    if extra:
        header["extra"] = extra
    header["digest"] = _digest(header, arrays)
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lrfast-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path):
    """(header, arrays) from a checkpoint file, with its integrity checked."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from exc
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        header = json.loads(arrays.pop(_HEADER).tobytes().decode())
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError,
            json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path!r} is not a readable lrfast checkpoint (truncated or corrupted?): {exc}"
        ) from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an lrfast checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint format version {header.get('version')!r}; this lrfast "
            f"reads version {VERSION}"
        )
    fields = {"optimizer": str, "step_count": int, "skipped_steps": int, "hyperparams": dict,
              "lr": dict, "params": list, "plateaus": list, "digest": str}
    for field, kind in fields.items():
        if not isinstance(header.get(field), kind):
            raise CheckpointError(f"{path!r}: the header's {field!r} is missing or malformed")
    for e in header["params"]:
        if not (isinstance(e, dict) and {"key", "shape", "dtype", "state"} <= set(e)
                and isinstance(e["shape"], list) and isinstance(e["state"], list)
                and e["dtype"] in ("<f4", "<f8", ">f4", ">f8")):
            raise CheckpointError(f"{path!r}: a parameter entry of the header is malformed")
    if not isinstance(header.get("extra", {}), dict):
        raise CheckpointError(f"{path!r}: the header's 'extra' entry is malformed")
    if header["lr"].get("kind") not in ("schedule", "callable", "constant"):
        raise CheckpointError(f"{path!r}: the header's 'lr' entry is malformed")
    digest = header.pop("digest")
    if digest != _digest(header, arrays):
        raise CheckpointError(f"{path!r} is corrupted: its contents do not match their digest")
    return header, arrays


def load_checkpoint(path, optimizer, *, plateaus=()) -> None:
    """Restore a ``save_checkpoint`` file into ``optimizer`` (and its plateau controllers).

    ``optimizer`` must be built as the saved one was: same class, parameters with the same
    keys, shapes and dtypes (list, dict or FlatParams alike; for an embedding-table optimizer,
    a table of the same shape and dtype), and the same schedule when a schedule was saved.
    Raises CheckpointError (a ValueError) otherwise; nothing changes then. A plain Python
    callable as ``lr`` cannot be described in the file, so it is not checked: it must simply be
    the same function of the step count. As ``load_state_dict``, the saved hyper-parameters
    replace the optimizer's.

    Examples
    --------
    For the round trip, see ``save_checkpoint``. A checkpoint that does not fit is refused,
    and the optimizer it was loaded into is left as it was:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import lrfast
    >>> opt = lrfast.SGD({"w": np.array([1.0, 2.0])}, lr=0.5)
    >>> opt.step({"w": np.array([1.0, 1.0])})
    True
    >>> other = {"w": np.zeros(3)}
    >>> wrong = lrfast.SGD(other, lr=0.5)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "run.npz")
    ...     lrfast.save_checkpoint(path, opt)
    ...     lrfast.load_checkpoint(path, wrong)
    Traceback (most recent call last):
        ...
    lrfast.checkpoint.CheckpointError: ...: parameter 'w' was saved as float64 (2,),
    this optimizer's is float64 (3,)
    >>> wrong.step_count, other["w"].tolist()
    (0, [0.0, 0.0, 0.0])
    """
    _check_optimizer(optimizer)
    plateaus = _plateaus(optimizer.lr, list(plateaus))
    header, arrays = _read(os.fspath(path))
    name = type(optimizer).__name__
    if header["optimizer"] != name:
        raise CheckpointError(f"{path!r} was saved by {header['optimizer']}, not {name}")
    entries = optimizer._named_state()
    saved = header["params"]
    keys = [k for k, _, _ in entries]
    if [e["key"] for e in saved] != keys:
        raise CheckpointError(
            f"{path!r} holds the parameters {[e['key'] for e in saved]}, this optimizer has {keys}"
        )
    for i, (e, (key, param, _)) in enumerate(zip(saved, entries)):
        if tuple(e["shape"]) != param.shape or np.dtype(e["dtype"]) != param.dtype:
            raise CheckpointError(
                f"{path!r}: parameter {key!r} was saved as {np.dtype(e['dtype'])} "
                f"{tuple(e['shape'])}, this optimizer's is {param.dtype} {param.shape}"
            )
        got = arrays.get(f"param_{i}")
        if got is None or got.shape != param.shape or got.dtype != param.dtype:
            raise CheckpointError(f"{path!r}: the array of parameter {key!r} is missing or wrong")

    lr = header["lr"]
    if lr["kind"] == "schedule":
        mine = _structure(optimizer.lr.to_dict()) if isinstance(optimizer.lr, Schedule) else None
        if mine != lr["spec"]:
            raise CheckpointError(
                f"{path!r} was saved with the schedule {lr['spec']}, but this optimizer's lr is "
                f"{optimizer.lr!r}; build the optimizer with the same schedule"
            )
    if len(header["plateaus"]) != len(plateaus):
        raise CheckpointError(
            f"{path!r} holds the state of {len(header['plateaus'])} ReduceLROnPlateau, but "
            f"{len(plateaus)} were found in this optimizer's schedule and `plateaus`"
        )
    for saved_state, p in zip(header["plateaus"], plateaus):
        if saved_state.get("config") != p.config():
            raise CheckpointError(
                f"{path!r}: a ReduceLROnPlateau was saved with {saved_state.get('config')}, "
                f"this one has {p.config()}"
            )

    hyper = dict(header["hyperparams"])
    if "betas" in hyper and isinstance(hyper["betas"], list):
        hyper["betas"] = tuple(hyper["betas"])
    state = {key: {n: arrays.get(f"state_{i}_{n}") for n in saved[i]["state"]}
             for i, key in enumerate(keys)}
    if isinstance(optimizer, _RowOptimizer):
        # one table, whose state dict holds its buffers directly, not under the table's key
        (state,) = state.values()
    state_dict = {
        "optimizer": header["optimizer"],
        "step_count": header["step_count"],
        "skipped_steps": header["skipped_steps"],
        "hyperparams": hyper,
        "state": state,
    }
    state_dict.update({k: v for k, v in header.get("extra", {}).items() if k not in state_dict})
    try:
        checked = optimizer._check_state_dict(state_dict)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path!r} does not fit this optimizer: {exc}") from exc

    # Plateau states are checked by their own loader; undo on failure so nothing changes.
    before = [p.state_dict() for p in plateaus]
    done = []
    try:
        for saved_state, p in zip(header["plateaus"], plateaus):
            p.load_state_dict(saved_state)
            done.append(p)
    except (TypeError, ValueError) as exc:
        for p, old in zip(done, before):
            p.load_state_dict(old)
        raise CheckpointError(f"{path!r}: bad ReduceLROnPlateau state: {exc}") from exc

    for i, (_, param, _) in enumerate(entries):
        np.copyto(param, arrays[f"param_{i}"])
    optimizer._commit_state(checked)
