"""Training runs for the exact-resume tests, shared by the test process and the fresh processes
it starts (``python -c "import resume_driver; resume_driver.main(...)"``).

Every run is deterministic: run ``i`` builds its optimizer from CONFIGS[i] with a warmup-cosine
schedule times a ReduceLROnPlateau, steps it with grads from a seeded generator, and feeds the
plateau a metric every 10 steps. Three phases:

``save``    steps 0..STOP-1, then save_checkpoint to ``folder/run-<id>.npz``
``resume``  builds the same optimizer fresh, load_checkpoint, steps STOP..END-1, then saves the
            final state to ``folder/final-<id>.npz``
``straight`` (in-process) steps 0..END-1 without stopping
"""
from __future__ import annotations

import os

import numpy as np

import lrfast
from cases import CONFIGS, OPTIMIZERS

STOP, END = 30, 130
SHAPES = {"w": (37, 11), "b": (11,), "big": (20_003,), "empty": (0,)}
DTYPES = {"f32": np.float32, "f64": np.float64}
LAYOUTS = ("list", "flat")


def run_ids():
    return [f"{i}-{d}-{lay}" for i in range(len(CONFIGS)) for d in DTYPES for lay in LAYOUTS]


class Run:
    def __init__(self, run_id):
        i, d, layout = run_id.split("-")
        name, hyper, _ = CONFIGS[int(i)]
        self.name = name
        self.dtype = DTYPES[d]
        self.layout = layout
        rng = np.random.default_rng(100 + int(i))
        init = {k: rng.standard_normal(s).astype(self.dtype) for k, s in SHAPES.items()}
        self.plateau = lrfast.ReduceLROnPlateau(patience=1, factor=0.5)
        lr = lrfast.schedules.warmup_cosine(0.0, hyper["lr"], 10, END) * self.plateau
        self.opt = self._make(name, {**hyper, "lr": lr}, init)
        self.scheduled = self.opt is not None
        if self.opt is None:
            # An optimizer that refuses a schedule as lr (Rprop's lr only starts its step
            # sizes; LAMB's corrected decay needs the peak lr): its number.
            self.opt = self._make(name, hyper, init)
        self.seed = 7 + int(i)

    def _make(self, name, hyper, init):
        """The optimizer, or None when a callable lr is refused."""
        try:
            if self.layout == "flat":
                self.flat = lrfast.FlatParams(SHAPES, self.dtype, init=init)
                return OPTIMIZERS[name](self.flat, **hyper)
            self.params = [init[k].copy() for k in SHAPES]
            return OPTIMIZERS[name](self.params, **hyper, skip_nonfinite=True)
        except (TypeError, ValueError):
            if callable(hyper["lr"]):
                return None
            raise

    def grads(self, t):
        rng = np.random.default_rng([self.seed, t])
        g = [rng.standard_normal(s).astype(self.dtype) for s in SHAPES.values()]
        if self.layout == "list" and t % 17 == 5:
            g[1][0] = np.nan  # a skipped step, so the skip counter is part of the state
        return g

    def step(self, t):
        g = self.grads(t)
        if self.layout == "flat":
            for k, a in zip(SHAPES, g):
                self.flat.grads[k][...] = a
            self.opt.step()
        else:
            self.opt.step(g)
        if t % 10 == 9:
            p = self.opt.params
            values = p.values() if isinstance(p, dict) else p
            # A metric that plateaus now and then, so the factor changes during the run.
            self.plateau.step(float(round(sum(float(np.abs(v).sum()) for v in values), -2)))

    def run(self, start, stop):
        for t in range(start, stop):
            self.step(t)


def main(phase, folder):
    for run_id in run_ids():
        r = Run(run_id)
        if phase == "save":
            r.run(0, STOP)
            lrfast.save_checkpoint(os.path.join(folder, f"run-{run_id}.npz"), r.opt)
        else:
            lrfast.load_checkpoint(os.path.join(folder, f"run-{run_id}.npz"), r.opt)
            r.run(STOP, END)
            lrfast.save_checkpoint(os.path.join(folder, f"final-{run_id}.npz"), r.opt)
