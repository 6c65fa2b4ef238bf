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
from melo_dist.meta import learner_from_state
from melo_dist.report.learned import rmse_by_steps, weights_by_rating
from melo_dist.training.checkpoint import load_checkpoint
from melo_dist.training.evaluation import model_batches, split_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint file or run folder (best.pt)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument(
        "--targets", type=int, default=1, help="score each user on its K last interactions"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = load_checkpoint(args.checkpoint)
    config = Config.from_dict(state["config"])
    learner = learner_from_state(state)
    data, batches, targets = split_targets(config, args.split, args.targets)
    batches = model_batches(config, data, args.split, batches, args.targets)
    rmse = rmse_by_steps(learner, batches, targets)
    scored = f"{args.split} users" + (f", {args.targets} targets each" if args.targets > 1 else "")
    print(f"{args.checkpoint} (iteration {state['iteration']}), {scored}:")
    print("  RMSE after 0..J inner steps: " + " / ".join(f"{r:.4f}" for r in rmse))
    weights = weights_by_rating(learner, batches)
    if weights:
        print("  inner-loss weight per support rating (relative to the task's mean):")
        print("    " + "  ".join(f"r={level:g}: {w:.3f}" for level, w in weights.items()))
    print("  learned inner learning rates per step:")
    for key, rates in learner.inner_lrs.items():
        if key == "log_user_damping":  # [steps, groups]: the user bias, then the factors
            key, rates = "user damping (bias, factors)", rates.exp().T.flatten()
        if key == "recency_decay":  # meta.recency: one value, per interaction before the target
            key, rates = "recency decay", rates.reshape(1)
        print(f"    {key.replace('__', '.'):<32} " + " ".join(f"{r:+.4f}" for r in rates.tolist()))


if __name__ == "__main__":
    main()
