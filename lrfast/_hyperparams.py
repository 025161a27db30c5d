"""Hyper-parameter checks for each optimizer, shared by the classes and lrfast.functional.

Each function returns the validated values as a dict; the messages are torch.optim's.
"""
from __future__ import annotations

from ._validation import check_beta, check_bool, check_lr, check_nonneg, _real


def sgd(lr, momentum, dampening, weight_decay, nesterov, maximize):
    h = {
        "lr": check_lr(lr),
        "momentum": check_nonneg(momentum, "Invalid momentum value"),
        "dampening": _real(dampening, "dampening"),
        "weight_decay": check_nonneg(weight_decay, "Invalid weight_decay value"),
        "nesterov": check_bool(nesterov, "nesterov"),
        "maximize": check_bool(maximize, "maximize"),
    }
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return h


def adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps, eps_inside_sqrt, maximize):
    return {
        "lr": check_lr(lr),
        "lr_decay": check_nonneg(lr_decay, "Invalid lr_decay value"),
        "weight_decay": check_nonneg(weight_decay, "Invalid weight_decay value"),
        "initial_accumulator_value": check_nonneg(
            initial_accumulator_value, "Invalid initial_accumulator_value value"
        ),
        "eps": check_nonneg(eps, "Invalid epsilon value"),
        "eps_inside_sqrt": check_bool(eps_inside_sqrt, "eps_inside_sqrt"),
        "maximize": check_bool(maximize, "maximize"),
    }


def rmsprop(lr, alpha, eps, weight_decay, momentum, centered, maximize):
    h = {
        "lr": check_lr(lr),
        "alpha": check_nonneg(alpha, "Invalid alpha value"),
        "eps": check_nonneg(eps, "Invalid epsilon value"),
        "weight_decay": check_nonneg(weight_decay, "Invalid weight_decay value"),
        "momentum": check_nonneg(momentum, "Invalid momentum value"),
        "centered": check_bool(centered, "centered"),
        "maximize": check_bool(maximize, "maximize"),
    }
    if h["alpha"] > 1.0:
        raise ValueError(f"Invalid alpha value: {alpha}")
    return h


def adam(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize):
    return {
        "lr": check_lr(lr),
        "eps": check_nonneg(eps, "Invalid epsilon value"),
        "beta1": check_beta(beta1, 0),
        "beta2": check_beta(beta2, 1),
        "weight_decay": check_nonneg(weight_decay, "Invalid weight_decay value"),
        "amsgrad": check_bool(amsgrad, "amsgrad"),
        "maximize": check_bool(maximize, "maximize"),
    }


# Each update's state buffers, in its kernel's table order (after param and grad).
STATE_ROWS = {
    "sgd": ("momentum_buffer",),
    "adagrad": ("sum",),
    "rmsprop": ("square_avg", "momentum_buffer", "grad_avg"),
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}


def state_buffers(kind, h):
    """The state buffers the ``kind`` update uses under validated hyper-parameters ``h``."""
    rows = STATE_ROWS[kind]
    if kind == "sgd":
        return rows if h["momentum"] != 0 else ()
    if kind == "rmsprop":
        return tuple(n for n, used in zip(rows, (True, h["momentum"] > 0, h["centered"])) if used)
    if kind == "adam":
        return rows if h["amsgrad"] else rows[:2]
    return rows
