"""How much each speed target's statistic moves between runs: the data behind the spreads in
``lrfast/_bench/spread.py`` (see ``lrfast/_bench/verdicts.py`` for how a verdict uses them).

Run the bench several times on one machine, minutes apart, keeping the JSON of each:

    for i in 1 2 3 4 5 6 7 8; do python -m lrfast bench --quick --json q$i.json; done
    python -m lrfast bench --json full1.json; python -m lrfast bench --json full2.json
    python bench/target_spread.py q*.json full*.json                # print
    python bench/target_spread.py q*.json full*.json --write        # into lrfast/_bench/spread.py

For every target part it prints the median each run measured (the centre of that run's
interval) and their max/min. A part's spread is its max/min, at least MIN_SPREAD, when at least
MIN_RUNS runs measured it; a family's spread (used by parts measured in fewer runs) is the
largest of its parts'. A run that did not measure a part (a skipped peer) is left out of it.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
from collections import defaultdict

from lrfast._bench.targets import TARGETS

MIN_RUNS = 5
MIN_SPREAD = 1.1
# The generated module, in the checkout this script belongs to.
SPREAD_MODULE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              os.pardir, "lrfast", "_bench", "spread.py"))


def load(paths):
    """{part key: [median per run]} over the runs, and the machine of the first run."""
    by_name = {t.name: t for t in TARGETS}
    values = defaultdict(list)
    machine = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine", {}).get("cpu")
        for row in data["targets"]:
            target = by_name.get(row["name"])
            if target is None or len(row.get("parts", ())) != len(target.parts):
                continue          # a target this lrfast no longer has, or an older file
            for part, got in zip(target.parts, row["parts"]):
                if "value" in got:
                    values[part.key].append(got["value"])
    return values, machine


def spreads(values):
    """({part key: spread}, {family: spread}) from the per-run values."""
    family_of = {p.key: p.family for t in TARGETS for p in t.parts}
    parts, families = {}, {}
    for key, vals in values.items():
        if len(vals) < MIN_RUNS or min(vals) <= 0:
            continue
        s = max(MIN_SPREAD, math.ceil(100 * max(vals) / min(vals)) / 100)
        parts[key] = s
        fam = family_of[key]
        families[fam] = max(families.get(fam, MIN_SPREAD), s)
    for fam in set(family_of.values()) - set(families):
        families[fam] = max(families.values(), default=2.0)
    return parts, families


def render(parts, families, runs, machine):
    today = datetime.date.today().isoformat()
    lines = [
        '"""Between-run spreads of the bench targets\' statistics (written by',
        'bench/target_spread.py; regenerate it there rather than editing it)."""',
        f"# {runs} runs of python -m lrfast bench on {machine or platform.machine()}, {today}.",
        "# PARTS: a part's max/min over the runs (at least "
        f"{MIN_SPREAD}), for parts measured in >= {MIN_RUNS} runs.",
        "# FAMILIES: the largest spread of a family's parts, for parts measured in fewer.",
        "PARTS = {",
    ]
    lines += [f"    {k!r}: {v:.2f}," for k, v in sorted(parts.items())]
    lines += ["}", "FAMILIES = {"]
    lines += [f"    {k!r}: {v:.2f}," for k, v in sorted(families.items())]
    lines += ["}", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by python -m lrfast bench --json")
    ap.add_argument("--write", metavar="PY", nargs="?", const=SPREAD_MODULE,
                    help="write the spreads as this Python module (without PY: "
                         "lrfast/_bench/spread.py in this checkout)")
    args = ap.parse_args(argv)
    values, machine = load(args.runs)
    if not values:
        print("no target parts in these files (written by an older lrfast?)", file=sys.stderr)
        return 1
    parts, families = spreads(values)
    print(f"{len(args.runs)} runs on {machine}")
    print(f"{'max/min':>7} {'runs':>4}  {'medians':<44} part")
    for key, vals in sorted(values.items()):
        ratio = max(vals) / min(vals) if min(vals) > 0 else float("inf")
        shown = " ".join(f"{v:.3g}" for v in vals)
        print(f"{ratio:>7.2f} {len(vals):>4}  {shown[:44]:<44} {key}")
    print("\nfamilies (for parts measured in fewer than %d runs):" % MIN_RUNS)
    for fam, s in sorted(families.items()):
        print(f"  {fam:<13} {s:.2f}")
    if args.write:
        with open(args.write, "w") as f:
            f.write(render(parts, families, len(args.runs), machine))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
