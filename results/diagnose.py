"""What adaptation does for a trained checkpoint: RMSE after 0, 1, ..., J inner steps on a
split's users, and the learned inner learning rates (LSLR) per parameter group and step.

    .venv/bin/python results/diagnose.py runs/study/ml1m-subset/maml-sasrec-s0 --split valid

0 steps is the meta-learned initialisation (for the bias head: the item-bias predictor plus
what the sequence adds); the last is what evaluation scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import Config
from melo_dist.data.dataset import load_dataset
from melo_dist.meta import learner_from_state
from melo_dist.training.checkpoint import load_checkpoint
from melo_dist.training.evaluation import collect_targets, eval_batches, score


def rmse_by_steps(learner, batches, targets) -> list[float]:
    """RMSE of each query target after 0..J inner steps (0: the initialisation)."""
    learner.eval()
    per_step = [[] for _ in range(learner.steps + 1)]
    for batch in batches:
        local, rows = batch.with_local_items()
        support = (local.support_items, local.support_ratings, local.support_mask)
        with torch.enable_grad():
            trajectory = learner.adapt(rows, *support, create_graph=False)
        start = learner.task_params(rows)
        with torch.no_grad():
            for step, fast in enumerate([start, *trajectory]):
                pred = learner.forward_tasks(fast, local.query_items)[..., -1] * learner.scale
                per_step[step].append(pred)
    return [score(torch.cat(p).numpy(), targets)["rmse"] for p in per_step]


def weights_by_rating(learner, batches) -> dict[float, float]:
    """MELO's mean inner-loss weight per rating level over the support positions, relative to
    the task's mean weight (1 = average; what the encoder up- or down-weights)."""
    totals: dict[float, list[float]] = {}
    with torch.no_grad():
        for batch in batches:
            weights = learner.weight_net(batch.support_ratings, batch.support_mask)
            if weights is None:
                return {}
            mask = batch.support_mask
            task_mean = (weights * mask).sum((-2, -1)) / mask.sum((-2, -1)).clamp(min=1)
            relative = weights / task_mean[:, None, None].clamp(min=1e-12)
            for level in batch.support_ratings[mask].unique().tolist():
                chosen = mask & (batch.support_ratings == level)
                totals.setdefault(level, []).append(relative[chosen])
    return {level: float(torch.cat(parts).mean()) for level, parts in sorted(totals.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint file or run folder (best.pt)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = load_checkpoint(args.checkpoint)
    config = Config.from_dict(state["config"])
    data = load_dataset(config.data)
    learner = learner_from_state(state)
    rows = data.split(args.split)
    batches = list(eval_batches(rows, data.spec, config.data.eval_seed))
    rmse = rmse_by_steps(learner, batches, collect_targets(batches))
    print(f"{args.checkpoint} (iteration {state['iteration']}), {args.split} users:")
    print("  RMSE after 0..J inner steps: " + " / ".join(f"{r:.4f}" for r in rmse))
    weights = weights_by_rating(learner, batches)
    if weights:
        print("  inner-loss weight per support rating (relative to the task's mean):")
        print("    " + "  ".join(f"r={level:g}: {w:.3f}" for level, w in weights.items()))
    print("  learned inner learning rates per step:")
    for key, rates in learner.inner_lrs.items():
        if key == "log_user_damping":  # [steps, groups]: the user bias, then the factors
            key, rates = "user damping (bias, factors)", rates.exp().T.flatten()
        print(f"    {key.replace('__', '.'):<32} " + " ".join(f"{r:+.4f}" for r in rates.tolist()))


if __name__ == "__main__":
    main()
