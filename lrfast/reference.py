r"""Pure-NumPy reference for every update in :mod:`lrfast.functional`.

Same signatures, same in-place semantics, written to be read rather than to be fast. Each
function applies the formula in its docstring tensor by tensor, operation by operation in the
order torch.optim's single-tensor code uses, in the tensor's own precision (a Python float
meeting a float32 array is rounded to float32, as NumPy 2 does). The test suite holds
:mod:`lrfast.functional` and the optimizer classes to these functions.

``step`` is the 1-based number of the update being made (the first update is ``step=1``).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adam_"]


def _tensors(*arrays):
    """Zip single arrays or lists of arrays into per-tensor tuples (None stays None)."""
    if isinstance(arrays[0], np.ndarray):
        return [arrays]
    n = len(arrays[0])
    return list(zip(*[[None] * n if a is None else a for a in arrays]))


def _direction(grad, param, weight_decay, maximize):
    """The gradient used by the update: negated when maximizing, plus L2 weight decay."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    return g


def _lerp_(start, end, weight):
    """start <- start + w (end - start) for w < 0.5, else end - (end - start)(1 - w) (torch.lerp)."""
    w = start.dtype.type(weight)
    if w < 0.5:
        start += w * (end - start)
    else:
        start[...] = end - (end - start) * (1 - w)


def sgd_(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
         nesterov=False, weight_decay=0.0, maximize=False):
    r"""SGD with momentum (torch.optim.SGD).

    .. math::
        g &\leftarrow \pm g + \lambda\theta \\
        b &\leftarrow g \ (t = 1), \qquad b \leftarrow \mu b + (1 - \tau) g \ (t > 1) \\
        g &\leftarrow g + \mu b \ \text{(nesterov)}, \qquad g \leftarrow b \ \text{(otherwise)} \\
        \theta &\leftarrow \theta - \eta g
    """
    for p, g, buf in _tensors(param, grad, momentum_buffer):
        d = _direction(g, p, weight_decay, maximize)
        if momentum != 0:
            if step == 1:
                buf[...] = d
            else:
                buf *= momentum
                buf += (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p += -lr * d


def adagrad_(param, grad, state_sum, *, step, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
             eps_inside_sqrt=False, maximize=False):
    r"""Adagrad (torch.optim.Adagrad; ``eps_inside_sqrt`` gives the seed articles' form).

    .. math::
        g &\leftarrow \pm g + \lambda\theta \\
        \tilde\eta &= \eta / (1 + (t - 1)\delta) \\
        s &\leftarrow s + g^2 \\
        \theta &\leftarrow \theta - \tilde\eta\, g / (\sqrt{s} + \epsilon)
        \quad\text{or}\quad \theta - \tilde\eta\, g / \sqrt{s + \epsilon}
    """
    clr = lr / (1 + (step - 1) * lr_decay)
    for p, g, s in _tensors(param, grad, state_sum):
        d = _direction(g, p, weight_decay, maximize)
        s += d * d
        std = np.sqrt(s + eps) if eps_inside_sqrt else np.sqrt(s) + eps
        p += (-clr * d) / std


def rmsprop_(param, grad, square_avg, momentum_buffer=None, grad_avg=None, *, lr, alpha=0.99,
             eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False):
    r"""RMSprop (torch.optim.RMSprop), optionally centered and with momentum.

    .. math::
        g &\leftarrow \pm g + \lambda\theta \\
        v &\leftarrow \alpha v + (1 - \alpha) g^2 \\
        \bar g &\leftarrow \operatorname{lerp}(\bar g, g, 1 - \alpha) \ \text{(centered)} \\
        d &= \sqrt{v - \bar g^2} + \epsilon \ \text{(centered)}, \qquad
             d = \sqrt{v} + \epsilon \ \text{(otherwise)} \\
        b &\leftarrow \mu b + g / d,\ \theta \leftarrow \theta - \eta b \ (\mu > 0), \qquad
             \theta \leftarrow \theta - \eta g / d \ (\mu = 0)
    """
    for p, g, v, buf, gavg in _tensors(param, grad, square_avg, momentum_buffer, grad_avg):
        d = _direction(g, p, weight_decay, maximize)
        v *= alpha
        v += (1 - alpha) * d * d
        if centered:
            _lerp_(gavg, d, 1 - alpha)
            denom = np.sqrt(v + (-1.0 * gavg) * gavg) + eps
        else:
            denom = np.sqrt(v) + eps
        if momentum > 0:
            buf *= momentum
            buf += d / denom
            p += -lr * buf
        else:
            p += (-lr * d) / denom


def adam_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay=0.0,
          decoupled=False, amsgrad=False, max_exp_avg_sq=None, maximize=False):
    r"""Adam (torch.optim.Adam), or AdamW with ``decoupled=True`` (torch.optim.AdamW).

    .. math::
        \theta &\leftarrow \theta (1 - \eta\lambda) \ \text{(decoupled)}, \qquad
        g \leftarrow \pm g + \lambda\theta \ \text{(otherwise)} \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1) \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat v &\leftarrow \max(\hat v, v) \ \text{(amsgrad)}, \qquad \hat v = v \ \text{(otherwise)} \\
        \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}

    The bias corrections are computed in double precision, as torch does.
    """
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    for p, g, m, v, vmax in _tensors(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq):
        g = -g if maximize else g
        if weight_decay != 0:
            if decoupled:
                p *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * p
        _lerp_(m, g, 1 - beta1)
        v *= beta2
        v += (1 - beta2) * g * g
        if amsgrad:
            np.maximum(vmax, v, out=vmax)
            v = vmax
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        p += (-step_size * m) / denom
