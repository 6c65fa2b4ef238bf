"""The bias and factor reference points with each support rating weighted by its recency:
decay ** (age - 1), age = how many interactions before the target it lies; on the support as
the reference points fit it (every support window's positions, so a position counts once per
window holding it) and with each position once; and with the ridge's shrinks divided by a
scale (each weight times it). Validation RMSE and test RMSE.

    .venv/bin/python results/recency_baselines.py runs/study/ml1m-subset/data [valid,test,train] \
        [VALID_TARGETS]

(train: the training users' last ratings, which their own item statistics include.)
VALID_TARGETS: targets a validation user (default 3; test users are scored on their last).

The shrinks are the reference points' own (`melo_dist/training/baselines.py`); decay 1 at
scale 1 on the windows is the reference points as reported. Test RMSE is printed beside
validation, not used to choose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import load_config
from melo_dist.data.dataset import load_dataset
from melo_dist.training.baselines import (
    USER_SHRINK,
    bias_statistics,
    factor_design,
    recency_weights,
    ridge,
)
from melo_dist.training.evaluation import Targets, collect_targets, eval_batches, score

DECAYS = (1.0, 0.95, 0.9, 0.85, 0.8)
SCALES = (1, 4, 8, 12, 16)


def supports(targets: Targets, once: bool) -> tuple[np.ndarray, ...]:
    """(user, item, rating, age) of every support position, flat; `once`: each position once."""
    parts = []
    for item, rating, age in zip(
        targets.support_items, targets.support_ratings, targets.support_ages
    ):
        if once:
            _, first = np.unique(age, return_index=True)
            item, rating, age = item[first], rating[first], age[first]
        parts.append((item, rating, age))
    users = np.repeat(np.arange(len(parts)), [len(p[0]) for p in parts])
    return users, *(np.concatenate([p[k] for p in parts]) for k in range(3))


def main() -> None:
    valid_targets = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    config = load_config(
        None,
        [f"data.path={sys.argv[1]}", "data.valid_users=0", f"data.valid_targets={valid_targets}"],
    )
    data = load_dataset(config.data)
    mu, item_bias = bias_statistics(data.train, data.num_items)
    models = {
        "bias": (np.ones((data.num_items + 1, 1)), np.r_[USER_SHRINK]),
        "factor": factor_design(data.train, data.num_items),
    }
    names = (sys.argv[2] if len(sys.argv) > 2 else "valid,test").split(",")
    splits = {}
    for name in names:
        rows = data.valid if name == "valid" else data.split(name)  # valid: 3 targets a user
        batches = list(eval_batches(rows, data.spec, config.data.eval_seed))
        splits[name] = collect_targets(batches)
    print("support          model   decay scale" + "".join(f"  {name:>5} RMSE" for name in names))
    for once in (False, True):
        for model, (design, reg) in models.items():
            for decay in DECAYS:
                for scale in SCALES:
                    rmse = []
                    for targets in splits.values():
                        users, items, ratings, ages = supports(targets, once)
                        residual = ratings - mu - item_bias[items]
                        count = len(targets.item)
                        weight = scale * recency_weights(ages, decay)
                        weights = ridge(users, count, design[items], residual, reg, weight)
                        user_part = (design[targets.item] @ weights[:, :, None])[..., 0]
                        pred = mu + item_bias[targets.item] + user_part
                        rmse.append(score(pred, targets)["rmse"])
                    support = "each position" if once else "windows (ref.)"
                    figures = "".join(f"  {value:10.4f}" for value in rmse)
                    print(f"{support:16} {model:7} {decay:5.2f} {scale:5}{figures}", flush=True)


if __name__ == "__main__":
    main()
