"""The optimizers the bench times, and all it knows about each one.

This table is the bench's only per-optimizer knowledge: the cases are made for each entry (in
this order), and every peer is built from an entry's fields, with no other code that names an
optimizer. An entry holds:

* ``cls``: the class name in :mod:`lrfast`, :mod:`lrfast.torch` and :mod:`torch.optim` (the
  lrfast, torch-loop, torch-foreach, torch-fused and torch-API peers are that class built with
  ``hyper``);
* ``hyper``: hyper-parameters all three accept, in torch.optim's spelling;
* ``transfers``: reads + writes of one element per step (bytes a step moves, for % of floor);
* ``torch_fused``: whether torch has a fused CPU kernel for it;
* the numpy-ref peer's call, ``ref_update(params, grads, *buffers, [step=t,] **ref_keywords
  (hyper))``: ``ref_buffers`` zero-filled state lists after the grads, ``step`` (1-based) only
  where ``ref_counts_steps``;
* ``optax``: the optax transformation for ``hyper``, given the imported optax module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lrfast import reference


@dataclass(frozen=True)
class Benched:
    cls: str
    hyper: dict[str, Any]
    transfers: int
    torch_fused: bool
    ref_update: Callable[..., None]
    ref_buffers: int
    ref_counts_steps: bool
    ref_keywords: Callable[[dict[str, Any]], dict[str, Any]]
    optax: Callable[[Any, dict[str, Any]], Any]


def _adam_keywords(h, decoupled):
    b1, b2 = h["betas"]
    return dict(lr=h["lr"], beta1=b1, beta2=b2, eps=h["eps"],
                weight_decay=h.get("weight_decay", 0.0), decoupled=decoupled)


OPTIMIZERS: dict[str, Benched] = {
    "sgd": Benched(
        "SGD", dict(lr=1e-2, momentum=0.9), transfers=5, torch_fused=True,
        ref_update=reference.sgd_, ref_buffers=1, ref_counts_steps=True,
        ref_keywords=lambda h: dict(lr=h["lr"], momentum=h["momentum"]),
        optax=lambda optax, h: optax.sgd(h["lr"], momentum=h["momentum"])),
    "adagrad": Benched(
        "Adagrad", dict(lr=1e-2), transfers=5, torch_fused=True,
        ref_update=reference.adagrad_, ref_buffers=1, ref_counts_steps=True,
        ref_keywords=lambda h: dict(lr=h["lr"]),
        # torch.optim.Adagrad's defaults: the sum starts at 0, eps 1e-10.
        optax=lambda optax, h: optax.adagrad(h["lr"], initial_accumulator_value=0.0, eps=1e-10)),
    "rmsprop": Benched(
        "RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8), transfers=5, torch_fused=False,
        ref_update=reference.rmsprop_, ref_buffers=1, ref_counts_steps=False,
        ref_keywords=lambda h: dict(lr=h["lr"], alpha=h["alpha"], eps=h["eps"]),
        optax=lambda optax, h: optax.rmsprop(h["lr"], decay=h["alpha"], eps=h["eps"])),
    "adam": Benched(
        "Adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), transfers=7, torch_fused=True,
        ref_update=reference.adam_, ref_buffers=2, ref_counts_steps=True,
        ref_keywords=lambda h: _adam_keywords(h, decoupled=False),
        optax=lambda optax, h: optax.adam(h["lr"], b1=h["betas"][0], b2=h["betas"][1],
                                          eps=h["eps"])),
    "adamw": Benched(
        "AdamW", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), transfers=7,
        torch_fused=True,
        ref_update=reference.adam_, ref_buffers=2, ref_counts_steps=True,
        ref_keywords=lambda h: _adam_keywords(h, decoupled=True),
        optax=lambda optax, h: optax.adamw(h["lr"], b1=h["betas"][0], b2=h["betas"][1],
                                           eps=h["eps"], weight_decay=h["weight_decay"])),
}
