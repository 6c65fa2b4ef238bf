"""Shared fixtures: the real data folder and one small prepared synthetic dataset per session."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from melo_dist.config import Config
from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.synthetic import SyntheticSpec, generate_ratings
from melo_dist.paths import shared_data_dir
from melo_dist.training.loop import train_local

# Tests use tiny models: a second torch thread only adds waiting, and on a busy machine an
# OpenMP thread that has to wait for a core turns a microsecond matmul into ~15 ms.
torch.set_num_threads(1)


def shared_file(relative: str) -> Path:
    """A file under ../shared/data (or $MELO_DATA_DIR); skip the test, saying why, if absent."""
    path = shared_data_dir() / relative
    if not path.exists():
        pytest.skip(f"real data file {path} is absent (set MELO_DATA_DIR to the data folder)")
    return path


def tiny_config(
    data_dir, out, iterations: int = 6, *, tasks: int = 4, validate_every: int = 2, **meta
) -> Config:
    """A seconds-fast run: tiny GRU4Rec, short windows, no dropout (runs compare exactly)."""
    config = Config()
    config.data.path, config.data.valid_users = str(data_dir), 30
    config.data.window, config.data.support, config.data.query = 10, 4, 2
    config.model.backbone, config.model.dim, config.model.heads = "gru4rec", 8, 2
    config.model.max_length, config.model.encoder_hidden, config.model.dropout = 10, 8, 0.0
    config.meta.tasks_per_batch, config.meta.inner_steps = tasks, 2
    config.optim.iterations = iterations
    config.meta.multi_step_iterations = min(2, iterations - 1)
    for key, value in meta.items():
        setattr(config.meta, key, value)
    config.run.out, config.run.validate_every, config.run.log_every = str(out), validate_every, 1
    return config.validate()


def write(path: Path, content: str | bytes) -> Path:
    """Write a test input file: text into a name ending in .gz is gzip-compressed, bytes are
    written as they are (so corrupt archives can be made too)."""
    if isinstance(content, str):
        data = content.encode()
        content = gzip.compress(data) if path.name.endswith(".gz") else data
    path.write_bytes(content)
    return path


@pytest.fixture(scope="session", autouse=True)
def storage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local copies of folders at URIs go to a session folder (Ray workers inherit it)."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["MELO_DIST_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic dataset (600 users) shared by the whole session; treat as read-only."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    ratings = generate_ratings(SyntheticSpec(users=600, items=300, seed=1))
    settings = PrepareSettings(min_item_ratings=20, test_users=120, seed=0)
    prepare(ratings, out, settings, {"family": "synthetic", "format": "synthetic"})
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (started on first use). With the
    dashboard: sweeps need its state API to release finished trials' workers."""
    import ray

    from melo_dist.inference.serve import serve_environment

    serve_environment()  # Serve's settings, as `serving` gives them to the Ray it starts
    ray.init(
        address="local",  # its own instance, even where another Ray cluster runs on the machine
        num_cpus=2,
        object_store_memory=200 * 1024**2,
        include_dashboard=True,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained(synthetic_dir, tmp_path_factory):
    """A tiny MELO run with the bias head and user factors (what the recipe ships)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = tiny_config(synthetic_dir, out, iterations=4, adapt="head")
    config.model.user_factors = 3
    train_local(config, log=lambda message: None)
    return out


def original_ids(data_dir) -> list[str]:
    """Prepared item id -> the original id, from the item map."""
    table = pq.read_table(data_dir / "item_map.parquet")
    ids = [""] * (max(table.column("item").to_pylist()) + 1)
    for item, item_id in zip(table.column("item").to_pylist(), table.column("item_id").to_pylist()):
        ids[item] = item_id
    return ids
