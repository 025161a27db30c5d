"""The ``Examples`` sections of lrfast's public docstrings, run as doctests.

The examples are collected from the lrfast that is imported (the installed package in CI and
in the wheel round trip), never from the source folder: every public module under
``lrfast.__path__`` is imported by name and searched with ``doctest.DocTestFinder``, and each
docstring that holds examples becomes one test, named after the object (``lrfast.flat.FlatParams``).
A module added later is found with no change here.

Private modules (a name part starting with ``_``) are not searched, but objects that a public
module exports in its ``__all__`` while defining them in a private one (``lrfast.threads`` comes
from ``lrfast._threads``) are, under the public name. A module whose import needs an optional
dependency that is missing is reported as skipped.
"""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import io
import pkgutil
from dataclasses import dataclass
from typing import Any

import pytest

import lrfast

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules that need an optional dependency (an extra) even to be searched or run.
NEEDS = {"lrfast.torch": "torch", "lrfast.demo_torch": "torch"}
# A public module whose import fails because one of these is not installed is skipped; any
# other import error fails that module's test.
OPTIONAL = {"torch", "matplotlib", "jax", "optax", "threadpoolctl", "expecttest"}


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def public_module_names() -> list[str]:
    """``lrfast`` and every public module and subpackage under it, sorted, package first."""
    names = []
    # walk_packages imports subpackages to look inside them; one that fails to import is still
    # listed, and its import error is reported by its own test below, so it is ignored here.
    for info in pkgutil.walk_packages(lrfast.__path__, prefix="lrfast.",
                                      onerror=lambda name: None):
        if info.name != "lrfast.__main__" and _is_public(info.name):
            names.append(info.name)
    return ["lrfast"] + sorted(names)


@dataclass
class Case:
    module: str
    test: doctest.DocTest | None = None
    globs: dict[str, Any] | None = None
    error: str | None = None  # the module could not be imported: fail with this


def _exported_from_private(module, seen) -> list[tuple[str, Any]]:
    """(public name, object) for what ``module.__all__`` exports but a private module defines."""
    out = []
    for attr in getattr(module, "__all__", ()):
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        home = getattr(obj, "__module__", None) or ""
        if home.split(".")[0] != "lrfast" or _is_public(home) or id(obj) in seen:
            continue
        seen.add(id(obj))
        out.append((f"{module.__name__}.{attr}", obj))
    return out


def collect() -> list[Any]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    params = []
    seen: set[int] = set()
    for name in public_module_names():
        need = NEEDS.get(name)
        if need is not None and importlib.util.find_spec(need) is None:
            params.append(pytest.param(Case(name), id=name,
                                       marks=pytest.mark.skip(reason=f"{name} needs {need}")))
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a broken module fails its own test, not the whole file
            missing = getattr(exc, "name", None)
            if isinstance(exc, ModuleNotFoundError) and missing in OPTIONAL:
                marks = [pytest.mark.skip(reason=f"{name} needs {missing}")]
                params.append(pytest.param(Case(name), id=name, marks=marks))
            else:
                params.append(pytest.param(Case(name, error=repr(exc)), id=name))
            continue
        found = [(t, vars(module)) for t in finder.find(module, name)]
        for public, obj in _exported_from_private(module, seen):
            home = inspect.getmodule(obj)
            found += [(t, vars(home)) for t in finder.find(obj, public, module=home)]
        for test, globs in sorted(found, key=lambda tg: tg[0].name):
            if test.examples:
                params.append(pytest.param(Case(name, test, globs), id=test.name))
    return params


CASES = collect()


@pytest.mark.parametrize("case", CASES)
def test_docstring_examples(case: Case) -> None:
    if case.error is not None:
        pytest.fail(f"cannot import {case.module}: {case.error}", pytrace=False)
    assert case.test is not None and case.globs is not None
    test = case.test
    # A fresh copy of the module's namespace for each docstring, as doctest itself does.
    test.globs = dict(case.globs)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = io.StringIO()
    try:
        result = runner.run(test, out=report.write, clear_globs=True)
    finally:
        test.globs = {}
    if result.failed:
        pytest.fail(f"{result.failed} of {result.attempted} examples failed in {test.name}:\n"
                    f"{report.getvalue()}", pytrace=False)


# Docstrings known to hold examples: if discovery breaks and finds nothing, this fails.
DOCUMENTED = [
    "lrfast.flat.FlatParams",
    "lrfast.clipping.clip_grad_norm_",
    "lrfast.clipping.grad_norm",
    "lrfast.checkpoint.save_checkpoint",
    "lrfast.checkpoint.load_checkpoint",
    "lrfast.checkpoint.CheckpointError",
    "lrfast.set_num_threads",
    "lrfast.get_num_threads",
    "lrfast.threads",
]


def test_examples_were_found() -> None:
    """Discovery that finds nothing must not pass: the documented objects are all collected."""
    ids = {p.id for p in CASES}
    missing = [name for name in DOCUMENTED if name not in ids]
    assert not missing, f"no examples collected for {missing}; collected: {sorted(ids)}"
    for module in ("lrfast.flat", "lrfast.clipping", "lrfast.checkpoint"):
        assert module in public_module_names()
