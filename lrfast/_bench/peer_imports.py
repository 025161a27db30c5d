"""Imports of the optimizers' reference implementations outside torch.optim, for the parity tests
and the bench: lion-pytorch's ``Lion``, timm's ``Lamb``, ``Lars`` and ``Adopt``, schedulefree's
``AdamWScheduleFree`` and ``SGDScheduleFree``; and timm's ``ModelEmaV3`` (weight averages).

timm's package imports torchvision at import time, and the torchvision wheel that matches a CPU
build of torch is often not installable next to it (PyPI's is built against CUDA torch). Its
optimizer and EMA modules need only torch, so :func:`timm_optimizer` and :func:`timm_model_ema`
load them by themselves: ``timm`` and its subpackage (``timm.optim``, ``timm.utils``) are entered
in ``sys.modules`` as bare packages over timm's own folders (only when timm itself is not
imported yet), and the one module is imported from there.
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


# Marks the bare packages this module enters in sys.modules.
_BARE = "_lrfast_bare_package"


def _timm_module(subpackage: str, module: str) -> Any:
    """``timm.<subpackage>.<module>``, imported without running timm's (or the subpackage's)
    ``__init__`` unless timm is already imported for real; ImportError without timm."""
    top = sys.modules.get("timm")
    if top is None or getattr(top, _BARE, False):
        if top is None:
            spec = importlib.util.find_spec("timm")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("timm is not installed")
            root = list(spec.submodule_search_locations)[0]
        else:
            root = top.__path__[0]
        for pkg, path in (("timm", root), (f"timm.{subpackage}", os.path.join(root, subpackage))):
            if pkg not in sys.modules:
                bare = types.ModuleType(pkg)
                bare.__path__ = [path]
                setattr(bare, _BARE, True)
                sys.modules[pkg] = bare
    return importlib.import_module(f"timm.{subpackage}.{module}")


def timm_optimizer(name: str) -> Any:
    """timm's optimizer class ``name`` (Lamb, Lars or Adopt); ImportError without timm."""
    return getattr(_timm_module("optim", _TIMM_MODULES[name]), name)


def timm_model_ema() -> Any:
    """timm's ``ModelEmaV3`` (``timm.utils.model_ema``); ImportError without timm."""
    return _timm_module("utils", "model_ema").ModelEmaV3


def lion() -> Any:
    """lion-pytorch's ``Lion``; ImportError without it."""
    from lion_pytorch import Lion  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return Lion


def schedule_free(name: str) -> Any:
    """schedulefree's ``AdamWScheduleFree`` or ``SGDScheduleFree``; ImportError without it."""
    import schedulefree  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return getattr(schedulefree, name)
