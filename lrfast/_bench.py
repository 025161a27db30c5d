"""``python -m lrfast bench``: time lrfast's optimizer steps and schedules against their peers.

Every case runs lrfast and each available peer on identical data (a fixed seed) in this one
process:

* ``numpy-ref``: :mod:`lrfast.reference` (pure NumPy, in place);
* ``torch-loop``: ``torch.optim`` with ``foreach=False`` (torch's default on CPU);
  for the scalar-schedule case, ``CosineAnnealingLR.step()``;
* ``torch-foreach``: ``foreach=True``;
* ``torch-fused``: ``fused=True`` (torch has it for Adam, AdamW, SGD and Adagrad);
* ``optax-jit``: ``optax`` ``update`` + ``apply_updates`` under ``jax.jit`` (params a list of
  jnp arrays, buffers donated); float32 only unless jax's x64 mode is already on.

A missing package (or ``--no-torch`` / ``--no-optax``) makes its columns "skipped", never an
error. Timing: one untimed step first (lazy state), then R interleaved rounds: each round
times one batch of every implementation of the case in turn (a batch is k back-to-back steps,
k chosen per implementation so that a batch lasts at least a couple of milliseconds), and a
cell is the median over the rounds; the garbage collector is off while batches run. Cases that
a speed target judges get more rounds, and more again while a target is within noise; the
targets are judged on per-round ratios with a confidence interval (see ``_bench_targets``).

The floor: a STREAM-like triad ``a = b + s*c`` (4 transfers per element with write-allocate)
and its in-place form ``a = a + s*c`` (3 transfers), on lrfast's own threads; the faster of
the two is the bandwidth a step is compared with, as bytes moved per step / bandwidth.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

import lrfast
from lrfast import _dispatch, reference
from lrfast import schedules as S
from lrfast._bench_targets import evaluate, parts_of, references, undecided

PEERS = ("numpy-ref", "torch-loop", "torch-foreach", "torch-fused", "optax-jit")
TORCH_FLAGS = {"torch-loop": {"foreach": False}, "torch-foreach": {"foreach": True},
               "torch-fused": {"fused": True}}
DTYPES: dict[str, type[np.floating]] = {"f32": np.float32, "f64": np.float64}
SEED = 20240611

# name -> (lrfast / torch.optim class, hyper-parameters both accept, transfers per element,
#          torch has a fused CPU kernel). Transfers: reads + writes of one element per step.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], int, bool]] = {
    "sgd": ("SGD", dict(lr=1e-2, momentum=0.9), 5, True),
    "adagrad": ("Adagrad", dict(lr=1e-2), 5, True),
    "rmsprop": ("RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8), 5, False),
    "adam": ("Adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), 7, True),
    "adamw": ("AdamW", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), 7, True),
}
# The transformer of the torch-API cases: 9 encoder layers of width 32 (4 heads, feed-forward
# 64) and a linear head, 110 parameter tensors (tests/test_torch_adapter.py trains the same).
TRANSFORMER_LAYER = (96 * 32, 96, 32 * 32, 32, 64 * 32, 64, 32 * 64, 32, 32, 32, 32, 32)
SIZES = {"1k": (2**10,), "1M": (2**20,), "16M": (16 * 2**20,),
         "1000x256": (256,) * 1000, "200x10k": (10_000,) * 200,
         "transformer": TRANSFORMER_LAYER * 9 + (8 * 32, 8)}
SCHEDULE_ARGS = (0.0, 0.1, 1000, 10**7)   # warmup_cosine(init, peak, warmup_steps, decay_steps)
VECTOR_STEPS = 10**7
SCALAR_STEP = 12345
MEMORY_BOUND = 2**20          # % of floor is reported from this many elements up
TARGET_ROUNDS = 11            # rounds for a case a target judges (95% interval: 2nd to 10th)
EXTRA_ROUNDS = 8              # rounds added at a time while one of its targets is within noise
# mode -> (most rounds a judged case gets, most seconds of extra rounds per case)
EXTRA_BUDGET = {"quick": (43, 3.0), "full": (83, 10.0)}
MISSING_MATPLOTLIB = ('--plot needs matplotlib, which is not installed: '
                      'pip install "lrfast[plot]" (or pip install matplotlib)')


class Skip(Exception):
    """A peer that does not run here: ``status`` is "skipped" or "n/a"."""

    def __init__(self, reason, status="skipped"):
        super().__init__(reason)
        self.status = status


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    kind: str                      # optim, flat, torch, schedule-scalar, schedule-vector, threads
    opt: str | None = None
    dtype: str | None = None
    size: str | None = None
    impls: dict = field(default_factory=dict)    # impl -> None (run) or Skip
    results: dict = field(default_factory=dict)  # impl -> result dict
    analysis: dict = field(default_factory=dict)  # ratios, % of floor, speedup
    wall_s: float | None = None                   # time the case took, set-up included
    probe: dict | None = None                     # the floor probe's result in this case's rounds
    rounds: int = 0                               # interleaved rounds the case was timed in

    @property
    def sizes(self):
        return SIZES[self.size] if self.size else ()

    @property
    def elements(self):
        return sum(self.sizes)

    @property
    def bytes_per_step(self):
        if self.kind not in ("optim", "flat", "torch"):
            return None
        opt, dtype = cast(str, self.opt), cast(str, self.dtype)  # both set for these kinds
        return self.elements * OPTIMIZERS[opt][2] * np.dtype(DTYPES[dtype]).itemsize

    def key(self, impl):
        """Cache key of a peer's measurement: the flat rows share their list twin's peers."""
        return (impl, self.kind if self.kind not in ("optim", "flat") else "optim",
                self.opt, self.dtype, self.size)


def all_cases(quick):
    """Every case, in run (and table) order; quick mode drops float64 at 16M."""
    cases = []
    for opt in OPTIMIZERS:
        for dt in DTYPES:
            for size in ("1k", "1M", "16M"):
                if quick and dt == "f64" and size == "16M":
                    continue
                cases.append(Case(f"{opt} {dt} {size}", "optim", opt, dt, size))
    for opt in ("adam", "adamw"):
        for dt in DTYPES:
            for size in ("1000x256", "200x10k"):
                cases.append(Case(f"{opt} {dt} {size}", "optim", opt, dt, size))
                if opt == "adam":
                    cases.append(Case(f"{opt} {dt} {size} flat", "flat", opt, dt, size))
    # lrfast.torch.Adam against torch.optim.Adam, on torch tensors: a model's parameters, and
    # one large tensor.
    cases.append(Case("torch-api adam f32 transformer", "torch", "adam", "f32", "transformer"))
    cases.append(Case("torch-api adam f32 16M", "torch", "adam", "f32", "16M"))
    cases.append(Case("schedule scalar", "schedule-scalar"))
    cases.append(Case("schedule vector 1e7", "schedule-vector"))
    cases.append(Case("adam f32 1M threads 1->2", "threads", "adam", "f32", "1M"))
    return cases


def select(cases, pattern):
    if not pattern:
        return cases
    rx = re.compile(pattern, re.IGNORECASE)
    return [c for c in cases if rx.search(c.name)]


# ------------------------------------------------------------------------------------------
# Peers' availability
# ------------------------------------------------------------------------------------------

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
                self.torch_reason = f"torch failed to import: {_short(e)}"
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
                self.optax_reason = f"jax/optax failed to import: {_short(e)}"
            else:
                self.jax, self.jnp, self.optax, self.optax_reason = jax, jnp, optax, None
                self.versions["jax"] = jax.__version__
                self.versions["optax"] = optax.__version__
        self.x64 = bool(self.jax is not None and self.jax.config.read("jax_enable_x64"))


def _short(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


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
        if peer == "torch-fused" and not OPTIMIZERS[c.opt][3]:
            return Skip(f"torch has no fused {OPTIMIZERS[c.opt][0]}", "n/a")
        if peer == "optax-jit" and c.dtype == "f64" and not peers.x64:
            return Skip("jax x64 disabled")
        if quick and c.size == "16M" and peer in ("torch-loop", "torch-foreach"):
            return Skip("--quick")
        if quick and c.size == "1000x256" and peer == "optax-jit":
            return Skip("--quick (1000-leaf jit compile)")
    return None


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------

def _batch(fn, args, k):
    t0 = time.perf_counter()
    for _ in range(k):
        fn(*args)
    return time.perf_counter() - t0


def _calibrate(fn, args, min_sample):
    """Steps per sample so that a sample lasts at least ``min_sample`` seconds."""
    k = 1
    while True:
        t = _batch(fn, args, k)
        if t >= min_sample:
            return k
        k = min(k * 100, max(2 * k, math.ceil(k * 1.2 * min_sample / max(t, 1e-9))))


class Rounds:
    """The steppers of one case, timed in interleaved, numbered rounds: a round times one batch
    of each named stepper in turn, in an order rotated from round to round. A stepper that
    raises is dropped from later rounds and its result is the error."""

    def __init__(self, min_sample):
        self.min_sample = min_sample
        self.fns: dict[str, tuple[Any, tuple, int]] = {}
        self.samples: dict[str, tuple[list[float], list[int]]] = {}
        self.errors: dict[str, str] = {}
        self.count = 0

    def add(self, name, fn, args):
        """Calibrate ``fn(*args)``'s batch size and add it."""
        with _gc_off():
            k = _calibrate(fn, args, self.min_sample)
        self.fns[name] = (fn, args, k)
        self.samples[name] = ([], [])

    def live(self, names=None):
        return [n for n in (self.fns if names is None else names)
                if n in self.fns and n not in self.errors]

    def run(self, names, rounds):
        names = self.live(names)
        with _gc_off():
            for _ in range(rounds):
                # Each round starts one stepper later, so that none always follows the same one.
                shift = self.count % max(len(names), 1)
                for name in names[shift:] + names[:shift]:
                    if name in self.errors:
                        continue
                    fn, args, k = self.fns[name]
                    try:
                        t = _batch(fn, args, k) / k
                    except Exception as e:
                        self.errors[name] = _short(e)
                        continue
                    self.samples[name][0].append(t)
                    self.samples[name][1].append(self.count)
                self.count += 1

    def result(self, name):
        if name in self.errors:
            return {"status": "error", "reason": self.errors[name]}
        s, r = self.samples[name]
        return {"status": "ok", "median_s": statistics.median(s), "samples_s": list(s),
                "rounds": list(r), "batch": self.fns[name][2]}


class _gc_off:
    def __enter__(self):
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


def measure(fns, repeats, min_sample):
    """Per ``(fn, args)``: its result over ``repeats`` interleaved rounds (see Rounds)."""
    rounds = Rounds(min_sample)
    for i, (fn, args) in enumerate(fns):
        rounds.add(i, fn, args)
    rounds.run(list(range(len(fns))), repeats)
    return [rounds.result(i) for i in range(len(fns))]


class FloorProbe:
    """The bandwidth probe, a STREAM-like triad ``a = b + s*c`` on float32 arrays of ``n``
    elements, or its in-place form ``a = a + s*c``; ``bytes`` is what one call moves."""

    def __init__(self, n, nthreads):
        self.n = n
        self.a = np.zeros(n, np.float32)
        self.b = np.ones(n, np.float32)
        self.c = np.full(n, 0.5, np.float32)
        self.fn = _dispatch.kernels.triad
        self.nthreads = nthreads

    def args(self, inplace):
        return (self.a, self.a if inplace else self.b, self.c, 1e-3, self.nthreads)

    def bytes(self, inplace):
        return (3 if inplace else 4) * self.a.itemsize * self.n


def measure_floor(probe, repeats):
    """Triad and in-place bandwidth (GB/s) of a FloorProbe; ``inplace``: which was faster."""
    for inplace in (False, True):
        probe.fn(*probe.args(inplace))
    t_triad, t_inplace = measure([(probe.fn, probe.args(False)), (probe.fn, probe.args(True))],
                                 repeats, 0.0)
    out = {"elements": probe.n, "dtype": "float32", "threads": probe.nthreads,
           "triad_s": t_triad["median_s"], "inplace_s": t_inplace["median_s"],
           "triad_gbs": probe.bytes(False) / t_triad["median_s"] / 1e9,
           "inplace_gbs": probe.bytes(True) / t_inplace["median_s"] / 1e9}
    out["floor_gbs"] = max(out["triad_gbs"], out["inplace_gbs"])
    out["inplace"] = out["inplace_gbs"] >= out["triad_gbs"]
    return out


# ------------------------------------------------------------------------------------------
# Steppers: each returns (fn, args); one untimed call is made before timing
# ------------------------------------------------------------------------------------------

class _Data:
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


def _lrfast_step(case, data):
    cls, hyper, _, _ = OPTIMIZERS[case.opt]
    if case.kind == "flat":
        dtype = DTYPES[case.dtype]
        names = [f"p{i}" for i in range(len(data.params))]
        flat = lrfast.FlatParams({n: p.shape for n, p in zip(names, data.params)}, dtype=dtype)
        for n, p, g in zip(names, data.params, data.grads):
            flat.params[n][...] = p
            flat.grads[n][...] = g
        opt = getattr(lrfast, cls)(flat, **hyper)
        return opt.step, ()
    params, grads = data.copies()
    opt = getattr(lrfast, cls)(params, **hyper)
    return opt.step, (grads,)


def _numpy_step(case, data):
    params, grads = data.copies()
    zeros = [np.zeros_like(p) for p in params]
    count = [0]
    o, hyper = case.opt, OPTIMIZERS[case.opt][1]
    if o == "sgd":
        def step():
            count[0] += 1
            reference.sgd_(params, grads, zeros, step=count[0], lr=hyper["lr"],
                           momentum=hyper["momentum"])
    elif o == "adagrad":
        def step():
            count[0] += 1
            reference.adagrad_(params, grads, zeros, step=count[0], lr=hyper["lr"])
    elif o == "rmsprop":
        def step():
            reference.rmsprop_(params, grads, zeros, lr=hyper["lr"], alpha=hyper["alpha"],
                               eps=hyper["eps"])
    else:
        exp_avg_sq = [np.zeros_like(p) for p in params]
        b1, b2 = hyper["betas"]
        wd = hyper.get("weight_decay", 0.0)

        def step():
            count[0] += 1
            reference.adam_(params, grads, zeros, exp_avg_sq, step=count[0], lr=hyper["lr"],
                            beta1=b1, beta2=b2, eps=hyper["eps"], weight_decay=wd,
                            decoupled=o == "adamw")
    return step, ()


def _torch_step(case, data, peer, torch):
    cls, hyper, _, _ = OPTIMIZERS[case.opt]
    params, grads = data.copies()
    tensors = [torch.from_numpy(p) for p in params]   # shares memory with the copies
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g)
    opt = getattr(torch.optim, cls)(tensors, **hyper, **TORCH_FLAGS[peer])
    return opt.step, ()


def _optax_step(case, data, peers):
    jax, jnp, optax = peers.jax, peers.jnp, peers.optax
    _, hyper, _, _ = OPTIMIZERS[case.opt]
    lr, o = hyper["lr"], case.opt
    if o == "sgd":
        tx = optax.sgd(lr, momentum=hyper["momentum"])
    elif o == "adagrad":
        tx = optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-10)
    elif o == "rmsprop":
        tx = optax.rmsprop(lr, decay=hyper["alpha"], eps=hyper["eps"])
    else:
        b1, b2 = hyper["betas"]
        tx = (optax.adamw(lr, b1=b1, b2=b2, eps=hyper["eps"], weight_decay=hyper["weight_decay"])
              if o == "adamw" else optax.adam(lr, b1=b1, b2=b2, eps=hyper["eps"]))
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
            raise Skip(f"lrfast.torch: {_short(e)}") from e
        flags = {}
    else:
        module, flags = torch.optim, TORCH_FLAGS[impl]
    cls, hyper, _, _ = OPTIMIZERS[case.opt]
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
    opt = getattr(module, cls)(params, **hyper, **flags)
    return opt.step, ()


def _stepper(case, impl, data, peers):
    if case.kind.startswith("schedule"):
        return _schedule_step(case, impl, peers)
    if case.kind == "torch":
        return _torch_api_step(case, impl, peers)
    if impl == "lrfast":
        return _lrfast_step(case, data)
    if impl == "numpy-ref":
        return _numpy_step(case, data)
    if impl == "optax-jit":
        return _optax_step(case, data, peers)
    return _torch_step(case, data, impl, peers.torch)


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------

class Progress:
    """``[####......] 12/40 adam f32 16M torch-fused`` on a terminal; one line per case otherwise."""

    def __init__(self, total, stream=None):
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        self.done = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = 0

    def case(self, name):
        if not self.tty:
            print(f"bench [{self.done}/{self.total}] {name}", file=self.stream, flush=True)

    def task(self, label):
        if self.tty:
            filled = int(20 * self.done / self.total)
            line = f"[{'#' * filled}{'.' * (20 - filled)}] {self.done + 1}/{self.total} {label}"
            self.stream.write("\r" + line.ljust(self.width))
            self.stream.flush()
            self.width = len(line)

    def advance(self):
        self.done += 1

    def close(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def count_tasks(cases):
    seen, n = set(), 0
    for c in cases:
        if c.impls.get("lrfast") is not None:
            continue
        for impl, skip in c.impls.items():
            if skip is None and (impl.startswith("lrfast") or c.key(impl) not in seen):
                seen.add(c.key(impl))
                n += 1
    return n


def run_case(case, peers, settings, cache, progress, probe=None, floor=None):
    """Time every implementation of ``case`` that runs, in interleaved rounds; a case that a
    target judges gets ``target_rounds`` rounds (with the floor probe among them when a part
    needs it), then more while one of its parts is within noise, up to the mode's budget."""
    progress.case(case.name)
    judged = parts_of(case.name)
    rounds = Rounds(settings["min_sample_s"])
    n = max(settings["repeats"], settings["target_rounds"]) if judged else settings["repeats"]
    if case.kind == "threads":
        data: _Data | None = _Data(case.sizes, DTYPES[case.dtype])
        progress.task(f"{case.name}")
        step, args = _lrfast_step(case, data)
        for nt in (1, 2):
            limit = lrfast.threads(nt)

            def stepper(*a, _limit=limit):
                with _limit:
                    step(*a)
            try:
                stepper(*args)
                rounds.add(f"lrfast-{nt}t", stepper, args)
            except Exception as e:
                case.results[f"lrfast-{nt}t"] = {"status": "error", "reason": _short(e)}
        progress.advance()
        progress.advance()
    else:
        data = None
        if case.kind in ("optim", "flat"):
            data = _Data(case.sizes, DTYPES[case.dtype])
        lrfast_skip = case.impls.get("lrfast")
        for impl, skip in case.impls.items():
            if skip is not None:
                case.results[impl] = {"status": skip.status, "reason": str(skip)}
                continue
            if lrfast_skip is not None:
                case.results[impl] = {"status": "skipped", "reason": "no lrfast result"}
                continue
            key = case.key(impl)
            if impl != "lrfast" and key in cache:
                case.results[impl] = dict(cache[key], shared_with=cache[key]["case"])
                continue
            progress.task(f"{case.name} {impl}")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn, args = _stepper(case, impl, data, peers)
                    fn(*args)                               # untimed: allocates lazy state
                    rounds.add(impl, fn, args)
            except Skip as e:
                case.results[impl] = {"status": e.status, "reason": str(e)}
            except Exception as e:
                case.results[impl] = {"status": "error", "reason": _short(e)}
            progress.advance()
        if probe is not None and floor is not None and "lrfast" in rounds.fns \
                and any(p.measure == "floor" for p in judged):
            rounds.add("floor", probe.fn, probe.args(floor["inplace"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rounds.run(None, n)
        _collect(case, rounds, probe, floor)
        # Within noise of a target: more rounds of lrfast and what that target compares it with.
        most, seconds = settings["max_rounds"], settings["extra_s"]
        t0 = time.perf_counter()
        while rounds.count < most and time.perf_counter() - t0 < seconds:
            todo = undecided(case)
            if not todo:
                break
            names = {"lrfast"}
            for p in todo:
                names.update(references(case, p) or ())
            progress.task(f"{case.name}: {rounds.count} rounds, within noise of a target")
            rounds.run(sorted(names), min(EXTRA_ROUNDS, most - rounds.count))
            _collect(case, rounds, probe, floor)
    for impl in rounds.fns:
        if impl not in ("lrfast", "floor") and case.kind != "threads":
            cache[case.key(impl)] = dict(case.results[impl], case=case.name)
    case.rounds = rounds.count


def _collect(case, rounds, probe, floor):
    """Copy the rounds' results into ``case.results`` (the probe's into ``case.probe``)."""
    for name in rounds.fns:
        if name == "floor":
            case.probe = dict(rounds.result(name), bytes=probe.bytes(floor["inplace"]))
        else:
            case.results[name] = rounds.result(name)


def analyse(case, floor):
    """Ratios (peer / lrfast) and % of floor."""
    out = {}
    if case.kind == "threads":
        r1, r2 = case.results.get("lrfast-1t", {}), case.results.get("lrfast-2t", {})
        if r1.get("status") == "ok" and r2.get("status") == "ok":
            out["speedup"] = r1["median_s"] / r2["median_s"]
        return out
    base = case.results.get("lrfast", {})
    if base.get("status") != "ok":
        return out
    out["ratios"] = {p: r["median_s"] / base["median_s"] for p, r in case.results.items()
                     if p != "lrfast" and r.get("status") == "ok"}
    if floor and case.bytes_per_step and case.elements >= MEMORY_BOUND:
        floor_s = case.bytes_per_step / (floor["floor_gbs"] * 1e9)
        out["floor_s"] = floor_s
        out["pct_floor"] = 100.0 * floor_s / base["median_s"]
    return out


# ------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------

def targets(cases):
    """(status, name, detail) for each target whose cases ran: PASS, FAIL, NOISE (within noise
    of the target) or SKIP; see ``lrfast._bench_targets``."""
    return [row[:3] for row in evaluate(cases)]


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def fmt_time(s):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if s >= scale or unit == "ns":
            v = s / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"


def fmt_ratio(r):
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def machine_info(peers, nthreads):
    from ._config import config

    cfg = config()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(), "cpu": model, "cpu_count": os.cpu_count(),
        "lrfast_threads": nthreads,
        "torch_threads": peers.torch.get_num_threads() if peers.torch is not None else None,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "build": {"lrfast": lrfast.__version__, "kernel_build": _dispatch.name,
                  "kernel_builds_available": _dispatch.available(), "simd": cfg["simd"],
                  "openmp": cfg["openmp"], "compiler": cfg["compiler"]},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": peers.versions.get("torch"), "jax": peers.versions.get("jax"),
                     "optax": peers.versions.get("optax")},
        "jax_x64": peers.x64,
    }


def _cell(res, ratio):
    st = res.get("status")
    if st == "ok":
        return f"{fmt_time(res['median_s'])} {fmt_ratio(ratio)}" if ratio is not None \
            else fmt_time(res["median_s"])
    return {"skipped": "skipped", "n/a": "n/a", "error": "ERROR"}.get(st, "-")


def report(cases, machine, floor, settings, out=sys.stdout):
    w = lambda s="": print(s, file=out)            # noqa: E731
    b = machine["build"]
    simd = b["simd"] if isinstance(b["simd"], str) else " ".join(b["simd"]) or "(none)"
    w(f"lrfast bench ({settings['mode']}): medians of {settings['repeats']} interleaved rounds "
      f"({settings['target_rounds']} to {settings['max_rounds']} in cases a target judges), each "
      f"a batch of steps lasting >= {settings['min_sample_s'] * 1e3:.0f} ms")
    w(f"machine: {machine['cpu']}, cpu_count={machine['cpu_count']}, {machine['platform']}")
    tt = machine["torch_threads"]
    w(f"threads: lrfast {machine['lrfast_threads']}, torch {tt if tt is not None else '-'}, "
      f"jax (XLA's own pool); OMP_NUM_THREADS={machine['omp_num_threads_env'] or 'unset'}")
    w(f"build: lrfast {b['lrfast']}, kernels {b['kernel_build']} (available: "
      f"{' '.join(b['kernel_builds_available'])}), simd {simd}, openmp {b['openmp']}")
    other = machine.get("other_processes_cores")
    if other is not None:
        w(f"other processes: {other:.2f} cores busy on average during the run" +
          ("  ** timings are disturbed **" if other > 0.25 else ""))
    w("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in machine["versions"].items()))
    if floor:
        w(f"floor: triad {floor['triad_gbs']:.1f} GB/s (4 transfers/elem), in-place "
          f"{floor['inplace_gbs']:.1f} GB/s (3 transfers/elem) -> {floor['floor_gbs']:.1f} GB/s "
          f"({floor['elements'] // 2**20}M float32, {floor['threads']} thread{'s' if floor['threads'] != 1 else ''})")
    w()
    table = [c for c in cases if c.kind != "threads"]
    if table:
        cols = ["case", "lrfast", *PEERS, "%floor"]
        rows = []
        for c in table:
            a = c.analysis
            row = [c.name, _cell(c.results.get("lrfast", {}), None)]
            for p in PEERS:
                row.append(_cell(c.results.get(p, {}), a.get("ratios", {}).get(p)))
            row.append(f"{a['pct_floor']:.0f}%" if "pct_floor" in a else "")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
        fmt_row = lambda r: "  ".join(v.ljust(wd) if i == 0 else v.rjust(wd)   # noqa: E731
                                      for i, (v, wd) in enumerate(zip(r, widths))).rstrip()
        w(fmt_row(cols))
        w(fmt_row(["-" * wd for wd in widths]))
        for r in rows:
            w(fmt_row(r))
        w()
        w("Peer cells: median time, then peer/lrfast (>1: lrfast faster). torch-loop is "
          "foreach=False,")
        w("  torch's CPU default; in 'schedule scalar' it is CosineAnnealingLR.step().")
        w("  'flat' rows: lrfast.FlatParams, peers shared with the list row of the same size.")
        if floor:
            w("%floor: (bytes moved per step / floor bandwidth) / lrfast median, for 1M+ elements. "
              "Over 100%")
            w("  means the triad probe is pessimistic for that size (1M and 200x10k can stay in "
              "the last-level")
            w("  cache, the probe's arrays do not), not a step faster than memory.")
        reasons: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for c in table:
            for impl, r in c.results.items():
                st, why = r.get("status"), r.get("reason")
                if st not in ("skipped", "n/a", "error") or not why or why.startswith("no "):
                    continue
                entry = reasons.setdefault((st, why), ([], []))
                if impl not in entry[0]:
                    entry[0].append(impl)
                entry[1].append(c.name)
        for (st, why), (impls, names) in reasons.items():
            where = names[0] if len(set(names)) == 1 else f"{len(set(names))} cases"
            w(f"{st}: {', '.join(impls)}: {why} [{where}]")
    for c in cases:
        if c.kind == "threads":
            r1, r2 = c.results.get("lrfast-1t", {}), c.results.get("lrfast-2t", {})
            if r1.get("status") == "ok" and r2.get("status") == "ok":
                w(f"thread scaling: {c.name}: 1 thread {fmt_time(r1['median_s'])}, "
                  f"2 threads {fmt_time(r2['median_s'])}, speedup {c.analysis['speedup']:.2f}x")
            else:
                w(f"thread scaling: {c.name}: {r1.get('reason') or r2.get('reason') or 'not run'}")
    tg = targets(cases)
    if tg:
        w()
        w("targets (median of per-round values [95% interval]):")
        for st, name, detail in tg:
            w(f"  {st:<5}  {name}: {detail}")
        w("  PASS: the whole interval meets the target. FAIL: it misses it by more than such a")
        w("  case varies between runs on this project's machine (x spread). NOISE: neither; this")
        w("  run cannot tell. Values are per round: lrfast and the peer (or the floor probe) timed")
        w("  in turn.")
    return tg


def write_plot(cases, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [c for c in cases if c.analysis.get("ratios")]
    if not rows:
        raise ValueError("no case has a peer measurement to plot")
    peers = [p for p in PEERS if any(p in c.analysis["ratios"] for c in rows)]
    height = 0.8 / max(len(peers), 1)
    fig = Figure(figsize=(9, 1.0 + 0.32 * len(rows) * max(1, len(peers) / 2.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, p in enumerate(peers):
        ys = [i + (j - (len(peers) - 1) / 2) * height for i in range(len(rows))]
        vals = [c.analysis["ratios"].get(p, float("nan")) for c in rows]
        ax.barh(ys, vals, height=height, label=p)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([c.name for c in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("speed-up of lrfast (peer time / lrfast time, log scale; > 1: lrfast faster)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fig.savefig(path, format=fmt, bbox_inches="tight")


def _to_json(cases, machine, floor, settings, wall):
    out_cases = []
    for c in cases:
        entry = {"name": c.name, "kind": c.kind, "optimizer": c.opt, "dtype": c.dtype,
                 "size": c.size, "tensors": len(c.sizes) if c.sizes else None,
                 "elements": c.elements or None, "bytes_per_step": c.bytes_per_step,
                 "results": c.results, "floor_probe": c.probe, "rounds": c.rounds,
                 "wall_s": c.wall_s}
        entry.update(c.analysis)
        out_cases.append(entry)
    return {"lrfast_bench": 1, "settings": settings, "machine": machine, "floor": floor,
            "cases": out_cases,
            "targets": [{"status": s, "name": n, "detail": d, "parts": parts}
                        for s, n, d, parts in evaluate(cases)],
            "wall_s": wall}


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats and cases (under a minute on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write raw medians, ratios and machine info")
    p.add_argument("--plot", metavar="FILE", help="bar chart of lrfast's speed-up per case "
                   "(needs matplotlib; format from the suffix)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for lrfast and torch (default: their defaults)")
    p.add_argument("--cases", metavar="REGEX",
                   help="run only cases whose name matches (case-insensitive search), "
                        "e.g. 'adam f32', '16M|1k', 'schedule', 'flat'")
    p.add_argument("--repeats", type=int, metavar="R",
                   help="rounds per case (default 9, quick 5; a case a target judges gets at "
                        f"least {TARGET_ROUNDS}, and more while the target is within noise)")
    p.add_argument("--no-torch", action="store_true", help="do not run torch peers")
    p.add_argument("--no-optax", action="store_true", help="do not run optax/jax peers")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")


def _cpu_snapshot():
    """(busy CPU seconds of the whole machine, of this process, wall time); Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    own = os.times()
    return (sum(fields[:8]) - idle) / hz, own.user + own.system, time.perf_counter()


def other_load(before):
    """Average number of cores other processes kept busy since ``before`` (None if unknown)."""
    after = _cpu_snapshot()
    if before is None or after is None or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (after[2] - before[2]))


def _error(msg):
    print(f"lrfast bench: error: {msg}", file=sys.stderr)


def main(args):
    """The ``bench`` subcommand; returns the exit status (2: bad options or no matplotlib for
    --plot, 1: an lrfast case failed or an output could not be written)."""
    if args.threads is not None and args.threads < 1:
        _error(f"--threads must be at least 1, got {args.threads}")
        return 2
    if args.repeats is not None and args.repeats < 1:
        _error(f"--repeats must be at least 1, got {args.repeats}")
        return 2
    try:
        cases = select(all_cases(args.quick), args.cases)
    except re.error as e:
        _error(f"--cases is not a valid regular expression: {e}")
        return 2
    if not cases:
        _error(f"--cases {args.cases!r} matches no case (see --list)")
        return 2
    if args.list:
        for c in cases:
            print(c.name)
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure  # noqa: F401
        except ImportError:
            _error(MISSING_MATPLOTLIB)
            return 2
    start = time.perf_counter()
    cpu_before = _cpu_snapshot()
    peers = Peers(args.no_torch, args.no_optax, args.threads)
    gc.collect()
    gc.freeze()   # torch's and jax's objects: keeps the per-case collections short
    with lrfast.threads(args.threads) if args.threads is not None else nullcontext():
        nthreads = lrfast.get_num_threads()
        mode = "quick" if args.quick else "full"
        repeats = args.repeats or (5 if args.quick else 9)
        most, extra_s = EXTRA_BUDGET[mode]
        settings = {"mode": mode, "repeats": repeats,
                    "target_rounds": max(repeats, TARGET_ROUNDS),
                    "max_rounds": max(repeats, most), "extra_s": extra_s,
                    "min_sample_s": 2e-3 if args.quick else 5e-3,
                    "cases": args.cases, "threads": nthreads}
        plan(cases, peers, args.quick)
        need_floor = any(c.bytes_per_step and c.elements >= MEMORY_BOUND for c in cases)
        progress = Progress(count_tasks(cases) + need_floor)
        floor = probe = None
        try:
            if need_floor:
                # The same probe in both modes, so that % of floor means the same thing.
                probe = FloorProbe(32 * 2**20, nthreads)
                progress.case("floor")
                progress.task(f"floor (triad, {probe.n // 2**20}M float32)")
                floor = measure_floor(probe, settings["repeats"])
                progress.advance()
            cache: dict[tuple, dict] = {}
            for c in cases:
                t0 = time.perf_counter()
                run_case(c, peers, settings, cache, progress, probe, floor)
                gc.collect()
                c.wall_s = time.perf_counter() - t0
        finally:
            progress.close()
            del probe
    for c in cases:
        c.analysis = analyse(c, floor)
    machine = machine_info(peers, nthreads)
    machine["other_processes_cores"] = other_load(cpu_before)
    report(cases, machine, floor, settings)
    wall = time.perf_counter() - start
    print(f"\nwall time: {wall:.1f} s")
    status = 0
    if any(r.get("status") == "error" for c in cases for k, r in c.results.items()
           if k.startswith("lrfast")):
        status = 1
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(_to_json(cases, machine, floor, settings, wall), f, indent=1)
            print(f"wrote {args.json}")
        except OSError as e:
            _error(f"cannot write {args.json!r}: {e.strerror or e}")
            status = 1
    if args.plot:
        try:
            write_plot(cases, args.plot)
            print(f"wrote {args.plot}")
        except (OSError, ValueError) as e:
            _error(f"cannot write {args.plot!r}: {e}")
            status = 1
    return status
