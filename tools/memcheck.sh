#!/usr/bin/env bash
# Memory checks for lrfast's compiled kernels: AddressSanitizer (default) or valgrind memcheck.
#
# Usage, from anywhere in a source checkout:
#
#   tools/memcheck.sh                      # ASan build + the default ASan pytest subset
#   tools/memcheck.sh asan [PYTEST ARGS]   # the same; PYTEST ARGS replace the default subset
#   tools/memcheck.sh valgrind [PYTEST ARGS]   # plain -g build under valgrind, smaller subset
#
# Exit status 0 only when the build succeeded, pytest passed and no memory error was reported
# (any AddressSanitizer report, in pytest itself or in a subprocess a test starts, fails the
# run; under valgrind any memcheck error or definitely-lost leak block fails it).
#
# Environment (all optional):
#   MEMCHECK_DIR          where the instrumented copy is built (default: build/memcheck under the
#                         repository root; build/ is git-ignored). Each mode gets its own subfolder.
#   LRFAST_DEBUG_CYTHON=1 also turn Cython's bounds/wraparound/None checks on (setup.py switch);
#                         the default checks the release code that ships.
#   PYTHON                interpreter to build and test with (default: python3, else python).
#   MEMCHECK_NO_TORCH=1   make `import torch` fail in the checked processes, so that tests
#                         written with pytest.importorskip("torch") skip (default in valgrind
#                         mode; MEMCHECK_NO_TORCH=0 there lets torch in).
#   CC                    C compiler (default: the one Python was built with; gcc is assumed for
#                         the ASan runtime lookup, `$CC -print-file-name=libasan.so`).
#
# How the build is done, and why it is done this way:
#   * The sources (setup.py, pyproject.toml, lrfast/, src/, tests/, tracked or not, without any
#     built *.so) are copied to $MEMCHECK_DIR/<mode>/ and built there with
#     `setup.py build_ext --inplace --force`, so a developer's normal in-place build in lrfast/
#     is never replaced by an instrumented one.
#   * The compiler is given as CC="gcc -fsanitize=address -fno-omit-frame-pointer". Putting the
#     sanitizer only in CFLAGS/LDFLAGS is not enough: setuptools links setup.py's OpenMP probe
#     program with the bare $CC, the ASan-instrumented probe then fails to link, and setup.py
#     silently builds serial kernels (no -fopenmp) - the threaded code would go unchecked.
#     LRFAST_FAIL_NO_OPENMP=1 is set so that can never happen silently, and LRFAST_DEBUG_INFO=1
#     keeps -g (release builds otherwise use -g0), so reports name files and lines.
#   * Current setuptools lets $CFLAGS *replace* Python's own CFLAGS (-DNDEBUG -fwrapv -O3 ...),
#     so CFLAGS here is Python's sysconfig CFLAGS plus "-g -fno-omit-frame-pointer". setup.py's
#     own flags (-O3 -fno-math-errno ... -ffp-contract=off, -fopenmp, -mavx2 for the AVX2
#     modules) are per-extension arguments and still apply, after these (so -O3 stays in force).
#   * The result is checked before any test runs: every extension must link libasan (asan
#     mode), the copy must be the lrfast imported, lrfast._openmp.build_info() must report
#     OpenMP and the requested debug_checks, and a canary (a deliberate out-of-bounds read
#     through lrfast._optim._debug_index) must be reported by ASan / valgrind.
#
# How the tests are run:
#   asan:     LD_PRELOAD=$(gcc -print-file-name=libasan.so) (the python binary itself is not
#             instrumented, so the runtime must come first), PYTHONMALLOC=malloc (so ASan sees
#             every object allocation), ASAN_OPTIONS=detect_leaks=0 (CPython does not free
#             everything at exit, by design) with reports written to log files, so reports from
#             subprocesses started by tests (tests/cases.py run_python) are caught as well.
#             tests/test_parity_torch.py is left out; the torch comparisons in
#             tests/test_clipping.py do run (torch 2.x CPU imports and runs under the preloaded
#             runtime; if yours does not, set MEMCHECK_NO_TORCH=1 and those tests skip).
#   valgrind: valgrind --error-exitcode=1 --errors-for-leak-kinds=definite --leak-check=full
#             with PYTHONMALLOC=malloc, on a plain (uninstrumented, -g) build. Only the pytest
#             process is traced (subprocesses started by tests run natively). valgrind is
#             ~20-50x slower, so the default subset is smaller; see VALGRIND_TESTS below.
#
# Typical times on 2 cores: asan ~4.5 min (40 s build + ~1370 tests), valgrind ~7 min
# (30 s build + ~520 tests).
set -euo pipefail

mode=asan
if [[ $# -gt 0 && ( $1 == asan || $1 == valgrind ) ]]; then
    mode=$1
    shift
fi
if [[ $# -gt 0 && ( $1 == -h || $1 == --help ) ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

ASAN_TESTS=(
    tests/test_parity_reference.py
    tests/test_bad_inputs.py
    tests/test_threads_state.py
    tests/test_flat_and_memory.py
    tests/test_schedules.py
    tests/test_clipping.py
    tests/test_nonfinite.py
)
# valgrind runs this code ~50x slower than natively: a subset that stays under 10 minutes on
# a 2-core machine (input checks, schedules, functional kernels on one tensor, mixed dtypes,
# hand-computed steps, two Python threads, the flat buffer, a 2M-element threaded step, and
# one configuration per optimizer stepped on 1, 2 and 3 OpenMP threads, clipping against the
# NumPy reference, the non-finite skip). torch is hidden in this mode. No flush_subnormals
# tests: valgrind does not emulate the SSE flush-to-zero/denormals-are-zero modes, so they
# fail under it for that reason alone (the ASan run covers them).
VALGRIND_TESTS=(
    tests/test_bad_inputs.py
    tests/test_schedules.py
    tests/test_parity_reference.py
    --deselect tests/test_parity_reference.py::test_class_matches_reference
    tests/test_threads_state.py::test_two_threads_two_optimizers_match_sequential
    tests/test_threads_state.py::test_one_optimizer_from_two_threads_never_corrupts
    tests/test_flat_and_memory.py::test_flat_views_names_and_state_exchange
    tests/test_flat_and_memory.py::test_flat_optimizer_refuses_foreign_grads
    tests/test_flat_and_memory.py::test_optimizer_memory_is_its_state_buffers
    "tests/test_threads_state.py::test_bitwise_identical_for_1_2_3_threads[AdamW-lr=0.01-weight_decay=0.1-amsgrad=True-maximize=True-float32]"
    "tests/test_threads_state.py::test_bitwise_identical_for_1_2_3_threads[RMSprop-lr=0.01-alpha=0.9-centered=True-float64]"
    "tests/test_threads_state.py::test_bitwise_identical_for_1_2_3_threads[SGD-lr=0.05-momentum=0.8-nesterov=True-weight_decay=0.01-maximize=True-float32]"
    "tests/test_threads_state.py::test_bitwise_identical_for_1_2_3_threads[Adagrad-lr=0.1-lr_decay=0.01-weight_decay=0.01-initial_accumulator_value=0.1-eps=1e-06-float64]"
    tests/test_clipping.py::test_clip_matches_reference
    tests/test_clipping.py::test_nonfinite_raises_and_changes_nothing
    "tests/test_nonfinite.py::test_nonfinite_grad_skips_the_whole_step[Adam-lr=0.01-float32-nan]"
    "tests/test_nonfinite.py::test_nonfinite_grad_skips_the_whole_step[SGD-lr=0.05-momentum=0.9-float64-inf]"
    tests/test_nonfinite.py::test_skip_is_atomic_across_dtype_banks
)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
[[ -f setup.py && -d lrfast && -d src ]] || { echo "memcheck: $root is not an lrfast checkout" >&2; exit 2; }

if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(command -v python3 || command -v python)
fi
# The real interpreter, not a wrapper script (pyenv shims are bash scripts: LD_PRELOAD and
# valgrind must apply to python itself).
PY=$("$PYTHON" -c 'import sys; print(sys.executable)')

work=${MEMCHECK_DIR:-$root/build/memcheck}/$mode
mkdir -p "$work"
work=$(cd "$work" && pwd)
logs=$work/logs
echo "memcheck: mode=$mode, copy in $work"

# -- copy the sources (tracked and untracked, never built artefacts) -------------------------
rm -rf "$work/lrfast" "$work/src" "$work/tests" "$logs"
mkdir -p "$logs"
tar -cf - --exclude='*.so' --exclude='*.pyd' --exclude='__pycache__' --exclude='*.pyc' \
    --exclude='.pytest_cache' --exclude='.hypothesis' --exclude='src/*.c' \
    setup.py pyproject.toml $(ls README* 2>/dev/null) lrfast src tests \
    | tar -xf - -C "$work"

# -- build ---------------------------------------------------------------------------------
cc=${CC:-$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("CC"))')}
py_cflags=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("CFLAGS") or "")')
if [[ $mode == asan ]]; then
    build_cc="$cc -fsanitize=address -fno-omit-frame-pointer"
    build_ldflags="-fsanitize=address"
else
    build_cc="$cc"
    build_ldflags=""
fi
build_log=$logs/build.log
echo "memcheck: building (CC='$build_cc', LRFAST_DEBUG_CYTHON=${LRFAST_DEBUG_CYTHON:-0}); log: $build_log"
t0=$SECONDS
if ! (cd "$work" && env CC="$build_cc" CFLAGS="$py_cflags -g -fno-omit-frame-pointer" \
        LDFLAGS="$build_ldflags" LRFAST_FAIL_NO_OPENMP=1 LRFAST_DEBUG_INFO=1 LRFAST_FORCE_CYTHON=1 \
        ASAN_OPTIONS=detect_leaks=0 \
        "$PY" setup.py build_ext --inplace --force >"$build_log" 2>&1); then
    tail -n 40 "$build_log" >&2
    echo "memcheck: FAILED to build (see $build_log)" >&2
    exit 2
fi
echo "memcheck: built in $((SECONDS - t0)) s"

sos=("$work"/lrfast/*.so)
[[ -e ${sos[0]} ]] || { echo "memcheck: no extension was built" >&2; exit 2; }

export PYTHONMALLOC=malloc
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
# Under valgrind torch would take minutes to import and bring its own noise: hidden by default.
[[ $mode == valgrind ]] && : "${MEMCHECK_NO_TORCH:=1}"
if [[ ${MEMCHECK_NO_TORCH:-0} != 0 ]]; then
    mkdir -p "$work/no-torch/torch"
    echo 'raise ImportError("torch is hidden by tools/memcheck.sh (MEMCHECK_NO_TORCH=1)")' \
        >"$work/no-torch/torch/__init__.py"
    export PYTHONPATH="$work/no-torch:$PYTHONPATH"
fi
unset LD_PRELOAD ASAN_OPTIONS || true

if [[ $mode == asan ]]; then
    for so in "${sos[@]}"; do
        if ! readelf -d "$so" | grep -q 'libasan'; then
            echo "memcheck: $so is not linked with libasan" >&2
            exit 2
        fi
    done
    libasan=$("$cc" -print-file-name=libasan.so)
    [[ -f $libasan ]] || { echo "memcheck: libasan.so not found ($cc -print-file-name)" >&2; exit 2; }
    export LD_PRELOAD=$libasan
    # log_path: one file per process (pid suffix), subprocesses of the tests included.
    export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:detect_stack_use_after_return=1:log_path=$logs/asan"
    tests=("${ASAN_TESTS[@]}")
else
    tests=("${VALGRIND_TESTS[@]}")
fi
[[ $# -gt 0 ]] && tests=("$@")

# The instrumented copy must be the lrfast imported, with OpenMP on (the threaded kernels are
# what most needs checking) and with the Cython checks as requested.
(cd "$work" && "$PY" - <<'EOF'
import os, sys
import lrfast
info = lrfast._openmp.build_info()
where = os.path.dirname(os.path.abspath(lrfast.__file__))
print(f"memcheck: lrfast from {where}; build_info: {info}; kernels: {lrfast._dispatch.kernels.__name__}")
if not os.path.samefile(where, os.path.join(os.getcwd(), "lrfast")):
    sys.exit("memcheck: the instrumented copy is not the lrfast being imported")
if not info["openmp"]:
    sys.exit("memcheck: the kernels were built without OpenMP")
debug = os.environ.get("LRFAST_DEBUG_CYTHON", "").strip().lower() in ("1", "true", "yes", "on")
if info["debug_checks"] != debug:
    sys.exit(f"memcheck: debug_checks={info['debug_checks']}, expected {debug}")
EOF
)

# Canary: an out-of-bounds read through lrfast._optim._debug_index must be reported by ASan
# (proves the instrumentation and the preloaded runtime are live); a debug build raises
# IndexError instead.
if [[ $mode == asan ]] && (cd "$work" && "$PY" -c 'import lrfast; lrfast._optim._debug_index' 2>/dev/null); then
    canary_out=$(cd "$work" && ASAN_OPTIONS="detect_leaks=0:log_path=$logs/canary" "$PY" -c '
import numpy as np, lrfast
try:
    lrfast._optim._debug_index(np.zeros(3, np.intp), 3)
except IndexError:
    print("IndexError")
' 2>&1 || true)
    if [[ $canary_out == *IndexError* ]]; then
        echo "memcheck: canary: out-of-bounds index raised IndexError (bounds-checked build)"
    elif grep -qs 'heap-buffer-overflow' "$logs"/canary.*; then
        echo "memcheck: canary: ASan reported the deliberate heap-buffer-overflow, as it must"
    else
        echo "memcheck: canary: ASan did NOT report a deliberate out-of-bounds read" >&2
        exit 2
    fi
fi

status=0
t0=$SECONDS
if [[ $mode == asan ]]; then
    echo "memcheck: pytest ${tests[*]}"
    (cd "$work" && "$PY" -m pytest -x -q -p no:cacheprovider "${tests[@]}") || status=$?
    reports=$(grep -l 'ERROR: AddressSanitizer\|ERROR: LeakSanitizer\|runtime error:' \
              "$logs"/asan.* 2>/dev/null || true)
    echo "memcheck: pytest finished in $((SECONDS - t0)) s with status $status"
    if [[ -n $reports ]]; then
        for f in $reports; do
            echo "==== $f" >&2
            cat "$f" >&2
        done
        echo "memcheck: FAILED: AddressSanitizer reported $(wc -w <<<"$reports") error(s)" >&2
        exit 1
    fi
    if [[ $status -ne 0 ]]; then
        echo "memcheck: FAILED: pytest exited with $status (ASan logs, if any: $logs)" >&2
        exit 1
    fi
    echo "memcheck: ASan summary: 0 AddressSanitizer reports (build and pytest clean)"
else
    command -v valgrind >/dev/null || { echo "memcheck: valgrind is not installed" >&2; exit 2; }
    supp=$logs/python.supp
    # Noise from the interpreter and NumPy, never from lrfast (each seen with CPython 3.11):
    #  * uninitialised-value reports whose failing instruction is inside the interpreter itself:
    #    CPython < 3.12 reads the unset digit of a zero int (_PyLong_New(0)) as 0 * digit in
    #    maybe_small_long, and valgrind then follows that "undefined" small-int pointer through
    #    INCREF/DECREF/GC. Only the uninitialised kinds are silenced, and only when the top
    #    frame is in the interpreter: invalid reads/writes anywhere, and every report whose top
    #    frame is in lrfast, NumPy or libgomp, still count.
    #  * glibc's vectorised wmemcmp/strncmp reading whole words past the end (by design; from
    #    CPython's unicode_compare and the dynamic loader).
    #  * "definitely lost" blocks that are allocated once and kept for the life of the process:
    #    NumPy's (init_promoter at import), CPython's (marshal'ed constants, os.stat times,
    #    tracemalloc's own traceback records), GNU readline's (imported by a pytest plugin),
    #    and those of library constructors run by the dynamic loader (libgomp's environment
    #    parsing, ...) and of dlopen's own bookkeeping.
    # Tuned on CPython 3.11 / NumPy 2.4 / glibc 2.36; another stack may need one more entry
    # (valgrind --gen-suppressions=all prints them).
    {
        for kind in Value1 Value2 Value4 Value8 Value16 Value32 Cond; do
            for obj in '*/libpython3*' '*/bin/python3*' '*/lib-dynload/*'; do
                printf '{\n   cpython-uninit-%s\n   Memcheck:%s\n   obj:%s\n}\n' "$kind" "$kind" "$obj"
            done
        done
        cat <<'EOF'
{
   glibc-wmemcmp-overread
   Memcheck:Addr32
   fun:__wmemcmp_*
   fun:unicode_compare
}
{
   glibc-wmemcmp-overread-16
   Memcheck:Addr16
   fun:__wmemcmp_*
   fun:unicode_compare
}
{
   ld-so-is-dst-strncmp
   Memcheck:Addr8
   fun:strncmp
   fun:is_dst
}
{
   numpy-import-promoters
   Memcheck:Leak
   match-leak-kinds: definite
   fun:malloc
   ...
   fun:PyTuple_Pack
   obj:*_multiarray_umath*
}
{
   cpython-marshal-constants
   Memcheck:Leak
   match-leak-kinds: definite
   fun:malloc
   ...
   fun:r_object
}
{
   cpython-stat-times
   Memcheck:Leak
   match-leak-kinds: definite
   fun:malloc
   fun:PyFloat_FromDouble
   fun:fill_time
}
{
   cpython-tracemalloc-tracebacks
   Memcheck:Leak
   match-leak-kinds: definite
   fun:malloc
   fun:raw_malloc
   fun:traceback_new
}
{
   readline-init
   Memcheck:Leak
   match-leak-kinds: definite
   ...
   fun:setup_readline
}
{
   shared-library-constructors
   Memcheck:Leak
   match-leak-kinds: definite
   ...
   fun:_dl_init
}
{
   dynamic-loader-dlopen
   Memcheck:Leak
   match-leak-kinds: definite
   ...
   fun:_dl_open
}
EOF
    } >"$supp"
    vopts=(--tool=memcheck --error-exitcode=1 --leak-check=full --show-leak-kinds=definite
           --errors-for-leak-kinds=definite --num-callers=40 --track-origins=yes
           --keep-debuginfo=yes --suppressions="$supp")
    # Canary: a deliberate out-of-bounds read in lrfast must get through the suppressions.
    if (cd "$work" && "$PY" -c 'import lrfast; lrfast._optim._debug_index' 2>/dev/null); then
        (cd "$work" && valgrind "${vopts[@]}" --log-file="$logs/canary.log" "$PY" -c '
import numpy as np, lrfast
try:
    lrfast._optim._debug_index(np.zeros(3, np.intp), 3)
except IndexError:
    pass
') >/dev/null 2>&1 || true
        if grep -q 'Invalid read' "$logs/canary.log" && grep -q '_debug_index' "$logs/canary.log"; then
            echo "memcheck: canary: valgrind reported the deliberate out-of-bounds read, as it must"
        elif grep -q 'ERROR SUMMARY: 0 errors' "$logs/canary.log" && [[ ${LRFAST_DEBUG_CYTHON:-0} != 0 ]]; then
            echo "memcheck: canary: bounds-checked build, nothing to report"
        else
            echo "memcheck: canary: valgrind did NOT report a deliberate out-of-bounds read ($logs/canary.log)" >&2
            exit 2
        fi
    fi
    vlog=$logs/valgrind.log
    echo "memcheck: valgrind pytest ${tests[*]} (log: $vlog)"
    (cd "$work" && OMP_WAIT_POLICY=passive valgrind "${vopts[@]}" --log-file="$vlog" \
        "$PY" -m pytest -x -q -p no:cacheprovider "${tests[@]}") || status=$?
    echo "memcheck: valgrind finished in $((SECONDS - t0)) s with status $status"
    grep -E 'ERROR SUMMARY|definitely lost|indirectly lost' "$vlog" | tail -n 3 || true
    if [[ $status -ne 0 ]]; then
        if grep -q 'ERROR SUMMARY: 0 errors' "$vlog"; then
            echo "memcheck: FAILED: pytest exited with $status under valgrind, no memcheck error (log: $vlog)" >&2
            exit 1
        fi
        # The unsuppressed reports, each with its first frames.
        { awk '/^==[0-9]+== (Invalid|Conditional|Use of|Syscall|Mismatched|Source and|Argument|.*definitely lost)/{p=1; n=0}
               p{print; if (++n > 25 || $0 ~ /^==[0-9]+== $/) p=0}' "$vlog" | head -n 400 >&2; } || true
        echo "memcheck: FAILED: valgrind reported memory errors (exit status $status; full log: $vlog)" >&2
        exit 1
    fi
    echo "memcheck: valgrind summary: $(grep 'ERROR SUMMARY' "$vlog" | tail -n 1 | sed 's/^==[0-9]*== //')"
fi
