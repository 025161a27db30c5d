"""The compiled optimizers against torch.optim (single-tensor for-loop path) on the same data,
params and every state buffer, 50 steps in lockstep. Skipped where torch is not installed."""
import numpy as np
import pytest

from cases import CONFIGS, OPTIMIZERS, config_id, make_grads, make_params

torch = pytest.importorskip("torch")

from lrfast._specs import OPTIMIZERS as SPECS  # noqa: E402

# torch.optim's class for every optimizer of the spec table that torch has.
TORCH_CLASSES = {name: getattr(torch.optim, spec.torch.cls) for name, spec in SPECS.items()
                 if spec.torch is not None and spec.torch.cls is not None}
SHAPES = [(0,), (1,), (7,), (3, 5), (100_003,)]
STEPS = 50
# torch's vectorised CPU kernels may fuse multiply-adds (lerp, addcmul, addcdiv), so a few ulps
# of difference per step are expected. Where a buffer accumulates terms and then cancels
# (RMSprop's momentum buffer), the error is a few ulps of the buffer's largest values, not of
# the small result: the absolute tolerance is scaled by the array's magnitude.
RTOL = {np.float64: 1e-10, np.float32: 1e-5}
ATOL = {np.float64: 1e-12, np.float32: 1e-6}


def assert_close(actual, desired, dtype, msg):
    scale = max(1.0, float(np.abs(desired).max())) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=RTOL[dtype], atol=ATOL[dtype] * scale,
                               err_msg=msg)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in CONFIGS if c[2]], ids=config_id)
def test_matches_torch(case, dtype):
    name, hyper, _ = case
    if dtype == np.float64 and SPECS[name].update.scalar_state:
        # NAdam's and ASGD's scalar state: torch keeps it in the default dtype, lrfast in
        # float64 for float64 params; the same with torch's default dtype float64.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return _matches_torch(name, hyper, dtype)
        finally:
            torch.set_default_dtype(previous)
    _matches_torch(name, hyper, dtype)


def _matches_torch(name, hyper, dtype):
    # torch's Adafactor divides by an empty param's size (ZeroDivisionError): not that one.
    shapes = [s for s in SHAPES if np.prod(s)] if name == "Adafactor" else SHAPES
    params = make_params(shapes, dtype)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    torch_hyper = {k: v for k, v in hyper.items()}
    topt = TORCH_CLASSES[name](tparams, foreach=False, **torch_hyper)
    opt = OPTIMIZERS[name](params, **hyper)
    rng = np.random.default_rng(7)
    for _ in range(STEPS):
        grads = make_grads(shapes, dtype, rng)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
        opt.step(grads)
    sd = opt.state_dict()["state"]
    for k, (p, tp) in enumerate(zip(params, tparams)):
        assert_close(p, tp.detach().numpy(), dtype, f"param {k}")
        tstate = {n: v for n, v in topt.state[tp].items() if n != "step"}
        assert set(tstate) == set(sd[k]), (sorted(tstate), sorted(sd[k]))
        for n, v in tstate.items():
            assert_close(sd[k][n], v.numpy(), dtype, f"{n}[{k}]")
