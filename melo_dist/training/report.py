"""Scoring checkpoints on a split, with the reference points, as a table and as JSON."""

from __future__ import annotations

from pathlib import Path

from melo_dist.config import Config
from melo_dist.data.tasks import TaskRows
from melo_dist.errors import InputError
from melo_dist.meta import build_learner
from melo_dist.training.checkpoint import load_checkpoint, manifest_hash
from melo_dist.training.evaluate import (
    collect_targets,
    eval_batches,
    evaluate_learner,
    reference_points,
)
from melo_dist.training.loop import load_dataset


def evaluate_checkpoints(
    paths: list[str], split: str = "test", data_path: str | None = None, references: bool = True
) -> dict[str, dict]:
    """{name: metrics} for each checkpoint (named by its run folder and regime) and, optionally,
    the four reference points, all on the same targets of `split`."""
    states = [load_checkpoint(path) for path in paths]
    config = Config.from_dict(states[0]["config"])
    if data_path:
        config.data.path = data_path
    data = load_dataset(config)
    rows = TaskRows.from_parquet(str(Path(config.data.path) / f"tasks-{split}.parquet"))
    batches = list(eval_batches(rows, data.spec, config.data.eval_seed))
    targets = collect_targets(batches)
    results = {}
    for path, state in zip(paths, states):
        run_config = Config.from_dict(state["config"])
        if state["manifest_sha256"] != manifest_hash(config.data.path):
            raise InputError(f"trained on a different dataset than {config.data.path}", path=path)
        learner = build_learner(run_config, state["num_items"], state["rating_levels"])
        learner.load_state_dict(state["learner"])
        name = f"{run_config.meta.regime} {run_config.model.backbone} ({Path(path).name})"
        results[name] = {
            **evaluate_learner(learner, batches, targets),
            "iteration": state["iteration"],
        }
    if references:
        results.update(reference_points(data.train, targets, data.num_items))
    return results


def format_results(results: dict[str, dict], split: str) -> str:
    """RMSE/MAE per model, then RMSE per rating class (users whose target has that rating)."""
    classes = sorted(
        {k[5:] for m in results.values() for k in m if k.startswith("rmse_")}, key=float
    )
    width = max(len(name) for name in results)
    header = f"{'model':<{width}}  {'RMSE':>7} {'MAE':>7}  " + " ".join(
        f"{'r=' + c:>7}" for c in classes
    )
    lines = [
        f"{split}: {next(iter(results.values()))['users']} users, last query position",
        header,
        "-" * len(header),
    ]
    for name, m in results.items():
        lines.append(
            f"{name:<{width}}  {m['rmse']:7.4f} {m['mae']:7.4f}  "
            + " ".join(f"{m.get('rmse_' + c, float('nan')):7.4f}" for c in classes)
        )
    counts = next(iter(results.values()))
    lines.append(
        f"{'users per class':<{width}}  {'':>15}  "
        + " ".join(f"{counts.get('users_' + c, 0):7d}" for c in classes)
    )
    return "\n".join(lines)
