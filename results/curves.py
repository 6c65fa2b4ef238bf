"""How far the budget goes: each run's validation RMSE at fractions of its budget, from a
study's records (results/<plan>/runs/*.json), and the mean per backbone and regime.

    .venv/bin/python results/curves.py ml1m-subset

"best so far" at a point is the lowest validation RMSE up to it: what model selection would
have kept had the run stopped there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def best_so_far(curve: list[list[float]], iteration: float) -> float:
    return min(rmse for it, rmse in curve if it <= iteration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("plan", help="a plan name: results/<plan>/runs holds its records")
    args = parser.parse_args()
    records = [json.loads(p.read_text()) for p in sorted((RESULTS / args.plan / "runs").glob("*"))]
    header = "".join(f"  {f:>4.0%} of budget" for f in FRACTIONS)
    print(f"{'run':<22}{'iterations':>11}{header}  best at")
    groups: dict[tuple, list[list[float]]] = {}
    for record in records:
        total = record["iterations"]
        values = [best_so_far(record["curve"], f * total) for f in FRACTIONS]
        groups.setdefault((record["backbone"], record["regime"]), []).append(values)
        row = "".join(f"{v:>16.4f}" for v in values)
        print(f"{record['name']:<22}{total:>11}{row}  {record['best_iteration']:>7}")
    print("\nmean best-so-far validation RMSE per backbone and regime")
    for (backbone, regime), rows in groups.items():
        means = "".join(f"{statistics.mean(column):>16.4f}" for column in zip(*rows))
        print(f"{backbone + ' ' + regime:<22}{len(rows):>6} runs{means}")


if __name__ == "__main__":
    main()
