"""Thread control, determinism across thread counts, and exact resume through state_dict."""
import numpy as np
import pytest

import lrfast
from cases import CONFIGS, OPTIMIZERS, config_id, make_grads, make_params, run_python, snapshot

SHAPES = [(5,), (300_001,), (17,), (100_000,), (0,)]


def run(name, hyper, dtype, steps, nthreads):
    params = make_params(SHAPES, dtype)
    opt = OPTIMIZERS[name](params, **hyper)
    rng = np.random.default_rng(11)
    with lrfast.threads(nthreads):
        for _ in range(steps):
            opt.step(make_grads(SHAPES, dtype, rng))
    return snapshot(opt)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_bitwise_identical_for_1_2_3_threads(case, dtype):
    name, hyper, _ = case
    one = run(name, hyper, dtype, 5, 1)
    assert run(name, hyper, dtype, 5, 2) == one
    assert run(name, hyper, dtype, 5, 3) == one


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_state_dict_round_trip_mid_run_is_exact(case, dtype):
    """Stop after 20 of 40 steps, rebuild from state_dict in a new optimizer, finish: the
    trajectory is bitwise the one of an uninterrupted run."""
    name, hyper, _ = case
    rng = np.random.default_rng(12)
    grads = [make_grads(SHAPES, dtype, rng) for _ in range(40)]

    straight = OPTIMIZERS[name](make_params(SHAPES, dtype), **hyper)
    for g in grads:
        straight.step(g)

    first = OPTIMIZERS[name](make_params(SHAPES, dtype), **hyper)
    for g in grads[:20]:
        first.step(g)
    saved = first.state_dict()
    resumed_params = [p.copy() for p in first.params]
    second = OPTIMIZERS[name](resumed_params, **hyper)
    second.load_state_dict(saved)
    assert second.step_count == 20
    for g in grads[20:]:
        second.step(g)
    assert snapshot(second)[:3] == snapshot(straight)[:3]


def test_state_dict_is_a_copy_and_load_switches_buffers():
    params = make_params([(4,)], np.float64)
    opt = lrfast.Adam(params, lr=0.1)
    opt.step([np.ones(4)])
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][:] = 123.0
    assert not np.any(opt.state_dict()["state"][0]["exp_avg"] == 123.0)
    # A state saved with amsgrad=True brings its extra buffer along.
    other = lrfast.Adam(make_params([(4,)], np.float64), lr=0.1, amsgrad=True)
    other.step([np.ones(4)])
    opt.load_state_dict(other.state_dict())
    assert opt.hyperparams["amsgrad"] is True
    assert set(opt.state_dict()["state"][0]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    opt.step([np.ones(4)])
    assert opt.step_count == 2


def test_schedule_survives_load():
    """A schedule passed to the optimizer is kept on load and resumes at the loaded step."""
    def schedule(t):
        return 1.0 / (t + 1)

    a = lrfast.SGD(make_params([(3,)], np.float64), lr=schedule)
    for _ in range(3):
        a.step([np.ones(3)])
    b = lrfast.SGD(make_params([(3,)], np.float64), lr=schedule)
    b.load_state_dict(a.state_dict())
    b.step([np.ones(3)])
    assert b.last_lr == 0.25 and b.lr is schedule


def test_set_get_and_context_manager():
    # A build without OpenMP runs everything on one thread, and says so.
    def expect(n):
        return n if lrfast._openmp.openmp_enabled() else 1

    default = lrfast.get_num_threads()
    assert default >= 1
    with lrfast.threads(1):
        assert lrfast.get_num_threads() == 1
        with lrfast.threads(3):
            assert lrfast.get_num_threads() == expect(3)
        assert lrfast.get_num_threads() == 1
    assert lrfast.get_num_threads() == default
    try:
        lrfast.set_num_threads(2)
        assert lrfast.get_num_threads() == expect(2)
    finally:
        lrfast.set_num_threads(None)
    assert lrfast.get_num_threads() == default
    with pytest.raises(ValueError, match="at least 1"):
        lrfast.set_num_threads(0)
    with pytest.raises(TypeError, match="must be an int or None"):
        lrfast.threads(1.5)


def test_omp_num_threads_is_honoured():
    if not lrfast._openmp.openmp_enabled():
        pytest.skip("built without OpenMP")
    code = "import lrfast; print(lrfast.get_num_threads())"
    assert run_python(code, OMP_NUM_THREADS="1").stdout.strip() == "1"
    assert run_python(code, OMP_NUM_THREADS="3").stdout.strip() == "3"


def test_threadpoolctl_sees_and_limits_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not lrfast._openmp.openmp_enabled():
        pytest.skip("built without OpenMP")
    info = threadpoolctl.threadpool_info()
    assert any(i["user_api"] == "openmp" for i in info), info
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert lrfast.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        assert lrfast.get_num_threads() == 2


def test_show_config(capsys):
    lrfast.show_config()
    out = capsys.readouterr().out
    for key in ("lrfast", "compiler", "openmp", "simd", "num_threads"):
        assert key in out
    assert lrfast.__version__ in out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_kernel_builds_bitwise_identical(case, dtype):
    """The portable and the AVX2 builds of the kernels give the same bits (no FMA in either)."""
    from lrfast import _dispatch

    if "avx2" not in _dispatch.available():
        pytest.skip("no AVX2 build or CPU here")
    name, hyper, _ = case
    results = {}
    for build in ("baseline", "avx2"):
        with _dispatch.using(build):
            results[build] = run(name, hyper, dtype, 5, 2)
    assert results["baseline"] == results["avx2"]


def test_dispatch_env_override():
    code = "from lrfast import _dispatch; print(_dispatch.name)"
    out = run_python(code, LRFAST_DISPATCH="baseline")
    assert out.stdout.strip() == "baseline", out.stderr
    out = run_python(code, LRFAST_DISPATCH="sse9")
    assert out.returncode != 0 and "LRFAST_DISPATCH must be auto, baseline or avx2" in out.stderr


def test_baseline_dispatch_never_imports_the_avx2_build():
    """Importing the AVX2 build runs code compiled for AVX2, so lrfast imports it only when the
    CPU has AVX2 and never under LRFAST_DISPATCH=baseline. Here any attempt to import it fails
    loudly, and lrfast must still import and step."""
    code = (
        "import sys, importlib.machinery\n"
        "class Refuse:\n"
        "    def create_module(self, spec):\n"
        "        raise RuntimeError('imported ' + spec.name)\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if not name.endswith('_avx2'):\n"
        "            return None\n"
        "        spec = importlib.machinery.PathFinder.find_spec(name, path)\n"
        "        if spec is not None:\n"
        "            spec.loader = Refuse()\n"
        "        return spec\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, lrfast\n"
        "p = [np.ones(5, np.float32)]\n"
        "lrfast.Adam(p, lr=0.5).step([np.ones(5, np.float32)])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('lrfast._'))\n"
        "print(lrfast._dispatch.name, lrfast._dispatch.available(), float(p[0][0]), loaded)\n"
    )
    out = run_python(code, LRFAST_DISPATCH="baseline")
    assert out.returncode == 0, out.stderr
    name, rest = out.stdout.split(" ", 1)
    assert name == "baseline" and rest.startswith("['baseline'] 0.5")
    assert "_avx2" not in rest


def test_debug_build_checks_bounds():
    """LRFAST_DEBUG_CYTHON=1 builds turn Cython's bounds checks on: an index past a typed
    memoryview raises IndexError there (a release build does not check)."""
    if not lrfast._openmp.build_info()["debug_checks"]:
        pytest.skip("release build (LRFAST_DEBUG_CYTHON=1 enables this test)")
    with pytest.raises(IndexError):
        lrfast._optim._debug_index(np.zeros(3, np.intp), 3)


def test_two_threads_two_optimizers_match_sequential():
    """The kernels release the GIL: two optimizers stepped from two Python threads at once end
    exactly where stepping them one after the other ends."""
    import threading

    def make(seed):
        return lrfast.Adam(make_params(SHAPES, np.float32, seed=seed), lr=0.01)

    rng = np.random.default_rng(5)
    grads = [make_grads(SHAPES, np.float32, rng) for _ in range(10)]
    a, b = make(1), make(2)
    threads_ = [threading.Thread(target=lambda o=o: [o.step(g) for g in grads]) for o in (a, b)]
    for th in threads_:
        th.start()
    for th in threads_:
        th.join()
    a2, b2 = make(1), make(2)
    for g in grads:
        a2.step(g)
        b2.step(g)
    assert snapshot(a) == snapshot(a2) and snapshot(b) == snapshot(b2)


def test_one_optimizer_from_two_threads_never_corrupts():
    """Overlapping steps of one optimizer are refused with a clear error; the steps that ran
    leave exactly the state of that many sequential steps (every step here has the same grads)."""
    import threading

    big = [(2_000_000,)]
    opt = lrfast.Adam(make_params(big, np.float32), lr=0.01)
    grads = make_grads(big, np.float32, np.random.default_rng(6))
    refused = []

    def worker():
        for _ in range(15):
            try:
                opt.step(grads)
            except RuntimeError as exc:
                assert "already running in another thread" in str(exc)
                refused.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done = opt.step_count
    assert done + len(refused) == 30
    ref = lrfast.Adam(make_params(big, np.float32), lr=0.01)
    for _ in range(done):
        ref.step(grads)
    assert snapshot(opt) == snapshot(ref)
