"""The bench's cases: what each one times (an optimizer, a dtype and a size, or a schedule),
in run (and table) order."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from .optimizers import FULL_SIZES, OPTIMIZERS

DTYPES: dict[str, type[np.floating]] = {"f32": np.float32, "f64": np.float64}
# The transformer of the torch-API cases: 9 encoder layers of width 32 (4 heads, feed-forward
# 64) and a linear head, 110 parameter tensors (tests/test_torch_adapter.py trains the same).
TRANSFORMER_LAYER = (96 * 32, 96, 32 * 32, 32, 64 * 32, 64, 32 * 64, 32, 32, 32, 32, 32)
SIZES = {"1k": (2**10,), "1M": (2**20,), "16M": (16 * 2**20,),
         "1000x256": (256,) * 1000, "200x10k": (10_000,) * 200,
         "transformer": TRANSFORMER_LAYER * 9 + (8 * 32, 8)}
SCHEDULE_ARGS = (0.0, 0.1, 1000, 10**7)   # warmup_cosine(init, peak, warmup_steps, decay_steps)
VECTOR_STEPS = 10**7
SCALAR_STEP = 12345
MEMORY_BOUND = 2**20          # % of floor is reported from this many elements up
# The embedding-table cases (kind "embedding"): name -> (rows, dim, Zipf exponent). Every batch
# is EMBEDDING_LOOKUPS lookups drawn from numpy's zipf(a), folded into the table ((k - 1) % rows):
# a few hot rows looked up thousands of times, a long tail once, as in click logs.
EMBEDDING_SIZES = {"1Mx64": (2**20, 64, 1.2), "10Mx128": (10_000_000, 128, 1.2),
                   "4Mx64": (4 * 2**20, 64, 1.2), "1Mx64 a1.05": (2**20, 64, 1.05)}
EMBEDDING_LOOKUPS = 65536
EMBEDDING_BATCHES = 4         # prebuilt batches, stepped in turn (the same ones for every impl)
LINEARITY_ROWS = 2**16        # "lrfast-64k": the same lookups remapped onto a table this small
# case opt -> lrfast's class; the torch class its torch-sparse peer steps (None: no peer)
EMBEDDING_OPTS = {"sgd": ("SparseSGD", "SGD"), "adagrad": ("SparseAdagrad", "Adagrad"),
                  "rowwise-adagrad": ("RowWiseAdagrad", None), "adam": ("SparseAdam", "SparseAdam")}
EMA_DECAY = 0.999             # the weight-average cases' decay (torch's EMA default)


@dataclass(frozen=True)
class Variant:
    """The element types of one low-precision Adam step (kind "lowp"): params, grads and state
    (numpy / lrfast names), and the half copy of the updated params written out, if any."""
    param: str
    grad: str
    state: str
    out: str | None = None
    note: str = ""

    @property
    def bytes_per_element(self):
        """Read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq, the copy."""
        size = {"float32": 4, "bfloat16": 2, "float16": 2}
        return (2 * size[self.param] + size[self.grad] + 4 * size[self.state]
                + (size[self.out] if self.out else 0))


# The "lowp" cases' variants (the case's dtype field): half precision, the offload step, and
# float32 against DeepSpeedCPUAdam.
VARIANTS = {
    "bf16": Variant("bfloat16", "bfloat16", "bfloat16", note="bf16 params, grads, state"),
    "f16": Variant("float16", "float16", "float16", note="fp16 params, grads, state"),
    "bf16 f32-state": Variant("bfloat16", "bfloat16", "float32",
                              note="bf16 params and grads, fp32 state"),
    "offload": Variant("float32", "bfloat16", "float32", "bfloat16",
                       note="fp32 master params and state, bf16 grads, bf16 copy written"),
    "f32": Variant("float32", "float32", "float32", note="fp32 throughout"),
}


@dataclass(frozen=True)
class StateVariant:
    """How lrfast.Adam keeps its two moments on float32 params in a "state" case: float32,
    bfloat16 (rounded to nearest, or stochastically) or 8-bit codes with a float32 scale per
    block of ``INT8_BLOCK`` elements (``state_dtype="int8"``)."""
    state_dtype: str
    rounding: str = "nearest"
    note: str = ""

    def bytes_per_step(self, sizes):
        """Bytes one step moves, counted as the lowp cases count them (no write-allocate): read
        param, grad and both moments, write param and both moments; 8-bit moments also read and
        write their block scales (float32, one per INT8_BLOCK elements of each moment)."""
        n = sum(sizes)
        if self.state_dtype == "int8":
            blocks = sum(-(-size // INT8_BLOCK) for size in sizes)
            return 2 * 4 * n + 4 * n + 4 * 1 * n + 2 * 2 * 4 * blocks
        width = {"float32": 4, "bfloat16": 2}[self.state_dtype]
        return 2 * 4 * n + 4 * n + 4 * width * n


# lrfast.Int8State()'s block size: the cases' params (1M, 16M) are all above its min_size.
INT8_BLOCK = 256
# The "state" cases' variants (the case's dtype field), in run (and table) order: the 8-bit row
# first, since the peers, timed once per size, run in the first row and are shared after it.
STATE_VARIANTS = {
    "int8": StateVariant("int8", note="8-bit moments, a float32 scale per 256 elements"),
    "bf16": StateVariant("bfloat16", note="bf16 moments, rounded to nearest"),
    "bf16-sr": StateVariant("bfloat16", "stochastic", note="bf16 moments, stochastic rounding"),
    "f32": StateVariant("float32", note="fp32 moments (lrfast's baseline)"),
}


def average_transfers(opt, separate=False):
    """Elements read and written per element by a weight-average case's step: the EMA alone
    reads the average and the param and writes the average (3); fused into an optimizer's
    step (``ema=``) it adds a read and a write of the average to the update's transfers (the
    param is already in hand); as a separate pass after the step, all 3."""
    if opt == "ema":
        return 3
    return OPTIMIZERS[opt].transfers + (3 if separate else 2)


@dataclass
class Case:
    name: str
    kind: str                      # optim, flat, torch, lowp, state, average, embedding, schedule-scalar, schedule-vector, threads
    opt: str | None = None
    dtype: str | None = None
    size: str | None = None
    impls: dict = field(default_factory=dict)    # impl -> None (run) or Skip
    results: dict = field(default_factory=dict)  # impl -> result dict
    analysis: dict = field(default_factory=dict)  # ratios, % of floor, speedup
    wall_s: float | None = None                   # time the case took, set-up included
    probe: dict | None = None                     # the floor probe's result in this case's rounds
    rounds: int = 0                               # interleaved rounds the case was timed in
    info: dict = field(default_factory=dict)      # an embedding case: its table and lookups

    @property
    def sizes(self):
        if not self.size or self.size in EMBEDDING_SIZES:    # an embedding table: see .table
            return ()
        return SIZES[self.size]

    @property
    def table(self):
        """(rows, dim, Zipf exponent) of an embedding case (or its merge threads case)."""
        return EMBEDDING_SIZES[self.size] if self.size in EMBEDDING_SIZES else None

    @property
    def elements(self):
        return sum(self.sizes)

    @property
    def bytes_per_step(self):
        if self.kind == "lowp":
            return self.elements * VARIANTS[cast(str, self.dtype)].bytes_per_element
        if self.kind == "state":
            return STATE_VARIANTS[cast(str, self.dtype)].bytes_per_step(self.sizes)
        if self.kind == "average":
            return self.elements * average_transfers(cast(str, self.opt)) * \
                np.dtype(DTYPES[cast(str, self.dtype)]).itemsize
        if self.kind not in ("optim", "flat", "torch"):
            return None
        opt, dtype = cast(str, self.opt), cast(str, self.dtype)  # both set for these kinds
        return self.elements * OPTIMIZERS[opt].transfers * np.dtype(DTYPES[dtype]).itemsize

    def key(self, impl):
        """Cache key of a peer's measurement: the flat rows share their list twin's peers; the
        state rows of one size share the peers (torch, bitsandbytes, torchao), whose step does
        not depend on the row, but not lrfast's float32-state step timed beside each row."""
        if self.kind == "state" and not impl.startswith("lrfast"):
            return (impl, self.kind, self.opt, None, self.size)
        return (impl, self.kind if self.kind not in ("optim", "flat") else "optim",
                self.opt, self.dtype, self.size)


def all_cases(quick):
    """Every case, in run (and table) order; quick mode drops float64 at 16M and the 10M x 128
    embedding table (the low-precision and state cases run at 1M and 16M in both modes; quick
    mode leaves their slowest peers out instead)."""
    cases = []
    for opt, o in OPTIMIZERS.items():
        for dt, size in o.sizes:
            if quick and dt == "f64" and size == "16M":
                continue
            cases.append(Case(f"{opt} {dt} {size}", "optim", opt, dt, size))
    for opt in ("adam", "adamw"):
        for dt in DTYPES:
            for size in ("1000x256", "200x10k"):
                cases.append(Case(f"{opt} {dt} {size}", "optim", opt, dt, size))
                if opt == "adam":
                    cases.append(Case(f"{opt} {dt} {size} flat", "flat", opt, dt, size))
    # lrfast.torch.Adam against torch.optim.Adam, on torch tensors: a model's parameters, and
    # one large tensor.
    cases.append(Case("torch-api adam f32 transformer", "torch", "adam", "f32", "transformer"))
    cases.append(Case("torch-api adam f32 16M", "torch", "adam", "f32", "16M"))
    # Every later optimizer through lrfast.torch on the same model, against torch.optim's class
    # or the implementation its users know.
    for opt, o in OPTIMIZERS.items():
        if o.sizes is not FULL_SIZES:
            cases.append(Case(f"torch-api {opt} f32 transformer", "torch", opt, "f32",
                              "transformer"))
    # Low precision and offload (a second table): Adam with half-precision params, grads and
    # state; bf16 params with fp32 state; the offload step; float32 against DeepSpeedCPUAdam.
    for variant in ("bf16", "f16", "bf16 f32-state", "offload"):
        for size in ("1M", "16M"):
            cases.append(Case(f"adam {variant} {size}", "lowp", "adam", variant, size))
    for size in ("16M", "1000x256"):
        cases.append(Case(f"adam f32 {size} deepspeed", "lowp", "adam", "f32", size))
    # Optimizer state in 8 and 16 bits (kind "state", a table of its own): lrfast.Adam on float32
    # params with int8, bf16 (nearest, stochastic) and float32 moments, against the fp32-state
    # step and the 8-bit optimizers of bitsandbytes and torchao; 1M and 16M in both modes, the
    # slow peers left out of quick runs (see peers._state_skip).
    for size in ("1M", "16M"):
        for variant in STATE_VARIANTS:
            cases.append(Case(f"adam state-{variant} {size}", "state", "adam", variant, size))
    # Weight averages (kind "average", a table of their own): lrfast.Averager.update() on the
    # transformer's 110 tensors and on one 16M tensor, and Adam's step with ema= (the average
    # fused into the update's pass) against the plain step.
    cases.append(Case("ema f32 transformer", "average", "ema", "f32", "transformer"))
    cases.append(Case("ema f32 16M", "average", "ema", "f32", "16M"))
    cases.append(Case("adam+ema f32 16M", "average", "adam", "f32", "16M"))
    # Embedding tables (kind "embedding", a table of their own): one sparse step (merge of the
    # duplicate lookups, then the update of the touched rows) of lrfast's row-wise optimizers
    # against torch.optim on a sparse COO grad and FBGEMM's CPU row-wise Adagrad; a 4M-row
    # table against the same lookups on 64k rows (time flat in the table's size), and more
    # unique rows (Zipf 1.05). 10M x 128 in full runs only (SGD and row-wise Adagrad: no state
    # of the table's size).
    for opt in EMBEDDING_OPTS:
        cases.append(Case(f"embedding {opt} 1Mx64", "embedding", opt, "f32", "1Mx64"))
    cases.append(Case("embedding adagrad 4Mx64", "embedding", "adagrad", "f32", "4Mx64"))
    cases.append(Case("embedding adagrad 1Mx64 a1.05", "embedding", "adagrad", "f32",
                      "1Mx64 a1.05"))
    if not quick:
        for opt in ("sgd", "rowwise-adagrad"):
            cases.append(Case(f"embedding {opt} 10Mx128", "embedding", opt, "f32", "10Mx128"))
    cases.append(Case("embedding merge 1Mx64 threads 1->2", "threads", "merge", "f32", "1Mx64"))
    cases.append(Case("schedule scalar", "schedule-scalar"))
    cases.append(Case("schedule vector 1e7", "schedule-vector"))
    cases.append(Case("adam f32 1M threads 1->2", "threads", "adam", "f32", "1M"))
    return cases


def select(cases, pattern):
    if not pattern:
        return cases
    rx = re.compile(pattern, re.IGNORECASE)
    return [c for c in cases if rx.search(c.name)]
