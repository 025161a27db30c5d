"""``python -m lrfast demo``: the seed articles' linear regression trained with each optimizer.

Data as in the seeds: x ~ U(0, 2), y = 4 + 3x + N(0, 1), 100 samples. The model y = w x + b is
fitted by full-batch gradient descent on the mean squared error, whose gradient is
dL/dw = 2/n sum((w x + b - y) x), dL/db = 2/n sum(w x + b - y). The exact least-squares fit is
computed too, so each optimizer's final loss can be read against the best possible one.
"""
from __future__ import annotations

import time

import numpy as np

from . import SGD, Adagrad, Adam, AdamW, RMSprop

OPTIMIZERS = [
    ("SGD", SGD, dict(lr=0.1)),
    ("SGD momentum", SGD, dict(lr=0.05, momentum=0.9)),
    ("SGD nesterov", SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", Adagrad, dict(lr=0.5)),
    ("RMSprop", RMSprop, dict(lr=0.01)),
    ("Adam", Adam, dict(lr=0.1)),
    ("AdamW", AdamW, dict(lr=0.1, weight_decay=1e-2)),
]


def make_data(n=100, seed=0):
    rng = np.random.default_rng(seed)
    x = 2 * rng.random(n)
    y = 4 + 3 * x + rng.standard_normal(n)
    return x, y


def mse(w, b, x, y):
    return float(np.mean((w * x + b - y) ** 2))


def train(cls, hyper, x, y, steps):
    """Fit w, b from zero; returns (w, b, median optimizer-step seconds)."""
    params = {"w": np.zeros(1), "b": np.zeros(1)}
    grads = {"w": np.zeros(1), "b": np.zeros(1)}
    opt = cls(params, **hyper)
    n = x.size
    times = np.empty(steps)
    for t in range(steps):
        r = params["w"][0] * x + params["b"][0] - y
        grads["w"][0] = 2.0 / n * np.dot(r, x)
        grads["b"][0] = 2.0 / n * r.sum()
        t0 = time.perf_counter()
        opt.step(grads)
        times[t] = time.perf_counter() - t0
    return params["w"][0], params["b"][0], float(np.median(times))


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
    return 0
