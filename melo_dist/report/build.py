"""`melo-dist report RUN... --split test --out DIR`: what the runs learned, as report.md and a
self-contained report.html (figures embedded) beside their PNG figures.

The runs (local or Ray run folders: both hold best.pt and metrics.jsonl) must share a dataset.
Test scores come from `evaluate_checkpoints`, the figures of what was learned from the runs'
validation users.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from melo_dist.config import Config, flat_settings
from melo_dist.data.dataset import load_dataset
from melo_dist.data.prepare import user_balance
from melo_dist.errors import InputError
from melo_dist.meta import learner_from_state
from melo_dist.report import figures
from melo_dist.report.learned import (
    inner_learning_rates,
    rmse_by_steps,
    weights_by_position,
    weights_by_rating,
)
from melo_dist.training.checkpoint import BEST, LAST, METRICS, load_checkpoint, read_metrics
from melo_dist.training.evaluation import (
    collect_targets,
    eval_batches,
    evaluate_checkpoints,
    format_results,
)

FIGURES = {
    "curves": "learning-curves.png",
    "classes": "rmse-per-class.png",
    "weights": "inner-loss-weights.png",
    "rates": "inner-learning-rates.png",
    "dataset": "dataset.png",
}


def run_folder(path: str) -> Path:
    """A run folder with a checkpoint and its validation records, or an error naming it."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError("not a run folder (melo-dist train's run.out)", path=folder)
    if not (folder / BEST).exists() and not (folder / LAST).exists():
        raise InputError(
            "has no checkpoint yet: the run has not reached its first validation", path=folder
        )
    if not (folder / METRICS).exists():
        raise InputError(f"has a checkpoint but no {METRICS}", path=folder)
    return folder


def differing_settings(configs: dict[str, dict]) -> list[tuple[str, list]]:
    """(section.key, [value per run]) for every setting that is not the same in all runs."""
    flat = {name: flat_settings(config) for name, config in configs.items()}
    keys = next(iter(flat.values()))
    rows = [(key, [values[key] for values in flat.values()]) for key in keys]
    return [(key, values) for key, values in rows if len({repr(v) for v in values}) > 1]


def write_report(
    paths: list[str],
    split: str,
    out: str | Path,
    progress: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write report.md, report.html and the figures into `out`; returns report.md's path."""
    folders = [run_folder(path) for path in paths]
    names = [folder.name for folder in folders]
    if len(set(names)) < len(names):
        names = [str(folder) for folder in folders]
    states = {name: load_checkpoint(folder) for name, folder in zip(names, folders)}
    curves = {name: read_metrics(folder) for name, folder in zip(names, folders)}
    progress(f"scoring {len(folders)} run(s) and the reference points on the {split} users")
    results = evaluate_checkpoints([str(f) for f in folders], split)
    config = Config.from_dict(next(iter(states.values()))["config"])
    data = load_dataset(config.data)
    batches = list(eval_batches(data.valid, data.spec, config.data.eval_seed))
    targets = collect_targets(batches)

    progress("reading what the runs learned on the validation users")
    learners = {name: learner_from_state(state) for name, state in states.items()}
    meta = {name: learner for name, learner in learners.items() if hasattr(learner, "adapt")}
    by_rating = {name: weights_by_rating(learner, batches) for name, learner in meta.items()}
    by_rating = {name: weights for name, weights in by_rating.items() if weights}
    by_position = {name: weights_by_position(learner, batches) for name, learner in meta.items()}
    by_position = {name: weights for name, weights in by_position.items() if weights}
    steps = {name: rmse_by_steps(learner, batches, targets) for name, learner in meta.items()}
    rates = {name: inner_learning_rates(learner) for name, learner in meta.items()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted({k[5:] for m in results.values() for k in m if k.startswith("rmse_")})
    levels = data.levels
    train = data.train
    users = np.repeat(np.arange(len(train)), train.lengths)
    cells = users * len(levels) + np.searchsorted(levels, train.ratings)
    counts = np.bincount(cells, minlength=len(train) * len(levels)).reshape(-1, len(levels))
    drawn = {
        "curves": figures.learning_curves(curves, out / FIGURES["curves"]),
        "classes": figures.rmse_per_class(results, classes, split, out / FIGURES["classes"]),
        "dataset": figures.dataset(
            levels,
            [data.manifest["rating_histogram"][f"{level:g}"] for level in levels],
            user_balance(counts, len(levels)),
            out / FIGURES["dataset"],
        ),
    }
    if by_rating:
        drawn["weights"] = figures.inner_loss_weights(
            by_rating, by_position, out / FIGURES["weights"]
        )
    if rates:
        drawn["rates"] = figures.inner_learning_rates(rates, out / FIGURES["rates"])

    text = markdown(split, names, states, curves, results, steps, by_rating, drawn, data.path)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(as_html(text, out))
    return out / "report.md"


def markdown(split, names, states, curves, results, steps, by_rating, drawn, data_path):
    lines = [
        f"# melo-dist report: {', '.join(names)}",
        "",
        f"Dataset `{shown_path(data_path)}`; {split} scores of each run's best checkpoint "
        "(chosen on validation users), next to the reference points fitted on the same "
        "support sets.",
        "",
        "## Runs",
        "",
        "| run | regime | backbone | best iteration | best valid RMSE | last iteration |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        run = Config.from_dict(states[name]["config"])
        best = min(curves[name], key=lambda record: record["valid_rmse"])
        lines.append(
            f"| {name} | {run.meta.regime} | {run.model.backbone} | {best['iteration']} | "
            f"{best['valid_rmse']:.4f} | {curves[name][-1]['iteration']} |"
        )
    configs = {name: states[name]["config"] for name in names}
    differing = differing_settings(configs) if len(names) > 1 else []
    if differing:
        lines += ["", "Settings that differ between the runs:", ""]
        lines += ["| setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {key} | " + " | ".join(map(str, values)) + " |" for key, values in differing]
    lines += ["", "## Learning curves", "", f"![learning curves]({FIGURES['curves']})", ""]
    lines += [f"## {split.capitalize()} RMSE", "", "```", format_results(results, split), "```"]
    lines += ["", f"![RMSE per rating class]({FIGURES['classes']})", ""]
    lines += ["## What adaptation does", ""]
    if steps:
        lines += ["Validation RMSE after 0 (the meta-learned initialisation), 1, ... inner steps:"]
        lines += [""] + [
            f"- {name}: " + " → ".join(f"{value:.4f}" for value in values)
            for name, values in steps.items()
        ]
    if by_rating:
        lines += ["", "The learned inner-loss weights, relative to each task's mean weight:"]
        lines += [""] + [
            f"- {name}: " + ", ".join(f"rating {k:g}: {v:.2f}" for k, v in weights.items())
            for name, weights in by_rating.items()
        ]
        lines += ["", f"![inner-loss weights]({FIGURES['weights']})"]
    if "rates" in drawn:
        lines += ["", f"![inner learning rates]({FIGURES['rates']})"]
    lines += ["", "## The dataset", "", f"![dataset]({FIGURES['dataset']})", ""]
    return "\n".join(lines)


def shown_path(path: Path) -> str:
    """A path relative to the working folder where it lies inside it (reports get committed)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def as_html(text: str, folder: Path) -> str:
    """The markdown as one self-contained page: the figures embedded, tables and code kept."""
    body, table, code = [], [], False
    for line in [*text.splitlines(), ""]:
        if line.startswith("```"):
            body.append("</pre>" if code else "<pre>")
            code = not code
            continue
        if code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                cells = [html.escape(cell.strip()) for cell in line.strip("|").split("|")]
                table.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            data = base64.b64encode((folder / image.group(2)).read_bytes()).decode()
            body.append(
                f'<img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">'
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}td{padding:2px 8px}"
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>\n" + "\n".join(body)
