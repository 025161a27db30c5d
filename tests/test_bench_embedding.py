"""``python -m lrfast bench``'s embedding-table cases (kind "embedding"): the cases in both
modes, which peers run where and why the others do not, the lookups (Zipf, folded into the
table, the remapped linearity batches keeping their duplicates), that each stepper makes the
update it names (checked against torch or the NumPy reference on the same batch), and a quick
run's report and JSON. No timing is asserted.
"""
import json
import sys

import numpy as np
import pytest

import lrfast
from lrfast import reference
from lrfast._bench.cases import (EMBEDDING_BATCHES, EMBEDDING_LOOKUPS, EMBEDDING_SIZES, Case,
                                 all_cases)
from lrfast._bench.peers import (EMBEDDING_PEERS, EmbeddingData, Peers, Skip, make_stepper,
                                 plan)
from lrfast._bench.targets import parts_of
from test_bench_cli import run_bench, table_row


@pytest.fixture
def small(monkeypatch):
    """The cases' sizes shrunk (same names), so that a stepper's result can be checked."""
    import lrfast._bench.cases as cases_mod
    import lrfast._bench.peers as peers_mod
    sizes = {"1Mx64": (500, 8, 1.2), "10Mx128": (700, 16, 1.2), "4Mx64": (3000, 8, 1.2),
             "1Mx64 a1.05": (500, 8, 1.05)}
    for mod in (cases_mod, peers_mod):
        monkeypatch.setattr(mod, "EMBEDDING_SIZES", sizes)
        monkeypatch.setattr(mod, "EMBEDDING_LOOKUPS", 300)
    monkeypatch.setattr(peers_mod, "LINEARITY_ROWS", 1000)
    return sizes


def test_embedding_cases_in_both_modes():
    quick = [c.name for c in all_cases(True) if c.kind == "embedding"]
    full = [c.name for c in all_cases(False) if c.kind == "embedding"]
    main = [f"embedding {o} 1Mx64" for o in ("sgd", "adagrad", "rowwise-adagrad", "adam")]
    assert quick == main + ["embedding adagrad 4Mx64", "embedding adagrad 1Mx64 a1.05"]
    assert full == quick + ["embedding sgd 10Mx128", "embedding rowwise-adagrad 10Mx128"]
    for quick_mode in (True, False):
        names = [c.name for c in all_cases(quick_mode)]
        assert "embedding merge 1Mx64 threads 1->2" in names
    assert EMBEDDING_SIZES["1Mx64"][:2] == (2**20, 64)
    assert EMBEDDING_SIZES["10Mx128"][:2] == (10_000_000, 128)
    for c in all_cases(False):
        if c.kind == "embedding":
            assert c.sizes == () and c.elements == 0 and c.bytes_per_step is None


def test_targets_judge_the_quick_cases():
    assert [(p.measure, p.peer, p.threshold) for p in parts_of("embedding adagrad 1Mx64")] == \
        [("ratio", "torch-sparse", 10.0)]
    assert [(p.measure, p.peer, p.threshold) for p in parts_of("embedding adam 1Mx64")] == \
        [("ratio", "torch-sparse", 10.0)]
    assert [(p.measure, p.peer) for p in parts_of("embedding rowwise-adagrad 1Mx64")] == \
        [("ratio", "fbgemm-rowwise")]
    assert [(p.measure, p.peer, p.threshold) for p in parts_of("embedding adagrad 4Mx64")] == \
        [("cost", "lrfast-64k", 1.5)]
    assert [(p.measure, p.threshold) for p in
            parts_of("embedding merge 1Mx64 threads 1->2")] == [("speedup", 1.7)]


def test_plan_gives_each_peer_a_run_or_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)        # as if not installed
    peers = Peers(no_optax=True, no_deepspeed=True)
    cases = [c for c in all_cases(False) if c.kind == "embedding"]
    plan(cases, peers, False)
    by = {c.name: c.impls for c in cases}
    for impls in by.values():
        assert set(impls) == {"lrfast", *EMBEDDING_PEERS} and impls["lrfast"] is None
    row = by["embedding rowwise-adagrad 1Mx64"]
    assert row["torch-sparse"].status == "n/a"
    assert str(row["fbgemm-rowwise"]) in ("fbgemm_gpu not installed", "needs torch (torch not "
                                          "installed)")
    assert row["fbgemm-rowwise"].status == "skipped"
    assert by["embedding rowwise-adagrad 10Mx128"]["fbgemm-rowwise"].status == "n/a"
    assert by["embedding adagrad 4Mx64"]["lrfast-64k"] is None
    assert by["embedding adagrad 4Mx64"]["torch-sparse"].status == "n/a"
    assert by["embedding adagrad 1Mx64"]["lrfast-64k"].status == "n/a"
    for name in ("embedding sgd 1Mx64", "embedding adagrad 1Mx64", "embedding adam 1Mx64",
                 "embedding sgd 10Mx128"):
        got = by[name]["torch-sparse"]
        assert got is None if peers.torch is not None else got.status == "skipped"


def test_fbgemm_that_fails_to_import_is_a_skip(monkeypatch):
    """An installed fbgemm_gpu built for another torch raises OSError on import: a skip with
    the reason, tried once."""
    import importlib
    peers = Peers(no_optax=True, no_deepspeed=True)
    if peers.torch is None:
        pytest.skip("torch not installed")
    peers.fbgemm_reason = None                                   # as if installed
    tries = []

    def broken(name, *a, **k):
        tries.append(name)
        raise OSError("Could not load this library: fbgemm_gpu_tbe.so\nundefined symbol")
    monkeypatch.setattr(importlib, "import_module", broken)
    case = Case("embedding rowwise-adagrad 1Mx64", "embedding", "rowwise-adagrad", "f32", "1Mx64")
    for _ in range(2):
        with pytest.raises(Skip) as e:
            make_stepper(case, "fbgemm-rowwise", None, peers)
        assert str(e.value) == ("fbgemm_gpu failed to import: OSError: Could not load this "
                                "library: fbgemm_gpu_tbe.so")
    assert len(tries) == 1


def test_lookups_are_zipf_folded_and_remapping_keeps_duplicates(small):
    data = EmbeddingData("1Mx64")
    assert len(data.indices) == len(data.grads) == EMBEDDING_BATCHES
    for idx, g, u in zip(data.indices, data.grads, data.unique):
        assert idx.dtype == np.int64 and idx.shape == (300,)
        assert 0 <= idx.min() and idx.max() < 500
        assert g.shape == (300, 8) and g.dtype == np.float32
        assert u == np.unique(idx).size
        # Zipf: row 0 (k = 1) is the most frequent, far above the uniform share 300 / 500
        counts = np.bincount(idx, minlength=500)
        assert counts.argmax() == 0 and counts[0] > 30
    again = EmbeddingData("1Mx64")                                # one fixed seed
    assert all((a == b).all() for a, b in zip(data.indices, again.indices))
    moved = data.remapped(1000)
    for old, new in zip(data.indices, moved):
        assert new.max() < 1000
        # the same partition of the lookups into rows: equal where, and only where, equal before
        assert ((old[:, None] == old[None, :]) == (new[:, None] == new[None, :])).all()
    with pytest.raises(ValueError):
        data.remapped(10)


@pytest.mark.parametrize("opt, ref, state", [
    ("sgd", reference.sparse_sgd_, ()),
    ("adagrad", reference.sparse_adagrad_, ("state_sum",)),
    ("rowwise-adagrad", reference.rowwise_adagrad_, ("state_sum",)),
    ("adam", reference.sparse_adam_, ("exp_avg", "exp_avg_sq")),
])
def test_lrfast_stepper_steps_the_batches_in_turn(small, opt, ref, state):
    case = Case(f"embedding {opt} 1Mx64", "embedding", opt, "f32", "1Mx64")
    data = EmbeddingData("1Mx64")
    fn, args = make_stepper(case, "lrfast", data, None)
    want = np.zeros_like(data.table)
    per_row = opt.startswith("rowwise")
    bufs = [np.zeros(500 if per_row and name == "state_sum" else (500, 8), np.float32)
            for name in state]
    lr = {"sgd": 1e-3, "adagrad": 1e-2, "rowwise-adagrad": 1e-2, "adam": 1e-3}[opt]
    for t in range(EMBEDDING_BATCHES + 1):
        fn(*args)
        i = t % EMBEDDING_BATCHES
        kw = {} if opt == "sgd" else {"step": t + 1}
        ref(want, data.indices[i], data.grads[i], *bufs, lr=lr, **kw)
    np.testing.assert_allclose(data.table, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "adagrad", "adam"])
def test_torch_stepper_matches_lrfast(small, opt):
    """torch's step on the COO grad and lrfast's on the lookups agree (each on its own table)."""
    peers = Peers(no_optax=True, no_deepspeed=True)
    if peers.torch is None:
        pytest.skip("torch not installed")
    case = Case(f"embedding {opt} 1Mx64", "embedding", opt, "f32", "1Mx64")
    ours, theirs = EmbeddingData("1Mx64"), EmbeddingData("1Mx64")
    fn, args = make_stepper(case, "lrfast", ours, peers)
    tfn, targs = make_stepper(case, "torch-sparse", theirs, peers)
    for _ in range(EMBEDDING_BATCHES + 1):
        fn(*args)
        tfn(*targs)
    assert np.abs(ours.table).max() > 0
    np.testing.assert_allclose(theirs.table, ours.table, rtol=1e-4, atol=1e-6)


def test_linearity_stepper_uses_a_small_table(small):
    case = Case("embedding adagrad 4Mx64", "embedding", "adagrad", "f32", "4Mx64")
    data = EmbeddingData("4Mx64")
    fn, args = make_stepper(case, "lrfast-64k", data, None)
    fn(*args)
    import inspect
    opt = inspect.getclosurevars(fn).nonlocals["step"].__self__
    assert isinstance(opt, lrfast.SparseAdagrad) and opt.table.shape == (1000, 8)
    assert opt.table.any() and not data.table.any()   # the case's own table untouched
    assert sorted(np.unique(opt.table.nonzero()[0])) != sorted(np.unique(data.indices[0]))


def test_quick_run_embedding_cases(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", "embedding (sgd|adagrad|rowwise-adagrad) 1Mx64$|merge",
                     "--no-optax", "--no-deepspeed", "--repeats", "3", "--json", "out.json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "Embedding tables (one sparse step" in out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert "torch-sparse" in header and "unique rows" in header
    assert table_row(out, "embedding adagrad 1Mx64").endswith(" ns")
    assert "thread scaling: embedding merge 1Mx64 threads 1->2" in out
    assert "SparseAdagrad 1Mx64 >= 10x torch sparse Adagrad" in out
    data = json.loads((tmp_path / "out.json").read_text())
    cases = {c["name"]: c for c in data["cases"]}
    ada = cases["embedding adagrad 1Mx64"]
    assert ada["kind"] == "embedding" and ada["rows"] == 2**20 and ada["dim"] == 64
    assert ada["lookups"] == EMBEDDING_LOOKUPS and ada["zipf_a"] == 1.2
    assert 1000 < ada["unique_rows"] < EMBEDDING_LOOKUPS
    assert ada["results"]["lrfast"]["status"] == "ok"
    assert ada["ns_per_unique_row"]["lrfast"] > 0
    rw = cases["embedding rowwise-adagrad 1Mx64"]
    assert rw["results"]["fbgemm-rowwise"]["status"] in ("ok", "skipped")
    assert rw["results"]["torch-sparse"]["status"] == "n/a"
    merge = cases["embedding merge 1Mx64 threads 1->2"]
    assert merge["speedup"] > 0
    if data["machine"]["versions"]["torch"]:
        assert ada["results"]["torch-sparse"]["status"] == "ok" and ada["ratios"]["torch-sparse"] > 0


def test_embedding_cases_without_torch(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", "embedding adam 1Mx64", "--no-optax",
                     "--repeats", "2", "--json", "out.json", hide=("torch",))
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads((tmp_path / "out.json").read_text())["cases"]
    res = case["results"]
    assert res["lrfast"]["status"] == "ok"
    assert res["torch-sparse"] == {"status": "skipped", "reason": "torch not installed"}
    assert "skipped: torch-sparse: torch not installed" in proc.stdout
