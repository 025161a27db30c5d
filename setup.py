"""Build script for lrfast's Cython kernels.

Environment switches (all optional):

LRFAST_FAIL_NO_OPENMP=1   fail the build if the compiler cannot build and run an OpenMP program
                          (by default the kernels are then built serial, with a warning)
LRFAST_DEBUG_CYTHON=1     compile with Cython's bounds, wraparound, initialisation and None checks on
LRFAST_NATIVE=1           add -march=native (a build for this machine only; never for wheels)
LRFAST_ANNOTATE=1         write Cython's HTML annotation next to each .pyx
LRFAST_DEBUG_INFO=1       keep DWARF debug information in a release build (debug builds keep it
                          anyway); by default release builds are compiled with -g0, which keeps
                          wheels small while the symbol table still names every function
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# Kernels: module name -> source file in src/.
MODULES = {
    "lrfast._openmp": "src/_openmp.pyx",
    "lrfast._optim": "src/_optim.pyx",
    "lrfast._schedules": "src/_schedules.pyx",
}
# The same kernels compiled for AVX2 on x86-64, picked at import when the CPU has it
# (lrfast/_dispatch.py); the portable builds above stay the baseline every x86-64 can run.
AVX2_MODULES = {
    "lrfast._optim_avx2": "src/_optim_avx2.pyx",
    "lrfast._schedules_avx2": "src/_schedules_avx2.pyx",
}


def is_x86_64():
    machine = platform.machine().lower()
    return machine in ("x86_64", "amd64", "x64")

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n > 0 && omp_get_max_threads() > 0);
        return 0;
    }
    """
)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP, or None when no working OpenMP exists.

    The probe compiles, links and runs a small OpenMP program with the compiler that will build
    the extensions, so a compiler that accepts -fopenmp but lacks the runtime is caught too.
    """
    ctype = compiler.compiler_type
    if ctype == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [
            (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
            (["-fopenmp"], ["-fopenmp"]),
        ]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]

    for cflags, lflags in candidates:
        tmp = tempfile.mkdtemp(prefix="lrfast-omp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as fh:
                fh.write(OPENMP_PROBE)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            exe = os.path.join(tmp, "probe")
            compiler.link_executable(objs, exe, extra_postargs=lflags)
            if ctype == "msvc":
                exe += ".exe"
            out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip() == "1":
                return cflags, lflags
        except Exception:  # noqa: BLE001 - any failure means "no usable OpenMP here"
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


def optimisation_flags(compiler):
    """Flags that let the compiler vectorise the element loops while staying exact and portable.

    -O3 turns on the loop vectoriser; -fno-math-errno lets sqrt vectorise (it only drops the
    errno side effect, results are unchanged); -fno-trapping-math lets compares become selects. No -ffast-math: it would reorder the arithmetic
    and break parity with torch.optim. No -march=native unless LRFAST_NATIVE=1, because a wheel
    must run on every x86-64 machine.
    """
    if compiler.compiler_type == "msvc":
        return ["/O2"]
    # -ffp-contract=off: no fused multiply-adds, so every build rounds exactly as the reference.
    # -fno-trapping-math: lrfast never enables floating-point traps, so comparisons may be
    # if-converted into SIMD selects; it changes no result.
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-semantic-interposition",
             "-ffp-contract=off"]
    if not (_flag("LRFAST_DEBUG_INFO") or _flag("LRFAST_DEBUG_CYTHON")):
        # After Python's own -g, so it wins: DWARF would make each module ~5x larger.
        flags.append("-g0")
    if _flag("LRFAST_NATIVE"):
        flags.append("-march=native")
    if _flag("LRFAST_VEC_REPORT"):
        flags.append("-fopt-info-vec-optimized")
    return flags


class BuildExt(build_ext):
    def build_extensions(self):
        omp = openmp_flags(self.compiler)
        if omp is None:
            msg = (
                "lrfast: the C compiler could not build and run an OpenMP program; "
                "the kernels will run on one thread."
            )
            if _flag("LRFAST_FAIL_NO_OPENMP"):
                raise RuntimeError(msg + " (LRFAST_FAIL_NO_OPENMP=1 makes this an error)")
            warnings.warn(msg)
            cflags, lflags = [], []
        else:
            cflags, lflags = omp
        opt = optimisation_flags(self.compiler)
        isa = ["/arch:AVX2"] if self.compiler.compiler_type == "msvc" else ["-mavx2"]
        for ext in self.extensions:
            flags = opt + cflags + (isa if ext.name in AVX2_MODULES else [])
            build_flags = " ".join(flags)
            ext.extra_compile_args = flags + list(ext.extra_compile_args)
            ext.extra_link_args = lflags + list(ext.extra_link_args)
            ext.define_macros = list(ext.define_macros) + [
                ("LRFAST_BUILD_FLAGS", '"%s"' % build_flags.replace('"', "")),
            ]
        super().build_extensions()


def extensions():
    debug = _flag("LRFAST_DEBUG_CYTHON")
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        # IEEE division stays IEEE in both builds: x/0 is inf or nan, as in torch and NumPy.
        "cdivision": True,
        "nonecheck": debug,
        "embedsignature": True,
        "cpow": True,
    }
    modules = dict(MODULES)
    if is_x86_64() and not _flag("LRFAST_NATIVE"):
        modules.update(AVX2_MODULES)
    exts = [
        Extension(
            name,
            [src],
            include_dirs=[np.get_include(), os.path.join(HERE, "src")],
            define_macros=[
                ("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                ("LRFAST_DEBUG", "1" if debug else "0"),
            ],
        )
        for name, src in modules.items()
    ]
    return cythonize(
        exts,
        compiler_directives=directives,
        include_path=[os.path.join(HERE, "src")],
        annotate=_flag("LRFAST_ANNOTATE"),
        # Generated C goes under build/, never into src/; debug and release C are kept apart so
        # switching LRFAST_DEBUG_CYTHON never reuses C generated with the other setting.
        build_dir=os.path.join("build", "cython-debug" if debug else "cython"),
        force=_flag("LRFAST_FORCE_CYTHON"),
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
