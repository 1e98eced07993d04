"""The ``bench`` command line: list, run, leaderboard, coverage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

import methods
import tasks
from bench.core.registry import UnknownNameError
from bench.loops.config import MAX_SEED, MAX_SEEDS, ConfigError
from tasks.hub import HubUnavailable

EPILOG = "Overrides are key=value pairs on the typed config, e.g. method.rho=0.1 task.n=2000 train.lr=1e-3."


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``bench run: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (inclusive) or a mix: ``0-2,7``; distinct, each in ``[0, 2**32)``, at most
    ``MAX_SEEDS`` of them (counted before a range is spelled out)."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, hi = _seed_range(part.strip(), text)
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(
                f"{text!r} makes more than {MAX_SEEDS} seeds, the most one run takes"
            )
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed more than once")
    return seeds


def _seed_range(part: str, text: str) -> tuple[int, int]:
    """``7`` as ``(7, 7)``, ``0-4`` as ``(0, 4)``: both ends integers in ``[0, 2**32)``, in order."""
    lo, dash, hi = part.partition("-")
    try:
        ends = (int(lo), int(hi) if dash else int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: seeds are non-negative integers or ranges with both ends, e.g. 0,1,2 or 0-4"
        ) from None
    if not all(0 <= end < MAX_SEED for end in ends):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be in [0, 2**32)")
    if ends[1] < ends[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: the range {part} is empty (it ends below its start)")
    return ends


def positive_seconds(text: str) -> float:
    """``--watch``: a refresh period in seconds, a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds > 0")
    return value


def workers_count(text: str) -> int:
    """``--workers``: 0 (one per core) or a positive number of parallel jobs."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"--workers takes 0 (one per core) or a positive integer, got {text!r}"
        )
    return value


TUNE_SEEDS = 2**32 // 1000  # each worker's sampler is seeded tune_seed * 1000 + its order, below 2**32


def tune_seed(text: str) -> int:
    """``--tune-seed``: an integer in [0, TUNE_SEEDS)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < TUNE_SEEDS:
        raise argparse.ArgumentTypeError(f"--tune-seed takes an integer in [0, {TUNE_SEEDS}), got {text!r}")
    return value


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


def split_list(text: str, where: str = "a list") -> list[str]:
    """The items of a comma-separated list; none at all is a ``ConfigError`` naming ``where``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{where} {text!r}: expected a comma-separated list, e.g. a,b")
    return items


def split_numbers(text: str, where: str, kind: type[int] | type[float]) -> list:
    """The items of a comma-separated list of ``kind`` (int or float), naming ``where`` if not."""
    items = split_list(text, where)
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ConfigError(f"{where} {text!r}: expected comma-separated {kind.__name__} values") from None


def results_folder(args: argparse.Namespace) -> Path:
    """``--results``, which must exist, after checking ``--task`` (when given) is a known task."""
    if args.task:
        try:
            tasks.get(args.task)
        except UnknownNameError as err:
            raise ConfigError(f"--task: {err}") from None
    root = Path(args.results)
    if not root.is_dir():
        raise ConfigError(f"--results {root}: the folder does not exist")
    return root


def build_sweep(args: argparse.Namespace):
    """The sweep of a ``bench run``: a sweep file and/or CLI axes (CLI axes win)."""

    from bench.harness.sweep import SweepConfig, adhoc_name, expand, load_sweep_config, resolve_path

    path = resolve_path(args.sweep) if args.sweep else None
    cfg = load_sweep_config(path) if path else SweepConfig(task=args.task or "lexicon")
    if args.task and path and args.task != cfg.task:
        raise ConfigError(f"--task {args.task} contradicts the sweep's task {cfg.task}")
    if args.methods:
        cfg.methods = ["all"] if args.methods == "all" else split_list(args.methods, "--methods")
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.radii:
        cfg.radii = {"*": split_numbers(args.radii, "--radii", float)}
    if args.scales:
        cfg.scales = split_numbers(args.scales, "--scales", int)
    if args.sizes:
        cfg.sizes = split_list(args.sizes, "--sizes")
    run_overrides = [o for o in args.overrides if not o.startswith("slurm.")]
    cfg.overrides = [*cfg.overrides, *run_overrides]
    cfg.slurm = _slurm_config(
        [o[len("slurm.") :] for o in args.overrides if o.startswith("slurm.")], cfg.slurm
    )
    sweep = expand(cfg, path.stem if path else "command line")
    if not path:
        sweep.name = adhoc_name(sweep.cells)
    return sweep


def cmd_run(args: argparse.Namespace) -> int:
    from bench.harness.launch import launch
    from bench.harness.leaderboard import (
        failures,
        format_leaderboard,
        leaderboard,
        load_records,
        records_frame,
    )
    from bench.harness.runner import record_path

    sweep = build_sweep(args)
    root = Path(args.results)
    start = time.perf_counter()
    report = launch(
        sweep.cells,
        root,
        name=sweep.name,
        cluster=args.cluster,
        workers=args.workers,
        slurm=sweep.config.slurm,
        progress=not args.quiet,
    )
    wall = time.perf_counter() - start
    if args.cluster == "slurm":
        print(
            f"sweep {sweep.name}: submitted {len(report.submitted)} cells as SLURM array jobs "
            f"{', '.join(sorted({j.split('_')[0] for j in report.job_ids})) or '-'}; "
            f"{len(report.skipped)} already completed, {len(report.in_flight)} still queued or running."
        )
        print(f"follow with: bench status --sweep {sweep.name} --results {args.results}")
        return 0
    ran = len(report.submitted) - report.taken_elsewhere
    elsewhere = len(report.in_flight) + report.taken_elsewhere
    print(
        f"{ran} cells run, {len(report.skipped)} skipped (already completed)"
        + (f", {elsewhere} left to another launcher" if elsewhere else "")
        + f" in {wall:.1f} s on cluster={args.cluster}"
    )
    for err in report.job_errors:
        print(f"job failure: {err}", file=sys.stderr)
    wanted = {(c.method, c.config_hash) for c in sweep.cells}
    frame = records_frame(load_records(root, sweep.cells[0].task))
    frame = frame[frame.apply(lambda r: (r.method, r.config_hash) in wanted, axis=1).astype(bool)]
    print(format_leaderboard(leaderboard(frame)))
    failed = failures(frame)
    if not failed.empty:
        print(f"\n{len(failed)} failed cells (not ranked):")
        print(failed.to_markdown(index=False))
    unrecorded = [c for c in sweep.cells if not record_path(c, root).exists()]
    if unrecorded and not elsewhere:  # e.g. every worker was killed
        print(
            f"\n{len(unrecorded)} cells left no record (their jobs died); bench status --sweep {sweep.name}"
        )
    return 1 if not failed.empty or (unrecorded and not elsewhere) else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.harness.plan import (
        PLAN_HEADERS,
        estimate,
        gpu_named,
        local_gpu,
        plan_table,
        sized_resources,
        slurm_gpu,
    )

    sweep = build_sweep(args)
    if args.gpu == "auto":
        gpu = local_gpu() or slurm_gpu(sweep.config.slurm)
    else:
        gpu = gpu_named(args.gpu, args.gpu_mem)
    estimates = [estimate(c, gpu) for c in sweep.cells]
    print(f"plan of {len(sweep.cells)} cells on {gpu.name} ({gpu.memory_gb:.0f} GB); estimates, not measured")
    print(tabulate(plan_table(estimates), PLAN_HEADERS, disable_numparse=True))
    s = sized_resources(sweep.cells, sweep.config.slurm)
    print(
        f"\nSLURM resources per array task (--cluster slurm): {s.gpus_per_task} GPU, {s.cpus_per_task} CPUs, "
        f"{s.mem_gb:g} GB host memory, {s.time_min} min; override with slurm.KEY=VALUE"
    )
    bad = [e for e in estimates if not e.fits]
    if bad:
        print(f"{len(bad)} cells do not fit; `bench run` refuses them before submitting anything")
    return 1 if bad else 0


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def status_screen(root: Path, names: list[str]) -> tuple[str, bool]:
    """The status of each sweep: counts, then a row per open cell with its live progress (from the
    cell's ``metrics.jsonl``: iteration of the total, latest validation worst case, s/iteration,
    ETA); and whether any cell is still running or pending."""
    from collections import Counter

    from tabulate import tabulate

    from bench.harness.launch import sweep_cells
    from bench.loops.monitor import progress

    lines, open_cells = [], False
    for name in names:
        cells, status_of = sweep_cells(root, name)
        # progress before status: a cell that moves on in between shows as finished, not as stale
        rows = [(cell, live, *status_of(cell)) for cell in cells for live in [progress(cell.run_dir(root))]]
        counts = Counter(status for _, _, status, _ in rows)
        order = ("completed", "running", "pending", "failed", "missing")
        lines.append(f"sweep {name}: " + ", ".join(f"{counts[s]} {s}" for s in order))
        open_cells |= counts["running"] + counts["pending"] > 0
        table = []
        for cell, live, status, reason in rows:
            if status == "completed":
                continue
            if live is None:
                table.append([cell.label(), status, "", "", "", "", reason])
                continue
            worst = live["val_worst_case"]
            table.append(
                [
                    cell.label(),
                    status,
                    f"{live['iteration']}/{live['iterations']}",
                    "-" if worst is None else f"{worst:.4f} @{live['eval_iteration']}",
                    "-" if live["s_per_iteration"] is None else f"{live['s_per_iteration']:.2f}",
                    duration(live["eta_s"]) if status == "running" else "-",
                    reason,
                ]
            )
        if table:
            header = ["cell", "status", "iteration", "val worst case", "s/it", "ETA", "reason"]
            lines.append(tabulate(table, header))
    return "\n".join(lines), open_cells


def cmd_status(args: argparse.Namespace) -> int:
    import time

    root = Path(args.results)
    names = [args.sweep] if args.sweep else sorted(p.name for p in (root / ".sweeps").glob("*"))
    if not names:
        print(f"no launched sweeps under {root}")
        return 0
    while True:
        screen, open_cells = status_screen(root, names)
        if args.watch is None:
            print(screen)
            return 0
        title = f"{time.strftime('%H:%M:%S')}  bench status --watch {args.watch:g} (Ctrl-C to leave)"
        print(f"\x1b[H\x1b[2J{title}\n{screen}", flush=True)
        if not open_cells:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.harness.launch import launch
    from bench.harness.leaderboard import format_leaderboard, leaderboard, load_records, records_frame
    from bench.harness.sweep import method_names, resolve_path
    from bench.harness.tune import (
        TuneSpec,
        at_edge,
        check_space,
        dashboard_command,
        load_space,
        run_studies,
        storage_url,
        strength_space,
        trial_cell,
        tuning_tags,
    )
    from bench.loops.config import build_config, config_hash, to_dict

    requested = ["all"] if args.methods == "all" else split_list(args.methods)
    names = method_names(args.task, requested, "--methods")
    run_overrides = [o for o in args.overrides if not o.startswith("slurm.")]
    space_file = resolve_path(args.space) if args.space else None
    space = load_space(space_file)
    results = Path(args.results).resolve()
    specs = []
    for name in names:
        method = methods.get(name)
        base = build_config(args.task, name, run_overrides, args.tune_seed)  # fails fast on bad input
        check_space(space, space_file, args.task, name, args.tune_seed)
        strength = strength_space(name, to_dict(base)["method"]) if args.strength else ()
        own = (*(s for s in strength if s[0] not in dict(space)), *space)  # --space wins
        if method.knob is None and not own:
            raise ConfigError(
                f"{name} has no radius knob; tune its strength with --strength, or pick a robust method: "
                + ", ".join(n for n in methods.names() if methods.get(n).knob)
            )
        study = f"{args.task}-{name}-{config_hash(base)}" + ("-strength" if args.strength else "")
        if args.study:
            study = args.study if len(names) == 1 else f"{args.study}-{name}"
        url = storage_url(args.storage, results, study)
        specs.append(
            TuneSpec(
                args.task,
                name,
                study,
                url,
                str(results),
                tuple(run_overrides),
                own,
                args.pruner,
                args.tune_seed,
            )
        )
    slurm = _slurm_config([o[len("slurm.") :] for o in args.overrides if o.startswith("slurm.")])
    found = run_studies(specs, args.trials, args.workers, args.cluster, slurm=slurm)
    tested = []
    for result in found:
        spec, knob = result.spec, methods.get(result.spec.method).knob
        print(
            f"study {spec.study} ({spec.storage}): {len(result.table)} trials"
            + (f", {result.recovered} interrupted trials re-queued" if result.recovered else "")
            + f", {result.ran} run now; watch it with {dashboard_command(spec.storage)}"
        )
        if len(found) == 1:
            shown = result.table.rename(columns={"radius": knob.name} if knob else {}).dropna(
                axis=1, how="all"
            )
            print(tabulate(shown, headers="keys", showindex=False, floatfmt=".4g"))
        if result.best_params is None:
            print(f"  no trial completed; see {spec.folder / 'trials.csv'}")
            continue
        best = ", ".join(
            f"{knob.name if k == 'radius' else k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.best_params.items()
        )
        print(f"  best {spec.method}: {best}  (validation worst case {result.best_value:.4f})")
        edge = at_edge(spec, result.best_params)
        if edge:
            print(f"  {', '.join(edge)} at the edge of the searched range: widen it with --space")
        tested.append(result)
    print(f"trials.csv, history.png and objective_vs_*.png are in {results / 'tune'}/<study>/")
    if not args.then_test:
        return 0 if len(tested) == len(found) else 1
    cells = [
        trial_cell(r.spec, r.best_params, seed, tuning_tags(r, args.trials))
        for r in tested
        for seed in args.seeds or [0]
    ]
    name = f"tuned-{specs[0].study}" if len(specs) == 1 else f"tuned-{args.task}-{args.study or 'methods'}"
    report = launch(cells, results, name=name, cluster=args.cluster, slurm=slurm, progress=not args.quiet)
    if args.cluster == "slurm":
        print(f"submitted {len(report.submitted)} test cells; bench status --sweep {name}")
        return 0
    wanted = {c.config_hash for c in cells}
    frame = records_frame(load_records(results, args.task))
    print(format_leaderboard(leaderboard(frame[frame.config_hash.isin(wanted)])))
    return 0 if len(tested) == len(found) else 1


def _slurm_config(overrides: list[str], base=None):
    """SLURM resources: ``base`` (a sweep's section, or the defaults) with ``KEY=VALUE`` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from bench.harness.sweep import SlurmConfig

    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(base or SlurmConfig()), OmegaConf.from_dotlist(overrides)
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"slurm overrides: {str(err).splitlines()[0]}") from None


def cmd_report(args: argparse.Namespace) -> int:
    from bench.harness.report import refresh_readme, write_reports

    out = Path(args.out) if args.out else Path(args.results) / "reports"
    reports = write_reports(results_folder(args), out, args.task, args.sweep, figures=not args.no_figures)
    if not reports:
        print(f"no run records under {args.results}" + (f" for task {args.task}" if args.task else ""))
        return 1
    for rep in reports:
        if rep.markdown:
            print(f"## {rep.task}\n\n{rep.markdown}\n")
        if not rep.failed.empty:
            print(f"{len(rep.failed)} failed or incomplete cells (not ranked):")
            print(rep.failed.to_markdown(index=False) + "\n")
        print("wrote " + ", ".join(str(p) for p in rep.files) + "\n")
    if args.readme:
        refresh_readme(Path(args.readme_path), reports)
        print(f"refreshed the results section of {args.readme_path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from bench.loops.config import build_config

    spec = tasks.get(args.task)
    if not spec.preparer:
        prepared = ", ".join(n for n in tasks.names() if tasks.get(n).preparer)
        raise ConfigError(f"task {args.task} has no preparation stage; tasks with one: {prepared}")
    from bench.harness.launch import prepare_job

    overrides = [o for o in args.overrides if not o.startswith("slurm.")]
    build_config(args.task, "rebel", overrides)  # bad overrides fail here, before any job starts
    slurm = _slurm_config([o[len("slurm.") :] for o in args.overrides if o.startswith("slurm.")])
    print(
        f"prepared {args.task}: {prepare_job(args.task, overrides, args.cluster, Path(args.results), slurm)}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.harness.leaderboard import load_records
    from bench.harness.records import write_json_atomic
    from bench.loops.capability import install_task_modules, lmeval_scores, require_task_modules

    names = split_list(args.tasks, "--tasks")
    if args.install:
        install_task_modules(names)
    require_task_modules(names)
    chat_template = {"auto": None, "on": True, "off": False}[args.chat_template]
    records = [
        r
        for r in load_records(Path(args.results), args.task)
        if r.get("status") == "completed" and (not args.method or r.get("method") == args.method)
    ]
    done = 0
    for rec in records:
        folder = Path(rec["path"]).parent / "policy"
        if not folder.exists():
            print(f"skip {rec['path']}: no saved policy (train with train.save_model=true)")
            continue
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        scores = lmeval_scores(model, tok, names, limit=args.limit, chat_template=chat_template)
        path = Path(rec.pop("path"))
        rec["capabilities"] = {**rec.get("capabilities", {}), **scores}
        write_json_atomic(path, rec)
        print(f"{path}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        done += 1
    print(f"{done} records scored with lm-eval ({', '.join(names)})")
    return 0 if done else 1


def cmd_perf(args: argparse.Namespace) -> int:
    from bench.studies.perf import PerfConfig, run

    cfg = PerfConfig(threads=args.threads)
    if args.quick:
        cfg = PerfConfig(
            threads=args.threads,
            models=(("tiny", 8, 2),),
            dual_ns=(1_000, 10_000, 20_000),
            official_ns=(300, 1_000),
            loop_reps=1,
        )
    out = Path(args.results) / "perf"
    result = run(cfg, out)
    print((out / "perf.md").read_text())
    print(f"wrote {out / 'perf.json'} and {out / 'perf.md'}")
    return 0 if result["steps"] else 1


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.harness.leaderboard import (
        failures,
        format_leaderboard,
        leaderboard,
        load_records,
        records_frame,
    )

    frame = records_frame(load_records(results_folder(args), args.task))
    print(format_leaderboard(leaderboard(frame)))
    failed = failures(frame)
    if not failed.empty:
        print(f"\n{len(failed)} failed cells (not ranked):")
        print(failed.to_markdown(index=False))
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from bench.harness.sweep import resolve_path
    from bench.studies.coverage import load_study, run_study

    study = load_study(resolve_path(args.sweep), args.overrides)
    result = run_study(study, Path(args.results))
    print(result.table)
    print(f"\ntrials, slopes and this table are in {result.folder}")
    return 0


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """The grid of a ``bench run`` (and of its ``bench plan``)."""
    p.add_argument("--sweep", default=None, help="a sweep name (sweeps/NAME.yaml) or YAML path")
    p.add_argument("--task", default=None, help="task name (bench list tasks); default: lexicon")
    p.add_argument("--methods", default=None, help="'all' (default) or a comma list (bench list methods)")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="e.g. 0,1,2 or 0-4; default: 0")
    p.add_argument("--radii", default=None, help="radii for every robust method's own knob, e.g. 0.01,0.1")
    p.add_argument("--sizes", default=None, help="model sizes (the task's size key), e.g. tiny,small")
    p.add_argument("--scales", default=None, help="data scales (task.n), e.g. 100,200")


def cmd_protocols(args: argparse.Namespace) -> int:
    from bench.harness.protocols import markdown

    print(markdown(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bench",
        description="Benchmark harness for distributionally robust preference alignment.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered methods, tasks or ambiguity sets")
    p.add_argument("what", choices=["methods", "tasks", "aggregators"])
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser(
        "run",
        help="train and evaluate a grid of cells (methods x radii x sizes x scales x seeds)",
        epilog=EPILOG + " slurm.KEY=VALUE overrides set SLURM resources (slurm.partition=gpu).",
    )
    add_grid_arguments(p)
    p.add_argument(
        "--cluster",
        default="local",
        choices=["debug", "local", "slurm"],
        help="debug: in process; local: subprocesses capped to the cores (default); "
        "slurm: job arrays, returns at once",
    )
    p.add_argument(
        "--workers", type=workers_count, default=0, help="parallel jobs (default: number of cores)"
    )
    p.add_argument("--results", default="results", help="results folder (default: results)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "plan",
        help="estimated peak GPU memory and time per iteration of every cell of a run, and a verdict",
        epilog=EPILOG,
    )
    add_grid_arguments(p)
    p.add_argument(
        "--gpu",
        default="auto",
        help="the GPU to plan for: H100, H200, A100, A100-40, L40S (default: the local GPU, else an "
        "slurm.gpu_mem_gb GPU timed as an H100)",
    )
    p.add_argument("--gpu-mem", type=float, default=None, help="its memory in GB, if not the datasheet's")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser(
        "tune", help="Optuna search of a method's radius on validation mixtures", epilog=EPILOG
    )
    p.add_argument(
        "--methods",
        "--method",
        dest="methods",
        required=True,
        help="a method, a comma list or 'all' (one study each, the same budget)",
    )
    p.add_argument(
        "--strength",
        action="store_true",
        help="also tune the loss's beta or eta (a decade either side of its configured value)",
    )
    p.add_argument("--task", default="lexicon")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--workers", type=int, default=1, help="parallel workers on one study")
    p.add_argument("--cluster", default="local", choices=["debug", "local", "slurm"])
    p.add_argument(
        "--storage", default="sqlite", help="sqlite (default), journal, journal:PATH or an RDB URL"
    )
    p.add_argument(
        "--study",
        default=None,
        help="study name (default: task-method-confighash); with several methods, a prefix",
    )
    p.add_argument("--space", default=None, help="search-space file for further hyperparameters")
    p.add_argument("--pruner", default="median", choices=["median", "none"])
    p.add_argument("--tune-seed", type=tune_seed, default=0, help="training seed of every trial")
    p.add_argument("--then-test", action="store_true", help="train the best radius on --seeds as run records")
    p.add_argument("--seeds", type=parse_seeds, default=None)
    p.add_argument("--results", default="results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser(
        "status", help="per sweep: completed / running / pending / failed cells, live progress and why"
    )
    p.add_argument("--sweep", default=None)
    p.add_argument("--results", default="results")
    p.add_argument(
        "--watch",
        type=positive_seconds,
        nargs="?",
        const=5.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 5) until no cell is running or pending",
    )
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser(
        "eval", help="lm-evaluation-harness capability scores of saved policies, into their records"
    )
    p.add_argument(
        "--tasks", required=True, help="lm-eval task names, e.g. bench_polarity,bench_emotion_word"
    )
    p.add_argument("--task", default=None, help="only records of this bench task")
    p.add_argument("--method", default=None)
    p.add_argument("--limit", type=int, default=None, help="items per lm-eval task")
    p.add_argument(
        "--chat-template",
        choices=["auto", "on", "off"],
        default="auto",
        help="chat-formatted prompts, few-shot examples as turns (auto: when the tokenizer has a template)",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="pip-install the packages the tasks need (the extra leaderboard) before scoring",
    )
    p.add_argument("--results", default="results")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("perf", help="step-time ratios, dual solvers, throughput: what robustness costs")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke version (tiny model, small n)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)"
    )
    p.add_argument("--results", default="results")
    p.set_defaults(fn=cmd_perf)

    p = sub.add_parser(
        "prepare",
        help="a task's one-time stages (SFT policy, reward classifier), cached; run as a job",
        epilog=EPILOG + " slurm.KEY=VALUE overrides set SLURM resources.",
    )
    p.add_argument("task")
    p.add_argument(
        "--cluster",
        default="local",
        choices=["debug", "local", "slurm"],
        help="where the preparation job runs (local: a subprocess, given one GPU if the task asks for one)",
    )
    p.add_argument("--results", default="results", help="results folder (its .prepare/ holds the job logs)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser(
        "report", help="leaderboards (Markdown, LaTeX, CSV, HTML) and figures from the records"
    )
    p.add_argument("--task", default=None)
    p.add_argument("--sweep", default=None, help="only the cells of this launched sweep")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS/reports)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--readme", action="store_true", help="refresh the marked results section of the README")
    p.add_argument("--readme-path", default="README.md")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser(
        "protocols", help="each paper task's published protocol: published value, bench's, source"
    )
    p.set_defaults(fn=cmd_protocols)

    p = sub.add_parser("leaderboard", help="print the leaderboard of the records under --results")
    p.add_argument("--task", default=None)
    p.add_argument("--results", default="results")
    p.set_defaults(fn=cmd_leaderboard)

    p = sub.add_parser("coverage", help="the radius-coverage study on the linear task", epilog=EPILOG)
    p.add_argument("--sweep", default="radius-coverage", help="study file name in sweeps/ or a YAML path")
    p.add_argument("--results", default="results")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_coverage)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand anywhere (argparse stops collecting a positional
    list at the first option: ``bench prepare emotion --cluster slurm task.size=gpt2``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.fn(args)
    except (UnknownNameError, ConfigError, FileNotFoundError, HubUnavailable) as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # SIGINT or SIGTERM: local jobs were stopped at a checkpoint
        print(
            "bench: interrupted; run the same command again to resume the unfinished cells", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
