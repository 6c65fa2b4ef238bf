"""Task sampling: cut support and query windows from users' sequences and collate a meta-batch.

Per user (DESIGN §2), with window length L (30):
- window: the user's last L interactions when evaluating, a random L-window when training;
  n = its length.
- query: up to `query` suffixes of the window, of distinct lengths in 2..n, all ending at the
  window's last interaction (the target).
- support: up to `support` distinct contiguous sub-windows (length >= 2) of the window's first
  n - 1 interactions, so no support window ever contains the query target.
Every window is left-padded to L (item 0, rating 0, mask False).

Everything is vectorised over the batch. Each user's random numbers come from a counter-based
hash of (seed, user id) (`seeds.py`), so a task's windows depend only on the seed and the user,
never on which batch, worker or position the user lands in: evaluation windows are fixed per
user, and a training iteration's tasks are the same whether one worker or many cut them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from melo_dist.config import SUPPORT_WINDOWS
from melo_dist.data.seeds import hashed_uniforms, user_keys
from melo_dist.errors import InputError


@dataclass(frozen=True)
class WindowSpec:
    length: int = 30  # L: longest window; every window is left-padded to it
    support: int = 25  # most support sub-windows per task
    query: int = 3  # most query suffixes per task
    support_windows: str = "sampled"  # or "history": one support window, the whole history

    def __post_init__(self) -> None:
        if self.length < 3 or self.support < 1 or self.query < 1:
            raise InputError(f"window spec needs length >= 3, support >= 1, query >= 1: {self}")
        if self.support_windows not in SUPPORT_WINDOWS:
            raise InputError(f"support_windows must be one of {SUPPORT_WINDOWS}: {self}")


@dataclass
class TaskRows:
    """Users of one split in flat form: user u owns items[offsets[u]:offsets[u + 1]]."""

    user_id: np.ndarray  # object array of str
    items: np.ndarray  # int64, flat, time order within each user
    ratings: np.ndarray  # float32, flat
    offsets: np.ndarray  # int64 [U + 1]

    @classmethod
    def from_arrow(cls, table: pa.Table) -> TaskRows:
        missing = {"user_id", "item_id", "rating"} - set(table.column_names)
        if missing:
            raise InputError(f"task table lacks columns {sorted(missing)}")
        items = table.column("item_id").combine_chunks()
        ratings = table.column("rating").combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64)
        return cls(
            user_id=table.column("user_id").to_numpy(zero_copy_only=False),
            items=items.flatten().to_numpy().astype(np.int64),
            ratings=ratings.flatten().to_numpy().astype(np.float32),
            offsets=offsets - offsets[0],
        )

    @classmethod
    def from_parquet(cls, path: str) -> TaskRows:
        try:
            table = pq.read_table(path, columns=["user_id", "item_id", "rating"])
        except (OSError, pa.ArrowInvalid) as error:
            raise InputError(f"cannot read task table: {error}", path=path) from None
        return cls.from_arrow(table)

    @classmethod
    def from_lists(cls, user_id, items, ratings) -> TaskRows:
        """From per-user sequences (e.g. a Ray Data batch of list columns)."""
        lengths = np.fromiter((len(seq) for seq in items), dtype=np.int64, count=len(items))
        return cls(
            user_id=np.asarray(user_id, dtype=object),
            items=np.concatenate([np.asarray(s, dtype=np.int64) for s in items]),
            ratings=np.concatenate([np.asarray(s, dtype=np.float32) for s in ratings]),
            offsets=np.r_[0, np.cumsum(lengths)],
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, users: np.ndarray) -> TaskRows:
        """The rows of `users` (indices), as a new TaskRows."""
        return self.segments(self.user_id[users], self.offsets[users], self.lengths[users])

    def earlier_target_users(self, cuts: int) -> np.ndarray:
        """The user (index) of each copy `with_earlier_targets(cuts)` makes, in its order."""
        return np.concatenate(self.copies_kept(cuts))

    def copies_kept(self, cuts: int) -> list[np.ndarray]:
        """Per k < cuts, the users long enough to lose k interactions and keep 2."""
        return [np.flatnonzero(self.lengths - k >= 2) for k in range(cuts)]

    def with_earlier_targets(self, cuts: int) -> TaskRows:
        """Each user `cuts` times: as is, then without its last 1, ..., cuts - 1 interactions
        (copies named "user#k"; a copy needs 2 interactions). Evaluated with `train=False`,
        copy k's target is the user's k-th last interaction: more targets per user."""
        kept = self.copies_kept(cuts)
        names = [
            self.user_id[users] if k == 0 else np.array([f"{u}#{k}" for u in self.user_id[users]])
            for k, users in enumerate(kept)
        ]
        return self.segments(
            np.concatenate(names).astype(object),
            np.concatenate([self.offsets[users] for users in kept]),
            np.concatenate([self.lengths[users] - k for k, users in enumerate(kept)]),
        )

    def segments(self, names: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> TaskRows:
        """A TaskRows of the interaction runs [start, start + length), one user each."""
        offsets = np.r_[0, np.cumsum(lengths)]
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TaskRows(names, self.items[flat], self.ratings[flat], offsets)


@dataclass
class TaskBatch:
    """A collated meta-batch: B tasks, S support and Q query windows of length L."""

    support_items: torch.Tensor  # [B, S, L] int64, 0 = padding
    support_ratings: torch.Tensor  # [B, S, L] float32, 0 at padding
    support_mask: torch.Tensor  # [B, S, L] bool, True at real interactions
    query_items: torch.Tensor  # [B, Q, L]
    query_ratings: torch.Tensor  # [B, Q, L]
    query_mask: torch.Tensor  # [B, Q, L]
    # [B, S, L] int64: how many interactions before the query target each support position
    # lies (1 = the one just before it), 0 at padding; meta.recency weights the inner loss by it
    support_age: torch.Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def with_local_items(self) -> tuple[TaskBatch, torch.Tensor]:
        """Renumber each task's items 0..U-1 in ascending id order (0 stays padding); returns
        the renumbered batch and `rows` [B, U]: the catalogue id of each task's local id, so
        that `table[rows]` is each task's own slice of an item table."""
        support, query = self.support_items, self.query_items
        items = torch.cat([support.flatten(1), query.flatten(1)], dim=1)
        items = torch.cat([items.new_zeros(len(self), 1), items], dim=1)  # every task has 0
        ordered, order = items.sort(dim=1)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        local_sorted = first.cumsum(dim=1) - 1
        local = torch.empty_like(items).scatter_(1, order, local_sorted)
        rows = items.new_zeros(len(self), int(local_sorted.max()) + 1)
        rows.scatter_(1, local_sorted, ordered)
        split = 1 + support[0].numel()
        batch = replace(
            self,
            support_items=local[:, 1:split].view(support.shape),
            query_items=local[:, split:].view(query.shape),
        )
        return batch, rows

    def __len__(self) -> int:
        return self.support_items.shape[0]


def support_pairs(length: int) -> tuple[np.ndarray, np.ndarray]:
    """All (start, end) index pairs, end > start, within the first length - 1 positions."""
    start, end = np.triu_indices(length - 1, k=1)
    return start, end


def sample_tasks(
    rows: TaskRows, spec: WindowSpec = WindowSpec(), *, seed: int, train: bool
) -> TaskBatch:
    """Cut and collate one meta-batch: a random window per user when `train`, else the last."""
    L = spec.length
    pair_start, pair_end = support_pairs(L)
    n_draws = 1 + (L - 1) + len(pair_start)
    lengths = rows.lengths
    if lengths.min(initial=2) < 2:
        raise InputError("every task needs at least 2 interactions (one support, one target)")
    uniforms = hashed_uniforms(user_keys(rows.user_id), seed, n_draws)
    n = np.minimum(lengths, L)
    slack = lengths - n
    start = np.minimum((uniforms[:, 0] * (slack + 1)).astype(np.int64), slack) if train else slack
    window_start = rows.offsets[:-1] + start  # flat index of each window's first interaction

    # Query: the `query` smallest keys among the valid suffix lengths 2..n.
    query_keys = np.where(np.arange(2, L + 1) <= n[:, None], uniforms[:, 1:L], np.inf)
    chosen = np.argsort(query_keys, axis=1)[:, : spec.query]
    query_ok = np.take_along_axis(query_keys, chosen, axis=1) < np.inf
    query_len = chosen + 2
    query_end = np.broadcast_to(n[:, None] - 1, query_len.shape)

    if spec.support_windows == "history":  # one window: positions 0..n - 2, each once
        support_end, support_len = (n - 2)[:, None], (n - 1)[:, None]
        support_ok = np.ones_like(support_end, dtype=bool)
    else:  # the `support` smallest keys among pairs inside the first n - 1 positions
        support_keys = np.where(pair_end <= n[:, None] - 2, uniforms[:, L:], np.inf)
        k = min(spec.support, len(pair_start))
        chosen = np.argpartition(support_keys, k - 1, axis=1)[:, :k]
        chosen = np.take_along_axis(
            chosen, np.argsort(np.take_along_axis(support_keys, chosen, axis=1), axis=1), axis=1
        )
        support_ok = np.take_along_axis(support_keys, chosen, axis=1) < np.inf
        support_len = pair_end[chosen] - pair_start[chosen] + 1
        support_end = pair_end[chosen]
        support_end, support_len, support_ok = by_length(support_end, support_len, support_ok)
    s_items, s_ratings, s_mask = gather_windows(
        rows, window_start, support_end, support_len, support_ok, L
    )
    q_items, q_ratings, q_mask = gather_windows(
        rows, window_start, *by_length(query_end, query_len, query_ok), L
    )
    # the target is the window's last interaction (n - 1); slot l of a support window ending
    # at e holds interaction e - (L - 1) + l
    age = n[:, None, None] - 1 - (support_end[..., None] - (L - 1) + np.arange(L))
    s_age = torch.from_numpy(np.where(s_mask.numpy(), age, 0))
    return TaskBatch(s_items, s_ratings, s_mask, q_items, q_ratings, q_mask, s_age)


def by_length(
    end: np.ndarray, length: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each task's windows [B, W] ordered shortest first, empty slots last (evaluation reads a
    user's target at its first query): the meta-learner runs neighbouring windows together
    without their common padding. Losses sum over windows, so the order changes no result."""
    order = np.argsort(np.where(valid, length, np.iinfo(np.int64).max), axis=1, kind="stable")
    return tuple(np.take_along_axis(a, order, axis=1) for a in (end, length, valid))


def gather_windows(
    rows: TaskRows,
    window_start: np.ndarray,  # [B]
    end: np.ndarray,  # [B, W] window-relative index of each sub-window's last interaction
    length: np.ndarray,  # [B, W]
    valid: np.ndarray,  # [B, W]
    L: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded [B, W, L] items, ratings and mask of the sub-windows."""
    position = np.arange(L)
    mask = (position >= L - length[..., None]) & valid[..., None]
    flat = window_start[:, None, None] + end[..., None] - (L - 1) + position
    flat = np.where(mask, flat, 0)
    items = np.where(mask, rows.items[flat], 0)
    ratings = np.where(mask, rows.ratings[flat], np.float32(0))
    return torch.from_numpy(items), torch.from_numpy(ratings), torch.from_numpy(mask)
