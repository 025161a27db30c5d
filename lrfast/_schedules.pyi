# Type stub for lrfast._schedules (src/_schedules.pyx + _schedules_impl.pxi): schedule evaluator.
from collections.abc import Iterable
from typing import Final, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from typing_extensions import disjoint_base

# Node kinds by name, for the program builder in lrfast/schedules.py.
KINDS: dict[str, int]
N_INT_PARAMS: Final = 4
N_FLOAT_PARAMS: Final = 6

@disjoint_base
class PlateauCell:
    @property
    def address(self) -> int: ...
    @property
    def scale(self) -> float: ...
    @scale.setter
    def scale(self, value: float) -> None: ...
    @property
    def min_lr(self) -> float: ...
    @min_lr.setter
    def min_lr(self, value: float) -> None: ...
    @property
    def max_lr(self) -> float: ...
    @max_lr.setter
    def max_lr(self, value: float) -> None: ...

@disjoint_base
class NativeSchedule:
    def _load_program(
        self,
        kind: ArrayLike,
        ip: ArrayLike,
        fp: ArrayLike,
        ibuf: ArrayLike,
        fbuf: ArrayLike,
        root: int,
        keep: Iterable[object] = (),
    ) -> None: ...
    def _num_threads(self) -> int: ...
    def _vector(
        self, steps: NDArray[np.integer], out_arg: NDArray[np.float64] | None, nthreads: int
    ) -> NDArray[np.float64]: ...
    @overload
    def __call__(self, t: int | np.integer, out: None = None) -> float: ...
    @overload
    def __call__(
        self, t: NDArray[np.integer], out: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]: ...
