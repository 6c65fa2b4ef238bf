"""ColdStartModel: the API's predictions are evaluate's, batched == one at a time, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import shared_file, tiny_config

from melo_dist import ColdStartModel
from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.readers import read_ratings
from melo_dist.data.tasks import TaskRows
from melo_dist.errors import InputError
from melo_dist.training.evaluation import eval_batches
from melo_dist.training.loop import train_local


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A tiny MELO run with the bias head and user factors (what the recipe ships)."""
    out = tmp_path_factory.mktemp("inference") / "run"
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
