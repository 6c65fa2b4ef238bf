"""ColdStartModel: the API's predictions are evaluate's, batched == one at a time, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import original_ids, shared_file, tiny_config

from melo_dist import ColdStartModel
from melo_dist.cli import main
from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.readers import read_ratings
from melo_dist.data.tasks import TaskRows
from melo_dist.errors import InputError
from melo_dist.training.evaluation import eval_batches
from melo_dist.training.loop import train_local


def assert_api_matches_evaluate(model: ColdStartModel, data_dir, users: int) -> None:
    """For a split's test users: adapt on the history before the target, predict the target.
    Evaluation predicts it from each query window; where one query is the whole window (the
    history's last L - 1 interactions and the target), the two must agree."""
    rows = TaskRows.from_parquet(str(data_dir / "tasks-test.parquet")).take(np.arange(users))
    batch = next(eval_batches(rows, model.spec, model.config.data.eval_seed, batch_size=users))
    predicted = model.learner.predict(batch)  # [B, Q]
    whole = (
        batch.query_mask.sum(-1) == torch.as_tensor(rows.lengths.clip(max=model.window))[:, None]
    )
    assert whole.any(1).sum() >= 5  # enough users to compare
    names = original_ids(data_dir)
    histories, targets = [], []
    for user in range(users):
        items = rows.items[rows.offsets[user] : rows.offsets[user + 1]]
        ratings = rows.ratings[rows.offsets[user] : rows.offsets[user + 1]]
        histories.append(([names[i] for i in items[:-1]], ratings[:-1].tolist()))
        targets.append([names[items[-1]]])
    adapted = model.adapt_many(histories, list(rows.user_id))
    got = torch.as_tensor(np.concatenate(adapted.predict(targets)))
    compared = whole.any(1)
    expected = predicted[compared, whole[compared].int().argmax(1)]
    np.testing.assert_allclose(got[compared], expected, rtol=1e-5, atol=1e-5)


def test_api_predicts_what_evaluate_scores(trained, synthetic_dir):
    assert_api_matches_evaluate(ColdStartModel.load(trained), synthetic_dir, users=48)


@pytest.mark.parametrize(("regime", "head"), [("basic", "bias"), ("maml", "reference")])
def test_api_predicts_what_evaluate_scores_for_other_models(synthetic_dir, tmp_path, regime, head):
    config = tiny_config(synthetic_dir, tmp_path / "run", iterations=2, regime=regime)
    config.model.head = head
    train_local(config, log=lambda message: None)
    assert_api_matches_evaluate(ColdStartModel.load(tmp_path / "run"), synthetic_dir, users=48)


def test_api_predicts_what_evaluate_scores_on_a_real_split(tmp_path):
    ratings, _ = read_ratings(shared_file("ml-100k/u.data"), "movielens")
    data_dir = tmp_path / "ml100k"
    prepare(ratings, data_dir, PrepareSettings(test_users=200), {"family": "movielens"})
    config = tiny_config(data_dir, tmp_path / "run", iterations=2, adapt="head")
    config.model.user_factors = 2
    train_local(config, log=lambda message: None)
    assert_api_matches_evaluate(ColdStartModel.load(tmp_path / "run"), data_dir, users=48)


def test_batched_adaptation_equals_one_user_at_a_time(trained, synthetic_dir):
    model = ColdStartModel.load(trained)
    names = original_ids(synthetic_dir)[1:]
    histories = [(names[:5], [5, 4, 1, 2, 5]), (names[10:40], [3] * 30), (names[3:4], [1])]
    candidates = [names[50:53], names[:2], names[7:8]]
    together = model.predict_many(histories, candidates)
    alone = [
        model.adapt(h[0], h[1], user_id=str(u)).predict(c)
        for u, (h, c) in enumerate(zip(histories, candidates))
    ]
    for both, one in zip(together, alone):
        np.testing.assert_allclose(both, one, rtol=1e-5, atol=1e-6)
    # the adapted state is kept: predicting again does not adapt again and gives the same
    user = model.adapt(*histories[0])
    np.testing.assert_array_equal(user.predict(candidates[0]), user.predict(candidates[0]))
    # adaptation changes predictions: a user who rates everything 1 vs one who rates 5
    low = model.adapt(names[:20], [1] * 20).predict(names[30:40])
    high = model.adapt(names[:20], [5] * 20).predict(names[30:40])
    assert (high > low).all()


@pytest.mark.parametrize(
    ("history", "candidates", "message"),
    [
        ((["nope"], [4]), ["1"], "item 'nope' at position 0"),
        (([], []), ["1"], "empty"),
        ((["1", "2"], [4]), ["1"], "2 items but 1 ratings"),
        ((["1", "2"], [4, 7]), ["1"], "rating 7 at position 1"),
        ((["1", "2"], [4, 3]), ["1", "missing"], "item 'missing' at position 1"),
    ],
)
def test_bad_input_is_an_error_naming_the_position(
    trained, synthetic_dir, history, candidates, message
):
    model = ColdStartModel.load(trained)
    known = original_ids(synthetic_dir)[1:3]
    rename = {"1": known[0], "2": known[1]}
    items = [rename.get(i, i) for i in history[0]]
    with pytest.raises(InputError, match=message):
        model.adapt(items, history[1]).predict([rename.get(c, c) for c in candidates])


def test_load_checks_the_dataset(trained, tmp_path):
    with pytest.raises(InputError, match="prepared dataset is not there"):
        ColdStartModel.load(trained, data=tmp_path)
    with pytest.raises(InputError, match="checkpoint not found"):
        ColdStartModel.load(tmp_path / "none")


def long_format(path, histories: dict, reverse_time: bool = False) -> None:
    """A CSV of (user_id, item_id, rating, timestamp); rows in reverse time order if asked."""
    rows = [
        (user, item, rating, t)
        for user, (items, ratings) in histories.items()
        for t, (item, rating) in enumerate(zip(items, ratings))
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    frame.iloc[:: -1 if reverse_time else 1].to_csv(path, index=False)


def test_predict_command_scores_candidates_and_ranks_top_k(trained, synthetic_dir, tmp_path):
    model = ColdStartModel.load(trained)
    names = original_ids(synthetic_dir)[1:]
    histories = {
        "a": (names[:6], [5.0, 4.0, 1.0, 2.0, 5.0, 3.0]),
        "b": (names[20:23], [2.0, 2.0, 1.0]),
    }
    long_format(tmp_path / "users.csv", histories, reverse_time=True)  # timestamps order them
    pairs = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": [names[40], names[41], names[7]]})
    pairs.to_parquet(tmp_path / "pairs.parquet")
    out = tmp_path / "predictions.parquet"
    args = ["predict", "--checkpoint", str(trained), "--users", str(tmp_path / "users.csv")]
    assert main([*args, "--candidates", str(tmp_path / "pairs.parquet"), "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert list(table.columns) == ["user_id", "item_id", "prediction"] and len(table) == 3
    expected = model.adapt_many(list(histories.values()), ["a", "b"]).predict(
        [[names[40], names[41]], [names[7]]]
    )
    np.testing.assert_allclose(table["prediction"], np.concatenate(expected), rtol=1e-5)

    assert main([*args, "--top-k", "5", "--out", str(out)]) == 0
    ranked = pd.read_parquet(out)
    assert len(ranked) == 10 and ranked["rank"].tolist() == [1, 2, 3, 4, 5] * 2
    for user, group in ranked.groupby("user_id"):
        assert group["prediction"].is_monotonic_decreasing
        assert not set(group["item_id"]) & set(histories[user][0])  # rated items are not ranked
        everything = model.adapt(*histories[user], user_id=user).predict(model.catalogue)
        unrated = ~np.isin(model.catalogue, histories[user][0])
        assert group["prediction"].iloc[0] == pytest.approx(everything[unrated].max(), rel=1e-5)


def test_predict_command_on_ray_data_matches_in_process(
    trained, synthetic_dir, tmp_path, ray_session
):
    names = original_ids(synthetic_dir)[1:]
    histories = {
        f"u{k}": (names[k : k + 8], [float(1 + (k + j) % 5) for j in range(8)]) for k in range(12)
    }
    long_format(tmp_path / "users.csv", histories)
    args = [
        "predict",
        "--checkpoint",
        str(trained),
        "--users",
        str(tmp_path / "users.csv"),
        "--top-k",
        "3",
    ]
    assert main([*args, "--out", str(tmp_path / "local.parquet")]) == 0
    assert (
        main(
            [*args, "--out", str(tmp_path / "ray.parquet"), "--workers", "2", "--batch-users", "4"]
        )
        == 0
    )
    local = pd.read_parquet(tmp_path / "local.parquet").sort_values(["user_id", "rank"])
    on_ray = pd.read_parquet(tmp_path / "ray.parquet").sort_values(["user_id", "rank"])
    assert local["item_id"].tolist() == on_ray["item_id"].tolist()
    np.testing.assert_allclose(local["prediction"], on_ray["prediction"], rtol=1e-5)


def test_predict_command_refuses_bad_input_and_writes_nothing(
    trained, synthetic_dir, tmp_path, capsys
):
    names = original_ids(synthetic_dir)[1:]
    long_format(tmp_path / "users.csv", {"a": ([names[0], "nope"], [4.0, 3.0])})
    out = tmp_path / "predictions.parquet"
    args = ["predict", "--checkpoint", str(trained), "--out", str(out), "--top-k", "2"]
    assert main([*args, "--users", str(tmp_path / "users.csv")]) == 2
    assert "history of user a: item 'nope' at position 1" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("user_id,item\na,1\n")
    assert main([*args, "--users", str(tmp_path / "bad.csv")]) == 2
    assert "lacks columns ['item_id', 'rating']" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text(f"user_id,item_id,rating\na,{names[0]},4\na,{names[1]},x\n")
    assert main([*args, "--users", str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv: row 1: rating 'x' is not a number" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_predict_command_reads_a_prepared_task_table(trained, synthetic_dir, tmp_path):
    """The split's own task table (prepared ids) scores as the same users in original ids."""
    rows = TaskRows.from_parquet(str(synthetic_dir / "tasks-test.parquet")).take(np.arange(5))
    pq.write_table(
        pq.read_table(synthetic_dir / "tasks-test.parquet").slice(0, 5), tmp_path / "tasks.parquet"
    )
    names = original_ids(synthetic_dir)
    histories = {
        user: (
            [names[i] for i in rows.items[rows.offsets[u] : rows.offsets[u + 1]]],
            rows.ratings[rows.offsets[u] : rows.offsets[u + 1]].tolist(),
        )
        for u, user in enumerate(rows.user_id)
    }
    long_format(tmp_path / "users.csv", histories)
    args = ["predict", "--checkpoint", str(trained), "--top-k", "4"]
    for name in ("tasks.parquet", "users.csv"):
        out = str(tmp_path / f"{name}.out.parquet")
        assert main([*args, "--users", str(tmp_path / name), "--out", out]) == 0
    from_table = pd.read_parquet(tmp_path / "tasks.parquet.out.parquet")
    from_long = pd.read_parquet(tmp_path / "users.csv.out.parquet")
    pd.testing.assert_frame_equal(
        from_table.sort_values(["user_id", "rank"], ignore_index=True),
        from_long.sort_values(["user_id", "rank"], ignore_index=True),
    )
