"""``python -m lrfast demo``: the seed articles' linear regression trained with each optimizer.

Data as in the seeds: x ~ U(0, 2), y = 4 + 3x + N(0, 1), 100 samples. The model y = w x + b is
fitted by gradient descent on the mean squared error, whose gradient over a batch is
dL/dw = 2/n sum((w x + b - y) x), dL/db = 2/n sum(w x + b - y). The exact least-squares fit is
computed too, so each optimizer's final loss can be read against the best possible one.

Two runs per optimizer, each from w = b = 0:

* full batch (the seeds' setting): every step sees all samples;
* mini-batch: every step sees 10 samples drawn at random (with replacement, from a seeded
  generator), so the weights keep moving around the optimum; an exponential moving average
  of them (:class:`lrfast.Averager` given to the optimizer as ``ema=``, updated within each
  step) is kept beside, and the loss of the raw weights and of the average are compared. The
  average smooths out the last hundred or so steps' noise, and lags behind an optimizer that
  is still converging.
"""
from __future__ import annotations

import time

import numpy as np

from . import SGD, Adagrad, Adam, AdamW, Averager, RMSprop, warmup_decay

OPTIMIZERS = [
    ("SGD", SGD, dict(lr=0.1)),
    ("SGD momentum", SGD, dict(lr=0.05, momentum=0.9)),
    ("SGD nesterov", SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", Adagrad, dict(lr=0.5)),
    ("RMSprop", RMSprop, dict(lr=0.01)),
    ("Adam", Adam, dict(lr=0.1)),
    ("AdamW", AdamW, dict(lr=0.1, weight_decay=1e-2)),
]
BATCH = 10                 # samples per mini-batch step
EMA_DECAY = 0.99           # the average's decay, reached after a warmup (warmup_decay)


def make_data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    x = 2 * rng.random(n)
    y = 4 + 3 * x + rng.standard_normal(n)
    return x, y


def mse(w, b, x, y):
    return float(np.mean((w * x + b - y) ** 2))


def train(cls, hyper, x, y, steps, batch=None, seed=0, ema_decay=None):
    """Fit w, b from zero; returns (w, b, median optimizer-step seconds), then the average's
    (w, b) when ``ema_decay`` is given. ``batch``: samples drawn per step (None: all of them,
    in order), from a generator seeded with ``seed``."""
    params = {"w": np.zeros(1), "b": np.zeros(1)}
    grads = {"w": np.zeros(1), "b": np.zeros(1)}
    ema = Averager(params, ema_decay) if ema_decay is not None else None
    opt = cls(params, **hyper, ema=ema)
    rng = np.random.default_rng(seed)
    times = np.empty(steps)
    for t in range(steps):
        if batch is None:
            xb, yb = x, y
        else:
            idx = rng.integers(0, x.size, batch)
            xb, yb = x[idx], y[idx]
        r = params["w"][0] * xb + params["b"][0] - yb
        grads["w"][0] = 2.0 / xb.size * np.dot(r, xb)
        grads["b"][0] = 2.0 / xb.size * r.sum()
        t0 = time.perf_counter()
        opt.step(grads)
        times[t] = time.perf_counter() - t0
    out = (params["w"][0], params["b"][0], float(np.median(times)))
    if ema is None:
        return out
    return out + (ema.averages["w"][0], ema.averages["b"][0])


def main(steps=1000, seed=0):
    x, y = make_data(seed=seed)
    best_w, best_b = np.polyfit(x, y, 1)
    best = mse(best_w, best_b, x, y)
    print(f"linear regression y = w x + b, {x.size} samples, {steps} full-batch steps from w = b = 0")
    print(f"least-squares optimum: w = {best_w:.4f}, b = {best_b:.4f}, loss = {best:.6f}\n")
    header = f"{'optimizer':<14} {'hyper-parameters':<36} {'final loss':>11} {'excess':>10} {'w':>8} {'b':>8} {'us/step':>8}"
    print(header)
    print("-" * len(header))
    for name, cls, hyper in OPTIMIZERS:
        w, b, sec = train(cls, hyper, x, y, steps)
        loss = mse(w, b, x, y)
        hp = ", ".join(f"{k}={v}" for k, v in hyper.items())
        print(f"{name:<14} {hp:<36} {loss:>11.6f} {loss - best:>10.2e} {w:>8.4f} {b:>8.4f} {sec * 1e6:>8.2f}")

    decay = warmup_decay(EMA_DECAY)
    print(f"\nthe same with noisy gradients: {steps} mini-batch steps of {BATCH} samples drawn at "
          f"random (seed {seed + 1}),")
    print(f"and an EMA of the weights fused into each step: ema=lrfast.Averager(params, "
          f"lrfast.warmup_decay({EMA_DECAY}))")
    print(f"(decay {EMA_DECAY} after a warmup: min({EMA_DECAY}, 1 - (1 + e)^(-2/3)) at averaging "
          "step e). Losses are over all samples.\n")
    header = (f"{'optimizer':<14} {'final loss':>11} {'excess':>10} {'EMA loss':>11} "
              f"{'EMA excess':>10} {'EMA w':>8} {'EMA b':>8} {'us/step':>8}")
    print(header)
    print("-" * len(header))
    for name, cls, hyper in OPTIMIZERS:
        w, b, sec, ew, eb = train(cls, hyper, x, y, steps, batch=BATCH, seed=seed + 1,
                                  ema_decay=decay)
        loss, ema_loss = mse(w, b, x, y), mse(ew, eb, x, y)
        print(f"{name:<14} {loss:>11.6f} {loss - best:>10.2e} {ema_loss:>11.6f} "
              f"{ema_loss - best:>10.2e} {ew:>8.4f} {eb:>8.4f} {sec * 1e6:>8.2f}")
    print("\nEMA excess below the raw one: the average removed the last steps' noise; above it: "
          "it lags\nan optimizer that is still converging. us/step: the median step, the EMA's "
          "update included.")
    return 0
