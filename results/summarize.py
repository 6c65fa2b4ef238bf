"""Write results/ml1m-subset.md from the evaluation files of results/run_ml1m.sh.

python results/summarize.py RUNS_DIR ITERATIONS > results/ml1m-subset.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BACKBONES = ("sasrec", "gru4rec", "narm", "bert4rec")
REFERENCES = ("global mean", "item mean", "support mean", "bias model")


def load(runs: Path, backbone: str) -> dict[str, dict]:
    lines = (runs / f"test-{backbone}.txt").read_text().splitlines()
    return {
        record["model"]: record
        for record in map(json.loads, filter(lambda line: line.startswith("{"), lines))
    }


def model_key(name: str) -> tuple[str, str]:
    """'melo sasrec (melo-sasrec-s1)' -> ('melo', 's1')."""
    regime, run = name.split(" ", 1)[0], name.rsplit("(", 1)[-1].rstrip(")")
    return regime, run.rsplit("-", 1)[-1] if "-s" in run else "s0"


def row(name: str, m: dict, classes: list[str]) -> str:
    cells = [f"{m['rmse']:.4f}", f"{m['mae']:.4f}"] + [
        f"{m.get('rmse_' + c, float('nan')):.3f}" for c in classes
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(runs_dir: str, iterations: str) -> None:
    runs = Path(runs_dir)
    out = [
        "# MELO on the ML-1M subset (users 1-2999)",
        "",
        "Reproduce (from the repository root, after `make install`; ~2 h on 2 cores):",
        "",
        "```bash",
        f"ITERATIONS={iterations} bash results/run_ml1m.sh",
        f"python results/summarize.py runs/ml1m {iterations} > results/ml1m-subset.md",
        "```",
        "",
        "Protocol (DESIGN §2): items with < 50 ratings dropped, then users with < 5; 1,000 random "
        "test users (seed 0), the rest 85 % train / 15 % valid (1,699 / 300); windows of at most "
        "30, 3 query suffixes and up to 25 support windows per user; 3 second-order inner steps, "
        "16 tasks per meta-batch, reference optimisers. Every model and reference point is scored "
        "on the same targets: the last position of each test user's query suffixes (fixed "
        "windows), RMSE = sqrt(mean over users of the user's MSE), on the 1-5 scale.",
        "",
        f"**Budget used**: {iterations} meta-iterations per MAML/MELO run (the reference uses "
        f"2000), with the MAML++ multi-step phase ({int(iterations) // 2}) and the cosine decay "
        f"scaled to it; `basic` runs {int(iterations) * 10} iterations (it costs ~0.05-0.4 s an "
        "iteration). MAML and MELO start from the `basic` model's embeddings (reference). Best "
        "checkpoint by validation RMSE (every 50 iterations, 300 validation users). One torch "
        "thread per run, two runs at a time on a 2-core machine.",
        "",
    ]
    sasrec_seeds: dict[str, list[float]] = {"maml": [], "melo": []}
    for backbone in BACKBONES:
        results = load(runs, backbone)
        classes = sorted(
            {k[5:] for m in results.values() for k in m if k.startswith("rmse_")}, key=float
        )
        out += [
            f"## {backbone}",
            "",
            "| model | RMSE | MAE | " + " | ".join(f"RMSE r={c}" for c in classes) + " |",
            "|---|---|---|" + "---|" * len(classes),
        ]
        for name, metrics in results.items():
            if name in REFERENCES:
                continue
            regime, seed = model_key(name)
            out.append(
                row(
                    f"{regime} (seed {seed[1:]})" if regime != "basic" else "basic",
                    metrics,
                    classes,
                )
            )
            if backbone == "sasrec" and regime in sasrec_seeds:
                sasrec_seeds[regime].append(metrics["rmse"])
        for name in REFERENCES:
            out.append(row(f"*{name}*", results[name], classes))
        users = next(iter(results.values()))
        out += [
            "| users per class | | | "
            + " | ".join(str(users.get("users_" + c, 0)) for c in classes)
            + " |",
            "",
        ]
    out += [
        "## SASRec over seeds",
        "",
        "| regime | seeds | test RMSE mean | std |",
        "|---|---|---|---|",
    ]
    for regime, values in sasrec_seeds.items():
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out.append(f"| {regime} | {len(values)} | {statistics.mean(values):.4f} | {std:.4f} |")
    print("\n".join(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
