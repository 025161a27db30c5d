"""save_checkpoint / load_checkpoint with the embedding-table optimizers (lrfast.embedding):
a resumed run is bitwise the uninterrupted one, and a file of another kind, class, table shape
or dtype is refused with nothing changed."""
import numpy as np
import pytest

import lrfast
from cases import snapshot
from lrfast import CheckpointError
from lrfast import embedding as E
from lrfast.embedding import ROW_UPDATES
from test_embedding import zipf_lookups

# The embedding classes by the update they run, read from the module (one per update).
CLASSES = {cls._update.name: cls for cls in (getattr(E, n) for n in E.__all__)
           if isinstance(cls, type) and issubclass(cls, E._RowOptimizer)}

# A value other than the default for every hyper-parameter a class may take, so that a
# resume that lost one would show.
OTHER = {"lr_decay": 0.01, "eps": 1e-6, "weight_decay": 0.01, "maximize": True}
ROWS, DIM = 300, 5
SAVE_AT, END = 5, 10
NAN_STEPS = (1, 7)  # with skip_nonfinite: one skipped step before the save, one after


def test_every_update_has_one_class():
    assert sorted(CLASSES) == sorted(ROW_UPDATES)


def _kwargs(name):
    hypers = ROW_UPDATES[name].hypers
    kw = {k: v for k, v in OTHER.items() if k in hypers}
    if "beta1" in hypers:
        kw["betas"] = (0.8, 0.99)
    if "lr_decay" in hypers:
        kw["initial_accumulator_value"] = 0.25
    return kw


def _build(name, table, lr_kind, skip, full=True):
    """(optimizer, plateau or None). ``full``: with every non-default hyper-parameter; a resumed
    optimizer is built without them, so they must come back from the file."""
    plateau = None
    if lr_kind == "schedule":
        plateau = lrfast.ReduceLROnPlateau(patience=0, factor=0.5)
        lr = lrfast.schedules.cosine_decay(0.05, 40) * plateau
    else:
        lr = 0.05
    kwargs = _kwargs(name) if full else {}
    return CLASSES[name](table, lr=lr, skip_nonfinite=skip, **kwargs), plateau


def _batches(dtype, skip):
    rng = np.random.default_rng(21)
    batches = [zipf_lookups(rng, ROWS, 400, DIM, dtype) for _ in range(END)]
    if skip:
        for t in NAN_STEPS:
            batches[t][1][3, 1] = np.nan
    return batches


def _steps(opt, plateau, batches):
    for idx, g in batches:
        applied = opt.step(idx, g)
        if plateau is not None and applied:
            plateau.step(1.0)  # never improves: with patience 0 the plateau acts every step


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_nonfinite"])
@pytest.mark.parametrize("lr_kind", ["constant", "schedule"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(ROW_UPDATES))
def test_resume_is_bitwise_the_uninterrupted_run(tmp_path, name, dtype, lr_kind, skip):
    batches = _batches(dtype, skip)
    start = np.random.default_rng(3).standard_normal((ROWS, DIM)).astype(dtype)
    straight, s_plateau = _build(name, start.copy(), lr_kind, skip)
    _steps(straight, s_plateau, batches[:SAVE_AT])
    path = tmp_path / "emb.npz"
    lrfast.save_checkpoint(path, straight)

    resumed, r_plateau = _build(name, np.zeros((ROWS, DIM), dtype), lr_kind, skip, full=False)
    lrfast.load_checkpoint(path, resumed)
    assert resumed.step_count == straight.step_count
    assert resumed.skipped_steps == straight.skipped_steps
    _steps(straight, s_plateau, batches[SAVE_AT:])
    _steps(resumed, r_plateau, batches[SAVE_AT:])

    np.testing.assert_array_equal(resumed.table, straight.table)
    assert resumed.table.dtype == straight.table.dtype
    assert sorted(resumed.state) == sorted(straight.state) == sorted(
        n for n, _ in ROW_UPDATES[name].state)
    for buf, want in straight.state.items():
        assert resumed.state[buf].dtype == want.dtype, buf
        np.testing.assert_array_equal(resumed.state[buf], want, err_msg=buf)
    assert resumed.step_count == straight.step_count == END - (len(NAN_STEPS) if skip else 0)
    assert resumed.skipped_steps == straight.skipped_steps == (len(NAN_STEPS) if skip else 0)
    assert resumed.last_lr == straight.last_lr
    hyper = straight.state_dict()["hyperparams"]
    assert resumed.state_dict()["hyperparams"] == hyper
    if lr_kind == "schedule":
        assert r_plateau.state_dict() == s_plateau.state_dict()
        assert s_plateau.scale < 1  # the plateau acted, before and after the save


# --------------------------------------------------------------------------------------------
# Files that do not fit: refused, nothing changed
# --------------------------------------------------------------------------------------------

def _trained(cls, table, **kwargs):
    """``cls`` over ``table`` after one step, so that 'unchanged' means something."""
    opt = cls(table, **kwargs)
    if isinstance(opt, E._RowOptimizer):
        idx, g = zipf_lookups(np.random.default_rng(5), table.shape[0], 50, table.shape[1],
                              table.dtype)
        opt.step(idx, g)
    else:
        opt.step({k: np.ones_like(v) for k, v in opt.params.items()})
    return opt


def _state(opt):
    """Bytes of the table (or params) and of every state buffer, counters, hyper-parameters."""
    if not isinstance(opt, E._RowOptimizer):
        return snapshot(opt), opt.skipped_steps, opt.hyperparams
    return (opt.table.tobytes(), {k: v.tobytes() for k, v in opt.state.items()},
            opt.step_count, opt.skipped_steps, opt.last_lr, opt.state_dict()["hyperparams"])


def _sparse_adam_file(tmp_path, rows=ROWS, dtype=np.float32, lr=0.01):
    opt = _trained(lrfast.SparseAdam, np.ones((rows, DIM), dtype), lr=lr)
    path = tmp_path / "sparse_adam.npz"
    lrfast.save_checkpoint(path, opt)
    return path


def _adam_file(tmp_path):
    # a dense parameter under the key and with the shape and dtype of an embedding table
    opt = _trained(lrfast.Adam, {"table": np.ones((ROWS, DIM), np.float32)}, lr=0.01)
    path = tmp_path / "adam.npz"
    lrfast.save_checkpoint(path, opt)
    return path


def _table(rows=ROWS, dtype=np.float32):
    return np.random.default_rng(8).standard_normal((rows, DIM)).astype(dtype)


REFUSED = [
    ("dense file into SparseAdam", _adam_file,
     lambda: _trained(lrfast.SparseAdam, _table(), lr=0.01), "saved by Adam, not SparseAdam"),
    ("SparseAdam file into RowWiseAdam", _sparse_adam_file,
     lambda: _trained(lrfast.RowWiseAdam, _table(), lr=0.01),
     "saved by SparseAdam, not RowWiseAdam"),
    ("SparseAdam file into Adam", _sparse_adam_file,
     lambda: _trained(lrfast.Adam, {"table": _table()}, lr=0.01), "saved by SparseAdam, not Adam"),
    ("table rows", _sparse_adam_file,
     lambda: _trained(lrfast.SparseAdam, _table(rows=ROWS + 1), lr=0.01),
     rf"parameter 'table' was saved as float32 \({ROWS}, {DIM}\), this optimizer's is "
     rf"float32 \({ROWS + 1}, {DIM}\)"),
    ("table dtype", _sparse_adam_file,
     lambda: _trained(lrfast.SparseAdam, _table(dtype=np.float64), lr=0.01),
     "parameter 'table' was saved as float32"),
]


@pytest.mark.parametrize("make_file, make_opt, pattern", [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_file_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, make_file, make_opt,
                                                               pattern):
    path = make_file(tmp_path)
    opt = make_opt()
    before = _state(opt)
    with pytest.raises(CheckpointError, match=pattern):
        lrfast.load_checkpoint(path, opt)
    assert _state(opt) == before


def test_saved_schedule_is_required(tmp_path):
    """A file saved with a schedule does not load into an optimizer with a constant lr."""
    opt = _trained(lrfast.SparseAdagrad, _table(), lr=lrfast.schedules.cosine_decay(0.01, 9))
    lrfast.save_checkpoint(tmp_path / "s.npz", opt)
    other = _trained(lrfast.SparseAdagrad, _table(), lr=0.01)
    before = _state(other)
    with pytest.raises(CheckpointError, match="was saved with the schedule"):
        lrfast.load_checkpoint(tmp_path / "s.npz", other)
    assert _state(other) == before
