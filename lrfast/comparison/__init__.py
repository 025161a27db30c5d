"""Which optimizer and schedule reach the target first: convergence comparisons.

``lrfast.compare(...)`` (and ``python -m lrfast compare``) trains small built-in problems
(:mod:`lrfast.comparison.problems`) with every combination of optimizers, schedules, learning
rates (a log grid, the same for every optimizer: the same tuning budget) and seeds, and
measures steps and seconds to each problem's target, the final loss, divergence and the spread
over seeds (:mod:`lrfast.comparison.runs`); :mod:`lrfast.comparison.summary` turns the runs into
a ranked table with each optimizer's best rate and how wide its good range is.

Everything but the seconds is deterministic: the same arguments give the same numbers, in any
number of worker processes. ``reference=True`` runs the updates with :mod:`lrfast.reference`
(pure NumPy) instead of the compiled kernels, to show both give the same runs.

Examples
--------
>>> import lrfast
>>> result = lrfast.compare(problems=["quadratic"], optimizers=["SGD", "Adam"],
...                         schedules=["constant"], lrs=[0.001, 0.01, 0.1], seeds=[0])
>>> [(row.rank, row.optimizer, row.best_lr, row.median_steps) for row in result.rows]
[(1, 'Adam', 0.1, 162.0), (2, 'SGD', 0.01, 305.0)]
>>> result.runs[0].diverged, result.runs[-1].diverged    # SGD at 0.001 (too slow); Adam at 0.1
(False, False)
>>> [r.lr for r in result.runs if r.diverged]              # SGD at 0.1: beyond 2 / (largest curvature)
[0.1]
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .problems import PROBLEMS, available_problems
from .runs import SCHEDULES, RunResult, parse_optimizer, parse_schedule, run
from .summary import format_table, summarize

__all__ = ["compare", "Comparison", "PROBLEMS", "SCHEDULES", "QUICK", "FULL", "log_grid"]


def log_grid(low: float, high: float, count: int) -> list[float]:
    """``count`` rates spaced evenly in log between ``low`` and ``high`` (3 significant digits).

    >>> log_grid(1e-3, 1.0, 7)
    [0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0]
    """
    if not (0 < low <= high) or not all(map(math.isfinite, (low, high))):
        raise ValueError(f"a rate grid needs 0 < low <= high, got {low}, {high}")
    if int(count) != count or count < 1:
        raise ValueError(f"a rate grid needs a whole number of rates >= 1, got {count}")
    if count == 1:
        return [float(low)]
    return [float(f"{v:.3g}") for v in np.logspace(math.log10(low), math.log10(high), count)]


#: ``python -m lrfast compare --quick``: three problems, the five original optimizers, two
#: schedules, 7 rates, 2 seeds (420 runs; well under two minutes on two cores).
QUICK: dict[str, Any] = dict(
    problems=["linreg-full", "quadratic", "mlp"],
    optimizers=["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"],
    schedules=["constant", "cosine"], lrs=log_grid(1e-3, 1.0, 7), seeds=[0, 1])
#: The full run's defaults: every problem installed, more optimizers and schedules, 9 rates,
#: 3 seeds.
FULL: dict[str, Any] = dict(
    problems=None,
    optimizers=["SGD", "SGD(momentum=0.9)", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam",
                "Lion", "AdamWScheduleFree"],
    schedules=["constant", "cosine", "warmup-cosine", "plateau"],
    lrs=log_grid(1e-4, 1.0, 9), seeds=[0, 1, 2])


@dataclass
class Comparison:
    """The result of :func:`compare`: every run, and the ranked table's rows."""

    problems: list
    optimizers: list
    schedules: list
    lrs: list
    seeds: list
    reference: bool
    runs: list
    rows: list

    def table(self) -> str:
        """The ranked table as text (what ``python -m lrfast compare`` prints)."""
        return format_table(self.rows, PROBLEMS, self.lrs, self.seeds, self.reference)

    def to_dict(self, timings: bool = True) -> dict:
        """Everything as plain data (JSON-ready). ``timings=False`` leaves out the measured
        seconds, the only values that differ between two runs of the same comparison."""
        from .. import __version__

        runs = [r.to_dict() for r in self.runs]
        rows = [r.to_dict() for r in self.rows]
        if not timings:
            for d in runs:
                d.pop("seconds"), d.pop("seconds_to_target")
            for d in rows:
                d.pop("median_seconds")
                for e in d["per_lr"]:
                    e.pop("median_seconds")
        return {
            "lrfast": __version__,
            "settings": {
                "problems": {name: {"title": PROBLEMS[name].title,
                                    "target": PROBLEMS[name].target,
                                    "budget": PROBLEMS[name].budget,
                                    "eval_every": PROBLEMS[name].eval_every}
                             for name in self.problems},
                "optimizers": self.optimizers, "schedules": self.schedules,
                "lrs": self.lrs, "seeds": self.seeds, "reference": self.reference,
                "tuning_budget": f"{len(self.lrs)} learning rates x {len(self.seeds)} seeds "
                                 f"per optimizer and schedule",
            },
            "rows": rows,
            "runs": runs,
        }

    def to_json(self, timings: bool = True) -> str:
        return json.dumps(self.to_dict(timings), indent=1)

    def plot(self, folder: str) -> list[str]:
        """Draw each problem's loss curves and rate sensitivity into ``folder`` (made if
        missing); returns the image paths. Needs matplotlib."""
        from .plots import plot_comparison

        return plot_comparison(self, folder)


def _choices(values, parse, what) -> list:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{what} must be a non-empty list")
    out = [parse(v) for v in values]
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what} lists one twice: {labels}")
    return out


def _check_problems(problems) -> list[str]:
    if problems is None:
        return available_problems()
    if isinstance(problems, str) or not isinstance(problems, Sequence) or not problems:
        raise ValueError("problems must be a non-empty list of names")
    for name in problems:
        if name not in PROBLEMS:
            raise ValueError(f"unknown problem {name!r}; the problems are "
                             f"{', '.join(PROBLEMS)}")
        if not PROBLEMS[name].available():
            raise ValueError(f"problem {name!r} needs {PROBLEMS[name].needs}, which is not "
                             f"installed")
    if len(set(problems)) != len(problems):
        raise ValueError(f"problems lists one twice: {list(problems)}")
    return list(problems)


def _check_lrs(lrs) -> list[float]:
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or not lrs:
        raise ValueError("lrs must be a non-empty list of learning rates")
    out = []
    for v in lrs:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not math.isfinite(v) or v <= 0:
            raise ValueError(f"learning rates must be finite numbers > 0, got {v!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"lrs lists a rate twice: {out}")
    return sorted(out)


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds: give a count >= 1 or a list of seeds, got {seeds}")
        return list(range(int(seeds)))
    if isinstance(seeds, str) or not isinstance(seeds, Sequence) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
            for s in seeds):
        raise ValueError(f"seeds: give a count >= 1 or a list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds lists one twice: {list(seeds)}")
    return [int(s) for s in seeds]


def _worker_init() -> None:
    """Each worker process runs one small problem at a time: one thread each."""
    from .. import set_num_threads

    set_num_threads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    else:  # read by torch when the torch problem imports it
        os.environ["OMP_NUM_THREADS"] = "1"


def _run_task(task) -> RunResult:
    return run(*task[:5], reference=task[5])


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0

    def advance(self) -> None:
        self.done += 1
        # redrawn at each whole percent, not at each run
        if self.enabled and (100 * self.done // self.total != 100 * (self.done - 1) // self.total
                             or self.done == self.total):
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total} runs")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def compare(problems: Optional[Sequence[str]] = None,
            optimizers: Optional[Sequence[str]] = None,
            schedules: Optional[Sequence[str]] = None,
            lrs: Optional[Sequence[float]] = None,
            seeds: Any = None, *, reference: bool = False, jobs: int = 1,
            progress: bool = False) -> Comparison:
    """Run every problem x optimizer x schedule x rate x seed and rank the results.

    ``problems``: names of :data:`PROBLEMS` (None: every one installed). ``optimizers``: texts
    such as ``"Adam"`` or ``"SGD(momentum=0.9)"`` (None: the full run's list, :data:`FULL`).
    ``schedules``: shapes of :data:`SCHEDULES` or schedule expressions whose values multiply
    the rate. ``lrs``: the rate grid, the same for every optimizer (None: 9 rates from 1e-4 to
    1). ``seeds``: a count or a list (None: 3). ``reference``: updates by lrfast.reference.
    ``jobs``: worker processes (1: in this process; results do not depend on it).
    ``progress``: a progress bar on stderr.

    Every argument is checked before the first run. See the module's docstring for an example.
    """
    probs = _check_problems(problems)
    opts = _choices(FULL["optimizers"] if optimizers is None else optimizers,
                    parse_optimizer, "optimizers")
    scheds = _choices(FULL["schedules"] if schedules is None else schedules,
                      parse_schedule, "schedules")
    grid = _check_lrs(FULL["lrs"] if lrs is None else lrs)
    seed_list = _check_seeds(FULL["seeds"] if seeds is None else seeds)
    if not isinstance(reference, bool):
        raise TypeError(f"reference must be True or False, got {reference!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if reference:
        for name in probs:
            if PROBLEMS[name].framework == "torch":
                import torch

                for o in opts:
                    if getattr(torch.optim, o.name, None) is None:
                        raise ValueError(f"{name} with reference=True runs torch.optim's "
                                         f"classes, and torch.optim has no {o.name}")

    tasks = [(p, o, s, lr, seed, reference) for p in probs for o in opts for s in scheds
             for lr in grid for seed in seed_list]
    bar = _Progress(len(tasks), progress)
    results: list = []
    if jobs == 1:
        for task in tasks:
            results.append(_run_task(task))
            bar.advance()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker, never a fork of a process whose OpenMP or
        # torch threads are running
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                 initializer=_worker_init) as pool:
            chunk = max(1, min(16, len(tasks) // (4 * jobs)))
            for result in pool.map(_run_task, tasks, chunksize=chunk):
                results.append(result)
                bar.advance()
    return Comparison(probs, [o.label for o in opts], [s.label for s in scheds], grid,
                      seed_list, reference, results, summarize(results))


def default_jobs() -> int:
    """Worker processes for the command line: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

