"""The speed targets of ``python -m lrfast bench``.

A target is one or more *parts*; a part compares one statistic of one case with a threshold:

* ``ratio``: a peer's time per step / lrfast's (``>=``: lrfast at least that many times
  faster); the peer ``torch-fastest`` is the torch path with the smallest median in that case;
* ``floor``: % of the memory-bandwidth floor, (bytes moved per step / probe bandwidth) /
  lrfast's time per step (``>=``);
* ``time``: lrfast's seconds per step (``<=``);
* ``speedup``: lrfast's time on 1 thread / on 2 threads (``>=``);
* ``cost``: lrfast's time per step / a peer's (``<=``): what lrfast's step costs over a
  lighter one timed beside it (Adam with ``ema=`` over Adam alone), printed as ``+x%``;
* ``bytes``: the optimizer state lrfast holds, in bytes per param (``<=``), measured from its
  arrays (``state_bytes()``); not a timing, so no noise: it PASSes or FAILs.

How a part is judged on a noisy measurement is in ``verdicts``; each part's between-run spread
in ``spread``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import spread as _spread


@dataclass(frozen=True)
class Part:
    case: str
    measure: str                  # ratio, floor, time, speedup, cost, bytes
    threshold: float
    peer: str | None = None       # for ratio: a peer, or "torch-fastest"; for cost: a peer
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
        return self.measure not in ("time", "cost", "bytes")

    def name(self):
        if self.label:
            return self.label
        return {"ratio": f"{self.peer}/lrfast", "floor": "floor", "time": "lrfast",
                "speedup": "speedup", "cost": f"lrfast/{self.peer}",
                "bytes": "state B/param"}[self.measure]

    def fmt(self, v, threshold=False):
        if self.measure == "cost":
            return f"{100 * (v - 1):+g}%" if threshold else f"{100 * (v - 1):+.1f}%"
        if self.measure == "floor":
            return f"{v:g}%" if threshold else f"{v:.1f}%"
        if self.measure == "time":
            return f"{v * 1e6:g} us" if threshold else f"{v * 1e6:.2f} us"
        if self.measure == "bytes":
            return f"{v:g} B" if threshold else f"{v:.3f} B"
        return f"{v:g}x" if threshold else f"{v:.2f}x"


@dataclass(frozen=True)
class Target:
    name: str
    parts: tuple[Part, ...]


# Every target: its name, then its parts, one row each (the columns are Part's fields).
_TABLE: dict[str, tuple[tuple[Any, ...], ...]] = {
        # case                              measure   threshold   peer            label         family
    "Adam f32 16M >= 1.0x torch fused, >= 90% floor": (
        ("adam f32 16M",                   "ratio",   1.0,       "torch-fused",   None,        "16M"),
        ("adam f32 16M",                   "floor",   90.0,      None,            None,        "16M"),
    ),
    "SGD f32 16M >= 1.0x torch's fastest, >= 85% floor": (
        ("sgd f32 16M",                    "ratio",   1.0,       "torch-fastest", None,        "16M"),
        ("sgd f32 16M",                    "floor",   85.0,      None,            None,        "16M"),
    ),
    "Adagrad f32 16M >= 1.0x torch's fastest, >= 85% floor": (
        ("adagrad f32 16M",                "ratio",   1.0,       "torch-fastest", None,        "16M"),
        ("adagrad f32 16M",                "floor",   85.0,      None,            None,        "16M"),
    ),
    "RMSprop f32 16M >= 1.0x torch's fastest, >= 85% floor": (
        ("rmsprop f32 16M",                "ratio",   1.0,       "torch-fastest", None,        "16M"),
        ("rmsprop f32 16M",                "floor",   85.0,      None,            None,        "16M"),
    ),
    "AdamW f32 16M >= 1.0x torch's fastest, >= 85% floor": (
        ("adamw f32 16M",                  "ratio",   1.0,       "torch-fastest", None,        "16M"),
        ("adamw f32 16M",                  "floor",   85.0,      None,            None,        "16M"),
    ),
    "Adam f32 1000x256 >= 10x torch fused": (
        ("adam f32 1000x256",              "ratio",   10.0,      "torch-fused",   None,        "multi-tensor"),
    ),
    "FlatParams Adam f32 1000x256 >= 30x torch fused": (
        ("adam f32 1000x256 flat",         "ratio",   30.0,      "torch-fused",   None,        "multi-tensor"),
    ),
    "Adam f32 200x10k >= 2x torch fused": (
        ("adam f32 200x10k",               "ratio",   2.0,       "torch-fused",   None,        "multi-tensor"),
    ),
    "Adam.step f32 1k <= 3 us and >= 25x torch for-loop": (
        ("adam f32 1k",                    "time",    3e-6,      None,            "Adam.step", "1k"),
        ("adam f32 1k",                    "ratio",   25.0,      "torch-loop",    None,        "1k"),
    ),
    "every optimizer f32 16M >= 8x numpy-ref": (
        ("sgd f32 16M",                    "ratio",   8.0,       "numpy-ref",     "SGD",       "16M"),
        ("adagrad f32 16M",                "ratio",   8.0,       "numpy-ref",     "Adagrad",   "16M"),
        ("rmsprop f32 16M",                "ratio",   8.0,       "numpy-ref",     "RMSprop",   "16M"),
        ("adam f32 16M",                   "ratio",   8.0,       "numpy-ref",     "Adam",      "16M"),
        ("adamw f32 16M",                  "ratio",   8.0,       "numpy-ref",     "AdamW",     "16M"),
    ),
    "Adam f64 16M >= 1.0x torch fused": (
        ("adam f64 16M",                   "ratio",   1.0,       "torch-fused",   None,        "16M"),
    ),
    "SGD f64 16M >= 1.0x torch's fastest": (
        ("sgd f64 16M",                    "ratio",   1.0,       "torch-fastest", None,        "16M"),
    ),
    "Adagrad f64 16M >= 1.0x torch's fastest": (
        ("adagrad f64 16M",                "ratio",   1.0,       "torch-fastest", None,        "16M"),
    ),
    "RMSprop f64 16M >= 1.0x torch's fastest": (
        ("rmsprop f64 16M",                "ratio",   1.0,       "torch-fastest", None,        "16M"),
    ),
    "AdamW f64 16M >= 1.0x torch's fastest": (
        ("adamw f64 16M",                  "ratio",   1.0,       "torch-fastest", None,        "16M"),
    ),
    "Adam f64 1000x256 >= 10x torch fused": (
        ("adam f64 1000x256",              "ratio",   10.0,      "torch-fused",   None,        "multi-tensor"),
    ),
    "FlatParams Adam f64 1000x256 >= 30x torch fused": (
        ("adam f64 1000x256 flat",         "ratio",   30.0,      "torch-fused",   None,        "multi-tensor"),
    ),
    "Adam f64 200x10k >= 2x torch fused": (
        ("adam f64 200x10k",               "ratio",   2.0,       "torch-fused",   None,        "multi-tensor"),
    ),
    "Adam.step f64 1k >= 25x torch for-loop": (
        ("adam f64 1k",                    "ratio",   25.0,      "torch-loop",    None,        "1k"),
    ),
    "every optimizer f64 16M >= 8x numpy-ref": (
        ("sgd f64 16M",                    "ratio",   8.0,       "numpy-ref",     "SGD",       "16M"),
        ("adagrad f64 16M",                "ratio",   8.0,       "numpy-ref",     "Adagrad",   "16M"),
        ("rmsprop f64 16M",                "ratio",   8.0,       "numpy-ref",     "RMSprop",   "16M"),
        ("adam f64 16M",                   "ratio",   8.0,       "numpy-ref",     "Adam",      "16M"),
        ("adamw f64 16M",                  "ratio",   8.0,       "numpy-ref",     "AdamW",     "16M"),
    ),
    "lrfast.torch.Adam, 110-tensor transformer >= 3x torch fused": (
        ("torch-api adam f32 transformer", "ratio",   3.0,       "torch-fused",   None,        "torch-api"),
    ),
    "lrfast.torch.Adam, one 16M tensor >= 1.0x torch fused": (
        ("torch-api adam f32 16M",         "ratio",   1.0,       "torch-fused",   None,        "torch-api"),
    ),
    # Low precision and offload (the "lowp" cases). A part whose peer did not run (deepspeed not
    # installed, its op not built) is SKIP, never FAIL; so the peers' parts are targets of
    # their own, apart from the floor's.
    "Adam half precision and offload 16M >= 90% floor": (
        ("adam bf16 16M",                  "floor",   90.0,      None,            "bf16",      "16M"),
        ("adam f16 16M",                   "floor",   90.0,      None,            "f16",       "16M"),
        ("adam bf16 f32-state 16M",        "floor",   90.0,      None,            "bf16 f32-state", "16M"),
        ("adam offload 16M",               "floor",   90.0,      None,            "offload",   "16M"),
    ),
    "Adam bf16 16M >= 1.8x torch fused bf16": (
        ("adam bf16 16M",                  "ratio",   1.8,       "torch-fused",   None,        "16M"),
    ),
    "Adam bf16 params, fp32 state 16M >= 1.0x DeepSpeedCPUAdam": (
        ("adam bf16 f32-state 16M",        "ratio",   1.0,       "deepspeed",     None,        "16M"),
    ),
    "Adam f32 16M >= 1.0x DeepSpeedCPUAdam": (
        ("adam f32 16M deepspeed",         "ratio",   1.0,       "deepspeed",     None,        "16M"),
    ),
    "Adam f32 1000x256 >= 3x DeepSpeedCPUAdam": (
        ("adam f32 1000x256 deepspeed",    "ratio",   3.0,       "deepspeed",     None,        "multi-tensor"),
    ),
    # Optimizer state in 8 and 16 bits (the "state" cases): lrfast.Adam on float32 params with
    # int8 or bf16 moments, against its own float32-state step (lrfast-f32, timed beside) and
    # the 8-bit optimizers of bitsandbytes and torchao (each a target of its own, so that an
    # absent one is a SKIP that hides nothing else).
    "Adam int8 state 16M >= 1.3x fp32 state, >= 85% floor": (
        ("adam state-int8 16M",            "ratio",   1.3,       "lrfast-f32",    None,        "16M"),
        ("adam state-int8 16M",            "floor",   85.0,      None,            None,        "16M"),
    ),
    "Adam int8 state 16M <= 2.05 bytes of state per param": (
        ("adam state-int8 16M",            "bytes",   2.05,      None,            None,        "16M"),
    ),
    "Adam int8 state 16M >= 20x bitsandbytes Adam8bit": (
        ("adam state-int8 16M",            "ratio",   20.0,      "bnb-adam8bit",  None,        "16M"),
    ),
    "Adam int8 state 16M >= 20x torchao AdamW8bit": (
        ("adam state-int8 16M",            "ratio",   20.0,      "torchao-adamw8bit", None,    "16M"),
    ),
    "Adam bf16 state 16M >= 1.2x fp32 state": (
        ("adam state-bf16 16M",            "ratio",   1.2,       "lrfast-f32",    None,        "16M"),
    ),
    "Adam offload step 16M >= 3x torch composed": (
        ("adam offload 16M",               "ratio",   3.0,       "torch-offload", None,        "16M"),
    ),
    # Embedding tables (the "embedding" cases): one sparse step, 64k Zipf lookups, against torch
    # on an uncoalesced sparse COO grad (its coalesce counted, as lrfast's merge is) and FBGEMM's
    # CPU row-wise Adagrad (a SKIP where fbgemm_gpu does not import). The 4M-row table against
    # the same lookups remapped onto 64k rows: the step's time must not grow with the table.
    "SparseAdagrad 1Mx64 >= 10x torch sparse Adagrad": (
        ("embedding adagrad 1Mx64",        "ratio",   10.0,      "torch-sparse",  None,        "16M"),
    ),
    "SparseAdam 1Mx64 >= 10x torch SparseAdam": (
        ("embedding adam 1Mx64",           "ratio",   10.0,      "torch-sparse",  None,        "16M"),
    ),
    "RowWiseAdagrad 1Mx64 >= 1.0x FBGEMM CPU row-wise Adagrad": (
        ("embedding rowwise-adagrad 1Mx64", "ratio",  1.0,       "fbgemm-rowwise", None,       "16M"),
    ),
    "SparseAdagrad step flat in table size: 4M rows <= 1.5x 64k rows, same lookups": (
        ("embedding adagrad 4Mx64",        "cost",    1.5,       "lrfast-64k",    "4M/64k rows", "16M"),
    ),
    "merge_rows 1Mx64 1->2 threads >= 1.7x": (
        ("embedding merge 1Mx64 threads 1->2", "speedup", 1.7,   None,            None,        "threads"),
    ),
    "Adam f32 1M 1->2 threads >= 1.7x": (
        ("adam f32 1M threads 1->2",       "speedup", 1.7,       None,            None,        "threads"),
    ),
    # Weight averages (the "average" cases). The EMA over the 110-tensor transformer is
    # Averager.update() on NumPy views of the model's tensors. The fused EMA (ema=) moves 8 more
    # bytes per element than Adam's 28, so its floor is +29%; a separate pass moves 12 (+43%).
    "EMA update, 110-tensor transformer >= 5x torch's EMA function, >= 5x timm ModelEmaV3": (
        ("ema f32 transformer",            "ratio",   5.0,       "torch-ema-fn",  None,        "torch-api"),
        ("ema f32 transformer",            "ratio",   5.0,       "timm-ema-v3",   None,        "torch-api"),
    ),
    "EMA update f32 16M >= 90% floor": (
        ("ema f32 16M",                    "floor",   90.0,      None,            None,        "16M"),
    ),
    "Adam with ema= f32 16M <= +30% over Adam alone": (
        ("adam+ema f32 16M",               "cost",    1.3,       "no-ema",        "ema= cost", "16M"),
    ),
}


def _later_optimizer_targets() -> dict[str, tuple[tuple[Any, ...], ...]]:
    """The targets of the optimizers after the first five, one set each, from the bench's
    table of them: at 16M a share of the floor (90%, or 80% for the two-pass updates) and at
    least torch's fastest path where torch has the optimizer; on 1000 tensors of 256 elements
    10x, and through lrfast.torch on the 110-tensor transformer 3x, torch's fastest path or
    the implementation its users know (lion-pytorch, timm, schedulefree)."""
    from .optimizers import FULL_SIZES, OPTIMIZERS

    out: dict[str, tuple[tuple[Any, ...], ...]] = {}
    for key, o in OPTIMIZERS.items():
        if o.sizes is FULL_SIZES:
            continue
        name = o.cls
        peer = "torch-fastest" if o.in_torch else "original"
        who = "torch's fastest" if o.in_torch else "the original"
        floor = 80.0 if o.cls in TWO_PASS else 90.0
        big: list[tuple[Any, ...]] = [(f"{key} f32 16M", "floor", floor, None, None, "16M")]
        title = f"{name} f32 16M >= {floor:g}% floor"
        if o.in_torch:
            big.append((f"{key} f32 16M", "ratio", 1.0, peer, None, "16M"))
            title += ", >= 1.0x torch's fastest"
        out[title] = tuple(big)
        out[f"{name} f32 1000x256 >= 10x {who}"] = (
            (f"{key} f32 1000x256", "ratio", 10.0, peer, None, "multi-tensor"),)
        out[f"lrfast.torch.{name}, 110-tensor transformer >= 3x {who}"] = (
            (f"torch-api {key} f32 transformer", "ratio", 3.0, peer, None, "torch-api"),)
    return out


# Updates that read the data twice per step (a norm pass, then the update).
TWO_PASS = ("Lamb", "Lars", "Adafactor")
_TABLE.update(_later_optimizer_targets())
TARGETS = tuple(Target(name, tuple(Part(*row) for row in rows)) for name, rows in _TABLE.items())


def parts_of(case_name):
    """The target parts measured on one case."""
    return [p for t in TARGETS for p in t.parts if p.case == case_name]
