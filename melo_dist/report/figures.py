"""The report's figures, one PNG each: small, labelled axes, a legend where runs are compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from melo_dist.plots import pyplot

SIZE = (9.0, 3.4)  # inches: two panels side by side
DPI = 90


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot().close(figure)
    return path


def learning_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Meta-loss and validation RMSE against the iteration, every run overlaid."""
    figure, (loss, rmse) = pyplot().subplots(1, 2, figsize=SIZE)
    for name, records in curves.items():
        iterations = [r["iteration"] for r in records]
        loss.plot(iterations, [r["loss"] for r in records], marker=".", label=name)
        rmse.plot(iterations, [r["valid_rmse"] for r in records], marker=".", label=name)
    loss.set(xlabel="meta-iteration", ylabel="meta-loss (query MSE, rating / scale)")
    rmse.set(xlabel="meta-iteration", ylabel="validation RMSE")
    rmse.legend(fontsize="small")
    return save(figure, path)


def rmse_per_class(results: dict[str, dict], classes: list[str], split: str, path: Path) -> Path:
    """RMSE per rating class (users whose target has that rating), every run and reference
    point side by side."""
    figure, axis = pyplot().subplots(figsize=(SIZE[0], SIZE[1] + 0.6))
    width = 0.8 / len(results)
    for index, (name, metrics) in enumerate(results.items()):
        values = [metrics.get(f"rmse_{c}", np.nan) for c in classes]
        axis.bar(np.arange(len(classes)) + index * width, values, width, label=name)
    axis.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, [f"rating {c}" for c in classes])
    axis.set(ylabel=f"{split} RMSE")
    axis.legend(fontsize="x-small", ncol=2)
    return save(figure, path)


def inner_loss_weights(
    by_rating: dict[str, dict[float, float]], by_position: dict[str, list[float]], path: Path
) -> Path:
    """The learned inner-loss weights, relative to each task's mean: per support rating level
    (left) and per window position (right; the last is each window's latest interaction)."""
    figure, (levels, positions) = pyplot().subplots(1, 2, figsize=SIZE)
    width = 0.8 / max(len(by_rating), 1)
    for index, (name, weights) in enumerate(by_rating.items()):
        x = np.arange(len(weights)) + index * width
        levels.bar(x, list(weights.values()), width, label=name)
        levels.set_xticks(x - index * width + 0.4 - width / 2, [f"{k:g}" for k in weights])
    levels.axhline(1.0, color="grey", linewidth=0.8)
    levels.set(xlabel="support rating", ylabel="mean weight / task's mean")
    for name, weights in by_position.items():
        positions.plot(range(1, len(weights) + 1), weights, marker=".", label=name)
    positions.axhline(1.0, color="grey", linewidth=0.8)
    positions.set(xlabel="window position (last = latest)", ylabel="mean weight / task's mean")
    positions.legend(fontsize="small")
    return save(figure, path)


def inner_learning_rates(rates: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """The learned inner learning rate of every adapted parameter at each inner step, one
    panel per run (negative rates are learned too: a step against the gradient)."""
    figure, axes = pyplot().subplots(1, len(rates), figsize=(SIZE[0], SIZE[1] + 0.8), squeeze=False)
    for axis, (name, groups) in zip(axes[0], rates.items()):
        for group, values in groups.items():
            axis.plot(range(1, len(values) + 1), values, marker=".", label=group)
        axis.set(title=name, xlabel="inner step", ylabel="learned inner learning rate")
        axis.set_xticks(range(1, len(next(iter(groups.values()))) + 1))
        if len(groups) <= 8:
            axis.legend(fontsize="x-small")
    return save(figure, path)


def dataset(levels: list[float], histogram: list[int], balance: np.ndarray, path: Path) -> Path:
    """The dataset's rating histogram (left) and its users' balance scores (right: the
    normalised entropy of each user's ratings; 0 = one rating level only)."""
    figure, (ratings, users) = pyplot().subplots(1, 2, figsize=SIZE)
    ratings.bar([f"{level:g}" for level in levels], histogram)
    ratings.set(xlabel="rating", ylabel="ratings")
    users.hist(balance, bins=20, range=(0, 1))
    users.set(xlabel="user balance score", ylabel="training users")
    return save(figure, path)
