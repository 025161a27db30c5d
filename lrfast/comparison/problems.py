"""The built-in problems of ``python -m lrfast compare``: small, deterministic, nothing downloaded.

A :class:`Problem` is a loss to minimise with a target and a step budget. ``problem.make(seed)``
builds one run's :class:`Instance`: its parameters (a dict of arrays, the starting point drawn
from ``seed``), ``grads(step)`` (the loss's gradient on that step's batch, the batch drawn from
a generator seeded with ``seed``) and ``loss()`` (the full training loss, used for the target
and the curves). The data of a problem are fixed (drawn from the problem's own seed), so every
optimizer sees the same data; the run seed varies the starting point and the batches.

The problems:

``linreg-full``, ``linreg-minibatch``, ``linreg-sgd``
    The seed articles' linear regression: x ~ U(0, 2), y = 4 + 3x + N(0, 1), 100 samples,
    y = w x + b fitted on the mean squared error, with all samples per step (full batch), 10
    drawn per step (mini-batch) and one (stochastic gradient descent), the three settings the
    articles contrast. Target: within 1% of the least-squares fit's loss.
``quadratic``
    An ill-conditioned quadratic 1/2 (x - x*)' A (x - x*) in 20 dimensions, A's eigenvalues
    spread log-evenly over [1, 100] (condition number 100) in a random basis. Target 1e-3.
``rosenbrock``
    (1 - x)^2 + 100 (y - x^2)^2 from near (-1.5, 2): the curved valley. Target 1e-3.
``digits-logreg``
    Multinomial logistic regression on scikit-learn's digits (1797 images of 8 x 8 pixels,
    shipped with scikit-learn; pixels scaled to [0, 1]), mini-batches of 64. Target: training
    cross-entropy 0.15. Needs scikit-learn.
``mlp``
    A one-hidden-layer tanh MLP (8 -> 32 -> 3) in NumPy on a synthetic classification task
    (labels from a random teacher network), mini-batches of 64. Target: training
    cross-entropy 0.15.
``torch-mlp``
    The same task and network in torch (float32), trained with ``lrfast.torch``'s optimizer of
    the same name (or torch.optim's, for the reference run). Needs torch.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Problem", "Instance", "PROBLEMS", "available_problems"]

DATA_SEED = 20260101  # the problems' fixed data; run seeds vary start and batches


class Instance:
    """One run of a problem: parameters, the gradient of a step's batch, the full loss."""

    params: dict

    def grads(self, step: int) -> dict:
        raise NotImplementedError

    def loss(self) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Problem:
    """A loss to minimise: ``make(seed) -> Instance``, a target loss and a step budget.

    ``eval_every``: the full loss is computed every that many steps (and after the last), so
    steps to target are counted to that resolution. ``needs``: an importable module the problem
    requires (``""``: none). ``framework``: ``"numpy"`` (lrfast's NumPy optimizers) or
    ``"torch"`` (lrfast.torch's)."""

    name: str
    title: str
    make: Callable[[int], Any]
    target: float
    budget: int
    eval_every: int = 1
    needs: str = ""
    framework: str = "numpy"

    def available(self) -> bool:
        return not self.needs or importlib.util.find_spec(self.needs) is not None


# ------------------------------------------------------------------------------------------
# The seeds' linear regression
# ------------------------------------------------------------------------------------------

def _linreg_data():
    rng = np.random.default_rng(DATA_SEED)
    x = 2 * rng.random(100)
    y = 4 + 3 * x + rng.standard_normal(100)
    return x, y


def _linreg_best_loss() -> float:
    x, y = _linreg_data()
    a = np.stack([x, np.ones_like(x)], axis=1)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(np.mean((a @ coef - y) ** 2))


class _LinearRegression(Instance):
    def __init__(self, seed: int, batch: int | None):
        self.x, self.y = _linreg_data()
        self.rng = np.random.default_rng(seed)
        w, b = self.rng.standard_normal(2)
        self.params = {"w": np.array([w]), "b": np.array([b])}
        self.batch = batch

    def grads(self, step):
        x, y = self.x, self.y
        if self.batch is not None:
            pick = self.rng.integers(0, x.size, self.batch)
            x, y = x[pick], y[pick]
        r = self.params["w"][0] * x + self.params["b"][0] - y
        return {"w": np.array([2 * np.mean(r * x)]), "b": np.array([2 * np.mean(r)])}

    def loss(self):
        r = self.params["w"][0] * self.x + self.params["b"][0] - self.y
        return float(np.mean(r * r))


# ------------------------------------------------------------------------------------------
# Quadratic and Rosenbrock
# ------------------------------------------------------------------------------------------

_QUAD_DIM = 20


def _quadratic_data():
    rng = np.random.default_rng(DATA_SEED + 1)
    q, _ = np.linalg.qr(rng.standard_normal((_QUAD_DIM, _QUAD_DIM)))
    a = (q * np.logspace(0, 2, _QUAD_DIM)) @ q.T
    return (a + a.T) / 2, rng.standard_normal(_QUAD_DIM)


class _Quadratic(Instance):
    def __init__(self, seed: int):
        self.a, self.opt = _quadratic_data()
        rng = np.random.default_rng(seed)
        self.params = {"x": self.opt + rng.standard_normal(_QUAD_DIM)}

    def grads(self, step):
        return {"x": self.a @ (self.params["x"] - self.opt)}

    def loss(self):
        d = self.params["x"] - self.opt
        return float(0.5 * d @ (self.a @ d))


class _Rosenbrock(Instance):
    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.params = {"xy": np.array([-1.5, 2.0]) + 0.1 * rng.standard_normal(2)}

    def grads(self, step):
        x, y = self.params["xy"]
        return {"xy": np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])}

    def loss(self):
        x, y = self.params["xy"]
        return float((1 - x) ** 2 + 100 * (y - x * x) ** 2)


# ------------------------------------------------------------------------------------------
# Classification: softmax regression on digits, a small MLP (NumPy and torch)
# ------------------------------------------------------------------------------------------

def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _cross_entropy_grad(logits, labels):
    """(mean cross-entropy, its gradient with respect to the logits)."""
    logp = _log_softmax(logits)
    n = labels.size
    loss = -logp[np.arange(n), labels].mean()
    g = np.exp(logp)
    g[np.arange(n), labels] -= 1
    return float(loss), g / n


def _digits_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x / 16.0, y.astype(np.int64)


class _Minibatches(Instance):
    """Batches of ``batch`` samples drawn with replacement from a generator seeded by the run."""

    x: np.ndarray
    y: np.ndarray
    rng: np.random.Generator
    batch = 64

    def _batch(self):
        pick = self.rng.integers(0, self.y.size, self.batch)
        return self.x[pick], self.y[pick]


class _SoftmaxRegression(_Minibatches):
    def __init__(self, seed: int):
        self.x, self.y = _digits_data()
        self.rng = np.random.default_rng(seed)
        self.params = {"W": 0.01 * self.rng.standard_normal((64, 10)), "b": np.zeros(10)}

    def grads(self, step):
        x, y = self._batch()
        _, g = _cross_entropy_grad(x @ self.params["W"] + self.params["b"], y)
        return {"W": x.T @ g, "b": g.sum(axis=0)}

    def loss(self):
        return _cross_entropy_grad(self.x @ self.params["W"] + self.params["b"], self.y)[0]


_MLP_SIZES = (8, 32, 3)


def _mlp_data():
    """512 points in 8 dimensions labelled by a random tanh teacher network (3 classes)."""
    rng = np.random.default_rng(DATA_SEED + 2)
    x = rng.standard_normal((512, _MLP_SIZES[0]))
    w1 = rng.standard_normal((_MLP_SIZES[0], 16))
    w2 = rng.standard_normal((16, _MLP_SIZES[2]))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    return x, y.astype(np.int64)


def _mlp_init(seed: int) -> dict:
    """Glorot-uniform weights, zero biases, from ``seed``."""
    rng = np.random.default_rng(seed)
    n_in, n_hidden, n_out = _MLP_SIZES

    def glorot(a, b):
        limit = np.sqrt(6.0 / (a + b))
        return rng.uniform(-limit, limit, (a, b))

    return {"W1": glorot(n_in, n_hidden), "b1": np.zeros(n_hidden),
            "W2": glorot(n_hidden, n_out), "b2": np.zeros(n_out)}


class _MLP(_Minibatches):
    def __init__(self, seed: int):
        self.x, self.y = _mlp_data()
        self.rng = np.random.default_rng(seed)
        self.params = _mlp_init(seed + 1_000_003)

    def _forward(self, x):
        p = self.params
        h = np.tanh(x @ p["W1"] + p["b1"])
        return h, h @ p["W2"] + p["b2"]

    def grads(self, step):
        x, y = self._batch()
        p = self.params
        h, logits = self._forward(x)
        _, g = _cross_entropy_grad(logits, y)
        gh = (g @ p["W2"].T) * (1 - h * h)
        return {"W1": x.T @ gh, "b1": gh.sum(axis=0), "W2": h.T @ g, "b2": g.sum(axis=0)}

    def loss(self):
        return _cross_entropy_grad(self._forward(self.x)[1], self.y)[0]


class _TorchMLP:
    """The MLP task in torch: a module, its parameters, and a closure-free step interface."""

    def __init__(self, seed: int):
        import torch

        x, y = _mlp_data()
        init = _mlp_init(seed + 1_000_003)
        self.rng = np.random.default_rng(seed)
        self.x_np, self.y_np = x, y
        self.x = torch.from_numpy(x.astype(np.float32))
        self.y = torch.from_numpy(y)
        n_in, n_hidden, n_out = _MLP_SIZES
        first = torch.nn.Linear(n_in, n_hidden)
        second = torch.nn.Linear(n_hidden, n_out)
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(init["W1"].T.astype(np.float32)))
            first.bias.zero_()
            second.weight.copy_(torch.from_numpy(init["W2"].T.astype(np.float32)))
            second.bias.zero_()
        self.model = torch.nn.Sequential(first, torch.nn.Tanh(), second)
        self.params = list(self.model.parameters())

    def backward(self, step):
        """Gradients of a batch of 64 into the parameters' ``.grad``."""
        import torch

        pick = torch.from_numpy(self.rng.integers(0, self.y_np.size, 64))
        for p in self.params:
            p.grad = None
        loss = torch.nn.functional.cross_entropy(self.model(self.x[pick]), self.y[pick])
        loss.backward()

    def loss(self):
        import torch

        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(self.model(self.x), self.y))


_LINREG_TARGET = 1.01 * _linreg_best_loss()

PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    Problem("linreg-full", "linear regression (the seeds'), full batch",
            lambda seed: _LinearRegression(seed, None), _LINREG_TARGET, 500),
    Problem("linreg-minibatch", "linear regression, mini-batches of 10",
            lambda seed: _LinearRegression(seed, 10), _LINREG_TARGET, 1000, eval_every=5),
    Problem("linreg-sgd", "linear regression, one sample per step",
            lambda seed: _LinearRegression(seed, 1), _LINREG_TARGET, 2000, eval_every=10),
    Problem("quadratic", "quadratic, 20 dimensions, condition number 100",
            _Quadratic, 1e-3, 1000),
    Problem("rosenbrock", "Rosenbrock's valley from (-1.5, 2)", _Rosenbrock, 1e-3, 3000,
            eval_every=5),
    Problem("digits-logreg", "softmax regression on scikit-learn's digits, batches of 64",
            _SoftmaxRegression, 0.15, 1000, eval_every=20, needs="sklearn"),
    Problem("mlp", "MLP 8-32-3 (tanh) on a teacher's labels, batches of 64", _MLP, 0.15, 1000,
            eval_every=10),
    Problem("torch-mlp", "the same MLP in torch (float32), lrfast.torch optimizers", _TorchMLP,
            0.15, 1000, eval_every=10, needs="torch", framework="torch"),
)}


def available_problems() -> list[str]:
    """Names of the problems whose requirements are installed, in table order."""
    return [name for name, p in PROBLEMS.items() if p.available()]
