"""The optimizers the bench times, and what it knows about each one.

Every optimizer of the spec table (``lrfast._specs.OPTIMIZERS``) is benched, keyed by its
lower-case name, in the table's order. What an optimizer is (its class, its state buffers, how
the NumPy reference is called) comes from its spec; this module adds only what the bench itself
chooses or knows about the peers, in ``PEER_FACTS``:

* ``hyper``: the hyper-parameters it is timed with (torch.optim's spelling; default: the class's
  defaults);
* ``torch_fused``: whether torch has a fused CPU kernel for it;
* ``optax``: the optax transformation for ``hyper``, given the imported optax module (None: no
  optax peer);
* ``original``: for an optimizer torch.optim lacks, the implementation its users know
  (lion-pytorch, timm, schedulefree; calling it gives the class, or raises ImportError where
  the package is missing), which takes the same arguments as lrfast.torch's class;
* ``transfers``: elements read and written per element per step, where the generic count
  (param 2, grad 1, each state buffer 2) is not what the update moves (two-pass updates
  read some buffers twice; factored state is not per element);
* ``sizes``: the (dtype, size) cases of the optimizer's "optim" rows.

An optimizer with no entry there is benched with its defaults against the NumPy reference and,
where torch has the class, torch's for-loop and foreach paths.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from lrfast import reference
from lrfast._specs import OPTIMIZERS as SPECS
from lrfast._specs import OptimizerSpec


# The first five optimizers are timed at three sizes in float32 and float64; the later ones at
# the sizes their targets judge: one large tensor and many small ones, float32.
FULL_SIZES = tuple((dt, size) for dt in ("f32", "f64") for size in ("1k", "1M", "16M"))
TARGET_SIZES = (("f32", "16M"), ("f32", "1000x256"))


@dataclass(frozen=True)
class Original:
    """An optimizer's implementation outside torch.optim (see lrfast._bench.peer_imports)."""
    package: str  # its PyPI name: timm, lion-pytorch, schedulefree
    name: str     # its class

    def __call__(self) -> Any:
        """The class; ImportError where the package is missing."""
        from . import peer_imports
        if self.package == "timm":
            return peer_imports.timm_optimizer(self.name)
        if self.package == "lion-pytorch":
            return peer_imports.lion()
        return peer_imports.schedule_free(self.name)


@dataclass(frozen=True)
class PeerFacts:
    hyper: dict = field(default_factory=dict)
    torch_fused: bool = False
    optax: Optional[Callable[[Any, dict], Any]] = None
    original: Optional[Original] = None
    transfers: Optional[int] = None
    sizes: tuple = TARGET_SIZES


PEER_FACTS = {
    "SGD": PeerFacts(dict(lr=1e-2, momentum=0.9), torch_fused=True,
                     optax=lambda optax, h: optax.sgd(h["lr"], momentum=h["momentum"])),
    # optax with torch.optim.Adagrad's defaults: the sum starts at 0, eps 1e-10.
    "Adagrad": PeerFacts(dict(lr=1e-2), torch_fused=True,
                         optax=lambda optax, h: optax.adagrad(
                             h["lr"], initial_accumulator_value=0.0, eps=1e-10)),
    "RMSprop": PeerFacts(dict(lr=1e-2, alpha=0.99, eps=1e-8),
                         optax=lambda optax, h: optax.rmsprop(h["lr"], decay=h["alpha"],
                                                              eps=h["eps"])),
    "Adam": PeerFacts(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), torch_fused=True,
                      optax=lambda optax, h: optax.adam(h["lr"], b1=h["betas"][0],
                                                        b2=h["betas"][1], eps=h["eps"])),
    "AdamW": PeerFacts(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
                       torch_fused=True,
                       optax=lambda optax, h: optax.adamw(h["lr"], b1=h["betas"][0],
                                                          b2=h["betas"][1], eps=h["eps"],
                                                          weight_decay=h["weight_decay"])),
    # The later optimizers, with their defaults where no value is given.
    "Adamax": PeerFacts(dict(lr=2e-3)),
    "RAdam": PeerFacts(dict(lr=1e-3)),
    "Adadelta": PeerFacts(dict(lr=1.0)),
    "Rprop": PeerFacts(dict(lr=1e-2)),
    "NAdam": PeerFacts(dict(lr=2e-3)),
    "ASGD": PeerFacts(dict(lr=1e-2)),
    "Lion": PeerFacts(dict(lr=1e-4, weight_decay=1e-2),
                      original=Original("lion-pytorch", "Lion"),
                      optax=lambda optax, h: optax.lion(h["lr"],
                                                        weight_decay=h["weight_decay"])),
    "Adopt": PeerFacts(dict(lr=1e-3), original=Original("timm", "Adopt")),
    # LAMB: the global grad norm (g read), the norms (p, g, m, v read; m, v written), then the
    # update (p, m, v read; p written).
    "Lamb": PeerFacts(dict(lr=1e-3, weight_decay=1e-2), original=Original("timm", "Lamb"),
                      transfers=11),
    # LARS with weight decay (so the trust ratio is used): norms (p, g), then momentum SGD.
    "Lars": PeerFacts(dict(lr=1.0, momentum=0.9, weight_decay=1e-4),
                      original=Original("timm", "Lars"), transfers=7),
    # Adafactor on the bench's 1-D tensors: the norms and the variance (p, g, variance read;
    # variance written), then the update (p, g, variance read; p written). (A matrix's
    # factored state is not per element: 6.)
    "Adafactor": PeerFacts(dict(lr=1e-2), transfers=8),
    "AdamWScheduleFree": PeerFacts(dict(lr=2.5e-3),
                                   original=Original("schedulefree", "AdamWScheduleFree")),
    "SGDScheduleFree": PeerFacts(dict(lr=1.0), original=Original("schedulefree",
                                                                 "SGDScheduleFree")),
}
for _name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
    PEER_FACTS[_name] = PeerFacts(**{**PEER_FACTS[_name].__dict__, "sizes": FULL_SIZES})


@dataclass(frozen=True)
class Benched:
    spec: OptimizerSpec
    facts: PeerFacts

    @property
    def cls(self) -> str:
        return self.spec.name

    @property
    def hyper(self) -> dict:
        return self.facts.hyper

    @property
    def torch_fused(self) -> bool:
        return self.facts.torch_fused

    @property
    def optax(self):
        return self.facts.optax

    @property
    def in_torch(self) -> bool:
        return self.spec.torch is not None and self.spec.torch.cls is not None

    @property
    def original(self):
        return self.facts.original

    @property
    def sizes(self) -> tuple:
        return self.facts.sizes

    @property
    def transfers(self) -> int:
        """Reads + writes of one element per step: param (2), grad (1), each state buffer (2),
        unless the facts say otherwise."""
        if self.facts.transfers is not None:
            return self.facts.transfers
        return 3 + 2 * len(self.spec.update.state_buffers(self.spec.validate(self.hyper)))

    def reference_step(self, params, grads):
        """A function doing one lrfast.reference update of ``params`` (state held inside)."""
        update = self.spec.update
        values = self.spec.validate(self.hyper)
        state = {b: [np.zeros_like(p) for p in params] for b in update.state_buffers(values)}
        args = [params, grads] + [state.get(b.name) for b in update.buffers if not b.keyword]
        # per-param scalar state (NAdam's mu_product, ASGD's eta and mu): one 0-d array
        args += [np.array(update.initial_value(b.name, values), dtype=params[0].dtype)
                 for b in update.scalar_state]
        kwargs = {h.name: values[h.name] for h in update.hypers if h.functional}
        kwargs.update({b.argname: state.get(b.name) for b in update.buffers if b.keyword})
        if update.advance is None:
            # per-step values derived from class state (Update.scalars, schedule-free's ckp1):
            # a fixed one times the same arithmetic
            kwargs.update(dict.fromkeys(update.scalars, 0.5))
        fn = getattr(reference, update.name + "_")
        if not update.takes_step:
            return functools.partial(fn, *args, **kwargs)
        count = [0]

        def step():
            count[0] += 1
            fn(*args, step=count[0], **kwargs)
        return step


OPTIMIZERS: dict[str, Benched] = {
    name.lower(): Benched(spec, PEER_FACTS.get(name, PeerFacts())) for name, spec in SPECS.items()
}
