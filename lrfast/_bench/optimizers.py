"""The optimizers the bench times, and what it needs to know about each one."""
from __future__ import annotations

from typing import Any

# name -> (lrfast / torch.optim class, hyper-parameters both accept, transfers per element,
#          torch has a fused CPU kernel). Transfers: reads + writes of one element per step.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], int, bool]] = {
    "sgd": ("SGD", dict(lr=1e-2, momentum=0.9), 5, True),
    "adagrad": ("Adagrad", dict(lr=1e-2), 5, True),
    "rmsprop": ("RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8), 5, False),
    "adam": ("Adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), 7, True),
    "adamw": ("AdamW", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), 7, True),
}
