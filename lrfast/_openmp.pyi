# Type stub for lrfast._openmp (compiled from src/_openmp.pyx): OpenMP thread queries and build facts.
from typing import TypedDict, type_check_only

@type_check_only
class _BuildInfo(TypedDict):
    compiler: str
    flags: str
    simd: list[str]
    openmp: bool
    debug_checks: bool

def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def build_info() -> _BuildInfo: ...
