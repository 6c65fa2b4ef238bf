"""Preparation: canonical ratings -> filtered, time-ordered, split Parquet task tables.

The protocol follows the MELO reference's (DESIGN §2; `--protocol melo` is its exact ML-1M
settings, the default one keeps small datasets usable): drop items with fewer than
`min_item_ratings` ratings, then users with fewer than `min_user_ratings` (one pass each, in
that order); order each user's interactions by time, breaking ties by item id so the order
never depends on the file's row order; split users (never items) into seeded, disjoint
test / valid / train sets.

Duplicate policy: rows with the same (user, item, timestamp) are one event recorded twice;
the last occurrence in the file wins and the others are counted in the manifest.

The output folder is built in a temporary sibling and renamed into place only when complete,
so a failed run leaves nothing behind and never replaces a good dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from melo_dist import __version__
from melo_dist.errors import InputError
from melo_dist.storage import clear, is_empty, is_uri, local_dataset, push, read_bytes

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
PREPARED_KEYS = {"package_version", "settings", "counts", "tables_sha256"}


# Filter and split presets: (min_item_ratings, min_user_ratings, test_users). `default` works
# on datasets of a few hundred users (test_users 0: min(1000, 20 % of the users)); `melo` is
# the reference's ML-1M protocol (DESIGN §2).
PROTOCOLS = {"default": (5, 5, 0), "melo": (50, 5, 1000)}
AUTO_TEST_USERS, AUTO_TEST_FRACTION = 1000, 0.2
KEPT_WARNING = 0.5  # say so when the filters drop more than half of the ratings


@dataclass(frozen=True)
class PrepareSettings:
    protocol: str = field(
        default="default",
        metadata={
            "help": "filter and split preset: default (items with >= 5 ratings, then users >= "
            "5; test users min(1000, 20 %%)) or melo (the reference's: items >= 50, 1000 test "
            "users); the flags below override it"
        },
    )
    min_item_ratings: int = field(
        default=0, metadata={"help": "item filter, first; 0: the protocol's"}
    )
    min_user_ratings: int = field(
        default=0, metadata={"help": "user filter, second; 0: the protocol's"}
    )
    test_users: float = field(
        default=0, metadata={"help": "test users: a count, a fraction < 1, or 0: the protocol's"}
    )
    valid_fraction: float = 0.15  # of the users left after the test draw
    seed: int = field(default=0, metadata={"help": "seed of the user split"})
    window: int = field(default=30, metadata={"help": "for the manifest's mean usable length"})

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(
                f"--protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}"
            )
        presets = dict(
            zip(("min_item_ratings", "min_user_ratings", "test_users"), PROTOCOLS[self.protocol])
        )
        for name, preset in presets.items():
            if getattr(self, name) == 0:
                object.__setattr__(self, name, preset)
        if self.min_item_ratings < 1 or self.min_user_ratings < 2:
            raise InputError("min_item_ratings must be >= 1 and min_user_ratings >= 2")
        if not (
            self.test_users >= 0 and (self.test_users < 1 or float(self.test_users).is_integer())
        ):
            raise InputError(
                f"test_users must be a count >= 1, a fraction in (0, 1) or 0 (the protocol's), "
                f"got {self.test_users}"
            )
        if self.seed < 0 or self.window < 2:
            raise InputError(
                f"--seed must be >= 0 and --window >= 2, got {self.seed}, {self.window}"
            )
        if not 0 < self.valid_fraction < 1:  # training validates on these users: none is an error
            raise InputError(
                f"--valid-fraction must be in (0, 1), got {self.valid_fraction}: training selects "
                "its checkpoints on the validation users"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def natural_order(ids: pd.Index | pd.Series) -> np.ndarray:
    """Indices that sort ids numerically when they are all integers, else as text."""
    values = pd.Series(ids, dtype="string")
    if values.str.fullmatch(r"\d{1,18}").all():
        return np.argsort(values.astype("int64").to_numpy(), kind="stable")
    return np.argsort(values.to_numpy(dtype=object), kind="stable")


def filter_and_order(ratings: pd.DataFrame, settings: PrepareSettings) -> tuple[pd.DataFrame, dict]:
    """Deduplicate, apply the item then user filter, and sort into per-user time order.

    Returns the frame with dense `item` (1..I) and `user` (0..U-1) codes, and the counts.
    """
    counts: dict[str, int] = {"rows_read": len(ratings)}
    ratings = ratings.drop_duplicates(["user_id", "item_id", "timestamp"], keep="last")
    counts["duplicates_dropped"] = counts["rows_read"] - len(ratings)

    item_counts = ratings["item_id"].value_counts()
    keep_items = item_counts.index[item_counts >= settings.min_item_ratings]
    ratings = ratings[ratings["item_id"].isin(keep_items)]
    counts["rows_after_item_filter"] = len(ratings)
    user_counts = ratings["user_id"].value_counts()
    keep_users = user_counts.index[user_counts >= settings.min_user_ratings]
    ratings = ratings[ratings["user_id"].isin(keep_users)]
    counts["rows_after_user_filter"] = len(ratings)
    if ratings.empty:
        raise InputError(
            f"no ratings survive the filters (items >= {settings.min_item_ratings} ratings, "
            f"then users >= {settings.min_user_ratings}); lower --min-item-ratings or "
            "--min-user-ratings"
        )

    # Dense codes in natural id order: items 1..I (0 is padding), users 0..U-1.
    item_ids = pd.Index(ratings["item_id"].unique())
    item_ids = item_ids[natural_order(item_ids)]
    user_ids = pd.Index(ratings["user_id"].unique())
    user_ids = user_ids[natural_order(user_ids)]
    ratings = ratings.assign(
        item=item_ids.get_indexer(ratings["item_id"]).astype(np.int32) + 1,
        user=user_ids.get_indexer(ratings["user_id"]).astype(np.int64),
    )
    ratings = ratings.sort_values(["user", "timestamp", "item"], kind="stable", ignore_index=True)
    counts.update(users=len(user_ids), items=len(item_ids))
    return ratings, counts


def split_users(n_users: int, settings: PrepareSettings) -> dict[str, np.ndarray]:
    """Seeded, disjoint user split: test draw first, then valid from the rest."""
    if settings.test_users == 0:  # the default protocol's: min(1000, 20 %)
        n_test = min(AUTO_TEST_USERS, round(AUTO_TEST_FRACTION * n_users))
    elif settings.test_users < 1:
        n_test = round(settings.test_users * n_users)
    else:
        n_test = int(settings.test_users)
    n_rest = n_users - n_test
    n_valid = round(settings.valid_fraction * n_rest)
    if n_test < 1 or n_rest - max(n_valid, 1) < 1:
        raise InputError(
            f"test_users={settings.test_users} leaves no training users among {n_users} users "
            "after filtering; pass a smaller --test-users (a count, or a fraction such as 0.2)"
        )
    if n_valid < 1:
        raise InputError(
            f"--valid-fraction {settings.valid_fraction} of {n_rest} users rounds to no "
            "validation user; pass a larger --valid-fraction"
        )
    order = np.random.default_rng(settings.seed).permutation(n_users)
    parts = {
        "test": order[:n_test],
        "valid": order[n_test : n_test + n_valid],
        "train": order[n_test + n_valid :],
    }
    return {name: np.sort(users) for name, users in parts.items()}


def user_table(ratings: pd.DataFrame, user_ids: np.ndarray, users: np.ndarray) -> pa.Table:
    """One row per user: user_id and time-ordered list columns (item_id, rating, timestamp)."""
    rows = ratings[ratings["user"].isin(users)]
    starts = np.searchsorted(rows["user"].to_numpy(), users)
    offsets = pa.array(np.r_[starts, len(rows)].astype(np.int32))

    def lists(column: str, dtype: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(rows[column].to_numpy(), type=dtype))

    return pa.table(
        {
            "user_id": pa.array(user_ids[users], type=pa.string()),
            "item_id": lists("item", pa.int32()),
            "rating": lists("rating", pa.float32()),
            "timestamp": lists("timestamp", pa.int64()),
        }
    )


def balance_score(ratings: pd.DataFrame, levels: np.ndarray) -> float:
    """Mean over users of the normalised entropy of their rating histogram.

    1.0 means every user spreads evenly over all rating levels; 0.0 means every user gives a
    single value. Imbalanced data (the case MELO targets) scores low.
    """
    if len(levels) < 2:
        return 0.0
    hist = pd.crosstab(ratings["user"], ratings["rating"]).to_numpy(dtype=np.float64)
    return float(np.mean(user_balance(hist, len(levels))))


def user_balance(counts: np.ndarray, levels: int) -> np.ndarray:
    """Each user's balance score [users] from their rating counts per level [users, K]: the
    normalised entropy of the histogram (0 with a single level in the data)."""
    if levels < 2:
        return np.zeros(len(counts))
    p = counts / counts.sum(axis=1, keepdims=True)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return entropy / np.log(levels)


def prepare(
    ratings: pd.DataFrame,
    out_dir: str | Path,
    settings: PrepareSettings,
    source: dict,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Prepare `ratings` (canonical columns) into `out_dir` (a folder or a URI); return the
    manifest."""
    if is_uri(out_dir):  # prepared locally, then copied up with its manifest last
        uri = str(out_dir)
        if not is_empty(uri):
            refuse_overwrite(uri, overwrite, written_by_prepare(read_bytes(uri, MANIFEST)))
        with tempfile.TemporaryDirectory(prefix="melo-prepare-") as local:
            staged = Path(local) / "dataset"
            manifest = prepare(ratings, staged, settings, source, progress=progress)
            progress(f"copying the dataset to {uri}")
            clear(uri)
            push(staged, uri)
        return manifest
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output path exists and is not a folder", path=out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        manifest = out_dir / MANIFEST
        content = manifest.read_bytes() if manifest.is_file() else None
        refuse_overwrite(out_dir, overwrite, written_by_prepare(content))
    progress(f"filtering {len(ratings):,} ratings")
    ordered, counts = filter_and_order(ratings, settings)
    kept = counts["rows_after_user_filter"] / max(counts["rows_read"], 1)
    if kept < KEPT_WARNING:
        progress(
            f"the filters kept {kept:.0%} of the ratings (items with >= "
            f"{settings.min_item_ratings} ratings, then users with >= "
            f"{settings.min_user_ratings}); to keep more, lower --min-item-ratings"
        )
    user_ids = ordered["user_id"].drop_duplicates().to_numpy(dtype=object)
    item_ids = ordered.drop_duplicates("item").sort_values("item")["item_id"].to_numpy(dtype=object)
    parts = split_users(len(user_ids), settings)

    lengths = ordered.groupby("user").size().to_numpy()
    levels = np.sort(ordered["rating"].unique())
    histogram = ordered["rating"].value_counts().sort_index()
    manifest = {
        "package_version": __version__,
        "source": source,
        "settings": asdict(settings),
        "duplicate_policy": "same (user, item, timestamp): keep the last row in file order",
        "tie_break": "per user by timestamp, then by item id (natural order)",
        "counts": {
            **counts,
            "interactions": len(ordered),
            **{f"{name}_users": len(users) for name, users in parts.items()},
        },
        "vocab_size": counts["items"] + 1,
        "rating_levels": [float(level) for level in levels],
        "rating_histogram": {f"{k:g}": int(v) for k, v in histogram.items()},
        "mean_usable_length": float(np.minimum(lengths, settings.window).mean()),
        "mean_length": float(lengths.mean()),
        "balance_score": balance_score(ordered, levels),
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        for name in SPLITS:
            progress(f"writing tasks-{name}.parquet ({len(parts[name]):,} users)")
            pq.write_table(
                user_table(ordered, user_ids, parts[name]), staging / f"tasks-{name}.parquet"
            )
        pq.write_table(
            pa.table(
                {
                    "item": np.arange(1, len(item_ids) + 1, dtype=np.int32),
                    "item_id": pa.array(item_ids, type=pa.string()),
                }
            ),
            staging / "item_map.parquet",
        )
        pq.write_table(
            pa.table(
                {
                    "user": np.arange(len(user_ids), dtype=np.int64),
                    "user_id": pa.array(user_ids, type=pa.string()),
                }
            ),
            staging / "user_map.parquet",
        )
        manifest["tables_sha256"] = {
            f"tasks-{name}.parquet": sha256_file(staging / f"tasks-{name}.parquet")
            for name in SPLITS
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an old one is removed only after the swap."""
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, out_dir)


def written_by_prepare(manifest: bytes | None) -> bool:
    """Whether a folder's manifest.json (its bytes, None if there is none) is one `prepare`
    wrote: a JSON object with the keys it always writes. A file that is merely called so is not."""
    try:
        content = json.loads(manifest) if manifest is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and content.keys() >= PREPARED_KEYS


def refuse_overwrite(out: str | Path, overwrite: bool, is_dataset: bool) -> None:
    """The checks before writing into a folder that is not empty."""
    if not overwrite:
        raise InputError(
            "output folder exists and is not empty; pass --overwrite to replace it", path=out
        )
    if not is_dataset:  # never delete a folder prepare did not write
        raise InputError(
            "--overwrite replaces only a dataset `prepare` wrote (a folder with its "
            f"{MANIFEST}); this folder holds other files, so it is left untouched",
            path=out,
        )


def load_manifest(data_dir: str | Path) -> dict:
    path = local_dataset(data_dir) / MANIFEST
    if not path.is_file():
        raise InputError(
            "not a prepared dataset (no manifest.json); run `melo-dist prepare`", path=data_dir
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(
            f"manifest is not valid JSON: {error.msg}", path=path, line=error.lineno
        ) from None
