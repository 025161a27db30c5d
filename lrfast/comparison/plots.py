"""Figures of a comparison (matplotlib): per problem, the loss curves and the rate sensitivity.

Left panel: for each optimizer and schedule at its best rate, the median loss over the seeds at
each evaluation, with a band from the lowest to the highest seed (log scale), and the target as
a dashed line. Right panel: the median final loss over the seeds at each rate of the grid
(log-log; a rate whose runs diverged has no point), the same target line: the width of the
valley is how forgiving the optimizer is about its rate.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .problems import PROBLEMS

__all__ = ["plot_comparison"]


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(runs):
    """(steps, median, low, high) over the seeds' curves, up to the shortest (a diverged run
    stops early; its missing points count as infinite)."""
    length = max(len(r.curve) for r in runs)
    steps = max((r.curve for r in runs), key=len)
    losses = np.full((len(runs), length), np.inf)
    for i, r in enumerate(runs):
        losses[i, :len(r.curve)] = [v for _, v in r.curve]
    losses[~np.isfinite(losses)] = np.inf
    return (np.array([s for s, _ in steps]), np.median(losses, axis=0),
            losses.min(axis=0), losses.max(axis=0))


def plot_comparison(comparison, folder: str) -> list[str]:
    """One PNG per problem in ``folder``: ``compare-<problem>.png``. Returns the paths."""
    plt = _matplotlib()
    os.makedirs(folder, exist_ok=True)
    paths = []
    for problem in comparison.problems:
        prob = PROBLEMS[problem]
        rows = [r for r in comparison.rows if r.problem == problem]
        fig, (ax_curve, ax_lr) = plt.subplots(1, 2, figsize=(13, 5))
        for row in rows:
            label = f"{row.rank}. {row.optimizer}, {row.schedule}"
            runs = [r for r in comparison.runs if r.problem == problem and
                    r.optimizer == row.optimizer and r.schedule == row.schedule]
            best = [r for r in runs if r.lr == row.best_lr]
            steps, med, low, high = _curves(best)
            shown = np.isfinite(med)
            line, = ax_curve.plot(steps[shown], med[shown], label=f"{label} (lr {row.best_lr:g})")
            band = np.isfinite(high)
            ax_curve.fill_between(steps[band], low[band], high[band], color=line.get_color(),
                                  alpha=0.15, linewidth=0)
            finals = [(e["lr"], e["median_final_loss"]) for e in row.per_lr]
            xs = [lr for lr, v in finals if math.isfinite(v)]
            ys = [v for _, v in finals if math.isfinite(v)]
            ax_lr.plot(xs, ys, "o-", color=line.get_color(), label=label, markersize=4)
        for ax in (ax_curve, ax_lr):
            ax.axhline(prob.target, color="black", linestyle="--", linewidth=0.8,
                       label="target")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel(f"training loss (median and range over {len(comparison.seeds)} "
                            f"seeds)")
        ax_curve.set_title(f"{problem}: loss at each one's best rate")
        ax_lr.set_xscale("log")
        ax_lr.set_xlabel("learning rate")
        ax_lr.set_ylabel(f"median final loss after {prob.budget} steps")
        ax_lr.set_title("sensitivity to the rate (diverged: no point)")
        ax_curve.legend(fontsize=7, loc="upper right")
        fig.suptitle(prob.title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(folder, f"compare-{problem}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
