"""From runs to the comparison table: per problem, optimizer and schedule, the best rate and how
reliably and how soon it reaches the target.

For each (problem, optimizer, schedule) every rate of the grid was run from every seed. Per
rate: the median steps to target over the seeds (a seed that never reached it counts as
infinitely many, so a rate whose median is finite reached the target in at least half of its
seeds), how many seeds reached it, how many diverged, the median final loss. The best rate is
the one with the fewest median steps to target, ties (and rates that never reach it) broken by
the median final loss. The good range is the set of grid rates whose median steps are within
:data:`GOOD_FACTOR` times the best's, given as its lowest and highest rate and its width in
decades: a wide range means the optimizer is forgiving about its rate. Rows are ranked within a
problem by the best rate's median steps, then its median final loss.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

__all__ = ["Row", "summarize", "format_table", "GOOD_FACTOR"]

GOOD_FACTOR = 1.5


@dataclass
class Row:
    """One (problem, optimizer, schedule): its best rate and what it measured there."""

    problem: str
    optimizer: str
    schedule: str
    rank: int
    best_lr: float
    median_steps: Optional[float]
    steps_min: Optional[int]
    steps_max: Optional[int]
    reached: int
    seeds: int
    median_seconds: Optional[float]
    median_final_loss: float
    final_loss_spread: float
    good_lr_low: Optional[float]
    good_lr_high: Optional[float]
    good_lr_decades: Optional[float]
    diverged_runs: int
    runs: int
    per_lr: list

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("median_final_loss", "final_loss_spread"):
            d[key] = d[key] if math.isfinite(d[key]) else str(d[key])
        for entry in d["per_lr"]:
            for key, v in entry.items():
                if isinstance(v, float) and not math.isfinite(v):
                    entry[key] = str(v)
        return d


def _median(values) -> float:
    return float(np.median(values)) if len(values) else math.nan


def _per_lr(runs) -> dict:
    steps = [r.steps_to_target if r.steps_to_target is not None else math.inf for r in runs]
    finals = [r.final_loss for r in runs]
    reached = [r for r in runs if r.steps_to_target is not None]
    return dict(lr=runs[0].lr, median_steps=_median(steps),
                reached=len(reached), seeds=len(runs),
                diverged=sum(r.diverged for r in runs),
                median_final_loss=_median(finals),
                median_seconds=_median([r.seconds_to_target for r in reached]) if reached
                else None,
                steps=[r.steps_to_target for r in runs],
                final_losses=finals)


def _key(entry):
    final = entry["median_final_loss"]
    return (entry["median_steps"], final if not math.isnan(final) else math.inf)


def summarize(runs) -> list[Row]:
    """The table's rows, ranked within each problem (see the module's docstring)."""
    groups: dict[tuple, dict[float, list]] = {}
    for r in runs:
        groups.setdefault((r.problem, r.optimizer, r.schedule), {}).setdefault(r.lr, []).append(r)
    rows: list[Row] = []
    for (problem, optimizer, schedule), by_lr in groups.items():
        entries = [_per_lr(sorted(rs, key=lambda r: r.seed)) for _, rs in sorted(by_lr.items())]
        best = min(entries, key=_key)
        reached_steps = [s for s in best["steps"] if s is not None]
        good = ([e["lr"] for e in entries if e["median_steps"] <= GOOD_FACTOR
                 * best["median_steps"]] if math.isfinite(best["median_steps"]) else [])
        finals = np.asarray(best["final_losses"], dtype=float)
        spread = (float(finals.max() - finals.min()) if np.all(np.isfinite(finals))
                  else math.inf)
        rows.append(Row(
            problem, optimizer, schedule, 0, best["lr"],
            best["median_steps"] if math.isfinite(best["median_steps"]) else None,
            min(reached_steps) if reached_steps else None,
            max(reached_steps) if reached_steps else None,
            best["reached"], best["seeds"], best["median_seconds"],
            best["median_final_loss"], spread,
            min(good) if good else None, max(good) if good else None,
            math.log10(max(good) / min(good)) if good else None,
            sum(e["diverged"] for e in entries), sum(e["seeds"] for e in entries),
            [{k: v for k, v in e.items() if k != "final_losses"} for e in entries]))
    ranked: list[Row] = []
    for problem in dict.fromkeys(r.problem for r in rows):
        mine = [r for r in rows if r.problem == problem]
        mine.sort(key=lambda r: (r.median_steps if r.median_steps is not None else math.inf,
                                 r.median_final_loss if not math.isnan(r.median_final_loss)
                                 else math.inf))
        for i, r in enumerate(mine, 1):
            r.rank = i
        ranked += mine
    return ranked


def _g(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}"


def format_table(rows, problems: dict, lrs, seeds, reference=False) -> str:
    """The plain-text table: one block per problem."""
    out = []
    budget_line = (f"Each optimizer x schedule had the same tuning budget: {len(lrs)} learning "
                   f"rate{'s' * (len(lrs) != 1)} ({_g(min(lrs))} .. {_g(max(lrs))}) x "
                   f"{len(seeds)} seed{'s' * (len(seeds) != 1)} "
                   f"({', '.join(map(str, seeds))}); best rate = fewest median steps to the "
                   f"target; good range = rates within {GOOD_FACTOR}x of the best's steps.")
    if reference:
        budget_line += " Updates by lrfast.reference (NumPy), not the compiled kernels."
    out.append(budget_line)
    headers = ("rank", "optimizer", "schedule", "best lr", "steps to target",
               "reached", "ms to target", "final loss", "good lr range", "diverged")
    for problem in dict.fromkeys(r.problem for r in rows):
        p = problems[problem]
        out.append("")
        out.append(f"{problem}: {p.title}; target loss {_g(p.target, 4)} within {p.budget} "
                   f"steps (loss evaluated every {p.eval_every})")
        table = [headers]
        for r in (r for r in rows if r.problem == problem):
            steps = ("not reached" if r.median_steps is None else
                     f"{r.median_steps:g} [{r.steps_min}-{r.steps_max}]")
            good = ("-" if r.good_lr_low is None else
                    f"{_g(r.good_lr_low)}-{_g(r.good_lr_high)} ({r.good_lr_decades:.1f} dec)")
            ms = None if r.median_seconds is None else 1e3 * r.median_seconds
            table.append((str(r.rank), r.optimizer, r.schedule, _g(r.best_lr), steps,
                          f"{r.reached}/{r.seeds}", _g(ms), _g(r.median_final_loss, 4), good,
                          f"{r.diverged_runs}/{r.runs}"))
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        for i, row in enumerate(table):
            out.append("  ".join(c.ljust(w) if j in (1, 2) else c.rjust(w)
                                 for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
