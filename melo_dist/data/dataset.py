"""A prepared dataset as training and evaluation read it: manifest, window spec, task tables."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from melo_dist.config import DataConfig
from melo_dist.data.prepare import load_manifest
from melo_dist.data.tasks import TaskRows, WindowSpec
from melo_dist.errors import InputError
from melo_dist.storage import local_dataset


@dataclass
class Dataset:
    path: Path
    manifest: dict
    spec: WindowSpec
    valid: TaskRows  # the fixed validation users (data.valid_users x data.valid_targets)

    @cached_property
    def train(self) -> TaskRows:
        """The training users, read on first use (Ray workers get theirs from Ray Data)."""
        return self.split("train")

    def split(self, name: str) -> TaskRows:
        return TaskRows.from_parquet(str(self.path / f"tasks-{name}.parquet"))

    @property
    def num_items(self) -> int:
        return self.manifest["vocab_size"] - 1

    @property
    def levels(self) -> list[float]:
        return self.manifest["rating_levels"]


def window_spec(config: DataConfig) -> WindowSpec:
    """The task windows data.window / support / query describe."""
    return WindowSpec(config.window, config.support, config.query, config.support_windows)


def load_dataset(config: DataConfig) -> Dataset:
    """The dataset of `data.path`; a missing or foreign folder is an error naming it."""
    path = local_dataset(config.path)  # a URI: a local copy, fetched once
    manifest = load_manifest(path)
    valid = TaskRows.from_parquet(str(path / "tasks-valid.parquet"))
    if len(valid) == 0:  # training selects its checkpoints on them
        raise InputError(
            "the dataset has no validation users; prepare it again with --valid-fraction > 0",
            path=path / "tasks-valid.parquet",
        )
    if config.valid_users and len(valid) > config.valid_users:
        valid = valid.take(np.arange(config.valid_users))
    valid = valid.with_earlier_targets(config.valid_targets)
    return Dataset(path, manifest, window_spec(config), valid)
