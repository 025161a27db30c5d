"""Command line: ``python -m lrfast {demo,config}``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lrfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the seeds' linear regression with each optimizer")
    demo.add_argument("--steps", type=int, default=1000, help="gradient steps (default 1000)")
    demo.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    sub.add_parser("config", help="print build and runtime configuration")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be at least 1")
        from .demo import main as demo_main

        return demo_main(steps=args.steps, seed=args.seed)
    from ._config import show_config

    show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())
