# Type stub for lrfast._optim (src/_optim.pyx + _optim_kernels.pxi): portable optimizer kernels.
from collections.abc import Sequence
from typing import Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray
from typing_extensions import disjoint_base

_Float = TypeVar("_Float", np.float32, np.float64)

# Codes returned by Plan.gather / Plan.step.
GATHER_OK: Final = 0
GATHER_NOT_ARRAY: Final = 1
GATHER_DTYPE: Final = 2
GATHER_SHAPE: Final = 3
GATHER_NOT_CONTIGUOUS: Final = 4
GATHER_OVERLAP: Final = 5
GATHER_MISALIGNED: Final = 6
STEP_SKIPPED_NONFINITE: Final = 7

NORM_BLOCK_SIZE: Final = 4096

# The registry of updates (src/_updates.pxi): each update's index, the names of its
# hyper-parameters in the order Plan.set_hyper takes them, the names of its per-step scalars in
# the order Plan.run/step take them.
UPDATE_IDS: dict[str, int]
UPDATE_ARGS: dict[str, tuple[str, ...]]
UPDATE_SCALARS: dict[str, tuple[str, ...]]
# The multi-pass updates (src/_updates.pxi's _register_passes: LAMB, LARS, ADOPT): {update:
# (passes at most, the hyper-parameter that turns on clipping by the global grad norm, or
# None)}.
PASS_UPDATES: dict[str, tuple[int, str | None]]
# Element types (src/_storage.pxi): name -> code, code -> bytes; rounding modes.
STORAGE_CODES: dict[str, int]
STORAGE_ITEMSIZE: dict[int, int]
ROUNDING_MODES: tuple[str, ...]
AVERAGE_MODES: dict[str, int]

def get_min_elements_per_thread() -> dict[str, int]: ...
def set_min_elements_per_thread(overrides: int | None) -> None: ...
def norm_kind(norm_type: float) -> int: ...
def grad_norm_reduce(
    table: NDArray[np.intp],
    offsets: NDArray[np.intp],
    is64: bool,
    nthreads: int,
    norm_type: float,
    partials: NDArray[np.float64],
) -> float: ...
def scale_(
    table: NDArray[np.intp], offsets: NDArray[np.intp], is64: bool, nthreads: int, factor: float
) -> None: ...
def collect_arrays(
    arrays: Sequence[Any],
    addrs: NDArray[np.intp],
    sizes: NDArray[np.intp],
    typenums: NDArray[np.intc],
    writeable: bool,
) -> int: ...
def has_flush_to_zero() -> bool: ...
def triad(
    a: NDArray[_Float], b: NDArray[_Float], c: NDArray[_Float], s: float, nthreads: int
) -> None: ...
def _debug_index(a: NDArray[np.intp], i: int) -> int: ...
def _convert(
    src: NDArray[np.float32],
    dst: NDArray[np.uint16],
    storage: str,
    rounding: str = "nearest",
    seed: int = 0,
    step: int = 0,
    stream: int = 0,
    first: int = 0,
) -> None: ...
def _widen_to(src: NDArray[np.uint16], dst: NDArray[np.float32], storage: str) -> None: ...
# 8-bit blockwise state (src/_storage.pxi): the kernels' key layout, and their maps' tables
# (installed by lrfast.quantization at import).
QUANT_CODES: dict[str, int]
QUANT_KEY_SHIFT: Final[int]
QUANT_KEY_FIRST: Final[int]
QUANT_KEYS: Final[int]
QUANT_MAX_BLOCK: Final[int]
def install_quant_maps(
    maps: Sequence[tuple[NDArray[np.float32], NDArray[np.int32], int]]
) -> None: ...
def _quantize_blocks(
    x: NDArray[np.float32], codes: NDArray[np.uint8], scales: NDArray[np.float32], signed: bool,
    block: int,
) -> None: ...
def _dequantize_blocks(
    codes: NDArray[np.uint8], scales: NDArray[np.float32], x: NDArray[np.float32], signed: bool,
    block: int,
) -> None: ...
# Schedule-free's train()/eval() (src/_updates_schedule_free.pxi): params <- lerp(params, z, w).
def schedule_free_interpolate(
    table: NDArray[np.intp],
    offsets: NDArray[np.intp],
    storage: str,
    z_storage: str,
    weight: float,
    nthreads: int,
    out: str | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    step: int = 0,
) -> None: ...
# Adafactor's own plan (src/_updates_factored.pxi): its passes over one element type's tensors.
@disjoint_base
class AdafactorPlan:
    def __init__(self, shapes: Sequence[Any], f64: bool, table: NDArray[np.intp]) -> None: ...
    def set_options(self, flush_subnormals: bool) -> None: ...
    @property
    def units(self) -> int: ...
    def set_hyper(self, values: Sequence[float]) -> None: ...
    def all_finite(self, inv_scale: float, nthreads: int) -> bool: ...
    def run(self, lr: float, step: int, nthreads: int, inv_scale: float = 1.0) -> None: ...

def _row_types(
    storage: str, nrows: int, rows: Sequence[str | None] | None, out: str | None
) -> list[int]: ...

@disjoint_base
class Plan:
    def __init__(
        self,
        update: str,
        table: NDArray[np.intp],
        offsets: NDArray[np.intp],
        storage: str,
        typenum: int = -1,
        ndims: NDArray[np.intp] | None = None,
        dims: NDArray[np.intp] | None = None,
        wstart: NDArray[np.intp] | None = None,
        wend: NDArray[np.intp] | None = None,
        rows: Sequence[str | None] | None = None,
        out: str | None = None,
        qblock: int = 0,
    ) -> None: ...
    @property
    def storages(self) -> tuple[str, ...]: ...
    @property
    def quant_block(self) -> int: ...
    def set_hyper(self, values: Sequence[float]) -> None: ...
    def set_options(
        self, skip_nonfinite: bool, flush_subnormals: bool, rounding: str = "nearest",
        seed: int = 0,
    ) -> None: ...
    def gather(self, grads: Sequence[Any]) -> tuple[int, int] | None: ...
    def all_finite(self, inv_scale: float, nthreads: int) -> bool: ...
    def run(
        self, lr: float, step: int, nthreads: int, inv_scale: float = 1.0,
        scalars: Sequence[float] = (), grad_sumsq: float | None = None,
    ) -> None: ...
    def grad_sumsq(self, nthreads: int, inv_scale: float = 1.0) -> float: ...
    def set_averages(self, addresses: NDArray[np.intp] | None) -> None: ...
    def set_average_step(self, mode: str, weight: float = 0.0) -> None: ...
    def step(
        self, grads: Sequence[Any], lr: float, step: int, nthreads: int, inv_scale: float = 1.0,
        scalars: Sequence[float] = (),
    ) -> tuple[int, int] | None: ...

def average_update(
    table: NDArray[np.intp], offsets: NDArray[np.intp], storage: str, mode: str, weight: float,
    nthreads: int,
) -> None: ...
def average_swap(
    table: NDArray[np.intp], offsets: NDArray[np.intp], storage: str, nthreads: int
) -> None: ...

def step_plans(
    plans: Sequence[Plan],
    grads: Sequence[Sequence[Any]],
    lr: float,
    step: int,
    nthreads: int,
    inv_scale: float = 1.0,
    scalars: Sequence[float] = (),
) -> tuple[int, int, int] | None: ...

# Row-wise sparse updates of embedding tables (src/_rowwise.pxi, lrfast/embedding.py).
def rowwise_work_size(n: int, nthreads: int) -> int: ...
def rowwise_group(
    indices: NDArray[np.int64], num_rows: int, nthreads: int, work: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]: ...
def rowwise_update(
    kind: int, table: NDArray[Any], grads: NDArray[Any], order: NDArray[np.int64],
    starts: NDArray[np.int64], rows: NDArray[np.int64], slot: NDArray[np.int64],
    acc: NDArray[Any], s0: NDArray[Any] | None, s1: NDArray[Any] | None,
    h: NDArray[np.float64], maximize: bool, nthreads: int,
) -> None: ...
def rowwise_merge(
    grads: NDArray[Any], order: NDArray[np.int64], starts: NDArray[np.int64],
    slot: NDArray[np.int64], out: NDArray[Any], maximize: bool, nthreads: int,
) -> None: ...
def rowwise_all_finite(grads: NDArray[Any], nthreads: int) -> bool: ...

# Only in the portable build: the CPU probe used to pick a kernel build at import.
def cpu_has_avx2() -> bool: ...
