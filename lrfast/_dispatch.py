"""Which build of the optimizer kernels runs: chosen once, at import.

lrfast ships the kernels twice on x86-64: a portable build (``_optim`` and ``_schedules``, the
SSE2 baseline every x86-64 CPU has) and an AVX2 build (``_optim_avx2``, ``_schedules_avx2``). Both come from the same source without
fused multiply-adds, so they give bitwise the same results; the AVX2 one is about twice as fast
where the arithmetic, not memory, is the limit. The environment variable ``LRFAST_DISPATCH``
(``auto`` by default, or ``baseline``, or ``avx2``) overrides the choice.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from importlib.util import find_spec

from . import _optim, _schedules

# Is the AVX2 build in this installation (x86-64 builds only)? Looked up without importing it.
AVX2_SHIPPED = find_spec(__package__ + "._optim_avx2") is not None


def _wanted():
    wanted = os.environ.get("LRFAST_DISPATCH", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "baseline", "avx2"):
        raise ImportError(f"LRFAST_DISPATCH must be auto, baseline or avx2, got {wanted!r}")
    return wanted


BUILDS = {"baseline": _optim}
SCHEDULE_BUILDS = {"baseline": _schedules}
# The AVX2 build is imported only when the CPU (and OS) can run it, and not at all under
# LRFAST_DISPATCH=baseline: importing a module runs its initialisation code, which the compiler
# was free to write with AVX2 instructions, so on an older x86-64 CPU the import alone would
# die with SIGILL (shown under an emulated CPU by tests/test_portability.py).
if AVX2_SHIPPED and _wanted() != "baseline" and _optim.cpu_has_avx2():
    from . import _optim_avx2, _schedules_avx2

    BUILDS["avx2"] = _optim_avx2
    SCHEDULE_BUILDS["avx2"] = _schedules_avx2


def available():
    """Names of the kernel builds loaded here (the CPU can run them, and none was excluded)."""
    return list(BUILDS)


def _choose():
    wanted = _wanted()
    usable = available()
    if wanted == "auto":
        return usable[-1]
    if wanted not in usable:
        raise ImportError(f"LRFAST_DISPATCH={wanted} but this CPU or build cannot run it "
                          f"(available: {', '.join(usable)})")
    return wanted


# Each build's 8-bit state maps (lrfast.quantization builds their tables once).
for _build in BUILDS.values():
    from . import quantization as _quantization
    _quantization.install(_build)

name = _choose()
kernels = BUILDS[name]
# Schedules bind their evaluator class at import; ``using`` does not switch it.
schedule_kernels = SCHEDULE_BUILDS[name]


@contextmanager
def using(build):
    """Run a block with another kernel build (for tests and benchmarks)."""
    global name, kernels
    if build not in available():
        raise ValueError(f"kernel build {build!r} is not available here: {available()}")
    saved = name, kernels
    name, kernels = build, BUILDS[build]
    try:
        yield kernels
    finally:
        name, kernels = saved
