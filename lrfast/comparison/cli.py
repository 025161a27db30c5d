"""``python -m lrfast compare``: the command line of :func:`lrfast.compare`."""
from __future__ import annotations

import argparse
import sys

from . import FULL, QUICK, SCHEDULES, compare, default_jobs, log_grid
from .problems import PROBLEMS


def _lrs(text: str) -> list[float]:
    """``0.001,0.01,0.1`` or ``LOW:HIGH:COUNT`` (a log grid)."""
    try:
        if ":" in text:
            low, high, count = text.split(":")
            return log_grid(float(low), float(high), int(count))
        return [float(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give rates as 0.001,0.01,0.1 or a log grid LOW:HIGH:COUNT ({e})") from None


def _seeds(text: str):
    try:
        if "," in text:
            return [int(v) for v in text.split(",")]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a count (3) or seeds (0,1,2)") from None


def _names(values) -> str:
    return ", ".join(map(str, values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the quick comparison: problems " + _names(QUICK["problems"])
                             + "; optimizers " + _names(QUICK["optimizers"])
                             + "; schedules " + _names(QUICK["schedules"])
                             + f"; {len(QUICK['lrs'])} rates; {len(QUICK['seeds'])} seeds "
                               "(options given beside it replace its choices)")
    parser.add_argument("--problems", nargs="+", metavar="NAME",
                        help="problems to run (default: every one installed): "
                             + ", ".join(PROBLEMS))
    parser.add_argument("--optimizers", nargs="+", metavar="OPT",
                        help="optimizers, as 'Adam' or 'SGD(momentum=0.9)' (default: "
                             + _names(FULL["optimizers"]) + ")")
    parser.add_argument("--schedules", nargs="+", metavar="SCHED",
                        help="schedule shapes scaled by each rate: "
                             + ", ".join(SCHEDULES) + ", or a schedule expression whose values "
                             "multiply the rate, e.g. 'cosine_decay(1.0, 300)' (default: "
                             + _names(FULL["schedules"]) + ")")
    parser.add_argument("--lrs", type=_lrs, metavar="RATES",
                        help="the rate grid, the same for every optimizer: 0.001,0.01,0.1 or "
                             "LOW:HIGH:COUNT, log-spaced (default 1e-4:1:9)")
    parser.add_argument("--seeds", type=_seeds, metavar="N|LIST",
                        help="seeds: a count or a list such as 0,1,2 (default 3)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: the cores available)")
    parser.add_argument("--reference", action="store_true",
                        help="run the updates with lrfast.reference (pure NumPy) instead of the "
                             "compiled kernels (torch problem: torch.optim), to show the runs "
                             "agree")
    parser.add_argument("--json", metavar="FILE",
                        help="also write every run and the table's rows as JSON ('-': stdout, "
                             "instead of the table)")
    parser.add_argument("--plot", metavar="FOLDER",
                        help="also draw each problem's loss curves and rate sensitivity into "
                             "FOLDER/compare-<problem>.png (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is drawn only when stderr is a terminal)")


def main(args) -> int:
    chosen = dict(QUICK) if args.quick else dict(FULL)
    for key in ("problems", "optimizers", "schedules", "lrs", "seeds"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    jobs = default_jobs() if args.jobs is None else args.jobs
    try:
        result = compare(**chosen, reference=args.reference, jobs=jobs,
                         progress=not args.no_progress and sys.stderr.isatty())
    except (ValueError, TypeError, ImportError) as e:
        print(f"python -m lrfast compare: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(result.to_json())
    else:
        print(result.table())
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(result.to_json())
            print(f"\nwrote {args.json}")
    if args.plot:
        try:
            paths = result.plot(args.plot)
        except ImportError as e:
            print(f"python -m lrfast compare: {e}", file=sys.stderr)
            return 2
        print("\n".join(f"drew {p}" for p in paths), file=sys.stderr if args.json == "-"
              else sys.stdout)
    return 0
