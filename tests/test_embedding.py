"""Row-wise sparse updates of embedding tables (lrfast.embedding).

One table of updates (lrfast.embedding.ROW_UPDATES) drives the parity tests: the native
functions against the NumPy reference (bitwise), against torch's sparse Adagrad, SGD and
SparseAdam on the same lookups, across thread counts; one table of bad inputs, each checked to
change nothing.
"""
import numpy as np
import pytest

import lrfast
from lrfast import embedding as E
from lrfast import functional as F
from lrfast import reference as R
from lrfast.embedding import ROW_UPDATES

DTYPES = [np.float32, np.float64]
HYPERS = {  # per update: two settings beyond the defaults
    "sparse_sgd": [dict(lr=0.1), dict(lr=0.05, weight_decay=0.1, maximize=True)],
    "sparse_adagrad": [dict(lr=0.1), dict(lr=0.2, lr_decay=0.01, eps=1e-6, weight_decay=0.02,
                                          maximize=True)],
    "rowwise_adagrad": [dict(lr=0.1), dict(lr=0.2, lr_decay=0.01, eps=1e-6, weight_decay=0.02,
                                           maximize=True)],
    "sparse_adam": [dict(lr=0.01), dict(lr=0.03, beta1=0.5, beta2=0.9, eps=1e-6,
                                        weight_decay=0.01, maximize=True)],
    "rowwise_adam": [dict(lr=0.01), dict(lr=0.03, beta1=0.5, beta2=0.9, eps=1e-6,
                                         weight_decay=0.01, maximize=True)],
}
CONFIGS = [(name, i) for name in ROW_UPDATES for i in range(len(HYPERS[name]))]


def zipf_lookups(rng, rows, n, dim, dtype):
    """Heavily duplicated lookups, as click logs have."""
    idx = (rng.zipf(1.2, n) - 1) % rows
    return idx, rng.standard_normal((n, dim)).astype(dtype)


def make_state(update, table, rng):
    return [np.abs(rng.standard_normal(table.shape[:1] if per_row else table.shape))
            .astype(table.dtype) for _, per_row in update.state]


def run(impl, name, table, state, batches, hyper):
    update = ROW_UPDATES[name]
    fn = getattr(impl, name + "_")
    for step, (idx, g) in enumerate(batches, start=1):
        kw = dict(hyper)
        if update.uses_step:
            kw["step"] = step
        fn(table, idx, g, *state, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,which", CONFIGS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_parity_with_reference(name, which, dtype, nthreads):
    rng = np.random.default_rng(7)
    rows, dim = 300, 13
    table = rng.standard_normal((rows, dim)).astype(dtype)
    state = make_state(ROW_UPDATES[name], table, rng)
    batches = [zipf_lookups(rng, rows, n, dim, dtype) for n in (500, 1, 0, 9000)]
    t_ref, s_ref = table.copy(), [s.copy() for s in state]
    run(R, name, t_ref, s_ref, batches, HYPERS[name][which])
    with lrfast.threads(nthreads):
        # force the parallel paths on this small batch too
        lrfast._dispatch.kernels.set_min_elements_per_thread(16)
        try:
            run(F, name, table, state, batches, HYPERS[name][which])
        finally:
            lrfast._dispatch.kernels.set_min_elements_per_thread(None)
    np.testing.assert_array_equal(table, t_ref)
    for s, r in zip(state, s_ref):
        np.testing.assert_array_equal(s, r)


@pytest.mark.parametrize("name", list(ROW_UPDATES))
def test_untouched_rows_are_not_written(name):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((50, 4)).astype(np.float32)
    state = make_state(ROW_UPDATES[name], table, rng)
    before = table.copy(), [s.copy() for s in state]
    idx = np.array([3, 40, 3, 7])
    run(F, name, table, state, [(idx, rng.standard_normal((4, 4)).astype(np.float32))],
        HYPERS[name][1])
    untouched = np.setdiff1d(np.arange(50), idx)
    np.testing.assert_array_equal(table[untouched], before[0][untouched])
    for s, b in zip(state, before[1]):
        np.testing.assert_array_equal(s[untouched], b[untouched])
    assert not np.array_equal(table[3], before[0][3])


def test_merge_rows_matches_reference_and_thread_counts():
    rng = np.random.default_rng(3)
    idx, g = zipf_lookups(rng, 10_000, 50_000, 8, np.float32)
    rows_ref, merged_ref = R.merge_rows(idx, g, 10_000)
    for n in (1, 2):
        with lrfast.threads(n):
            rows, merged = lrfast.merge_rows(idx.astype(np.int32), g, 10_000)
        np.testing.assert_array_equal(rows, rows_ref)
        np.testing.assert_array_equal(merged, merged_ref)
    # a hand check: row 5 twice, row 2 once
    rows, merged = lrfast.merge_rows(np.array([5, 2, 5]), np.array([[1.0], [2.0], [4.0]]), 6,
                                     maximize=True)
    assert rows.tolist() == [2, 5] and merged.tolist() == [[-2.0], [-5.0]]


def test_sort_covers_wide_tables():
    """More than one radix pass (a table of 2**30 rows needs three): still grouped right."""
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 2**30, 5000)
    idx[::7] = idx[0]
    g = rng.standard_normal((5000, 2))
    rows, merged = lrfast.merge_rows(idx, g, 2**30)
    rows_ref, merged_ref = R.merge_rows(idx, g, 2**30)
    np.testing.assert_array_equal(rows, rows_ref)
    np.testing.assert_array_equal(merged, merged_ref)


# --- against torch ---------------------------------------------------------------------------

TORCH = {  # update -> (torch optimizer, its kwargs from our hypers)
    "sparse_sgd": ("SGD", lambda h: dict(lr=h["lr"], maximize=h.get("maximize", False))),
    "sparse_adagrad": ("Adagrad", lambda h: dict(lr=h["lr"], lr_decay=h.get("lr_decay", 0.0),
                                                 eps=h.get("eps", 1e-10),
                                                 maximize=h.get("maximize", False))),
    "sparse_adam": ("SparseAdam", lambda h: dict(lr=h["lr"], betas=(h.get("beta1", 0.9),
                                                                    h.get("beta2", 0.999)),
                                                 eps=h.get("eps", 1e-8),
                                                 maximize=h.get("maximize", False))),
}
TORCH_STATE = {"sparse_adagrad": ["sum"], "sparse_adam": ["exp_avg", "exp_avg_sq"]}


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("name", list(TORCH))
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_parity_with_torch(name, dtype, tol):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    rows, dim = 400, 16
    hyper = {k: v for k, v in HYPERS[name][1].items() if k != "weight_decay"}  # torch refuses it
    table = rng.standard_normal((rows, dim)).astype(dtype)
    weight = torch.nn.Parameter(torch.from_numpy(table.copy()))
    cls_name, kwargs = TORCH[name]
    opt = getattr(torch.optim, cls_name)([weight], **kwargs(hyper))
    state = [np.zeros_like(table) for _ in ROW_UPDATES[name].state]
    for step in range(1, 6):
        if dtype == np.float64:
            idx, g = zipf_lookups(rng, rows, 3000, dim, dtype)
        else:
            # torch's coalesce sums duplicates in another order than lookup order: in float32
            # a row looked up a thousand times (Zipf) differs by ~1e-5 from that alone, so
            # float32 takes uniform lookups (still about 7 per row).
            idx = rng.integers(0, rows, 3000)
            g = rng.standard_normal((3000, dim)).astype(dtype)
        weight.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g),
                                              (rows, dim))  # uncoalesced, duplicates in it
        opt.step()
        kw = dict(hyper)
        if ROW_UPDATES[name].uses_step:
            kw["step"] = step
        getattr(F, name + "_")(table, idx, g, *state, **kw)
        np.testing.assert_allclose(table, weight.detach().numpy(), rtol=tol, atol=tol)
        for s, key in zip(state, TORCH_STATE.get(name, [])):
            np.testing.assert_allclose(s, opt.state[weight][key].numpy(), rtol=tol, atol=tol)


# --- classes -------------------------------------------------------------------------------

CLASSES = [
    (lrfast.SparseSGD, dict(lr=0.1), "sparse_sgd"),
    (lrfast.SparseAdagrad, dict(lr=0.1, lr_decay=0.01), "sparse_adagrad"),
    (lrfast.RowWiseAdagrad, dict(lr=0.1, initial_accumulator_value=0.5), "rowwise_adagrad"),
    (lrfast.SparseAdam, dict(lr=0.01, betas=(0.8, 0.99)), "sparse_adam"),
    (lrfast.RowWiseAdam, dict(lr=0.01, weight_decay=0.1), "rowwise_adam"),
]


def _functional_kwargs(kwargs):
    kw = {k: v for k, v in kwargs.items() if k not in ("betas", "initial_accumulator_value")}
    if "betas" in kwargs:
        kw["beta1"], kw["beta2"] = kwargs["betas"]
    return kw


@pytest.mark.parametrize("cls,kwargs,name", CLASSES)
def test_class_matches_reference_and_resumes(cls, kwargs, name):
    rng = np.random.default_rng(5)
    table = rng.standard_normal((200, 6)).astype(np.float32)
    ref_table = table.copy()
    update = ROW_UPDATES[name]
    init = kwargs.get("initial_accumulator_value", 0.0)
    ref_state = [np.full(ref_table.shape[:1] if per_row else ref_table.shape,
                         init if n == "state_sum" else 0.0, np.float32)
                 for n, per_row in update.state]
    batches = [zipf_lookups(rng, 200, 300, 6, np.float32) for _ in range(6)]
    opt = cls(table, **kwargs)
    for idx, g in batches[:3]:
        assert opt.step(idx, g)
    saved = opt.state_dict()
    copy_table = table.copy()
    for idx, g in batches[3:]:
        opt.step(idx, g)
    run(R, name, ref_table, ref_state, batches, _functional_kwargs(kwargs))
    np.testing.assert_array_equal(table, ref_table)
    for s, r in zip(opt.state.values(), ref_state):
        np.testing.assert_array_equal(s, r)
    assert opt.step_count == 6 and opt.last_lr == kwargs["lr"]
    # resume from the checkpoint on a copy of the table: the same last three steps
    again = cls(copy_table, **kwargs)
    again.load_state_dict(saved)
    assert again.step_count == 3
    for idx, g in batches[3:]:
        again.step(idx, g)
    np.testing.assert_array_equal(copy_table, table)


def test_state_bytes_of_rowwise_variants():
    table = np.zeros((1000, 64), np.float32)
    assert lrfast.SparseAdam(table).state_bytes() == 2 * 4 * 1000 * 64
    assert lrfast.RowWiseAdam(table).state_bytes() == 4 * 1000 * 64 + 4 * 1000
    assert lrfast.RowWiseAdagrad(table).state_bytes() == 4 * 1000
    assert lrfast.SparseSGD(table).state_bytes() == 0


def test_skip_nonfinite_changes_nothing():
    table = np.ones((10, 3), np.float32)
    opt = lrfast.SparseAdam(table, lr=0.1, skip_nonfinite=True)
    g = np.ones((2, 3), np.float32)
    g[1, 2] = np.nan
    assert opt.step(np.array([1, 2]), g) is False
    assert opt.skipped_steps == 1 and opt.step_count == 0
    np.testing.assert_array_equal(table, 1.0)
    assert not opt.state["exp_avg"].any()
    assert opt.step(np.array([1, 2]), np.ones((2, 3), np.float32)) is True
    assert table[1, 0] < 1.0 and table[0, 0] == 1.0


def test_schedule_learning_rate():
    table = np.zeros((4, 1))
    opt = lrfast.SparseSGD(table, lr=lambda step: 1.0 / (step + 1))
    for _ in range(3):
        opt.step(np.array([0]), np.ones((1, 1)))
    assert table[0, 0] == pytest.approx(-(1 + 1 / 2 + 1 / 3))
    assert opt.last_lr == pytest.approx(1 / 3)


def test_empty_batch_counts_as_a_step():
    table = np.ones((4, 2))
    opt = lrfast.SparseAdam(table)
    assert opt.step(np.array([], dtype=np.int64), np.empty((0, 2)))
    assert opt.step_count == 1
    np.testing.assert_array_equal(table, 1.0)


# --- bad inputs: one table, each must raise and change nothing ----------------------------

def _bad_cases():
    t32 = lambda: np.zeros((10, 3), np.float32)  # noqa: E731
    g = lambda n=2, d=3, dt=np.float32: np.ones((n, d), dt)  # noqa: E731
    return [
        ("index too large", dict(indices=np.array([1, 10])), IndexError, "index 10 is out of range"),
        ("negative index", dict(indices=np.array([-1, 2])), IndexError, "index -1 is out of range"),
        ("float indices", dict(indices=np.array([1.0, 2.0])), TypeError, "indices must be integers"),
        ("2-D indices", dict(indices=np.array([[1, 2]])), ValueError, "indices must be 1-D"),
        ("grads dtype", dict(grads=g(dt=np.float64)), TypeError, "table's dtype"),
        ("grads shape", dict(grads=g(d=4)), ValueError, "grads must have shape"),
        ("grads count", dict(grads=g(n=3)), ValueError, "grads must have shape"),
        ("lr", dict(lr=-1.0), ValueError, "Invalid learning rate"),
        ("eps", dict(eps=-1.0), ValueError, "Invalid epsilon value"),
        ("beta", dict(beta1=1.0), ValueError, "Invalid beta parameter at index 0"),
        ("weight decay", dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
        ("step", dict(step=0), ValueError, "step must be an int >= 1"),
        ("state shape", dict(exp_avg=np.zeros((10, 2), np.float32)), ValueError,
         "exp_avg must have shape"),
        ("state dtype", dict(exp_avg_sq=np.zeros((10, 3))), TypeError, "exp_avg_sq must have"),
        ("table read-only", dict(table="readonly"), ValueError, "read-only"),
        ("table 1-D", dict(table=np.zeros(10, np.float32)), ValueError, "2-D"),
        ("table int", dict(table=np.zeros((10, 3), np.int32)), TypeError, "float32 or float64"),
        ("state aliases table", dict(exp_avg="table"), ValueError, "shares memory"),
        ("unknown option", dict(momentum=0.9), TypeError, "unexpected keyword"),
    ], t32, g


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])),
                         ids=[c[0] for c in _bad_cases()[0]])
def test_bad_inputs_change_nothing(case):
    cases, t32, g = _bad_cases()
    _, change, exc, message = cases[case]
    args = dict(table=t32(), indices=np.array([1, 2]), grads=g(), exp_avg=np.zeros((10, 3), np.float32),
                exp_avg_sq=np.zeros((10, 3), np.float32), step=1, lr=0.1)
    args.update(change)
    if isinstance(args["table"], str):
        args["table"] = t32()
        args["table"].flags.writeable = False
    if isinstance(args["exp_avg"], str):
        args["exp_avg"] = args["table"]
    before = [a.copy() for a in (args["table"], args["exp_avg"], args["exp_avg_sq"])]
    table, idx, grads = args.pop("table"), args.pop("indices"), args.pop("grads")
    m, v = args.pop("exp_avg"), args.pop("exp_avg_sq")
    with pytest.raises(exc, match=message):
        F.sparse_adam_(table, idx, grads, m, v, **args)
    for a, b in zip((table, m, v), before):
        np.testing.assert_array_equal(a, b)


def test_class_bad_inputs():
    table = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        lrfast.SparseAdam(table, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="Invalid initial_accumulator_value"):
        lrfast.SparseAdagrad(table, initial_accumulator_value=-1)
    opt = lrfast.SparseAdagrad(table)
    with pytest.raises(IndexError):
        opt.step(np.array([5]), np.ones((1, 2), np.float32))
    assert opt.step_count == 0 and not opt.state["state_sum"].any()
    sd = opt.state_dict()
    sd["state"]["state_sum"] = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="must be an array of shape"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="saved by 'SparseAdagrad', not 'RowWiseAdagrad'"):
        lrfast.RowWiseAdagrad(table).load_state_dict(opt.state_dict())


def test_module_lists_every_update():
    assert set(E.__all__) >= {name + "_" for name in ROW_UPDATES}
    for name in ROW_UPDATES:
        assert getattr(F, name + "_") is getattr(E, name + "_")
        assert callable(getattr(R, name + "_"))
