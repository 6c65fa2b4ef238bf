"""Paired comparison on the same test users: is A's RMSE below B's beyond the noise of users?

    .venv/bin/python results/paired.py \
        --a runs/study/ml1m-subset/melo-sasrec-s0 runs/study/ml1m-subset/melo-sasrec-s1 ... \
        --b runs/study/ml1m-subset/maml-sasrec-s0 ...      # or --b "factor model"

Each side is one or more checkpoints (e.g. its seeds; their per-user squared errors are
averaged, so seed noise shrinks too) or a reference point by name. Both are scored on the same
targets; the users are resampled (bootstrap, seeded) to give a 95 % interval of
RMSE(A) - RMSE(B), overall and on the rare rating classes. A difference whose interval
excludes 0 is one the test users support. (`results/study.py` writes the same comparisons for a
plan's regimes into its tables; this script compares any checkpoints.)

`--targets K` scores each user on its K last interactions, each with the history before it
(`with_earlier_targets`, how training's validation gets more targets): a user's MSE is the mean
over its targets, so the bootstrap still resamples users; the rating-class lines resample the
targets of that rating.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import Config, load_config
from melo_dist.meta import learner_from_state
from melo_dist.training.checkpoint import load_checkpoint
from melo_dist.training.evaluation import (
    learner_predictions,
    model_batches,
    reference_predictions,
    rmse_difference,
    split_targets,
    user_errors,
)


def user_mse(side: list[str], data, batches, targets, split: str, per_user: int) -> np.ndarray:
    """Per-user MSE [U] of a reference point, or of checkpoints averaged over them (each on
    the support windows its config samples: data.support_windows)."""
    if len(side) == 1 and not Path(side[0]).exists():
        references = reference_predictions(data.train, targets, data.num_items)
        if side[0] not in references:
            raise SystemExit(f"{side[0]!r} is neither a checkpoint nor one of {sorted(references)}")
        return user_errors(references[side[0]], targets)[0]
    errors = []
    for path in side:
        checkpoint = load_checkpoint(path)
        config = Config.from_dict(checkpoint["config"])
        own = model_batches(config, data, split, batches, per_user)
        learner = learner_from_state(checkpoint)
        errors.append(user_errors(learner_predictions(learner, own), targets)[0])
    return np.mean(errors, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", nargs="+", required=True, help="checkpoints, or a reference name")
    parser.add_argument("--b", nargs="+", required=True, help="checkpoints, or a reference name")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--targets", type=int, default=1, help="targets a user (its last K)")
    parser.add_argument("--data", help="the prepared dataset, where neither side is checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(1)  # beside other processes, 2 threads were 10x slower (findings)
    first = next((p for p in args.a + args.b if Path(p).exists()), None)
    if first is not None:
        config = Config.from_dict(load_checkpoint(first)["config"])
    elif args.data:
        config = load_config(None, [f"data.path={args.data}"])
    else:
        raise SystemExit("name the dataset: checkpoints on one side, or --data")
    data, batches, targets = split_targets(config, args.split, args.targets)
    a, b = (
        user_mse(side, data, batches, targets, args.split, args.targets)
        for side in (args.a, args.b)
    )
    users = data.split(args.split)
    owner = users.earlier_target_users(args.targets)  # the user each target is of
    per_user = [np.bincount(owner, mse) / np.bincount(owner) for mse in (a, b)]
    rng = np.random.default_rng(0)
    classes = targets.rating[:, 0]  # every query of a target ends at it
    print(
        f"{args.split} users: {len(users)}, {len(owner)} targets; A = {' '.join(args.a)}; "
        f"B = {' '.join(args.b)}"
    )
    print("users            RMSE A   RMSE B   A - B    95 % interval")
    for name, (a_mse, b_mse) in [
        ("all", per_user),
        ("rating 1", (a[classes == 1], b[classes == 1])),
        ("rating 2", (a[classes == 2], b[classes == 2])),
    ]:
        diff, low, high = rmse_difference(a_mse, b_mse, rng)
        rmse_a, rmse_b = np.sqrt(a_mse.mean()), np.sqrt(b_mse.mean())
        print(
            f"{name:<8} {len(a_mse):>5}  {rmse_a:7.4f}  {rmse_b:7.4f}  {diff:+.4f}  "
            f"[{low:+.4f}, {high:+.4f}]"
        )


if __name__ == "__main__":
    main()
