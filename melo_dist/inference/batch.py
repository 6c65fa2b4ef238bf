"""Batch scoring (`melo-dist predict`): users' histories in, one Parquet file of predictions out.

Inputs are read on the driver and grouped per user; users are then scored in batches (one
batched inner loop each), in this process or, with `workers`, on a Ray Data actor pool whose
actors each load the model once. Either way the same `score_users` runs, and the driver streams
the results into a temporary file that is renamed onto `out` only when complete.

- histories: long format (RecBole's column names `user_id`, `item_id`, `rating`, and optionally
  `timestamp`, which orders each user's ratings; else file order), as Parquet, CSV or a RecBole
  `.inter` file (tab-separated, `name:type` headers), with the dataset's original item ids; or
  a task table of the checkpoint's prepared dataset (Parquet, one row per user with `item_id`
  and `rating` lists in time order, prepared item ids), such as its `tasks-test.parquet`.
- candidates: (user_id, item_id) pairs in the same formats; or `top_k`: every catalogue item
  the user has not rated, ranked by predicted rating (`rank` 1 = highest).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from melo_dist.errors import InputError
from melo_dist.inference.model import ColdStartModel

OUTPUT = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("prediction", pa.float32())]
)


def read_table(path: str | Path, needed: tuple[str, ...]) -> pd.DataFrame:
    """A Parquet, CSV or RecBole `.inter` table with the `needed` columns (ids as strings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        if path.suffix == ".parquet":
            frame = pq.read_table(path).to_pandas()
        else:
            sep = "\t" if path.suffix in (".inter", ".tsv") else ","
            frame = pd.read_csv(path, sep=sep, dtype=str)
            frame.columns = [column.split(":")[0] for column in frame.columns]  # RecBole types
    except (OSError, ValueError, pa.ArrowInvalid) as error:
        raise InputError(f"cannot read table: {error}", path=path) from None
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise InputError(f"lacks columns {missing} (has {list(frame.columns)})", path=path)
    for column in ("user_id", "item_id"):
        if column in frame and frame[column].dtype != object:
            frame[column] = frame[column].astype(str)
    return frame


def read_histories(path: str | Path, catalogue: list[str]) -> dict[str, tuple[list, list]]:
    """{user_id: (items, ratings)} in time order, original item ids: from long format, or from
    a prepared task table (its prepared ids 1..n mapped back through `catalogue`)."""
    frame = read_table(path, ("user_id", "item_id", "rating"))
    if len(frame) and isinstance(frame["item_id"].iloc[0], (list, np.ndarray)):  # task table
        histories = {}
        for line, (user, items, ratings) in enumerate(
            zip(frame["user_id"], frame["item_id"], frame["rating"])
        ):
            items = np.asarray(items)
            if len(items) and not (items.min() >= 1 and items.max() <= len(catalogue)):
                raise InputError(
                    f"row {line}: prepared item ids outside 1..{len(catalogue)}: not a task "
                    "table of this checkpoint's dataset",
                    path=path,
                )
            histories[str(user)] = ([catalogue[i - 1] for i in items], list(map(float, ratings)))
        return histories
    frame["rating"] = numeric(frame["rating"], "rating", path)
    if "timestamp" in frame:
        frame["timestamp"] = numeric(frame["timestamp"], "timestamp", path)
        frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    return {
        str(user): (group["item_id"].tolist(), group["rating"].tolist())
        for user, group in frame.groupby("user_id", sort=False)
    }


def numeric(column: pd.Series, name: str, path: str | Path) -> pd.Series:
    """A column as numbers (CSV columns are read as text); the first bad row is named."""
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna() & column.notna() | column.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"row {row}: {name} {column.iloc[row]!r} is not a number", path=path)
    return values


def read_candidates(path: str | Path, users: dict) -> dict[str, list[str]]:
    frame = read_table(path, ("user_id", "item_id"))
    unknown = sorted(set(frame["user_id"]) - set(users))
    if unknown:
        raise InputError(f"candidates for users without a history: {unknown[:5]}", path=path)
    return {str(user): group["item_id"].tolist() for user, group in frame.groupby("user_id")}


def score_users(
    model: ColdStartModel, records: list[dict], top_k: int = 0, chunk: int = 256
) -> pa.Table:
    """Predictions for `records` [{user_id, items, ratings, candidates}] adapted together; with
    `top_k`, each user's best `top_k` unrated catalogue items instead of its candidates."""
    histories = [(r["items"], r["ratings"]) for r in records]
    users = model.adapt_many(histories, [r["user_id"] for r in records])
    if top_k:
        catalogue = np.array(model.catalogue, dtype=object)  # item id i is catalogue[i - 1]
        everything = np.arange(1, len(catalogue) + 1)
        scores = users.predict_ids([everything] * len(records), chunk)
        candidates = []
        for record, score in zip(records, scores):
            rated = np.asarray(model.item_ids(record["items"], f"history of {record['user_id']}"))
            score[rated - 1] = -np.inf
            best = np.argsort(-score, kind="stable")[:top_k]
            candidates.append((catalogue[best], score[best]))
    else:
        lists = [list(r["candidates"]) for r in records]
        candidates = list(zip(lists, users.predict(lists, chunk)))
    user_ids = [r["user_id"] for r, (items, _) in zip(records, candidates) for _ in items]
    columns = {
        "user_id": pa.array(user_ids, pa.string()),
        "item_id": pa.array([str(i) for items, _ in candidates for i in items], pa.string()),
        "prediction": pa.array(np.concatenate([s for _, s in candidates]), pa.float32()),
    }
    if top_k:
        columns["rank"] = pa.array(
            np.concatenate([np.arange(1, len(items) + 1) for items, _ in candidates]), pa.int32()
        )
    return pa.table(columns)


class Scorer:
    """A Ray Data actor: loads the model once, scores batches of user records."""

    def __init__(self, checkpoint: str, data: str | None, top_k: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.model, self.top_k = ColdStartModel.load(checkpoint, data), top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        keys = list(batch)
        records = [dict(zip(keys, values)) for values in zip(*batch.values())]
        return score_users(self.model, records, self.top_k)


def predict_file(
    checkpoint: str,
    users_path: str,
    out: str | Path,
    *,
    candidates_path: str | None = None,
    top_k: int = 0,
    data: str | None = None,
    workers: int = 0,
    batch_users: int = 64,
    progress: Callable[[str], None] = lambda message: None,
) -> int:
    """Score every user of `users_path` into `out` (Parquet, atomic); returns the rows written."""
    if (candidates_path is None) == (top_k == 0) or top_k < 0:
        raise InputError("give either candidates or top_k (> 0), not both")
    if batch_users < 1:
        raise InputError(f"batch_users must be at least 1, got {batch_users}")
    model = ColdStartModel.load(checkpoint, data)  # checks the inputs' model before any work
    histories = read_histories(users_path, model.catalogue)
    candidates = read_candidates(candidates_path, histories) if candidates_path else {}
    records = [
        {
            "user_id": user,
            "items": items,
            "ratings": ratings,
            "candidates": candidates.get(user, []),
        }
        for user, (items, ratings) in histories.items()
        if top_k or user in candidates
    ]
    if not records:
        raise InputError("no user has both a history and candidates", path=users_path)
    for record in records:  # every user's input is checked before any is scored
        model.checked_history(record["user_id"], record["items"], record["ratings"])
        model.item_ids(record["candidates"], f"candidates of user {record['user_id']}")
    if workers:
        tables = score_on_ray(records, checkpoint, data, top_k, workers, batch_users)
    else:
        tables = (
            score_users(model, records[start : start + batch_users], top_k)
            for start in range(0, len(records), batch_users)
        )
    return write_atomically(tables, Path(out), len(records), progress, top_k)


def score_on_ray(
    records: list[dict], checkpoint: str, data: str | None, top_k: int, workers: int, batch: int
) -> Iterator[pa.Table]:
    import ray

    from melo_dist.distributed.train import connect

    connect()
    dataset = ray.data.from_items(records).map_batches(
        Scorer,
        fn_constructor_kwargs={
            "checkpoint": str(Path(checkpoint).resolve()),
            "data": data,
            "top_k": top_k,
        },
        batch_size=batch,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=1,
    )
    return dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def write_atomically(
    tables: Iterator[pa.Table], out: Path, users: int, progress: Callable[[str], None], top_k: int
) -> int:
    schema = OUTPUT.append(pa.field("rank", pa.int32())) if top_k else OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    rows, scored = 0, set()
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in tables:
                writer.write_table(table.select(schema.names).cast(schema))
                rows += table.num_rows
                scored.update(table.column("user_id").to_pylist())
                progress(f"scored {len(scored):,}/{users:,} users")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rows
