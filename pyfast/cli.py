"""The `pyfast` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _bench(sub):
    from pyfast.bench.report import SUITES

    p = sub.add_parser("bench", help="time pyfast's kernels against stock PyTorch, side by side")
    p.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=[*SUITES, "all"],
        help="which kernel family to run (default: all)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--output", default="results/bench", help="folder for results.json/.md/.png")
    p.add_argument(
        "--size",
        default="all",
        choices=["small", "smollm2-135m", "all"],
        help="optimizer parameter set (default: both)",
    )
    p.add_argument("--rounds", type=int, default=7, help="timed repetitions per provider")

    def run(args):
        from pyfast.bench.report import run_bench

        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        run_bench(args)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfast", description="Fine-tune, align and evaluate bespoke LLMs on fused kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        print(f"pyfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyfast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
