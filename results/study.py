"""The study: Basic / MAML / MELO per backbone and seed, scored on the test users, as a plan says.

    .venv/bin/python results/study.py results/plans/ml1m-subset.yaml

The runs are a Ray Tune grid, each trial one full training run (its run.threads CPUs), as many
at once as the Ray instance has CPUs; the basic runs go first, since their embeddings start
MAML and MELO. With RAY_ADDRESS it joins a cluster whose nodes see this checkout and the work
folder at the same paths (a shared file system); `--storage` keeps Tune's state there.

`--tables-only` trains nothing: it rewrites the tables from the committed records (all of one
code version). `make results` runs every plan in results/plans/.

Resumable in parts: every finished run leaves a small record in results/<plan>/runs/<run>.json
(its test metrics, each test user's MSE and target rating, its validation curve, the git
commit and the code's tree hash), committed with the results. The tables hold, beside the
means, paired comparisons on the test users (MELO - MAML, MAML - Basic, MELO - the bias and
factor models, the factor model also with recency; bootstrap intervals) and how far the
budget goes (best validation RMSE at a quarter, half, three quarters and all of it).
Re-running the command skips runs whose record was made by the same code and continues an
interrupted run from its checkpoint; the tables are then rewritten from the records
(results/<plan>.md and results/<plan>.json). Records of different code are never mixed in one
table: the command re-runs them instead. Model selection uses validation users only
(best.pt); each run's test users are scored once, after it finishes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import cloudpickle, tune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melo_dist.config import Config, load_config, read_yaml  # noqa: E402
from melo_dist.data.prepare import PrepareSettings, prepare  # noqa: E402
from melo_dist.data.readers import read_ratings  # noqa: E402
from melo_dist.paths import shared_data_dir  # noqa: E402
from melo_dist.training.checkpoint import read_metrics  # noqa: E402
from melo_dist.training.evaluation import (  # noqa: E402
    evaluate_checkpoints,
    reference_points,
    rmse_difference,
    split_targets,
)
from melo_dist.training.loop import train_local  # noqa: E402

if __name__ != "__main__":  # imported (tests): Ray's workers get these functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

REFERENCES = (
    "global mean",
    "item mean",
    "support mean",
    "bias model",
    "factor model",
    "factor + recency",
    "factor + recency, once",
)
REGIMES = ("basic", "maml", "melo")
BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
PER_USER = ("user_mse", "user_rating")  # each test user's MSE and target rating
# paired on the test users: (A, B) of each backbone, A - B; a reference point by its name
PAIRS = (
    ("melo", "maml"),
    ("maml", "basic"),
    ("melo", "bias model"),
    ("melo", "factor model"),
    ("melo", "factor + recency"),
)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def code_version() -> dict:
    """The commit, and the tree hash of what computes the numbers (package and configs)."""
    dirty = git("status", "--porcelain", "melo_dist", "configs", "results/plans")
    return {
        "commit": git("rev-parse", "HEAD"),
        "code": git("rev-parse", "HEAD:melo_dist") + "/" + git("rev-parse", "HEAD:configs"),
        "dirty": bool(dirty),
    }


def planned_runs(plan: dict) -> list[dict]:
    """One entry per run: basic first (its embeddings initialise MAML and MELO of a backbone)."""
    runs = []
    for group in plan["runs"]:
        for backbone in group["backbones"]:
            for regime in group["regimes"]:
                for seed in group["seeds"] if regime != "basic" else group.get("basic_seeds", [0]):
                    iterations = group["basic_iterations" if regime == "basic" else "iterations"]
                    runs.append(
                        {
                            "name": f"{regime}-{backbone}-s{seed}",
                            "backbone": backbone,
                            "regime": regime,
                            "seed": seed,
                            "iterations": iterations,
                            "set": group.get("set", []),
                        }
                    )
    for run in runs:
        run["settings"] = run_settings(plan, run)
    return sorted(runs, key=lambda run: run["regime"] != "basic")


def dataset(plan: dict, work: Path) -> Path:
    """The plan's prepared dataset under the work folder (prepared once)."""
    out = work / "data"
    if not (out / "manifest.json").exists():
        source = plan["data"]
        path = shared_data_dir() / source["file"]
        ratings, fmt = read_ratings(path, source["source"])
        settings = PrepareSettings(**source.get("prepare", {}))
        prepare(ratings, out, settings, {"family": source["source"], "format": fmt})
    return out


def run_settings(plan: dict, run: dict) -> list[str]:
    """The run's config overrides, relative to the work folder (also what its record keeps)."""
    settings = [
        f"run.out={run['name']}",
        f"model.backbone={run['backbone']}",
        f"meta.regime={run['regime']}",
        f"run.seed={run['seed']}",
        f"optim.iterations={run['iterations']}",
        *plan.get("set", []),
        *run["set"],
    ]
    if run["regime"] != "basic" and plan.get("init_from_basic", True):
        settings.append(f"run.init_from=basic-{run['backbone']}-s0/best.pt")
    return settings


def done(run: dict, records_dir: Path, version: dict) -> bool:
    """Whether the run has a record made by this code (`version["code"]`) with these settings."""
    record = records_dir / f"{run['name']}.json"
    if not record.exists():
        return False
    made = json.loads(record.read_text())
    return (made["code"], made["settings"]) == (version["code"], run["settings"])


def run_config(plan: dict, run: dict, data: Path, work: Path) -> Config:
    in_work = [  # folders named in the settings are inside the work folder
        f"{key}={work / value}" if key in ("run.out", "run.init_from") else f"{key}={value}"
        for key, value in (setting.split("=", 1) for setting in run["settings"])
    ]
    return load_config(ROOT / plan["config"], [f"data.path={data}", *in_work])


def train_and_score(plan: dict, run: dict, data: Path, work: Path, version: dict) -> dict:
    out = work / run["name"]
    stamp = out / "study-code.txt"  # a run folder of other code is started over, not resumed
    if out.exists() and (not stamp.exists() or stamp.read_text() != version["code"]):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(version["code"])
    settings = run["settings"]
    config = run_config(plan, run, data, work)
    started = time.perf_counter()
    best = train_local(config, log=lambda message: print(f"  {run['name']}: {message}"))
    seconds = time.perf_counter() - started
    return {
        **{k: run[k] for k in ("name", "backbone", "regime", "seed", "iterations")},
        "best_iteration": best["iteration"],
        "valid_rmse": best["valid_rmse"],
        **test_scores(out),
        "curve": [[r["iteration"], r["valid_rmse"]] for r in read_metrics(out)],
        "train_seconds": round(seconds, 1),
        "threads": config.run.threads,
        "settings": settings,
        **version,
    }


def summary(metrics: dict) -> dict:
    """What a record keeps of a model's test metrics: the table's figures and, for the paired
    comparisons, each test user's MSE and target rating."""
    return {
        "rmse": metrics["rmse"],
        "mae": metrics["mae"],
        "rmse_by_class": {k[5:]: v for k, v in metrics.items() if k.startswith("rmse_")},
        "users": metrics["users"],
        "user_mse": [float(f"{x:.6g}") for x in metrics["user_mse"]],
        "user_rating": [float(x) for x in metrics["user_rating"]],
    }


def test_scores(out: Path) -> dict:
    """The run's best checkpoint scored on the test users, once."""
    (metrics,) = evaluate_checkpoints([str(out)], "test", references=False, per_user=True).values()
    return summary(metrics)


def write_record(folder: Path, record: dict) -> None:
    """results/<plan>/runs/<run>.json: one field a line, the per-user lists each on one."""
    lists = [key for key in PER_USER if key in record]
    text = json.dumps({k: v for k, v in record.items() if k not in lists}, indent=1)
    compact = "".join(f',\n "{k}": {json.dumps(record[k], separators=(",", ":"))}' for k in lists)
    (folder / f"{record['name']}.json").write_text(text[:-2] + compact + "\n}\n")


def with_user_errors(record: dict, records_dir: Path, work: Path) -> dict:
    """A record of a study from before records kept per-user errors gets them from its run
    folder, if it is still there: the checkpoint is scored again, and must give the record's
    own RMSE (the same checkpoint, targets and scoring code), or the study stops."""
    out = work / record["name"]
    if "user_mse" in record or not (out / "best.pt").exists():
        return record
    scores = test_scores(out)
    if not math.isclose(scores["rmse"], record["rmse"], rel_tol=1e-6):
        sys.exit(f"study: {out} now scores {scores['rmse']!r}, its record {record['rmse']!r}")
    record = {**record, "user_mse": scores["user_mse"], "user_rating": scores["user_rating"]}
    write_record(records_dir, record)
    return record


def references(data: Path) -> dict:
    loaded, _, targets = split_targets(load_config(None, [f"data.path={data}"]), "test")
    points = reference_points(loaded.train, targets, loaded.num_items, True)
    return {name: summary(m) for name, m in points.items()}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def groups(records: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(backbone, regime, its runs) in the plan's backbone order, basic, MAML, MELO."""
    backbones = dict.fromkeys(r["backbone"] for r in records)
    return [
        (backbone, regime, group)
        for backbone in backbones
        for regime in REGIMES
        if (group := [r for r in records if (r["backbone"], r["regime"]) == (backbone, regime)])
    ]


def paired_lines(records: list[dict], refs: dict) -> list[str]:
    """RMSE(A) - RMSE(B) on the same test users, seeds averaged per user, with a bootstrap
    95 % interval over users: overall and on the two rarest target ratings."""
    lacking = [r["name"] for r in records if "user_mse" not in r]
    if lacking:
        return ["", f"Paired comparisons: no per-user errors for {', '.join(lacking)}."]
    rating = np.array(records[0]["user_rating"])
    levels, counts = np.unique(rating, return_counts=True)
    rare = sorted(levels[np.argsort(counts, kind="stable")[:2]])
    subsets = [("all", rating > -np.inf)] + [(f"r={r:g}", rating == r) for r in rare]
    rng = np.random.default_rng(0)
    lines = [
        "",
        "Paired on the same test users (each user's MSE averaged over seeds; 95 % interval "
        "from 2,000 bootstrap resamples of the users): RMSE(A) - RMSE(B). An interval that "
        "excludes 0 is a difference the test users support.",
        "",
        "| backbone | A - B | "
        + " | ".join(f"{name} ({m.sum()} users)" for name, m in subsets)
        + " |",
        "|---|---|" + "---|" * len(subsets),
    ]
    for backbone in dict.fromkeys(r["backbone"] for r in records):
        mse = {
            regime: np.mean([r["user_mse"] for r in group], axis=0)
            for b, regime, group in groups(records)
            if b == backbone
        } | {name: np.array(m["user_mse"]) for name, m in refs.items()}
        for a, b in PAIRS:
            if a in mse and b in mse:
                cells = [
                    "{:+.4f} [{:+.4f}, {:+.4f}]".format(*rmse_difference(mse[a][m], mse[b][m], rng))
                    for _, m in subsets
                ]
                lines.append(f"| {backbone} | {a} - {b} | " + " | ".join(cells) + " |")
    return lines


def budget_lines(records: list[dict]) -> list[str]:
    """How far the budget goes: the best validation RMSE up to a fraction of each run's
    iterations (what model selection would have kept, had the run stopped there)."""
    lines = [
        "",
        "How far the budget goes: best validation RMSE so far at a fraction of each run's "
        "iterations, mean over seeds.",
        "",
        "| backbone | model | " + " | ".join(f"{f:.0%}" for f in BUDGET_FRACTIONS) + " |",
        "|---|---|" + "---|" * len(BUDGET_FRACTIONS),
    ]
    for backbone, regime, group in groups(records):
        means = [
            statistics.mean(
                min((v for it, v in r["curve"] if it <= f * r["iterations"]), default=np.nan)
                for r in group
            )
            for f in BUDGET_FRACTIONS
        ]
        shown = ["-" if math.isnan(m) else f"{m:.4f}" for m in means]  # not validated yet
        lines.append(f"| {backbone} | {regime} | " + " | ".join(shown) + " |")
    return lines


def write_tables(
    plan_path: Path, plan: dict, records: list[dict], refs: dict, results: Path
) -> None:
    """results/<plan>.md and .json, from the run records alone."""
    name = plan_path.stem
    shown = plan_path.relative_to(ROOT) if plan_path.is_relative_to(ROOT) else plan_path
    command = f".venv/bin/python results/study.py {shown}"
    machine = {
        "command": command,
        "commit": records[0]["commit"],
        "code": records[0]["code"],
        "runs": [
            {k: r[k] for k in ("backbone", "regime", "seed", "iterations", "rmse", "mae")}
            | {"rmse_by_class": r["rmse_by_class"], "valid_rmse": r["valid_rmse"]}
            for r in records
        ],
        "references": {
            name: {k: m[k] for k in ("rmse", "mae", "rmse_by_class")} for name, m in refs.items()
        },
    }
    (results / f"{name}.json").write_text(json.dumps(machine, indent=1) + "\n")
    classes = sorted({c for r in records for c in r["rmse_by_class"]}, key=float)
    cpu_hours = sum(r["train_seconds"] * r["threads"] for r in records) / 3600
    lines = [
        f"# {plan['title']}",
        "",
        "Written by the study command (do not edit; the findings are in the file named below):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Code: commit {records[0]['commit'][:10]}. {plan['budget']}",
        f"Training cost: {cpu_hours:.2f} CPU-hours over {len(records)} runs "
        f"({sum(r['train_seconds'] for r in records) / 3600:.2f} h of wall time, "
        f"{records[0]['threads']} thread(s) a run).",
        "",
        f"Test users: {records[0]['users']}; the last position of each query, on the 1-5 scale; "
        "best validation checkpoint of each run. Mean ± standard deviation over seeds.",
        "",
        "| backbone | model | seeds | test RMSE | MAE | "
        + " | ".join(f"RMSE r={c}" for c in classes)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(classes),
    ]
    for backbone, regime, group in groups(records):
        by_class = [
            f"{np.mean([r['rmse_by_class'].get(c, np.nan) for r in group]):.3f}" for c in classes
        ]
        lines.append(
            f"| {backbone} | {regime} | {len(group)} | {spread([r['rmse'] for r in group])} "
            f"| {spread([r['mae'] for r in group])} | " + " | ".join(by_class) + " |"
        )
    for ref in (ref for ref in REFERENCES if ref in refs):  # older records lack the newer
        m = refs[ref]
        by_class = [f"{m['rmse_by_class'].get(c, np.nan):.3f}" for c in classes]
        lines.append(
            f"| | *{ref}* | | {m['rmse']:.4f} | {m['mae']:.4f} | " + " | ".join(by_class) + " |"
        )
    lines += [
        "",
        "Every run: best validation RMSE (iteration), test RMSE.",
        "",
        "| run | iterations | best valid RMSE (it) | test RMSE |",
        "|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['iterations']} | {r['valid_rmse']:.4f} ({r['best_iteration']}) "
            f"| {r['rmse']:.4f} |"
        )
    lines += paired_lines(records, refs) + budget_lines(records)
    if plan.get("findings"):
        lines += ["", f"Findings, written by hand from these figures: `{plan['findings']}`."]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")


def study_trial(params: dict, plan: dict, data: str, work: str, version: dict) -> None:
    """One Tune trial: one run, trained (or resumed) and scored; its record is the result."""
    record = train_and_score(plan, params["run"], Path(data), Path(work), version)
    tune.report({"record": json.dumps(record)})


class Records(tune.Callback):
    """Writes each run's record in this process as soon as its trial reports it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        record = json.loads(result["record"])
        write_record(self.folder, record)
        minutes = record["train_seconds"] / 60
        print(f"  {record['name']}: test RMSE {record['rmse']:.4f} ({minutes:.0f} min)", flush=True)


def run_grid(
    plan: dict, todo: list[dict], data: Path, work: Path, version: dict, records: Path, storage: str
) -> None:
    """The runs as Ray Tune grids of one trial a run: the basic runs, then the others."""

    def threads(trial: dict) -> dict:
        return {"cpu": max(1, run_config(plan, trial["run"], data, work).run.threads)}

    trainable = tune.with_resources(
        tune.with_parameters(
            study_trial, plan=plan, data=str(data), work=str(work), version=version
        ),
        threads,
    )
    for phase in ("basic", "meta"):
        runs = [run for run in todo if (run["regime"] == "basic") == (phase == "basic")]
        if not runs:
            continue
        print(f"{phase} runs: {', '.join(run['name'] for run in runs)}", flush=True)
        grid = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search(runs)},
            tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: t.config["run"]["name"]),
            run_config=tune.RunConfig(
                name=f"{work.name}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage,
                callbacks=[Records(records)],
                verbose=0,
            ),
        ).fit()
        failed = [result for result in grid if result.error is not None]
        if failed:
            raise SystemExit(f"study: {len(failed)} run(s) failed; the first: {failed[0].error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("plan", help="a plan YAML under results/plans/")
    parser.add_argument("--work", help="run folders (default: runs/study/<plan>)")
    parser.add_argument("--only", default="", help="run only runs whose name contains this")
    parser.add_argument("--storage", help="Tune's experiment state (default: <work>/tune)")
    parser.add_argument("--results", default=str(ROOT / "results"), help="records and tables")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="train nothing: rewrite the tables from the plan's records (of one code version)",
    )
    args = parser.parse_args(argv)
    plan_path = Path(args.plan).resolve()
    plan = read_yaml(plan_path)
    work = Path(args.work or ROOT / "runs" / "study" / plan_path.stem).resolve()
    results = Path(args.results).resolve()
    records_dir = results / plan_path.stem / "runs"
    records_dir.mkdir(parents=True, exist_ok=True)
    version = code_version()
    if version["dirty"] and not args.tables_only:
        sys.exit("study: commit the code first (melo_dist/, configs/ or the plan has changes)")
    runs = planned_runs(plan)
    if args.tables_only:  # the records' own code version, whatever the checkout's
        made = [records_dir / f"{run['name']}.json" for run in runs]
        codes = {json.loads(p.read_text())["code"] for p in made if p.exists()}
        if len(codes) > 1:
            sys.exit(f"study: the records of {plan_path.stem} come from {len(codes)} code versions")
        version = {"code": codes.pop() if codes else None}
    todo = [run for run in runs if args.only in run["name"] and not done(run, records_dir, version)]
    if args.tables_only:
        todo = []
    cpu_hours = (
        sum(
            run["iterations"] * plan["seconds_per_iteration"][f"{run['backbone']} {run['regime']}"]
            for run in todo
        )
        / 3600
    )
    torch.set_num_threads(1)  # scoring; training sets its own threads (run.threads)
    data = dataset(plan, work)
    if todo:
        if not ray.is_initialized():  # the trials import this checkout's melo_dist
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=False)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        print(
            f"study {plan_path.stem}: {len(runs)} runs, {len(todo)} to do, about "
            f"{cpu_hours:.1f} CPU-hours: about {cpu_hours / max(1.0, cpus):.1f} h on "
            f"{cpus:g} CPUs",
            flush=True,
        )
        run_grid(plan, todo, data, work, version, records_dir, args.storage or str(work / "tune"))
    missing = [run["name"] for run in runs if not done(run, records_dir, version)]
    if missing:
        print(f"{len(missing)} runs still to do ({', '.join(missing)}); tables not written")
        return
    records = [
        with_user_errors(
            json.loads((records_dir / f"{run['name']}.json").read_text()), records_dir, work
        )
        for run in runs
    ]
    write_tables(plan_path, plan, records, references(data), results)
    print(f"wrote {results / plan_path.stem}.md and .json")


if __name__ == "__main__":
    main()
