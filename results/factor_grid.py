"""How the factor reference point's settings were chosen: validation RMSE (3 targets per user)
and test RMSE of the ridge fold-in for item factors of k dimensions and fold-in ridges.

    .venv/bin/python results/factor_grid.py runs/study/ml1m-subset/data

The user bias keeps the bias model's shrink (USER_SHRINK); `melo_dist/training/baselines.py`
ships the setting with the lowest validation RMSE. Test RMSE is printed beside it for the
findings, not used to choose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import load_config
from melo_dist.data.dataset import load_dataset
from melo_dist.training.baselines import USER_SHRINK, bias_statistics, item_factors, ridge
from melo_dist.training.evaluation import collect_targets, eval_batches, score


def main() -> None:
    config = load_config(
        None, [f"data.path={sys.argv[1]}", "data.valid_users=0", "data.valid_targets=3"]
    )
    data = load_dataset(config.data)
    mu, item_bias = bias_statistics(data.train, data.num_items)
    splits = {
        "valid": collect_targets(list(eval_batches(data.valid, data.spec, 0))),
        "test": collect_targets(list(eval_batches(data.split("test"), data.spec, 0))),
    }
    print("k   ridge  valid RMSE  test RMSE")
    for k in (4, 16, 32):
        design = np.concatenate(
            [np.ones((data.num_items + 1, 1)), item_factors(data.train, data.num_items, k)], 1
        )
        for shrink in (10.0, 30.0, 100.0):
            rmse = []
            for targets in splits.values():
                users = np.repeat(
                    np.arange(len(targets.support_items)), [len(i) for i in targets.support_items]
                )
                items = np.concatenate(targets.support_items).astype(np.int64)
                residual = np.concatenate(targets.support_ratings) - mu - item_bias[items]
                reg = np.r_[USER_SHRINK, np.full(k, shrink)]
                weights = ridge(users, len(targets.support_items), design[items], residual, reg)
                pred = (
                    mu
                    + item_bias[targets.item]
                    + (design[targets.item] @ weights[:, :, None])[..., 0]
                )
                rmse.append(score(pred, targets)["rmse"])
            print(f"{k:<3} {shrink:5.0f}  {rmse[0]:10.4f}  {rmse[1]:9.4f}", flush=True)


if __name__ == "__main__":
    main()
