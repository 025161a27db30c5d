"""The speed targets of ``python -m lrfast bench``.

A target is one or more *parts*; a part compares one statistic of one case with a threshold:

* ``ratio``: a peer's time per step / lrfast's (``>=``: lrfast at least that many times
  faster); the peer ``torch-fastest`` is the torch path with the smallest median in that case;
* ``floor``: % of the memory-bandwidth floor, (bytes moved per step / probe bandwidth) /
  lrfast's time per step (``>=``);
* ``time``: lrfast's seconds per step (``<=``);
* ``speedup``: lrfast's time on 1 thread / on 2 threads (``>=``).

How a part is judged on a noisy measurement is in ``verdicts``; each part's between-run spread
in ``spread``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import spread as _spread


@dataclass(frozen=True)
class Part:
    case: str
    measure: str                  # ratio, floor, time, speedup
    threshold: float
    peer: str | None = None       # for ratio: a peer, or "torch-fastest"
    label: str | None = None
    family: str = "16M"           # for a part without its own measured spread

    @property
    def key(self):
        return f"{self.case}: {self.name()}"

    @property
    def spread(self):
        """Factor by which this part varies between runs (see the module's docstring)."""
        own = _spread.PARTS.get(self.key)
        return own if own is not None else _spread.FAMILIES[self.family]

    @property
    def at_least(self):
        return self.measure != "time"

    def name(self):
        if self.label:
            return self.label
        return {"ratio": f"{self.peer}/lrfast", "floor": "floor", "time": "lrfast",
                "speedup": "speedup"}[self.measure]

    def fmt(self, v, threshold=False):
        if self.measure == "floor":
            return f"{v:g}%" if threshold else f"{v:.1f}%"
        if self.measure == "time":
            return f"{v * 1e6:g} us" if threshold else f"{v * 1e6:.2f} us"
        return f"{v:g}x" if threshold else f"{v:.2f}x"


@dataclass(frozen=True)
class Target:
    name: str
    parts: tuple[Part, ...]


def _table():
    out = []
    optimizers = (("sgd", "SGD"), ("adagrad", "Adagrad"), ("rmsprop", "RMSprop"),
                  ("adam", "Adam"), ("adamw", "AdamW"))
    for dt in ("f32", "f64"):
        f32 = dt == "f32"
        name = f"adam {dt} 16M"
        parts = [Part(name, "ratio", 1.0, "torch-fused")]
        if f32:
            parts.append(Part(name, "floor", 90.0))
        out.append(Target(f"Adam {dt} 16M >= 1.0x torch fused" + (", >= 90% floor" if f32 else ""),
                          tuple(parts)))
        for o, label in optimizers:
            if o == "adam":
                continue
            name = f"{o} {dt} 16M"
            parts = [Part(name, "ratio", 1.0, "torch-fastest")]
            if f32:
                parts.append(Part(name, "floor", 85.0))
            out.append(Target(f"{label} {dt} 16M >= 1.0x torch's fastest" +
                              (", >= 85% floor" if f32 else ""), tuple(parts)))
        for case, thr, label in (
                (f"adam {dt} 1000x256", 10.0, f"Adam {dt} 1000x256 >= 10x torch fused"),
                (f"adam {dt} 1000x256 flat", 30.0,
                 f"FlatParams Adam {dt} 1000x256 >= 30x torch fused"),
                (f"adam {dt} 200x10k", 2.0, f"Adam {dt} 200x10k >= 2x torch fused")):
            out.append(Target(label, (Part(case, "ratio", thr, "torch-fused",
                                           family="multi-tensor"),)))
        name = f"adam {dt} 1k"
        parts = [Part(name, "time", 3e-6, label="Adam.step", family="1k")] if f32 else []
        parts.append(Part(name, "ratio", 25.0, "torch-loop", family="1k"))
        out.append(Target(f"Adam.step {dt} 1k " + ("<= 3 us and " if f32 else "") +
                          ">= 25x torch for-loop", tuple(parts)))
        out.append(Target(f"every optimizer {dt} 16M >= 8x numpy-ref",
                          tuple(Part(f"{o} {dt} 16M", "ratio", 8.0, "numpy-ref", label)
                                for o, label in optimizers)))
    out.append(Target("lrfast.torch.Adam, 110-tensor transformer >= 3x torch fused",
                      (Part("torch-api adam f32 transformer", "ratio", 3.0, "torch-fused",
                            family="torch-api"),)))
    out.append(Target("lrfast.torch.Adam, one 16M tensor >= 1.0x torch fused",
                      (Part("torch-api adam f32 16M", "ratio", 1.0, "torch-fused",
                            family="torch-api"),)))
    out.append(Target("Adam f32 1M 1->2 threads >= 1.7x",
                      (Part("adam f32 1M threads 1->2", "speedup", 1.7, family="threads"),)))
    return tuple(out)


TARGETS = _table()


def parts_of(case_name):
    """The target parts measured on one case."""
    return [p for t in TARGETS for p in t.parts if p.case == case_name]
