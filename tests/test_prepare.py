"""Preparation: reference filters on real data, split, order, determinism, atomic output."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import shared_file

from melo_dist.cli import main
from melo_dist.data.prepare import SPLITS, PrepareSettings, prepare
from melo_dist.data.readers import read_ratings
from melo_dist.data.synthetic import SyntheticSpec, generate_ratings
from melo_dist.errors import InputError
from melo_dist.runtime import exit_on_sigterm


def independent_counts(path, min_items: int = 50, min_users: int = 5) -> dict:
    """The reference filters recomputed with plain pandas, straight from the file."""
    frame = pd.read_csv(
        path, sep=r"::|\t", engine="python", header=None, names=["user", "item", "rating", "ts"]
    )
    item_counts = frame["item"].value_counts()
    frame = frame[frame["item"].isin(item_counts[item_counts >= min_items].index)]
    user_counts = frame["user"].value_counts()
    frame = frame[frame["user"].isin(user_counts[user_counts >= min_users].index)]
    return {
        "interactions": len(frame),
        "users": frame["user"].nunique(),
        "items": frame["item"].nunique(),
    }


@pytest.mark.parametrize(
    ("relative", "test_users"),
    [("ml-100k/u.data", 200), ("ml-1m-users1-2999/ratings.dat.gz", 1000)],
)
def test_reference_filters_match_independent_counts(tmp_path, relative, test_users):
    path = shared_file(relative)
    ratings, _ = read_ratings(path, "movielens")
    settings = PrepareSettings(protocol="melo", test_users=test_users)
    manifest = prepare(ratings, tmp_path / "out", settings, {"family": "movielens"})
    expected = independent_counts(path)
    counts = manifest["counts"]
    assert counts["interactions"] == expected["interactions"]
    assert counts["users"] == expected["users"]
    assert counts["items"] == expected["items"]
    assert manifest["vocab_size"] == expected["items"] + 1
    assert counts["test_users"] == test_users
    assert sum(counts[f"{s}_users"] for s in SPLITS) == expected["users"]
    tables = {s: pq.read_table(tmp_path / "out" / f"tasks-{s}.parquet").to_pandas() for s in SPLITS}
    assert sum(len(t) for t in tables.values()) == expected["users"]
    assert sum(t["item_id"].map(len).sum() for t in tables.values()) == expected["interactions"]
    assert sum(manifest["rating_histogram"].values()) == expected["interactions"]


def test_default_protocol_works_on_a_few_hundred_users_and_melo_is_one_flag_away(tmp_path):
    ratings = generate_ratings(SyntheticSpec(users=300, items=2000, mean_length=12, seed=1))
    messages = []
    manifest = prepare(
        ratings,
        tmp_path / "small",
        PrepareSettings(),
        {"family": "synthetic"},
        progress=messages.append,
    )
    assert manifest["settings"]["min_item_ratings"] == 5  # the resolved preset is recorded
    assert manifest["counts"]["test_users"] == round(0.2 * manifest["counts"]["users"])
    assert not any("the filters kept" in message for message in messages)
    with pytest.raises(InputError, match=r"no training users|no ratings survive"):
        prepare(
            ratings,
            tmp_path / "melo",
            PrepareSettings(protocol="melo"),
            {"family": "synthetic"},
            progress=messages.append,
        )
    assert any("lower --min-item-ratings" in message for message in messages)  # it said why
    melo = PrepareSettings(protocol="melo")
    assert (melo.min_item_ratings, melo.min_user_ratings, melo.test_users) == (50, 5, 1000)
    assert PrepareSettings(protocol="melo", min_item_ratings=20).min_item_ratings == 20
    with pytest.raises(InputError, match="--protocol"):
        PrepareSettings(protocol="ml1m")


def test_split_is_disjoint_seeded_and_sized(tmp_path):
    ratings = generate_ratings(SyntheticSpec(users=500, items=200, seed=3))
    settings = PrepareSettings(min_item_ratings=10, test_users=100, valid_fraction=0.2, seed=5)

    def users_by_split(out) -> dict[str, set[str]]:
        prepare(ratings, out, settings, {"family": "synthetic"})
        return {
            s: set(pq.read_table(out / f"tasks-{s}.parquet")["user_id"].to_pylist()) for s in SPLITS
        }

    first, again = users_by_split(tmp_path / "a"), users_by_split(tmp_path / "b")
    assert first == again
    assert not (
        first["train"] & first["valid"]
        or first["train"] & first["test"]
        or first["valid"] & first["test"]
    )
    n_users = sum(len(users) for users in first.values())
    assert len(first["test"]) == 100 and len(first["valid"]) == round(0.2 * (n_users - 100))
    other = PrepareSettings(min_item_ratings=10, test_users=100, valid_fraction=0.2, seed=6)
    prepare(ratings, tmp_path / "c", other, {"family": "synthetic"})
    assert (
        set(pq.read_table(tmp_path / "c/tasks-test.parquet")["user_id"].to_pylist())
        != first["test"]
    )


def test_preparing_twice_gives_identical_tables(tmp_path):
    ratings = generate_ratings(SyntheticSpec(users=300, items=150, seed=2))
    settings = PrepareSettings(min_item_ratings=10, test_users=0.2)
    one = prepare(ratings, tmp_path / "one", settings, {"family": "synthetic"})
    # Row order of the input must not matter either: shuffle it.
    shuffled = ratings.sample(frac=1.0, random_state=0)
    two = prepare(shuffled, tmp_path / "two", settings, {"family": "synthetic"})
    assert one["tables_sha256"] == two["tables_sha256"]
    for name in [f"tasks-{s}.parquet" for s in SPLITS] + ["item_map.parquet", "user_map.parquet"]:
        assert pq.read_table(tmp_path / "one" / name).equals(pq.read_table(tmp_path / "two" / name))


def test_time_order_tie_break_and_duplicates(tmp_path):
    rows = [  # user, item, rating, timestamp
        ("a", "10", 5, 100),
        ("a", "9", 4, 100),
        ("a", "2", 3, 50),
        ("a", "9", 1, 100),
        ("a", "7", 2, 200),
        ("b", "2", 5, 10),
        ("b", "7", 5, 10),
        ("b", "10", 4, 5),
        ("b", "9", 3, 20),
        ("b", "2", 2, 30),
        ("c", "2", 4, 1),  # a third user: test, validation and training each need one
        ("c", "7", 4, 2),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        {"user_id": "string", "item_id": "string", "rating": "float32", "timestamp": "int64"}
    )
    settings = PrepareSettings(
        min_item_ratings=1, min_user_ratings=2, test_users=1, valid_fraction=0.5
    )
    manifest = prepare(frame, tmp_path / "out", settings, {"family": "csv"})
    assert manifest["counts"]["duplicates_dropped"] == 1
    items = dict(zip(*pq.read_table(tmp_path / "out/item_map.parquet").to_pydict().values()))
    assert [items[i] for i in (1, 2, 3, 4)] == ["2", "7", "9", "10"]  # natural id order
    tables = pd.concat(
        pq.read_table(tmp_path / "out" / f"tasks-{s}.parquet").to_pandas() for s in SPLITS
    ).set_index("user_id")
    # ties at t=100 broken by item id (9 before 10); the duplicate (a, 9, 100) keeps rating 1.
    assert [items[i] for i in tables.loc["a", "item_id"]] == ["2", "9", "10", "7"]
    assert list(tables.loc["a", "rating"]) == [3, 1, 5, 2]
    assert [items[i] for i in tables.loc["b", "item_id"]] == ["10", "2", "7", "9", "2"]
    for timestamps in tables["timestamp"]:
        assert np.all(np.diff(timestamps) >= 0)


def test_manifest_statistics(synthetic_dir):
    manifest = json.loads((synthetic_dir / "manifest.json").read_text())
    tables = pd.concat(
        pq.read_table(synthetic_dir / f"tasks-{s}.parquet").to_pandas() for s in SPLITS
    )
    lengths = tables["item_id"].map(len)
    assert manifest["mean_usable_length"] == pytest.approx(np.minimum(lengths, 30).mean())
    assert manifest["rating_levels"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert 0.0 < manifest["balance_score"] < 1.0
    assert lengths.min() >= manifest["settings"]["min_user_ratings"]
    assert max(max(seq) for seq in tables["item_id"]) == manifest["vocab_size"] - 1
    assert min(min(seq) for seq in tables["item_id"]) == 1


def test_balance_score_extremes(tmp_path):
    frame = pd.DataFrame(
        {
            "user_id": pd.array(["a"] * 4 + ["b"] * 4 + ["c"] * 5, dtype="string"),
            "item_id": pd.array(
                ["1", "2", "3", "4"] * 2 + ["1", "2", "3", "4", "5"], dtype="string"
            ),
            "rating": np.array([5, 5, 5, 5, 1, 2, 3, 4, 1, 2, 3, 4, 5], dtype=np.float32),
            "timestamp": np.arange(13, dtype=np.int64),
        }
    )
    settings = PrepareSettings(
        min_item_ratings=1, min_user_ratings=2, test_users=1, valid_fraction=0.5
    )
    manifest = prepare(frame, tmp_path / "out", settings, {"family": "csv"})
    # a: one level -> 0; b: four of five levels evenly -> log 4 / log 5; c: all five -> 1.
    assert manifest["balance_score"] == pytest.approx((0 + np.log(4) / np.log(5) + 1) / 3)


def test_failed_run_leaves_nothing_and_keeps_a_good_dataset(tmp_path):
    ratings = generate_ratings(SyntheticSpec(users=200, items=100, seed=0))
    good = PrepareSettings(min_item_ratings=5, test_users=20)
    prepare(ratings, tmp_path / "out", good, {"family": "synthetic"})
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    with pytest.raises(InputError, match="not empty"):
        prepare(ratings, tmp_path / "out", good, {"family": "synthetic"})
    impossible = PrepareSettings(min_item_ratings=10**6, test_users=20)
    with pytest.raises(InputError, match="no ratings survive"):
        prepare(ratings, tmp_path / "out", impossible, {"family": "synthetic"}, overwrite=True)
    too_many_test = PrepareSettings(min_item_ratings=5, test_users=10**5)
    with pytest.raises(InputError, match="no training users"):
        prepare(ratings, tmp_path / "new", too_many_test, {"family": "synthetic"})

    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path):
    ratings = generate_ratings(SyntheticSpec(users=200, items=100, seed=0))
    settings = PrepareSettings(min_item_ratings=5, test_users=20)
    own = tmp_path / "work"
    own.mkdir()
    (own / "notes.txt").write_text("the user's own files")
    with pytest.raises(InputError, match="left untouched"):
        prepare(ratings, own, settings, {"family": "synthetic"}, overwrite=True)
    assert [p.name for p in own.iterdir()] == ["notes.txt"]
    for text in ("{}", "not json", '{"name": "my web app"}'):  # named so, not written by prepare
        (own / "manifest.json").write_text(text)
        with pytest.raises(InputError, match="left untouched"):
            prepare(ratings, own, settings, {"family": "synthetic"}, overwrite=True)
        assert sorted(p.name for p in own.iterdir()) == ["manifest.json", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        prepare(ratings, tmp_path / "file", settings, {"family": "synthetic"}, overwrite=True)
    prepare(ratings, tmp_path / "data", settings, {"family": "synthetic"})
    prepare(ratings, tmp_path / "data", settings, {"family": "synthetic"}, overwrite=True)
    assert (tmp_path / "data" / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("valid_fraction", "users", "message"),
    [(0.0, 200, "--valid-fraction must be in"), (0.001, 200, "rounds to no validation user")],
)
def test_no_validation_users_is_refused_at_prepare(tmp_path, valid_fraction, users, message):
    """Training selects checkpoints on validation users: an empty split is refused up front."""
    ratings = generate_ratings(SyntheticSpec(users=users, items=100, seed=0))
    with pytest.raises(InputError, match=message):
        settings = PrepareSettings(min_item_ratings=5, test_users=20, valid_fraction=valid_fraction)
        prepare(ratings, tmp_path / "out", settings, {"family": "synthetic"})
    assert not (tmp_path / "out").exists()


def test_training_refuses_a_dataset_without_validation_users(synthetic_dir, tmp_path, capsys):
    """A dataset written before prepare refused empty validation splits (or edited since)."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    valid = pq.read_table(data / "tasks-valid.parquet")
    pq.write_table(valid.slice(0, 0), data / "tasks-valid.parquet")
    out = tmp_path / "run"
    assert main(["train", "--set", f"data.path={data}", "--set", f"run.out={out}"]) == 2
    error = capsys.readouterr().err
    assert "tasks-valid.parquet: the dataset has no validation users" in error
    assert not out.exists()


def test_sigterm_while_preparing_leaves_nothing_behind(tmp_path):
    """What `melo-dist` does on SIGTERM (exit 143 through every clean-up), mid-write."""
    ratings = generate_ratings(SyntheticSpec(users=300, seed=2))

    def terminate(message: str) -> None:
        if message.startswith("writing tasks-test"):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    try:
        with pytest.raises(SystemExit) as stopped:
            prepare(
                ratings, tmp_path / "out", PrepareSettings(), {"family": "x"}, progress=terminate
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143
    assert list(tmp_path.iterdir()) == []  # no staging folder, no half-written dataset
