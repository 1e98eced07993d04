"""The ``bench`` command line: list, run, leaderboard, coverage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import methods
import tasks
from bench.config import ConfigError
from bench.registry import UnknownNameError

EPILOG = "Overrides are key=value pairs on the typed config, e.g. method.rho=0.1 task.n=2000 train.lr=1e-3."


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (inclusive) or a mix: ``0-2,7``."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds needs distinct non-negative integers, got {text!r}")
    return seeds


def select_methods(text: str, task: str) -> list[str]:
    """``all`` (every method whose loss the task runs) or a comma list of registered names."""
    spec = tasks.get(task)
    if text == "all":
        return [n for n in methods.names() if methods.get(n).loss in spec.losses]
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    for name in chosen:
        methods.get(name)
    return chosen


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    if args.what == "methods":
        rows = []
        for name in methods.names():
            m = methods.get(name)
            k = m.knob
            knob = f"{k.name}={k.default:g} in [{k.low:g}, {k.high:g}]" if k else "-"
            robust = "-" if not k else ("larger" if k.larger_is_more_robust else "smaller")
            rows.append([name, m.loss, m.aggregator.name, knob, robust, m.reference])
        print(
            tabulate(
                rows, ["method", "loss", "ambiguity set", "radius knob", "more robust when", "reference"]
            )
        )
    elif args.what == "tasks":
        rows = [[s.name, s.trainer, s.needs, s.description] for s in map(tasks.get, tasks.names())]
        print(tabulate(rows, ["task", "loop", "needs", "what"]))
    else:
        rows = [[a.name, a.kind, a.knob.name if a.knob else "-", a.description] for a in methods.AGGREGATORS]
        print(tabulate(rows, ["ambiguity set", "kind", "knob", "what"]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench.config import config_hash
    from bench.launch import launch
    from bench.leaderboard import failures, format_leaderboard, leaderboard, records_frame
    from bench.runner import Cell

    names = select_methods(args.methods, args.task)
    cells = [Cell(args.task, m, s, tuple(args.overrides)) for m in names for s in args.seeds]
    for cell in cells:  # fail before anything runs: every config must build
        cell.config()
    root = Path(args.results)
    start = time.perf_counter()
    report = launch(cells, root, cluster=args.cluster, workers=args.workers, progress=not args.quiet)
    wall = time.perf_counter() - start
    print(
        f"{len(report.submitted)} cells run, {len(report.skipped)} skipped (already completed) "
        f"in {wall:.1f} s on cluster={args.cluster}"
    )
    for err in report.job_errors:
        print(f"job failure: {err}", file=sys.stderr)
    wanted = {(c.method, config_hash(c.config())) for c in cells}
    frame = records_frame(root, args.task)
    frame = frame[[(m, h) in wanted for m, h in zip(frame.method, frame.config_hash, strict=True)]]
    print(format_leaderboard(leaderboard(frame)))
    failed = failures(frame)
    if not failed.empty:
        print(f"\n{len(failed)} failed cells (not ranked):")
        print(failed.to_markdown(index=False))
        return 1
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.leaderboard import failures, format_leaderboard, leaderboard, records_frame

    frame = records_frame(Path(args.results), args.task)
    print(format_leaderboard(leaderboard(frame)))
    failed = failures(frame)
    if not failed.empty:
        print(f"\n{len(failed)} failed cells (not ranked):")
        print(failed.to_markdown(index=False))
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from bench.coverage import load_study, run_study

    study = load_study(Path(args.sweep), args.overrides)
    result = run_study(study, Path(args.results))
    print(result.table)
    print(f"\ntrials, slopes and this table are in {result.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark harness for distributionally robust preference alignment.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered methods, tasks or ambiguity sets")
    p.add_argument("what", choices=["methods", "tasks", "aggregators"])
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("run", help="train and evaluate a grid of methods x seeds on a task", epilog=EPILOG)
    p.add_argument("--task", default="lexicon", help="task name (bench list tasks); default: lexicon")
    p.add_argument("--methods", default="all", help="'all' or a comma list (bench list methods)")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="e.g. 0,1,2 or 0-4; default: 0")
    p.add_argument(
        "--cluster",
        default="local",
        choices=["debug", "local"],
        help="debug: in process; local: subprocesses capped to the cores (default)",
    )
    p.add_argument("--workers", type=int, default=0, help="parallel jobs (default: number of cores)")
    p.add_argument("--results", default="results", help="results folder (default: results)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("leaderboard", help="print the leaderboard of the records under --results")
    p.add_argument("--task", default=None)
    p.add_argument("--results", default="results")
    p.set_defaults(fn=cmd_leaderboard)

    p = sub.add_parser("coverage", help="the radius-coverage study on the linear task", epilog=EPILOG)
    p.add_argument("--sweep", default="sweeps/radius-coverage.yaml")
    p.add_argument("--results", default="results")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_coverage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (UnknownNameError, ConfigError, FileNotFoundError) as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
