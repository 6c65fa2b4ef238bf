"""Do timestamps say more than positions? The factor fold-in (the factor reference point's
item factors and ridge) with each support rating weighted by its position, by whether it was
rated in the target's session, and with the fold-in's shrink scaled; and how the rare rating
classes move with the shrink.

    .venv/bin/python results/session_baselines.py DATA [--split valid] [--targets 10]

Each user's last `--targets` interactions are its targets (as `results/paired.py --targets`
takes them); a target's support is the `data.window - 1` ratings before it, each once. A
weighting multiplies each support rating's term of the ridge fit:
- `position d`: d ** (age - 1), age = how many interactions before the target (1: the last);
- `session m`: m for a rating given less than SESSION_SECONDS before the target, 1 otherwise,
  divided by m (so its strongest weight is 1, as the others'): the target's timestamp is
  known when a prediction is asked for;
- `scale s`: every weight times s, i.e. the ridge's shrink divided by s.
RMSE is the square root of the mean over users of each user's mean squared error (as
`melo-dist evaluate`); `r=1`, `r=2`: RMSE over the targets of that rating.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import load_config
from melo_dist.data.dataset import load_dataset
from melo_dist.training.baselines import bias_statistics, factor_design, recency_weights, ridge

SESSION_SECONDS = 600
SCALES = (1, 5, 8, 12)
WEIGHTINGS = (("uniform", 1.0, 1.0), ("position 0.95", 0.95, 1.0), ("session 3", 1.0, 3.0))
WEIGHTINGS += (("position 0.95, session 3", 0.95, 3.0),)


def targets_with_supports(path: Path, targets: int, support: int) -> dict[str, np.ndarray]:
    """Flat arrays of every (target, support rating) pair: the target's user, item and rating,
    and each support rating's target index, item, rating, age and seconds before the target."""
    table = pq.read_table(path, columns=["item_id", "rating", "timestamp"]).to_pydict()
    out: dict[str, list] = {key: [] for key in ("user", "item", "rating")}
    out.update({key: [] for key in ("of", "s_item", "s_rating", "s_age", "s_gap")})
    for user, (items, ratings, times) in enumerate(
        zip(table["item_id"], table["rating"], table["timestamp"])
    ):
        for target in range(max(1, len(items) - targets), len(items)):
            first = max(0, target - support)
            count = target - first
            out["of"] += [len(out["user"])] * count
            out["s_item"] += items[first:target]
            out["s_rating"] += ratings[first:target]
            out["s_age"] += range(count, 0, -1)
            out["s_gap"] += [times[target] - t for t in times[first:target]]
            out["user"].append(user)
            out["item"].append(items[target])
            out["rating"].append(ratings[target])
    return {key: np.asarray(value) for key, value in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="session_baselines.py")
    parser.add_argument("data", type=Path, help="a prepared dataset (melo-dist prepare)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--targets", type=int, default=10)
    args = parser.parse_args()
    config = load_config(None, [f"data.path={args.data}"])
    data = load_dataset(config.data)
    mu, item_bias = bias_statistics(data.train, data.num_items)
    design, reg = factor_design(data.train, data.num_items)
    pairs = targets_with_supports(
        args.data / f"tasks-{args.split}.parquet", args.targets, config.data.window - 1
    )
    count, users = len(pairs["user"]), pairs["user"]
    residual = pairs["s_rating"] - mu - item_bias[pairs["s_item"]]
    print(
        f"{args.split}: {count} targets of {users.max() + 1} users; support ratings within "
        f"{SESSION_SECONDS} s of their target: {np.mean(pairs['s_gap'] < SESSION_SECONDS):.1%}"
    )
    print(f"{'weighting':28} {'scale':>5} {'RMSE':>7} {'r=1':>6} {'r=2':>6}")
    for name, decay, session in WEIGHTINGS:
        weight = recency_weights(pairs["s_age"], decay)
        weight *= np.where(pairs["s_gap"] < SESSION_SECONDS, session, 1.0) / session
        for scale in SCALES:
            fit = ridge(pairs["of"], count, design[pairs["s_item"]], residual, reg, scale * weight)
            pred = mu + item_bias[pairs["item"]] + (design[pairs["item"]] * fit).sum(1)
            error = (pred - pairs["rating"]) ** 2
            rmse = np.sqrt((np.bincount(users, error) / np.bincount(users)).mean())
            rare = [np.sqrt(error[pairs["rating"] == r].mean()) for r in (1, 2)]
            print(f"{name:28} {scale:5} {rmse:7.4f} {rare[0]:6.3f} {rare[1]:6.3f}", flush=True)


if __name__ == "__main__":
    main()
