"""How the bench times: steppers in interleaved, numbered rounds, each a batch of back-to-back
steps long enough to time (the garbage collector off while batches run), and the floor probe,
a STREAM-like triad ``a = b + s*c`` (4 transfers per element with write-allocate) and its
in-place form ``a = a + s*c`` (3 transfers) on lrfast's own threads. The faster of the two is
the bandwidth a step is compared with, as bytes moved per step / bandwidth."""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any

import numpy as np

from lrfast import _dispatch


def short_error(e):
    """An exception as one short line, the way results record an error or a skip's cause."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


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
                        self.errors[name] = short_error(e)
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
