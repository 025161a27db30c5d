"""``python -m lrfast demo --embeddings``: the recommender demo trains (its loss falls well
below the initial weights' and approaches the hidden model's), lrfast's run and torch's agree,
and the command runs. Expected values: the hidden model's own loss and torch on the same
batches; no timing is asserted."""
import numpy as np
import pytest

from cases import run_python
from lrfast import demo_embeddings as D

STEPS = 120


@pytest.fixture(scope="module")
def runs():
    batches, (ids, y, best) = D.make_data(STEPS)
    weights = D.init_weights()
    losses, opt_s, step_s, w = D.train_numpy(batches, weights)
    held = D._bce(D._forward(w, ids)[2].astype(np.float64), y)
    start = D._bce(D._forward(weights, ids)[2].astype(np.float64), y)
    return batches, weights, losses, held, start, best, (ids, y)


def test_numpy_run_learns(runs):
    _, weights, losses, held, start, best, _ = runs
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < losses[0] - 0.05
    assert best < held < start - 0.05             # closer to the hidden model than at the start


def test_only_the_touched_rows_move(runs):
    batches, weights, *_ = runs
    _, _, _, w = D.train_numpy(batches[:3], weights)
    touched = np.unique(np.concatenate([ids.reshape(-1) for ids, _ in batches[:3]]))
    moved = np.flatnonzero((w["table"] != weights["table"]).any(axis=1))
    assert set(moved) <= set(touched) and len(moved) > 0.9 * len(touched)


def test_torch_run_agrees(runs):
    torch = pytest.importorskip("torch")
    batches, weights, losses, held, _, _, (ids, y) = runs
    t_losses, _, _, evaluate = D.train_torch(torch, batches, weights)
    assert t_losses[0] == pytest.approx(losses[0], abs=1e-5)    # the same start, same batch
    np.testing.assert_allclose(t_losses, losses, atol=5e-3)
    assert evaluate(ids, y) == pytest.approx(held, abs=5e-3)


def _main(args, prelude=""):
    """``python -m lrfast <args>`` in a fresh interpreter run from an empty folder (a source
    checkout in the working directory must not shadow the lrfast under test)."""
    return run_python(f"import sys\n{prelude}from lrfast.__main__ import main\n"
                      f"sys.exit(main({args!r}))")


def test_command_runs():
    proc = _main(["demo", "--embeddings", "--steps", "30"])
    assert proc.returncode == 0, proc.stderr
    assert "lrfast SparseAdam + Adam" in proc.stdout and "30 steps" in proc.stdout
    bad = _main(["demo", "--embeddings", "--torch"])
    assert bad.returncode == 2 and "separate demos" in bad.stderr


def test_command_without_torch():
    proc = _main(["demo", "--embeddings", "--steps", "20"], prelude="sys.modules['torch'] = None\n")
    assert proc.returncode == 0, proc.stderr
    assert "lrfast SparseAdam + Adam" in proc.stdout
    assert "torch SparseAdam" not in proc.stdout and "torch is not installed" in proc.stdout
