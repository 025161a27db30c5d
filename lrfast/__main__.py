"""Command line: ``python -m lrfast {demo,config,plot,bench,compare}``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lrfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the seeds' linear regression with each optimizer")
    demo.add_argument("--steps", type=int, default=None,
                      help="gradient steps (default 1000; 200 with --torch)")
    demo.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    demo.add_argument("--torch", action="store_true",
                      help="instead: train a small torch transformer with lrfast.torch.AdamW "
                           "and a warmup-cosine schedule, timed against torch.optim.AdamW "
                           "(default 200 steps)")
    demo.add_argument("--embeddings", action="store_true",
                      help="instead: train a small recommender (an embedding bag and an MLP) "
                           "with lrfast.SparseAdam and lrfast.Adam, and the same in torch "
                           "(default 300 steps)")
    sub.add_parser("config", help="print build and runtime configuration")
    plot = sub.add_parser(
        "plot", help="draw learning-rate schedules into an image (needs matplotlib)",
        description="Draw schedules over steps 0..N-1. A SPEC is a call expression such as "
                    "'warmup_cosine(0.0, 0.1, 100, 1000)' or 'cosine_decay(0.1, 500) * 0.5' "
                    "(schedule functions, constants, lists, keywords and '*'; read safely, "
                    "never eval'd), a JSON object from Schedule.to_dict(), or a .json file "
                    "holding one such object or a list of them.")
    plot.add_argument("specs", nargs="+", metavar="SPEC", help="schedule to draw")
    plot.add_argument("--steps", type=int, default=1000, help="steps 0..N-1 (default 1000)")
    plot.add_argument("-o", "--output", default="schedule.png",
                      help="image file; format from the suffix (default schedule.png)")
    plot.add_argument("--log", action="store_true", help="logarithmic learning-rate axis")
    bench = sub.add_parser(
        "bench", help="time optimizer steps and schedules against NumPy, torch and optax",
        description="Time lrfast's optimizer steps and schedules against the NumPy reference, "
                    "torch.optim (for-loop, foreach, fused) and optax under jax.jit, on the same "
                    "data in one process, and compare with a memory-bandwidth floor. Missing "
                    "peers are reported as skipped.")
    from ._bench.cli import add_arguments as bench_arguments

    bench_arguments(bench)
    compare = sub.add_parser(
        "compare", help="which optimizer and schedule reach a target loss first",
        description="Train small built-in problems with every optimizer x schedule x learning "
                    "rate x seed; rank by median steps to each problem's target, with the best "
                    "rate, its spread over seeds, how wide the good rate range is and how often "
                    "runs diverged. Every optimizer gets the same rate grid and seeds.")
    from .comparison.cli import add_arguments as compare_arguments

    compare_arguments(compare)
    args = parser.parse_args(argv)
    if args.command == "compare":
        from .comparison.cli import main as compare_main

        return compare_main(args)
    if args.command == "bench":
        from ._bench.cli import main as bench_main

        return bench_main(args)
    if args.command == "plot":
        from ._plot import main as plot_main

        return plot_main(args.specs, steps=args.steps, output=args.output, log=args.log)
    if args.command == "demo":
        if args.steps is not None and args.steps < 1:
            parser.error("--steps must be at least 1")
        if args.embeddings and args.torch:
            parser.error("--embeddings and --torch are separate demos: give one")
        if args.embeddings:
            from .demo_embeddings import main as embeddings_demo_main

            return embeddings_demo_main(steps=args.steps or 300)
        if args.torch:
            from .demo_torch import main as torch_demo_main

            return torch_demo_main(steps=args.steps or 200)
        from .demo import main as demo_main

        return demo_main(steps=args.steps or 1000, seed=args.seed)
    from ._config import show_config

    show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())
