"""Would averaging models reach the aim? Seed ensembles of a study's runs, and a blend with a
reference point, on validation and test users.

    .venv/bin/python results/ensemble.py runs/study/ml1m-subset melo-sasrec melo-gru4rec \
        [--reference "factor + recency"] [--valid-targets 10]

For each run prefix (e.g. `melo-sasrec`: its seeds `-s0`, `-s1`, ...), the RMSE of each seed,
of the seeds' averaged predictions, and of w * ensemble + (1 - w) * reference (default the
factor model) for the w in 0, 0.1, ..., 1 that is best on the validation users (all of them,
each on its `--valid-targets` last interactions, default 1). Test users are scored with the w
chosen on validation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from melo_dist.config import Config
from melo_dist.meta import learner_from_state
from melo_dist.training.checkpoint import load_checkpoint
from melo_dist.training.evaluation import (
    learner_predictions,
    model_batches,
    reference_predictions,
    score,
    split_targets,
)

BLEND_WEIGHTS = np.linspace(0, 1, 11)


def predictions(
    runs: dict[str, list[Path]], split: str, reference: str, targets_per_user: int
) -> tuple[dict, np.ndarray, object]:
    """{prefix: [U, Q] per seed}, the reference point's [U, Q], and the targets of `split`."""
    first = load_checkpoint(next(iter(runs.values()))[0])
    config = Config.from_dict(first["config"])
    data, batches, targets = split_targets(config, split, targets_per_user)

    def predict(path: Path) -> np.ndarray:
        state = load_checkpoint(path)
        config = Config.from_dict(state["config"])
        own = model_batches(config, data, split, batches, targets_per_user)
        return learner_predictions(learner_from_state(state), own)

    seeds = {prefix: [predict(p) for p in paths] for prefix, paths in runs.items()}
    references = reference_predictions(data.train, targets, data.num_items)
    if reference not in references:
        raise SystemExit(f"--reference {reference!r} is not one of {sorted(references)}")
    return seeds, references[reference], targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", help="a study's run folders, e.g. runs/study/ml1m-subset")
    parser.add_argument("prefixes", nargs="+", help="run names without their -sN seed suffix")
    parser.add_argument("--reference", default="factor model", help="the reference to blend")
    parser.add_argument("--valid-targets", type=int, default=1, help="targets a validation user")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {p: sorted(Path(args.work).glob(f"{p}-s*")) for p in args.prefixes}
    if missing := [p for p, paths in runs.items() if not paths]:
        raise SystemExit(f"no run folders {args.work}/<prefix>-sN for {missing}")
    chosen = {}
    for split in ("valid", "test"):
        per_user = args.valid_targets if split == "valid" else 1
        seeds, reference, targets = predictions(runs, split, args.reference, per_user)
        for prefix, each in seeds.items():
            rmse = [score(p, targets)["rmse"] for p in each]
            ensemble = np.mean(each, axis=0)
            blends = {
                w: score(w * ensemble + (1 - w) * reference, targets)["rmse"] for w in BLEND_WEIGHTS
            }
            if split == "valid":
                chosen[prefix] = min(blends, key=blends.get)
            w = chosen[prefix]
            print(
                f"{split:<5} {prefix:<14} seeds {' '.join(f'{r:.4f}' for r in rmse)}  "
                f"ensemble of {len(each)} {score(ensemble, targets)['rmse']:.4f}  "
                f"{args.reference} {score(reference, targets)['rmse']:.4f}  "
                f"blend (w={w:.1f}, chosen on valid) {blends[w]:.4f}"
            )


if __name__ == "__main__":
    main()
