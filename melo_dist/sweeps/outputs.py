"""A finished sweep's outputs: `results.csv` sorted by validation RMSE, the best trial's full
config as `best.yaml` (which `melo-dist train --config` takes as it is), and two PNG plots:
validation RMSE across trials, and each searched parameter's effect on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.ticker import MaxNLocator, NullFormatter

from melo_dist.errors import InputError
from melo_dist.plots import pyplot
from melo_dist.sweeps.space import SweepSpace

RESULTS, BEST, CURVES, EFFECTS = "results.csv", "best.yaml", "valid_rmse.png", "parameters.png"


@dataclass
class TrialRecord:
    trial: str  # Tune's trial id
    number: int  # launch order, from 0
    status: str  # completed | stopped early (ASHA) | errored
    best_valid_rmse: float  # NaN when the trial never validated
    iterations: int  # the last validated iteration
    params: dict  # the searched parameters' values
    history: pd.DataFrame  # iteration, valid_rmse
    error: str | None = None
    checkpoint: str = ""  # the trial's last checkpoint folder (last.pt, best.pt, metrics)


def results_table(records: list[TrialRecord]) -> pd.DataFrame:
    rows = [
        {
            "trial": r.trial,
            "number": r.number,
            "status": r.status,
            "best_valid_rmse": r.best_valid_rmse,
            "iterations": r.iterations,
            **r.params,
            "checkpoint": r.checkpoint,
            "error": r.error or "",
        }
        for r in records
    ]
    table = pd.DataFrame(rows).sort_values(["best_valid_rmse", "number"], na_position="last")
    return table.reset_index(drop=True)


def write_outputs(records: list[TrialRecord], space: SweepSpace, out: Path) -> pd.DataFrame:
    """Write results.csv, best.yaml and the plots into `out`; returns the results table."""
    table = results_table(records)
    out.mkdir(parents=True, exist_ok=True)  # with --storage, Tune wrote nothing here
    table.to_csv(out / RESULTS, index=False)
    scored = [r for r in records if not math.isnan(r.best_valid_rmse)]
    if not scored:
        first = next((r.error for r in records if r.error), "none reported")
        raise InputError(
            f"no trial of {len(records)} validated (first error: {first}); see {out / RESULTS}"
        )
    best = min(scored, key=lambda r: (r.best_valid_rmse, r.number))
    config = space.trial_config(best.params, out / "best-run")
    header = (
        f"# Best of {len(records)} trials of {space.path}: trial {best.trial}, "
        f"validation RMSE {best.best_valid_rmse:.4f}.\n"
        f"#   melo-dist train --config {out / BEST} --workers {space.trial.workers}\n"
    )
    text = header + yaml.safe_dump(config.to_dict(), sort_keys=False)
    (out / BEST).write_text(text)
    plot_curves(records, out / CURVES)
    plot_effects(table, space, out / EFFECTS)
    return table


def plot_curves(records: list[TrialRecord], path: Path) -> None:
    """Left: validation RMSE against iteration for every trial. Right: each trial's best, in
    launch order, and the best so far."""
    plt = pyplot()
    ordered = sorted(records, key=lambda r: r.number)
    figure, (curves, trials) = plt.subplots(1, 2, figsize=(11, 4))
    for record in ordered:
        history = record.history
        if len(history):
            curves.plot(history["iteration"], history["valid_rmse"], ".-", label=record.number)
    if len(ordered) <= 12:
        curves.legend(title="trial", fontsize="small")
    curves.set(xlabel="meta-iteration", ylabel="validation RMSE", title="trials")
    best = [r.best_valid_rmse for r in ordered]
    so_far = pd.Series(best).cummin()
    trials.scatter(range(len(best)), best, label="trial best")
    trials.step(range(len(best)), so_far, where="post", color="black", label="best so far")
    errored = [i for i, r in enumerate(ordered) if r.status == "errored"]
    if errored:
        low = min((b for b in best if not math.isnan(b)), default=0.0)
        trials.scatter(errored, [low] * len(errored), marker="x", color="red", label="errored")
    trials.set(xlabel="trial (launch order)", ylabel="best validation RMSE", title="sweep")
    trials.xaxis.set_major_locator(MaxNLocator(integer=True))
    trials.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_effects(table: pd.DataFrame, space: SweepSpace, path: Path) -> None:
    """One panel per searched parameter: its value against the trial's best validation RMSE."""
    plt = pyplot()
    keys = list(space.search)
    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    scored = table.dropna(subset=["best_valid_rmse"])
    # ASHA-stopped trials are hollow: their best comes from a shorter run
    styles = {"completed": {"color": "C0"}, "stopped early": {"facecolors": "none", "color": "C0"}}
    for axis, key in zip(axes[0], keys):
        dist = space.search[key]
        for status, style in styles.items():
            rows = scored[scored["status"] == status]
            x = [dist.values.index(v) for v in rows[key]] if dist.kind == "choice" else rows[key]
            axis.scatter(x, rows["best_valid_rmse"], label=status, **style)
        if dist.kind == "choice":  # categories at fixed positions, labelled
            axis.set_xticks(range(len(dist.values)), [str(v) for v in dist.values])
        elif dist.kind == "randint":
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif dist.kind == "loguniform":
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())  # no overlapping minor labels
        axis.set(xlabel=key, ylabel="best validation RMSE")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
