"""``lrfast.compare`` / ``python -m lrfast compare``: determinism, divergence, the reference
runs, the table's arithmetic, bad input and the command line."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

import lrfast
from lrfast._specs import OPTIMIZERS as SPECS
from lrfast.comparison import PROBLEMS, compare, log_grid
from lrfast.comparison.problems import _linreg_best_loss, _linreg_data, _quadratic_data
from lrfast.comparison.runs import (DIVERGENCE_FACTOR, RunResult, parse_optimizer,
                                    parse_schedule, run)
from lrfast.comparison.summary import summarize

from cases import run_python

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
SMALL = dict(problems=["linreg-full", "quadratic"], optimizers=["SGD", "Adam"],
             schedules=["constant", "cosine"], lrs=[0.01, 0.1, 1.0], seeds=[0, 1])


def test_same_arguments_same_numbers():
    a = compare(**SMALL).to_dict(timings=False)
    b = compare(**SMALL).to_dict(timings=False)
    assert a == b
    assert len(a["runs"]) == 2 * 2 * 2 * 3 * 2


def test_worker_processes_change_nothing():
    """Two spawned workers give the runs one process gives, in the same order."""
    args = dict(SMALL, problems=["linreg-minibatch"], optimizers=["SGD(momentum=0.9)", "RMSprop"])
    one = compare(**args, jobs=1).to_dict(timings=False)
    two = compare(**args, jobs=2).to_dict(timings=False)
    assert one == two


def test_seeds_change_the_runs():
    """A stochastic problem from two seeds: different batches, different curves."""
    c = compare(problems=["linreg-minibatch"], optimizers=["SGD"], schedules=["constant"],
                lrs=[0.01], seeds=[0, 1])
    assert c.runs[0].curve != c.runs[1].curve


def _gd_steps_to_target(lr, seed, budget):
    """Plain gradient descent on the seeds' regression, written out here: the first step whose
    loss is at most the target (the problem's: 1% above the least-squares loss)."""
    x, y = _linreg_data()
    w, b = np.random.default_rng(seed).standard_normal(2)
    target = 1.01 * _linreg_best_loss()
    for t in range(1, budget + 1):
        r = w * x + b - y
        w, b = w - lr * 2 * np.mean(r * x), b - lr * 2 * np.mean(r)
        if np.mean((w * x + b - y) ** 2) <= target:
            return t
    return None


@pytest.mark.parametrize("lr", [0.03, 0.1, 0.3])
def test_steps_to_target_as_plain_gradient_descent_counts_them(lr):
    r = run("linreg-full", parse_optimizer("SGD"), parse_schedule("constant"), lr, seed=3)
    expected = _gd_steps_to_target(lr, 3, PROBLEMS["linreg-full"].budget)
    assert expected is not None
    assert r.steps_to_target == expected
    assert r.seconds_to_target is not None and 0 < r.seconds_to_target <= r.seconds
    assert not r.diverged and r.steps_run == PROBLEMS["linreg-full"].budget


def test_quadratic_steps_as_plain_gradient_descent_counts_them():
    """The module's example (SGD at 0.01 reaches the quadratic's target at step 305), against
    gradient descent x <- x - lr A (x - x*) written out here."""
    a, opt = _quadratic_data()
    x = opt + np.random.default_rng(0).standard_normal(opt.size)
    expected = None
    for t in range(1, PROBLEMS["quadratic"].budget + 1):
        x = x - 0.01 * (a @ (x - opt))
        if 0.5 * (x - opt) @ (a @ (x - opt)) <= 1e-3:
            expected = t
            break
    r = run("quadratic", parse_optimizer("SGD"), parse_schedule("constant"), 0.01, seed=0)
    assert r.steps_to_target == expected == 305


def test_divergence_ends_the_run_and_is_counted():
    """The regression's Hessian 2 [[E x^2, E x], [E x, 1]] has its largest eigenvalue near 4.4
    (x ~ U(0, 2)): gradient descent diverges for lr > 2 / 4.4 ~ 0.46, so lr = 1 blows up."""
    r = run("linreg-full", parse_optimizer("SGD"), parse_schedule("constant"), 1.0, seed=0)
    assert r.diverged
    assert r.steps_to_target is None and r.seconds_to_target is None
    assert r.final_loss == math.inf
    assert r.steps_run < PROBLEMS["linreg-full"].budget
    last = r.curve[-1][1]
    assert not math.isfinite(last) or last > DIVERGENCE_FACTOR * r.curve[0][1]
    row = summarize([r])[0]
    assert row.diverged_runs == 1 and row.median_steps is None


def test_overflow_to_nan_is_a_divergence_not_an_error(recwarn):
    """A rate so large the parameters overflow: NaN losses, no exception and no warning."""
    c = compare(problems=["rosenbrock"], optimizers=["SGD", "Adam"], schedules=["constant"],
                lrs=[1e30], seeds=[0])
    assert all(r.diverged for r in c.runs)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "not reached" in c.table()
    json.loads(c.to_json())  # inf losses are written as strings


@pytest.mark.parametrize("name", list(SPECS))
def test_reference_runs_agree_with_the_kernels(name):
    """Every optimizer of the table, trained by the compiled kernels and by lrfast.reference
    (the cosine's values from the reference's schedule code): the same runs.

    At a constant rate most updates agree to the last bit over the whole run. Rounding-level
    differences (the schedule's values; LAMB's and Adafactor's norms, summed in another order)
    are amplified later in the runs where the dynamics are unstable (RMSprop, LAMB and Adafactor
    oscillating about the minimum grow a 1e-16 change to 1e-9 by steps 260-380): so the first
    200 steps agree to 1e-9, and the whole run's steps to target and divergence are the same."""
    args = dict(problems=["quadratic"], optimizers=[name], schedules=["constant", "cosine"],
                lrs=[0.01], seeds=[0])
    fast = compare(**args)
    ref = compare(**args, reference=True)
    assert ref.reference and not fast.reference
    for f, r in zip(fast.runs, ref.runs):
        assert (f.optimizer, f.schedule, f.lr) == (r.optimizer, r.schedule, r.lr)
        fl = np.array([v for s, v in f.curve if s <= 200])
        rl = np.array([v for s, v in r.curve if s <= 200])
        assert fl.shape == rl.shape == (201,)
        np.testing.assert_allclose(fl, rl, rtol=1e-9, atol=1e-12)
        assert f.steps_to_target == r.steps_to_target
        assert f.diverged == r.diverged and len(f.curve) == len(r.curve)


def test_plateau_schedule_lowers_the_rate():
    """Under 'plateau' the rate halves once the loss stops improving: on the single-sample
    regression (a noisy floor) the run ends closer to the optimum than at the constant rate."""
    opt = parse_optimizer("SGD")
    const = run("linreg-sgd", opt, parse_schedule("constant"), 0.1, seed=0)
    plat = run("linreg-sgd", opt, parse_schedule("plateau"), 0.1, seed=0)
    assert plat.final_loss < const.final_loss
    # the first evaluations agree: the factor starts at 1
    assert plat.curve[:3] == const.curve[:3]


def test_schedule_expression_multiplies_the_rate():
    """'cosine_decay(1.0, N)' times the rate is the built-in 'cosine' over a budget of N."""
    budget = PROBLEMS["quadratic"].budget
    opt = parse_optimizer("Adam")
    a = run("quadratic", opt, parse_schedule("cosine"), 0.1, seed=0)
    b = run("quadratic", opt, parse_schedule(f"cosine_decay(1.0, {budget})"), 0.1, seed=0)
    assert [v for _, v in a.curve] == [v for _, v in b.curve]


def _result(opt, lr, seed, steps, final, diverged=False):
    return RunResult("quadratic", opt, "constant", lr, seed, False, steps,
                     None if steps is None else steps * 1e-4, final, final, diverged,
                     steps or 10, 1e-3, [(0, 1.0)])


def test_table_arithmetic_by_hand():
    """Best rate, median and spread of steps, good range and rank, on made-up runs."""
    runs = [
        # A: at 0.01 seeds take 100 and 140 (median 120); at 0.1, 60 and 80 (median 70);
        # at 1.0 one seed reaches in 90, the other diverges (median of 90 and inf: inf)
        _result("A", 0.01, 0, 100, 1e-4), _result("A", 0.01, 1, 140, 2e-4),
        _result("A", 0.1, 0, 60, 1e-5), _result("A", 0.1, 1, 80, 3e-5),
        _result("A", 1.0, 0, 90, 1e-6), _result("A", 1.0, 1, None, math.inf, diverged=True),
        # B: never reaches the target; its lower final loss is at 0.1
        _result("B", 0.01, 0, None, 0.5), _result("B", 0.01, 1, None, 0.7),
        _result("B", 0.1, 0, None, 0.2), _result("B", 0.1, 1, None, 0.4),
        _result("B", 1.0, 0, None, 0.9), _result("B", 1.0, 1, None, 0.9),
    ]
    a, b = summarize(runs)
    assert (a.optimizer, a.rank, b.optimizer, b.rank) == ("A", 1, "B", 2)
    assert a.best_lr == 0.1 and a.median_steps == 70 and (a.steps_min, a.steps_max) == (60, 80)
    assert a.reached == 2 and a.seeds == 2 and a.diverged_runs == 1 and a.runs == 6
    # within 1.5 x 70 = 105 steps: only 0.1 (0.01's median 120 is not)
    assert (a.good_lr_low, a.good_lr_high, a.good_lr_decades) == (0.1, 0.1, 0.0)
    assert a.median_final_loss == pytest.approx(2e-5)
    assert a.final_loss_spread == pytest.approx(2e-5)
    assert b.median_steps is None and b.best_lr == 0.1 and b.median_final_loss == pytest.approx(0.3)
    assert b.good_lr_low is None and b.reached == 0


def test_table_states_the_tuning_budget():
    text = compare(**SMALL).table()
    assert "same tuning budget: 3 learning rates" in text and "2 seeds" in text
    for problem in SMALL["problems"]:
        assert f"{problem}:" in text


def test_log_grid():
    assert log_grid(1e-4, 1.0, 9) == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1, 0.316,
                                      1.0]
    assert log_grid(0.5, 0.5, 1) == [0.5]


BAD = [
    (dict(problems=["nope"]), ValueError, "unknown problem"),
    (dict(problems="quadratic"), ValueError, "non-empty list"),
    (dict(problems=["quadratic", "quadratic"]), ValueError, "twice"),
    (dict(optimizers=["Adamm"]), ValueError, "unknown optimizer 'Adamm'"),
    (dict(optimizers=["SGD(lr=0.1)"]), ValueError, "learning rate is the compared"),
    (dict(optimizers=["SGD(momentum=-1)"]), ValueError, "momentum"),
    (dict(optimizers=["SGD(momentum=x)"]), ValueError, "literals"),
    (dict(optimizers=["SGD(0.9)"]), ValueError, "keyword arguments only"),
    (dict(optimizers=["Adam", "Adam"]), ValueError, "twice"),
    (dict(optimizers=[]), ValueError, "non-empty"),
    (dict(schedules=["cosinus"]), ValueError, "neither one of"),
    (dict(schedules=["__import__('os')"]), ValueError, "neither one of"),
    (dict(lrs=[0.1, -1.0]), ValueError, "finite numbers > 0"),
    (dict(lrs=[float("nan")]), ValueError, "finite numbers > 0"),
    (dict(lrs=[0.1, 0.1]), ValueError, "twice"),
    (dict(lrs="0.1"), ValueError, "non-empty list"),
    (dict(seeds=0), ValueError, "count >= 1"),
    (dict(seeds=[0, -1]), ValueError, "integers >= 0"),
    (dict(seeds=[1, 1]), ValueError, "twice"),
    (dict(jobs=0), ValueError, "jobs"),
    (dict(reference=1), TypeError, "reference"),
]


@pytest.mark.parametrize("bad, exc, match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_are_refused_before_any_run(bad, exc, match, monkeypatch):
    calls = []
    monkeypatch.setattr("lrfast.comparison._run_task", lambda task: calls.append(task))
    args = dict(SMALL, **bad)
    with pytest.raises(exc, match=match):
        compare(**args)
    assert calls == []


def test_compare_is_exported():
    assert lrfast.compare is lrfast.comparison.compare
    assert set(lrfast.comparison.QUICK["optimizers"]) == {"SGD", "Adagrad", "RMSprop", "Adam",
                                                         "AdamW"}


def test_command_line_json():
    """The command: rows and runs as JSON on stdout, deterministic apart from the seconds."""
    code = ("import sys, lrfast.__main__ as m; sys.exit(m.main(['compare', '--problems', "
            "'quadratic', '--optimizers', 'SGD', 'Adam', '--schedules', 'constant', "
            "'--lrs', '0.001:0.1:3', '--seeds', '1', '--jobs', '1', '--json', '-']))")
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["settings"]["lrs"] == [0.001, 0.01, 0.1]
    assert [(r["optimizer"], r["rank"]) for r in data["rows"]] == [("Adam", 1), ("SGD", 2)]
    api = compare(problems=["quadratic"], optimizers=["SGD", "Adam"], schedules=["constant"],
                  lrs=[0.001, 0.01, 0.1], seeds=1).to_dict(timings=False)
    for d in data["runs"]:
        d.pop("seconds"), d.pop("seconds_to_target")
    assert data["runs"] == api["runs"]


def test_command_line_bad_input_exits_2():
    code = ("import sys, lrfast.__main__ as m; "
            "sys.exit(m.main(['compare', '--optimizers', 'Adamm', '--problems', 'quadratic']))")
    out = run_python(code)
    assert out.returncode == 2
    assert "unknown optimizer 'Adamm'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plots_are_drawn(tmp_path):
    c = compare(problems=["linreg-full"], optimizers=["SGD", "Adam"], schedules=["constant"],
                lrs=[0.1, 1.0], seeds=[0, 1])
    paths = c.plot(str(tmp_path / "figs"))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["compare-linreg-full.png"]
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("opt", ["SGD(momentum=0.9)", "Adam", "RMSprop"])
def test_torch_problem_lrfast_torch_matches_torch_optim(opt):
    """The torch MLP trained by lrfast.torch and (reference=True) by torch.optim: float32 runs
    of the same model from the same start on the same batches. Float32 rounding differences
    (RMSprop: 2e-6 of the loss after 10 steps) grow as training goes on, so the first 50 steps
    agree to 1e-4 and the steps to target are the same."""
    args = dict(problems=["torch-mlp"], optimizers=[opt], schedules=["cosine"], lrs=[0.1],
                seeds=[0])
    fast, ref = compare(**args), compare(**args, reference=True)
    fl = np.array([v for s, v in fast.runs[0].curve if s <= 50])
    rl = np.array([v for s, v in ref.runs[0].curve if s <= 50])
    assert fl.shape == rl.shape == (6,)
    np.testing.assert_allclose(fl, rl, rtol=1e-4)
    assert fast.runs[0].steps_to_target == ref.runs[0].steps_to_target is not None


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_problem_reference_needs_torch_optim_class():
    with pytest.raises(ValueError, match="torch.optim has no Lion"):
        compare(problems=["torch-mlp"], optimizers=["Lion"], schedules=["constant"], lrs=[0.1],
                seeds=[0], reference=True)


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn is not installed")
def test_digits_problem_reaches_its_target():
    r = run("digits-logreg", parse_optimizer("Adam"), parse_schedule("constant"), 0.1, seed=0)
    assert r.steps_to_target is not None and r.final_loss < PROBLEMS["digits-logreg"].target


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("opt", ["Adam", "AdamWScheduleFree"])
def test_torch_problem_follows_the_numpy_one(opt):
    """The same MLP, data, start and batches in NumPy (float64, lrfast's classes) and in torch
    (float32, lrfast.torch): the first 50 steps' losses agree to float32 accuracy. For the
    schedule-free optimizer both are evaluated at x through eval()/train()."""
    args = dict(optimizers=[opt], schedules=["constant"], lrs=[0.01], seeds=[0])
    a = compare(problems=["mlp"], **args).runs[0]
    b = compare(problems=["torch-mlp"], **args).runs[0]
    la = np.array([v for s, v in a.curve if s <= 50])
    lb = np.array([v for s, v in b.curve if s <= 50])
    np.testing.assert_allclose(la, lb, rtol=1e-4)
