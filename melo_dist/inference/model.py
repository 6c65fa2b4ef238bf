"""Cold-start inference: adapt a trained model to new users from their ratings, then predict.

    model = ColdStartModel.load("runs/ml1m-sasrec-melo")     # best.pt; a file or a run folder
    user = model.adapt(items=["1193", "661"], ratings=[5, 3])  # original ids, in time order
    user.predict(["914", "3408"])                              # ratings, one per candidate
    model.predict_many(histories, candidates)                  # B users, one batched inner loop

It is the model `evaluate` scores, on the same code path: a history is what evaluation calls the
window before the target. Its last L - 1 interactions (data.window) are kept, the support windows
are cut from them as evaluation cuts them (seeded by data.eval_seed and the user id), and the
trainer's inner loop (`MetaLearner.adapt`) adapts all users of a call at once. Each candidate
then ends a query window on the kept history, and its rating is the last position's prediction,
as evaluation's longest query window. A history of one rating has no support window (a window
needs 2 interactions), so it gets the meta-learned initialisation. Predictions are not clipped
to the rating range, as in evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.func import functional_call, vmap

from melo_dist.config import Config
from melo_dist.data.dataset import window_spec
from melo_dist.data.tasks import TaskRows, sample_tasks
from melo_dist.errors import InputError
from melo_dist.meta import MetaLearner, learner_from_state
from melo_dist.storage import local_dataset
from melo_dist.training.checkpoint import checkpoint_path, load_checkpoint, manifest_hash


@dataclass
class AdaptedUsers:
    """B users adapted together: keep it to predict many times without adapting again."""

    model: ColdStartModel
    rows: torch.Tensor  # [B, U] catalogue id of each task-local item id (0: padding)
    fast: dict[str, torch.Tensor]  # the adapted per-task parameters [B, ...]
    context: torch.Tensor  # [B, L - 1] each user's kept history, left-padded item ids

    def __len__(self) -> int:
        return len(self.context)

    def predict(self, candidates: Sequence[Sequence], chunk: int = 256) -> list[np.ndarray]:
        """Per user, the predicted rating of each of its candidates (original item ids), scored
        `chunk` candidates a user at a time (memory: SASRec attends over (L + chunk)^2 per
        user, the other backbones hold B x chunk windows)."""
        if len(candidates) != len(self):
            raise InputError(f"{len(candidates)} candidate lists for {len(self)} users")
        ids = [
            self.model.item_ids(items, f"candidates of user {u}")
            for u, items in enumerate(candidates)
        ]
        return self.predict_ids(ids, chunk)

    def predict_ids(self, ids: Sequence[Sequence[int]], chunk: int = 256) -> list[np.ndarray]:
        """`predict` for candidates given as the model's item ids (1..n: the catalogue's order)."""
        width = max(len(c) for c in ids)
        candidates = torch.ones(len(self), width, dtype=torch.long)  # (a real item: filler)
        for user, items in enumerate(ids):
            candidates[user, : len(items)] = torch.as_tensor(items, dtype=torch.long)
        with torch.no_grad():
            pred = torch.cat(
                [
                    self.model.score(self, part) * self.model.scale
                    for part in candidates.split(chunk, dim=1)
                ],
                dim=1,
            )
        return [pred[user, : len(items)].numpy() for user, items in enumerate(ids)]


@dataclass
class AdaptedUser:
    """One adapted user (`ColdStartModel.adapt`)."""

    users: AdaptedUsers

    def predict(self, candidates: Sequence) -> np.ndarray:
        return self.users.predict([candidates])[0]


class ColdStartModel:
    """A trained checkpoint with the item map of the dataset it was trained on."""

    def __init__(self, state: dict, data_path: Path, path: Path) -> None:
        self.path, self.iteration = path, state["iteration"]  # the checkpoint file it came from
        self.config = Config.from_dict(state["config"])
        self.config.data.path = str(data_path)
        self.learner = learner_from_state(state)
        self.learner.eval()
        self.levels = [float(level) for level in state["rating_levels"]]
        self.scale = self.learner.scale
        self.window = self.config.data.window
        table = pq.read_table(data_path / "item_map.parquet", columns=["item", "item_id"])
        self.item_index = dict(
            zip(table.column("item_id").to_pylist(), table.column("item").to_pylist())
        )
        self.catalogue = sorted(self.item_index, key=self.item_index.get)  # original ids
        self.spec = window_spec(self.config.data)

    @classmethod
    def load(cls, checkpoint: str | Path, data: str | Path | None = None) -> ColdStartModel:
        """A checkpoint file or run folder (best.pt); `data` is the prepared dataset it was
        trained on (default: the one named in its config), checked by its manifest hash."""
        path = checkpoint_path(checkpoint)
        state = load_checkpoint(path)
        data_path = local_dataset(data if data is not None else state["config"]["data"]["path"])
        if not (data_path / "manifest.json").is_file():
            raise InputError(
                "the checkpoint's prepared dataset is not there (its item map is needed); "
                "pass the folder it was trained on as data=",
                path=data_path,
            )
        if manifest_hash(data_path) != state["manifest_sha256"]:
            raise InputError("is not the dataset this checkpoint was trained on", path=data_path)
        return cls(state, data_path, path)

    def item_ids(self, items: Sequence, where: str) -> list[int]:
        """Original item ids -> the model's ids; an unknown one is an error naming its position."""
        ids = []
        for position, item in enumerate(items):
            index = self.item_index.get(str(item))
            if index is None:
                raise InputError(
                    f"{where}: item {item!r} at position {position} is not in the catalogue"
                )
            ids.append(index)
        return ids

    def adapt(
        self, items: Sequence, ratings: Sequence[float], user_id: str = "user"
    ) -> AdaptedUser:
        """Adapt to one user's history (original item ids and ratings, oldest first)."""
        return AdaptedUser(self.adapt_many([(items, ratings)], [user_id]))

    def predict_many(
        self, histories: Sequence[tuple[Sequence, Sequence[float]]], candidates: Sequence[Sequence]
    ) -> list[np.ndarray]:
        """Adapt to B users at once, then predict each user's candidates."""
        return self.adapt_many(histories).predict(candidates)

    def adapt_many(
        self,
        histories: Sequence[tuple[Sequence, Sequence[float]]],
        user_ids: Sequence[str] | None = None,
    ) -> AdaptedUsers:
        """Adapt to B users' histories [(items, ratings), ...] in one batched inner loop.
        `user_ids` seed each user's support windows, as evaluation does (default: the index)."""
        if not histories:
            raise InputError("no user histories given")
        user_ids = [str(u) for u in (user_ids if user_ids is not None else range(len(histories)))]
        kept_items, kept_ratings = [], []
        for user, (items, ratings) in enumerate(histories):
            items, ratings = self.checked_history(user, items, ratings)
            kept_items.append(items[-(self.window - 1) :])
            kept_ratings.append(ratings[-(self.window - 1) :])
        # Each history plus a placeholder target: evaluation's window, whose support windows lie
        # before the target. The placeholder is never adapted on or scored.
        rows = TaskRows.from_lists(
            user_ids,
            [[*items, 0] for items in kept_items],
            [[*ratings, self.levels[-1]] for ratings in kept_ratings],
        )
        batch = sample_tasks(rows, self.spec, seed=self.config.data.eval_seed, train=False)
        local, catalogue_rows = batch.with_local_items()
        fast = {}
        if isinstance(self.learner, MetaLearner):
            with torch.enable_grad():
                trajectory = self.learner.adapt(catalogue_rows, local, False)
            fast = {name: value.detach() for name, value in trajectory[-1].items()}
        context = torch.zeros(len(histories), self.window - 1, dtype=torch.long)
        for user, items in enumerate(kept_items):  # left-padded, as every window
            context[user, self.window - 1 - len(items) :] = torch.as_tensor(items)
        return AdaptedUsers(self, catalogue_rows, fast, context)

    def checked_history(
        self, user: int, items: Sequence, ratings: Sequence[float]
    ) -> tuple[list, list]:
        where = f"history of user {user}"
        if len(items) == 0:
            raise InputError(f"{where}: empty; a user needs at least one rating")
        if len(items) != len(ratings):
            raise InputError(f"{where}: {len(items)} items but {len(ratings)} ratings")
        levels = set(self.levels)
        for position, rating in enumerate(ratings):
            if float(rating) not in levels:
                raise InputError(
                    f"{where}: rating {rating!r} at position {position} is not one of {self.levels}"
                )
        return self.item_ids(items, where), [float(r) for r in ratings]

    def score(self, users: AdaptedUsers, candidates: torch.Tensor) -> torch.Tensor:
        """Candidates [B, C] in catalogue ids -> the prediction / scale of each window `user's
        context + candidate` at its last position, with each user's adapted parameters: an
        adapted item-table row where the inner loop adapted it (its support items), the
        meta-learned row elsewhere (the inner loop leaves those rows unchanged). The backbone
        reads each context once where it can (`SequenceRegressor.score_candidates`)."""
        backbone = self.learner.backbone
        if not isinstance(self.learner, MetaLearner):
            return backbone(users.context, candidates=candidates)
        rows, flat = users.rows, torch.cat([users.context, candidates], 1)
        # the task-local id of each item: its adapted row if it has one, else a new row
        padded = torch.where(rows == 0, torch.iinfo(rows.dtype).max, rows)
        padded[:, 0] = 0  # local id 0 is the padding item
        found = torch.searchsorted(padded, flat).clamp(max=rows.shape[1] - 1)
        adapted = padded.gather(1, found) == flat
        new = rows.shape[1] + torch.arange(flat.shape[1]).expand_as(flat)
        local = torch.where(adapted, found, new)
        meta = dict(backbone.named_parameters())
        fast = {
            name: torch.cat([value, meta[name][flat]], 1)
            if name in self.learner.item_tables
            else value
            for name, value in users.fast.items()
        }
        params = {**meta, **fast}
        run = vmap(
            lambda p, context, items: functional_call(
                backbone, p, (context,), {"candidates": items}
            ),
            in_dims=({name: 0 if name in fast else None for name in params}, 0, 0),
        )
        context = users.context.shape[1]
        return run(params, local[:, :context], local[:, context:])
