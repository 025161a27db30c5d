"""FlatParams (one buffer for params, one for grads, one per state buffer) and the memory of a
step: nothing is allocated per step, and an optimizer holds exactly its state buffers."""
import gc
import tracemalloc

import numpy as np
import pytest

import lrfast
from cases import CONFIGS, OPTIMIZERS, config_id, snapshot

SHAPES = {"embed": (50, 16), "w1": (16, 32), "b1": (32,), "empty": (0, 3), "w2": (32, 1),
          "b2": (1,), "big": (70_001,)}


def flat_and_dict(dtype, seed=0):
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    flat = lrfast.FlatParams(SHAPES, dtype, init=init)
    separate = {k: v.astype(dtype) for k, v in init.items()}
    return flat, separate


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONFIGS, ids=config_id)
def test_flat_path_is_bitwise_the_list_path(case, dtype):
    name, hyper, _ = case
    flat, separate = flat_and_dict(dtype)
    fopt = OPTIMIZERS[name](flat, **hyper)
    dopt = OPTIMIZERS[name](separate, **hyper)
    rng = np.random.default_rng(1)
    for _ in range(15):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
        for k, g in grads.items():
            flat.grads[k][...] = g
        fopt.step()
        dopt.step(grads)
    for k in SHAPES:
        assert flat.params[k].tobytes() == separate[k].tobytes(), k
    fs, ds = fopt.state_dict()["state"], dopt.state_dict()["state"]
    assert set(fs) == set(SHAPES)
    for k in SHAPES:
        for buf in ds[k]:
            assert fs[k][buf].tobytes() == ds[k][buf].tobytes(), (k, buf)


def test_flat_views_names_and_state_exchange():
    flat, separate = flat_and_dict(np.float32)
    assert flat.names == list(SHAPES) and flat.params["w1"].shape == (16, 32)
    assert np.shares_memory(flat.params["w1"], flat.param)
    assert np.shares_memory(flat.grads["b1"], flat.grad)
    assert flat.size == sum(int(np.prod(s)) for s in SHAPES.values())
    flat.grads["w1"][...] = 1.0
    flat.zero_grad()
    assert not flat.grad.any()
    # A state saved by the flat optimizer loads into one over separate arrays, and back.
    fopt = lrfast.AdamW(flat, lr=0.01)
    flat.grad[...] = 0.5
    fopt.step()
    dopt = lrfast.AdamW(separate, lr=0.01)
    dopt.load_state_dict(fopt.state_dict())
    assert dopt.step_count == 1
    fopt2 = lrfast.AdamW(lrfast.FlatParams(SHAPES, np.float32), lr=0.01)
    fopt2.load_state_dict(dopt.state_dict())
    assert fopt2.state_dict()["state"]["w1"]["exp_avg"].tobytes() == \
        fopt.state_dict()["state"]["w1"]["exp_avg"].tobytes()


def test_flat_save_and_load(tmp_path):
    flat, _ = flat_and_dict(np.float64, seed=3)
    path = tmp_path / "model.npz"
    flat.save(path)
    again = lrfast.FlatParams.load(path)
    assert again.names == flat.names and again.shapes == flat.shapes
    assert again.dtype == flat.dtype and again.param.tobytes() == flat.param.tobytes()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a FlatParams file"):
        lrfast.FlatParams.load(tmp_path / "junk.npz")
    other = lrfast.FlatParams({"x": (3,)}, np.float64)
    with pytest.raises(ValueError, match="other names or shapes"):
        other.load_state_dict(flat.state_dict())


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: lrfast.FlatParams({}), ValueError, "non-empty dict"),
    (lambda: lrfast.FlatParams({"a": (2, -1)}), ValueError, "ints >= 0"),
    (lambda: lrfast.FlatParams({"a": (2.5,)}), ValueError, "ints >= 0"),
    (lambda: lrfast.FlatParams({1: (2,)}), TypeError, "names must be strings"),
    (lambda: lrfast.FlatParams({"a": (2,)}, np.int32), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got int32"),
    (lambda: lrfast.FlatParams({"a": (2,)}, init={"a": np.zeros(3)}), ValueError, "shape"),
    (lambda: lrfast.FlatParams({"a": (2,)}, init={"b": np.zeros(2)}), KeyError, "unknown"),
])
def test_flat_bad_input(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_flat_optimizer_refuses_foreign_grads():
    flat, _ = flat_and_dict(np.float32)
    opt = lrfast.Adam(flat)
    before = snapshot(opt)
    with pytest.raises(TypeError, match="call step\\(\\) without arguments"):
        opt.step([np.zeros(3, np.float32)])
    assert snapshot(opt) == before
    opt.step(flat.grads)          # its own grads are accepted in any of their forms
    assert opt.step_count == 1


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_steady_state_steps_allocate_nothing(name):
    """tracemalloc over 100 steps (after warm-up): the peak rises by less than 1 KiB, i.e. no
    array, temporary or table is allocated per step; only interpreter-level ints come and go."""
    hyper = {"SGD": dict(lr=0.01, momentum=0.9), "RMSprop": dict(centered=True, momentum=0.5)}
    params = [np.zeros(s, np.float32) for s in [(1000,), (64, 64), (100_000,)]]
    grads = [np.ones_like(p) for p in params]
    opt = OPTIMIZERS[name](params, **hyper.get(name, {}))
    for _ in range(5):
        opt.step(grads)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(100):
            opt.step(grads)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 1024, (base, current, peak)
    assert current - base < 1024


@pytest.mark.parametrize("name, buffers", [("SGD", 1), ("Adagrad", 1), ("RMSprop", 3),
                                           ("Adam", 2), ("AdamW", 2)])
def test_optimizer_memory_is_its_state_buffers(name, buffers):
    """Constructing the optimizer allocates its state (buffers x elements x itemsize) plus a few
    KiB of address tables, nothing more; RMSprop here is centered with momentum (3 buffers)."""
    hyper = {"SGD": dict(lr=0.01, momentum=0.9), "RMSprop": dict(centered=True, momentum=0.5)}
    params = [np.zeros(s, np.float64) for s in [(1000,), (64, 64), (200_000,)]]
    elements = sum(p.size for p in params)
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        opt = OPTIMIZERS[name](params, **hyper.get(name, {}))
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    state = buffers * elements * 8
    assert state <= current - base < state + 64 * 1024, (current - base, state)
    assert opt.step_count == 0
