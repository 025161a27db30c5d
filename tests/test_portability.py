"""The portable x86-64 build runs on any x86-64 CPU.

A wheel carries the kernels twice on x86-64: a baseline build, which must use nothing beyond the
x86-64 baseline (SSE2), and an AVX2 build picked at run time. Two checks, on whatever lrfast is
imported (a wheel installed in a fresh environment, in CI's wheel round trip):

* static: every instruction of the baseline modules and of the libraries bundled with a wheel
  (``lrfast.libs``, the OpenMP runtime) is disassembled with objdump and must be baseline. The
  AVX2 modules must show AVX2 instructions to the same scanner, so it is seen to find them.
* emulated: lrfast imports, dispatches and steps under qemu-x86_64 with CPU models that lack
  AVX2 (Nehalem; with AVX (Sandy Bridge), but no AVX2), matching the NumPy reference; the same
  emulator kills a process that loads the AVX2 build directly, so it does enforce the CPU model.

Both skip where their tool (objdump, qemu-x86_64) or an x86-64 Linux machine is missing.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

import lrfast

X86_64_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
PKG_DIR = os.path.dirname(os.path.abspath(lrfast.__file__))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Mnemonics of instruction-set extensions beyond x86-64's baseline (SSE2), as objdump prints
# them (AT&T syntax); any mnemonic starting with "v" (VEX/EVEX: AVX and later) is caught
# separately, as is any use of ymm, zmm or mask registers.
EXTENDED = set("""
addsubpd addsubps haddpd haddps hsubpd hsubps lddqu movddup movshdup movsldup fisttp fisttps
fisttpl fisttpll monitor mwait
pabsb pabsw pabsd palignr phaddw phaddd phaddsw phsubw phsubd phsubsw pmaddubsw pmulhrsw pshufb
psignb psignw psignd
blendpd blendps blendvpd blendvps dppd dpps extractps insertps movntdqa mpsadbw packusdw
pblendvb pblendw pcmpeqq pextrb pextrd pextrq phminposuw pinsrb pinsrd pinsrq pmaxsb pmaxsd
pmaxud pmaxuw pminsb pminsd pminud pminuw pmuldq pmulld ptest roundpd roundps roundsd roundss
pcmpestri pcmpestrm pcmpistri pcmpistrm pcmpgtq popcnt lzcnt tzcnt
andn bextr blsi blsmsk blsr bzhi mulx pdep pext rorx sarx shlx shrx adcx adox movbe
rdrand rdseed xgetbv xsave xsaveopt xsavec xrstor cmpxchg16b prefetchw
aesenc aesenclast aesdec aesdeclast aesimc aeskeygenassist pclmulqdq sha1rnds4 sha256rnds2
""".split())  # noqa: SIM905 (a word list reads better than 100 quoted names)
EXTENDED_PREFIXES = ("pmovsx", "pmovzx", "crc32")
# x86 instruction prefixes objdump prints before the mnemonic.
PREFIXES = {"rep", "repz", "repe", "repnz", "repne", "lock", "data16", "addr32", "cs", "ds",
            "ss", "es", "fs", "gs", "notrack", "bnd"}
# Functions that execute xgetbv only after cpuid has reported OSXSAVE: the compiler runtime's
# CPU-feature probe (libgcc's, behind __builtin_cpu_supports), which picks the kernel build.
CPU_PROBES = re.compile(r"^(get_available_features|__cpu_indicator_init|__get_cpuid)")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
INSN = re.compile(r"^\s*[0-9a-f]+:\t(.*)$")


def extended_instructions(path):
    """[(function, instruction)] for every instruction in ``path`` beyond the x86-64 baseline,
    leaving out xgetbv inside the CPU-feature probes."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-w", path],
                         capture_output=True, text=True, check=True).stdout
    found, function = [], "?"
    for line in out.splitlines():
        m = FUNCTION.match(line)
        if m:
            function = m.group(1)
            continue
        m = INSN.match(line)
        if not m:
            continue
        text = m.group(1).split("#")[0].strip()
        words = text.split()
        while words and words[0] in PREFIXES:
            words = words[1:]
        if not words or words[0].startswith("("):
            continue
        mnemonic = words[0]
        ext = (mnemonic in EXTENDED or mnemonic.startswith(EXTENDED_PREFIXES)
               or (mnemonic.startswith("v") and mnemonic not in ("verr", "verw"))
               or re.search(r"%(ymm|zmm)\d|%k[0-7]\b", text) is not None)
        if ext and not (mnemonic == "xgetbv" and CPU_PROBES.match(function)):
            found.append((function, text))
    return found


def compiled(pattern):
    return sorted(glob.glob(os.path.join(PKG_DIR, pattern)))


def baseline_modules():
    return [p for p in compiled("*.so") if "_avx2" not in os.path.basename(p)]


def bundled_libraries():
    """Shared libraries auditwheel grafted into a repaired wheel (``lrfast.libs``)."""
    return sorted(glob.glob(os.path.join(os.path.dirname(PKG_DIR), "lrfast.libs", "*.so*")))


def assert_baseline(paths):
    for path in paths:
        bad = extended_instructions(path)
        assert not bad, f"{os.path.basename(path)}: {len(bad)} non-baseline instructions, " \
                        f"e.g. {bad[:5]}"


needs_objdump = pytest.mark.skipif(
    not (X86_64_LINUX and shutil.which("objdump")), reason="needs objdump on x86-64 Linux")


@needs_objdump
def test_baseline_modules_use_only_baseline_instructions():
    modules = baseline_modules()
    assert {os.path.basename(p).split(".")[0] for p in modules} >= {"_openmp", "_optim",
                                                                     "_schedules"}
    assert_baseline(modules)


@needs_objdump
def test_bundled_libraries_use_only_baseline_instructions():
    libs = bundled_libraries()
    if not libs:
        pytest.skip("not installed from a repaired wheel (no lrfast.libs)")
    assert any("gomp" in os.path.basename(p) for p in libs), libs
    assert_baseline(libs)


@needs_objdump
def test_scanner_finds_avx2_in_the_dispatched_build():
    """The control: the AVX2 modules are full of AVX2, and the scanner must say so."""
    modules = compiled("*_avx2*.so")
    if not modules:
        pytest.skip("no AVX2 build in this installation")
    for path in modules:
        bad = extended_instructions(path)
        assert any("%ymm" in text for _, text in bad), os.path.basename(path)


# --- under an emulated CPU -----------------------------------------------------------------

SMOKE = r"""
import sys
import numpy as np
import lrfast
from lrfast import _dispatch, reference
from cases import CONFIGS, OPTIMIZERS, ReferenceRun, assert_state_close, make_grads, make_params

print("dispatch", _dispatch.name, ",".join(_dispatch.available()), flush=True)
shapes = [(3,), (37,), (5, 7), (1030,)]
rng = np.random.default_rng(1)
for name, hyper, _ in CONFIGS:
    for dtype in (np.float32, np.float64):
        params = make_params(shapes, dtype)
        ref = ReferenceRun(name, hyper, params)
        opt = OPTIMIZERS[name](params, **hyper)
        for _ in range(3):
            grads = make_grads(shapes, dtype, rng)
            opt.step(grads)
            ref.step(grads)
        assert_state_close(opt, ref.params, ref.state, dtype)
grads = make_grads(shapes, np.float32, rng)
want = [g.copy() for g in grads]
assert abs(lrfast.clip_grad_norm_(grads, 1.0) - reference.clip_grad_norm_(want, 1.0)) < 1e-9
for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-6)
sched = lrfast.schedules.warmup_cosine(0.0, 1.0, 100, 1000, end_value=0.01)
t = np.arange(1200)
np.testing.assert_allclose(sched(t), reference.schedule_values(sched.to_dict(), t), rtol=1e-12)
print("smoke ok", flush=True)
"""

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(not (X86_64_LINUX and QEMU),
                                reason="needs qemu-x86_64 (Debian: qemu-user) on x86-64 Linux")


def run_emulated(cpu, code, **env):
    """Run ``code`` with this interpreter under qemu-x86_64 emulating CPU model ``cpu``."""
    pkg_parent = os.path.dirname(PKG_DIR)
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join([pkg_parent, TESTS_DIR])
    full_env["OMP_NUM_THREADS"] = "2"
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", code], env=full_env, check=False,
                              cwd=cwd, capture_output=True, text=True, timeout=600)


@needs_qemu
@pytest.mark.parametrize("cpu", ["Nehalem", "SandyBridge"])
def test_runs_on_a_cpu_without_avx2(cpu):
    """Nehalem (SSE4.2, no AVX) and Sandy Bridge (AVX, no AVX2): lrfast picks the baseline
    build and every optimizer, clipping and a schedule match the NumPy reference."""
    out = run_emulated(cpu, SMOKE)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    assert "dispatch baseline baseline\n" in out.stdout and "smoke ok" in out.stdout


@needs_qemu
def test_emulator_enforces_the_cpu_model():
    """The control: under Nehalem, loading the AVX2 build by hand dies with SIGILL, so the runs
    above would have caught AVX2 code reached outside the dispatch."""
    if not compiled("_optim_avx2*.so"):
        pytest.skip("no AVX2 build in this installation")
    code = ("import importlib, lrfast; print('imported', flush=True); "
            "importlib.import_module('lrfast._optim_avx2'); print('loaded avx2', flush=True)")
    out = run_emulated("Nehalem", code)
    assert out.stdout == "imported\n", (out.stdout, out.stderr[-2000:])
    assert out.returncode in (-signal.SIGILL, 128 + signal.SIGILL), out.returncode


@needs_qemu
def test_emulated_avx2_cpu_dispatches_to_avx2():
    if not compiled("_optim_avx2*.so"):
        pytest.skip("no AVX2 build in this installation")
    out = run_emulated("Haswell", SMOKE)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    assert "dispatch avx2 baseline,avx2\n" in out.stdout and "smoke ok" in out.stdout
