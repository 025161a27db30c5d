"""Every layer agrees with the update specs (lrfast._specs): the NumPy classes' signatures,
lrfast.functional's and lrfast.reference's, the compiled kernels' argument order, and, where
torch has the class, torch.optim's signature and lrfast.torch's."""
import inspect

import pytest

import lrfast
from lrfast import _dispatch, functional, reference
from lrfast._specs import OPTIMIZERS, REQUIRED, TORCH_FLAGS, UPDATES

OPTIONS = (("skip_nonfinite", False), ("flush_subnormals", False), ("state_dtype", None),
           ("half_out", None), ("rounding", "nearest"), ("seed", 0), ("bfloat16_bits", False),
           ("ema", None))
# lrfast.functional's element-type options (lrfast.reference runs other element types through
# reference.mixed_, so its functions do not take them).
FUNCTIONAL_OPTIONS = {"half_out": None, "rounding": "nearest", "seed": 0, "bfloat16_bits": False}


def _split(sig):
    """(positional names in order, {keyword-only name: default}, {name: default})."""
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    defaults = {p.name: p.default for p in params}
    return positional, keyword, defaults


def _same(a, b):
    """Equal defaults, and of the same kind (a bool is not an int here)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_numpy_class_signature_is_the_spec(name):
    spec = OPTIMIZERS[name]
    cls = getattr(lrfast, name)
    assert cls._spec is spec
    got = _split(inspect.signature(cls))
    want = _split(spec.signature(leading=("params",), trailing=OPTIONS))
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    for arg, default in want[2].items():
        assert _same(got[2][arg], default), (arg, got[2][arg], default)


@pytest.mark.parametrize("name", sorted(UPDATES))
def test_functional_and_reference_signatures_are_the_spec(name):
    update = UPDATES[name]
    fn = getattr(functional, name + "_")
    ref = getattr(reference, name + "_")
    f_pos, f_kw, f_all = _split(inspect.signature(fn))
    r_pos, r_kw, r_all = _split(inspect.signature(ref))
    for arg, default in FUNCTIONAL_OPTIONS.items():
        assert _same(f_kw.pop(arg), default) and f_all.pop(arg) == default, arg
    assert f_pos == r_pos
    assert f_kw.keys() == r_kw.keys()
    for arg in f_all:
        assert _same(f_all[arg], r_all[arg]), (arg, f_all[arg], r_all[arg])
    # and both say what the spec says: param, grad, the buffers, step, the hyper-parameters
    # (then the scalar state, 0-d arrays: required)
    buffers = {b.argname: b for b in update.buffers + update.scalar_state}
    assert f_pos == (["param", "grad"] + [b.argname for b in update.buffers if not b.keyword]
                     + [b.argname for b in update.scalar_state])
    expected_kw = {h.name: (REQUIRED if h.name == "lr" else h.default)
                   for h in update.hypers if h.functional}
    expected_kw.update({b.argname: None for b in update.buffers if b.keyword})
    if update.takes_step:
        expected_kw["step"] = REQUIRED
    if update.advance is None:  # per-step values the caller derives (schedule-free's ckp1)
        expected_kw.update({name: REQUIRED for name in update.scalars})
    assert f_kw == expected_kw
    for arg in f_pos[2:]:
        assert f_all[arg] is (REQUIRED if buffers[arg].used is None or buffers[arg].scalar
                              else None)


@pytest.mark.parametrize("name", sorted(UPDATES))
def test_kernel_takes_the_spec_hyper_parameters(name):
    """The compiled kernel's argument order (UPDATE_ARGS, next to its C struct) names exactly
    the spec's hyper-parameters that reach it: all but lr (a per-step value) and those that only
    set initial state."""
    update = UPDATES[name]
    kernel_args = _dispatch.kernels.UPDATE_ARGS[name]
    assert set(kernel_args) == {h.name for h in update.hypers if h.functional} - {"lr"}
    assert len(kernel_args) == len(set(kernel_args))


def test_every_kernel_update_has_a_spec_and_every_spec_a_kernel():
    for build in _dispatch.BUILDS.values():
        assert set(build.UPDATE_ARGS) == set(UPDATES)
        assert set(build.UPDATE_IDS) == set(UPDATES)


def test_each_optimizer_has_its_classes():
    torch_mod = pytest.importorskip("lrfast.torch")
    # every spec's class, plus CPUAdam (DeepSpeed's signature over the Adam spec), SparseAdam
    # (torch's, over the row-wise kernel) and the weight averages' functions for AveragedModel
    assert set(torch_mod.__all__) == set(OPTIMIZERS) | {"CPUAdam", "SparseAdam",
                                                         "ema_multi_avg_fn", "swa_multi_avg_fn"}
    assert torch_mod.CPUAdam._spec is OPTIMIZERS["Adam"]
    for name in OPTIMIZERS:
        assert getattr(lrfast, name)._spec is OPTIMIZERS[name]
        assert getattr(torch_mod, name)._spec is OPTIMIZERS[name]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_torch_signature_agrees_with_the_spec(name):
    torch = pytest.importorskip("torch")
    import lrfast.torch as LT

    spec = OPTIMIZERS[name]
    ours = inspect.signature(getattr(LT, name))
    t = spec.torch
    if t is None or t.cls is None:
        pytest.skip(f"torch has no {name}")
    theirs = inspect.signature(getattr(torch.optim, t.cls))
    # torch's signature, then lrfast's keyword-only options (half precision, ema=)
    extra = list(LT._LRFAST_KEYWORDS)
    assert extra == ["state_dtype", "rounding", "seed", "ema"]
    k = len(extra)
    assert list(ours.parameters)[-k:] == extra
    assert all(ours.parameters[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)
    assert ours.replace(parameters=list(ours.parameters.values())[:-k]) == theirs
    pos, kw, defaults = _split(theirs)
    hypers = [n for n in pos + list(kw) if n not in TORCH_FLAGS and n not in t.renamed
              and n != "params"]
    # torch's hyper-parameters are the class's, less lrfast's own options ...
    assert set(hypers) == set(spec.arguments) - set(t.lrfast_only)
    # ... with the same defaults (torch writes 0 where lrfast writes 0.0) ...
    for arg in hypers:
        assert defaults[arg] == spec.default(arg), (arg, defaults[arg], spec.default(arg))
    # ... and the class's positional ones in the same places.
    torch_positional = [n for n in pos if n in spec.arguments]
    assert torch_positional[:len(spec.positional)] == list(spec.positional)
    for flag in set(defaults) & set(TORCH_FLAGS):
        assert defaults[flag] == TORCH_FLAGS[flag]
    for torch_name, update_name in t.renamed.items():
        assert defaults[torch_name] == spec.update.hyper(update_name).default


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_class_defaults_come_from_the_spec(name):
    """An optimizer made with no hyper-parameters reports the spec's defaults."""
    import numpy as np

    spec = OPTIMIZERS[name]
    opt = getattr(lrfast, name)([np.zeros(3, np.float32)])
    assert opt.hyperparams == spec.class_defaults


@pytest.mark.parametrize("name", sorted(UPDATES))
def test_kernel_takes_the_spec_scalars(name):
    """The per-step scalars the Python layer hands the kernel (StepValues.scalars) are the
    spec's, in the kernel's order."""
    for build in _dispatch.BUILDS.values():
        assert build.UPDATE_SCALARS[name] == UPDATES[name].scalars
