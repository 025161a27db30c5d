"""The installed package: its metadata, and what ``import lrfast`` says when it is broken."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

import pytest

import lrfast

PKG_DIR = os.path.dirname(os.path.abspath(lrfast.__file__))


# An editable install (``pip install -e .``) puts a finder on sys.meta_path that maps lrfast's
# submodules to the checkout, so a copied package would import the checkout's compiled modules;
# the child drops that finder to see only the copy.
_IMPORT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
           "if not str(getattr(f, '__module__', '')).startswith('__editable__')]; "
           "import lrfast")


def _import_from(parent):
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", _IMPORT], cwd=cwd, check=False,
                              env=dict(os.environ, PYTHONPATH=parent), capture_output=True,
                              text=True, timeout=120)


def _copy_package(dest, extensions):
    os.makedirs(os.path.join(dest, "lrfast"))
    for name in os.listdir(PKG_DIR):
        if name.endswith(".py") or (extensions and name.endswith((".so", ".pyd"))):
            shutil.copy(os.path.join(PKG_DIR, name), os.path.join(dest, "lrfast", name))


def test_unbuilt_source_checkout_says_how_to_build(tmp_path):
    """A checkout without compiled kernels: the error names the checkout and the build command."""
    _copy_package(tmp_path, extensions=False)
    (tmp_path / "setup.py").write_text("# stand-in\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "_optim.pyx").write_text("# stand-in\n")
    out = _import_from(str(tmp_path))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert any(line.startswith("ImportError: lrfast's compiled kernels could not be loaded")
               for line in last), out.stderr
    assert "source checkout" in out.stderr and "pip install -e ." in out.stderr
    assert "build_ext --inplace" in out.stderr and str(tmp_path) in out.stderr


def test_broken_installation_says_to_reinstall(tmp_path):
    """An installed package whose extension is damaged (here: not a shared library at all)."""
    _copy_package(tmp_path, extensions=True)
    damaged = [name for name in os.listdir(tmp_path / "lrfast")
               if name.startswith("_optim.") and name.endswith((".so", ".pyd"))]
    assert len(damaged) == 1
    (tmp_path / "lrfast" / damaged[0]).write_bytes(b"not a shared library")
    out = _import_from(str(tmp_path))
    assert out.returncode != 0
    assert "could not be loaded" in out.stderr and damaged[0] in out.stderr
    assert "pip install --force-reinstall lrfast" in out.stderr
    assert "source checkout" not in out.stderr


def _distribution():
    try:
        dist = metadata.distribution("lrfast")
    except metadata.PackageNotFoundError:
        pytest.skip("lrfast is not installed (an in-place build)")
    if os.path.realpath(str(dist.locate_file("lrfast"))) != os.path.realpath(PKG_DIR):
        pytest.skip("the lrfast imported is not the installed distribution")
    if dist.read_text("RECORD") is None:  # a source tree's lrfast.egg-info, left by a build
        pytest.skip("lrfast's metadata here is a build's egg-info, not an installation")
    return dist


def test_installed_metadata():
    dist = _distribution()
    meta = dist.metadata
    assert dist.version == lrfast.__version__  # one source: lrfast/_version.py
    assert meta["Name"] == "lrfast"
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["Summary"] and meta["Description-Content-Type"] == "text/markdown"
    # The README is the long description (a header, or the body on Python < 3.10's reader).
    readme = meta["Description"] or meta.get_payload()
    assert readme.startswith("# lrfast")
    runtime = [r for r in dist.requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in runtime] == ["numpy"]
    assert {"test", "bench", "plot", "torch"} <= set(meta.get_all("Provides-Extra"))


def test_installed_files_include_stubs_and_no_sources():
    dist = _distribution()
    names = {str(f) for f in dist.files}
    assert "lrfast/py.typed" in names
    for module in ("_openmp", "_optim", "_schedules"):
        assert f"lrfast/{module}.pyi" in names
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".pxi", ".c"))]


def test_avx2_builds_have_the_portable_api():
    """The AVX2 modules' stubs re-export the portable ones (stubtest does not follow
    re-exports), so the claim is checked here: the same names, with the same signatures."""
    import inspect

    from lrfast import _dispatch

    if "avx2" not in _dispatch.available():
        pytest.skip("no AVX2 build loaded here")
    pairs = [(_dispatch.BUILDS["baseline"], _dispatch.BUILDS["avx2"]),
             (_dispatch.SCHEDULE_BUILDS["baseline"], _dispatch.SCHEDULE_BUILDS["avx2"])]
    for base, avx2 in pairs:
        public = {n for n in dir(base) if not n.startswith("__")} - {"cpu_has_avx2"}
        assert public == {n for n in dir(avx2) if not n.startswith("__")}, avx2.__name__
        for name in public:
            a, b = getattr(base, name), getattr(avx2, name)
            if callable(a) and not isinstance(a, type):
                assert str(inspect.signature(a)) == str(inspect.signature(b)), name
