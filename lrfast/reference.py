r"""Pure-NumPy reference for every update in :mod:`lrfast.functional`.

Same signatures, same in-place semantics, written to be read rather than to be fast. Each
function applies the formula in its docstring tensor by tensor, operation by operation in the
order torch.optim's single-tensor code uses, in the tensor's own precision (a Python float
meeting a float32 array is rounded to float32, as NumPy 2 does). The test suite holds
:mod:`lrfast.functional` and the optimizer classes to these functions.

``step`` is the 1-based number of the update being made (the first update is ``step=1``).

The second half mirrors :mod:`lrfast.schedules`: one NumPy function per schedule type, and
``schedule_values(spec, steps)`` evaluating any ``Schedule.to_dict()`` description.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np

__all__ = ["quantize_blockwise", "dequantize_blockwise", "sgd_", "adagrad_", "rmsprop_", "adam_", "widen", "narrow", "random_bits", "mixed_",
           "all_finite", "grad_norm", "clip_grad_norm_", "average_", "schedule_values"]

# 8-bit state: the block-wise rule is NumPy already (lrfast.quantization); the reference
# names it too, so every fast function has its mirror here.
from .quantization import dequantize_blockwise, quantize_blockwise  # noqa: E402,F401


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


def _adam_moments_(p, g, m, v, lr, beta1, beta2, weight_decay, decoupled, maximize):
    """The moments step Adam, RAdam and NAdam share (torch's order): g negated when
    maximizing; weight decay decoupled (p *= 1 - lr wd) or added to g; m lerped towards g by
    1 - beta1, v <- beta2 v + (1 - beta2) g^2. Returns the g the moments saw."""
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * p
    _lerp_(m, g, 1 - beta1)
    v *= beta2
    v += (1 - beta2) * g * g
    return g


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


def adam_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
          weight_decay=0.0, decoupled=False, amsgrad=False, max_exp_avg_sq=None, maximize=False):
    r"""Adam (torch.optim.Adam), or AdamW with ``decoupled=True`` (torch.optim.AdamW).

    .. math::
        \theta &\leftarrow \theta (1 - \eta\lambda) \ \text{(decoupled)}, \qquad
        g \leftarrow \pm g + \lambda\theta \ \text{(otherwise)} \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1) \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat v &\leftarrow \max(\hat v, v) \ \text{(amsgrad)}, \qquad \hat v = v \ \text{(otherwise)} \\
        \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}
            = \theta - \frac{\eta \sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{\hat v} + \epsilon \sqrt{1 - \beta_2^t}}

    The bias corrections are computed in double precision, as torch does; the update is
    evaluated in the second form (one division per element).
    """
    # torch writes the step as (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps); multiplying top and
    # bottom by sqrt(bc2) gives the same value with one division per element, which is what the
    # kernels compute (the two orderings differ only in rounding).
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    neg_step = -(lr / (1 - beta1 ** step)) * bias_correction2_sqrt
    eps_hat = eps * bias_correction2_sqrt
    for p, g, m, v, vmax in _tensors(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq):
        g = _adam_moments_(p, g, m, v, lr, beta1, beta2, weight_decay, decoupled, maximize)
        if amsgrad:
            np.maximum(vmax, v, out=vmax)
            v = vmax
        p += (neg_step * m) / (np.sqrt(v) + eps_hat)


# ------------------------------------------------------------------------------------------
# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop
# ------------------------------------------------------------------------------------------

__all__ += ["adamax_", "radam_", "adadelta_", "rprop_"]


def adamax_(param, grad, exp_avg, exp_inf, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.0, maximize=False):
    r"""Adamax (torch.optim.Adamax): Adam with an infinity norm in place of the second moment.

    .. math::
        g &\leftarrow \pm g + \lambda\theta \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1) \\
        u &\leftarrow \max(\beta_2 u, |g| + \epsilon) \\
        \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,\frac{m}{u}

    The maximum is NaN where either side is (torch.maximum).
    """
    clr = lr / (1 - beta1 ** step)
    for p, g, m, u in _tensors(param, grad, exp_avg, exp_inf):
        d = _direction(g, p, weight_decay, maximize)
        _lerp_(m, d, 1 - beta1)
        np.maximum(u * beta2, np.abs(d) + eps, out=u)
        p += (-clr * m) / u


def radam_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
           weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    r"""RAdam (torch.optim.RAdam): Adam with the variance of the adaptive step rectified, and a
    plain momentum step while the variance estimate is not yet tractable.

    .. math::
        \theta &\leftarrow \theta (1 - \eta\lambda) \ \text{(decoupled)}, \qquad
        g \leftarrow \pm g + \lambda\theta \ \text{(otherwise)} \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1), \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                          {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
        \theta &\leftarrow \theta - \eta\,\frac{m}{1 - \beta_1^t}\,
            \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v} + \epsilon}\, r_t \ (\rho_t > 5), \qquad
        \theta \leftarrow \theta - \eta\,\frac{m}{1 - \beta_1^t} \ \text{(otherwise)}

    The scalars are computed in double from the step, the switch :math:`\rho_t > 5` with them.
    """
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2 ** step / bc2
    for p, g, m, v in _tensors(param, grad, exp_avg, exp_avg_sq):
        g = _adam_moments_(p, g, m, v, lr, beta1, beta2, weight_decay, decoupled_weight_decay,
                           maximize)
        update = m / bc1 * lr
        if rho_t > 5:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            # (torch divides a scalar by a tensor as the tensor's reciprocal times the scalar)
            update = update * (1 / (np.sqrt(v) + eps) * bc2 ** 0.5) * rect
        p -= update


def adadelta_(param, grad, square_avg, acc_delta, *, lr, rho=0.9, eps=1e-6, weight_decay=0.0,
              maximize=False):
    r"""Adadelta (torch.optim.Adadelta).

    .. math::
        g &\leftarrow \pm g + \lambda\theta \\
        v &\leftarrow \rho v + (1 - \rho) g^2 \\
        \Delta &= \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g \\
        u &\leftarrow \rho u + (1 - \rho) \Delta^2 \\
        \theta &\leftarrow \theta - \eta \Delta
    """
    for p, g, v, u in _tensors(param, grad, square_avg, acc_delta):
        d = _direction(g, p, weight_decay, maximize)
        v *= rho
        v += (1 - rho) * d * d
        delta = np.sqrt(u + eps) / np.sqrt(v + eps) * d
        u *= rho
        u += (1 - rho) * delta * delta
        p += -lr * delta


def rprop_(param, grad, prev, step_size, *, etaminus=0.5, etaplus=1.2, step_size_min=1e-6,
           step_size_max=50.0, maximize=False):
    r"""Rprop (torch.optim.Rprop): a step size per element, grown while the gradient keeps its
    sign and shrunk when it flips; the step moves by the step size against the gradient's sign.

    .. math::
        s &= \operatorname{sign}(g\,g_{\text{prev}}), \qquad
        f = \eta_+ \ (s > 0), \ \eta_- \ (s < 0), \ 1 \ (s = 0) \\
        \delta &\leftarrow \operatorname{clamp}(f\,\delta, \delta_{\min}, \delta_{\max}) \\
        g &\leftarrow 0 \ \text{where } f = \eta_- \\
        \theta &\leftarrow \theta - \operatorname{sign}(g)\,\delta, \qquad
        g_{\text{prev}} \leftarrow g

    ``step_size`` starts at the optimizer's lr; the lr is not used after that. As in torch, the
    sign of NaN is 0 (a NaN gradient leaves its element of the param where it is).
    """
    for p, g, gp, ss in _tensors(param, grad, prev, step_size):
        g = np.array(g)  # a copy, and an array even where a 0-d grad came as a scalar
        if maximize:
            np.negative(g, out=g)
        t = p.dtype.type
        x = g * gp
        factor = np.ones_like(p)
        factor[x > 0] = t(etaplus)
        factor[x < 0] = t(etaminus)
        ss *= factor
        np.minimum(np.maximum(ss, t(step_size_min)), t(step_size_max), out=ss)
        g[factor == t(etaminus)] = 0
        sign = (g > 0).astype(p.dtype) - (g < 0).astype(p.dtype)
        p -= sign * ss
        gp[...] = g


# ------------------------------------------------------------------------------------------
# Updates with per-step scalar state: NAdam (mu_product), ASGD (eta, mu)
# ------------------------------------------------------------------------------------------

#
# The scalar state is a 0-d array (float32, or float64 for float64 params), one per call: the
# tensors of a call are at the same step, so they share it. It is advanced here, in its own
# type, as torch advances its 0-d tensors.

__all__ += ["nadam_", "asgd_"]


def nadam_(param, grad, exp_avg, exp_avg_sq, mu_product, *, step, lr, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False,
           maximize=False):
    r"""NAdam (torch.optim.NAdam): Adam with Nesterov momentum (Dozat, 2016).

    .. math::
        \mu_t &= \beta_1 \bigl(1 - \tfrac12\, 0.96^{t\psi}\bigr), \qquad
        \mu_{t+1} = \beta_1 \bigl(1 - \tfrac12\, 0.96^{(t+1)\psi}\bigr) \\
        \Pi_t &= \Pi_{t-1}\, \mu_t \ \text{(mu\_product, 0-d, in its own type)} \\
        \theta &\leftarrow \theta (1 - \eta\lambda) \ \text{(decoupled)}, \qquad
        g \leftarrow \pm g + \lambda\theta \ \text{(otherwise)} \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1), \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        d &= \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        \theta &\leftarrow \theta - \frac{\eta (1 - \mu_t)}{1 - \Pi_t} \frac{g}{d}
            - \frac{\eta\,\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m}{d}

    :math:`\psi` is ``momentum_decay``; the coefficients are formed in double precision.
    """
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    # the 0-d product times mu, in the product's type (a Python float meeting a float32 array
    # is rounded to float32 first)
    mu_product[...] = mu_product * mu
    product = float(mu_product)
    grad_coef = -lr * (1.0 - mu) / (1.0 - product)
    avg_coef = (-lr * mu_next) / (1.0 - product * mu_next)
    bias_correction2 = 1 - beta2 ** step
    for p, g, m, v in _tensors(param, grad, exp_avg, exp_avg_sq):
        g = _adam_moments_(p, g, m, v, lr, beta1, beta2, weight_decay, decoupled_weight_decay,
                           maximize)
        denom = np.sqrt(v / bias_correction2) + eps
        p += (grad_coef * g) / denom
        p += (avg_coef * m) / denom


def asgd_(param, grad, ax, eta, mu, *, step, lr, lambd=1e-4, alpha=0.75, t0=1e6,
          weight_decay=0.0, maximize=False):
    r"""Averaged SGD (torch.optim.ASGD): SGD with a decaying step size, and ``ax``, the Polyak
    (Polyak and Juditsky, 1992) running average of the iterates.

    With :math:`\eta_t`, :math:`\mu_t` the 0-d ``eta`` and ``mu`` as they are on entry:

    .. math::
        g &\leftarrow \pm g + \lambda_{wd}\theta \\
        \theta &\leftarrow \theta (1 - \lambda \eta_t) - \eta_t g \\
        \bar x &\leftarrow \bar x + \mu_t (\theta - \bar x) \ (\mu_t \ne 1), \qquad
            \bar x \leftarrow \theta \ (\mu_t = 1) \\
        \eta_{t+1} &= \eta / (1 + \lambda \eta t)^{\alpha}, \qquad
        \mu_{t+1} = 1 / \max(1, t - t_0)

    ``eta`` starts at the lr and ``mu`` at 1; both are written back rounded to their type.
    """
    eta_t = float(eta)
    mu_t = float(mu)
    for p, g, a in _tensors(param, grad, ax):
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + weight_decay * p
        p *= 1 - lambd * eta_t
        p += -eta_t * g
        if mu_t != 1:
            a += (p - a) * mu_t
        else:
            a[...] = p
    eta[...] = lr / ((1 + lambd * lr * step) ** alpha)
    mu[...] = 1 / max(1, step - t0)


# ------------------------------------------------------------------------------------------
# Updates from outside torch.optim: Lion, ADOPT
# ------------------------------------------------------------------------------------------

__all__ += ["lion_", "adopt_"]


def _sign(x):
    """torch.sgn of a real array: 1, -1 or 0 (NaN gives 0, as comparisons with it are false)."""
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


def lion_(param, grad, exp_avg, *, lr, beta1=0.9, beta2=0.99, weight_decay=0.0,
          decoupled_weight_decay=False, init_lr=None):
    r"""Lion (lion-pytorch's ``Lion``).

    .. math::
        \theta &\leftarrow \theta\,(1 - \eta\lambda'), \qquad
            \lambda' = \lambda / \eta_0 \ \text{(decoupled)}, \ \lambda \ \text{(otherwise)} \\
        \theta &\leftarrow \theta - \eta\,\operatorname{sign}(\beta_1 m + (1-\beta_1)\, g) \\
        m &\leftarrow \beta_2 m + (1-\beta_2)\, g

    :math:`\eta_0` is ``init_lr`` (None: ``lr``); sign(0) = sign(NaN) = 0, as torch.sgn.
    """
    factor = 1 - lr * weight_decay
    if decoupled_weight_decay:
        start = lr if init_lr is None else init_lr
        # (at lr 0 standing for the initial lr too, the ratio lr / init_lr is taken as 1)
        factor = 1 - lr * (weight_decay / start) if start > 0 else 1 - weight_decay
    for p, g, m in _tensors(param, grad, exp_avg):
        p *= factor
        direction = _sign(m * beta1 + (1 - beta1) * g)
        p += -lr * direction
        m *= beta2
        m += (1 - beta2) * g


def adopt_(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.9999, eps=1e-6,
           clip_exp=0.333, weight_decay=0.0, decoupled=False, corrected_weight_decay=False,
           caution=False, maximize=False, max_lr=None):
    r"""ADOPT (timm's ``Adopt``).

    With :math:`g \leftarrow \pm g + \lambda\theta` (unless decoupled): at step 1 only
    :math:`v \leftarrow v + g^2`; at step :math:`t > 1`

    .. math::
        \theta &\leftarrow \theta - s\lambda\,\theta \ \text{(decoupled;}\ s = \eta^2/\eta_{max}
            \text{ when corrected, else } \eta) \\
        n &= \operatorname{clip}(g / \max(\sqrt v, \epsilon), \pm (t-1)^{c}) \\
        m &\leftarrow \operatorname{lerp}(m, n, 1-\beta_1) \\
        u &= m \cdot \frac{[m g > 0]}{\max(\operatorname{mean}[m g > 0], 10^{-3})}
            \ \text{(caution; else } u = m) \\
        \theta &\leftarrow \theta - \eta u, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, g^2

    (no clipping when ``clip_exp`` is None; :math:`\eta_{max}` is ``max_lr``, None: ``lr``).
    The mean is over each tensor, and the stored :math:`m` is the unmasked one.
    """
    scale = lr
    if corrected_weight_decay and max_lr is not None:
        scale = lr ** 2 / max_lr
    for p, g, m, v in _tensors(param, grad, exp_avg, exp_avg_sq):
        g = -g if maximize else g
        if weight_decay != 0 and not decoupled:
            g = g + weight_decay * p
        if step == 1:
            v += g * g
            continue
        if weight_decay != 0 and decoupled:
            p += (-scale * weight_decay) * p
        n = g / np.maximum(np.sqrt(v), eps)
        if clip_exp is not None:
            bound = (step - 1) ** clip_exp
            n = np.clip(n, -bound, bound)
        _lerp_(m, n, 1 - beta1)
        u = m
        if caution and m.size:
            # timm: mask = [m g > 0]; mask / max(mean(mask), 1e-3), the mean (an exact count in
            # double) in the tensor's precision
            t = p.dtype.type
            mask = (m * g > 0).astype(p.dtype)
            mean = max(t(np.sum(mask, dtype=np.float64)) / t(mask.size), t(1e-3))
            u = m * (mask / mean)
        p += -lr * u
        v *= beta2
        v += (1 - beta2) * g * g


# ------------------------------------------------------------------------------------------
# Per-tensor trust ratios: LAMB, LARS
# ------------------------------------------------------------------------------------------

__all__ += ["lamb_", "lars_"]


def _global_norm(grads):
    """sqrt of the sum of the squared norms of all grads, in double."""
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))


def _norm(x):
    return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


def lamb_(param, grad, exp_avg, exp_avg_sq, *, step, lr, bias_correction=True, beta1=0.9,
          beta2=0.999, eps=1e-6, weight_decay=0.01, grad_averaging=True, max_grad_norm=1.0,
          trust_clip=False, always_adapt=False, caution=False, decoupled_decay=False,
          corrected_weight_decay=False, max_lr=None):
    r"""LAMB (timm.optim.Lamb, NVIDIA's NVLAMB form), each tensor's step scaled by its trust
    ratio.

    .. math::
        c &= \max(\lVert (g_1, \dots, g_n) \rVert / \text{max\_grad\_norm}, 1), \qquad
            g \leftarrow g / c \ \text{(max\_grad\_norm not None)} \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1) \ \text{(grad\_averaging)}, \qquad
            m \leftarrow \beta_1 m + g \ \text{(otherwise)} \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        u &= \frac{m / b_1}{\sqrt{v} / \sqrt{b_2} + \epsilon}, \qquad
            b_i = 1 - \beta_i^t \ \text{(bias\_correction, else 1)} \\
        u &\leftarrow u \cdot \frac{[u g > 0]}{\max(\operatorname{mean}[u g > 0], 10^{-3})}
            \ \text{(caution)} \\
        \theta &\leftarrow \theta - s \lambda \theta \ \text{(decoupled\_decay)}, \qquad
            u \leftarrow u + \lambda\theta \ \text{(otherwise)}, \qquad
            s = \eta^2 / \eta_{max} \ \text{(corrected\_weight\_decay, max\_lr given), else } \eta \\
        r &= \lVert\theta\rVert / \lVert u \rVert \ \text{(1 unless both > 0; at most 1 with
            trust\_clip)}, \ \text{when } \lambda \ne 0 \text{ or always\_adapt, else } r = 1 \\
        \theta &\leftarrow \theta - \eta\, r\, u

    ``c`` is one number for all the tensors of the call; the norms and ``r`` are per tensor.
    """
    tensors = _tensors(param, grad, exp_avg, exp_avg_sq)
    clip = None
    if max_grad_norm is not None:
        clip = max(_global_norm([t[1] for t in tensors]) / max_grad_norm, 1.0)
    if bias_correction:
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    else:
        bc1, bc2 = 1.0, 1.0
    beta3 = 1 - beta1 if grad_averaging else 1.0
    for p, g, m, v in tensors:
        t = p.dtype.type
        if clip is not None:
            g = g / t(clip)
        if beta3 == 1 - beta1:
            _lerp_(m, g, beta3)
        else:
            m *= t(beta1)
            m += t(beta3) * g
        v *= t(beta2)
        v += (t(1 - beta2) * g) * g
        u = (m / t(bc1)) / (np.sqrt(v) / t(math.sqrt(bc2)) + t(eps))
        if caution and u.size:
            mask = (u * g > 0).astype(p.dtype)
            mean = max(t(np.sum(mask, dtype=np.float64)) / t(mask.size), t(1e-3))
            u = u * (mask / mean)
        if weight_decay != 0:
            if decoupled_decay:
                scale = lr ** 2 / max_lr if corrected_weight_decay and max_lr else lr
                p += t(-scale * weight_decay) * p
            else:
                u = u + t(weight_decay) * p
        if weight_decay != 0 or always_adapt:
            w_norm, u_norm = t(_norm(p)), t(_norm(u))
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else t(1)
            if trust_clip:
                ratio = min(ratio, t(1))
            u = u * ratio
        p += t(-lr) * u


def lars_(param, grad, momentum_buffer=None, *, step, lr, momentum=0.0, dampening=0.0,
          weight_decay=0.0, nesterov=False, trust_coeff=0.001, eps=1e-8, trust_clip=False,
          always_adapt=False):
    r"""LARS (timm.optim.Lars): momentum SGD on a gradient scaled by a per-tensor trust ratio
    (LARC's clipping with ``trust_clip``).

    .. math::
        r &= \frac{\kappa \lVert\theta\rVert}{\lVert g\rVert + \lambda\lVert\theta\rVert
            + \epsilon} \ \text{(1 unless both norms are > 0)}, \qquad
            r \leftarrow \min(r / \eta, 1) \ \text{(trust\_clip)} \\
        g &\leftarrow (g + \lambda\theta)\, r \ \text{(when } \lambda \ne 0
            \text{ or always\_adapt)} \\
        b &\leftarrow g \ (t = 1), \qquad b \leftarrow \mu b + (1 - \tau) g \ (t > 1) \\
        g &\leftarrow g + \mu b \ \text{(nesterov)}, \qquad g \leftarrow b \
            \text{(otherwise; with momentum)} \\
        \theta &\leftarrow \theta - \eta g
    """
    for p, g, b in _tensors(param, grad, momentum_buffer):
        t = p.dtype.type
        if weight_decay != 0 or always_adapt:
            w_norm, g_norm = t(_norm(p)), t(_norm(g))
            ratio = t(trust_coeff) * w_norm / (g_norm + w_norm * t(weight_decay) + t(eps))
            if not (w_norm > 0 and g_norm > 0):
                ratio = t(1)
            if trust_clip:
                ratio = min(ratio / t(lr), t(1))
            g = (g + t(weight_decay) * p) * ratio
        if momentum != 0:
            if step == 1:
                b[...] = g
            else:
                b *= t(momentum)
                b += t(1 - dampening) * g
            g = g + t(momentum) * b if nesterov else b
        p += t(-lr) * g


# ------------------------------------------------------------------------------------------
# Factored second moments: Adafactor
# ------------------------------------------------------------------------------------------

__all__ += ["adafactor_"]


def _rms(x):
    """Root mean square of ``x``, summed in double."""
    return math.sqrt(float(np.sum(np.square(x, dtype=np.float64)))) / x.size ** 0.5


def adafactor_(param, grad, row_var, col_var, variance, *, step, lr, beta2_decay=-0.8,
               eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False):
    r"""Adafactor (torch.optim.Adafactor). Per tensor, with :math:`G` the gradient (negated when
    maximizing) and :math:`w = t^{\tau}` (:math:`\tau` = ``beta2_decay``):

    .. math::
        \rho &= \min(\eta, 1/\sqrt t), \qquad
        \alpha = \max(\epsilon_2, \operatorname{RMS}(\theta))\,\rho \\
        \theta &\leftarrow \theta (1 - \eta\lambda) \\
        R &\leftarrow \operatorname{lerp}(R, \operatorname{mean}_{-1} G^2, w), \quad
        C \leftarrow \operatorname{lerp}(C, \operatorname{mean}_{-2} G^2, w), \quad
        \hat V = \frac{R\,C}{\max(\operatorname{mean}_{-2} R, \epsilon_1)}
        \ \text{(two or more dimensions)} \\
        \hat V &= V \leftarrow \operatorname{lerp}(V, G^2, w) \ \text{(fewer)} \\
        U &= G / \sqrt{\max(\hat V, \epsilon_1^2)}, \qquad
        \theta \leftarrow \theta - \frac{\alpha}{\max(1, \operatorname{RMS}(U)/d)}\,U

    ``row_var`` (..., R, 1) and ``col_var`` (..., 1, C) for params of two or more dimensions
    (``variance`` None), ``variance`` shaped as the param otherwise (the others None); single
    arrays or lists of them (None entries where a param has no such buffer). ``eps1`` None:
    the param dtype's machine epsilon. Sums of squares are taken in double.
    """
    w = float(step) ** beta2_decay
    rho = min(lr, 1 / float(step) ** 0.5)
    for p, g, r, c, v in _tensors(param, grad, row_var, col_var, variance):
        dt = p.dtype.type
        e1 = float(np.finfo(p.dtype).eps) if eps1 is None else eps1
        g = -g if maximize else g
        if p.size == 0:
            continue
        alpha = max(eps2, _rms(p)) * rho
        if weight_decay != 0:
            p *= dt(1 - lr * weight_decay)
        if p.ndim >= 2:
            sq = np.square(g, dtype=np.float64)
            _lerp_(r, np.mean(sq, axis=-1, keepdims=True).astype(p.dtype), w)
            _lerp_(c, np.mean(sq, axis=-2, keepdims=True).astype(p.dtype), w)
            m = np.mean(r, axis=-2, keepdims=True, dtype=np.float64).astype(p.dtype)
            est = (r * c) / np.maximum(m, dt(e1))
        else:
            _lerp_(v, g * g, w)
            est = v.copy()
        u = (1 / np.sqrt(np.maximum(est, dt(e1 * e1)))) * g
        p -= dt(alpha / max(1.0, _rms(u) / d)) * u


# ------------------------------------------------------------------------------------------
# Schedule-free AdamW and SGD
# ------------------------------------------------------------------------------------------

#
# Defazio et al., 2024, "The Road Less Scheduled"; the schedulefree package's
# AdamWScheduleFree and SGDScheduleFree. The params hold y during training; z is a state
# buffer (starting as a copy of the param); x, the average, is the params in eval mode.

__all__ += ["adamw_schedule_free_", "sgd_schedule_free_", "schedule_free_values",
            "schedule_free_interpolate_"]


def schedule_free_values(k, lr, *, warmup_steps=0, r=0.0, weight_lr_power=2.0, lr_max=-1.0,
                         weight_sum=0.0):
    r"""The per-step values of step ``k`` (0-based: the number of steps taken before it) from
    a group's scalar state, as the schedulefree package derives them.

    .. math::
        \eta_k &= \eta \min\!\left(1, \tfrac{k+1}{\text{warmup\_steps}}\right) \\
        \eta_{\max} &\leftarrow \max(\eta_{\max}, \eta_k) \\
        w_k &= (k+1)^r\, \eta_{\max}^{\,\text{weight\_lr\_power}}, \qquad
        W \leftarrow W + w_k \\
        c_{k+1} &= w_k / W \quad (0 \text{ when } W = 0)

    ``lr_max`` starts at -1 and ``weight_sum`` at 0. Returns ``{"lr": the scheduled lr,
    "ckp1": c, "lr_max": ..., "weight_sum": ...}`` (the last two: the group's new state).
    """
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr_k = lr * sched
    lr_max = max(lr_k, lr_max)
    weight = ((k + 1) ** r) * (lr_max ** weight_lr_power)
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return {"lr": lr_k, "ckp1": ckp1, "lr_max": lr_max, "weight_sum": weight_sum}


def _torch_lerp_(start, end, weight):
    """torch.lerp with a scalar weight: its first form for |w| < 0.5 (w in the array's type)."""
    w = start.dtype.type(weight)
    if abs(w) < 0.5:
        start += w * (end - start)
    else:
        start[...] = end - (end - start) * (1 - w)


def adamw_schedule_free_(param, grad, z, exp_avg_sq, *, step, ckp1, lr, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.0):
    r"""Schedule-free AdamW (the schedulefree package's AdamWScheduleFree), one step on y.

    ``step`` is k + 1, ``lr`` the warmup-scheduled lr of this step and ``ckp1`` its averaging
    weight (both from :func:`schedule_free_values`).

    .. math::
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        d &= g / (\sqrt{v / (1 - \beta_2^t)} + \epsilon) + \lambda y \\
        y &\leftarrow \operatorname{lerp}(y, z, c) + \eta (\beta_1 (1 - c) - 1)\, d \\
        z &\leftarrow z - \eta\, d
    """
    bias_correction2 = 1 - beta2 ** step
    y_lr = lr * (beta1 * (1 - ckp1) - 1)
    for y, g, zz, v in _tensors(param, grad, z, exp_avg_sq):
        v *= beta2
        v += (1 - beta2) * g * g
        d = g / (np.sqrt(v / bias_correction2) + eps)
        if weight_decay != 0:
            d = d + weight_decay * y
        _torch_lerp_(y, zz, ckp1)
        y += y_lr * d
        zz -= lr * d


def sgd_schedule_free_(param, grad, z, *, ckp1, lr, momentum=0.9, weight_decay=0.0):
    r"""Schedule-free SGD (the schedulefree package's SGDScheduleFree), one step on y.

    ``lr`` is the warmup-scheduled lr of this step and ``ckp1`` its averaging weight (both from
    :func:`schedule_free_values`).

    .. math::
        d &= g + \lambda y \\
        y &\leftarrow \operatorname{lerp}(y, z, c) + \eta (\mu (1 - c) - 1)\, d \\
        z &\leftarrow z - \eta\, d
    """
    y_lr = lr * (momentum * (1 - ckp1) - 1)
    for y, g, zz in _tensors(param, grad, z):
        d = g + weight_decay * y if weight_decay != 0 else g
        _torch_lerp_(y, zz, ckp1)
        y += y_lr * d
        zz -= lr * d


def schedule_free_interpolate_(param, z, weight):
    r"""``param <- lerp(param, z, weight)`` for each tensor: train() (``weight = 1 - beta``, x to
    y) and eval() (``weight = 1 - 1/beta``, y to x), where y = lerp(z, x, beta) and beta is
    beta1 or the momentum."""
    for p, zz in _tensors(param, z):
        _torch_lerp_(p, zz, weight)



# ------------------------------------------------------------------------------------------
# Element types: half precision in, float32 math, rounded back (src/_storage.pxi)
# ------------------------------------------------------------------------------------------
#
# Half-precision buffers are passed here as their uint16 bits with the type's name. An update
# over half buffers is the float32 update on the widened values, each written buffer rounded
# back; ``mixed_`` runs any function of this module that way.

_U32 = np.uint32


def widen(bits, storage):
    """float32 values of half-precision ``bits`` (uint16) of ``storage`` (exact)."""
    bits = np.asarray(bits, dtype=np.uint16)
    if storage == "bfloat16":
        return (bits.astype(_U32) << 16).view(np.float32)
    if storage == "float16":
        return bits.view(np.float16).astype(np.float32)
    raise ValueError(f"storage must be bfloat16 or float16, got {storage!r}")


def _mix32(x):
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x7FEB352D)
    x = x ^ (x >> _U32(15))
    x = x * _U32(0x846CA68B)
    return x ^ (x >> _U32(16))


def random_bits(index, *, seed, step, stream):
    """The 32 random bits stochastic rounding uses for elements ``index`` (int array: positions
    in the concatenated tensors of one plan) of buffer ``stream`` (its table row; the half copy
    of the params is 255) at ``step``: a hash of all four, so any thread count draws the same."""
    with np.errstate(over="ignore"):
        h = np.array([0x9E3779B9], dtype=_U32)
        for word in (seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, step >> 32, stream):
            h = _mix32(h ^ _U32(word))
        k1, k2 = h, _mix32(h ^ _U32(0x85EBCA6B))
        i = np.asarray(index, dtype=np.uint64)
        lo = (i & np.uint64(0xFFFFFFFF)).astype(_U32)
        hi = (i >> np.uint64(32)).astype(_U32)
        return _mix32(_mix32(lo + k1 + hi * _U32(0x85EBCA77)) ^ k2)


def narrow(x, storage, rounding="nearest", *, seed=0, step=0, stream=0, first=0):
    """float32 ``x`` (1-D) rounded to ``storage``, as uint16 bits.

    ``nearest``: to nearest, ties to even (NaN stays a quiet NaN). ``stochastic``: rounded up
    with probability (distance to the value below) / (gap between the two), the threshold drawn
    from :func:`random_bits` for elements ``first, first + 1, ...``.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(_U32)
    nan = (u & _U32(0x7FFFFFFF)) > _U32(0x7F800000)
    stochastic = rounding == "stochastic"
    if stochastic:
        r = random_bits(np.arange(first, first + u.size, dtype=np.uint64), seed=seed,
                        step=step, stream=stream)
    elif rounding != "nearest":
        raise ValueError(f"rounding must be nearest or stochastic, got {rounding!r}")
    with np.errstate(over="ignore"):
        if storage == "bfloat16":
            if stochastic:
                rounded = (u + (r & _U32(0xFFFF))) >> _U32(16)
            else:
                rounded = (u + _U32(0x7FFF) + ((u >> _U32(16)) & _U32(1))) >> _U32(16)
            return np.where(nan, (u >> _U32(16)) | _U32(0x40), rounded).astype(np.uint16)
        if storage != "float16":
            raise ValueError(f"storage must be bfloat16 or float16, got {storage!r}")
        if not stochastic:  # NumPy's cast, with NaN as the quiet NaN 0x7e00 and its sign
            with np.errstate(over="ignore", invalid="ignore"):
                cast = u.view(np.float32).astype(np.float16).view(np.uint16)
            quiet = ((u >> _U32(16)) & _U32(0x8000)) | _U32(0x7E00)
            return np.where(nan, quiet, cast).astype(np.uint16)
        # float16 keeps 10 of float32's 23 mantissa bits for normal results (13 cut); a
        # subnormal result keeps the significand's bits above 2^-24 (s = 126 - exponent cut;
        # beyond 31 the significand is shifted first, so values below ~2^-48 become zero).
        sign = (u >> _U32(16)) & _U32(0x8000)
        a = u & _U32(0x7FFFFFFF)
        ex = a >> _U32(23)
        special = np.where(a > _U32(0x7F800000), _U32(0x7E00), _U32(0x7C00))
        normal = (a - _U32(112 << 23) + (r & _U32(0x1FFF))) >> _U32(13)
        sig = (a & _U32(0x7FFFFF)) | np.where(ex != 0, _U32(0x800000), _U32(0))
        s = np.where(ex < 113, _U32(126) - ex, _U32(14))
        pre = np.where(s > 31, s - _U32(31), _U32(0))
        cut = np.minimum(s, _U32(31))
        sig = np.where(pre < 32, sig >> np.minimum(pre, _U32(31)), _U32(0))
        small = (sig + (r & ((_U32(1) << cut) - _U32(1)))) >> cut
        out = np.where(a >= _U32(143 << 23), special,
                       np.where(a < _U32(113 << 23), small, normal))
        return (out | sign).astype(np.uint16)


def mixed_(fn, buffers, storages, *, step, rounding="nearest", seed=0, out=None,
           out_storage=None, **hyper):
    """``fn`` (an update of this module) over buffers of mixed element types, as the kernels'
    mixed-type driver runs it: every half buffer widened to float32, ``fn`` run on the float32
    values, every buffer but the grads rounded back.

    ``buffers`` maps ``fn``'s buffer arguments, in the kernel's row order (``param``, ``grad``,
    then the state; None for one not used), to lists of arrays; ``storages`` gives each one's
    element type: float32 arrays are updated in place, half ones are uint16 bits. Tensor ``k``'s
    elements are numbered from the sum of the sizes before it (the plan's concatenated index),
    and row ``r`` is random stream ``r``. ``out`` (uint16 bits of ``out_storage``) receives the
    rounded copy of the updated params (stream 255). ``step`` is passed on when ``fn`` takes it.
    """
    names = list(buffers)
    wide: dict[str, Any] = {name: None if a is None else
            [widen(x, storages[name]) if storages[name] != "float32" else x for x in a]
            for name, a in buffers.items()}
    kwargs = dict(hyper, **wide)
    if "step" in inspect.signature(fn).parameters:
        kwargs["step"] = step
    fn(**kwargs)
    sizes = [p.size for p in buffers[names[0]]]
    firsts = np.concatenate([[0], np.cumsum(sizes)])[:-1].astype(int)
    for r, name in enumerate(names):
        if buffers[name] is None or r == 1 or storages[name] == "float32":
            continue
        for x, y, first in zip(buffers[name], wide[name], firsts):
            x.reshape(-1)[...] = narrow(y.reshape(-1), storages[name], rounding, seed=seed,
                                        step=step, stream=r, first=int(first))
    if out is not None:
        for x, y, first in zip(out, wide[names[0]], firsts):
            x.reshape(-1)[...] = narrow(y.reshape(-1), out_storage, rounding, seed=seed,
                                        step=step, stream=255, first=int(first))


# ------------------------------------------------------------------------------------------
# Row-wise sparse updates of embedding tables (lrfast.embedding)
# ------------------------------------------------------------------------------------------

__all__ += ["merge_rows", "sparse_sgd_", "sparse_adagrad_", "rowwise_adagrad_", "sparse_adam_",
            "rowwise_adam_"]


def merge_rows(indices, grads, num_rows, *, maximize=False):
    """(touched rows ascending, the sum of each one's gradient rows in lookup order)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= num_rows):
        raise IndexError("index out of range")
    rows, inverse = np.unique(indices, return_inverse=True)
    merged = np.zeros((rows.size, grads.shape[1]), dtype=grads.dtype)
    np.add.at(merged, inverse, grads)  # element by element, in lookup order
    return rows, (-merged if maximize else merged)


def _touched(table, indices, grads, weight_decay, maximize):
    """(rows, g): the touched rows and their summed gradients, plus L2 decay of those rows."""
    rows, g = merge_rows(indices, grads, table.shape[0], maximize=maximize)
    if weight_decay != 0:
        g = g + table.dtype.type(weight_decay) * table[rows]
    return rows, g


def sparse_sgd_(table, indices, grads, *, lr, weight_decay=0.0, maximize=False):
    r"""w <- w - lr g on each touched row (g: the sum of its lookups' gradient rows)."""
    rows, g = _touched(table, indices, grads, weight_decay, maximize)
    table[rows] = table[rows] + table.dtype.type(-lr) * g


def sparse_adagrad_(table, indices, grads, state_sum, *, step, lr, lr_decay=0.0, eps=1e-10,
                    weight_decay=0.0, maximize=False):
    r"""s <- s + g^2; w <- w - clr g / (sqrt(s) + eps), clr = lr / (1 + (step - 1) lr_decay)."""
    f = table.dtype.type
    rows, g = _touched(table, indices, grads, weight_decay, maximize)
    clr = lr / (1 + (step - 1) * lr_decay)
    s = state_sum[rows] + g * g
    state_sum[rows] = s
    table[rows] = table[rows] + f(-clr) * (g / (np.sqrt(s) + f(eps)))


def _row_mean_square(g):
    """mean_j g_j^2 per row, summed in float64 column by column (the kernel's order)."""
    total = np.zeros(g.shape[0])
    for j in range(g.shape[1]):
        total += np.square(g[:, j].astype(np.float64))
    return (total / g.shape[1]).astype(g.dtype)


def rowwise_adagrad_(table, indices, grads, state_sum, *, step, lr, lr_decay=0.0, eps=1e-10,
                     weight_decay=0.0, maximize=False):
    r"""s_r <- s_r + mean_j g_j^2 (one per row); w <- w - clr g / (sqrt(s_r) + eps)."""
    f = table.dtype.type
    rows, g = _touched(table, indices, grads, weight_decay, maximize)
    clr = lr / (1 + (step - 1) * lr_decay)
    s = state_sum[rows] + _row_mean_square(g)
    state_sum[rows] = s
    mult = f(-clr) / (np.sqrt(s) + f(eps))
    table[rows] = table[rows] + mult[:, None] * g


def _lazy_adam(table, indices, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
               weight_decay, maximize, per_row):
    f = table.dtype.type
    rows, g = _touched(table, indices, grads, weight_decay, maximize)
    m_old = exp_avg[rows]
    m = m_old + (g - m_old) * f(1 - beta1)
    exp_avg[rows] = m
    v_old = exp_avg_sq[rows]
    v = v_old + ((_row_mean_square(g) if per_row else g * g) - v_old) * f(1 - beta2)
    exp_avg_sq[rows] = v
    denom = np.sqrt(v) + f(eps)
    if per_row:
        denom = denom[:, None]
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    table[rows] = table[rows] + (m / denom) * f(-step_size)


def sparse_adam_(table, indices, grads, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9,
                 beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False):
    r"""Lazy Adam (torch's SparseAdam) on the touched rows: m += (1 - b1)(g - m),
    v += (1 - b2)(g^2 - v), w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)."""
    _lazy_adam(table, indices, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
               weight_decay, maximize, per_row=False)


def rowwise_adam_(table, indices, grads, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9,
                  beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False):
    r"""sparse_adam_ with one second moment per row: v_r += (1 - b2)(mean_j g_j^2 - v_r)."""
    _lazy_adam(table, indices, grads, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
               weight_decay, maximize, per_row=True)


# ------------------------------------------------------------------------------------------
# Gradient checks and clipping (lrfast.optim's skip_nonfinite, lrfast.clipping)
# ------------------------------------------------------------------------------------------

def average_(average, param, *, mode, weight=0.0, storage=None):
    """One weight-average step (lrfast.Averager) for one array: ``mode`` "copy" (average <-
    param) or "lerp" (torch.lerp with a scalar weight: ``a + w (p - a)`` for ``|w| < 0.5``,
    else ``p - (p - a)(1 - w)``, ``w`` in the arrays' precision).

    ``storage`` "bfloat16"/"float16": the arrays hold half-precision bits (uint16); the lerp
    computes in float32 and the average is rounded to nearest even.
    """
    if mode == "copy":
        average[...] = param
        return average
    if mode != "lerp":
        raise ValueError(f"mode must be 'copy' or 'lerp', got {mode!r}")
    if storage in ("bfloat16", "float16"):
        a = widen(average.reshape(-1), storage)
        _torch_lerp_(a, widen(param.reshape(-1), storage), weight)
        average[...] = narrow(a, storage).reshape(average.shape)
        return average
    _torch_lerp_(average, param, weight)
    return average


def all_finite(grads, grad_scale=1.0):
    """Are all elements of ``grads`` (a list of arrays), times 1/grad_scale, finite?"""
    with np.errstate(over="ignore", invalid="ignore"):
        for g in grads:
            inv = g.dtype.type(1.0 / grad_scale)
            if not np.all(np.isfinite(g * inv)):
                return False
    return True


def grad_norm(grads, norm_type=2.0):
    """The p-norm of all elements of ``grads`` (a list of arrays) as one vector, in float64."""
    if isinstance(grads, np.ndarray):
        grads = [grads]
    flat = np.concatenate([np.abs(g.astype(np.float64).ravel()) for g in grads] + [np.zeros(0)])
    if norm_type == math.inf:
        return float(flat.max()) if flat.size else 0.0
    with np.errstate(over="ignore"):
        total = math.fsum(flat ** norm_type)
    try:
        return float(total ** (1.0 / norm_type))
    except OverflowError:
        return math.inf


def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """g <- g * min(1, max_norm / (norm + 1e-6)) for every g of ``grads``; returns the norm."""
    if isinstance(grads, np.ndarray):
        grads = [grads]
    total = grad_norm(grads, norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError("non-finite total norm")
    with np.errstate(invalid="ignore"):
        coef = max_norm / (total + 1e-6)
        if not (coef >= 1.0):
            for g in grads:
                g *= g.dtype.type(coef)
    return total


# ==========================================================================================
# Schedules
# ==========================================================================================
#
# One function per schedule type of lrfast.schedules, over an integer array of steps, in
# float64, written from the formulas (not from the compiled code), plus ``schedule_values``,
# which evaluates a ``Schedule.to_dict()`` description with them.

def _t(steps):
    return np.asarray(steps, dtype=np.int64)


def _half_cosine(x):
    r""":math:`(1 + \cos \pi x)/2` for :math:`0 \le x \le 2`, written as
    :math:`\sin^2(\pi (1 - x)/2)` after folding x into [0, 1] (:math:`2 - x` is exact), so that
    it keeps full relative precision near 0, where :math:`1 + \cos` would cancel."""
    x = np.asarray(x, dtype=np.float64)
    x = np.where(x > 1, 2 - x, x)
    return np.sin(np.pi * (0.5 - 0.5 * x)) ** 2


def constant(steps, *, value):
    r""":math:`\eta_t = v`."""
    return np.full(_t(steps).shape, float(value))


def exponential_decay(steps, *, init_value, decay_rate, transition_steps=1, staircase=False,
                      transition_begin=0, end_value=None):
    r""":math:`\eta_t = \eta_0 r^{p}`, :math:`p = (t - t_b)/T` (floored if staircase), 0 before
    :math:`t_b`; bounded by ``end_value`` (below when decaying, above when growing)."""
    s = np.maximum(_t(steps) - transition_begin, 0)
    p = (s // transition_steps).astype(np.float64) if staircase else s / transition_steps
    with np.errstate(over="ignore"):  # growth past the float range is inf, then capped
        v = init_value * np.power(float(decay_rate), p)
    if end_value is not None:
        v = np.maximum(v, end_value) if decay_rate < 1 else np.minimum(v, end_value)
    return v


def natural_exp_decay(steps, *, init_value, decay_rate):
    r""":math:`\eta_t = \eta_0 e^{-k t}`."""
    return init_value * np.exp(-decay_rate * _t(steps).astype(np.float64))


def inverse_time_decay(steps, *, init_value, decay_rate, decay_steps=1, staircase=False):
    r""":math:`\eta_t = \eta_0 / (1 + k\, t/T)` (:math:`\lfloor t/T \rfloor` if staircase)."""
    t = _t(steps)
    p = (t // decay_steps).astype(np.float64) if staircase else t / decay_steps
    return init_value / (1 + decay_rate * p)


def polynomial_decay(steps, *, init_value, end_value, decay_steps, power=1.0,
                     transition_begin=0, cycle=False):
    r""":math:`\eta_t = (\eta_0 - \eta_e)(1 - s/T)^p + \eta_e`, :math:`s = \min(t - t_b, T)`;
    with ``cycle`` T becomes :math:`T \lceil s/T \rceil` and s is not clipped."""
    s = np.maximum(_t(steps) - transition_begin, 0)
    if cycle:
        T = decay_steps * np.maximum(1, -(-s // decay_steps))
    else:
        T = np.full(s.shape, decay_steps)
        s = np.minimum(s, decay_steps)
    return (init_value - end_value) * np.power(1 - s / T, power) + end_value


def cosine_decay(steps, *, init_value, decay_steps, end_value=0.0, exponent=1.0,
                 periodic=False):
    r""":math:`\eta_t = \eta_e + (\eta_0 - \eta_e)\left(\frac{1 + \cos(\pi s/T)}{2}\right)^k`,
    :math:`s = \min(t, T)` (or :math:`s = t \bmod 2T` when periodic: the same cosine)."""
    t = _t(steps)
    s = t % (2 * decay_steps) if periodic else np.minimum(t, decay_steps)
    return end_value + (init_value - end_value) * _half_cosine(s / decay_steps) ** exponent


def cosine_restarts(steps, *, init_value, first_period, period_mult=1.0, min_value=0.0,
                    peak_decay=1.0):
    r"""SGDR: in restart :math:`k` (period :math:`T_0 m^k`, starting at
    :math:`T_0 (m^k - 1)/(m - 1)`), cosine from :math:`\eta_0 d^k` to :math:`\eta_{min}`."""
    out = []
    for t in _t(steps).ravel().tolist():
        k, start, length = 0, 0, first_period
        if period_mult == 1.0:
            k = t // first_period
            start = k * first_period
        else:
            while start + length <= t:       # walk the periods (readable, not fast)
                start += length
                length = first_period * period_mult ** (k + 1)
                k += 1
        frac = (t - start) / length
        out.append(min_value + (init_value * peak_decay ** k - min_value) * _half_cosine(frac))
    return np.array(out).reshape(_t(steps).shape)


def one_cycle(steps, *, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
              div_factor=25.0, final_div_factor=1e4, three_phase=False):
    r"""torch OneCycleLR's phases; steps past ``total_steps - 1`` hold the last value."""
    initial = max_lr / div_factor
    minimum = initial / final_div_factor
    if three_phase:
        phases = [(pct_start * total_steps - 1, initial, max_lr),
                  (2 * pct_start * total_steps - 2, max_lr, initial),
                  (total_steps - 1, initial, minimum)]
    else:
        phases = [(pct_start * total_steps - 1, initial, max_lr), (total_steps - 1, max_lr, minimum)]

    def anneal(a, b, pct):
        if anneal_strategy == "cos":
            return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))
        return (b - a) * pct + a

    out = []
    for t in np.minimum(_t(steps), total_steps - 1).ravel().tolist():
        start = 0.0
        for i, (end, a, b) in enumerate(phases):
            if t <= end or i == len(phases) - 1:
                out.append(anneal(a, b, (t - start) / (end - start)))
                break
            start = end
    return np.array(out).reshape(_t(steps).shape)


def cyclic(steps, *, base_lr, max_lr, step_size_up=2000, step_size_down=None,
           mode="triangular", gamma=1.0):
    r"""torch CyclicLR: a triangle between ``base_lr`` and ``max_lr``, its height halved per
    cycle (triangular2) or times :math:`\gamma^t` (exp_range)."""
    down = step_size_up if step_size_down is None else step_size_down
    total = step_size_up + down
    ratio = step_size_up / total
    t = _t(steps)
    cycle = np.floor(1 + t / total)
    x = 1 + t / total - cycle
    factor = np.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
    height = (max_lr - base_lr) * factor
    if mode == "triangular2":
        with np.errstate(over="ignore"):  # 2^(cycle-1) overflows to inf far out: height 0
            height = height * (1 / 2.0 ** (cycle - 1))
    elif mode == "exp_range":
        height = height * np.power(gamma, t.astype(np.float64))
    return base_lr + height


def piecewise_constant(steps, *, boundaries, values, boundary="ge"):
    r""":math:`\eta_t = v_j`, j = number of boundaries :math:`b \le t` (``'gt'``: :math:`b < t`)."""
    return np.asarray(values, dtype=np.float64)[
        np.searchsorted(boundaries, _t(steps), "right" if boundary == "ge" else "left")]


def piecewise_interpolate(steps, *, boundaries, values, interpolation="linear"):
    r"""Through :math:`(b_j, v_j)`: linear, or :math:`v_{j+1} + (v_j - v_{j+1})(1+\cos\pi f)/2`.
    """
    t = _t(steps).astype(np.float64)
    b = np.asarray(boundaries, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if interpolation == "linear":
        return np.interp(t, b, v)
    j = np.clip(np.searchsorted(b, t, "right") - 1, 0, max(len(b) - 2, 0))
    if len(b) == 1:
        return np.full(t.shape, v[0])
    f = np.clip((t - b[j]) / (b[j + 1] - b[j]), 0.0, 1.0)
    return v[j + 1] + (v[j] - v[j + 1]) * _half_cosine(f)


def inverse_sqrt(steps, *, init_value, timescale=1):
    r""":math:`\eta_t = \eta_0 / \sqrt{\max(t, T)/T}`."""
    return init_value / np.sqrt(np.maximum(_t(steps), timescale) / timescale)


def sqrt_decay(steps, *, init_value, end_value, decay_steps):
    r""":math:`\eta_t = \eta_e + (\eta_0 - \eta_e)(1 - \sqrt{\min(t, T)/T})`."""
    s = np.minimum(_t(steps), decay_steps)
    return end_value + (init_value - end_value) * (1 - np.sqrt(s / decay_steps))


def join(steps, *, schedules, boundaries, local=True):
    r"""Piece j from boundary :math:`b_{j-1}` on, at step :math:`t - b_{j-1}` when local."""
    t = _t(steps)
    flags = [local] * len(schedules) if isinstance(local, bool) else local
    piece = np.searchsorted(boundaries, t, "right")
    out = np.empty(t.shape)
    for j, spec in enumerate(schedules):
        sel = piece == j
        start = boundaries[j - 1] if j > 0 and flags[j] else 0
        out[sel] = schedule_values(spec, t[sel] - start)
    return out


def warmup(steps, *, schedule, warmup_steps, start_value=0.0, overlap=False):
    r"""Linear from ``start_value`` to the schedule's value at 0 (prefix) or at the warmup's end
    (overlap) over ``warmup_steps``; then the schedule at :math:`t - W` (prefix) or t."""
    t = _t(steps)
    target = schedule_values(schedule, np.array([warmup_steps if overlap else 0]))[0]
    ramp = start_value + (target - start_value) * (np.minimum(t, warmup_steps) / warmup_steps)
    after = schedule_values(schedule, np.maximum(t - (0 if overlap else warmup_steps), 0))
    return np.where(t < warmup_steps, ramp, after)


def warmup_cosine(steps, *, init_value, peak_value, warmup_steps, decay_steps, end_value=0.0,
                  exponent=1.0, decay_includes_warmup=True):
    r"""Linear ``init -> peak`` over W steps, then cosine ``peak -> end`` over the decay span."""
    t = _t(steps)
    span = decay_steps - warmup_steps if decay_includes_warmup else decay_steps
    cos = cosine_decay(np.maximum(t - warmup_steps, 0), init_value=peak_value,
                       decay_steps=span, end_value=end_value, exponent=exponent)
    if warmup_steps == 0:
        return cos
    ramp = init_value + (peak_value - init_value) * (t / warmup_steps)
    return np.where(t < warmup_steps, ramp, cos)


def wsd(steps, *, peak_value, warmup_steps, stable_steps, decay_steps, init_value=0.0,
        end_value=0.0, decay_shape="linear"):
    r"""Warmup (linear) :math:`\to` stable at the peak :math:`\to` decay to ``end_value``."""
    t = _t(steps)
    s = np.maximum(t - warmup_steps - stable_steps, 0)
    if decay_shape == "linear":
        tail = polynomial_decay(s, init_value=peak_value, end_value=end_value,
                                decay_steps=decay_steps)
    elif decay_shape == "cosine":
        tail = cosine_decay(s, init_value=peak_value, decay_steps=decay_steps,
                            end_value=end_value)
    else:
        tail = sqrt_decay(s, init_value=peak_value, end_value=end_value, decay_steps=decay_steps)
    out = np.where(t < warmup_steps + stable_steps, peak_value, tail)
    if warmup_steps:
        ramp = init_value + (peak_value - init_value) * (t / warmup_steps)
        out = np.where(t < warmup_steps, ramp, out)
    return out


def product(steps, *, a, b):
    r""":math:`a(t)\, b(t)`."""
    return schedule_values(a, steps) * schedule_values(b, steps)


def clamp(steps, *, schedule, min_value=0.0, max_value=None):
    r""":math:`\min(\max(s(t), lo), hi)`."""
    v = np.maximum(schedule_values(schedule, steps), min_value)
    return v if max_value is None else np.minimum(v, max_value)


def with_plateau(steps, *, schedule, plateau, scale):
    r""":math:`s(t) \cdot f`, floored at ``min_lr`` while f < 1, capped at ``max_lr`` while f > 1."""
    v = schedule_values(schedule, steps) * scale
    if scale < 1:
        v = np.maximum(v, plateau["min_lr"])
    elif scale > 1 and plateau["max_lr"] is not None:
        v = np.minimum(v, plateau["max_lr"])
    return v


_SCHEDULES: dict[str, Callable[..., Any]] = {
    "constant": constant, "exponential_decay": exponential_decay,
    "natural_exp_decay": natural_exp_decay, "inverse_time_decay": inverse_time_decay,
    "polynomial_decay": polynomial_decay, "cosine_decay": cosine_decay,
    "cosine_restarts": cosine_restarts, "one_cycle": one_cycle, "cyclic": cyclic,
    "piecewise_constant": piecewise_constant, "piecewise_interpolate": piecewise_interpolate,
    "inverse_sqrt": inverse_sqrt, "sqrt_decay": sqrt_decay, "join": join, "warmup": warmup,
    "warmup_cosine": warmup_cosine, "wsd": wsd, "product": product, "clamp": clamp,
    "with_plateau": with_plateau,
}


def schedule_values(spec, steps):
    """Evaluate a schedule description (``Schedule.to_dict()``) at ``steps`` with NumPy."""
    params = {k: v for k, v in spec.items() if k != "type"}
    return _SCHEDULES[spec["type"]](_t(steps), **params)

