"""Check pyproject.toml's [tool.cibuildwheel] without building anything (runs on Linux CI).

1. The section validates against the JSON schema shipped with the installed cibuildwheel.
2. cibuildwheel itself resolves the build matrix for every platform and architecture the
   wheels workflow builds (``--print-build-identifiers``), and the matrix is the one intended:
   CPython 3.9-3.13 for manylinux and musllinux x86_64/aarch64, macOS x86_64/arm64 and Windows
   AMD64, nothing else.

Usage: python tools/check_cibuildwheel.py    (needs cibuildwheel and jsonschema installed)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import cibuildwheel
import jsonschema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONS = ["cp39", "cp310", "cp311", "cp312", "cp313"]
PLATFORMS = {
    "linux": ("x86_64,aarch64", [f"{lib}_{arch}" for lib in ("manylinux", "musllinux")
                                 for arch in ("x86_64", "aarch64")]),
    "macos": ("x86_64,arm64", ["macosx_x86_64", "macosx_arm64"]),
    "windows": ("AMD64", ["win_amd64"]),
}


def main() -> int:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        config = tomllib.load(fh)["tool"]["cibuildwheel"]
    schema_path = os.path.join(os.path.dirname(cibuildwheel.__file__), "resources",
                               "cibuildwheel.schema.json")
    with open(schema_path) as fh:
        jsonschema.validate(config, json.load(fh))
    print(f"[tool.cibuildwheel] is valid for cibuildwheel {cibuildwheel.__version__}")

    failed = False
    for platform, (archs, tags) in PLATFORMS.items():
        out = subprocess.run(
            [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers",
             "--platform", platform, "--archs", archs],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        want = {f"{py}-{tag}" for py in PYTHONS for tag in tags}
        got = set(out)
        print(f"{platform}: {len(got)} wheels: {' '.join(sorted(got))}")
        if got != want:
            failed = True
            print(f"  missing: {sorted(want - got)}; unexpected: {sorted(got - want)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
