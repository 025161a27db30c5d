"""The tables the tests are driven by: optimizer configurations, and how to step each one with
lrfast.reference and with torch.optim on the same data."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import numpy as np

import lrfast
from lrfast import _dispatch
from lrfast._reference_run import ReferenceRun, step_kwargs  # noqa: F401  (imported from here)
from lrfast._specs import OPTIMIZERS as SPECS

# Every optimizer of the spec table, by its class name.
OPTIMIZERS = {name: getattr(lrfast, name) for name in SPECS}

# (optimizer, hyper-parameters, has a torch.optim equivalent). Every option appears at least once;
# the lerp weights 1-beta1 = 0.7 and 1-alpha = 0.55 take torch.lerp's second branch.
CONFIGS = [
    ("SGD", dict(lr=0.1), True),
    ("SGD", dict(lr=0.05, momentum=0.9), True),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01), True),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True), True),
    ("Adagrad", dict(lr=0.1), True),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1,
                     eps=1e-6), True),
    ("Adagrad", dict(lr=0.1, eps_inside_sqrt=True, maximize=True), False),
    ("RMSprop", dict(lr=0.01), True),
    ("RMSprop", dict(lr=0.01, alpha=0.9, centered=True), True),
    ("RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.01), True),
    ("RMSprop", dict(lr=0.01, alpha=0.45, momentum=0.5, centered=True, maximize=True), True),
    ("Adam", dict(lr=0.01), True),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True), True),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.9), eps=1e-6, maximize=True), True),
    ("AdamW", dict(lr=0.01), True),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True), True),
]
# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop
CONFIGS += [
    ("Adamax", dict(lr=0.01), True),
    ("Adamax", dict(lr=0.01, betas=(0.3, 0.999), eps=1e-6, weight_decay=0.1, maximize=True),
     True),
    # (50 steps: momentum steps, then rectified ones from the sixth)
    ("RAdam", dict(lr=0.01), True),
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1), True),
    ("RAdam", dict(lr=0.01, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.1,
                   decoupled_weight_decay=True, maximize=True), True),
    # (rho_inf = 3: never rectified)
    ("RAdam", dict(lr=0.01, betas=(0.9, 0.5), weight_decay=0.1, decoupled_weight_decay=True),
     True),
    ("Adadelta", dict(lr=1.0), True),
    ("Adadelta", dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.1, maximize=True), True),
    ("Rprop", dict(lr=0.01), True),
    ("Rprop", dict(lr=0.001, etas=(0.3, 1.5), step_sizes=(1e-4, 0.05), maximize=True), True),
]
# Updates with per-step scalar state: NAdam, ASGD
CONFIGS += [
    ("NAdam", dict(lr=0.01), True),
    ("NAdam", dict(lr=0.01, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.1, momentum_decay=0.05),
     True),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True), True),
    ("ASGD", dict(lr=0.01), True),
    ("ASGD", dict(lr=0.05, lambd=0.01, alpha=0.5, t0=2, weight_decay=0.1), True),
    ("ASGD", dict(lr=0.05, lambd=0.001, t0=0, maximize=True), True),
]
# Updates from outside torch.optim: Lion, ADOPT
CONFIGS += [
    ("Lion", dict(lr=0.01), False),
    ("Lion", dict(lr=0.01, betas=(0.3, 0.95), weight_decay=0.1), False),
    ("Lion", dict(lr=0.01, betas=(0.9, 1.0), weight_decay=0.5, decoupled_weight_decay=True),
     False),
    ("Adopt", dict(lr=0.01), False),
    ("Adopt", dict(lr=0.01, betas=(0.3, 0.99), eps=1e-3, clip_exp=None, weight_decay=0.1,
                   maximize=True), False),
    ("Adopt", dict(lr=0.01, clip_exp=0.5, weight_decay=0.1, decoupled=True), False),
    ("Adopt", dict(lr=0.01, weight_decay=0.1, decoupled=True, corrected_weight_decay=True,
                   caution=False), False),
    # caution: each tensor's mask mean (coupled decay in the mask's g; torch.lerp's second
    # branch with 1 - beta1 = 0.7; maximize)
    ("Adopt", dict(lr=0.01, caution=True), False),
    ("Adopt", dict(lr=0.01, betas=(0.3, 0.99), weight_decay=0.1, caution=True, maximize=True),
     False),
    ("Adopt", dict(lr=0.01, clip_exp=None, weight_decay=0.1, decoupled=True, caution=True),
     False),
]
# Per-tensor trust ratios: LAMB, LARS
CONFIGS += [
    ("Lamb", dict(lr=0.01), False),
    ("Lamb", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, max_grad_norm=None,
                  trust_clip=True), False),
    ("Lamb", dict(lr=0.01, bias_correction=False, grad_averaging=False, weight_decay=0.0,
                  always_adapt=True, max_grad_norm=0.5), False),
    ("Lamb", dict(lr=0.01, weight_decay=0.0), False),
    ("Lamb", dict(lr=0.01, caution=True, max_grad_norm=2.0), False),
    ("Lamb", dict(lr=0.01, weight_decay=0.0, caution=True, max_grad_norm=None), False),
    ("Lamb", dict(lr=0.01, weight_decay=0.05, decoupled_decay=True,
                  corrected_weight_decay=True, caution=True, trust_clip=True), False),
    ("Lars", dict(lr=0.1), False),
    ("Lars", dict(lr=0.1, momentum=0.9, weight_decay=0.01), False),
    ("Lars", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, trust_clip=True,
                  trust_coeff=0.01, eps=1e-6), False),
    ("Lars", dict(lr=0.1, momentum=0.8, dampening=0.2, always_adapt=True), False),
]
# Factored second moments: Adafactor
CONFIGS += [
    ("Adafactor", dict(lr=0.01), True),
    ("Adafactor", dict(lr=0.05, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=1.5, weight_decay=0.1,
                       maximize=True), True),
]
# Schedule-free AdamW and SGD
CONFIGS += [
    ("AdamWScheduleFree", dict(lr=0.01), False),
    ("AdamWScheduleFree", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                               warmup_steps=5, r=0.5, weight_lr_power=1.0), False),
    ("AdamWScheduleFree", dict(lr=0.02, betas=(0.3, 0.9), warmup_steps=3, r=1.0,
                               weight_lr_power=0.0), False),
    ("SGDScheduleFree", dict(lr=0.1), False),
    ("SGDScheduleFree", dict(lr=0.05, momentum=0.5, weight_decay=0.01, warmup_steps=4,
                             r=0.25, weight_lr_power=3.0), False),
]


# Every optimizer of the spec table is covered: one without a configuration above runs with
# lr=0.01 and its other defaults (compared with torch.optim where torch has the class).
CONFIGS += [(name, dict(lr=0.01), spec.torch is not None and spec.torch.cls is not None)
            for name, spec in SPECS.items() if name not in {c[0] for c in CONFIGS}]


def config_id(case):
    name, hyper, _ = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in hyper.items())


def make_params(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def make_grads(shapes, dtype, rng):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def tolerances(dtype):
    if np.dtype(dtype) == np.float64:
        return dict(rtol=1e-12, atol=1e-14)
    return dict(rtol=1e-5, atol=1e-6)


def assert_state_close(opt, ref_params, ref_state, dtype, what="reference"):
    """Params and every state buffer of ``opt`` against the reference's."""
    tol = tolerances(dtype)
    sd = opt.state_dict()["state"]
    for k, (p, rp) in enumerate(zip(opt.params, ref_params)):
        np.testing.assert_allclose(p, rp, err_msg=f"param {k} vs {what}", **tol)
        present = {name for name, bufs in ref_state.items() if bufs[k] is not None}
        assert set(sd[k]) == present, (sorted(sd[k]), sorted(present))
        for name, bufs in ref_state.items():
            if bufs[k] is None:
                continue
            np.testing.assert_allclose(sd[k][name], bufs[k], err_msg=f"{name}[{k}] vs {what}",
                                       **tol)


def snapshot(opt):
    """Bytes of every param and state buffer, and the counters: to show nothing changed."""
    sd = opt.state_dict()
    params = opt.params
    if isinstance(params, dict):
        params = list(params.values())
    return (
        [p.tobytes() for p in params],
        {k: {n: a.tobytes() for n, a in v.items()} for k, v in sd["state"].items()},
        opt.step_count,
        opt.last_lr,
    )


def run_python(code, timeout=120, **env):
    """Run ``code`` in a fresh interpreter that imports the same lrfast as this process.

    It runs from an empty folder, so a source checkout in the working directory cannot shadow
    the installed package. ``timeout``: seconds before it counts as hung.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(lrfast.__file__)))
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [root] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], env=full_env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)


@contextmanager
def environment(build, nthreads, per_thread):
    """Kernel build for the optimizers constructed inside, thread count, and the split
    threshold (elements per thread; 1 makes even small steps use ``nthreads`` threads)."""
    builds = list(_dispatch.BUILDS.values())
    try:
        for b in builds:
            b.set_min_elements_per_thread(per_thread)
        with _dispatch.using(build), lrfast.threads(nthreads):
            yield
    finally:
        for b in builds:
            b.set_min_elements_per_thread(None)
