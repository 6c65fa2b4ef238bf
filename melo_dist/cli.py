"""`melo-dist` command line: thin parsing around the library; bad input exits 2 on one line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from melo_dist.console import quiet_libraries
from melo_dist.data.formats import SOURCES
from melo_dist.data.prepare import PrepareSettings
from melo_dist.data.synthetic import SyntheticSpec
from melo_dist.errors import InputError
from melo_dist.inference.batching import BATCH_WAIT_MS, MAX_BATCH_SIZE
from melo_dist.runtime import exit_on_sigterm, log, training_device

SYNTHETIC = "synthetic"  # the embedded generator: a source that is generated, not read


def add_settings_flags(parser: argparse.ArgumentParser, settings: type, prefix: str = "") -> None:
    """One --flag per field of a settings dataclass: names, types and defaults written once,
    in the dataclass (a field's metadata may carry its help)."""
    hints = get_type_hints(settings)
    for field in fields(settings):
        parser.add_argument(
            f"--{prefix}{field.name.replace('_', '-')}",
            dest=f"{prefix.replace('-', '_')}{field.name}",
            type=hints[field.name],
            default=field.default,
            help=f"{field.metadata.get('help', '')} (default {field.default})".lstrip(),
        )


def settings_from_flags(args: argparse.Namespace, settings: type, prefix: str = "") -> Any:
    dest = prefix.replace("-", "_")
    return settings(**{field.name: getattr(args, dest + field.name) for field in fields(settings)})


def parse_mapping(text: str | None) -> dict[str, str] | None:
    """'user_id=uid,item_id=iid' -> {'user_id': 'uid', 'item_id': 'iid'}."""
    if not text:
        return None
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise InputError(f"--columns expects name=column pairs separated by commas, got {text!r}")
    return dict(pairs)


def parse_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(":"))
    except ValueError:
        raise InputError(f"--rating-range expects LOW:HIGH, got {text!r}") from None
    if not low < high:
        raise InputError(f"--rating-range needs LOW < HIGH, got {text!r}")
    return low, high


def cmd_prepare(args: argparse.Namespace) -> None:
    from melo_dist.data.prepare import prepare, sha256_file
    from melo_dist.data.statistics import format_statistics
    from melo_dist.storage import is_uri, local_file

    settings = settings_from_flags(args, PrepareSettings)
    started = time.perf_counter()
    if args.source == SYNTHETIC:
        from melo_dist.data.synthetic import generate_ratings

        spec = settings_from_flags(args, SyntheticSpec, "synthetic-")
        log(f"generating synthetic ratings ({spec.users:,} users, {spec.items:,} items)")
        ratings = generate_ratings(spec)
        source = {"family": SYNTHETIC, "format": SYNTHETIC, "spec": vars(spec)}
    else:
        from melo_dist.data.readers import read_ratings

        if args.path is None:
            raise InputError(f"--source {args.source} needs --path FILE")
        log(f"reading {args.path}")
        with local_file(args.path) as path:  # a URI: a temporary local copy
            ratings, fmt = read_ratings(
                path,
                args.source,
                args.format,
                parse_mapping(args.columns),
                parse_range(args.rating_range),
            )
            digest = sha256_file(path)
        source = {
            "family": args.source,
            "format": fmt,
            "path": args.path if is_uri(args.path) else str(Path(args.path)),
            "sha256": digest,
        }
    manifest = prepare(ratings, args.out, settings, source, overwrite=args.overwrite, progress=log)
    print(format_statistics(manifest))
    log(f"prepared {args.out} in {time.perf_counter() - started:.1f} s")


def cmd_inspect(args: argparse.Namespace) -> None:
    from melo_dist.data.prepare import load_manifest
    from melo_dist.data.statistics import format_statistics

    manifest = load_manifest(args.data)
    print(json.dumps(manifest, indent=2) if args.json else format_statistics(manifest))


def cmd_train(args: argparse.Namespace) -> None:
    from melo_dist.config import load_config
    from melo_dist.console import ProgressLine
    from melo_dist.data.prepare import load_manifest
    from melo_dist.storage import local_folder
    from melo_dist.training.checkpoint import CONFIG, read_metrics
    from melo_dist.training.loop import Interrupted, train_local

    config = load_config(args.config, args.set or [])
    if args.workers < 0:
        raise InputError(f"--workers must be 0 (in-process) or more, got {args.workers}")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise InputError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker:g}")
    if args.max_failures < 0:
        raise InputError(f"--max-failures must be 0 or more, got {args.max_failures}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise InputError(f"--max-minutes takes minutes > 0, got {args.max_minutes:g}")
    device = training_device(args.use_gpu) if args.workers == 0 else None  # Ray picks its own
    out = config.run.out  # a path or a URI: kept as written
    changed = ", ".join(config.changed_settings()) or "none"
    log(f"training {out} ({CONFIG} there): settings that differ from the reference's: {changed}")
    available = load_manifest(config.data.path)["counts"]["valid_users"]
    if config.data.valid_users > available:
        log(
            f"data.valid_users is {config.data.valid_users}, but {config.data.path} has "
            f"{available} validation users: validating on all of them"
        )
    line = ProgressLine(out.rstrip("/").rsplit("/", 1)[-1])
    try:
        if args.workers == 0:
            best = train_local(
                config,
                log=line.message,
                max_minutes=args.max_minutes,
                progress=line,
                device=device,
            )
        else:
            from melo_dist.distributed.train import connect, fit

            connect(args.verbose)
            best = fit(
                config,
                args.workers,
                progress=line,
                max_minutes=args.max_minutes,
                cpus_per_worker=args.cpus_per_worker,
                use_gpu=args.use_gpu,
                storage_path=args.storage,
                max_failures=args.max_failures,
            )
    except Interrupted as stopped:
        line.close()  # the line ends before the message
        log(str(stopped))
        raise SystemExit(stopped.exit_code) from None
    finally:
        line.close()
    last = read_metrics(local_folder(config.run.out))[-1]
    log(
        f"done: best valid RMSE {best['valid_rmse']:.4f} at iteration {best['iteration']} "
        f"(best.pt), last {last['valid_rmse']:.4f} at {last['iteration']} (last.pt); "
        f"{last['seconds_per_iteration']:.2f} s/it, validation excluded"
    )
    if args.json:
        print(json.dumps({"event": "train_done", "out": out, **best, "last": last}))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from melo_dist.training.evaluation import evaluate_checkpoints, format_results

    results = evaluate_checkpoints(
        args.checkpoint, args.split, args.data, references=not args.no_references, progress=log
    )
    print(format_results(results, args.split))
    if args.json:
        for name, metrics in results.items():
            print(
                json.dumps({"event": "evaluation", "split": args.split, "model": name, **metrics})
            )


def cmd_report(args: argparse.Namespace) -> None:
    from melo_dist.report.build import write_report

    path = write_report(args.runs, args.split, args.out, progress=log)
    log(f"wrote {path} and {path.with_suffix('.html')} (figures beside them)")


def cmd_predict(args: argparse.Namespace) -> None:
    from melo_dist.inference.batch import predict_file

    started = time.perf_counter()
    rows = predict_file(
        args.checkpoint,
        args.users,
        args.out,
        candidates_path=args.candidates,
        top_k=args.top_k,
        data=args.data,
        workers=args.workers,
        batch_users=args.batch_users,
        progress=log,
    )
    seconds = time.perf_counter() - started
    log(f"wrote {rows:,} predictions to {args.out} in {seconds:.1f} s")
    if args.json:
        done = {"event": "predict_done", "out": args.out, "rows": rows, "seconds": seconds}
        print(json.dumps(done))


def cmd_serve(args: argparse.Namespace) -> None:
    from melo_dist.inference.serve import build_app, serve_forever

    app = build_app(
        args.checkpoint,
        args.data,
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        cpus_per_replica=args.cpus_per_replica,
        threads=args.threads,
    )
    serve_forever(app, args.host, args.port, log)


def cmd_tune(args: argparse.Namespace) -> None:
    from melo_dist.sweeps.outputs import write_outputs
    from melo_dist.sweeps.space import load_space

    space = load_space(args.space, args.set or [])
    if args.trials < 1:
        raise InputError(f"--trials must be at least 1, got {args.trials}")
    from melo_dist.distributed.tune import SweepInterrupted, sweep

    out = Path(args.out)
    try:
        records = sweep(space, args.trials, out, storage=args.storage, verbose=args.verbose)
    except SweepInterrupted as interrupted:
        log(str(interrupted))
        raise SystemExit(130) from None
    table = write_outputs(records, space, out)
    shown = table.drop(columns=["error", "checkpoint"]).head(10)
    print(f"sweep of {len(table)} trials, best first (all in {out / 'results.csv'}):")
    print(shown.to_string(index=False, float_format=lambda value: f"{value:.4g}"))
    errored = table[table["status"] == "errored"]
    for _, row in errored.iterrows():
        log(f"trial {row['trial']} errored: {row['error']}")
    best = table.iloc[0]
    if not args.json:
        return
    print(
        json.dumps(
            {
                "event": "sweep_done",
                "out": str(out),
                "trials": len(table),
                "errored": len(errored),
                "stopped_early": int((table["status"] == "stopped early").sum()),
                "best_trial": best["trial"],
                "best_valid_rmse": float(best["best_valid_rmse"]),
            }
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from melo_dist.bench import run_benchmark

    run_benchmark(args.name, args.options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melo-dist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    console = argparse.ArgumentParser(add_help=False)  # what every long-running command shows
    console.add_argument(
        "--verbose", action="store_true", help="also show Ray's INFO logs and deprecation warnings"
    )
    console.add_argument("--json", action="store_true", help="also print JSON result lines")

    prep = commands.add_parser("prepare", help="rating file -> Parquet task tables + manifest")
    prep.add_argument("--source", required=True, choices=(*SOURCES, SYNTHETIC))
    prep.add_argument("--path", help="rating file (not for --source synthetic)")
    prep.add_argument("--format", help="exact format inside the family (default: detected)")
    prep.add_argument("--columns", help="csv/parquet column mapping, e.g. user_id=uid,rating=stars")
    prep.add_argument("--rating-range", default="0.5:5", help="valid ratings LOW:HIGH (inclusive)")
    prep.add_argument("--out", required=True, help="output folder (written atomically)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    add_settings_flags(prep, PrepareSettings)
    add_settings_flags(prep, SyntheticSpec, "synthetic-")
    prep.set_defaults(run=cmd_prepare)

    inspect = commands.add_parser("inspect", help="print a prepared dataset's manifest")
    inspect.add_argument("data", help="prepared dataset folder")
    inspect.add_argument("--json", action="store_true", help="the raw manifest")
    inspect.set_defaults(run=cmd_inspect)

    train = commands.add_parser("train", help="meta-train from a config", parents=[console])
    train.add_argument("--config", help="YAML config (defaults: the reference's)")
    train.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )
    train.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray Train workers (0: in-process, no Ray); joins $RAY_ADDRESS or a running Ray, "
        "or starts a local one",
    )
    train.add_argument(
        "--cpus-per-worker",
        type=float,
        help="default: 1 on a joined cluster; on a local Ray this command starts, up to 1, "
        "leaving half a CPU for Ray Data",
    )
    train.add_argument(
        "--use-gpu", action="store_true", help="train on a GPU (with --workers: one per worker)"
    )
    train.add_argument(
        "--max-minutes",
        type=float,
        help="stop cleanly (checkpoint written) after this much wall time; resume by re-running",
    )
    train.add_argument("--storage", help="Ray storage_path (shared storage on a cluster)")
    train.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="worker failures to recover from (from the last checkpoint)",
    )
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="score checkpoints on a split", parents=[console]
    )
    evaluate.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a checkpoint file or run folder (best.pt); repeatable",
    )
    evaluate.add_argument("--split", default="test", choices=("train", "valid", "test"))
    evaluate.add_argument("--data", help="prepared dataset (default: the checkpoint's)")
    evaluate.add_argument("--no-references", action="store_true", help="skip the reference points")
    evaluate.set_defaults(run=cmd_evaluate)

    report = commands.add_parser("report", help="what runs learned: report.md/.html with figures")
    report.add_argument("runs", nargs="+", help="run folders (run.out of local or Ray runs)")
    report.add_argument("--split", default="test", choices=("valid", "test"))
    report.add_argument("--out", required=True, help="folder for report.md, report.html, PNGs")
    report.set_defaults(run=cmd_report)

    predict = commands.add_parser(
        "predict", help="adapt to users' histories, write predictions", parents=[console]
    )
    predict.add_argument("--checkpoint", required=True, help="a checkpoint file or run folder")
    predict.add_argument(
        "--users", required=True, help="histories: Parquet/CSV/RecBole .inter, or a task table"
    )
    chosen = predict.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--candidates", help="(user_id, item_id) pairs to score")
    chosen.add_argument("--top-k", type=int, default=0, help="rank every unrated item, keep K")
    predict.add_argument("--out", required=True, help="predictions Parquet (written atomically)")
    predict.add_argument("--data", help="prepared dataset (default: the checkpoint's)")
    predict.add_argument(
        "--workers", type=int, default=0, help="Ray Data scoring actors (0: in-process)"
    )
    predict.add_argument("--batch-users", type=int, default=64, help="users adapted together")
    predict.set_defaults(run=cmd_predict)

    served = commands.add_parser("serve", help="online predictions over HTTP (Ray Serve)")
    served.add_argument("--checkpoint", required=True, help="a checkpoint file or run folder")
    served.add_argument("--data", help="prepared dataset (default: the checkpoint's)")
    served.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every address")
    served.add_argument("--port", type=int, default=8000)
    served.add_argument("--replicas", type=int, default=1)
    served.add_argument("--cpus-per-replica", type=float, default=1.0)
    served.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    served.add_argument(
        "--max-batch-size",
        type=int,
        default=MAX_BATCH_SIZE,
        help="requests adapted together, at most (default %(default)s)",
    )
    served.add_argument(
        "--batch-wait-ms",
        type=float,
        default=BATCH_WAIT_MS,
        help="the longest a batch waits to fill (default %(default)s); it closes once it holds as "
        "many requests as were in flight at the last second's peak",
    )
    served.set_defaults(run=cmd_serve)

    sweep = commands.add_parser(
        "tune", help="a Ray Tune + Optuna sweep over a YAML space", parents=[console]
    )
    sweep.add_argument("--space", required=True, help="sweep space YAML (see tune/spaces/)")
    sweep.add_argument("--trials", type=int, required=True, help="trials to run")
    sweep.add_argument(
        "--out", required=True, help="results.csv, best.yaml, plots; re-run to resume"
    )
    sweep.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="fix one config value in every trial; repeatable",
    )
    sweep.add_argument("--storage", help="Ray storage_path (shared storage on a cluster)")
    sweep.set_defaults(run=cmd_tune)

    bench = commands.add_parser("bench", help="run a benchmark: a table, then one JSON line")
    bench.add_argument("name")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(getattr(args, "verbose", False))
    if threading.current_thread() is threading.main_thread():
        exit_on_sigterm()
    try:
        args.run(args)
    except InputError as error:
        print(f"melo-dist: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
