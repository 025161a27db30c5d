"""Imports of the optimizers' reference implementations outside torch.optim, for the parity tests
and the bench: lion-pytorch's ``Lion``, timm's ``Lamb``, ``Lars`` and ``Adopt``, schedulefree's
``AdamWScheduleFree`` and ``SGDScheduleFree``.

timm's package imports torchvision at import time, and the torchvision wheel that matches a CPU
build of torch is often not installable next to it (PyPI's is built against CUDA torch). Its
optimizer modules need only torch, so :func:`timm_optimizer` loads them by themselves: ``timm``
and ``timm.optim`` are entered in ``sys.modules`` as bare packages over timm's own folders (only
when timm itself is not imported yet), and the one module is imported from there.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

# The timm module of each optimizer class lrfast is compared with.
_TIMM_MODULES = {"Lamb": "lamb", "Lars": "lars", "Adopt": "adopt"}


def timm_optimizer(name: str) -> Any:
    """timm's optimizer class ``name`` (Lamb, Lars or Adopt); ImportError without timm."""
    module = _TIMM_MODULES[name]
    if "timm" not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed")
        root = list(spec.submodule_search_locations)[0]
        for pkg, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
            bare = types.ModuleType(pkg)
            bare.__path__ = [path]
            sys.modules[pkg] = bare
    return getattr(importlib.import_module(f"timm.optim.{module}"), name)


def lion() -> Any:
    """lion-pytorch's ``Lion``; ImportError without it."""
    from lion_pytorch import Lion  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return Lion


def schedule_free(name: str) -> Any:
    """schedulefree's ``AdamWScheduleFree`` or ``SGDScheduleFree``; ImportError without it."""
    import schedulefree  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return getattr(schedulefree, name)
