"""Task windows: the DESIGN §2 invariants, checked on sequences whose items are their positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melo_dist.data.synthetic import random_task_rows
from melo_dist.data.tasks import TaskRows, WindowSpec, sample_tasks
from melo_dist.errors import InputError


def positional_rows(lengths: list[int]) -> TaskRows:
    """Users whose item ids are their flat positions + 1: every window maps back to indices."""
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    flat = np.arange(offsets[-1], dtype=np.int64)
    return TaskRows(
        user_id=np.array([f"user{i}" for i in range(len(lengths))], dtype=object),
        items=flat + 1,
        ratings=(flat % 5 + 1).astype(np.float32),
        offsets=offsets,
    )


LENGTHS = [2, 3, 4, 5, 6, 7, 12, 29, 30, 31, 45, 200]


def windows(items: torch.Tensor, mask: torch.Tensor) -> list[list[np.ndarray]]:
    """Per task, the flat indices of each non-empty window."""
    return [
        [row[m].numpy() - 1 for row, m in zip(task, task_mask) if m.any()]
        for task, task_mask in zip(items, mask)
    ]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_window_invariants(mode):
    rows = positional_rows(LENGTHS)
    spec = WindowSpec()
    for draw in range(20):
        batch = (
            sample_tasks(rows, spec, seed=draw, train=True)
            if mode == "train"
            else sample_tasks(rows, spec, seed=draw, train=False)
        )
        assert batch.support_items.shape == (len(LENGTHS), 25, 30)
        assert batch.query_items.shape == (len(LENGTHS), 3, 30)
        supports = windows(batch.support_items, batch.support_mask)
        queries = windows(batch.query_items, batch.query_mask)
        for user, (length, support, query) in enumerate(zip(LENGTHS, supports, queries)):
            first, stop = rows.offsets[user], rows.offsets[user + 1]
            n = min(length, 30)
            target = query[0][-1]
            if mode == "eval":
                assert target == stop - 1  # evaluation: the user's last interaction
            window_start = target - n + 1
            assert first <= window_start and target < stop
            assert len(query) == min(3, n - 1)
            assert len({len(q) for q in query}) == len(query)  # distinct suffix lengths
            for q in query:
                assert q[-1] == target and 2 <= len(q) <= n
                assert np.array_equal(q, np.arange(q[0], q[0] + len(q)))
            assert len(support) == min(25, (n - 1) * (n - 2) // 2)
            assert len({(s[0], len(s)) for s in support}) == len(support)  # distinct
            for s in support:
                assert np.array_equal(s, np.arange(s[0], s[0] + len(s)))  # contiguous
                assert 2 <= len(s) <= n - 1
                assert s[0] >= window_start and s[-1] < target  # never the query target
        # Padding is on the left, with zero items and ratings.
        for items, ratings, mask in [
            (batch.support_items, batch.support_ratings, batch.support_mask),
            (batch.query_items, batch.query_ratings, batch.query_mask),
        ]:
            assert torch.all(items[~mask] == 0) and torch.all(ratings[~mask] == 0)
            assert torch.all(items[mask] > 0)
            assert torch.all(mask[..., 1:] >= mask[..., :-1])  # once real, stays real
            assert torch.equal(ratings[mask], (items[mask] - 1) % 5 + 1.0)
        # A support position's age: how many interactions before its task's query target.
        targets = batch.query_items[:, 0, -1]  # flat index + 1, as every item here
        expected = torch.where(batch.support_mask, targets[:, None, None] - batch.support_items, 0)
        assert torch.equal(batch.support_age, expected)
        assert (batch.support_age[batch.support_mask] >= 1).all()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_history_support_is_one_window_of_every_rating_before_the_target(train):
    rows = positional_rows(LENGTHS)
    history = WindowSpec(support_windows="history")
    for draw in range(5):
        batch = sample_tasks(rows, history, seed=draw, train=train)
        sampled = sample_tasks(rows, WindowSpec(), seed=draw, train=train)
        assert batch.support_items.shape == (len(LENGTHS), 1, 30)
        for name in ("query_items", "query_ratings", "query_mask"):  # the same targets
            assert torch.equal(getattr(batch, name), getattr(sampled, name))
        for length, task, mask, age, query in zip(
            LENGTHS, batch.support_items, batch.support_mask, batch.support_age, batch.query_items
        ):
            n, target = min(length, 30), int(query[0, -1])  # items are flat index + 1
            assert torch.equal(task[0][mask[0]], torch.arange(target - n + 1, target))
            assert torch.equal(age[0][mask[0]], torch.arange(n - 1, 0, -1))  # each age once


def test_window_spec_refuses_an_unknown_support_mode():
    with pytest.raises(InputError, match="support_windows"):
        WindowSpec(support_windows="all")


def test_training_windows_are_random_and_reproducible():
    rows = positional_rows(LENGTHS)
    one = sample_tasks(rows, seed=0, train=True)
    again = sample_tasks(rows, seed=0, train=True)
    other = sample_tasks(rows, seed=1, train=True)
    assert torch.equal(one.support_items, again.support_items)
    assert not torch.equal(one.support_items, other.support_items)
    # Long users get windows from anywhere in their history, not only the end.
    targets = {
        int(sample_tasks(rows, seed=s, train=True).query_items[-1, 0, -1]) for s in range(30)
    }
    assert len(targets) > 10


def test_evaluation_windows_do_not_depend_on_the_batch():
    rows = positional_rows(LENGTHS)
    full = sample_tasks(rows, seed=7, train=False)
    subset = [9, 3, 11]
    part = sample_tasks(rows.take(np.array(subset)), seed=7, train=False)
    for i, user in enumerate(subset):  # take() keeps item values, so windows compare directly
        assert torch.equal(part.support_items[i], full.support_items[user])
        assert torch.equal(part.query_items[i], full.query_items[user])
    other_seed = sample_tasks(rows, seed=8, train=False)
    assert not torch.equal(other_seed.support_items, full.support_items)


def test_training_windows_do_not_depend_on_the_batch_either():
    """What lets 1 worker x 16 tasks and 2 workers x 8 tasks cut identical tasks."""
    rows = positional_rows(LENGTHS)
    full = sample_tasks(rows, seed=3, train=True)
    halves = [
        sample_tasks(rows.take(np.arange(a, b)), seed=3, train=True)
        for a, b in ((0, 5), (5, len(LENGTHS)))
    ]
    for name in ("support_items", "support_mask", "query_items", "query_ratings"):
        joined = torch.cat([getattr(half, name) for half in halves])
        assert torch.equal(joined, getattr(full, name))


def test_rows_from_lists_and_parquet_agree(synthetic_dir):
    rows = TaskRows.from_parquet(str(synthetic_dir / "tasks-train.parquet"))
    again = TaskRows.from_lists(
        rows.user_id,
        [rows.items[a:b] for a, b in zip(rows.offsets, rows.offsets[1:])],
        [rows.ratings[a:b] for a, b in zip(rows.offsets, rows.offsets[1:])],
    )
    for name in ("items", "ratings", "offsets"):
        assert np.array_equal(getattr(rows, name), getattr(again, name))
    batch = sample_tasks(rows.take(np.arange(16)), seed=0, train=False)
    assert batch.support_items.dtype == torch.int64 and batch.support_ratings.dtype == torch.float32
    assert len(batch) == 16


def test_local_item_ids_round_trip_and_keep_padding():
    rows = random_task_rows(5, 1000, (3, 40), seed=3)
    batch = sample_tasks(rows, WindowSpec(length=10, support=6, query=3), seed=1, train=True)
    local, table_rows = batch.with_local_items()
    for name in ("support_items", "query_items"):
        original, renumbered = getattr(batch, name), getattr(local, name)
        assert ((renumbered == 0) == (original == 0)).all()  # padding stays 0
        restored = torch.stack([table_rows[b][renumbered[b]] for b in range(len(batch))])
        assert torch.equal(restored, original)
    # each task's rows are its distinct items (and the padding row), no more
    for b in range(len(batch)):
        used = torch.cat([batch.support_items[b].flatten(), batch.query_items[b].flatten()])
        distinct = torch.unique(torch.cat([used, used.new_zeros(1)]))
        assert torch.equal(table_rows[b][: len(distinct)], distinct)
        assert (table_rows[b][len(distinct) :] == 0).all()


def test_earlier_targets_are_the_users_cut_short():
    rows = random_task_rows(4, 50, (2, 6), seed=5)
    expanded = rows.with_earlier_targets(3)
    for k in range(3):
        for u in range(len(rows)):
            name = rows.user_id[u] if k == 0 else f"{rows.user_id[u]}#{k}"
            index = np.flatnonzero(expanded.user_id == name)
            if rows.lengths[u] - k < 2:
                assert index.size == 0  # too short to have a support and a target
                continue
            start, stop = rows.offsets[u], rows.offsets[u + 1] - k
            (row,) = index
            got = expanded.items[expanded.offsets[row] : expanded.offsets[row + 1]]
            assert np.array_equal(got, rows.items[start:stop])
            assert rows.earlier_target_users(3)[row] == u  # each copy names its user
