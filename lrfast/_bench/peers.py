"""The peers lrfast is timed against, whether each can run here, and the steppers: for each
implementation of a case, a ``(fn, args)`` whose call makes one step (one untimed call is made
before timing, so lazy state is allocated outside the rounds)."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

import lrfast
from lrfast import reference
from lrfast import schedules as S

from .cases import DTYPES, SCALAR_STEP, SCHEDULE_ARGS, VECTOR_STEPS
from .optimizers import OPTIMIZERS
from .timing import short_error

PEERS = ("numpy-ref", "torch-loop", "torch-foreach", "torch-fused", "optax-jit")
TORCH_FLAGS = {"torch-loop": {"foreach": False}, "torch-foreach": {"foreach": True},
               "torch-fused": {"fused": True}}
SEED = 20240611


class Skip(Exception):
    """A peer that does not run here: ``status`` is "skipped" or "n/a"."""

    def __init__(self, reason, status="skipped"):
        super().__init__(reason)
        self.status = status


class Peers:
    """Imports torch and optax once, or records why they are unavailable."""

    torch: Any
    jax: Any
    jnp: Any
    optax: Any
    versions: dict[str, str]
    torch_reason: str | None
    optax_reason: str | None

    def __init__(self, no_torch=False, no_optax=False, threads=None):
        self.torch = self.jax = self.jnp = self.optax = None
        self.versions = {}
        if no_torch:
            self.torch_reason = "--no-torch"
        else:
            try:
                import torch
            except ImportError:
                self.torch_reason = "torch not installed"
            except Exception as e:  # a broken install is a skip too
                self.torch_reason = f"torch failed to import: {short_error(e)}"
            else:
                self.torch, self.torch_reason = torch, None
                self.versions["torch"] = torch.__version__
                if threads is not None:
                    torch.set_num_threads(threads)
        if no_optax:
            self.optax_reason = "--no-optax"
        else:
            try:
                import jax
                import jax.numpy as jnp
                import optax
            except ImportError as e:
                self.optax_reason = f"{getattr(e, 'name', None) or 'optax/jax'} not installed"
            except Exception as e:
                self.optax_reason = f"jax/optax failed to import: {short_error(e)}"
            else:
                self.jax, self.jnp, self.optax, self.optax_reason = jax, jnp, optax, None
                self.versions["jax"] = jax.__version__
                self.versions["optax"] = optax.__version__
        self.x64 = bool(self.jax is not None and self.jax.config.read("jax_enable_x64"))


def plan(cases, peers, quick):
    """Fill ``case.impls``: None for what runs, a Skip for what does not (and why)."""
    flat_ok = hasattr(lrfast, "FlatParams")
    for c in cases:
        if c.kind == "threads":
            c.impls = {"lrfast-1t": None, "lrfast-2t": None}
            continue
        impls: dict[str, Skip | None] = {"lrfast": None}
        if c.kind == "flat" and not flat_ok:
            impls["lrfast"] = Skip("FlatParams not available")
        for p in PEERS:
            impls[p] = _peer_skip(c, p, peers, quick)
        c.impls = impls


def _peer_skip(c, peer, peers, quick):
    torch_peer = peer.startswith("torch")
    if c.kind == "schedule-scalar" and peer not in ("numpy-ref", "torch-loop"):
        return Skip("no scalar schedule peer", "n/a")
    if c.kind == "schedule-vector" and peer not in ("numpy-ref", "optax-jit"):
        return Skip("no vector schedule peer", "n/a")
    if c.kind == "torch" and peer in ("numpy-ref", "optax-jit"):
        return Skip("torch API case", "n/a")
    if torch_peer and peers.torch is None:
        return Skip(peers.torch_reason)
    if peer == "optax-jit" and peers.optax is None:
        return Skip(peers.optax_reason)
    if c.kind == "torch" and quick and c.size == "16M" and peer in ("torch-loop",
                                                                       "torch-foreach"):
        return Skip("--quick")
    if c.kind in ("optim", "flat"):
        if torch_peer and not OPTIMIZERS[c.opt].in_torch:
            return Skip(f"torch has no {OPTIMIZERS[c.opt].cls}", "n/a")
        if peer == "optax-jit" and OPTIMIZERS[c.opt].optax is None:
            return Skip(f"no optax peer for {OPTIMIZERS[c.opt].cls}", "n/a")
        if peer == "torch-fused" and not OPTIMIZERS[c.opt].torch_fused:
            return Skip(f"torch has no fused {OPTIMIZERS[c.opt].cls}", "n/a")
        if peer == "optax-jit" and c.dtype == "f64" and not peers.x64:
            return Skip("jax x64 disabled")
        if quick and c.size == "16M" and peer in ("torch-loop", "torch-foreach"):
            return Skip("--quick")
        if quick and c.size == "1000x256" and peer == "optax-jit":
            return Skip("--quick (1000-leaf jit compile)")
    return None


# ------------------------------------------------------------------------------------------
# Steppers
# ------------------------------------------------------------------------------------------

class Data:
    """Seeded params and grads for one case; each implementation gets its own copies."""

    def __init__(self, sizes, dtype):
        rng = np.random.default_rng(SEED)
        total = sum(sizes)
        p = rng.standard_normal(total, dtype=dtype)
        g = rng.standard_normal(total, dtype=dtype)
        cuts = np.cumsum(sizes)[:-1]
        self.params = [x.copy() for x in np.split(p, cuts)]
        self.grads = [x.copy() for x in np.split(g, cuts)]

    def copies(self):
        return [p.copy() for p in self.params], [g.copy() for g in self.grads]


def lrfast_step(case, data):
    o = OPTIMIZERS[case.opt]
    if case.kind == "flat":
        dtype = DTYPES[case.dtype]
        names = [f"p{i}" for i in range(len(data.params))]
        flat = lrfast.FlatParams({n: p.shape for n, p in zip(names, data.params)}, dtype=dtype)
        for n, p, g in zip(names, data.params, data.grads):
            flat.params[n][...] = p
            flat.grads[n][...] = g
        opt = getattr(lrfast, o.cls)(flat, **o.hyper)
        return opt.step, ()
    params, grads = data.copies()
    opt = getattr(lrfast, o.cls)(params, **o.hyper)
    return opt.step, (grads,)


def _numpy_step(case, data):
    """lrfast.reference's update for the case's optimizer, called as its spec says."""
    params, grads = data.copies()
    return OPTIMIZERS[case.opt].reference_step(params, grads), ()


def _torch_step(case, data, peer, torch):
    o = OPTIMIZERS[case.opt]
    params, grads = data.copies()
    tensors = [torch.from_numpy(p) for p in params]   # shares memory with the copies
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g)
    opt = getattr(torch.optim, o.cls)(tensors, **o.hyper, **TORCH_FLAGS[peer])
    return opt.step, ()


def _optax_step(case, data, peers):
    jax, jnp, optax = peers.jax, peers.jnp, peers.optax
    o = OPTIMIZERS[case.opt]
    tx = o.optax(optax, o.hyper)
    params = [jnp.asarray(p) for p in data.params]
    grads = [jnp.asarray(g) for g in data.grads]

    def update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(update, donate_argnums=(0, 1))
    box = [params, tx.init(params)]

    def step():
        box[0], box[1] = jitted(box[0], box[1], grads)
        jax.block_until_ready(box[0])
    return step, ()


def _schedule_step(case, impl, peers):
    s = S.warmup_cosine(*SCHEDULE_ARGS)
    spec = s.to_dict()
    if case.kind == "schedule-scalar":
        if impl == "lrfast":
            return s, (SCALAR_STEP,)
        if impl == "numpy-ref":
            return reference.schedule_values, (spec, SCALAR_STEP)
        torch = peers.torch
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=SCHEDULE_ARGS[1])
        opt.step()  # so the scheduler does not warn about the call order
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10**9)
        return sched.step, ()
    if impl == "optax-jit":
        jax, jnp = peers.jax, peers.jnp
        f = jax.jit(peers.optax.warmup_cosine_decay_schedule(*SCHEDULE_ARGS))
        x = jnp.arange(VECTOR_STEPS)
        return (lambda: f(x).block_until_ready()), ()
    steps = np.arange(VECTOR_STEPS, dtype=np.int64)
    if impl == "lrfast":
        return s, (steps,)
    return reference.schedule_values, (spec, steps)


def _torch_api_step(case, impl, peers):
    """An optimizer over torch tensors with gradients: lrfast.torch's class, or torch.optim's
    (for-loop, foreach or fused). The transformer case uses a real model's parameters."""
    torch = peers.torch
    if torch is None:
        raise Skip(peers.torch_reason)
    if impl == "lrfast":
        try:
            import lrfast.torch as module
        except ImportError as e:
            raise Skip(f"lrfast.torch: {short_error(e)}") from e
        flags = {}
    else:
        module, flags = torch.optim, TORCH_FLAGS[impl]
    o = OPTIMIZERS[case.opt]
    gen = torch.Generator().manual_seed(SEED)
    if case.size == "transformer":
        torch.manual_seed(SEED)
        layers = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
                  for _ in range(9)]
        params = list(torch.nn.Sequential(*layers, torch.nn.Linear(32, 8)).parameters())
        if tuple(p.numel() for p in params) != case.sizes:
            raise RuntimeError("the transformer's parameters are not SIZES['transformer']")
    else:
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in case.sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = getattr(module, o.cls)(params, **o.hyper, **flags)
    return opt.step, ()


def make_stepper(case, impl, data, peers):
    if case.kind.startswith("schedule"):
        return _schedule_step(case, impl, peers)
    if case.kind == "torch":
        return _torch_api_step(case, impl, peers)
    if impl == "lrfast":
        return lrfast_step(case, data)
    if impl == "numpy-ref":
        return _numpy_step(case, data)
    if impl == "optax-jit":
        return _optax_step(case, data, peers)
    return _torch_step(case, data, impl, peers.torch)
